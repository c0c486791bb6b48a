"""The online path replayed without Kafka: a toy table's events sent in event-time order through
`encode_event_tokens` in micro-batches (users interleaved), each user's newest event carried over as the stream's
window does (PreviousEvent); the per-user result must equal `tokenize()` of the same table."""

from __future__ import annotations

import numpy as np

from domaintok.context import PreviousEvent
from domaintok.tokenizer import BOS_ID


def assert_online_equals_offline(tok, table, batches: int, seed: int = 0) -> None:
    seq = tok.tokenize(table)
    rows = [r for r in table.to_pylist() if r["user"] is not None and r["cat"] != "drop"]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["ts"], i))  # event-time order, ties by input order
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, len(order)), size=batches - 1, replace=False))
    previous: dict[str, PreviousEvent] = {}
    per_user: dict[str, list[int]] = {}
    for part in np.split(np.array(order), cuts):
        batch = [rows[i] for i in part]
        et = tok.encode_event_tokens(batch, previous)
        assert et.errors == [None] * len(batch)
        for k, r in enumerate(batch):
            per_user.setdefault(r["user"], []).extend(et.event(k).tolist())
            previous[r["user"]] = PreviousEvent(int(et.event_ts[k]), et.context[k].tolist())
    for user, ids in zip(seq.column("user_id").to_pylist(), seq.column("input_ids").to_pylist()):
        assert [BOS_ID, *per_user[user]] == ids
