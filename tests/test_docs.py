"""docs/configuration.md, CLAUDE.md and .env.template name every setting main.py reads, with the same defaults;
README.md leads a newcomer in at most 300 lines, and the docs' links and lists agree with what exists."""

import re

from tests.fixtures import REPO, settings_from

VARIABLES = sorted(set(re.findall(r'"((?:KAFKA|KERNEL)_[A-Z_]+|LOG_[A-Z]+|PORT)"', (REPO / "main.py").read_text())))


def test_every_setting_is_documented():
    assert "KAFKA_BOOTSTRAP_SERVERS" in VARIABLES and len(VARIABLES) >= 15
    for document in ("docs/configuration.md", "CLAUDE.md", ".env.template"):
        text = (REPO / document).read_text()
        missing = [name for name in VARIABLES if name not in text]
        assert not missing, f"{document} does not mention {missing}"


def test_documented_defaults_are_the_real_ones():
    table = (REPO / "docs/configuration.md").read_text()
    template_defaults = dict(re.findall(r"^#((?:KAFKA|KERNEL)_[A-Z_]+|LOG_[A-Z]+)=(\S+)$", (REPO / ".env.template").read_text(), re.M))
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1"})
    for name, default in template_defaults.items():
        assert f"| `{name}` | `{default}` |" in table, f"docs/configuration.md and .env.template disagree on {name}"
        assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", name: default}) == settings, (
            f"{name}={default} is documented as the default but changes the settings"
        )


def anchors(path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_links_to_sections_point_at_headings_that_exist():
    for path in [REPO / "README.md", REPO / "CLAUDE.md", *(REPO / "docs").glob("*.md")]:
        document = path.relative_to(REPO)
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)(?:#([\w-]+))?\)", path.read_text()):
            linked = (path.parent / target).resolve() if target else path
            assert linked.exists(), f"{document} links to {target}, which does not exist"
            assert not anchor or anchor in anchors(linked), f"{document} links to {target}#{anchor}, not a heading"


def test_the_readme_leads_in_at_most_300_lines():
    readme = (REPO / "README.md").read_text()
    assert readme.count("\n") <= 300
    headings = re.findall(r"^## (.+)$", readme, re.M)
    path = ["Quick start", "Write your kernel", "Test your kernel", "Configure for your cluster", "Deploy",
            "Taking template updates"]
    assert [heading for heading in headings if heading in path] == path, headings


def test_what_process_message_can_use_is_listed_alike_everywhere():
    """The public names of main.py's section "What process_message can use" are the ones the comment in
    your part, docs/reference.md's layout table and CLAUDE.md name; README's section references exist."""
    import ast

    source = (REPO / "main.py").read_text()
    section = source.split("\n# What process_message can use #", 1)[1].split("\n# How the kernel stops #", 1)[0]
    public = [node.name for node in ast.parse(section).body
              if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")]
    assert {"DeadLetter", "send", "json_object", "message_id", "describe_timestamp"} <= set(public)
    names = [name if name[0].isupper() else f"{name}()" for name in public]
    # The template's own part of main.py says what it can use (an adopted example's part need not).
    if comment := re.search(r"# process_message can use (.+?): the machinery", source, re.S):
        assert re.findall(r"\w+\(\)|[A-Z]\w+", comment.group(1)) == names, "the comment in your part of main.py"
    row = re.search(r"^\| What process_message can use \| (.+) \|$", (REPO / "docs/reference.md").read_text(), re.M)
    assert re.findall(r"`(\w+(?:\(\))?)`", row.group(1)) == names, "docs/reference.md's table of sections"
    claude = (REPO / "CLAUDE.md").read_text()
    assert not [name for name in public if not re.search(rf"[`.]{name}\b", claude)], "CLAUDE.md"


def test_the_map_the_banners_and_the_layout_table_name_the_same_sections():
    """main.py's docstring maps the file, section by section, in order; each section begins with a banner
    a search finds (bottle.py's three '#' lines); docs/reference.md's "How main.py is laid out" lists the
    sections after the start-up block, in the same order."""
    source = (REPO / "main.py").read_text()
    rule = "#" * 79
    banners = re.findall(rf"^{rule}\n# (.+?) #+\n{rule}$", source, re.M)
    assert len(banners) >= 15 and len(banners) == source.count(f"{rule}\n") / 2, "every rule line in a banner"
    assert all(len(line) == 79 for line in re.findall(r"^# .+ #+$", source, re.M)), "banners of one width"
    map_text = main_docstring(source).split("\nThe file, in reading order:\n", 1)[1]
    mapped = [name for name in re.findall(r"^  (\S+(?: \S+)*)  ", map_text, re.M) if not name.startswith("(")]
    assert mapped == banners, "the map in main.py's docstring"
    layout = (REPO / "docs/reference.md").read_text().split("## How main.py is laid out", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| ([^|*]+?) \|", layout, re.M)[2:] == banners[1:], "docs/reference.md's layout table"


def main_docstring(source: str) -> str:
    return source.split('"""', 2)[1]


def test_the_life_of_a_message_names_what_exists():
    """Every function and class the docstring's "life of a message" names is one main.py defines: a
    rename in the loop must not leave a reviewer following a name that is gone."""
    import main

    life = main_docstring((REPO / "main.py").read_text()).split("The life of a message", 1)[1].split("\nThe file,")[0]
    named = set(re.findall(r"\b([A-Z]\w+\.\w+|[a-z_]+_[a-z_]+)\(\)", life)) | set(re.findall(r"\(([A-Z]\w+|[a-z]+_\w+)\)", life))
    assert {"process_task", "ConsumerLoop.settle", "Ledger.commits_due", "TaskOutcome"} <= named
    missing = [name for name in sorted(named) if not hasattr(getattr(main, name.split(".")[0], None), name.split(".")[-1])
               and not hasattr(main, name)]
    assert not missing, f"main.py's life of a message names what main.py does not define: {missing}"


def test_claude_md_names_what_exists():
    import prometheus_client  # whose Counter, Gauge and Histogram CLAUDE.md tells a kernel to use

    claude = (REPO / "CLAUDE.md").read_text()
    readme_headings = set(re.findall(r"^#+ (.+)$", (REPO / "README.md").read_text(), re.M))
    for section in re.findall(r'README(?:\.md)?, "([^"]+)"', claude):
        section = " ".join(section.split())
        assert section in readme_headings, f'CLAUDE.md points at the README section "{section}", which does not exist'
    source = (REPO / "main.py").read_text()
    for name in set(re.findall(r"`([A-Z]\w+|[a-z_]+\(\))`", claude)):
        bare = name.rstrip("()")
        if bare.isupper() or bare[0].isupper() and "_" in bare:  # a setting: test_every_setting_is_documented
            continue
        # main.py defines it, or takes it from your part (getattr(main, "read_settings", None)), or prometheus_client has it
        assert re.search(rf'^(?:class|def) {bare}\b|^{bare} = |"{bare}"', source, re.M) or hasattr(prometheus_client, bare), (
            f"CLAUDE.md names {name}, which main.py does not define")


def readme_commands() -> list[str]:
    """Every `uv ...` command README.md shows, in its code blocks and in backticks, environment prefixes dropped."""
    text = (REPO / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    lines = [line.split("  #")[0] for line in blocks.splitlines()] + re.findall(r"`([^`\n]*\buv [^`\n]*)`", text)
    commands = []
    for line in lines:
        for part in line.split("&&"):
            if found := re.search(r"\buv (?:run|sync)\b.*", part):
                commands.append(found.group(0).strip())
    return commands


def test_every_command_of_the_readme_names_what_exists():
    """What `uv run` runs exists with the options given: a script and its flags (its --help), a module of
    examples/, a pytest marker, an extra of pyproject.toml."""
    import subprocess
    import sys
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras, markers = project["project"]["optional-dependencies"], project["tool"]["pytest"]["ini_options"]["markers"]
    commands = readme_commands()
    assert len(commands) >= 10 and "uv run pytest" in commands and "uv run pytest -m author" in commands, commands
    for command in commands:
        for extra in re.findall(r"--extra (\w+)", command):
            assert extra in extras, f"{command}: no extra {extra}"
        if found := re.search(r"-m (\w+)$", command) if " pytest " in f"{command} " else None:
            assert any(marker.startswith(f"{found.group(1)}:") for marker in markers), f"{command}: no such marker"
        if found := re.search(r"python -m (examples\.\w+)", command):
            assert (REPO / (found.group(1).replace(".", "/") + ".py")).is_file(), command
        if found := re.search(r"uv run ((?:devtools|bench)/\w+\.py)(.*)", command):
            script, arguments = REPO / found.group(1), found.group(2)
            assert script.is_file(), command
            flags = re.findall(r"(?<!\S)(--[\w-]+)", arguments)
            if flags:
                usage = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                       timeout=60, cwd=REPO).stdout
                assert all(flag in usage for flag in flags), f"{command}: {script.name} --help shows no {flags}"
