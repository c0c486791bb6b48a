"""Subprocess of bench_tokenize.py: tokenize parquet input to a parquet file and report peak RSS as one JSON line.

Peak RSS is VmHWM from /proc/self/status: Linux carries getrusage's ru_maxrss across exec from the (large) parent.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def vm_hwm_mb() -> float:
    """This process's own peak resident set (kB in /proc/self/status), falling back to getrusage elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", action="append", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()

    from domaintok.tokenizer import DomainTokenizer

    tok = DomainTokenizer.from_pretrained(args.tokenizer)
    # RSS once everything is imported and loaded: what tokenize itself adds is measured against this
    after_import_mb = vm_hwm_mb()
    start = time.perf_counter()
    stats = tok.tokenize_to_parquet(args.input, args.output)
    seconds = time.perf_counter() - start
    print(json.dumps({"after_import_mb": after_import_mb, "peak_mb": vm_hwm_mb(), "seconds": seconds,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "events": stats["events"], "users": stats["users"]}))


if __name__ == "__main__":
    main()
