"""No Docker engine runs here, so the image is linted, and what it copies and ignores is checked."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from devtools.broker import free_port
from tests.fixtures import REPO


def test_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_the_kernel_as_a_non_root_user_with_an_exec_form_command():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'CMD ["python", "main.py"]' in dockerfile
    assert "USER 10001" in dockerfile and "--uid 10001" in dockerfile
    assert "uv sync --locked" in dockerfile and "UV_NO_DEV=1" in dockerfile


def test_healthcheck_asks_the_liveness_endpoint_and_passes_without_one(tmp_path, monkeypatch):
    dockerfile = (REPO / "Dockerfile").read_text()
    command = json.loads(dockerfile.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].split("\n\n")[0].strip())
    assert command[:2] == ["python", "-c"]
    env = {k: v for k, v in os.environ.items() if k not in ("KERNEL_HTTP_PORT", "PORT")}
    assert subprocess.run(command, env=env, timeout=30).returncode == 0, "no HTTP port: healthy"
    env["KERNEL_HTTP_PORT"] = str(free_port())
    assert subprocess.run(command, env=env, timeout=30, capture_output=True).returncode != 0, "nothing listening"


def test_railway_deploys_the_image_with_readiness_and_restarts():
    config = json.loads((REPO / "railway.json").read_text())
    assert config["build"]["builder"] == "DOCKERFILE"
    assert config["deploy"]["startCommand"] == "python main.py"
    assert config["deploy"]["healthcheckPath"] == "/readyz"
    assert config["deploy"]["restartPolicyType"] == "ON_FAILURE"


def test_dockerignore_keeps_secrets_and_dev_tooling_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".env", ".env.*", "tests", "devtools", "bench", ".git", ".venv", "*.pem", "*.key"} <= ignored


def image_environment(tmp_path) -> tuple[Path, Path]:
    """What the image holds, built here: the locked dependencies without the dev group, with the
    Dockerfile's default EXTRAS, and the files it copies; (its python, the folder of those files)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    extras = re.search(r'^ARG EXTRAS="([^"]*)"', dockerfile, re.M).group(1).split()
    uv = os.environ.get("UV") or shutil.which("uv")
    venv, app = tmp_path / "venv", tmp_path / "app"
    synced = subprocess.run([uv, "sync", "--locked", "--no-dev", "--no-install-project", *extras], cwd=REPO,
                            env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)}, capture_output=True, text=True,
                            timeout=300)
    assert synced.returncode == 0, synced.stderr
    app.mkdir()
    for copied in re.findall(r"^COPY (?!--)(.+) \./$", dockerfile, re.M):
        for name in copied.split():
            shutil.copy(REPO / name, app / name)
    return venv / "bin" / "python", app


def imports(python: Path, app: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), "-c", "import main"], cwd=app, env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_image_installs_what_main_py_imports(tmp_path):
    """The dev group (the tests' and the examples' packages) is not in the image: a package main.py
    imports that only the dev group provides passes every local run and fails in production. Add it
    with `uv add PACKAGE` (docs/configuration.md, "Packages and extras")."""
    python, app = image_environment(tmp_path)
    result = imports(python, app)
    missing = re.findall(r"No module named '([\w.]+)'", result.stderr)
    assert result.returncode == 0, (f"main.py imports {missing or result.stderr[-500:]}, which the image would not "
                                    "install: `uv add` it (or add it to an extra and to the Dockerfile's EXTRAS)")

    # Tracing asked for in an image built without the otel extra: exit code 2, saying how to add it.
    env = {"PATH": os.environ["PATH"], "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "OTEL_TRACES_EXPORTER": "otlp"}
    traced = subprocess.run([str(python), "main.py"], cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert (traced.returncode, "OpenTelemetry is not installed: uv sync --extra otel" in traced.stderr) == (2, True), (
        traced.stderr[-500:])

    # And the check catches it: a kernel that imports a package of the dev group only.
    text = (app / "main.py").read_text()
    (app / "main.py").write_text(text.replace("\nKERNEL_NAME =", "\nimport psycopg\n\nKERNEL_NAME =", 1))
    assert "No module named 'psycopg'" in imports(python, app).stderr
