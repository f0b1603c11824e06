"""What pytest reads first: the plugin with the tests' fixtures, and the marks each test gets by its
file and its fixtures (`uv run pytest -m author`, `-m unit`, ...)."""

import pytest

import main

# The broker, the kernel as a subprocess, PostgreSQL, and the helpers the tests import: a module of its
# own, which pytest loads as a plugin for every test. Named here, in the conftest pytest reads at start
# (testpaths), the one place besides `-p` where pytest takes pytest_plugins.
pytest_plugins = ["tests.fixtures"]

# For the tests of the template's own hello-world handler (@hello_world): deselected once KERNEL_NAME is
# set, when main.py is a kernel of its own.
IS_HELLO_WORLD = main.KERNEL_NAME == "hello-world"
# Whose a test is, by its file (the template's own tests have neither mark), and whether it needs a broker.
OWNERS = {"test_process_message.py": "author", "test_examples.py": "example", "test_analytics.py": "example",
          "test_triage.py": "example"}
BROKER_FIXTURES = {"cluster", "tansu", "apache_kafka", "apache_kafka_three_nodes", "kernels", "local_run"}


@pytest.hookimpl(tryfirst=True)  # before -m selects by these marks
def pytest_collection_modifyitems(config, items):
    """Marks every test `author` (tests/test_process_message.py: the author's tests and the end-to-end run
    of their kernel) or `example` by its file, and `broker` (it starts one: through a fixture, or marked
    so by hand) or else `unit`. Deselects the hello-world handler's tests once KERNEL_NAME is another."""
    kept, dropped = [], []
    for item in items:
        if item.path.name in OWNERS:
            item.add_marker(OWNERS[item.path.name])
        if item.get_closest_marker("broker") is None:
            item.add_marker("broker" if BROKER_FIXTURES & set(item.fixturenames) else "unit")
        (kept if IS_HELLO_WORLD or item.get_closest_marker("hello_world") is None else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_header(config):
    if not IS_HELLO_WORLD:
        return f"KERNEL_NAME is {main.KERNEL_NAME!r}: the tests of the template's hello-world handler are deselected"
