"""The Online Retail evaluation (examples/online_retail) as a benchmark: `python benchmarks/eval_retail.py
[--preset small] [--output DIR] [...]` runs it and prints results.md. Same code path as `domaintok evaluate`."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "online_retail" / "run.py"


def main() -> int:
    args = sys.argv[1:]
    output = Path(args[args.index("--output") + 1]) if "--output" in args else Path("runs/eval_retail")
    sys.argv = [str(EXAMPLE), *args]
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            return int(exc.code) if isinstance(exc.code, int) else 1
    if {"-h", "--help"} & set(args):
        return 0
    print((output / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
