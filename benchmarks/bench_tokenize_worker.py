"""Subprocess of bench_tokenize.py: tokenize parquet input to a parquet file and report peak RSS as one JSON line.

Run alone so its peak RSS (resource.getrusage) belongs to this one tokenize call and nothing else.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", action="append", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    from domaintok.tokenizer import DomainTokenizer

    tok = DomainTokenizer.from_pretrained(args.tokenizer)
    # RSS once everything is imported and loaded: what tokenize itself adds is measured against this
    after_import_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    stats = tok.tokenize_to_parquet(args.input, args.output)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"after_import_mb": after_import_kb / 1024, "peak_mb": peak_kb / 1024, "seconds": seconds,
                      "events": stats["events"], "users": stats["users"]}))


if __name__ == "__main__":
    main()
