"""The code passes ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade; see pyproject.toml)."""

import subprocess

from tests.fixtures import REPO


def test_ruff_finds_nothing():
    result = subprocess.run(["ruff", "check", "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
