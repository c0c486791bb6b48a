"""Tokens per event on the real Online Retail data (both files, ~1.07 M rows) for the token-saving options: change-only
calendar tokens, semantic stock codes (online_retail_compact.yaml), ActionPiece merges; with each variant's fit time,
vocabulary and tokenize events/s, and the seed ADR design's events/s measured in the same run on the same subset
(the ratio the tokenize target is stated in).

Each tokenize rate and the seed design's rate is the median of --repeats runs (3; the machine is noisy).

Run: .venv/bin/python benchmarks/bench_token_budget.py [--merges 1000 2000] [--baseline-users 1500] [--repeats 3]
     [--out FILE.json]
     [--schemas PATH ...]   # instead of the built-in variants: the shipped schema and these (e.g. examples/online_retail/)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenize import FILES, bench_against_adr  # noqa: E402  (the seed design's pipeline, same rows)

from domaintok.schema import load_schema, schema_from_dict  # noqa: E402
from domaintok.tokenizer import DomainTokenizer  # noqa: E402


def variant(name: str, *, only_changes: bool = False, merges: int | None = None):
    raw = msgspec.to_builtins(load_schema(name))
    if only_changes:
        for field in raw["fields"]:
            if field["type"] == "temporal":
                field["params"] = {**field.get("params", {}), "only_changes": True}
    if merges:
        raw["actionpiece"] = {"merges": merges}
    return schema_from_dict(raw)


def measure(label: str, schema, workdir: Path, repeats: int) -> dict:
    start = time.perf_counter()
    tok = DomainTokenizer.fit(schema, FILES)
    fit_s = time.perf_counter() - start
    runs = [tok.tokenize_to_parquet(FILES, workdir / "sequences.parquet") for _ in range(repeats)]
    stats = runs[0]
    row = {
        "variant": label, "fit_seconds": fit_s, "vocab_size": tok.vocab_size,
        "tokens_per_event": stats["tokens_per_event"], "events": stats["events"],
        "tokenize_events_per_s": float(np.median([r["events"] / r["seconds"] for r in runs])),
        "tokenize_events_per_s_runs": [r["events"] / r["seconds"] for r in runs],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--merges", type=int, nargs="*", default=[1000, 2000])
    parser.add_argument("--baseline-users", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--schemas", type=Path, nargs="*", default=None,
                        help="Measure the shipped schema and these schema files instead of the built-in variants.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-token-budget-") as tmp:
        workdir = Path(tmp)
        shipped = DomainTokenizer.fit("online_retail", FILES)
        shipped.save_pretrained(workdir / "tok")
        seed = bench_against_adr(shipped, workdir, args.baseline_users, repeats=args.repeats)
        print(json.dumps({"seed_design_events_per_s": seed["adr_events_per_s"],
                          "runs": seed["adr_events_per_s_runs"]}), flush=True)
        variants = [("online_retail.yaml", variant("online_retail")),
                    *[(path.name, load_schema(path)) for path in args.schemas]] if args.schemas is not None else [
            ("online_retail.yaml", variant("online_retail")),
            ("+ only_changes", variant("online_retail", only_changes=True)),
            ("online_retail_compact.yaml", variant("online_retail_compact")),
            *[(f"compact + {m} merges", variant("online_retail_compact", merges=m)) for m in args.merges],
            *[(f"online_retail.yaml + {m} merges", variant("online_retail", merges=m)) for m in args.merges[-1:]],
        ]
        rows = [measure(label, schema, workdir, args.repeats) for label, schema in variants]
    base = rows[0]["tokens_per_event"]
    print(f"\n{'variant':34} {'tokens/event':>13} {'vs shipped':>10} {'vocab':>7} {'fit s':>7} {'ev/s':>10} {'x seed':>7}")
    for r in rows:
        print(f"{r['variant']:34} {r['tokens_per_event']:13.2f} {r['tokens_per_event'] / base:10.2f} "
              f"{r['vocab_size']:7d} {r['fit_seconds']:7.1f} {r['tokenize_events_per_s']:10.0f} "
              f"{r['tokenize_events_per_s'] / seed['adr_events_per_s']:7.1f}")
    if args.out:
        args.out.write_text(json.dumps({"seed": seed, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
