"""Send messages to the kernel that `uv run devtools/run_local.py` runs, from another terminal.

    uv run devtools/send.py '{"event": "signup", "user": "u-9"}' 'plain text'
    uv run devtools/send.py --file more.jsonl
    uv run devtools/send.py < more.jsonl

Finds the local run's broker, topic and (with --tls) client certificate in the .run_local.json it
writes beside main.py. Each message is in the format of `run_local.py --messages` (devtools/messages.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.local_state import LocalRunError, find_local_run, produce  # noqa: E402
from devtools.messages import MessageError, parse_lines, read_messages  # noqa: E402

FORMAT = ('a JSON object (sent as the value, as written); {"key": "k", "value": ..., "headers": {"name": "text"}} '
          "for a key and headers (a string value is sent as text, other JSON as JSON, null as a tombstone); "
          "or plain text. Blank lines and lines starting with # are skipped")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="send.py",
        description="Send messages to the kernel of a running `uv run devtools/run_local.py`, which this "
                    "command finds through the .run_local.json it writes beside main.py. With no MESSAGE and "
                    "no --file, messages are read from standard input, one per line.",
        epilog=f"Message format: {FORMAT}.",
    )
    parser.add_argument("messages", nargs="*", metavar="MESSAGE", help="one message per argument")
    parser.add_argument("--file", type=Path, metavar="FILE",
                        help="send the messages of FILE, one per line (as run_local.py --messages reads them)")
    parser.add_argument("--topic", help="send to TOPIC instead of the kernel's (first) topic")
    return parser.parse_args(argv)


def messages_to_send(arguments: argparse.Namespace) -> list:
    if arguments.file is not None:
        return read_messages(arguments.file) + parse_lines(arguments.messages, "<arguments>")
    if arguments.messages:
        return parse_lines(arguments.messages, "<arguments>")
    if sys.stdin.isatty():
        return []
    data = sys.stdin.buffer.read()
    try:
        return parse_lines(data.decode("utf-8").splitlines(), "<stdin>")
    except UnicodeDecodeError as error:
        raise MessageError(f"<stdin>: not UTF-8 text (byte {error.start}); send binary values from Python") from None


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        messages = messages_to_send(arguments)
        if not messages:
            raise MessageError("nothing to send: give messages as arguments, --file FILE, or pipe them in")
        run = find_local_run()
        topic = arguments.topic or run.topics[0]
        for place in produce(run.kafka_config(), topic, messages, create=False):
            print(f"sent {place}")
    except (MessageError, LocalRunError) as error:
        print(f"send.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
