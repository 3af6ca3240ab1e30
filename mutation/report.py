"""Write the counts and the survivor list of docs/mutation-survivors.md from the saved results.

The reading of each survivor (its category and reason) lives in that page
itself, one line per survivor::

    - `astral._auth.x_mint_token__mutmut_58` — equivalent by construction — why

This script reads those lines back, keeps the reading of every mutant that
still survives, adds the lines of any extra files given (same format, the leading
``- `` optional, for survivors read since), and rewrites everything from
``**Counts.**`` to the end of the page: the table per module and the list.
The prose above it is written by hand.

    python mutation/report.py [--since REF] [EXTRA ...]

``--since REF``: the commit whose ``mutation/results/`` the page's readings were
made against. A reading from the page is only kept if the mutant's function
has the same hash now as then; a changed function's survivors are listed as
not classified (its mutants were tested again, and what they do may have
changed) unless an extra file reads them afresh.

A survivor is a mutant whose recorded exit code is 0 (the tests passed with
it). Caught: any other code (1 for a failing test, negative for a timeout).
Not yet tested: no code recorded.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "mutation" / "results"
PAGE = ROOT / "docs" / "mutation-survivors.md"
MARKER = "**Counts.**"

CATEGORIES = (
    "killed by a new test",
    "killed by an existing test",
    "wording",
    "equivalent by construction",
    "speed only",
    "unobservable (timing)",
    "real gap",
    "not classified",
)
LINE = re.compile(r"^(?:- )?`(?P<name>[^`]+)` — (?P<category>[^—]+?) — (?P<reason>.*)$")
NUMBER = re.compile(r"__mutmut_(\d+)$")
GIT = shutil.which("git") or "git"


def _function_of(name: str) -> str:
    """``astral._auth.x_mint_token__mutmut_58`` -> ``x_mint_token``."""
    return NUMBER.sub("", name).split(".", 2)[2]


def _sort_key(name: str) -> tuple[str, int]:
    """Mutants of one function in the order of their numbers."""
    match = NUMBER.search(name)
    return (NUMBER.sub("", name), int(match.group(1)) if match else -1)


def _load(text: str) -> dict[str, dict[str, object]]:
    return json.loads(text)  # type: ignore[no-any-return]


def _results_now() -> dict[str, dict[str, dict[str, object]]]:
    return {p.name: _load(p.read_text()) for p in sorted(RESULTS.glob("*.py.meta"))}


def _results_at(ref: str) -> dict[str, dict[str, dict[str, object]]]:
    out = {}
    for name in _results_now():
        shown = subprocess.run(  # noqa: S603 (our own git, our own arguments)
            [GIT, "show", f"{ref}:mutation/results/{name}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode == 0:
            out[name] = _load(shown.stdout)
    return out


def _readings(lines: list[str]) -> dict[str, tuple[str, str]]:
    """The category and reason of every survivor line among ``lines``."""
    found: dict[str, tuple[str, str]] = {}
    for line in lines:
        match = LINE.match(line.strip())
        if match is None:
            continue
        category = match["category"].strip()
        if category not in CATEGORIES:
            raise SystemExit(f"unknown category {category!r} in: {line.strip()}")
        found[match["name"]] = (category, match["reason"].strip())
    return found


def main(argv: list[str]) -> int:
    """Rewrite the generated part of the page; see the module's docstring."""
    since = None
    if argv[:1] == ["--since"]:
        since, argv = argv[1], argv[2:]
    page = PAGE.read_text()
    if MARKER not in page:
        raise SystemExit(f"{PAGE} has no {MARKER!r} line")
    prose = page[: page.index(MARKER)]
    known = _readings(page.splitlines())
    fresh: dict[str, tuple[str, str]] = {}  # read since REF: kept whatever changed
    for extra in argv:
        fresh.update(_readings(Path(extra).read_text().splitlines()))
    known.update(fresh)

    now = _results_now()
    then = _results_at(since) if since else None
    rows: dict[str, Counter[str]] = {}
    survivors: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for file, data in now.items():
        module = file.removesuffix(".py.meta")
        counts: Counter[str] = Counter()
        hashes = data["hash_by_function_name"]
        old_hashes = (then or {}).get(file, {}).get("hash_by_function_name", {})
        for name, code in data["exit_code_by_key"].items():
            if code is None:
                counts["untested"] += 1
                continue
            counts["tested"] += 1
            if code != 0:
                counts["caught"] += 1
                if isinstance(code, int) and code < 0:
                    counts["timeout"] += 1
                continue
            counts["survived"] += 1
            category, reason = known.get(name, ("not classified", "not read yet"))
            function = _function_of(name)
            if (
                then is not None
                and name in known
                and name not in fresh
                and old_hashes.get(function) != hashes.get(function)
            ):
                category, reason = "not classified", "its function changed since it was read"
            counts[category] += 1
            survivors[module].append((name, category, reason))
        rows[module] = counts

    def cell(counts: Counter[str], key: str) -> str:
        return f"{counts[key]:,}"

    out = [MARKER, ""]
    head = ["module", "tested", "caught", "survived", *CATEGORIES, "not yet tested"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|---|" + "---:|" * (len(head) - 1))
    total: Counter[str] = Counter()
    for counts in rows.values():
        total.update(counts)
    for label, counts in [*((f"`{m}`", c) for m, c in rows.items()), ("**total**", total)]:
        caught = cell(counts, "caught")
        if counts["timeout"]:
            caught += f" ({counts['timeout']} by timeout)"
        cells = [label, cell(counts, "tested"), caught, cell(counts, "survived")]
        cells += [cell(counts, c) for c in CATEGORIES] + [cell(counts, "untested")]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## The survivors", ""]
    for module in rows:
        listed = sorted(survivors[module], key=lambda s: _sort_key(s[0]))
        if not listed:
            continue
        out += [f"### `{module}`", ""]
        out += [f"- `{name}` — {category} — {reason}" for name, category, reason in listed]
        out.append("")
    PAGE.write_text(prose + "\n".join(out))
    print(f"{PAGE.relative_to(ROOT)}: {total['survived']} survivors, {total['untested']} untested")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
