"""Make one of the example kernels yours: `uv run devtools/adopt_example.py memory`.

Replaces your part of main.py (the lines between "# Your kernel" and "# End of your kernel") with the
example's code: its imports (but the one from main, whose names main.py defines itself) and
everything up to its `if __name__ == "__main__":` block. The machinery below your part stays as it
is. Then: `uv sync --extra ...` for the example's packages, set its variables, and copy its tests
(README.md, "Example kernels").
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
START, END = "# Your kernel", "# End of your kernel"  # how main.py's marker lines begin
MAIN_BLOCK = '\nif __name__ == "__main__":'


def kernel_code(example: str) -> str:
    """The example's code after its docstring, without its import from main and its __main__ block."""
    text = (EXAMPLES / f"{example}.py").read_text()
    body = text.split('"""', 2)[2].split(MAIN_BLOCK)[0]
    lines = [line for line in body.splitlines() if not line.startswith("from main import")]
    return "\n".join(lines).strip() + "\n"


def extras_needed(example: str) -> list[str]:
    """The extras of pyproject.toml whose packages the example imports (database for psycopg, say)."""
    imported = set(re.findall(r"^\s*(?:import|from)\s+(\w+)", (EXAMPLES / f"{example}.py").read_text(), re.M))
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return [extra for extra, packages in extras.items()
            if any(re.match(r"[\w-]+", package).group(0).replace("-", "_") in imported for package in packages)]


def your_part(lines: list[str], main_path: Path) -> tuple[int, int]:
    """The indices of main.py's two marker lines."""
    starts = [i for i, line in enumerate(lines) if line.startswith(START)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise SystemExit(f"{main_path}: expected one line starting '{START}' and, after it, one starting '{END}'")
    return starts[0], ends[0]


def adopt(example: str, main_path: Path) -> None:
    lines = main_path.read_text().splitlines()
    start, end = your_part(lines, main_path)
    code = kernel_code(example).splitlines()
    main_path.write_text("\n".join(lines[: start + 1] + code + ["", ""] + lines[end:]) + "\n")
    # The example's import block joins main.py's `from __future__` line: let ruff order them as one.
    subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "--fix", "--select", "I", str(main_path)],
                   check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", choices=sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "__init__"))
    parser.add_argument("--main", type=Path, default=REPO / "main.py", help="the file to change (default: main.py)")
    args = parser.parse_args()
    adopt(args.example, args.main)
    print(f"{args.main}: now the {args.example} kernel.")
    if extras := " ".join(f"--extra {extra}" for extra in extras_needed(args.example)):
        print(f"It needs {extras}: uv sync {extras}; build the image with --build-arg EXTRAS=\"{extras}\".")
    print("Next: set its variables, move its tests (README.md, 'Example kernels').")
    return 0


if __name__ == "__main__":
    sys.exit(main())
