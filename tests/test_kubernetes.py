"""deploy/kubernetes: valid for Kubernetes and for KEDA, and true to main.py. The variables the
manifests set are ones the kernel reads (and their values load), the probes ask the kernel's paths on
its port, the grace period covers its shutdown, the memory fits its buffer, and KEDA measures the
group, topic and brokers the kernel uses. Offline: no cluster, no broker (docs/replicas.md says what
was and was not run)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import main
from tests.fixtures import REPO, unavailable

DEPLOY = REPO / "deploy" / "kubernetes"
VARIANTS = {"autoscaled": DEPLOY, "static-membership": DEPLOY / "static-membership"}
# An older Kubernetes that clusters upgraded once a year may still run, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.32", kubernetes_validate.latest_version())
KEDA_SCHEMA = json.loads((REPO / "tests" / "keda_schema.json").read_text())
# KEDA's own schemas: the npm package @kubernetes-models/keda, pinned in tests/keda/package-lock.json.
KEDA_MODELS = REPO / "tests" / "keda"
NPM_CI_TIMEOUT_S = 300
# The Prometheus Operator's objects (a PodMonitor, the alert rules): their own folder, applied on their own.
MONITORING = DEPLOY / "monitoring"
# Their schemas: the npm package @kubernetes-models/prometheus-operator, pinned in tests/prometheus_operator.
PROMETHEUS_OPERATOR_MODELS = REPO / "tests" / "prometheus_operator"
# Validates objects with the schemas of either package (node validate_models.mjs INSTALLED < objects.json).
VALIDATE_MODELS = REPO / "tests" / "validate_models.mjs"
GROUP_ANNOTATION = "clustera.io/consumer-group"
# The kafka scaler's parameters that may come from a TriggerAuthentication (KEDA 2.18).
KAFKA_AUTH_PARAMETERS = {"sasl", "username", "password", "keytab", "realm", "kerberosConfig", "kerberosServiceName",
                         "kerberosDisableFAST", "saslTokenProvider", "scopes", "oauthTokenEndpointUri",
                         "oauthExtensions", "tls", "cert", "key", "keyPassword", "ca"}
# The kernel's own peak, VmHWM, rounded up: 56 MB no-op in BENCHMARKS.md ("Memory"), 39-44 MB with a 20 ms handler.
KERNEL_BASELINE_MIB = 64
# After the final commit and the producer's flush, leaving the group is one request.
LEAVE_GROUP_S = 5
PLACEHOLDER = "placeholder-for-a-secret-value"


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def rendered(directory: Path) -> list[dict]:
    """The objects `kubectl apply -k directory` creates: the resources of its kustomization, files and
    the kustomizations they name, in order (the manifests use no transformer but images)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        objects += rendered(path) if path.is_dir() else documents(path)
    for image in kustomization.get("images", []):
        for container in (c for o in objects for c in containers(o)):
            if container["image"] == image["name"]:
                container["image"] = f"{image['newName']}:{image['newTag']}"
    return objects


def containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"] if obj["kind"] in ("Deployment", "StatefulSet") else []


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workload(objects: list[dict]) -> dict:
    return next(o for o in objects if o["kind"] in ("Deployment", "StatefulSet"))


def secret_keys(template: str = "secret.example.yaml") -> set[str]:
    """What the Secret kernel-kafka holds, by its template: mutual TLS, or secret-sasl.example.yaml."""
    return set(one(documents(DEPLOY / template), "Secret")["stringData"])


def container_environment(objects: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it, and KEDA's *FromEnv reads it: envFrom
    (the ConfigMap's values, a placeholder for each key of the mutual-TLS Secret), then env (a fieldRef
    gives the pod's name)."""
    environment = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            environment.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            assert source["secretRef"]["name"] == "kernel-kafka"
            environment.update(dict.fromkeys(secret_keys(), PLACEHOLDER))
    for variable in container.get("env", []):
        environment[variable["name"]] = variable.get("value", "kernel-0")
    return environment


class ReadNames(dict):
    """An environment that notes the names main.load_settings asks it for."""

    def __init__(self, values):
        super().__init__(values)
        self.asked: set[str] = set()

    def get(self, name, default=None):
        self.asked.add(name)
        return super().get(name, default)

    def __getitem__(self, name):
        self.asked.add(name)
        return super().__getitem__(name)


def kernel_settings(environment: dict[str, str]) -> tuple[main.KernelSettings, set[str]]:
    """main.py's settings from the environment, and the names it read. (Certificates are decoded
    later, at start-up: here a placeholder counts as given.)"""
    values = ReadNames(environment)
    return main.load_settings(values, main.KERNEL_NAME, main.DEFAULT_TOPIC), values.asked


def names_your_part_reads() -> set[str]:
    """Variables the kernel's own part of main.py names (DATABASE_URL in the examples, say)."""
    text = (REPO / "main.py").read_text()
    part = text[text.index("# Your kernel"):text.index("# End of your kernel")]
    return set(re.findall(r"[\"']([A-Z][A-Z0-9_]+)[\"']", part))


def test_every_manifest_is_in_a_kustomization_or_an_example():
    listed = {p.resolve() for d in (DEPLOY, DEPLOY / "common", DEPLOY / "static-membership", MONITORING)
              for p in (d / r for r in yaml.safe_load((d / "kustomization.yaml").read_text())["resources"])}
    for path in DEPLOY.rglob("*.yaml"):
        assert path.name == "kustomization.yaml" or path in listed or path.name in (
            "secret.example.yaml", "secret-sasl.example.yaml", "triggerauthentication-sasl.yaml"), f"{path} is in no kustomization"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_objects_validate_against_the_kubernetes_schemas(version):
    objects = [o for path in DEPLOY.rglob("*.yaml") if path.name != "kustomization.yaml" for o in documents(path)]
    kubernetes_kinds = [o for o in objects if not o["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/"))]
    assert {o["kind"] for o in kubernetes_kinds} == {"ConfigMap", "Secret", "Service", "PodDisruptionBudget",
                                                    "Deployment", "StatefulSet"}
    for obj in kubernetes_kinds:
        kubernetes_validate.validate(obj, version, strict=True)  # strict: an unknown field is an error
    # KEDA hands the ScaledObject's behavior to the HorizontalPodAutoscaler it makes: Kubernetes' schema.
    for scaled in (o for o in objects if o["kind"] == "ScaledObject"):
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "keda-hpa"},
               "spec": {"scaleTargetRef": scaled["spec"]["scaleTargetRef"], "maxReplicas": 6, "behavior": behavior}}
        kubernetes_validate.validate(hpa, version, strict=True)


class ModelsUnavailable(Exception):
    """Node.js or npm is missing, or `npm ci` failed: the schemas of an npm package cannot be had here."""


def npm_models_version(folder: Path) -> str:
    """The version of the one package `folder`'s package.json depends on, as its lock pins it."""
    [package] = json.loads((folder / "package.json").read_text())["dependencies"]
    return json.loads((folder / "package-lock.json").read_text())["packages"][f"node_modules/{package}"]["version"]


def install_npm_models(folder: Path) -> Path:
    """The folder of `folder`'s node_modules (tests/keda, tests/prometheus_operator), installed with
    `npm ci` from the committed lock the first time, outside the repository:
    ~/.cache/clustera-kernel/FOLDER-models-VERSION-HASH, HASH that of package.json and package-lock.json
    (a lock keeps two test workers from installing at once)."""
    digest = hashlib.sha256(b"".join((folder / name).read_bytes()
                                     for name in ("package.json", "package-lock.json"))).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clustera-kernel"
    home = cache / f"{folder.name}-models-{npm_models_version(folder)}-{digest}"
    where = f"tests/{folder.name}"
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise ModelsUnavailable(f"{tool} is not installed: the schemas come from npm ({where})")
    if (home / ".complete").exists():
        return home
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / ".complete").exists():
            return home
        with tempfile.TemporaryDirectory(dir=cache) as work:
            project = Path(work) / "project"
            project.mkdir()
            for name in ("package.json", "package-lock.json"):
                shutil.copy(folder / name, project)
            try:
                installed = subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=project,
                                           capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise ModelsUnavailable(f"npm ci took more than {NPM_CI_TIMEOUT_S} s in {where}") from None
            if installed.returncode != 0:
                raise ModelsUnavailable(f"npm ci failed in {where}:\n{installed.stdout[-2000:]}{installed.stderr[-2000:]}")
            shutil.rmtree(home, ignore_errors=True)
            project.rename(home)
        (home / ".complete").touch()
    return home


@pytest.fixture(scope="session")
def keda_models() -> Path:
    try:
        return install_npm_models(KEDA_MODELS)
    except ModelsUnavailable as error:
        unavailable(f"KEDA's own schemas cannot be used here: {error}")


def keda_objects() -> dict[str, dict]:
    """Every KEDA object deploy/kubernetes creates or offers, by where it comes from."""
    found = {f"{variant} {o['kind']} {o['metadata']['name']}": o for variant, directory in VARIANTS.items()
             for o in rendered(directory) if o["apiVersion"].startswith("keda.sh/")}
    [sasl] = documents(DEPLOY / "triggerauthentication-sasl.yaml")
    return {**found, f"triggerauthentication-sasl.yaml {sasl['kind']} {sasl['metadata']['name']}": sasl}


def test_keda_objects_validate_against_kedas_own_schemas(keda_models):
    """KEDA's own schemas: those of the npm package @kubernetes-models/keda, the version pinned in
    tests/keda/package-lock.json (2.0.0, MIT,
    https://github.com/tommy351/kubernetes-models-ts/tree/master/third-party/keda), generated from KEDA's
    Go API types (github.com/kedacore/keda/v2/apis/keda/v1alpha1), which KEDA's CRDs are generated from
    too, and compiled to ajv validators. KEDA 2.19.0, as the package's repository records it (go.mod,
    changelog); the tarball names no KEDA version, but has fallback.behavior, new in KEDA 2.17.

    They check what KEDA's CRD checks: the types, required fields and enums (fallback.behavior, say) of
    ScaledObject, TriggerAuthentication and ClusterTriggerAuthentication. Not unknown fields, which they
    do not forbid (the API server prunes them, or rejects them under kubectl's strict field validation),
    nor the trigger's metadata, a string map to the CRD: test_keda_objects_validate_against_the_stricter_schema
    checks both. One node process validates every object, and a broken copy that must fail."""
    objects = keda_objects()
    assert sorted(key.split(" ", 1)[1] for key in objects) == [
        "ScaledObject kernel", "TriggerAuthentication kernel-kafka", "TriggerAuthentication kernel-kafka"]
    scaled = next(o for o in objects.values() if o["kind"] == "ScaledObject")
    broken = {**scaled, "spec": {**scaled["spec"], "minReplicaCount": "one"}}
    checked = subprocess.run(["node", str(VALIDATE_MODELS), str(keda_models)], capture_output=True,
                             text=True, timeout=60, input=json.dumps([*objects.values(), broken]))
    assert checked.stderr == "", checked.stderr
    errors = checked.stdout.splitlines()
    invalid = {int(line.split(" ", 1)[0]) for line in errors}
    sources = list(objects)
    assert invalid <= {len(sources)}, "\n".join(
        f"{sources[i]}:{line.split(':', 1)[1]}" for line in errors if (i := int(line.split(" ", 1)[0])) < len(sources))
    # The validator does validate: the copy with a string for a count fails, and only on that.
    assert checked.returncode == 1 and errors == [
        f"{len(sources)} ScaledObject kernel: /spec/minReplicaCount must be integer {{\"type\":\"integer\"}}"], errors


def test_keda_objects_validate_against_the_stricter_schema():
    """tests/keda_schema.json, written for this project from KEDA's documentation (2.18): stricter than
    KEDA's CRD where the CRD lets a mistake through silently. It rejects unknown fields in the parts of
    the ScaledObject and TriggerAuthentication that deploy/kubernetes uses, and checks the kafka
    trigger's metadata: its keys are the kafka scaler's (a misspelt lagTreshold fails here, and KEDA would
    ignore it) and its values' formats. KEDA's own schemas: test_keda_objects_validate_against_kedas_own_schemas."""
    keda = [o for path in DEPLOY.rglob("*.yaml") for o in documents(path) if o.get("apiVersion", "").startswith("keda.sh/")]
    assert sorted(o["kind"] for o in keda) == ["ScaledObject", "TriggerAuthentication", "TriggerAuthentication"]
    for obj in keda:
        jsonschema.validate(obj, {**KEDA_SCHEMA, "$ref": f"#/$defs/{obj['kind']}"})
    with pytest.raises(jsonschema.ValidationError, match="lagTreshold"):  # the schema catches what KEDA would ignore
        scaled = one(keda, "ScaledObject")
        trigger = scaled["spec"]["triggers"][0]
        misspelt = {**scaled, "spec": {**scaled["spec"], "triggers": [
            {**trigger, "metadata": {**trigger["metadata"], "lagTreshold": "10"}}]}}
        jsonschema.validate(misspelt, {**KEDA_SCHEMA, "$ref": "#/$defs/ScaledObject"})


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variable_set_is_one_the_kernel_reads_and_its_value_loads(variant):
    objects = rendered(VARIANTS[variant])
    for container in (c for o in objects for c in containers(o)):
        environment = container_environment(objects, container)
        _, asked = kernel_settings(environment)  # a bad value raises ConfigError naming it
        unread = set(environment) - asked - names_your_part_reads()
        assert not unread, f"{variant}: the manifests set {sorted(unread)}, which main.py does not read"


def test_the_secret_templates_hold_the_kernels_variables_and_no_real_value():
    read = kernel_settings({"KAFKA_BOOTSTRAP_SERVERS": "a:1"})[1]
    for path in DEPLOY.glob("secret*.example.yaml"):
        for name, value in one(documents(path), "Secret")["stringData"].items():
            assert name in read, f"{path.name}: main.py does not read {name}"
            assert value.startswith("REPLACE"), f"{path.name}: {name} holds a value; keep only placeholders there"


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_ask_the_kernels_paths_on_its_port(variant):
    objects = rendered(VARIANTS[variant])
    pod = workload(objects)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    settings, _ = kernel_settings(container_environment(objects, container))
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == settings.http_port
    health = main.HealthState(settings)
    health.joined = True
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], ports.get(get["port"], get["port"])) == (path, settings.http_port), probe
        assert main.http_answer(get["path"], health, main.KernelMetrics())[0] == 200, f"{probe}: the kernel does not serve {path}"
    # The startup probe waits at least as long as the kernel tries to reach a broker before it exits.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings.bootstrap_timeout_ms / 1000
    service = one(objects, "Service")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(settings.http_port, "http")]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == str(settings.http_port)
    assert service["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert main.http_answer("/metrics", health, main.KernelMetrics())[0] == 200


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_grace_period_covers_the_kernels_shutdown(variant):
    objects = rendered(VARIANTS[variant])
    pod = workload(objects)["spec"]["template"]["spec"]
    settings, _ = kernel_settings(container_environment(objects, pod["containers"][0]))
    shutdown_s = (main.POLL_TIMEOUT_MS + settings.shutdown_timeout_ms + settings.commit_timeout_ms
                  + settings.produce_timeout_ms) / 1000 + LEAVE_GROUP_S
    assert pod["terminationGracePeriodSeconds"] > shutdown_s, (
        f"{variant}: SIGKILL after {pod['terminationGracePeriodSeconds']} s; the kernel may take {shutdown_s:.0f} s "
        "to finish, commit and leave")


def mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * {"Mi": 1, "Gi": 1024}[unit]


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_requests_and_limits_fit_the_kernels_buffer(variant):
    objects = rendered(VARIANTS[variant])
    container = containers(workload(objects))[0]
    settings, _ = kernel_settings(container_environment(objects, container))
    buffer_mib, fetch_mib = settings.buffer_max_bytes / 2**20, settings.fetch_max_bytes / 2**20
    resources = container["resources"]
    # Requested: the kernel with a full buffer. Limit: and the client's fetch buffer, briefly twice.
    assert mebibytes(resources["requests"]["memory"]) >= KERNEL_BASELINE_MIB + buffer_mib
    assert mebibytes(resources["limits"]["memory"]) >= KERNEL_BASELINE_MIB + buffer_mib + 2 * fetch_mib


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_run_unprivileged_on_a_read_only_filesystem(variant):
    objects = rendered(VARIANTS[variant])
    obj = workload(objects)
    pod = obj["spec"]["template"]["spec"]
    container = pod["containers"][0]
    dockerfile_user = re.search(r"^USER (\d+)$", (REPO / "Dockerfile").read_text(), re.M).group(1)
    assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == dockerfile_user
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                             "capabilities": {"drop": ["ALL"]}}
    # The kernel writes its certificates under the temporary directory (tempfile.mkdtemp): /tmp, not TMPDIR.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "TMPDIR" not in container_environment(objects, container)
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
    # The PodDisruptionBudget and the Service select these pods.
    labels = obj["spec"]["template"]["metadata"]["labels"]
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(objects, "Service")["spec"]["selector"].items() <= labels.items()


def test_keda_measures_the_deployments_group_topic_and_brokers():
    objects = rendered(DEPLOY)
    scaled = one(objects, "ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    deployment = one(objects, "Deployment", target["name"])
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert "replicas" not in deployment["spec"], "kubectl apply would reset the count KEDA set"
    environment = container_environment(objects, deployment["spec"]["template"]["spec"]["containers"][0])
    settings, _ = kernel_settings(environment)
    [trigger] = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "kafka"

    def keda_reads(parameter: str) -> str:  # KEDA's kafka scaler: the value, or the variable named by ...FromEnv
        return environment[metadata[f"{parameter}FromEnv"]] if f"{parameter}FromEnv" in metadata else metadata[parameter]

    assert keda_reads("consumerGroup") == settings.group_id
    assert [keda_reads("topic")] == settings.topics, "KEDA measures one topic: KAFKA_TOPIC must name one"
    assert keda_reads("bootstrapServers").split(",") == settings.bootstrap_servers
    assert metadata["offsetResetPolicy"] == settings.auto_offset_reset
    assert scaled["spec"]["minReplicaCount"] >= 1, "a group that never committed may never scale from zero"
    assert int(metadata["lagThreshold"]) > 0

    # KEDA connects as the kernel does: TLS with the kernel's certificates, from the kernel's Secret.
    authentication = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    references = {ref["parameter"]: ref for ref in authentication["spec"]["secretTargetRef"]}
    assert set(references) <= KAFKA_AUTH_PARAMETERS
    assert (metadata.get("tls") == "enable") == settings.uses_tls
    assert {p: (r["name"], r["key"]) for p, r in references.items()} == {
        "ca": ("kernel-kafka", "KAFKA_CA_CERT"), "cert": ("kernel-kafka", "KAFKA_CLIENT_CERT"),
        "key": ("kernel-kafka", "KAFKA_CLIENT_KEY")}
    assert {source["secretRef"]["name"] for source in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
            if "secretRef" in source} == {"kernel-kafka"}


def test_the_sasl_trigger_authentication_uses_the_kernels_sasl_variables():
    [authentication] = documents(DEPLOY / "triggerauthentication-sasl.yaml")
    references = {ref["parameter"]: ref["key"] for ref in authentication["spec"]["secretTargetRef"]}
    assert references == {"username": "KAFKA_SASL_USERNAME", "password": "KAFKA_SASL_PASSWORD"}
    assert set(references.values()) <= secret_keys("secret-sasl.example.yaml")
    # With that Secret and the mechanism in the ConfigMap, the kernel's settings load as SASL.
    environment = {**one(rendered(DEPLOY), "ConfigMap")["data"], "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                   **dict.fromkeys(secret_keys("secret-sasl.example.yaml"), PLACEHOLDER)}
    assert kernel_settings(environment)[0].security_protocol == "SASL_SSL"


def test_static_members_take_a_stable_instance_id_and_are_not_autoscaled():
    objects = rendered(VARIANTS["static-membership"])
    statefulset = one(objects, "StatefulSet")
    container = containers(statefulset)[0]
    instance_id = next(v for v in container["env"] if v["name"] == "KAFKA_GROUP_INSTANCE_ID")
    assert instance_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"  # kernel-0, kernel-1, ...
    settings, _ = kernel_settings(container_environment(objects, container))
    assert settings.group_instance_id is not None
    # A replica must be back within the session timeout: longer than a restart's few seconds.
    assert settings.session_timeout_ms >= 30_000
    assert statefulset["spec"]["serviceName"] == one(objects, "Service")["metadata"]["name"]
    assert not [o for o in objects if o["kind"] == "ScaledObject"]


@pytest.fixture(scope="session")
def prometheus_operator_models() -> Path:
    try:
        return install_npm_models(PROMETHEUS_OPERATOR_MODELS)
    except ModelsUnavailable as error:
        unavailable(f"the Prometheus Operator's schemas cannot be used here: {error}")


def test_monitoring_objects_validate_against_the_prometheus_operators_schemas(prometheus_operator_models):
    """The schemas of the npm package @kubernetes-models/prometheus-operator, the version pinned in
    tests/prometheus_operator/package-lock.json (6.0.0, MIT,
    https://github.com/tommy351/kubernetes-models-ts/tree/master/third-party/prometheus-operator), generated
    from the operator's CRDs: types, required fields and enums (not unknown fields, as for KEDA's). The
    PrometheusRule is the one devtools/monitoring.py generates (tests/test_monitoring.py checks it is
    up to date); a broken copy of the PodMonitor must fail, and only it."""
    objects = {f"{o['kind']} {o['metadata']['name']}": o for o in rendered(MONITORING)}
    assert sorted(objects) == ["PodMonitor kernel", "PrometheusRule kernel"]
    monitor = objects["PodMonitor kernel"]
    broken = {**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": [{"port": 8080}]}}
    checked = subprocess.run(["node", str(VALIDATE_MODELS), str(prometheus_operator_models)],
                             capture_output=True, text=True, timeout=60, input=json.dumps([*objects.values(), broken]))
    assert checked.stderr == "", checked.stderr
    errors = checked.stdout.splitlines()
    assert checked.returncode == 1 and errors == [
        '2 PodMonitor kernel: /spec/podMetricsEndpoints/0/port must be string {"type":"string"}'], errors


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_pod_monitor_scrapes_the_kernels_port_and_labels_its_kernel_and_group(variant):
    """The PodMonitor selects the workload's pods, scrapes their port "http" at /metrics, and gives
    every series the kernel and group labels the alert rules need, from the pod's name label and its
    consumer-group annotation, which must be the group KAFKA_CONSUMER_GROUP sets."""
    objects = rendered(VARIANTS[variant])
    template = workload(objects)["spec"]["template"]
    container = template["spec"]["containers"][0]
    settings, _ = kernel_settings(container_environment(objects, container))
    monitor = one(rendered(MONITORING), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert "http" in {port["name"] for port in container["ports"]}
    relabelled = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabelled == {"kernel": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
                          "group": ["__meta_kubernetes_pod_annotation_clustera_io_consumer_group"]}
    assert template["metadata"]["annotations"][GROUP_ANNOTATION] == settings.group_id, (
        f"{variant}: the pod's {GROUP_ANNOTATION} annotation is not its KAFKA_CONSUMER_GROUP: the alerts would name "
        "another group")
    assert template["metadata"]["labels"]["app.kubernetes.io/name"]
