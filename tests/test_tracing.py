"""Tracing with OpenTelemetry (the otel extra) through the real loop: the kernel, run with
OTEL_TRACES_EXPORTER=otlp, exports its spans over OTLP/HTTP, as it would to Jaeger or a collector, to a
receiver the test serves (the SDK's in-memory exporter would live in the kernel's process, out of the
test's reach). Spans are exported only when the kernel stops, so what arrives is what its flush at
shutdown sent. And without OTEL_TRACES_EXPORTER, nothing of OpenTelemetry is imported."""

import dataclasses
import json
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

import main
from devtools.broker import free_port
from tests.fixtures import REPO, settings_from, wait_committed
from tests.test_examples import write_answer

CONSUMER, PRODUCER, ERROR = Span.SPAN_KIND_CONSUMER, Span.SPAN_KIND_PRODUCER, Status.STATUS_CODE_ERROR


@dataclasses.dataclass
class Exported:
    """A span as the collector received it; ids in hex, the parent's "" for a span that starts a trace."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    status: int
    links: list[tuple[str, str, dict]]
    events: list[tuple[str, dict]]
    service: str


def attributes(pairs) -> dict:
    return {pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in pairs}


class Collector:
    """An OTLP/HTTP trace receiver, as Jaeger's or a collector's on port 4318: keeps the spans sent to it."""

    def __init__(self):
        self.spans: list[Exported] = []
        self.paths: set[str] = set()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                collector.paths.add(self.path)
                collector.receive(ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"]))))
                write_answer(self, 200, ExportTraceServiceResponse().SerializeToString(),
                             {"Content-Type": "application/x-protobuf"})

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def receive(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = attributes(resource_spans.resource.attributes)["service.name"]
            for span in (span for scope in resource_spans.scope_spans for span in scope.spans):
                self.spans.append(Exported(
                    span.name, span.kind, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                    attributes(span.attributes), span.status.code,
                    [(link.trace_id.hex(), link.span_id.hex(), attributes(link.attributes)) for link in span.links],
                    [(event.name, attributes(event.attributes)) for event in span.events], service))

    def of_kind(self, kind: int) -> list[Exported]:
        return [span for span in self.spans if span.kind == kind]


@pytest.fixture
def collector():
    receiver = Collector()
    yield receiver
    receiver.server.shutdown()


def new_context() -> tuple[str, str]:
    """A trace id and a span id, as an upstream producer's span would have them."""
    return uuid.uuid4().hex, uuid.uuid4().hex[:16]


def traceparent(trace_id: str, span_id: str) -> bytes:
    return f"00-{trace_id}-{span_id}-01".encode()


def traced_env(kernels, topic: str, group: str, collector: Collector, **overrides) -> dict[str, str]:
    # Spans wait for the kernel to stop (a batch of 512 would go earlier): the flush at shutdown sends them.
    return kernels.env(topic, group, OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
                       OTEL_BSP_SCHEDULE_DELAY="600000", **overrides)


def test_each_call_is_a_span_of_its_message_trace_and_what_it_sends_carries_the_trace_on(cluster, kernels, collector):
    topic, output, dlt = (cluster.create_topic(partitions=1) for _ in range(3))
    group = f"tracing-{uuid.uuid4().hex[:6]}"
    retried, dead, forwarded = new_context(), new_context(), new_context()
    produced = cluster.produce(topic, [
        (0, b"k-retry", b"false:1", [("traceparent", traceparent(*retried))]),
        (0, b"k-dead", b"dead", [("traceparent", traceparent(*dead))]),
        (0, b"k-send", f"send:{output}".encode(), [("traceparent", traceparent(*forwarded)), ("tracestate", b"v=1")]),
        (0, None, b"untraced", []),
        (0, None, b"later:0.1", []),
    ])
    env = traced_env(kernels, topic, group, collector, KERNEL_DEAD_LETTER_TOPIC=dlt, KERNEL_RETRY_INITIAL_MS=100,
                     LOG_FORMAT="json")
    kernel = kernels.start(env)
    wait_committed(cluster, kernel, group, topic, produced, 1)
    assert collector.spans == [], "exported before the kernel stopped: the test would not show the flush"
    assert kernel.stop() == 0
    assert collector.paths == {"/v1/traces"}

    calls = {(span.attributes["messaging.kafka.offset"], span.attributes["kernel.attempt"]): span
             for span in collector.of_kind(CONSUMER)}
    assert sorted(calls) == [(0, 1), (0, 2), (1, 1), (2, 1), (3, 1), (4, 1), (4, 2)], "a span per call"
    for span in calls.values():
        assert (span.name, span.service) == (f"process {topic}", "recording-kernel")
        assert span.attributes.items() >= {"messaging.system": "kafka", "messaging.operation.type": "process",
                                           "messaging.destination.name": topic, "messaging.destination.partition.id": "0",
                                           "messaging.consumer.group.name": group}.items()

    first, second = calls[0, 1], calls[0, 2]
    assert (first.trace_id, first.parent_id) == (second.trace_id, second.parent_id) == retried, "children of its producer"
    assert (first.attributes["kernel.outcome"], first.status) == ("retried", ERROR)
    assert (second.attributes["kernel.outcome"], second.attributes["messaging.kafka.message.key"]) == ("done", "k-retry")

    rejected = calls[1, 1]
    assert (rejected.trace_id, rejected.parent_id) == dead
    assert (rejected.attributes["kernel.outcome"], rejected.attributes["error.type"]) == ("dead_lettered", "DeadLetter")
    [publish] = collector.of_kind(PRODUCER)
    assert (publish.name, publish.trace_id, publish.parent_id) == (f"send {dlt}", *dead)
    [letter] = cluster.read_topic(dlt, 1, settle_s=1)
    assert [value for name, value in letter.headers() if name == "traceparent"] == [
        traceparent(publish.trace_id, publish.span_id)], "the dead letter goes on with the trace, not its copied header"

    done = calls[2, 1]
    assert (done.trace_id, done.parent_id, done.attributes["kernel.outcome"]) == (*forwarded, "done")
    [sent] = cluster.read_topic(output, 1, settle_s=1)
    assert [value for name, value in sent.headers() if name == "traceparent"] == [traceparent(done.trace_id, done.span_id)]
    assert dict(sent.headers())["tracestate"] == b"v=1"
    [logged] = [json.loads(line) for line in kernel.log().splitlines() if '"message": "Sent ' in line]
    assert (logged["trace_id"], logged["span_id"]) == (done.trace_id, done.span_id), "the log line joins the trace"

    untraced = calls[3, 1]
    assert untraced.parent_id == "" and untraced.trace_id not in (retried[0], dead[0], forwarded[0]), "a trace of its own"
    later, again = calls[4, 1], calls[4, 2]
    assert (later.attributes["kernel.outcome"], later.status, again.attributes["kernel.outcome"]) == (
        "retried", ERROR, "done"), "RetryLater is a retry, not a fatal error"


def test_a_batch_is_a_span_linked_to_the_trace_of_each_message(cluster, kernels, collector):
    topic, dlt = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    group = f"tracing-batch-{uuid.uuid4().hex[:6]}"
    contexts = [new_context() for _ in range(3)]
    produced = cluster.produce(topic, [(0, None, value, [("traceparent", traceparent(*context))])
                                       for value, context in zip((b"a", b"dead", b"c"), contexts, strict=True)]
                               + [(0, None, b"untraced")])
    kernel = kernels.start(traced_env(kernels, topic, group, collector, TEST_BATCH=1, KERNEL_DEAD_LETTER_TOPIC=dlt))
    wait_committed(cluster, kernel, group, topic, produced, 1)
    assert kernel.stop() == 0

    batches = {span.attributes["messaging.batch.message_count"]: span for span in collector.of_kind(CONSUMER)}
    assert sorted(batches) == [2, 4], "offsets 0..3, then 2..3 after the dead letter at 1"
    first, second = batches[4], batches[2]
    assert first.links == [(*context, {"messaging.kafka.offset": offset}) for offset, context in enumerate(contexts)]
    assert (first.attributes["kernel.outcome"], first.status) == ("dead_lettered", ERROR)
    assert first.events == [("dead letter", {"messaging.kafka.offset": 1})]
    assert (second.attributes["kernel.outcome"], second.links) == ("done", [(*contexts[2], {"messaging.kafka.offset": 2})])
    assert first.name == second.name == f"process {topic}" and first.parent_id == second.parent_id == ""
    [publish] = collector.of_kind(PRODUCER)
    assert (publish.trace_id, publish.parent_id) == contexts[1], "the dead letter's span is in that message's trace"


def test_a_collector_that_is_down_costs_spans_never_messages(cluster, kernels):
    topic, group = cluster.create_topic(partitions=1), f"tracing-down-{uuid.uuid4().hex[:6]}"
    produced = cluster.produce(topic, [(0, None, f"m{n}".encode()) for n in range(20)])
    # Nothing listens; and the exporter would try for 30 s (seconds, as the Python SDK reads it): well past
    # the kernel's bound, so that the stop below tells a bounded flush from an unbounded one on a busy machine.
    env = kernels.env(topic, group, OTEL_TRACES_EXPORTER="otlp", OTEL_BSP_SCHEDULE_DELAY="100",
                      OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}", OTEL_EXPORTER_OTLP_TIMEOUT="30")
    kernel = kernels.start(env)
    kernel.wait_for_log("Transient error", 30)  # its first export failed: it tries again after 1 s, 2 s, 4 s...
    produced += cluster.produce(topic, [(0, None, f"m{n}".encode()) for n in range(20, 40)])  # spans that wait
    wait_committed(cluster, kernel, group, topic, produced, 1)
    time.sleep(2)  # past its second try
    stopping = time.monotonic()
    assert kernel.stop(timeout_s=60) == 0
    print(f"\nstopped in {time.monotonic() - stopping:.1f} s with the collector down")
    assert time.monotonic() - stopping < main.TRACES_FLUSH_TIMEOUT_S + 10, "the flush at shutdown waits for the collector"
    assert kernel.log().count("Transient error") == 1, "the exporter's warnings are throttled as the client's are"


def test_without_otel_traces_exporter_nothing_of_opentelemetry_is_imported():
    code = ("import sys, main\n"
            "with main.tracing_for(main.load_settings({'KAFKA_BOOTSTRAP_SERVERS': 'a:1'}, 'k', 't')) as tracing:\n"
            "    assert tracing is None\n"
            "print(sorted(name for name in sys.modules if name.startswith('opentelemetry')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert (result.returncode, result.stdout) == (0, "[]\n"), result.stderr


@pytest.mark.parametrize("env, exporters", [
    ({}, ()),
    ({"OTEL_TRACES_EXPORTER": "none"}, ()),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp_proto_http",)),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("otlp_proto_grpc",)),
    ({"OTEL_TRACES_EXPORTER": "OTLP, console"}, ("otlp_proto_http", "console")),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ()),
])
def test_otel_traces_exporter_names_the_exporters(env, exporters):
    assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", **env}).traces_exporters == exporters


def test_an_exporter_no_package_provides_is_a_configuration_error():
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", "OTEL_TRACES_EXPORTER": "otlp,zipkin_json"})
    with pytest.raises(main.ConfigError, match="OTEL_TRACES_EXPORTER names zipkin_json, which no installed package"):
        main.Tracing(settings)
