"""Keep mutmut's results in the repository, so a mutation run resumes where the last one stopped.

mutmut keeps each module's results in ``mutants/astral/<module>.py.meta``
(ignored by git): the exit code of every mutant, and a hash of every
function. When it generates the mutants again it keeps the result of each
mutant whose function's hash is unchanged. A full run takes hours on two
cores, more than one sitting; this script carries the results over:

    python mutation/sync.py restore   # before `mutmut run`: committed results -> mutants/
    python mutation/sync.py save      # after it: mutants/ -> mutation/results/ (commit these)

``nox -s mutants`` does both. Only the exit codes and the function hashes are
kept (not the timings), one compact file per module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "mutation" / "results"
MUTANTS = ROOT / "mutants" / "astral"


def restore() -> int:
    """Copy committed results into ``mutants/`` where mutmut has none yet."""
    MUTANTS.mkdir(parents=True, exist_ok=True)
    restored = 0
    for saved in sorted(RESULTS.glob("*.py.meta")):
        target = MUTANTS / saved.name
        if target.exists():
            continue  # mutmut's own, newer results win
        data = json.loads(saved.read_text())
        meta = {
            "exit_code_by_key": data["exit_code_by_key"],
            "hash_by_function_name": data["hash_by_function_name"],
            "type_check_error_by_key": {},
            "durations_by_key": {},
            "estimated_durations_by_key": {},
        }
        target.write_text(json.dumps(meta, indent=4))
        restored += 1
    print(f"mutation/sync.py: restored {restored} modules' results into {MUTANTS}")
    return 0


def save() -> int:
    """Write mutmut's current results to ``mutation/results/``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved = 0
    for meta in sorted(MUTANTS.glob("*.py.meta")):
        data = json.loads(meta.read_text())
        compact = {
            "exit_code_by_key": dict(sorted(data["exit_code_by_key"].items())),
            "hash_by_function_name": dict(sorted(data["hash_by_function_name"].items())),
        }
        (RESULTS / meta.name).write_text(json.dumps(compact, indent=0, ensure_ascii=False) + "\n")
        saved += 1
    print(f"mutation/sync.py: saved {saved} modules' results to {RESULTS}")
    return 0


if __name__ == "__main__":
    commands = {"restore": restore, "save": save}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print(__doc__)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
