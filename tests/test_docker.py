"""No Docker engine runs here, so the image is linted, and what it copies and ignores is checked."""

import json
import os
import subprocess

from devtools.broker import free_port
from tests.conftest import REPO


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
