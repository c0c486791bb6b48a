"""Benchmark of ActionPiece (domaintok/actionpiece.py): training time on a realistic corpus of per-field event tokens,
and segmentation events/s, each against a trivial baseline measured in the same run on the same matrix (np.sort of
its rows) as a ratio. Times are CPU seconds of this process (time.process_time: one core, numpy single-threaded), so
other load on a shared machine inflates them less than wall-clock times.

The corpus mimics the finance schema's field tokens (sign, amount bucket, month, day of week, day of month, hour,
time-gap bucket, merchant category, channel, two merchant hash tokens, 0-5 description word tokens): merchants are
Zipf-distributed and carry their category, channel, words and typical amount/hour, so pairs co-occur as in real data.

With --online-retail it also fits the domain tokenizer on the Online Retail 2010-2011 file (../shared/data), takes
each customer line item's token ids (the [SEP]-separated events of `tokenize`), learns merges on 80% of the customers
and reports tokens per line item of the other 20% at several merge counts.

Run: .venv/bin/python benchmarks/bench_actionpiece.py [--train-events 200000] [--merges 2000] [--events 1000000]
     [--online-retail]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from domaintok.actionpiece import ActionPiece, EventMergeTrainer

RETAIL = Path(__file__).resolve().parents[2] / "shared" / "data" / "online_retail" / "online_retail_I_2010-2011.parquet"

# (field, number of tokens): each field gets its own id range, as the tokenizer lays out its vocabulary
FIELDS = [("sign", 2), ("amount", 21), ("month", 12), ("dow", 7), ("dom", 31), ("hour", 24), ("gap", 12),
          ("mcc", 24), ("channel", 3), ("merchant0", 64), ("merchant1", 64), ("words", 2000)]
MAX_WORDS = 5


def _offsets() -> dict[str, int]:
    out, first = {}, 1
    for name, size in FIELDS:
        out[name] = first
        first += size
    return out


def synthetic_events(n: int, seed: int = 0, n_merchants: int = 3000) -> tuple[np.ndarray, int]:
    """int32 (n, 11 + MAX_WORDS) per-field token ids (0: padding), and the vocabulary size (the merges' base)."""
    rng = np.random.default_rng(seed)
    off = _offsets()
    mcc = rng.integers(0, 24, n_merchants)
    channel = np.where(rng.random(n_merchants) < 0.3, 1, 0) + (rng.random(n_merchants) < 0.05)
    hashes = rng.integers(0, 64, (n_merchants, 2))
    n_words = rng.integers(1, MAX_WORDS + 1, n_merchants)
    words = np.minimum(rng.zipf(1.3, (n_merchants, MAX_WORDS)) - 1, 1999)
    amount_mid = np.clip(mcc % 17 + 2, 0, 20)
    hour_mid = rng.integers(7, 22, n_merchants)
    merchant = np.minimum(rng.zipf(1.2, n) - 1, n_merchants - 1)
    cols = [
        off["sign"] + (rng.random(n) < 0.1),
        off["amount"] + np.clip(amount_mid[merchant] + rng.integers(-2, 3, n), 0, 20),
        off["month"] + rng.integers(0, 12, n),
        off["dow"] + rng.integers(0, 7, n),
        off["dom"] + rng.integers(0, 31, n),
        off["hour"] + np.clip(hour_mid[merchant] + rng.integers(-2, 3, n), 0, 23),
        off["gap"] + np.minimum(rng.geometric(0.3, n) - 1, 11),
        off["mcc"] + mcc[merchant],
        off["channel"] + channel[merchant],
        off["merchant0"] + hashes[merchant, 0],
        off["merchant1"] + hashes[merchant, 1],
    ]
    mat = np.zeros((n, len(cols) + MAX_WORDS), np.int32)
    mat[:, : len(cols)] = np.stack(cols, axis=1)
    w = words[merchant]
    w = np.where(np.arange(MAX_WORDS)[None, :] < n_words[merchant][:, None], off["words"] + w, 0)
    w = np.sort(w, axis=1)  # a merchant's repeated word counts once: distinct ids within an event
    w[:, 1:][w[:, 1:] == w[:, :-1]] = 0
    mat[:, len(cols):] = w
    return mat, sum(size for _, size in FIELDS) + 1


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def small_batch_ms(model: ActionPiece, events: np.ndarray, n: int, budget_s: float = 0.5) -> float:
    """Mean CPU milliseconds to segment batches of n events (the online encoder's micro-batches)."""
    calls, t0 = 0, time.process_time()
    while time.process_time() - t0 < budget_s:
        model.segment(events[(calls * n) % (len(events) - n) :][:n])
        calls += 1
    return (time.process_time() - t0) / calls * 1e3


def retail_events() -> tuple[np.ndarray, np.ndarray, int, int]:
    """Online Retail line items as token id rows (customer order), events per customer, the vocabulary size, and
    how many repeated ids were dropped (a description's BPE pieces can repeat within a line item)."""
    from domaintok.offline import tokenize
    from domaintok.tokenizer import DomainTokenizer
    from domaintok.vocab import SEP_ID

    tok = DomainTokenizer.fit("online_retail", [RETAIL])
    rows, per_user, dropped = [], [], 0
    for ids in tokenize(tok, [RETAIL], max_length=10**7).column("input_ids").to_pylist():
        cut = [-1, *(n for n, i in enumerate(ids) if i == SEP_ID)]
        events = [[i for i in ids[s + 1 : e] if i > SEP_ID] for s, e in itertools.pairwise(cut)]
        events = [e for e in events if e]
        per_user.append(len(events))
        for event in events:
            kept = list(dict.fromkeys(event))
            dropped += len(event) - len(kept)
            rows.append(kept)
    mat = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for n, row in enumerate(rows):
        mat[n, : len(row)] = row
    return mat, np.array(per_user), tok.vocab_size, dropped


def retail(steps: tuple[int, ...] = (500, 1000, 2000, 4000)) -> dict:
    mat, per_user, base, dropped = retail_events()
    cut = int(per_user[: int(len(per_user) * 0.8)].sum())
    train, test = mat[:cut], mat[cut:]
    t0 = time.process_time()
    trainer = EventMergeTrainer(train, base=base)
    out = {"line_items": len(mat), "train": len(train), "test": len(test), "base": base, "repeated_ids_dropped": dropped,
           "test_tokens_per_item_before": round(float((test > 0).sum(axis=1).mean()), 2), "merges": []}
    for n in steps:
        model = trainer.train(n)
        lengths = model.segment(test)[1]
        out["merges"].append({"merges": model.n_merges, "train_s": round(time.process_time() - t0, 1),
                              "test_tokens_per_item": round(float(lengths.mean()), 2)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-events", type=int, default=200_000)
    ap.add_argument("--merges", type=int, default=2000)
    ap.add_argument("--events", type=int, default=1_000_000, help="events segmented per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--online-retail", action="store_true", help="also measure on the Online Retail line items")
    args = ap.parse_args()

    train, base = synthetic_events(args.train_events, seed=0)
    t0 = time.process_time()
    trainer = EventMergeTrainer(train, base=base)
    t_build = time.process_time() - t0
    model = trainer.train(args.merges)
    t_train = time.process_time() - t0
    t_sort_train = _best(lambda: np.sort(train, axis=1), args.repeats)

    events, _ = synthetic_events(args.events, seed=1)
    _, lengths = model.segment(events)
    t_seg = _best(lambda: model.segment(events), args.repeats)
    t_sort = _best(lambda: np.sort(events, axis=1), args.repeats)
    spr_n = min(args.events, 100_000)
    rng = np.random.default_rng(0)
    t_spr = _best(lambda: model.segment_spr(events[:spr_n], rng), args.repeats)
    before = (events != 0).sum(axis=1)
    report = {
        "train_events": args.train_events, "width": int(train.shape[1]), "merges": model.n_merges,
        "train_s": round(t_train, 2), "train_build_s": round(t_build, 2),
        "train_ratio_vs_np_sort": round(t_train / t_sort_train),
        "segment_events": args.events, "segment_s": round(t_seg, 3),
        "segment_events_per_s": round(args.events / t_seg),
        "np_sort_events_per_s": round(args.events / t_sort),
        "segment_ratio_vs_np_sort": round(t_seg / t_sort, 1),
        "spr_events_per_s": round(spr_n / t_spr),
        "tokens_per_event_before": round(float(before.mean()), 2),
        "tokens_per_event_after": round(float(lengths.mean()), 2),
        "tokens_per_event_spr": round(float(model.segment_spr(events[:spr_n], rng)[1].mean()), 2),
        "batch_of_1_ms": round(small_batch_ms(model, events, 1), 3),
        "batch_of_64_ms": round(small_batch_ms(model, events, 64), 3),
    }
    if args.online_retail:
        report["online_retail"] = retail()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
