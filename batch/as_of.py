"""Prediction time as model input, and more training examples from earlier prediction times (`domaintok evaluate`).

A forecasting task asks, at a cutoff, what a user will do next; the aggregates measure recency against that cutoff,
while a sequence of events alone says when each event happened but not when the question is asked. Two options:

- the **as-of token**: the sequence gets, right after [BOS], the temporal field's gap token for the time from the
  user's newest event to the prediction time (the same log bins as the gap between two events, so the pretrained
  model already knows what it means). After [BOS], every position attends to it, so mean pooling carries it too;
  the window holds one token fewer to make room.
- **extra cutoffs**: train users seen again at cutoff - k * every_days (k = 1..K): their events before that time are
  the inputs, the events in [that time, + horizon) the label, every one of them before the real cutoff. Each such
  example is a user of its own, `<user>@<date>`, in the train split only; valid and test stay at the real cutoff.
  Without the as-of token a sequence model could not tell these examples' prediction times apart.
Pure numpy/Arrow; evaluate.py does the I/O.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domaintok.errors import DomaintokError

SEPARATOR = "@"


def extra_cutoffs(cutoff: dt.datetime, count: int, every_days: int, horizons: list[int]) -> list[dt.datetime]:
    """The earlier prediction times, newest first; each one's label window must close by the real cutoff."""
    if count < 0:
        raise DomaintokError(f"extra cutoffs: count must be >= 0, got {count}")
    if count and every_days < max(horizons, default=0):
        raise DomaintokError(f"extra cutoffs every {every_days} days: a label window of {max(horizons)} days would "
                             "read events after the real cutoff; give --extra-cutoff-days >= the longest horizon")
    return [cutoff - dt.timedelta(days=k * every_days) for k in range(1, count + 1)]


def tag(as_of: dt.datetime) -> str:
    return SEPARATOR + as_of.strftime("%Y-%m-%d")


def tagged_users(table: pa.Table, as_of: dt.datetime, column: str = "user_id") -> pa.Table:
    """`table` with every user id renamed `<user>@<date>`: an example of its own."""
    i = table.schema.get_field_index(column)
    ids = pc.binary_join_element_wise(table.column(i).cast(pa.string()), pa.scalar(tag(as_of)), "")
    return table.set_column(i, table.schema.field(i).with_type(pa.string()), ids)


def utc_us(local: dt.datetime, timezone: str) -> int:
    """A naive local time in `timezone` as UTC microseconds since the epoch."""
    aware = local.replace(tzinfo=ZoneInfo(timezone))
    return int(aware.timestamp() * 1_000_000)


def tokens_inserted(history: bool) -> int:
    """How many tokens `insert_as_of` puts after [BOS]: the as-of token, then the tenure and mean-gap history tokens
    when given `first_us`. A window must be this much shorter than the model's context."""
    return 3 if history else 1


def insert_as_of(table: pa.Table, as_of_us: np.ndarray, gap_token, first_us: np.ndarray | None = None) -> pa.Table:
    """Sequences (user_id, input_ids starting with [BOS], ..., n_events, last_event_ts) with the as-of token inserted
    after [BOS]; `as_of_us` (N,) the prediction time of each row (UTC us), `gap_token(gap_us) -> ids` the temporal
    field's gap token for each gap.

    With `first_us` (N,), the time of each row's first event ever (UTC us), two **history tokens** follow it, in the
    same gap bins: the tenure (prediction time - first event) and the mean time between the user's events over the
    whole history ((newest - first) / (n_events - 1), 0 for one event). They say what a window cut to its newest
    events hides and the aggregates see: how long and how often the user has been active.
    Rows must hold at most the model's context - `tokens_inserted(first_us is not None)` tokens to fit."""
    last = table.column("last_event_ts").cast(pa.int64()).to_numpy()
    as_of_us = np.asarray(as_of_us, np.int64)
    gap = as_of_us - last
    if np.any(gap < 0):
        raise DomaintokError("as-of token: an event after the prediction time reached the inputs")
    gaps = [gap]
    if first_us is not None:
        first_us = np.asarray(first_us, np.int64)
        if np.any(first_us > last):
            raise DomaintokError("history tokens: a user's first event is after its newest one")
        n_events = table.column("n_events").cast(pa.int64()).to_numpy()
        gaps += [as_of_us - first_us, (last - first_us) // np.maximum(n_events - 1, 1)]
    assert len(gaps) == tokens_inserted(first_us is not None)
    return insert_after_bos(table, np.stack([np.asarray(gap_token(g)) for g in gaps], axis=1))


def insert_after_bos(table: pa.Table, tokens: np.ndarray) -> pa.Table:
    """`table` with each row's `tokens` (N, k) inserted into its input_ids right after [BOS]."""
    lists = table.column("input_ids").combine_chunks()
    offsets = lists.offsets.to_numpy()
    values = lists.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    if np.any(lengths == 0):
        raise DomaintokError("as-of token: a user has an empty input_ids list")
    k = tokens.shape[1]
    out = np.empty(len(values) + k * len(lengths), values.dtype)
    new_offsets = offsets + k * np.arange(len(offsets))
    # each row: [BOS], the k tokens, the rest
    within = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    out[np.arange(len(values)) + k * np.repeat(np.arange(len(lengths)), lengths) + k * (within > 0)] = values
    for j in range(k):
        out[new_offsets[:-1] + 1 + j] = tokens[:, j]
    ids = pa.ListArray.from_arrays(pa.array(new_offsets.astype(np.int32)), pa.array(out))
    i = table.schema.get_field_index("input_ids")
    return table.set_column(i, table.schema.field(i), ids.cast(table.schema.field(i).type))


NO_GAP_TOKENS = "the schema has no temporal field with time_since_previous: true, whose gap tokens it uses"


def emits_gap_tokens(spec) -> bool:
    """Whether a schema field has the gap tokens the as-of and history tokens are made of."""
    return spec.type == "temporal" and bool(spec.typed_params().time_since_previous)


def gap_token_function(tokenizer):
    """`gap_us -> token ids` of the tokenizer's first field that emits gap tokens; an error when none does."""
    enc = next((enc for enc in tokenizer.encoders if emits_gap_tokens(enc.spec)), None)
    if enc is None:
        raise DomaintokError(f"as-of token: {NO_GAP_TOKENS}")
    first = enc.gap_first_id
    return lambda gap_us: first + enc.gap_bins(np.asarray(gap_us, np.int64))
