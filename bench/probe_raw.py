"""The ceiling: a plain kafka-python consumer loop in a group, committing explicit offsets after
each poll, with the client's defaults unless $BENCH_TUNED is set. With $BENCH_FORWARD it sends
every record to that topic (acks=all) and flushes before each commit: the hand-written safe
consume-produce loop. With $BENCH_GC it collects garbage as the kernel does (gc.freeze() and a
threshold of 10,000). Writes the same JSON as probe_kernel.py once $BENCH_COUNT records were seen
(and, forwarding, confirmed), then exits."""

import gc
import json
import os
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, OffsetAndMetadata
from measure import usage

COUNT = int(os.environ["BENCH_COUNT"])


def main() -> None:
    tuning = json.loads(os.environ.get("BENCH_TUNED") or "{}")
    consumer = KafkaConsumer(os.environ["KAFKA_TOPIC"], bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"],
                             group_id=os.environ["KAFKA_CONSUMER_GROUP"], enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                             **tuning)
    if os.environ.get("BENCH_GC"):
        gc.freeze()
        gc.set_threshold(10_000, *gc.get_threshold()[1:])
    forward = os.environ.get("BENCH_FORWARD")
    producer = KafkaProducer(bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"], acks="all") if forward else None
    seen, first = 0, None
    while seen < COUNT:
        batch = consumer.poll(timeout_ms=1000)
        for records in batch.values():
            for record in records:
                seen += 1
                if seen == 1:
                    first = usage()
                if producer is not None:
                    producer.send(forward, key=record.key, value=record.value)
        if producer is not None:
            producer.flush()
        if batch:
            consumer.commit({tp: OffsetAndMetadata(records[-1].offset + 1, "", -1) for tp, records in batch.items()})
    Path(os.environ["BENCH_OUT"]).write_text(json.dumps({"first": first, "last": usage()}))
    consumer.close(autocommit=False)


if __name__ == "__main__":
    main()
