"""Logs stay bounded and honest: input is cut, a library's traceback is one line, and the last word
before a stop says what was not committed."""

import io
import logging
import re

import main
from tests.fixtures import processed, wait_until


def log_line(logger_name: str, message: str, *args, exc_info=None, json_format: bool = False) -> str:
    """What the kernel's own log handler writes for one record."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter((main.JsonFormatter if json_format else main.PlainFormatter)("a-kernel"))
    handler.addFilter(main.bounded_log_line)
    handler.addFilter(main.RepeatFilter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message, *args, exc_info=exc_info)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return stream.getvalue()


def test_a_huge_header_a_library_warns_about_is_cut_to_a_few_hundred_characters():
    baggage = "k=" + "v" * 500_000  # OpenTelemetry logs a baggage header over its limit whole
    line = log_line("opentelemetry.baggage.propagation", "Baggage header `%s` exceeded the maximum number of bytes "
                    "per baggage-string", baggage)
    assert len(line) < 600, line[:1000]
    assert "(500,002 characters)" in line


def test_a_message_a_library_formatted_itself_is_cut_too():
    line = log_line("somelib", "body: " + "x" * 100_000)
    assert len(line) < main.LOGGED_MESSAGE_MAX_CHARS + 200
    assert line.count("\n") == 1


def test_the_kafka_clients_traceback_is_folded_into_its_line():
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        import sys

        exc_info = sys.exc_info()
    line = log_line("kafka.conn", "%s: Error receiving network data closing socket", "<BrokerConnection node_id=1>",
                    exc_info=exc_info)
    assert line.count("\n") == 1, line
    assert line.rstrip().endswith("Error receiving network data closing socket "
                                  "(ConnectionResetError: [Errno 104] Connection reset by peer)")


def test_the_kernels_own_traceback_stays_whole():
    try:
        raise ValueError("a bug in process_message")
    except ValueError:
        import sys

        exc_info = sys.exc_info()
    assert "Traceback" in log_line("kernel", "process_message failed", exc_info=exc_info)
    assert "Traceback" in log_line("a-kernel", "my own failure", exc_info=exc_info)


def test_a_stop_while_the_broker_is_down_says_what_was_not_committed(cluster, kernels):
    """The final commit fails: its warning may be held back by the repeat filter, so the last word says
    which finished messages will be processed again."""
    if cluster.proxy is None:  # Tansu's proxy cuts connections; a killed Apache Kafka is tested in test_failover
        return
    topic = cluster.create_topic(partitions=1)
    cluster.produce(topic, [(0, None, f"m{i}".encode()) for i in range(400)])
    kernel = kernels.start(kernels.env(topic, "stop-in-outage", TEST_SLEEP_S=0.02, KAFKA_MAX_POLL_RECORDS=400,
                                       KAFKA_COMMIT_TIMEOUT_MS=1000))
    wait_until(lambda: len(processed(kernels.attempts())) >= 20, 60, "20 messages processed")
    cluster.proxy.drop_connections(60)
    done = len(processed(kernels.attempts()))
    wait_until(lambda: len(processed(kernels.attempts())) >= done + 50, 30, "50 more messages processed in the outage")
    assert kernel.stop(timeout_s=60) == 0
    cluster.proxy.drop_connections(0)
    last = [line for line in kernel.log().splitlines() if " ERROR " in line or " WARNING " in line][-1]
    found = re.search(rf"Could not commit before stopping: what finished before {topic}\[0\]@(\d+) is processed "
                      "again", last)
    assert found, kernel.log()[-3000:]
    assert int(found.group(1)) >= done + 50
    assert (cluster.committed("stop-in-outage", topic, 1)[0] or 0) < int(found.group(1))


def test_the_libraries_of_the_extras_log_warnings_only_unless_debug(monkeypatch):
    libraries = ("kafka", "httpx", "httpcore", "anthropic", "psycopg", "urllib3", "opentelemetry.sdk.trace")
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)  # restored after the test
    for name in libraries:
        monkeypatch.setattr(logging.getLogger(name.split(".")[0]), "level", logging.NOTSET)
    env = {"KAFKA_BOOTSTRAP_SERVERS": "localhost:9092"}
    main.apply_log_settings(main.load_settings(env, "a-kernel", "a-topic"))
    assert {name: logging.getLogger(name).getEffectiveLevel() for name in libraries} == dict.fromkeys(
        libraries, logging.WARNING)
    assert logging.getLogger("a-kernel").getEffectiveLevel() == logging.INFO
    main.apply_log_settings(main.load_settings(env | {"LOG_LEVEL": "DEBUG"}, "a-kernel", "a-topic"))
    assert {name: logging.getLogger(name).getEffectiveLevel() for name in libraries} == dict.fromkeys(
        libraries, logging.DEBUG)
