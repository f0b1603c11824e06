"""A peer: a Quix Streams Application (at-least-once) with a no-op, counting processing step; with
$BENCH_FORWARD, each message also goes on to that topic (`to_topic`, committed once it is confirmed).

Writes the same JSON as probe_kernel.py once $BENCH_COUNT messages were seen, then stops the app.
"""

import json
import os
import tempfile
import warnings
from pathlib import Path

import authlib.deprecate  # noqa: E402,F401  (installs its own "always" filter, which ours must follow)

# authlib, which quixstreams imports, warns that httpx (the http extra's package) is installed.
warnings.filterwarnings("ignore", message="The httpx module is deprecated")

from measure import usage  # noqa: E402
from quixstreams import Application  # noqa: E402

COUNT = int(os.environ["BENCH_COUNT"])
seen = 0
first = None


def main() -> None:
    app = Application(
        broker_address=os.environ["KAFKA_BOOTSTRAP_SERVERS"],
        consumer_group=os.environ["KAFKA_CONSUMER_GROUP"],
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",
        # The input topic exists (the benchmark creates it); no state, so no changelog topics.
        auto_create_topics=False,
        use_changelog_topics=False,
        state_dir=tempfile.mkdtemp(prefix="quix-state-"),  # else it leaves ./state/<group> behind
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        loglevel=os.environ.get("LOG_LEVEL", "WARNING"),
    )
    # The preloaded values are raw bytes, not JSON (Quix's default deserializer).
    topic = app.topic(os.environ["KAFKA_TOPIC"], key_deserializer="bytes", value_deserializer="bytes")

    def count(_value) -> None:
        global seen, first
        seen += 1
        if seen == 1:
            first = usage()
        elif seen == COUNT:
            Path(os.environ["BENCH_OUT"]).write_text(json.dumps({"first": first, "last": usage()}))
            app.stop()

    frame = app.dataframe(topic).update(count)
    if forward := os.environ.get("BENCH_FORWARD"):
        frame.to_topic(app.topic(forward, key_serializer="bytes", value_serializer="bytes"))
    app.run()


if __name__ == "__main__":
    main()
