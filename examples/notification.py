"""Notification kernel: POST each JSON message to a webhook.

Input: a JSON object with "recipient" and "text" (non-empty strings), posted as is to WEBHOOK_URL
(required: without it, or with one that is not an http(s):// URL, the kernel stops at start-up with
exit code 2, and `python main.py check` says so) with an Idempotency-Key header (message_id(message))
so the receiver can drop the repeats that at-least-once delivery and retries bring. A 2xx answer is
done. No answer (connection refused or dropped, WEBHOOK_TIMEOUT_S passed), a 5xx, 408 or 429 is
retried with backoff; any other 4xx will never succeed and goes to the dead-letter topic with the
answer. /metrics (with KERNEL_HTTP_PORT) counts the notifications sent, per topic. Needs
`uv sync --extra http`.

    WEBHOOK_URL=https://example.com/hook uv run --extra http python -m examples.notification
"""

import atexit
import logging
import threading

import httpx
from prometheus_client import Counter

from main import DeadLetter, coordinates, json_object, message_id, setting  # adopting: drop this line

KERNEL_NAME = "notification-kernel"
DEFAULT_TOPIC = "notifications"
MAX_VALUE_BYTES = 64 * 1024  # a notification larger than this is refused: dead-lettered
REQUIRED_FIELDS = ("recipient", "text")
RETRIABLE_STATUS = {408, 429}  # client errors that mean "later", besides every 5xx

log = logging.getLogger(KERNEL_NAME)
# Served on /metrics beside the kernel's own, labelled by the consumed topic as the kernel's are.
NOTIFICATIONS_SENT = Counter("notifications_sent", "Notifications the webhook accepted (a 2xx answer)", ["topic"])


def process_message(message) -> bool:
    notification = json_object(message, MAX_VALUE_BYTES, REQUIRED_FIELDS)  # or DeadLetter saying why
    url, client = webhook()
    try:
        response = client.post(url, json=notification, headers={"Idempotency-Key": message_id(message)})
    except httpx.TransportError as error:  # refused, dropped, timed out: the webhook may work later
        log.warning("Webhook unreachable for %s (%r); will retry", coordinates(message), error)
        return False
    if response.is_success:
        NOTIFICATIONS_SENT.labels(message.topic).inc()
        return True
    if response.status_code >= 500 or response.status_code in RETRIABLE_STATUS:
        log.warning("Webhook answered %d for %s; will retry", response.status_code, coordinates(message))
        return False
    raise DeadLetter(f"webhook answered {response.status_code}: {response.text[:200]!r}")


def read_settings() -> dict:
    """This kernel's own settings. The kernel reads them at start-up and in `python main.py check`, so a
    missing or invalid one stops it (exit code 2, naming it) before the first message."""
    return {"url": setting("WEBHOOK_URL", parse=http_url, secret=True),  # secret: a webhook URL often holds a token
            "timeout_s": setting("WEBHOOK_TIMEOUT_S", 10.0, parse=positive_seconds)}


def http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text


def positive_seconds(text: str) -> float:
    if not float(text) > 0:
        raise ValueError("must be a number of seconds above 0")
    return float(text)


client_lock = threading.Lock()
shared: tuple[str, httpx.Client] | None = None


def webhook() -> tuple[str, httpx.Client]:
    """The URL and one HTTP client (a thread-safe connection pool) for all worker threads, created
    on first use."""
    global shared
    with client_lock:
        if shared is None:
            settings = read_settings()
            timeout_s = settings["timeout_s"]
            client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)))
            atexit.register(client.close)
            shared = settings["url"], client
        return shared


if __name__ == "__main__":
    import main

    raise SystemExit(main.run_kernel(process_message, read_settings=read_settings, name=KERNEL_NAME,
                                     default_topic=DEFAULT_TOPIC))
