"""Messages for the local run, one per line, as `run_local.py --messages FILE` and `send.py` read them.

A line is one message:
  {"event": "signup", "user": "u-1"}                   a JSON object: the value, exactly as written
  {"key": "u-1", "value": {"event": "signup"}, "headers": {"source": "cli"}}
                                                       the message form (see below)
  plain text, or anything that is not a JSON object    the value, as UTF-8 text
Blank lines and lines starting with `#` are skipped.

The message form is a JSON object with a "value" field and no fields besides "key", "value" and
"headers". "value": a string is sent as its UTF-8 text, any other JSON (object, array, number) as
JSON, null as a tombstone (no value, and then a key is required). "key": a string, or null/absent
for none. "headers": an object
of name → string, or a list of [name, string] pairs (a name may repeat). To send an object that
happens to look like the form as a value, wrap it: {"value": {"value": 1}}.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FORM_FIELDS = {"key", "value", "headers"}


@dataclass(frozen=True)
class Message:
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class MessageError(ValueError):
    """A line that is not a message, a file that cannot be read; the text says which and why."""


def read_messages(path: Path) -> list[Message]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MessageError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise MessageError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise MessageError(f"{path}: {error.strerror}") from None
    return parse_lines(text.splitlines(), str(path))


def parse_lines(lines: Iterable[str], source: str) -> list[Message]:
    """Every message in `lines`; the first bad line raises MessageError naming `source` and its number."""
    messages = []
    for number, line in enumerate(lines, start=1):
        try:
            message = parse_line(line)
        except MessageError as error:
            raise MessageError(f"{source}:{number}: {error}") from None
        if message is not None:
            messages.append(message)
    return messages


def parse_line(line: str) -> Message | None:
    """One line as a Message; None for a blank line or a comment."""
    text = line.rstrip("\r\n")
    if not text.strip() or text.lstrip().startswith("#"):
        return None
    if not text.lstrip().startswith("{"):
        return Message(text.encode())
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        # A plain-text value may not start with "{": that line is meant as JSON, so say what is wrong.
        raise MessageError(f"starts with '{{' but is not JSON: {error.msg} (column {error.colno})") from None
    if isinstance(parsed, dict) and "value" in parsed and set(parsed) <= FORM_FIELDS:
        message = Message(form_value(parsed["value"]), form_key(parsed.get("key")), form_headers(parsed.get("headers")))
        if message.key is None and message.value is None:
            raise MessageError('a tombstone ("value": null) needs a "key": it deletes that key\'s value in a compacted '
                               "topic, and the client sends no record with neither")
        return message
    return Message(text.strip().encode())


def form_value(value) -> bytes | None:
    if value is None:
        return None
    return (value if isinstance(value, str) else json.dumps(value)).encode()


def form_key(key) -> bytes | None:
    if key is not None and not isinstance(key, str):
        raise MessageError(f'"key" must be a string or null, not {json.dumps(key)}')
    return None if key is None else key.encode()


def form_headers(headers) -> list[tuple[str, bytes]]:
    if headers is None:
        return []
    pairs = headers.items() if isinstance(headers, dict) else headers
    if not isinstance(pairs, Iterable) or isinstance(headers, str):
        raise MessageError('"headers" must be an object of name → string or a list of [name, string] pairs')
    result = []
    for pair in pairs:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], str)):
            raise MessageError(f'"headers": {json.dumps(pair)} is not a name and a string value')
        result.append((pair[0], pair[1].encode()))
    return result
