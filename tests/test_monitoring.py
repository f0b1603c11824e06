"""deploy/prometheus, deploy/grafana and deploy/kubernetes/monitoring, offline: the files are what
devtools/monitoring.py generates from its THRESHOLDS, promtool accepts the rules and its unit tests
(tests/prometheus/kernel-alerts.test.yaml) pin the shipped thresholds, every alert says what it means and
what to do, and the dashboard is a Grafana dashboard by Grafana's own types. tests/test_prometheus.py
runs them on a real Prometheus scraping real kernels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from devtools import monitoring
from tests.fixtures import REPO, unavailable

PROMTOOL_TESTS = REPO / "tests" / "prometheus" / "kernel-alerts.test.yaml"
APT_HINT = "apt-get install -y prometheus (Debian's package: the server and promtool; .ci/run installs it)"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        unavailable(f"promtool is not installed: {APT_HINT}")
    return path


def without_annotations(rules: dict) -> dict:
    return {"groups": [{**group, "rules": [{k: v for k, v in rule.items() if k != "annotations"}
                                           for rule in group["rules"]]} for group in rules["groups"]]}


def promtool_test(rules: dict, directory: Path) -> subprocess.CompletedProcess:
    """promtool test rules of tests/prometheus/kernel-alerts.test.yaml on `rules`, without their
    annotations (promtool compares every annotation; the expectations name labels only)."""
    (directory / "kernel-alerts.yaml").write_text(yaml.safe_dump(without_annotations(rules)))
    shutil.copy(PROMTOOL_TESTS, directory)
    return subprocess.run([promtool(), "test", "rules", PROMTOOL_TESTS.name], cwd=directory, capture_output=True,
                          text=True, timeout=60)


def test_the_generated_files_are_up_to_date():
    for path, text in monitoring.files().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} differs: run uv run devtools/monitoring.py"
    assert yaml.safe_load(monitoring.PROMETHEUS_RULE_FILE.read_text())["spec"] == yaml.safe_load(
        monitoring.RULES_FILE.read_text()), "the PrometheusRule holds the rules file's rules"


def test_promtool_accepts_the_rules():
    checked = subprocess.run([promtool(), "check", "rules", str(monitoring.RULES_FILE)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(monitoring.rules()['groups'][0]['rules'])} rules found" in checked.stdout


def test_promtool_unit_tests_pin_the_shipped_thresholds(tmp_path):
    shipped = yaml.safe_load(monitoring.RULES_FILE.read_text())
    passed = promtool_test(shipped, tmp_path)
    assert passed.returncode == 0 and "SUCCESS" in passed.stdout, passed.stdout + passed.stderr
    # Every alert is exercised by a unit test, and a changed threshold breaks them.
    tested = set(re.findall(r"alertname: (\w+)", PROMTOOL_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in shipped["groups"][0]["rules"]}
    for change in ({"stalled_for": "10m"}, {"memory_ratio": 0.99}, {"retries_per_s": 1}, {"lag_window": "20m"},
                   {"restarts": 5}, {"dead_letter_storm_ratio": 0.5}, {"not_ready_for": "15m"}):
        failed = promtool_test(monitoring.rules(**change), tmp_path)
        assert failed.returncode == 1 and "FAILED" in failed.stdout + failed.stderr, f"{change} passed promtool's unit tests"


def test_every_alert_names_its_kernel_and_group_and_says_what_to_do():
    for rule in monitoring.rules()["groups"][0]["rules"]:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert (rule["labels"]["kernel"], rule["labels"]["group"]) == ("{{ $labels.kernel }}", "{{ $labels.group }}"), name
        annotations = rule["annotations"]
        assert "\n" not in annotations["summary"] and len(annotations["summary"]) < 200, name
        assert len(annotations["runbook"]) > 100, f"{name}: a runbook says what it means, where to look, what to do"
        anchor = annotations["runbook_url"].split("#")[1]
        assert f"### {name}" in (REPO / "docs" / "operating.md").read_text() and anchor == name.lower(), (
            f"{name}: docs/operating.md has no section for it")


def test_thresholds_are_overridable_and_checked():
    fast = monitoring.rules(stalled_for="5s", stalled_window="10s")
    stalled = next(r for r in fast["groups"][0]["rules"] if r["alert"] == "KernelStalled")
    assert stalled["for"] == "5s" and "[10s]" in stalled["expr"]
    with pytest.raises(ValueError, match="unknown thresholds: stalled_fr"):
        monitoring.rules(stalled_fr="5s")


def test_the_dashboard_is_a_grafana_dashboard_with_the_panels_an_operator_needs():
    """Built with grafana-foundation-sdk's builders, and read back by its Dashboard model."""
    from grafana_foundation_sdk.models.dashboard import Dashboard

    board = json.loads(monitoring.DASHBOARD_FILE.read_text())
    read = Dashboard.from_json(board)
    assert read.uid == "clustera-kernel" and [v.name for v in read.templating.list_val] == ["datasource", "kernel", "group"]
    titles = [panel["title"] for panel in board["panels"]]
    assert titles == ["Throughput", "Lag per partition", "Time behind", "Handler latency", "Retries and dead letters",
                      "Buffered bytes", "Memory", "Readiness", "Commits"]
    for panel in board["panels"]:
        assert panel["type"] == "timeseries" and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all('kernel=~"$kernel", group=~"$group"' in t["expr"] for t in panel["targets"]), (
            f"{panel['title']}: every query is limited to the kernel and group chosen")
    positions = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in board["panels"]]
    assert len(set(positions)) == len(positions), "panels overlap"


def test_promtool_accepts_the_example_scrape_configuration(tmp_path):
    """Debian's Prometheus is built without Kubernetes service discovery: the job that uses it is
    checked with a static target in its place, its relabelling as written."""
    config = yaml.safe_load((monitoring.RULES_FILE.parent / "scrape-config.example.yaml").read_text())
    assert config["rule_files"] == [monitoring.RULES_FILE.name]
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["kernel:8080"]}]
            assert {"kernel", "group"} <= {r.get("target_label") for r in job["relabel_configs"]}, job["job_name"]
        else:
            assert {"kernel", "group"} <= set(job["static_configs"][0]["labels"]), job["job_name"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(monitoring.RULES_FILE, tmp_path)
    checked = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
