"""README.md, CLAUDE.md and .env.template name every setting main.py reads, with the same defaults."""

import re

from tests.conftest import REPO, settings_from

VARIABLES = sorted(set(re.findall(r'"((?:KAFKA|KERNEL)_[A-Z_]+|LOG_[A-Z]+|PORT)"', (REPO / "main.py").read_text())))


def test_every_setting_is_documented():
    assert "KAFKA_BOOTSTRAP_SERVERS" in VARIABLES and len(VARIABLES) >= 15
    for document in ("README.md", "CLAUDE.md", ".env.template"):
        text = (REPO / document).read_text()
        missing = [name for name in VARIABLES if name not in text]
        assert not missing, f"{document} does not mention {missing}"


def test_documented_defaults_are_the_real_ones():
    readme = (REPO / "README.md").read_text()
    template_defaults = dict(re.findall(r"^#((?:KAFKA|KERNEL)_[A-Z_]+|LOG_[A-Z]+)=(\S+)$", (REPO / ".env.template").read_text(), re.M))
    settings = settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1"})
    for name, default in template_defaults.items():
        assert f"| `{name}` | `{default}` |" in readme, f"README and .env.template disagree on {name}"
        assert settings_from({"KAFKA_BOOTSTRAP_SERVERS": "a:1", name: default}) == settings, (
            f"{name}={default} is documented as the default but changes the settings"
        )


def anchors(path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_links_to_sections_point_at_headings_that_exist():
    for document in ("README.md", "docs/reference.md", "CLAUDE.md"):
        path = REPO / document
        for target, anchor in re.findall(r"\]\(([\w./-]*)#([\w-]+)\)", path.read_text()):
            linked = (path.parent / target).resolve() if target else path
            assert anchor in anchors(linked), f"{document} links to {target}#{anchor}, which is not a heading"
