"""The local development loop, `devtools/run_local.py`, against its own embedded broker: the built-in
samples and Ctrl-C, --reload, --messages, devtools/send.py while it runs, --tls and the summary.

Except for the first, each test runs a copy of the project (main.py and devtools/) whose main.py gets
a recording process_message of the test's own (whatever the template's handler is), so that its
state file and edits stay its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

import main
from devtools.local_state import STATE_FILE_NAME, existing_topics, find_local_run
from devtools.messages import Message, MessageError, parse_line, read_messages
from devtools.run_local import KernelLoadError, ask_kernel
from tests.fixtures import (
    HELLO_LINE,
    NO_DOTENV,
    REPO,
    Attempt,
    check_client_certificate_required,
    check_one_owner_at_a_time,
    hello_world,
    wait_until,
)

# Added at the end of the author's part of the copy's main.py, after whatever handler it has: this
# process_message, defined last, is the one `python main.py` runs (a process_batch of the author's is
# dropped: a part defines one handler). One JSON line per call in $TEST_RECORD_PATH.
RECORDING_HANDLER = '''
globals().pop("process_batch", None)
HANDLER_VERSION = "v1"
_said_false = set()


def process_message(message) -> bool:  # the test's; imports its own, whatever main.py imports
    import json as _json
    import os as _os
    import time as _time

    started_ns = _time.time_ns()
    value = (message.value or b"").decode(errors="replace")
    if value.startswith("dead:"):
        result = "dead"
    elif value == "false-once" and (message.partition, message.offset) not in _said_false:
        _said_false.add((message.partition, message.offset))
        result = "false"
    else:
        _time.sleep(0.01)  # long enough for two versions processing at once to show as an overlap
        result = "true"
    record = {"version": HANDLER_VERSION, "topic": message.topic, "partition": message.partition,
              "offset": message.offset, "key": message.key and message.key.decode(), "value": value,
              "headers": [[k, v.decode()] for k, v in message.headers or []], "result": result,
              "pid": _os.getpid(), "started_ns": started_ns, "ended_ns": _time.time_ns()}
    with open(_os.environ["TEST_RECORD_PATH"], "a") as records:
        records.write(_json.dumps(record) + "\\n")
    if result == "dead":
        raise DeadLetter(value[len("dead:"):])
    return result == "true"

'''
END_OF_YOUR_PART = "\n# End of your kernel"
SUMMARY_PARTITION = re.compile(r"^ +(\S+)\[(\d+)\]: (?:committed (\d+)|nothing committed) of (\d+)", re.M)


class LocalRunProcess:
    """`python devtools/run_local.py ARGS` in `project`, its output in a file."""

    def __init__(self, project: Path, args: list[str], env: dict[str, str], log_path: Path):
        self.project = project
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, str(project / "devtools" / "run_local.py"), *args],
                                            cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 30) -> re.Match:
        return wait_until(lambda: re.search(pattern, self.output(), re.M), timeout_s,
                          f"{pattern!r} in the local run's output\n{self.output()[-3000:]}")

    def ctrl_c(self, timeout_s: float = 30) -> int:
        """SIGINT to the runner's process group, as a terminal's Ctrl-C; its exit code."""
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGUSR1)  # its threads' stacks, into the output
            time.sleep(1)
            pytest.fail(f"the local run did not stop within {timeout_s} s\n{self.output()[-6000:]}")

    def summary_partitions(self) -> dict[int, tuple[int, int]]:
        """partition → (committed offset, 0 for nothing committed; end) from the summary's lines."""
        return {int(p): (int(c or 0), int(e)) for _, p, c, e in SUMMARY_PARTITION.findall(self.output())}


@pytest.fixture
def local_run(tmp_path):
    """Starts local runs in a copy of the project; any still running at the end is killed (its kernel and
    broker get SIGTERM from the kernel's parent-death signal)."""
    started: list[LocalRunProcess] = []

    class Factory:
        project = tmp_path / "project"
        record_path = tmp_path / "records.jsonl"

        def copy_project(self) -> Path:
            self.project.mkdir()
            shutil.copytree(REPO / "devtools", self.project / "devtools",
                            ignore=shutil.ignore_patterns("__pycache__"))
            main = (REPO / "main.py").read_text()
            assert END_OF_YOUR_PART in main, "main.py has no '# End of your kernel' line"
            self.main = self.project / "main.py"
            self.main.write_text(main.replace(END_OF_YOUR_PART, "\n" + RECORDING_HANDLER + END_OF_YOUR_PART, 1))
            return self.project

        def env(self, dotenv: bool = False) -> dict[str, str]:
            """The tests' environment without their settings; with `dotenv`, the kernel reads the .env
            beside main.py (without, none: NO_DOTENV)."""
            env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "KERNEL_", "TEST_"))}
            return {**env, "TEST_RECORD_PATH": str(self.record_path),  # the runner's own session timeout
                    **({} if dotenv else NO_DOTENV)}

        def start(self, *args: str, project: Path | None = None, dotenv: bool = False) -> LocalRunProcess:
            run = LocalRunProcess(project or self.project, list(args), self.env(dotenv),
                                  tmp_path / f"run-local-{len(started)}.log")
            started.append(run)
            return run

        def records(self) -> list[dict]:
            if not self.record_path.exists():
                return []
            lines = self.record_path.read_text().split("\n")[:-1]  # not a line the kernel is still writing
            return [json.loads(line) for line in lines]

        def send(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, str(self.project / "devtools" / "send.py"), *args],
                                  input=stdin, capture_output=True, text=True, timeout=60, env=self.env())

    yield Factory()
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait(timeout=10)


def attempts(records: list[dict]) -> list[Attempt]:
    return [Attempt(r["partition"], r["offset"], r["value"], r["result"], r["pid"], r["started_ns"], r["ended_ns"])
            for r in records]


def write_messages(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@hello_world
def test_the_samples_are_processed_and_ctrl_c_stops_everything(local_run):
    started = time.monotonic()
    run = local_run.start(project=REPO)  # the command as a newcomer types it, on the real main.py
    wait_until(lambda: len(HELLO_LINE.findall(run.output())) == 5, 30, "the five sample messages")
    print(f"sample messages processed {time.monotonic() - started:.1f} s after start")
    assert (REPO / STATE_FILE_NAME).exists()
    assert run.ctrl_c() == 0
    output = run.output()
    assert "<256 bytes>" in output and "(529 characters)" in output
    assert len(re.findall(rf"INFO \[{main.KERNEL_NAME}\] Received {main.DEFAULT_TOPIC}\[", output)) == 5, "name once"
    assert re.search(r"processed 5, retried 0, dead-lettered 0", output), output[-2000:]
    assert sum(end for _, end in run.summary_partitions().values()) == 5
    assert not (REPO / STATE_FILE_NAME).exists(), "the state file outlived the run"
    broker_port = re.search(r"broker listening on 127\.0\.0\.1:(\d+)", output).group(1)
    leftovers = subprocess.run(["pgrep", "-f", f"listener-url tcp://127.0.0.1:{broker_port}"], capture_output=True)
    assert leftovers.stdout == b"", "the broker outlived the local run"


class BackgroundSender(threading.Thread):
    """Sends "bg-N" to the local run's topic every 20 ms until stopped, found through its state file."""

    def __init__(self, project: Path):
        super().__init__(daemon=True)
        self.run_state = find_local_run(project)
        self.stopped = threading.Event()
        self.placed: list[tuple[int, int]] = []
        self.start()

    def run(self) -> None:
        producer = KafkaProducer(**self.run_state.kafka_config(), acks="all")
        number = 0
        while not self.stopped.is_set():
            sent = producer.send(self.run_state.topics[0], value=f"bg-{number}".encode()).get(timeout=30)
            self.placed.append((sent.partition, sent.offset))
            number += 1
            time.sleep(0.02)
        producer.close()

    def stop(self) -> list[tuple[int, int]]:
        self.stopped.set()
        self.join(timeout=30)
        assert not self.is_alive(), "the background sender did not stop"
        return self.placed


def test_reload_restarts_the_kernel_on_save_and_waits_out_a_syntax_error(local_run, tmp_path):
    project = local_run.copy_project()
    messages = write_messages(tmp_path / "messages.jsonl", [f"first-{n}" for n in range(20)])
    run = local_run.start("--reload", "--messages", str(messages))
    wait_until(lambda: len(local_run.records()) >= 20, 30, f"the first handler's records\n{run.output()[-3000:]}")
    sender = BackgroundSender(project)
    wait_until(lambda: any(r["value"].startswith("bg-") for r in local_run.records()), 10, "a message sent meanwhile")

    fixed = local_run.main.read_text()
    local_run.main.write_text(fixed.replace('HANDLER_VERSION = "v1"', 'HANDLER_VERSION = "v1'))  # unterminated
    run.wait_for(r"^SyntaxError: ", 30)
    assert run.process.poll() is None, "a syntax error stopped the local run"
    for _ in range(3):  # saves in quick succession: one restart
        local_run.main.write_text(fixed.replace('HANDLER_VERSION = "v1"', 'HANDLER_VERSION = "v2"'))
        time.sleep(0.05)
    wait_until(lambda: any(r["version"] == "v2" for r in local_run.records()), 30,
               f"the edited handler's records\n{run.output()[-3000:]}")
    sent = sender.stop()
    wait_until(lambda: set(sent) <= {(r["partition"], r["offset"]) for r in local_run.records()}, 30,
               f"every message sent meanwhile processed\n{run.output()[-3000:]}")
    assert run.ctrl_c() == 0

    output = run.output()
    ends = {partition: end for partition, (_, end) in run.summary_partitions().items()}
    assert sum(ends.values()) == 20 + len(sent), output[-2000:]
    records = local_run.records()
    everything = {(partition, offset) for partition, end in ends.items() for offset in range(end)}
    assert {(r["partition"], r["offset"]) for r in records} == everything, "a message was lost"
    assert len(records) == len(everything), "a message was processed twice"
    check_one_owner_at_a_time(attempts(records))  # per partition, the two versions never overlap
    assert len(re.findall(r"^SyntaxError: ", output, re.M)) == 1 and re.search(r'^ +HANDLER_VERSION = "v1$', output, re.M)
    assert len(re.findall(r"run_local: starting the kernel", output)) == 2, "one start, one restart after the fix"
    assert {r["version"] for r in records} == {"v1", "v2"}
    assert re.search(rf"processed {len(records)}, retried 0", output), "the summary adds up both kernel runs"
    assert all(committed == end for committed, end in run.summary_partitions().values()), output[-2000:]


def test_a_messages_file_and_messages_sent_while_it_runs(local_run, tmp_path):
    local_run.copy_project()
    messages = write_messages(tmp_path / "messages.jsonl", [
        "# a comment, then a blank line",
        "",
        '{"event": "signup", "user": "u-1"}',
        '{"key": "u-2", "value": {"event": "login"}, "headers": {"source": "file", "trace": "t-1"}}',
        '{"key": "u-3", "value": "text in the form", "headers": [["h", "1"], ["h", "2"]]}',
        "plain text, not JSON",
    ])
    run = local_run.start("--messages", str(messages))
    wait_until(lambda: len(local_run.records()) == 4, 30, f"the file's four messages\n{run.output()[-3000:]}")
    received = {r["value"]: (r["key"], r["headers"]) for r in local_run.records()}
    assert received == {
        '{"event": "signup", "user": "u-1"}': (None, []),
        '{"event": "login"}': ("u-2", [["source", "file"], ["trace", "t-1"]]),
        "text in the form": ("u-3", [["h", "1"], ["h", "2"]]),
        "plain text, not JSON": (None, []),
    }

    by_argument = local_run.send('{"event": "sent"}', '{"key": "k", "value": "keyed"}')
    by_stdin = local_run.send(stdin="from stdin\n# skipped\n")
    assert by_argument.returncode == 0 and by_stdin.returncode == 0, by_argument.stderr + by_stdin.stderr
    places = re.findall(r"^sent (\S+)\[(\d+)\]@(\d+)$", by_argument.stdout + by_stdin.stdout, re.M)
    assert len(places) == 3
    wait_until(lambda: len(local_run.records()) == 7, 30, f"the three messages sent\n{run.output()[-3000:]}")
    later = {(r["partition"], r["offset"]): (r["key"], r["value"]) for r in local_run.records()[4:]}
    assert sorted(later.values(), key=str) == sorted([(None, '{"event": "sent"}'), ("k", "keyed"), (None, "from stdin")], key=str)
    assert set(later) == {(int(p), int(o)) for _, p, o in places}, "send.py printed where each message went"

    assert run.ctrl_c() == 0
    assert re.search(r"processed 7, retried 0, dead-lettered 0, failed 0", run.output()), run.output()[-2000:]
    assert sum(end for _, end in run.summary_partitions().values()) == 7
    assert all(committed == end for committed, end in run.summary_partitions().values())


def test_tls_run_dead_letters_retries_and_the_summary(local_run, tmp_path):
    project = local_run.copy_project()
    messages = write_messages(tmp_path / "messages.jsonl", ["ok-1", "dead:reason one", "false-once", "ok-2",
                                                            "dead:reason two"])
    run = local_run.start("--tls", "--messages", str(messages))
    state = wait_until(lambda: (project / STATE_FILE_NAME).exists() and find_local_run(project), 30, "the state file")
    assert local_run.send("ok-3").returncode == 0  # send.py over TLS, with the run's client certificate
    wait_until(lambda: sum(r["result"] in ("true", "dead") for r in local_run.records()) == 6, 30,
               f"every message done\n{run.output()[-3000:]}")

    check_client_certificate_required(state.bootstrap, state.tls_files["ca"], state.tls_files["cert"],
                                      state.tls_files["key"])
    assert run.ctrl_c() == 0

    output = run.output()
    assert re.search(r"processed 4, retried 1, dead-lettered 2, failed 0", output), output[-2000:]
    reasons = re.findall(r"^ +\S+\[\d+\]@\d+: (reason \w+)$", output, re.M)
    assert sorted(reasons) == ["reason one", "reason two"], output[-2000:]
    assert sum(end for _, end in run.summary_partitions().values()) == 6
    assert all(committed == end for committed, end in run.summary_partitions().values())
    assert not (project / STATE_FILE_NAME).exists() and not Path(state.tls_files["key"]).exists(), "left behind"


def test_a_killed_runs_keys_are_removed_by_the_next_run_and_sighup_cleans_up(local_run, tmp_path):
    """SIGKILL leaves a --tls run's folder (its private keys, 0600) behind: the next run removes it. A
    closed terminal (SIGHUP) stops a run as Ctrl-C does, leaving neither folder nor state file."""
    project = local_run.copy_project()
    killed = local_run.start("--tls")
    state = wait_until(lambda: (project / STATE_FILE_NAME).exists() and find_local_run(project), 30, "the state file")
    key = Path(state.tls_files["key"])
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    os.killpg(killed.process.pid, signal.SIGKILL)
    killed.process.wait(timeout=10)
    assert key.exists()

    run = local_run.start()
    run.wait_for(r"Partitions assigned")
    assert not key.parent.exists(), "the killed run's keys were left behind"
    os.killpg(run.process.pid, signal.SIGHUP)
    assert run.process.wait(timeout=30) == 0
    assert not (project / STATE_FILE_NAME).exists()
    owners = [int(path.read_text()) for path in Path(tempfile.gettempdir()).glob("run-local-*/owner.pid")]
    assert run.process.pid not in owners, "the run's folder was left behind"


# A .env for a hosted cluster, as an author writes it from .env.template: every connection setting, and
# the kernel's own ones (LOG_FORMAT here), which the local run must keep.
CLUSTER_DOTENV = """\
KAFKA_BOOTSTRAP_SERVERS=pkc-12345.eu-west-1.aws.confluent.cloud:9092
KAFKA_SECURITY_PROTOCOL=SASL_SSL
KAFKA_SASL_MECHANISM=PLAIN
KAFKA_SASL_USERNAME=API-KEY-1
KAFKA_SASL_PASSWORD=api-secret-never-shown
KAFKA_SSL_CHECK_HOSTNAME=false
KAFKA_TOPIC=orders-production
KAFKA_CONSUMER_GROUP=orders-production-group
KAFKA_CLIENT_ID=orders-production-client
KAFKA_GROUP_INSTANCE_ID=orders-0
KAFKA_AUTO_OFFSET_RESET=latest
KERNEL_DEAD_LETTER_TOPIC=orders-production-dead-letters
KERNEL_HTTP_PORT=8080
LOG_FORMAT=json
"""


def test_a_dotenv_meant_for_a_cluster_is_overridden_and_said_so(local_run, tmp_path):
    """A .env for a SASL cluster beside main.py: the local run still reaches its embedded broker (every
    connection setting is its own), names what it overrode in one line without a value, and the kernel
    keeps the .env's other settings (LOG_FORMAT=json)."""
    project = local_run.copy_project()
    (project / ".env").write_text(CLUSTER_DOTENV)
    messages = write_messages(tmp_path / "messages.jsonl", ["ok-1", "ok-2", "dead:not for this kernel"])
    run = local_run.start("--messages", str(messages), dotenv=True)
    wait_until(lambda: len(local_run.records()) == 3, 30, lambda: f"the three messages\n{run.output()[-3000:]}")
    assert run.ctrl_c() == 0
    output = run.output()
    lines = [line for line in output.splitlines() if "overridden" in line]
    assert lines == [lines[0]] and lines[0].startswith("run_local: overridden for the embedded broker"), output[-3000:]
    named = set(re.findall(r"[A-Z][A-Z_]+[A-Z]", lines[0].split(":", 2)[2]))
    assert named == {name for name in re.findall(r"^(\w+)=", CLUSTER_DOTENV, re.M) if name != "LOG_FORMAT"}, lines[0]
    assert not any(value in lines[0] for value in re.findall(r"=(.+)$", CLUSTER_DOTENV, re.M)), "a value was shown"
    assert re.search(r"processed 2, retried 0, dead-lettered 1, failed 0", output), output[-3000:]
    assert all(committed == end for committed, end in run.summary_partitions().values()), output[-3000:]
    assert '"kernel": ' in output and '"message": "Partitions assigned' in output, "the .env's LOG_FORMAT did not reach the kernel"


def test_bad_input_gets_a_one_line_error(local_run, tmp_path):
    project = local_run.copy_project()
    malformed = write_messages(tmp_path / "bad.jsonl", ['{"ok": 1}', '{"key": "k", "value": 1', "text"])
    checks = [
        ([str(project / "devtools" / "run_local.py"), "--messages", str(malformed)],
         rf"^run_local\.py: {re.escape(str(malformed))}:2: starts with '{{' but is not JSON: .+\n$"),
        ([str(project / "devtools" / "run_local.py"), "--messages", str(tmp_path / "missing.jsonl")],
         r"^run_local\.py: .*missing\.jsonl: no such file\n$"),
        ([str(project / "devtools" / "send.py"), "hello"], r"^send\.py: no local run found .+ does not exist.+\n$"),
        ([str(project / "devtools" / "send.py"), '{"key": 1, "value": "v"}'],
         r'^send\.py: <arguments>:1: "key" must be a string or null, not 1\n$'),
        ([str(project / "devtools" / "send.py"), '{"value": null}'],
         r'^send\.py: <arguments>:1: a tombstone \("value": null\) needs a "key".+\n$'),
    ]
    for command, error in checks:
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL, env=local_run.env())
        assert result.returncode != 0 and re.search(error, result.stderr), (command, result.stderr)
    tombstone = write_messages(tmp_path / "tombstone.jsonl", ['{"value": null}'])
    result = subprocess.run([sys.executable, str(project / "devtools" / "run_local.py"), "--messages", str(tombstone)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=local_run.env())
    assert result.returncode == 2 and "needs a \"key\"" in result.stderr and "Traceback" not in result.stderr


def test_send_refuses_binary_input_and_a_topic_that_does_not_exist(local_run):
    local_run.copy_project()
    run = local_run.start()
    run.wait_for(r"Partitions assigned")
    binary = subprocess.run([sys.executable, str(local_run.project / "devtools" / "send.py")], input=b"\xff\xfe\x00",
                            capture_output=True, timeout=60, env=local_run.env())
    assert binary.returncode == 1 and b"send.py: <stdin>: not UTF-8 text (byte 0)" in binary.stderr, binary.stderr
    assert b"Traceback" not in binary.stderr
    typo = local_run.send("--topic", "typo", "x")
    assert typo.returncode == 1 and "send.py: topic typo does not exist on the local broker" in typo.stderr, typo.stderr
    state = find_local_run(local_run.project)
    assert "typo" not in existing_topics(state.kafka_config()), "the mistyped topic was created"
    assert run.ctrl_c() == 0


@pytest.mark.parametrize("line, expected", [
    ('{"event": "a", "n": 1}', Message(b'{"event": "a", "n": 1}')),  # a JSON object: the value, as written
    ('{"key": "k", "value": {"a": 1}}', Message(b'{"a": 1}', b"k")),  # the form: other JSON is sent as JSON
    ('{"value": "text", "headers": {"h": "v"}}', Message(b"text", None, [("h", b"v")])),  # a string as text
    ('{"value": "x", "headers": [["h", "1"], ["h", "2"]]}', Message(b"x", None, [("h", b"1"), ("h", b"2")])),
    ('{"key": "k", "value": null}', Message(None, b"k")),  # a tombstone
    ('{"value": 1, "other": 2}', Message(b'{"value": 1, "other": 2}')),  # not the form: an object value
    ('{"value": {"value": 1}}', Message(b'{"value": 1}')),  # the way to send an object that looks like the form
    ("[1, 2]", Message(b"[1, 2]")),
    ("plain text ", Message(b"plain text ")),
    ("", None),
    ("  # a comment", None),
])
def test_a_message_line(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize("line, error", [
    ('{"event": ', "starts with '{' but is not JSON: Expecting value (column 11)"),
    ('{"key": 1, "value": "v"}', '"key" must be a string or null, not 1'),
    ('{"value": "v", "headers": {"h": 1}}', '"headers": ["h", 1] is not a name and a string value'),
    ('{"value": "v", "headers": "h"}', '"headers" must be an object'),
    ('{"value": null}', 'a tombstone ("value": null) needs a "key"'),
])
def test_a_malformed_message_line(line, error):
    with pytest.raises(MessageError, match=re.escape(error)):
        parse_line(line)


def test_the_sample_messages_file_parses():
    messages = read_messages(REPO / "devtools" / "sample_messages.jsonl")
    assert [m.key for m in messages] == [None, b"user-2", b"user-2", b"user-2", None]


def test_the_kernel_is_asked_for_its_topic_group_and_own_modules(local_run):
    """What --reload watches: main.py and the project modules it imports, not what is installed."""
    project = local_run.copy_project()
    (project / "helper.py").write_text("def shout(text):\n    return text.upper()\n")
    local_run.main.write_text(local_run.main.read_text().replace(END_OF_YOUR_PART, "\nimport helper\n" + END_OF_YOUR_PART, 1))
    info = ask_kernel(project)
    assert info.files == {project / "main.py", project / "helper.py"}
    assert (info.topics, info.group) == ([main.DEFAULT_TOPIC], f"{main.KERNEL_NAME}-group")
    (project / "helper.py").write_text("def shout(text)\n    return text.upper()\n")
    with pytest.raises(KernelLoadError, match=r'File ".*helper\.py", line 1\n.*\n.*\^\nSyntaxError: '):
        ask_kernel(project)
