"""Triage kernel: ask a model to summarise and categorise each support ticket, and forward its answer.

Input: a JSON object with "id" and "text" (non-empty strings; a "subject" is used too), keyed by the
customer. The model (TRIAGE_MODEL, default claude-haiku-5-5, through the official Anthropic SDK with
ANTHROPIC_API_KEY, and ANTHROPIC_BASE_URL if set) answers with a one-sentence summary and one of
CATEGORIES, sent to TRIAGE_OUTPUT_TOPIC (default "tickets-triaged") under the ticket's key as
{"ticket", "summary", "category", "model"}, with two headers: kernel-message-id, the ticket's
message_id() (the same at every delivery of it, so a consumer knows a repeat for what it is, however
the model worded it the second time), and kernel-source, the ticket's topic[partition]@offset.

The SDK's own retries are off (max_retries=0): the kernel's backoff, KERNEL_MAX_ATTEMPTS and dead-letter
topic are the only retry policy. What the API answers decides what happens to the ticket:
- no whole answer within TRIAGE_TIMEOUT_S (default 60; it bounds the whole call, so an answer trickled
  a byte at a time is cut there too), no connection, 408, 409, 429 or a 5xx (503 unavailable, 529
  overloaded), or a 200 that is not the API's answer (a gateway's HTML page, a body cut short, not
  JSON): retried (False). A retry-after in the answer holds every call of the kernel until it has
  passed, since a rate limit or an overload is the account's, not the ticket's (a call waits for it at
  most RETRY_AFTER_MAX_WAIT_S, then the ticket is retried without calling); one longer than
  RETRY_AFTER_MAX_S (inf, 1e8) is cut to it, and the log says so. The ticket that got it raises
  RetryLater, so that the kernel tries it again once it has passed;
- 400 (a prompt too long, say), 413 and any other 4xx, or a message that holds no triage (a refusal,
  an answer cut at TRIAGE_MAX_TOKENS, default 1024, content of another shape): dead-lettered with the
  reason, which a retry would not change;
- 401, 402, 403, 404, a spend limit reached, an organization on hold: a key, a bill, a permission or a
  model name for a person to fix, not a fault of the ticket: the kernel stops (exit 1) with nothing
  committed from that ticket on, rather than dead-letter every ticket until someone notices.
Calls take seconds: run it with KERNEL_CONCURRENCY=16 (key ordering, the default, keeps one customer's
tickets in order while the others go on). Needs `uv sync --extra ai`.

    ANTHROPIC_API_KEY=... KERNEL_CONCURRENCY=16 uv run --extra ai python -m examples.triage
"""

import atexit
import contextlib
import json
import logging
import os
import threading
import time
from typing import NamedTuple

import anthropic
import httpcore2
import httpx2

from main import DeadLetter, RetryLater, coordinates, json_object, message_id, send  # adopting: drop this line

KERNEL_NAME = "triage-kernel"
DEFAULT_TOPIC = "tickets"
MAX_VALUE_BYTES = 64 * 1024  # a ticket larger than this is refused: dead-lettered
REQUIRED_FIELDS = ("id", "text")
CATEGORIES = ("billing", "bug", "account", "feature_request", "other")
# The longest one attempt waits out a retry-after, in seconds; a longer one takes several attempts. A
# stop waits for a call that pauses: keep it within KERNEL_SHUTDOWN_TIMEOUT_MS (30 s by default).
RETRY_AFTER_MAX_WAIT_S = 30
# The longest pause a retry-after holds every call for, in seconds: a longer one (inf, a typo, a
# gateway's) would stop the kernel's calls for good; after this one they try again, and may be told again.
RETRY_AFTER_MAX_S = 300
RETRIABLE_STATUS = {408, 409, 429}  # client errors that mean "later", besides every 5xx
FOR_A_PERSON_STATUS = {401, 402, 403, 404}  # the key, the bill, a permission, the model's name
# Stable codes (error.details.error_code) of answers whose status alone would say "later" or "the ticket".
FOR_A_PERSON_ERROR_CODES = {"enforced_spend_limit_reached", "contract_spend_limit_reached", "organization_on_hold"}
SYSTEM_PROMPT = ("You triage customer support tickets. Call record_triage once with a one-sentence summary "
                 "of the ticket and the category that fits it best.")
TRIAGE_TOOL = {
    "name": "record_triage",
    "description": "Record the triage of a support ticket.",
    "input_schema": {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "description": "What the customer needs, in one sentence."},
            "category": {"type": "string", "enum": list(CATEGORIES)},
        },
        "required": ["summary", "category"],
    },
}

log = logging.getLogger(KERNEL_NAME)


def process_message(message) -> bool:
    ticket = json_object(message, MAX_VALUE_BYTES, REQUIRED_FIELDS)  # or DeadLetter saying why
    model = triage_model()
    if not api_pause.wait(RETRY_AFTER_MAX_WAIT_S):
        return False  # the API asked for a longer pause than one attempt waits
    try:
        with call_deadline(model.timeout_s):
            answer = model.client.messages.create(
                model=model.name, max_tokens=model.max_tokens, system=SYSTEM_PROMPT, messages=[prompt(ticket)],
                tools=[TRIAGE_TOOL], tool_choice={"type": "tool", "name": TRIAGE_TOOL["name"]})
    except anthropic.APIConnectionError as error:  # no connection, or no whole answer in time (APITimeoutError)
        log.warning("Model API unreachable for %s (%s); will retry", coordinates(message), type(error).__name__)
        return False
    except anthropic.APIStatusError as error:
        return refused(message, error)
    except json.JSONDecodeError as error:  # a 200 whose body is not JSON (cut short): see below
        answer = f"not JSON ({error})"
    if not isinstance(answer, anthropic.types.Message):
        # A 200 whose body is no message at all (the SDK hands back a gateway's HTML page as a str, a JSON
        # string or list as it is) came from something between us and the API, or was cut short: it says
        # nothing of the ticket, and the next attempt usually reaches the API, so retried as an outage.
        log.warning("Model API answered %s with something that is not a message (%.100r); will retry",
                    coordinates(message), answer)
        return False
    output = {"ticket": ticket["id"], **triage_of(answer, model.max_tokens), "model": answer.model}
    # Committed only once the broker has it; a redelivery sends it again, under the same kernel-message-id.
    send(output_topic(), json.dumps(output).encode(), key=message.key,
         headers=[("content-type", b"application/json"), ("kernel-message-id", message_id(message).encode()),
                  ("kernel-source", coordinates(message).encode())])
    return True


def prompt(ticket: dict) -> dict:
    """The user turn: the ticket as a person would read it."""
    return {"role": "user",
            "content": f"Ticket {ticket['id']}\nSubject: {ticket.get('subject') or '(none)'}\n\n{ticket['text']}"}


def refused(message, error: anthropic.APIStatusError) -> bool:
    """An error answer: False if it may pass (RetryLater with a retry-after), DeadLetter if the ticket can
    never be triaged, and an exception that stops the kernel if only a person can fix it."""
    said = f"{error.status_code} {error.type or 'error'}: {error.api_message or error.message[:200]}"
    if error.status_code in FOR_A_PERSON_STATUS or error.error_code in FOR_A_PERSON_ERROR_CODES:
        raise RuntimeError(f"The model API refused the kernel ({said}): check ANTHROPIC_API_KEY, the account's "
                           "billing and limits, and TRIAGE_MODEL") from None
    if error.status_code >= 500 or error.status_code in RETRIABLE_STATUS:
        wait_s = retry_after_s(error.response.headers)
        if wait_s is not None:
            api_pause.hold(wait_s)
        log.warning("Model API answered %s for %s; will retry%s", said, coordinates(message),
                    "" if wait_s is None else f", no call for {wait_s:.1f} s (retry-after)")
        if wait_s is not None:
            raise RetryLater(wait_s, f"the model API answered {said}")
        return False
    raise DeadLetter(f"the model API refused it ({said})")


def triage_of(answer, max_tokens: int) -> dict:
    """The summary and category the model gave through the tool; DeadLetter if it gave none."""
    if answer.stop_reason != "tool_use":
        hint = f": raise TRIAGE_MAX_TOKENS ({max_tokens})" if answer.stop_reason == "max_tokens" else ""
        raise DeadLetter(f"the model gave no triage (stop reason {answer.stop_reason!r}){hint}")
    # Content of another shape (a string, a block without a type) is a message without a triage too.
    blocks = answer.content if isinstance(answer.content, list) else []
    given = next((getattr(block, "input", None) for block in blocks if getattr(block, "type", None) == "tool_use"),
                 None)
    summary, category = (given.get("summary"), given.get("category")) if isinstance(given, dict) else (None, None)
    if not isinstance(summary, str) or not summary.strip() or category not in CATEGORIES:
        raise DeadLetter(f"the model's triage is not a summary and a category: {json.dumps(given)[:200]}")
    return {"summary": summary.strip(), "category": category}


def retry_after_s(headers) -> float | None:
    """The pause the API asked for: retry-after-ms, or retry-after in seconds (Anthropic's forms), up to
    RETRY_AFTER_MAX_S."""
    for name, unit_s in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            asked_s = max(0.0, float(headers.get(name)) * unit_s)  # nan: 0
        except (TypeError, ValueError):  # absent, or not a number
            continue
        if not asked_s <= RETRY_AFTER_MAX_S:  # inf too
            log.warning("The model API asked for a pause of %s s (%s: %.40s); capped at %s s (RETRY_AFTER_MAX_S)",
                        asked_s, name, headers.get(name), RETRY_AFTER_MAX_S)
            return RETRY_AFTER_MAX_S
        return asked_s
    return None


class ApiPause:
    """Until when the API asked every caller to wait: a retry-after is the account's, so every worker
    thread honours the latest one, not only the thread it was given to."""

    def __init__(self):
        self.lock = threading.Lock()
        self.until_s = 0.0  # time.monotonic()

    def hold(self, seconds: float) -> None:
        with self.lock:
            self.until_s = max(self.until_s, time.monotonic() + seconds)

    def wait(self, max_wait_s: float) -> bool:
        """Sleep until the pause is over and True; or False, after max_wait_s, if it lasts longer."""
        with self.lock:
            remaining_s = self.until_s - time.monotonic()
        time.sleep(min(max(remaining_s, 0.0), max_wait_s))
        return remaining_s <= max_wait_s


call_deadlines = threading.local()  # .until_s: when the call of this worker thread must have its whole answer


@contextlib.contextmanager
def call_deadline(seconds: float):
    call_deadlines.until_s = time.monotonic() + seconds
    try:
        yield
    finally:
        call_deadlines.until_s = None


def within_deadline(timeout_s: float | None) -> float | None:
    """The time one read or write may take: its own timeout, cut to what is left of the call's deadline."""
    if (until_s := getattr(call_deadlines, "until_s", None)) is None:
        return timeout_s
    left_s = until_s - time.monotonic()
    if left_s <= 0:
        raise httpcore2.ReadTimeout("no whole answer within TRIAGE_TIMEOUT_S")
    return left_s if timeout_s is None else min(timeout_s, left_s)


class DeadlineStream(httpcore2.NetworkStream):
    """A connection whose every read and write ends by the deadline of the call it serves."""

    def __init__(self, stream: httpcore2.NetworkStream):
        self.stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.stream.read(max_bytes, within_deadline(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, within_deadline(timeout))

    def close(self) -> None:
        self.stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        return DeadlineStream(self.stream.start_tls(ssl_context, server_hostname, within_deadline(timeout)))

    def get_extra_info(self, info: str):
        return self.stream.get_extra_info(info)


class DeadlineBackend(httpcore2.SyncBackend):
    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return DeadlineStream(super().connect_tcp(host, port, within_deadline(timeout), local_address, socket_options))


def deadline_transport() -> httpx2.HTTPTransport:
    """The SDK's HTTP transport with a deadline on the whole call: its timeouts bound each read, so an
    answer trickled a byte at a time would hold a call, and the ticket's partition, for ever."""
    transport = httpx2.HTTPTransport(limits=anthropic.DEFAULT_CONNECTION_LIMITS)
    transport._pool._network_backend = DeadlineBackend()  # httpcore2's pool; httpx2 has no argument for it
    return transport


class TriageModel(NamedTuple):
    client: anthropic.Anthropic
    name: str
    max_tokens: int
    timeout_s: float


def positive_setting(name: str, default: float, kind: type = float) -> float:
    """A number from the environment; ValueError naming the variable unless it is above 0."""
    value = os.environ.get(name) or str(default)
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if not number > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return number


def output_topic() -> str:
    return os.environ.get("TRIAGE_OUTPUT_TOPIC") or "tickets-triaged"  # read after main.py loads .env


api_pause = ApiPause()
model_lock = threading.Lock()
shared: TriageModel | None = None


def triage_model() -> TriageModel:
    """The model's settings and one client (thread-safe, a connection pool) for all worker threads,
    created on first use, after main.py has read .env."""
    global shared
    with model_lock:
        if shared is None:
            timeout_s = positive_setting("TRIAGE_TIMEOUT_S", 60)
            max_tokens = positive_setting("TRIAGE_MAX_TOKENS", 1024, int)
            # Its own retries off: the kernel's backoff, KERNEL_MAX_ATTEMPTS and dead-letter topic decide.
            client = anthropic.Anthropic(max_retries=0, timeout=anthropic.Timeout(timeout_s, connect=min(timeout_s, 5)),
                                         http_client=anthropic.DefaultHttpxClient(transport=deadline_transport()))
            atexit.register(client.close)
            logging.getLogger("httpx2").setLevel(logging.WARNING)  # the SDK's HTTP client logs every call at INFO
            shared = TriageModel(client, os.environ.get("TRIAGE_MODEL") or "claude-haiku-5-5", max_tokens, timeout_s)
        return shared


if __name__ == "__main__":
    import main

    raise SystemExit(main.run_kernel(process_message, name=KERNEL_NAME, default_topic=DEFAULT_TOPIC))
