"""Stamp main.py's machinery: `uv run devtools/stamp_machinery.py` after changing the template's machinery.

The last line of main.py holds the SHA-256 of the machinery (from "# End of your kernel" to that line);
`python main.py check` and tests/test_template.py compare it with the file, so that an edit of the
machinery a kernel's author did not mean (a whole-file search and replace) shows. This is for the
template's own development: a kernel takes the template's stamp with its machinery, by git merge.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `main` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import main  # noqa: E402


def stamped(text: str) -> str:
    """main.py's `text` with its stamp line set to its machinery's digest."""
    return re.sub(rf"^{main.MACHINERY_STAMP}.*$", f'{main.MACHINERY_STAMP}"{main.machinery_digest(text)}"', text,
                  count=1, flags=re.M)


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--main", type=Path, default=Path(main.__file__), help="the file to stamp (default: main.py)")
    path = parser.parse_args().main
    text = path.read_text()
    path.write_text(stamped(text))
    print(f"{path}: machinery {main.machinery_digest(text)[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
