"""send() from process_message: a message is committed only after what it sent is confirmed, so an
output the broker never got keeps its input uncommitted (and retried) instead of losing it."""

import json
import re
import time
import uuid

from devtools.broker import free_port
from tests.conftest import http_get, wait_committed


def test_an_undelivered_output_keeps_its_input_uncommitted_until_it_is_delivered(cluster, kernels):
    source, output = cluster.create_topic(partitions=2), cluster.create_topic(partitions=2)
    group = f"sending-{uuid.uuid4().hex[:6]}"
    produced = cluster.produce(source, [(i % 2, None, json.dumps({"id": f"e-{i}", "type": "t", "n": i}).encode())
                                        for i in range(20)])
    port = free_port()
    env = kernels.env(source, group, TRANSFORM_OUTPUT_TOPIC=output, KAFKA_PRODUCE_TIMEOUT_MS=1000,
                      KERNEL_RETRY_INITIAL_MS=200, KERNEL_RETRY_MAX_MS=1000, KERNEL_HTTP_PORT=port)
    # The kernel's producer (client id "...-producer") cannot reach the broker for a while; its consumer can.
    cluster.proxy.refuse_clients("-producer")
    try:
        kernel = kernels.start(env, module="examples.transform")
        kernel.wait_for_log(r"was not delivered .*; it is processed again")
        time.sleep(3)
        assert cluster.committed(group, source, 2) == {0: None, 1: None}, "committed although its output was lost"
        assert re.search(r"a message it sent was not delivered .* \(attempt [2-9]\); retrying in", kernel.log())
        assert re.search(rf'kernel_send_failures_total{{topic="{output}"}} [1-9]', http_get(port, "/metrics")[1])
    finally:
        cluster.proxy.admit_clients("-producer")

    wait_committed(cluster, kernel, group, source, produced, 2, timeout_s=60)
    assert f'kernel_messages_sent_total{{topic="{output}"}} 20.0' in http_get(port, "/metrics")[1]
    assert kernel.stop() == 0
    outputs = {json.loads(record.value())["n"] for record in cluster.read_topic(output, 2)}
    assert outputs == set(range(20)), "an input was committed without its output"
