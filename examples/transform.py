"""Transform kernel: validate JSON events, enrich them, and forward them to an output topic.

Input: a JSON object with "id" and "type" (non-empty strings); other fields are kept. Output, to
TRANSFORM_OUTPUT_TOPIC (default "events-enriched") under the input's key: the event plus "source"
(topic, partition, offset, timestamp of the input) and "enriched_by". Anything else (not JSON, not
an object, a missing field, over MAX_VALUE_BYTES) goes to the dead-letter topic with the reason,
so run it with KERNEL_DEAD_LETTER_TOPIC set.

    uv run python -m examples.transform
"""

import json
import logging

from main import describe_timestamp, json_object, send, setting  # adopting: drop this line

KERNEL_NAME = "transform-kernel"
DEFAULT_TOPIC = "events"
MAX_VALUE_BYTES = 64 * 1024  # an event larger than this is not one of ours: dead-lettered
REQUIRED_FIELDS = ("id", "type")

log = logging.getLogger(KERNEL_NAME)


def process_message(message) -> bool:
    event = json_object(message, MAX_VALUE_BYTES, REQUIRED_FIELDS)  # or DeadLetter saying why
    event["source"] = {
        "topic": message.topic,
        "partition": message.partition,
        "offset": message.offset,
        "timestamp": describe_timestamp(message.timestamp),
    }
    event["enriched_by"] = KERNEL_NAME
    # Committed only once the broker has this: a crash re-sends it rather than losing it.
    send(read_settings()["output_topic"], json.dumps(event).encode(), key=message.key,
         headers=[("content-type", b"application/json")])
    return True


def read_settings() -> dict:
    """This kernel's own settings; the kernel reads them at start-up and in `python main.py check` too."""
    return {"output_topic": setting("TRANSFORM_OUTPUT_TOPIC", "events-enriched")}


if __name__ == "__main__":
    import main

    raise SystemExit(main.run_kernel(process_message, read_settings=read_settings, name=KERNEL_NAME,
                                     default_topic=DEFAULT_TOPIC))
