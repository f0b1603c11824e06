"""Run the kernel end to end on an embedded broker: `uv run devtools/run_local.py [--reload] [--messages FILE] [--tls]`.

Starts Tansu on a free port, creates the kernel's topic(s) and a dead-letter topic beside the first,
produces sample messages (or yours) and runs `python main.py` against it, configured only through
environment variables, as production runs it: every connection setting is the run's, whatever a .env
meant for a cluster says (one line names what it overrode); the kernel's other settings pass. A
kernel that raises DeadLetter for a message shows it dead-lettered rather than stopping. Ctrl-C stops
the kernel gracefully (it commits and leaves its group), prints a summary of the run, then stops the
broker; a second Ctrl-C stops the kernel at once.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dotenv  # noqa: E402
import watchfiles  # noqa: E402

from devtools.broker import Broker, die_with_parent, free_port  # noqa: E402
from devtools.local_state import PROJECT, LocalRun, LocalRunError, produce  # noqa: E402
from devtools.messages import Message, MessageError, read_messages  # noqa: E402
from devtools.summary import summary  # noqa: E402

SAMPLES = [
    Message(json.dumps({"event": "signup", "user": "user-1"}).encode(), b"user-1"),
    Message(json.dumps({"event": "login", "user": "user-2"}).encode(), b"user-2"),
    Message(b"plain text without a key"),
    Message(bytes(range(256)), b"sensor-7"),  # binary: logged as a byte count
    Message(json.dumps({"event": "note", "text": "x" * 500}).encode(), b"user-1"),  # truncated in the log
]
PARTITIONS = 3
# Tansu's first join waits about half the session timeout: keep it short locally (the environment may
# set its own values; a .env file meant for a cluster does not).
LOCAL_DEFAULTS = {"KAFKA_SESSION_TIMEOUT_MS": "3000", "KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}
# What main.py reads about the connection, which a .env meant for a cluster (or the shell) sets for the
# cluster: the local run sets each for the embedded broker, empty for main.py's default where it has none
# of its own (tests/test_author_loop.py fails on a KAFKA_ variable of main.py that is neither here nor
# named there as tuning).
CONNECTION_SETTINGS = (
    "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_CA_CERT", "KAFKA_CLIENT_CERT", "KAFKA_CLIENT_KEY",
    "KAFKA_SSL_CHECK_HOSTNAME", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
    "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID",
    "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "KAFKA_SASL_OAUTHBEARER_SCOPE", "KAFKA_SASL_OAUTHBEARER_EXTENSIONS",
    "KAFKA_TOPIC", "KAFKA_CONSUMER_GROUP", "KAFKA_CLIENT_ID", "KAFKA_GROUP_INSTANCE_ID", "KAFKA_AUTO_OFFSET_RESET",
    "KERNEL_DEAD_LETTER_TOPIC",
)
SAVES_SETTLE_MS = 300  # saves closer together than this (an editor's save and its formatter) restart once
KERNEL_STOP_TIMEOUT_S = 60.0  # past its own KERNEL_SHUTDOWN_TIMEOUT_MS (30 s by default), a stop is forced
WAIT_STEP_S = 0.1  # how often the loop looks at the kernel, the watcher and Ctrl-C
ASK_TIMEOUT_S = 60.0  # importing main.py (for its name and topic) takes longer only if it hangs

# Run in a short subprocess, so that the runner never imports main.py itself (it would go stale on
# reload, and die on a syntax error): prints what the runner needs, or shows why main.py cannot load.
ASK_KERNEL = r"""
import json, sys, sysconfig, traceback
from pathlib import Path
project = Path(sys.argv[1])
sys.path.insert(0, str(project))
try:
    import main
except SyntaxError as error:  # its own lines say where: file, line, the code and a caret
    print("".join(traceback.format_exception_only(error)), end="", file=sys.stderr)
    sys.exit(1)
except BaseException as error:
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)  # without this script's frame
    sys.exit(1)
installed = [Path(p).resolve() for p in {sys.prefix, *sysconfig.get_paths().values()}]
loaded = {Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, "__file__", None)}
files = [str(f) for f in loaded
         if f.suffix == ".py" and f.is_relative_to(project) and not any(f.is_relative_to(i) for i in installed)]
print(json.dumps({"name": main.KERNEL_NAME, "default_topic": main.DEFAULT_TOPIC, "files": files}))
"""


class KernelLoadError(Exception):
    """main.py (or a module it imports) does not load; the text is what Python said."""


@dataclass(frozen=True)
class KernelInfo:
    name: str
    topics: list[str]
    group: str
    files: set[Path]  # main.py and the project's own modules it imports: what --reload watches

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.topics[0]}-dead-letters"


def start_asking(project: Path) -> subprocess.Popen:
    """Start the question to main.py; the runner does other work while Python imports it."""
    return subprocess.Popen([sys.executable, "-c", ASK_KERNEL, str(project)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # the Ctrl-C is the runner's to handle


def kernel_info(asking: subprocess.Popen, project: Path) -> KernelInfo:
    """The kernel's name, topics, group and source files, as `python main.py` would see them."""
    try:
        answer, error = asking.communicate(timeout=ASK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        asking.kill()
        asking.wait()
        raise KernelLoadError(f"importing main.py took more than {ASK_TIMEOUT_S:.0f} s") from None
    if asking.returncode != 0:
        raise KernelLoadError(error.rstrip() or f"importing main.py exited with code {asking.returncode}")
    found = json.loads(answer.splitlines()[-1])
    topics = [t.strip() for t in (os.environ.get("KAFKA_TOPIC") or found["default_topic"]).split(",") if t.strip()]
    group = os.environ.get("KAFKA_CONSUMER_GROUP") or f"{found['name']}-group"  # the kernel's own default
    return KernelInfo(found["name"], topics, group, {Path(f) for f in found["files"]} | {project / "main.py"})


def ask_kernel(project: Path) -> KernelInfo:
    return kernel_info(start_asking(project), project)


def show_load_error(error: KernelLoadError, waiting: bool) -> None:
    rule = "-" * 72
    then = "fix it and save: the kernel starts again then." if waiting else "fix it and run again."
    print(f"{rule}\nmain.py does not load; {then}\n\n{error}\n{rule}", file=sys.stderr, flush=True)


def say(text: str) -> None:
    print(f"run_local: {text}", flush=True)


class SourceWatcher:
    """Reports saves of the kernel's own Python files (main.py and the project modules it imports; never
    .venv), from a thread. Saves in quick succession arrive as one report."""

    def __init__(self, project: Path, files: set[Path] | None):
        self.files = files  # None: any Python file of the project (while main.py does not load)
        self.reports: queue.SimpleQueue[set[Path]] = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, args=(project,), name="watcher", daemon=True)
        self.thread.start()

    def watch(self, project: Path) -> None:
        for changes in watchfiles.watch(project, watch_filter=self.concerns, stop_event=self.stopped,
                                        step=SAVES_SETTLE_MS):
            self.reports.put({Path(path) for _, path in changes})

    def concerns(self, change: watchfiles.Change, path: str) -> bool:
        if self.files is None:  # what main.py imports is unknown: any module outside the virtualenv
            return path.endswith(".py") and not Path(path).is_relative_to(sys.prefix)
        return Path(path) in self.files

    def next_report(self, timeout_s: float) -> set[Path] | None:
        try:
            return self.reports.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def discard_reports(self) -> None:
        """Forget saves already seen: a kernel started from now on reads them anyway."""
        while self.next_report(0) is not None:
            pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class KernelProcess:
    """`python main.py` in its own session, so that Ctrl-C reaches the runner, which passes it on once."""

    def __init__(self, project: Path, env: dict[str, str]):
        self.signals_sent = 0
        self.process = subprocess.Popen([sys.executable, str(project / "main.py")], env=env,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent)  # a killed runner leaves no kernel behind

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.signals_sent += 1
            self.process.send_signal(signum)

    def exit_code(self) -> int | None:
        return self.process.poll()


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM: the kernel gets one signal per interrupt beyond the ones it already
    had (a first stops it gracefully, a second at once); a second one with no kernel left aborts."""

    def __init__(self):
        self.count = 0
        self.kernel: KernelProcess | None = None
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal was closed
            signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        self.count += 1
        if self.kernel is not None and self.kernel.exit_code() is None:
            if self.kernel.signals_sent < self.count:
                self.kernel.signal(signal.SIGINT)
        elif self.count > 1:
            raise KeyboardInterrupt  # a second Ctrl-C while the summary is read: stop the broker now


WORKDIR_PREFIX = "run-local-"


def remove_abandoned_workdirs() -> None:
    """The folders of local runs that were killed (SIGKILL leaves no time to clean up): the certificates
    and keys of a --tls run must not stay behind. A folder whose owner still runs is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            os.kill(int((folder / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            pass  # not ours to judge: no owner recorded, or one we may not signal


def run_settings(run: LocalRun, tls_env: dict[str, str], http_port: int, metrics_dir: Path) -> dict[str, str]:
    """What the local run sets for the kernel, whatever .env or the environment say (a .env is meant for a
    cluster): every connection setting, for the embedded broker."""
    return {
        **dict.fromkeys(CONNECTION_SETTINGS, ""),  # the environment wins over .env, even when empty
        "KAFKA_BOOTSTRAP_SERVERS": run.bootstrap,
        "KAFKA_TOPIC": ",".join(run.topics),
        "KAFKA_CONSUMER_GROUP": run.group,
        "KERNEL_DEAD_LETTER_TOPIC": run.dead_letter_topic,
        **tls_env,
        # The kernel counts only while it serves metrics; each process writes its counters into
        # metrics_dir, so the summary adds them up over reloads.
        "KERNEL_HTTP_PORT": str(http_port),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }


def local_environment(settings: dict[str, str]) -> dict[str, str]:
    """The kernel's environment: the run's settings over the environment, over the local defaults."""
    return {**LOCAL_DEFAULTS, **os.environ, **settings}


def dotenv_settings(project: Path) -> dict[str, str]:
    """The settings of the .env file the kernel reads (KERNEL_DOTENV's, `none` for none, else the one beside
    main.py); empty without one."""
    chosen = os.environ.get("KERNEL_DOTENV", "").strip()
    path = Path(chosen) if chosen else project / ".env"
    if chosen == "none" or not path.is_file():
        return {}
    logging.getLogger("dotenv.main").disabled = True  # a line it cannot read: the kernel names it
    return {name: value or "" for name, value in dotenv.dotenv_values(path).items()}


def overridden(settings: dict[str, str], dotenv_values: dict[str, str]) -> str | None:
    """One line naming what .env and the environment set that the run's settings replace (never a
    value), or None when they replace nothing."""
    replaced: dict[str, list[str]] = {".env": [], "the environment": []}
    for name, value in settings.items():
        in_environment = name in os.environ  # the environment wins over .env
        where, given = ("the environment", os.environ[name]) if in_environment else (".env", dotenv_values.get(name))
        if given and given != value:
            replaced[where].append(name)
    said = "; ".join(f"{where}'s {', '.join(names)}" for where, names in replaced.items() if names)
    return f"overridden for the embedded broker (set for a cluster): {said}" if said else None


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_local.py",
        description="Run main.py against an embedded broker, with sample messages (or yours).",
        epilog="While it runs, `uv run devtools/send.py MESSAGE...` sends more messages from another terminal "
               "(it finds the broker through .run_local.json, which this command writes beside main.py and "
               "removes at exit). Ctrl-C stops the kernel gracefully and prints a summary: processed, retried "
               "and dead-lettered messages (with the first reasons), and each partition's committed offset "
               "against its end; a second Ctrl-C stops the kernel at once.",
    )
    parser.add_argument("--reload", action="store_true",
                        help="restart the kernel (gracefully) when main.py, or a project module it imports, is "
                             "saved; against the same broker and messages. A file that does not load is shown, "
                             "and the next save is awaited")
    parser.add_argument("--messages", metavar="FILE", type=Path,
                        help="produce the messages of FILE instead of the built-in samples, one per line: a JSON "
                             'object (the value), {"key": ..., "value": ..., "headers": {...}}, or plain text; '
                             "blank lines and lines starting with # are skipped")
    parser.add_argument("--tls", action="store_true",
                        help="mutual TLS, as in production: certificates made for this run and handed to the "
                             "kernel base64-encoded (KAFKA_CA_CERT, KAFKA_CLIENT_CERT, KAFKA_CLIENT_KEY), "
                             "through a TLS proxy that requires the client certificate")
    return parser.parse_args(argv)


class Runner:
    """The broker (behind a TLS proxy with --tls), the topics, the messages and the kernel, reloaded on saves
    with --reload; the summary at the end."""

    def __init__(self, arguments: argparse.Namespace, project: Path = PROJECT):
        self.arguments = arguments
        self.project = project
        self.interrupts = Interrupts()
        self.kernel_runs = 0
        self.last_exit_code = 0
        self.created_topics: set[str] = set()
        self.http_port = free_port()

    def run(self) -> int:
        # Read first: a bad line is reported before anything starts.
        messages = read_messages(self.arguments.messages) if self.arguments.messages else SAMPLES
        asking = start_asking(self.project)  # answers while the broker starts
        watcher = SourceWatcher(self.project, {self.project / "main.py"}) if self.arguments.reload else None
        with ExitStack() as stack:
            if watcher is not None:
                stack.callback(watcher.stop)
            remove_abandoned_workdirs()
            workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))  # private (0700): the run's certificates
            (workdir / "owner.pid").write_text(str(os.getpid()))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            self.metrics_dir = workdir / "metrics"
            self.metrics_dir.mkdir()
            tls_files = self.start_broker(stack, workdir)
            info = self.load_kernel_at_start(asking, watcher)
            if info is None:
                return self.last_exit_code
            self.state = LocalRun(os.getpid(), self.broker.bootstrap, info.topics, info.group,
                                  info.dead_letter_topic, tls_files)
            stack.callback(lambda: self.state.remove(self.project))
            self.ensure_topics(info)
            produce(self.state.kafka_config(), info.topics[0], messages)
            self.announce(len(messages), info)
            exit_code = self.supervise(info, watcher)
            self.print_summary()
            return exit_code

    def load_kernel_at_start(self, asking: subprocess.Popen, watcher: SourceWatcher | None) -> KernelInfo | None:
        """What main.py says; with --reload, a main.py that does not load is waited for."""
        while not self.interrupts.count:
            try:
                return kernel_info(asking, self.project)
            except KernelLoadError as error:
                show_load_error(error, waiting=watcher is not None)
                if watcher is None:
                    self.last_exit_code = 1
                    return None
                watcher.files = None
                while not self.interrupts.count and watcher.next_report(WAIT_STEP_S) is None:
                    pass
                asking = start_asking(self.project)
        return None

    def start_broker(self, stack: ExitStack, workdir: Path) -> dict[str, str] | None:
        """Start the broker, behind a TLS proxy with --tls; the client PEM files for the state file, if any."""
        if not self.arguments.tls:
            self.broker = stack.enter_context(Broker())
            self.tls_env: dict[str, str] = {}
            return None
        from devtools.tls_proxy import Pki, TlsProxy  # only here: trustme takes a fifth of a second to import

        pki = Pki.create(workdir)
        proxy_port = free_port()
        self.broker = stack.enter_context(Broker(advertised_port=proxy_port))  # clients are sent to the proxy
        stack.callback(TlsProxy(proxy_port, self.broker.port, pki.server_context()).start().stop)
        self.tls_env = pki.env  # base64-encoded, as production hands them to the kernel
        return {"ca": str(pki.ca_file), "cert": str(pki.client_cert_file), "key": str(pki.client_key_file)}

    def ensure_topics(self, info: KernelInfo) -> None:
        """Create the kernel's topics and its dead-letter topic (the kernel does not create topics), once
        each; a reload may name new ones. The state file then tells send.py about them."""
        wanted = [(topic, PARTITIONS) for topic in info.topics] + [(info.dead_letter_topic, 1)]
        for topic, partitions in wanted:
            if topic not in self.created_topics:
                self.broker.create_topic(topic, partitions)
                self.created_topics.add(topic)
        self.state = replace(self.state, topics=info.topics, group=info.group,
                             dead_letter_topic=info.dead_letter_topic)
        self.state.write(self.project)

    def announce(self, produced: int, info: KernelInfo) -> None:
        where = (f"a TLS proxy on {self.broker.bootstrap} that requires the client certificate"
                 if self.arguments.tls else self.broker.bootstrap)
        source = f"messages from {self.arguments.messages}" if self.arguments.messages else "sample messages"
        say(f"broker listening on {self.broker.plaintext_bootstrap}; clients connect to {where}")
        say(f"{produced} {source} in '{info.topics[0]}' ({PARTITIONS} partitions); dead letters go to "
            f"'{info.dead_letter_topic}'")
        say("send more from another terminal: uv run devtools/send.py '{\"event\": \"hello\"}'")
        say("this broker starts empty, its offsets at 0 again: deduplicate stored work by message_id(message), "
            "not by topic/partition/offset, or new messages look like old ones")
        say(f"metrics on http://127.0.0.1:{self.http_port}/metrics"
            + ("; saving main.py restarts the kernel" if self.arguments.reload else "")
            + "; Ctrl-C stops and prints a summary")

    def start_kernel(self, info: KernelInfo) -> KernelProcess:
        self.kernel_runs += 1
        settings = run_settings(self.state, self.tls_env, self.http_port, self.metrics_dir)
        if self.kernel_runs == 1 and (line := overridden(settings, dotenv_settings(self.project))):
            say(line)
        say(f"starting the kernel '{info.name}' (run {self.kernel_runs}): python main.py")
        kernel = KernelProcess(self.project, local_environment(settings))
        self.interrupts.kernel = kernel
        return kernel

    def supervise(self, info: KernelInfo, watcher: SourceWatcher | None) -> int:
        """Run the kernel until Ctrl-C (or, without --reload, until it exits); the last exit code."""
        kernel: KernelProcess | None = None if self.interrupts.count else self.start_kernel(info)
        while not self.interrupts.count:
            if kernel is not None and kernel.exit_code() is not None:  # it stopped by itself
                self.last_exit_code = kernel.exit_code()
                if watcher is None:
                    return self.last_exit_code
                say(f"the kernel exited with code {self.last_exit_code}; it starts again when you save main.py")
                kernel = None
            if watcher is None:
                time.sleep(WAIT_STEP_S)
                continue
            changed = watcher.next_report(WAIT_STEP_S)
            if changed and not self.interrupts.count:
                kernel = self.restart(kernel, changed, watcher)
        if kernel is not None:
            if kernel.signals_sent == 0:  # Ctrl-C came while it was being started
                kernel.signal(signal.SIGINT)
            self.last_exit_code = self.wait_for_exit(kernel)
        return self.last_exit_code

    def restart(self, kernel: KernelProcess | None, changed: set[Path], watcher: SourceWatcher) -> KernelProcess | None:
        names = ", ".join(sorted(str(path.relative_to(self.project)) for path in changed))
        say(f"{names} changed: restarting the kernel")
        if kernel is not None:
            self.last_exit_code = self.stop_gracefully(kernel)
        watcher.discard_reports()  # saved while it stopped: the new kernel reads them
        if self.interrupts.count:
            return None
        try:
            info = ask_kernel(self.project)
        except KernelLoadError as error:
            show_load_error(error, waiting=True)
            watcher.files = None
            return None
        watcher.files = info.files
        self.ensure_topics(info)
        return self.start_kernel(info)

    def stop_gracefully(self, kernel: KernelProcess) -> int:
        """SIGTERM: the kernel finishes the messages in hand, commits and leaves its group."""
        kernel.signal(signal.SIGTERM)
        return self.wait_for_exit(kernel)

    @staticmethod
    def wait_for_exit(kernel: KernelProcess) -> int:
        """Its exit code, once it stopped after a signal: a kernel stuck on its way out is killed."""
        try:
            return kernel.process.wait(timeout=KERNEL_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            say(f"the kernel did not stop within {KERNEL_STOP_TIMEOUT_S:.0f} s: killing it")
            kernel.process.kill()
            return kernel.process.wait()

    def print_summary(self) -> None:
        try:
            text = summary(self.state.kafka_config(), self.metrics_dir, self.state.group, self.state.topics,
                           self.state.dead_letter_topic, self.kernel_runs)
        except Exception as error:  # a summary is a courtesy: its failure must not hide the kernel's exit code
            text = f"no summary: {error}"
        print(f"run_local: {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints where each thread is, if it hangs
    try:
        return Runner(arguments).run()
    except (MessageError, LocalRunError) as error:
        print(f"run_local.py: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C after the kernel stopped: the broker stops on the way out
        return 130


if __name__ == "__main__":
    sys.exit(main())
