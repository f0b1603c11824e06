"""Notification kernel: POST each JSON message to a webhook.

Input: a JSON object with "recipient" and "text" (non-empty strings), posted as is to WEBHOOK_URL
(required) with an Idempotency-Key header (message_id(message)) so the receiver can drop the
repeats that at-least-once delivery and retries bring. A 2xx answer is done. No answer (connection
refused or dropped, WEBHOOK_TIMEOUT_S passed), a 5xx, 408 or 429 is retried with backoff; any other
4xx will never succeed and goes to the dead-letter topic with the answer. /metrics (with KERNEL_HTTP_PORT)
counts the notifications sent, per topic. Needs `uv sync --extra http`.

    WEBHOOK_URL=https://example.com/hook uv run --extra http python -m examples.notification
"""

import atexit
import logging
import os
import threading

import httpx
from prometheus_client import Counter

from main import DeadLetter, coordinates, json_object, message_id  # adopting: drop this line

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


client_lock = threading.Lock()
shared: tuple[str, httpx.Client] | None = None


def webhook() -> tuple[str, httpx.Client]:
    """The URL and one HTTP client (a thread-safe connection pool) for all worker threads, created
    on first use, after main.py has read .env."""
    global shared
    with client_lock:
        if shared is None:
            url = os.environ.get("WEBHOOK_URL", "").strip()
            if not url.startswith(("http://", "https://")):
                # The value is not shown: a webhook URL often carries a token.
                raise RuntimeError("WEBHOOK_URL must be set to an http:// or https:// URL")
            timeout_s = float(os.environ.get("WEBHOOK_TIMEOUT_S") or 10)
            client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)))
            atexit.register(client.close)
            shared = url, client
        return shared


if __name__ == "__main__":
    import main

    raise SystemExit(main.run_kernel(process_message, name=KERNEL_NAME, default_topic=DEFAULT_TOPIC))
