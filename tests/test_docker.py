"""No Docker engine runs here, so the image is linted, and what it copies and ignores is checked."""

import subprocess

from tests.conftest import REPO


def test_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_the_kernel_as_a_non_root_user_with_an_exec_form_command():
    dockerfile = (REPO / "Dockerfile").read_text()
    assert 'CMD ["python", "main.py"]' in dockerfile
    assert "USER 10001" in dockerfile and "--uid 10001" in dockerfile
    assert "uv sync --locked" in dockerfile and "UV_NO_DEV=1" in dockerfile


def test_dockerignore_keeps_secrets_and_dev_tooling_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".env", ".env.*", "tests", "devtools", "bench", ".git", ".venv", "*.pem", "*.key"} <= ignored
