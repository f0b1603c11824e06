"""A kernel's own settings: read_settings() in your part reads each with setting(name, default, parse,
secret); start-up and `python main.py check` call it before the first message, so a missing or invalid
one stops the kernel with exit code 2 and one line naming it, never its value."""

import subprocess
import sys
import time

import pytest

import main
from devtools.broker import free_port
from main import ConfigError, setting
from tests.fixtures import REPO
from tests.test_examples import adopted_main


def positive(text: str) -> float:
    if not float(text) > 0:
        raise ValueError("must be above 0")
    return float(text)


def https_url(text: str) -> str:
    if not text.startswith("https://"):
        raise ValueError(f"must be an https:// URL, not {text!r}")  # careless: it quotes the value
    return text


def test_a_setting_is_its_text_or_what_parse_makes_of_it_or_its_default(monkeypatch):
    monkeypatch.setenv("ORDERS_LIMIT", " 2.5 ")
    monkeypatch.setenv("ORDERS_NAME", "  north ")
    monkeypatch.setenv("ORDERS_BLANK", "  ")
    monkeypatch.delenv("ORDERS_UNSET", raising=False)
    assert setting("ORDERS_LIMIT", parse=positive) == 2.5 and setting("ORDERS_NAME") == "north"
    assert setting("ORDERS_UNSET", 10.0, parse=positive) == 10.0, "a default is not parsed"
    assert setting("ORDERS_BLANK", "") == "", "an optional one without a default"


@pytest.mark.parametrize("value, parse, secret, error", [
    (None, None, False, "ORDERS_URL is not set: this kernel needs it"),
    ("  ", None, False, "ORDERS_URL is not set: this kernel needs it"),
    ("0", positive, False, "ORDERS_URL: must be above 0"),
    ("lots", positive, False, "ORDERS_URL: could not convert string to float: 'lots'"),
    ("http://hooks.example/t0ken-123", https_url, True, "ORDERS_URL: must be an https:// URL, not '...'"),
])
def test_a_missing_or_refused_setting_is_a_config_error_naming_it(monkeypatch, value, parse, secret, error):
    if value is None:
        monkeypatch.delenv("ORDERS_URL", raising=False)
    else:
        monkeypatch.setenv("ORDERS_URL", value)
    with pytest.raises(ConfigError) as raised:
        setting("ORDERS_URL", parse=parse, secret=secret)
    assert str(raised.value) == error and raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__, "no traceback of parse's error"


def test_check_reports_the_kernels_own_settings_and_stops_at_a_bad_one(monkeypatch, capsys):
    env = {"KAFKA_BOOTSTRAP_SERVERS": "nowhere.invalid:9092"}
    monkeypatch.setenv("ORDERS_LIMIT", "5")

    def read_settings():
        return {"limit": setting("ORDERS_LIMIT", parse=positive)}

    assert main.check_deployment(env, "orders", "orders", None, read_settings) == main.EXIT_CHECK_FAILED
    lines = capsys.readouterr().out.splitlines()
    lines = [line for line in lines if not line.startswith("ok      machinery")]  # tests/test_template.py's
    assert lines[1] == "ok      the kernel's own settings (read_settings)" and lines[2].startswith("error   network")
    monkeypatch.setenv("ORDERS_LIMIT", "-1")
    assert main.check_deployment(env, "orders", "orders", None, read_settings) == main.EXIT_CONFIG
    assert capsys.readouterr().out.splitlines()[-1] == "error   ORDERS_LIMIT: must be above 0"


@pytest.fixture(scope="module")
def notification_main(tmp_path_factory):
    """main.py with the notification example adopted: its read_settings() in your part."""
    return adopted_main("notification", tmp_path_factory.mktemp("adopted"))


@pytest.mark.parametrize("how", ["main.py", "python -m examples.notification"])
@pytest.mark.parametrize("webhook_url, error", [
    (None, "WEBHOOK_URL is not set: this kernel needs it"),
    ("hooks.example.com/s3cret-t0ken", "WEBHOOK_URL: must be an http:// or https:// URL"),
    ("https://hooks.example.com/s3cret-t0ken", None),  # the next setting, then
])
def test_a_bad_setting_of_your_part_stops_the_kernel_at_start_up_and_check_names_it(notification_main, how,
                                                                                      webhook_url, error):
    """Before it connects: the broker's port here has nothing behind it, which would be exit code 3."""
    env = {"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}", "KAFKA_BOOTSTRAP_TIMEOUT_MS": "2000",
           "WEBHOOK_TIMEOUT_S": "never", **({"WEBHOOK_URL": webhook_url} if webhook_url else {})}
    error = error or "WEBHOOK_TIMEOUT_S: could not convert string to float: 'never'"
    command = [sys.executable, str(notification_main)] if how == "main.py" else [
        sys.executable, "-m", "examples.notification"]
    cwd = notification_main.parent if how == "main.py" else REPO
    started_s = time.monotonic()
    run = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    [line] = output.strip().splitlines()
    assert (run.returncode, line.split(" ERROR ", 1)[-1]) == (
        2, f"[notification-kernel] Configuration error: {error}"), output
    assert "Traceback" not in output and "s3cret" not in output and "Starting" not in output
    assert time.monotonic() - started_s < 20

    check = subprocess.run(command + ["check"], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stdout.splitlines()[-1]) == (2, f"error   {error}"), check.stdout + check.stderr
    assert "s3cret" not in check.stdout + check.stderr
