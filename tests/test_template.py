"""The seam between your part of main.py and the template's machinery: your part can be renamed,
reordered and extended without breaking the machinery, the examples, the test kit or adopting an
example; a name clash is refused; and a later template's machinery merges into a kernel with git
(README.md, "Taking template updates")."""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import main
from devtools.stamp_machinery import stamped
from tests.fixtures import MAIN, copy_repository, wait_committed

START, END = "# Your kernel", "# End of your kernel"
# A kernel author's part, unlike the template's: another name, topic and logger (named and bound
# differently), helpers and imports of their own (unsorted; names the machinery also uses, bound to
# other things), in another order.
RENAMED_PART = '''
import textwrap
import logging
import datetime
from collections import Counter
from concurrent.futures import Future

DEFAULT_TOPIC = "renamed-topic"
KERNEL_NAME = "renamed-kernel"
seen: Counter = Counter()


def shout(text: str) -> str:
    seen[datetime.date.today()] += 1
    return textwrap.shorten(text.upper(), width=40)


def pending(futures: list[Future]) -> int:
    return sum(not future.done() for future in futures)


def process_message(message) -> bool:
    logger.info("Handled %s: %s", coordinates(message), shout(message.value.decode()))
    return True


logger = logging.getLogger("renamed-logger")
'''


def replace_your_part(main_text: str, part: str) -> str:
    """main.py's text with the lines between its two markers replaced by `part`."""
    head, rest = main_text.split(f"\n{START}", 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(f"\n{END}", 1)
    return f"{head}\n{START}{marker_line}\n{part.strip()}\n\n\n{END}{tail}"


def your_part(main_text: str) -> str:
    return main_text.split(f"\n{START}", 1)[1].split(f"\n{END}", 1)[0]


def run(command: list[str], cwd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs)


def test_your_part_can_be_renamed_reordered_and_extended(cluster, kernels, tmp_path):
    project = copy_repository(tmp_path / "project")
    (project / "main.py").write_text(replace_your_part(MAIN.read_text(), RENAMED_PART))
    fixed = run([sys.executable, "-m", "ruff", "check", "--fix", "--select", "I", "main.py"], project)
    assert fixed.returncode == 0, fixed.stdout
    assert "import textwrap" in your_part((project / "main.py").read_text()), "ruff moved an import out of your part"

    kit = run([sys.executable, "-c", "from tests.kit import call, make_message\n"
               "outcome = call(make_message(b'hi'))\nassert outcome.result is True, outcome"], project)
    assert kit.returncode == 0, kit.stderr

    source, output = cluster.create_topic(partitions=1), cluster.create_topic(partitions=1)
    groups = {"main": f"renamed-{uuid.uuid4().hex[:6]}", "example": f"example-{uuid.uuid4().hex[:6]}"}
    produced = cluster.produce(source, [(0, b"k", b'{"id": "e-1", "type": "t"}')])
    renamed = kernels.start(kernels.env(source, groups["main"]), script=project / "main.py")
    example = kernels.start(kernels.env(source, groups["example"], TRANSFORM_OUTPUT_TOPIC=output,
                                        PYTHONPATH=str(project)), module="examples.transform")
    wait_committed(cluster, renamed, groups["main"], source, produced, 1)
    wait_committed(cluster, example, groups["example"], source, produced, 1)
    assert renamed.stop() == 0 and example.stop() == 0
    assert re.search(r"INFO \[renamed-kernel\] renamed-logger: Handled \S+\[0\]@0: \{\"ID\": \"E-1\"", renamed.log())
    assert all(line.count("[renamed-kernel]") == 1 for line in renamed.log().splitlines()), "the name once a line"
    assert "[renamed-kernel] Partitions assigned" in renamed.log(), "the machinery logs under the kernel's name"
    assert [json.loads(r.value())["enriched_by"] for r in cluster.read_topic(output, 1)] == ["transform-kernel"]

    adopted = run([sys.executable, "devtools/adopt_example.py", "memory"], project)
    assert adopted.returncode == 0, adopted.stderr
    assert 'KERNEL_NAME = "memory-kernel"' in (project / "main.py").read_text()
    lint = run([sys.executable, "-m", "ruff", "check", "--no-cache", "main.py"], project)
    assert lint.returncode == 0, lint.stdout
    assert run([sys.executable, "-c", "import main"], project).returncode == 0


@pytest.mark.parametrize("addition, error", [
    ("def connect_consumer(url):\n    return url\n", "connect_consumer defined in your part of main.py is also a name "
     "of the template's machinery, or of Python, which would replace yours: rename yours"),
    ('type = "order"\n', "type defined in your part of main.py is also a name of the template's machinery, or of "
     "Python, which would replace yours: rename yours"),
    ("len = 3\n", "len defined in your part of main.py is also a name of the template's machinery, or of "
     "Python, which would replace yours: rename yours"),
    ("dict = {}\n", "dict defined in your part of main.py is also a name of the template's machinery, or of "
     "Python, which would replace yours: rename yours"),
    ("del process_message\n", "your part must define process_message (or process_batch)"),
    ("def process_batch(messages):\n    return True\n", "your part defines both process_message and process_batch: "
     "keep the one to call"),
])
def test_what_would_break_the_kernel_later_is_refused_at_import(tmp_path, addition, error):
    """A helper named like a piece of the machinery would be replaced by it, silently; a builtin of
    yours would replace Python's in the machinery (refused before any of it runs: the machinery calls
    type() and len() at import); without process_message nothing runs."""
    (tmp_path / "main.py").write_text(replace_your_part(MAIN.read_text(), RENAMED_PART + "\n\n" + addition))
    result = run([sys.executable, "main.py"], tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"ImportError: main.py: {error}"


# A kernel author's changes, as in the README: their own part of main.py, a dependency, a test.
KERNEL_PART = RENAMED_PART.replace("renamed", "orders").replace(
    "import textwrap\nimport logging\nimport datetime\n", "import datetime\nimport logging\nimport textwrap\n")
KERNEL_TEST = '''from tests.kit import call, make_message


def test_an_order_is_handled():
    assert call(make_message(b"order 1")).result is True
'''


def git(*arguments: str, cwd) -> str:
    result = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *arguments],
                            cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"git {' '.join(arguments)}: {result.stdout}{result.stderr}"
    return result.stdout


def locked_versions(lock: Path) -> set[tuple[str, str]]:
    """(name, version) of every package in a uv.lock."""
    return set(re.findall(r'^name = "([^"]+)"\nversion = "([^"]+)"$', lock.read_text(), re.M))


def change_the_machinery(main_text: str) -> str:
    """A later template: a new import, a renamed constant used in several places, a new section in
    the docstring's map, a new function at the end of the machinery."""
    text = main_text.replace("\nimport ssl\n", "\nimport ssl\nimport struct\n", 1)
    text = text.replace("POLL_TIMEOUT_MS", "IDLE_POLL_TIMEOUT_MS")
    text = text.replace("  Entry point ", "  Template updates               how this part changed\n  Entry point ", 1)
    main_block = '\nif __name__ == "__main__":'
    new_function = '\n\ndef template_version() -> tuple[int, int]:\n    return struct.unpack(">HH", b"\\x00\\x02\\x00\\x00")\n'
    return text.replace(main_block, new_function + "\n" + main_block, 1)


@pytest.mark.parametrize("history", ["cloned", "from a copy"])
def test_template_updates_merge_into_a_kernel(tmp_path, history):
    """The template at one commit; a kernel made from it (a clone, or a copy with a history of its
    own, as GitHub's "Use this template" makes) and changed by its author; the template's next
    commit changes the machinery; the kernel merges it: no conflict, its part intact, its tests pass, its
    uv.lock in agreement with its pyproject.toml."""
    template = copy_repository(tmp_path / "template")
    git("init", "-q", "-b", "main", cwd=template)
    git("add", "-A", cwd=template)
    git("commit", "-q", "-m", "template", cwd=template)
    started_from = git("rev-parse", "HEAD", cwd=template).strip()

    kernel = tmp_path / "kernel"
    if history == "cloned":
        git("clone", "-q", str(template), str(kernel), cwd=tmp_path)
        git("remote", "rename", "origin", "template", cwd=kernel)
    else:
        copy_repository(kernel)
        git("init", "-q", "-b", "main", cwd=kernel)
        git("add", "-A", cwd=kernel)
        git("commit", "-q", "-m", "initial commit", cwd=kernel)
        git("remote", "add", "template", str(template), cwd=kernel)
        git("fetch", "-q", "template", cwd=kernel)
        # Once: record the template commit the copy was made from, keeping the kernel's own files.
        git("merge", "-q", "--allow-unrelated-histories", "-s", "ours", "-m", "Template base", started_from, cwd=kernel)
    main_path = kernel / "main.py"
    main_path.write_text(replace_your_part(main_path.read_text(), KERNEL_PART))
    pyproject = kernel / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "python-dotenv>=1.0",\n',
                                                       '    "python-dotenv>=1.0",\n    "httpx>=0.27",\n', 1))
    # The author locks the new dependency, as `uv add` does: a resolution, which reads the package index
    # (PyPI) unless uv's cache already holds what it needs. So not --offline: with a fresh cache that
    # cannot resolve (the python>=3.12 and emscripten split needs kafka-python metadata no earlier run
    # fetched), and a test must not depend on what an earlier run left in the cache.
    uv = os.environ.get("UV") or shutil.which("uv")
    versions_before = locked_versions(kernel / "uv.lock")
    locked = run([uv, "lock"], kernel)
    assert locked.returncode == 0, locked.stderr
    assert locked_versions(kernel / "uv.lock") == versions_before, "locking one dependency changed other versions"
    (kernel / "tests" / "test_orders.py").write_text(KERNEL_TEST)
    git("add", "-A", cwd=kernel)
    git("commit", "-q", "-m", "The orders kernel", cwd=kernel)
    mine = your_part(main_path.read_text())

    template_main = template / "main.py"
    template_main.write_text(stamped(change_the_machinery(template_main.read_text())))  # as a template developer does
    git("commit", "-q", "-am", "Machinery: a change", cwd=template)

    git("fetch", "-q", "template", cwd=kernel)
    merge = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "merge",
                            "--no-edit", "template/main"], cwd=kernel, capture_output=True, text=True, timeout=60)
    print(f"\n{history}: git merge template/main\n{merge.stdout}{merge.stderr}")
    assert merge.returncode == 0 and "CONFLICT" not in merge.stdout, merge.stdout
    merged = main_path.read_text()
    assert your_part(merged) == mine, "the author's part changed in the merge"
    assert merged.split(f"\n{END}", 1)[1] == template_main.read_text().split(f"\n{END}", 1)[1], (
        "the machinery is not the template's new one")
    assert main.machinery_report(str(main_path))[0] == "ok", "the merged machinery is not the one the template stamped"
    assert '"httpx>=0.27"' in pyproject.read_text()
    # The merged pyproject.toml and uv.lock agree (a comparison of the two: no index, no cache needed).
    check = run([uv, "lock", "--check", "--offline"], kernel)
    assert check.returncode == 0, check.stderr
    tests = run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "tests/test_orders.py",
                 "tests/test_ledger.py", "tests/test_settings.py", "tests/test_lint.py"], kernel)
    assert tests.returncode == 0, tests.stdout[-3000:]
    imported = run([sys.executable, "-c", "import main; print(main.template_version(), main.KERNEL_NAME)"], kernel)
    assert imported.stdout.strip() == "(2, 0) orders-kernel", imported.stderr


def test_the_machinery_is_as_the_template_shipped_it():
    """main.py below "# End of your kernel" is what its stamp says. Fails after an edit of the machinery:
    in a kernel, one its author may not have meant (see `git diff template/main -- main.py`); in the
    template itself, one not stamped yet (uv run devtools/stamp_machinery.py)."""
    level, text = main.machinery_report(str(MAIN))
    assert level == "ok", text


def test_an_edit_of_the_machinery_shows_in_check_and_one_of_your_part_does_not(tmp_path):
    edited = tmp_path / "main.py"
    original = MAIN.read_text()
    edited.write_text(replace_your_part(original, RENAMED_PART))
    assert main.machinery_report(str(edited))[0] == "ok"
    edited.write_text(original.replace("\nimport ssl\n", "\nimport ssl  # a whole-file sed reached it\n", 1))
    level, text = main.machinery_report(str(edited))
    assert level == "warning" and "`git diff template/main -- main.py`" in text


def test_the_machinery_fits_a_screen_a_function_at_a_time():
    """No function of main.py over 45 lines, no class over 220: a reviewer reads each whole."""
    import ast

    tree = ast.parse(MAIN.read_text())
    too_long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                and node.end_lineno - node.lineno + 1 > (220 if isinstance(node, ast.ClassDef) else 45)]
    assert too_long == [], "split these"
