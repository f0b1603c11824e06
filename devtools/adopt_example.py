"""Make one of the example kernels yours: `uv run devtools/adopt_example.py memory`.

Replaces the "What to edit" part of main.py (from `KERNEL_NAME = ...` to the section after
process_message) with the example's code (from its `KERNEL_NAME = ...` to its `__main__` block),
adds the example's imports to main.py's (the names it imports from main are defined there already),
and sorts them with ruff. Everything else in main.py stays as it is. Then: `uv sync --extra ...` for
the example's packages, set its variables, and copy its tests (README.md, "Example kernels").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
MAIN_SECTION_END = "# What process_message can use\n"


def kernel_code(example: str) -> tuple[list[str], str]:
    """The example's import lines (without `from main import`) and its code from KERNEL_NAME on."""
    text = (EXAMPLES / f"{example}.py").read_text()
    start, end = text.index("\nKERNEL_NAME = ") + 1, text.index('\nif __name__ == "__main__":')
    imports = [line for line in text[:start].splitlines()
               if line.startswith(("import ", "from ")) and not line.startswith("from main import")]
    code = text[start:end].rstrip() + "\n"
    if "\nlog = logging.getLogger(KERNEL_NAME)\n" not in code:
        raise SystemExit(f"examples/{example}.py must define log = logging.getLogger(KERNEL_NAME), as main.py does")
    return imports, code


def adopt(example: str, main_path: Path) -> None:
    imports, code = kernel_code(example)
    text = main_path.read_text()
    if "\nKERNEL_NAME = " not in text or MAIN_SECTION_END not in text:
        raise SystemExit(f"{main_path} has no 'KERNEL_NAME = ...' line or no '{MAIN_SECTION_END.strip()}' section")
    start, end = text.index("\nKERNEL_NAME = ") + 1, text.index(MAIN_SECTION_END)
    text = text[:start] + code + "\n\n" + text[end:]
    missing = [line for line in imports if line not in text.splitlines()]
    first_import = text.index("\nimport ") + 1
    text = text[:first_import] + "".join(f"{line}\n" for line in missing) + text[first_import:]
    main_path.write_text(text)
    # isort-style order, as `uv run ruff check .` (part of the tests) expects.
    subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "--fix", "--select", "I", str(main_path)],
                   check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "__init__"))
    parser.add_argument("--main", type=Path, default=REPO / "main.py", help="the file to change (default: main.py)")
    args = parser.parse_args()
    adopt(args.example, args.main)
    print(f"{args.main}: now the {args.example} kernel. Next: README.md, 'Example kernels'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
