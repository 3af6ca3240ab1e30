"""Check the docs: Python blocks compile, and every public name is documented.

Run by CI and ``nox -s docs``. Exits non-zero with a list of problems.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import astral

DOCS = Path(__file__).parent
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def main() -> int:
    problems: list[str] = []
    pages = [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]
    for page in pages:
        for number, block in enumerate(FENCE.findall(page.read_text()), 1):
            try:
                compile(block, f"{page.name} block {number}", "exec", flags=0x2000)
            except SyntaxError as exc:
                problems.append(f"{page.name}: python block {number} does not compile: {exc}")
    reference = (DOCS / "reference.md").read_text()
    problems.extend(
        f"reference.md: public name astral.{name} is not documented"
        for name in astral.__all__
        if f"`{name}" not in reference and f"astral.{name}" not in reference
    )
    for problem in problems:
        print(problem)
    print(f"docs: {len(pages)} pages checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
