"""main.py's uses of kafka-python's internals stay in its section "kafka-python patches", each naming what
upstream would make it unneeded and the test that proves it is still needed; a kafka-python other than
the one they were written for is said at start-up, in one warning line."""

import logging
import re

import kafka

import main
from tests.fixtures import MAIN


def patches_and_the_rest() -> tuple[str, str]:
    """main.py's section "kafka-python patches", and the rest of main.py."""
    text = MAIN.read_text()
    start = re.search(r"^# kafka-python patches\b.*$", text, re.M).end()
    end = re.search(r"^# Connecting\b", text[start:], re.M).start() + start
    return text[start:end], text[:start] + text[end:]


def test_kafka_pythons_internals_are_used_in_its_patches_only():
    patches, rest = patches_and_the_rest()
    # (confluent-kafka's KafkaError names librdkafka's own error codes _MSG_TIMED_OUT, _UNKNOWN_TOPIC...: public.)
    private = re.findall(r"^.*\w\._(?!_|[A-Z_]+\b)\w+.*$", rest, re.M)
    assert [line for line in private if "os._exit(" not in line] == [], "a private attribute outside the patches"
    subclassed = re.findall(r"^class \w+\(((?:kafka|Fetcher)\S*?)\)", rest, re.M)
    assert subclassed == ["kafka.sasl.oauth.AbstractTokenProvider"], "kafka-python's documented extension point only"
    proofs = re.findall(r'Proven by:\s+(tests/\w+\.py)(.*?)"""', patches, re.S)
    assert len(proofs) == patches.count("Unneeded once:") >= 9
    for path, tests in proofs:  # the tests named exist
        source = (MAIN.parent / path).read_text()
        assert all(f"def {test}(" in source for test in re.findall(r"\btest_\w+", tests)), (path, tests)


def test_another_kafka_python_is_one_warning_line(monkeypatch, caplog):
    with caplog.at_level(logging.INFO):
        main.check_kafka_python_version()
        assert caplog.records == [], "the version the patches were written for: nothing to say"
        monkeypatch.setattr(kafka, "__version__", "3.0.12")
        main.check_kafka_python_version()
    assert [(record.levelname, record.getMessage()) for record in caplog.records] == [(
        "WARNING", "kafka-python 3.0.12 is installed, but main.py's kafka-python patches were written for 2.3.3: "
        "run the tests each one names before trusting them")]
