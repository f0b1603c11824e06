"""The operator's view of a kernel, generated from one place: `uv run devtools/monitoring.py` writes

  deploy/prometheus/kernel-alerts.yaml              Prometheus alert rules (rule_files: of prometheus.yml)
  deploy/kubernetes/monitoring/prometheusrule.yaml  the same rules as a PrometheusRule (Prometheus Operator)
  deploy/grafana/kernel-dashboard.json              the Grafana dashboard (grafana-foundation-sdk's types)

THRESHOLDS below is the one place the alerts' thresholds live: change one, run this again, commit the files
(tests/test_monitoring.py fails while a generated file differs from what this writes). The rules need two
labels on every series of a kernel, `kernel` and `group`, which the scrape configuration adds (the
PodMonitor in deploy/kubernetes/monitoring, or deploy/prometheus/scrape-config.example.yaml): docs/operating.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RULES_FILE = REPO / "deploy" / "prometheus" / "kernel-alerts.yaml"
PROMETHEUS_RULE_FILE = REPO / "deploy" / "kubernetes" / "monitoring" / "prometheusrule.yaml"
DASHBOARD_FILE = REPO / "deploy" / "grafana" / "kernel-dashboard.json"
DOCS = "docs/operating.md"

MIB = 1024 * 1024
# The defaults suit a kernel as deploy/kubernetes runs it and as BENCHMARKS.md measured it: windows of
# minutes (a rebalance or a broker's restart pauses a kernel for seconds to a minute, and should not page),
# memory against the Deployment's limit (256Mi) and the default KERNEL_BUFFER_MAX_BYTES (64 MiB).
# tests/test_prometheus.py overrides the durations with seconds, to see each alert fire on a real Prometheus.
THRESHOLDS = {
    "stalled_window": "10m",  # KernelStalled: no commit over this window while the kernel has lag...
    "stalled_for": "5m",  # ...for this long
    "lag_window": "10m",  # KernelLagGrowing: lag higher than it was this long ago...
    "lag_growing_for": "15m",  # ...at every evaluation for this long
    "lag_minimum": 100,  # and at least this many messages behind (a few in flight are no news)
    "dead_letter_window": "10m",  # KernelDeadLetters: any dead letter over this window
    "dead_letter_storm_ratio": 0.1,  # KernelDeadLetterStorm: more than this share of the messages dead-lettered...
    "dead_letter_storm_for": "5m",  # ...for this long (over dead_letter_window)
    "retry_window": "5m",  # KernelRetrying: retries per second over this window...
    "retries_per_s": 0.1,  # ...above this (six a minute: a dependency is failing, not one hiccup)...
    "retrying_for": "10m",  # ...for this long
    "held_window": "15m",  # KernelPartitionHeld: a partition's lag never below where it was this long ago, with retries
    "not_ready_for": "5m",  # KernelNotReady: /readyz not 200 for this long (joining a group takes seconds)
    "down_for": "5m",  # KernelDown: /metrics not scraped for this long
    "memory_limit_bytes": 256 * MIB,  # KernelMemoryHigh: the container's memory limit (deploy/kubernetes: 256Mi)...
    "memory_ratio": 0.9,  # ...RSS above this share of it (or of the limit kube-state-metrics reports)...
    "memory_for": "5m",  # ...for this long
    "buffer_max_bytes": 64 * MIB,  # KernelBufferFull: KERNEL_BUFFER_MAX_BYTES (its default)...
    "buffer_ratio": 0.9,  # ...buffered bytes above this share of it...
    "buffer_for": "15m",  # ...for this long (full for a while: partitions paused, the kernel behind)
    "restart_window": "30m",  # KernelRestarting: container restarts (kube-state-metrics) over this window...
    "restarts": 3,  # ...at least this many
    "container": "kernel",  # the container's name in the pod (deploy/kubernetes/deployment.yaml)
}

KERNEL = '{kernel!=""}'  # a kernel's series: the scrape configuration labels them with kernel and group
PER_KERNEL = "without (topic, partition)"  # one series per kernel process, with its target's labels


def alert(name: str, expr: str, for_: str | None, severity: str, summary: str, runbook: str) -> dict:
    rule = {"alert": name, "expr": expr}
    if for_ and for_ not in ("0", "0s"):
        rule["for"] = for_
    rule["labels"] = {"severity": severity, "kernel": "{{ $labels.kernel }}", "group": "{{ $labels.group }}"}
    rule["annotations"] = {"summary": summary, "runbook": runbook,
                           "runbook_url": f"{DOCS}#{name.lower()}"}
    return rule


def rules(**overrides) -> dict:
    """The rules file (a dict for yaml), with THRESHOLDS and `overrides` of them."""
    unknown = set(overrides) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown thresholds: {', '.join(sorted(unknown))}")
    t = {**THRESHOLDS, **overrides}
    lag = f"kernel_consumer_lag{KERNEL}"
    dead = f"sum {PER_KERNEL} (rate(kernel_messages_dead_lettered_total{KERNEL}[{t['dead_letter_window']}]))"
    done = f"sum {PER_KERNEL} (rate(kernel_messages_processed_total{KERNEL}[{t['dead_letter_window']}]))"
    retries = f"sum {PER_KERNEL} (increase(kernel_messages_retried_total{KERNEL}[{t['held_window']}]))"
    limit = (f'max by (namespace, pod) (kube_pod_container_resource_limits{{resource="memory", '
             f'container="{t["container"]}"}})')
    where = "kernel {{ $labels.kernel }} (group {{ $labels.group }}, {{ $labels.instance }})"
    alerts = [
        alert("KernelStalled",
              f"sum {PER_KERNEL} ({lag}) > 0 and sum {PER_KERNEL} "
              f"(increase(kernel_commits_total{KERNEL}[{t['stalled_window']}])) == 0",
              t["stalled_for"], "critical",
              f"{where} has committed nothing for {t['stalled_window']} while {{{{ $value }}}} messages wait",
              "The kernel makes no progress though messages wait, whatever /healthz says: a handler returning False "
              "(a dependency down: kernel_messages_retried_total climbs, the log says 'retrying'), a handler hung "
              "(the log's 'has been running for'), or commits failing (kernel_commit_failures_total, 'Commit "
              "failed'). Fix the cause the log names; a hung handler needs a restart of the pod."),
        alert("KernelLagGrowing",
              f"sum by (kernel, group) ({lag}) > {t['lag_minimum']} and sum by (kernel, group) ({lag}) > "
              f"sum by (kernel, group) ({lag} offset {t['lag_window']})",
              t["lag_growing_for"], "warning",
              "group {{ $labels.group }} of kernel {{ $labels.kernel }} falls behind: {{ $value }} messages of lag, "
              f"more than {t['lag_window']} ago",
              "Messages arrive faster than the group finishes them. Look at the dashboard's throughput and "
              "handler latency (kernel_processing_seconds): a slower dependency, or more traffic. Add replicas "
              "(up to the partition count; KEDA does it on lag), raise KERNEL_CONCURRENCY for a handler that "
              "waits on I/O, or make the handler faster."),
        alert("KernelPartitionLagGrowing",
              f"{lag} > {t['lag_minimum']} and {lag} > {lag} offset {t['lag_window']}",
              t["lag_growing_for"], "warning",
              "{{ $labels.topic }}[{{ $labels.partition }}] of kernel {{ $labels.kernel }} (group {{ $labels.group }}) "
              "falls behind: "
              "{{ $value }} messages of lag",
              "One partition falls behind while others may not: a hot key (one partition gets more), or a "
              "message retried again and again (KernelPartitionHeld). Look at the log for that partition's "
              "coordinates (topic[partition]@offset)."),
        alert("KernelDeadLetters",
              f"sum {PER_KERNEL} (increase(kernel_messages_dead_lettered_total{KERNEL}[{t['dead_letter_window']}])) "
              f"> 0 or (sum {PER_KERNEL} (kernel_messages_dead_lettered_total{KERNEL}) unless sum {PER_KERNEL} "
              f"(kernel_messages_dead_lettered_total{KERNEL} offset {t['dead_letter_window']}))",
              None, "warning",
              f"{where} dead-lettered {{{{ printf \"%.0f\" $value }}}} messages in {t['dead_letter_window']}",
              "Messages the handler could not handle went to KERNEL_DEAD_LETTER_TOPIC (the log: 'Dead-lettered "
              "topic[partition]@offset to ...: reason'). Read the reason; once the cause is fixed, replay them "
              "with devtools/replay_dead_letters.py."),
        alert("KernelDeadLetterStorm",
              f"{dead} / ({dead} + ({done} or {dead} * 0)) > {t['dead_letter_storm_ratio']}",
              t["dead_letter_storm_for"], "critical",
              f"{where} dead-letters {{{{ $value | humanizePercentage }}}} of its messages",
              "Most messages fail for good: usually not bad input but a change (a new message format, a "
              "dependency answering 4xx to everything, a bug in a new release). The dead letters' reason "
              "header and the log's 'Dead-lettered' lines say why; roll back or fix, then replay them."),
        alert("KernelDeadLettersUnpublished",
              f"increase(kernel_dead_letter_failures_total{KERNEL}[{t['dead_letter_window']}]) > 0",
              None, "critical",
              f"{where} cannot publish dead letters: its partition waits",
              "The broker did not confirm a dead letter: the message stays uncommitted and is tried again, so its "
              "partition is held, and /readyz answers 503 'dead letters cannot be published to ...'. The log "
              "says why ('Could not publish ... to the dead-letter topic'): a missing topic, no WRITE ACL on it, "
              "a message too large. Create the topic or grant the ACL."),
        alert("KernelRetrying",
              f"sum {PER_KERNEL} (rate(kernel_messages_retried_total{KERNEL}[{t['retry_window']}])) "
              f"> {t['retries_per_s']}",
              t["retrying_for"], "warning",
              f"{where} retries {{{{ $value | humanize }}}} messages a second",
              "The handler keeps returning False (a timeout, a 5xx, a lock): a dependency it calls is down or "
              "slow. Its partition waits on the message retried (with KERNEL_CONCURRENCY=1, and its key above). "
              "Look at the dependency; the log's retry lines name the message."),
        alert("KernelPartitionHeld",
              f"min_over_time({lag}[{t['held_window']}]) > 0 and min_over_time({lag}[{t['held_window']}]) >= "
              f"{lag} offset {t['held_window']} and on (kernel, group, instance) ({retries} > 0)",
              None, "warning",
              "{{ $labels.topic }}[{{ $labels.partition }}] of kernel {{ $labels.kernel }} (group {{ $labels.group }}) "
              "has not moved on for "
              f"{t['held_window']}: one message retried again and again",
              "One message of this partition is retried and everything behind it waits (at-least-once, in "
              "order). The log names it (topic[partition]@offset). Fix the dependency, or make the handler "
              "raise DeadLetter for it; KERNEL_MAX_ATTEMPTS bounds the retries."),
        alert("KernelNotReady",
              f"kernel_ready{KERNEL} == 0", t["not_ready_for"], "critical",
              f"{where} has not been ready for {t['not_ready_for']}",
              "/readyz answers 503 and says why: 'not in the group yet' (the broker unreachable or refusing "
              "the credentials: the log's connection warnings, exit code 3 or 5 later), 'topic ... does not "
              "exist', or 'dead letters cannot be published'. Run python main.py check with the same settings."),
        alert("KernelDown",
              f"up{KERNEL} == 0", t["down_for"], "critical",
              f"{where} has not answered /metrics for {t['down_for']}",
              "The process is gone or its HTTP server does not answer: it exited (its exit code: 1 the handler "
              "raised, 2 configuration, 3 broker unreachable, 4 no dead-letter topic, 5 access denied) or the "
              "pod is not running. kubectl logs --previous shows its last lines."),
        alert("KernelMemoryHigh",
              f"process_resident_memory_bytes{KERNEL} > {t['memory_ratio']} * {t['memory_limit_bytes']}",
              t["memory_for"], "warning",
              f"{where} uses {{{{ $value | humanize1024 }}}}B, near its memory limit",
              "Resident memory is near the container's limit: the next peak gets the pod OOM-killed. "
              "kernel_buffered_bytes is what fetched messages hold (KERNEL_BUFFER_MAX_BYTES caps it); the rest "
              "is the client's fetch buffers and your handler. Lower KERNEL_BUFFER_MAX_BYTES and "
              "KAFKA_FETCH_MAX_BYTES, or raise the limit (docs/replicas.md, sizing)."),
        alert("KernelMemoryNearLimit",
              f"max {PER_KERNEL} (process_resident_memory_bytes{KERNEL}) / on (namespace, pod) group_left {limit} "
              f"> {t['memory_ratio']}",
              t["memory_for"], "warning",
              f"{where} uses {{{{ $value | humanizePercentage }}}} of its container's memory limit",
              "As KernelMemoryHigh, against the limit kube-state-metrics reports for the pod (where it is deployed)."),
        alert("KernelBufferFull",
              f"kernel_buffered_bytes{KERNEL} > {t['buffer_ratio']} * {t['buffer_max_bytes']}",
              t["buffer_for"], "warning",
              f"{where} holds {{{{ $value | humanize1024 }}}}B of fetched messages, its buffer nearly full",
              "The kernel fetched as much as KERNEL_BUFFER_MAX_BYTES allows and paused its partitions: the "
              "handler is slower than the traffic (see KernelLagGrowing). Memory is bounded by design; the fix "
              "is throughput (replicas, KERNEL_CONCURRENCY)."),
        alert("KernelRestarting",
              f"(increase(kube_pod_container_status_restarts_total{{container=\"{t['container']}\"}}"
              f"[{t['restart_window']}]) >= {t['restarts']}) * on (namespace, pod) group_left (kernel, group) "
              f"group by (namespace, pod, kernel, group) (up{KERNEL})",
              None, "warning",
              f"{where} restarted {{{{ printf \"%.0f\" $value }}}} times in {t['restart_window']}",
              "The container keeps exiting or being killed (kube-state-metrics' restart count). kubectl "
              "describe pod gives the last state (OOMKilled: KernelMemoryHigh; an exit code: see KernelDown); "
              "kubectl logs --previous the last lines."),
    ]
    return {"groups": [{"name": "clustera-kernel", "rules": alerts}]}


def prometheus_rule(**overrides) -> dict:
    """The rules as a PrometheusRule, for a cluster running the Prometheus Operator."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "kernel", "labels": {"app.kubernetes.io/name": "kernel"}},
        "spec": rules(**overrides),
    }


# Dashboard variables: every query is limited to the kernel and group chosen (all, by default).
SELECTED = 'kernel=~"$kernel", group=~"$group"'


def rate(metric: str) -> str:
    return f"rate({metric}{{{SELECTED}}}[$__rate_interval])"


def latency(quantile: float) -> str:
    return f"histogram_quantile({quantile}, sum by (le) ({rate('kernel_processing_seconds_bucket')}))"


# Title, unit, description, and (query, legend) per line: one panel each, in reading order.
PANELS = [
    ("Throughput", "msg/s", "Messages the handler finished, and sent on (send(), dead letters), per second.",
     [(f"sum by (kernel, group) ({rate('kernel_messages_processed_total')})", "processed {{group}}"),
      (f"sum by (kernel, group) ({rate('kernel_messages_sent_total')})", "sent {{group}}")]),
    ("Lag per partition", "short", "End offset minus committed offset (kernel_consumer_lag), every 5 s.",
     [(f"max by (group, topic, partition) (kernel_consumer_lag{{{SELECTED}}})", "{{topic}}[{{partition}}]")]),
    ("Time behind", "s", "The group's lag divided by its throughput: about how long a message now arriving waits "
     "(the kernel measures no end-to-end time itself).",
     [(f"sum by (group) (kernel_consumer_lag{{{SELECTED}}}) / "
       f"sum by (group) ({rate('kernel_messages_processed_total')})", "{{group}}")]),
    ("Handler latency", "s", "Time of each process_message or process_batch call (kernel_processing_seconds).",
     [(latency(0.5), "p50"), (latency(0.99), "p99"),
      (f"sum({rate('kernel_processing_seconds_sum')}) / sum({rate('kernel_processing_seconds_count')})", "mean")]),
    ("Retries and dead letters", "msg/s", "Messages to be tried again, dead-lettered, and dead letters not published.",
     [(f"sum by (group) ({rate('kernel_messages_retried_total')})", "retried {{group}}"),
      (f"sum by (group) ({rate('kernel_messages_dead_lettered_total')})", "dead-lettered {{group}}"),
      (f"sum by (group) ({rate('kernel_dead_letter_failures_total')})", "dead letters not published {{group}}")]),
    ("Buffered bytes", "bytes", "Memory held by fetched messages not finished yet (KERNEL_BUFFER_MAX_BYTES caps it).",
     [(f"kernel_buffered_bytes{{{SELECTED}}}", "{{instance}}")]),
    ("Memory", "bytes", "Resident memory of each kernel process.",
     [(f"process_resident_memory_bytes{{{SELECTED}}}", "{{instance}}")]),
    ("Readiness", "short", "1 while /readyz answers 200; partitions assigned to each kernel.",
     [(f"kernel_ready{{{SELECTED}}}", "ready {{instance}}"),
      (f"kernel_assigned_partitions{{{SELECTED}}}", "partitions {{instance}}")]),
    ("Commits", "ops", "Offset commits that succeeded and failed, per second.",
     [(f"sum by (group) ({rate('kernel_commits_total')})", "commits {{group}}"),
      (f"sum by (group) ({rate('kernel_commit_failures_total')})", "failed {{group}}")]),
]


def dashboard() -> dict:
    """The Grafana dashboard, built with grafana-foundation-sdk's builders (Grafana's own types)."""
    from grafana_foundation_sdk.builders import dashboard as gd
    from grafana_foundation_sdk.builders import prometheus as gp
    from grafana_foundation_sdk.builders import timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef, VariableRefresh

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")
    board = (gd.Dashboard("Clustera kernel").uid("clustera-kernel").tags(["kafka", "clustera-kernel"])
             .description("A Clustera kernel's metrics (main.py's /metrics): docs/operating.md")
             .refresh("30s").time("now-3h", "now").tooltip(DashboardCursorSync.CROSSHAIR)
             .with_variable(gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    for name in ("kernel", "group"):
        series = 'kernel_ready{kernel=~"$kernel"}' if name == "group" else "kernel_ready"
        board = board.with_variable(
            gd.QueryVariable(name).label(name.capitalize()).datasource(source)
            .query(f"label_values({series}, {name})").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True).include_all(True))
    for title, unit, description, lines in PANELS:
        panel = timeseries.Panel().title(title).unit(unit).description(description).datasource(source)
        for index, (expr, legend) in enumerate(lines):
            query = gp.Dataquery().expr(expr).legend_format(legend).ref_id("ABCDEF"[index]).datasource(source)
            panel = panel.with_target(query)
        board = board.with_panel(panel.span(12).height(8))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def dumped_yaml(document: dict, header: str) -> str:
    return header + yaml.safe_dump(document, sort_keys=False, width=120, allow_unicode=True)


def files() -> dict[Path, str]:
    """What this script writes: path → text."""
    header = "# Generated by devtools/monitoring.py from its THRESHOLDS: change them there and run it again.\n"
    return {
        RULES_FILE: dumped_yaml(rules(), header),
        PROMETHEUS_RULE_FILE: dumped_yaml(prometheus_rule(), header),
        DASHBOARD_FILE: json.dumps(dashboard(), indent=2) + "\n",
    }


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether the files are up to date")
    arguments = parser.parse_args()
    stale = [path for path, text in files().items() if not path.is_file() or path.read_text() != text]
    if arguments.check:
        for path in stale:
            print(f"{path.relative_to(REPO)} is not what devtools/monitoring.py writes: run it", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
