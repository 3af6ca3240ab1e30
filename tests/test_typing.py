"""The typed examples in docs/typing.md, checked by mypy --strict.

One block must pass; in the other, mypy must report exactly the errors its
``# wrong: CODE`` comments announce, on those lines and no others.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parent.parent / "docs" / "typing.md"
BLOCK = re.compile(r"<!-- mypy: (pass|fail) -->\n```python\n(.*?)```", re.DOTALL)
WRONG = re.compile(r"#\s*wrong:\s*([a-z-]+)")
ERROR = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


def examples() -> dict[str, str]:
    found = dict(BLOCK.findall(DOCS.read_text()))
    assert set(found) == {"pass", "fail"}, "docs/typing.md lost a mypy-checked example"
    return found


def test_the_docs_typed_examples_under_mypy_strict(tmp_path: Path) -> None:
    blocks = examples()
    good, bad = tmp_path / "typed_good.py", tmp_path / "typed_bad.py"
    good.write_text(blocks["pass"])
    bad.write_text(blocks["fail"])
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
            "--show-error-codes", "--no-pretty", "--hide-error-context",
            "--cache-dir", str(tmp_path / ".mypy_cache"),
            str(good), str(bad),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
        cwd=tmp_path,
    )  # fmt: skip
    reported: dict[str, set[tuple[int, str]]] = {"typed_good.py": set(), "typed_bad.py": set()}
    for line in result.stdout.splitlines():
        match = ERROR.match(line)
        if match:
            reported[Path(match["file"]).name].add((int(match["line"]), match["code"]))
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert reported["typed_good.py"] == set(), result.stdout
    expected = {
        (number, match[1])
        for number, text in enumerate(blocks["fail"].splitlines(), 1)
        if (match := WRONG.search(text))
    }
    assert len(expected) >= 5
    assert reported["typed_bad.py"] == expected, result.stdout
