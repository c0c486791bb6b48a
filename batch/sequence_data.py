"""Streaming training data over sequences.parquet: a user-hash train/eval split, length bucketing, the LM collator.

Choice: an `IterableDataset` over parquet record batches (not a map-style dataset over memory-mapped Arrow).
It reads only the `user_id` and `input_ids` columns, one row group at a time, so memory stays flat whatever the
file size, needs no conversion step before training, and shards by rows across ranks and DataLoader workers. The
cost is no random access: shuffling is per epoch over row groups plus a bounded in-memory buffer, and the epoch's
length must be counted first (`count_sequences`, or per shard by `rank_batches`).

Bucketing instead of packing: packing users into one row would let one user's tokens attend to another's unless
every batch carried a block-diagonal mask, which rules out the flash kernel. Sorting a buffer of
`bucket_batches * batch_size` sequences by length and cutting it into batches keeps padding small (the measured
`padding_fraction` is reported in metrics.json) while batches stay pure causal attention.

Distributed training (torchrun / accelerate launch): each rank reads its own contiguous range of rows (`num_shards`,
`shard_index`; DataLoader workers split a rank's range further), fixed across epochs, shuffled within. Ranks hold
different numbers of items (the train/eval hash, windows per user), yet every rank must run the same number of
batches per epoch or the gradient all-reduce hangs: `plan_batches` gives every rank `ceil(items / global batch)`
batches, sized from the item counts of all shards, so each item is seen exactly once per epoch and the global batch is
the one asked for (the last ones may be smaller). `RankBatches` serves one rank's planned batches to a DataLoader.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from batch.sequence_files import REQUIRED_COLUMNS, SequenceFiles
from domaintok.models.padded import PaddedBatch
from domaintok.window import truncate_window

SPLITS = ("train", "eval", "all")
WINDOWS = ("newest", "all")
_HASH_BUCKETS = 10_000


def is_eval_user(user_id: str, eval_fraction: float) -> bool:
    """Stable split by user (crc32 of the id), so a user's events never sit on both sides of it."""
    return zlib.crc32(user_id.encode("utf-8")) % _HASH_BUCKETS < eval_fraction * _HASH_BUCKETS


def event_windows(ids: np.ndarray, context_length: int, sep_token_id: int | None) -> list[np.ndarray]:
    """A user's whole sequence cut into windows of at most `context_length` tokens, newest first, each [BOS] + whole
    events: the first is what `domaintok.window.truncate_window` keeps, the next the newest whole events before
    it, and so on.

    An event longer than a window on its own is cut into token pieces (pretraining loses no token; the window
    rule would keep [BOS] alone there); without a [SEP] token, windows are cut at token boundaries.
    """
    if len(ids) <= context_length:
        return [ids]
    bos, tail = ids[:1], ids[1:]
    budget = context_length - 1
    starts = np.flatnonzero(tail == sep_token_id) + 1 if sep_token_id is not None else np.zeros(0, np.int64)
    starts = np.concatenate([[0], starts[starts < len(tail)]])  # where each event begins in `tail`
    out: list[np.ndarray] = []
    end = len(tail)
    while end > 0:
        lo = end - budget
        # the earliest event start inside the window; when none fits (one event longer than a window), cut mid-event
        i = int(np.searchsorted(starts, max(lo, 0)))
        start = int(starts[i]) if i < len(starts) and starts[i] < end else max(lo, 0)
        out.append(np.concatenate([bos, tail[start:end]]))
        end = start
    return out


def length_summary(path: str | Path, context_length: int) -> dict[str, float]:
    """How a context of `context_length` tokens cuts the sequences in `path`: the median sequence length, the
    share of users longer than the context and the share of tokens beyond it (reads only the list offsets)."""
    parquet = open_sequences(path)
    lengths = [
        np.diff(batch.column(0).offsets.to_numpy())
        for batch in parquet.iter_batches(columns=["input_ids"], batch_size=65_536)
    ]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if not lengths.size:
        return {"median_tokens": 0.0, "users_truncated_fraction": 0.0, "tokens_cut_fraction": 0.0}
    return {
        "median_tokens": float(np.median(lengths)),
        "users_truncated_fraction": float((lengths > context_length).mean()),
        "tokens_cut_fraction": float(np.clip(lengths - context_length, 0, None).sum() / lengths.sum()),
    }


def context_warning(job: str, context_length: int, summary: dict[str, float]) -> str | None:
    """One line when the context is shorter than the median user's sequence, saying how much it cuts."""
    if summary["median_tokens"] <= context_length:
        return None
    return (
        f"{job}: warning: the {context_length:,}-token context is shorter than the median user's sequence "
        f"({summary['median_tokens']:,.0f} tokens): {summary['users_truncated_fraction']:.0%} of users keep only "
        f"their newest events, {summary['tokens_cut_fraction']:.0%} of tokens are left out"
    )


def count_sequences(path: str | Path, split: str = "all", eval_fraction: float = 0.0, *, windows: str = "newest",
                    context_length: int | None = None, sep_token_id: int | None = None) -> int:
    """Training items of `path` in `split`, to size the training schedule: rows (reads only the user_id column),
    or with windows="all" the windows of `context_length` tokens that `event_windows` cuts."""
    parquet = open_sequences(path)
    if windows == "all":
        if context_length is None:
            raise ValueError("windows='all' needs context_length")
        # the dataset's own reading loop (split by user, windows cut by event_windows), without batching
        items = SequenceDataset(path=path, batch_size=1, context_length=context_length, sep_token_id=sep_token_id,
                                split=split, eval_fraction=eval_fraction, shuffle=False, windows="all")
        return sum(1 for _ in items._read())
    if split == "all" or eval_fraction <= 0.0:
        return parquet.num_rows if split != "eval" else 0
    want_eval = split == "eval"
    total = 0
    for batch in parquet.iter_batches(columns=["user_id"], batch_size=65_536):
        total += sum(is_eval_user(u, eval_fraction) == want_eval for u in batch.column(0).to_pylist())
    return total


def open_sequences(path: str | Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> SequenceFiles:
    """The sequences (a parquet file or a directory of them), after checking they have the columns a job needs."""
    return SequenceFiles(path, required)


@dataclass
class StreamStats:
    """What a dataset has yielded so far: sequences, real tokens, and (B, T) slots once padded into batches."""

    sequences: int = 0
    tokens: int = 0
    padded_slots: int = 0
    truncated: int = 0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.padded_slots if self.padded_slots else 0.0


@dataclass
class SequenceDataset(IterableDataset):
    """Yields {"input_ids": int64 array} per user from sequences.parquet, in length-bucketed order.

    Consecutive runs of `batch_size` items have similar lengths, so a DataLoader with the same batch size pads
    little. `split` picks train or eval users by hash (`eval_fraction` of users go to eval); `max_sequences`
    caps a split (e.g. a cheap eval). Sequences shorter than two tokens (nothing to predict) are skipped.
    `windows`: "newest" keeps each user's newest whole events that fit the context (one item per user, what
    `embed` sees); "all" cuts the whole history into context-sized windows of whole events (`event_windows`),
    so pretraining reads every event instead of each user's last window again and again.
    """

    path: str | Path
    batch_size: int
    context_length: int
    sep_token_id: int | None = None
    split: str = "train"
    eval_fraction: float = 0.05
    shuffle: bool = True
    seed: int = 0
    bucket_batches: int = 64
    max_sequences: int | None = None
    read_batch_rows: int = 8_192
    windows: str = "newest"
    num_shards: int = 1
    shard_index: int = 0
    epoch: int = 0
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self):
        super().__init__()
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.batch_size <= 0 or self.context_length < 2:
            raise ValueError("batch_size must be positive and context_length at least 2")
        if self.windows not in WINDOWS:
            raise ValueError(f"windows must be one of {WINDOWS}, got {self.windows!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        open_sequences(self.path)  # fail at construction, not inside a DataLoader worker

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch: reshuffles row groups and buckets deterministically."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.iter_batches():
            yield from batch

    def iter_batches(self, sizes: list[int] | None = None) -> Iterator[list[dict[str, np.ndarray]]]:
        """The items in length-bucketed batches: of `batch_size` (the last one smaller), or exactly the planned
        `sizes` (`plan_batches`), in shuffled order either way; a plan that does not add up to the items raises."""
        rng = np.random.default_rng([self.seed, self.epoch])
        plan = None if sizes is None else deque(sizes)
        buffer: list[np.ndarray] = []
        capacity = self.bucket_batches * self.batch_size
        for ids in self._read():
            buffer.append(ids)
            if len(buffer) >= capacity:
                buffer = yield from self._drain(buffer, rng, plan, final=False)
        if buffer or plan:
            yield from self._drain(buffer, rng, plan, final=True)

    def count_items(self, worker: tuple[int, int] | None = None) -> int:
        """Items this shard (or DataLoader worker `(id, count)` of it) yields per epoch; leaves `stats` alone."""
        return sum(1 for _ in replace(self, stats=StreamStats())._read(worker))

    def _pieces(self, parquet: SequenceFiles, worker: tuple[int, int] | None) -> list[tuple[int, int, int]]:
        """(row group, first row, end row) of this reader's rows: shard `shard_index * workers + worker` of
        `num_shards * workers` contiguous, equal row ranges of the file, row groups in epoch-shuffled order."""
        if worker is None:
            info = get_worker_info()
            worker = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.num_shards * worker[1]
        shard = self.shard_index * worker[1] + worker[0]
        sizes = [parquet.row_group_rows(i) for i in range(parquet.num_row_groups)]
        total = sum(sizes)
        lo, hi = shard * total // shards, (shard + 1) * total // shards
        pieces, start = [], 0
        for group, rows in enumerate(sizes):  # the part of each row group inside [lo, hi), in row group offsets
            first, end = max(lo - start, 0), min(hi - start, rows)
            if first < end:
                pieces.append((group, first, end))
            start += rows
        if self.shuffle:
            order = np.arange(len(pieces))
            np.random.default_rng([self.seed, self.epoch, 1]).shuffle(order)
            pieces = [pieces[i] for i in order]
        return pieces

    def _read(self, worker: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
        parquet = open_sequences(self.path)
        pieces = self._pieces(parquet, worker)
        if self.split == "eval" and self.eval_fraction <= 0:
            return
        by_user = self.split != "all" and self.eval_fraction > 0
        yielded = 0
        for group, first, end in pieces:
            offset = 0  # of `batch` in its row group
            for batch in parquet.iter_batches(
                batch_size=self.read_batch_rows, row_groups=[group], columns=list(REQUIRED_COLUMNS)
            ):
                batch_end = offset + batch.num_rows
                if first > offset or end < batch_end:  # a shard boundary cuts this batch
                    batch = batch.slice(max(first - offset, 0), max(min(end, batch_end) - max(first, offset), 0))
                offset = batch_end
                if batch.num_rows == 0:
                    continue
                users = batch.column("user_id").to_pylist()
                lists = batch.column("input_ids")
                offsets = lists.offsets.to_numpy()
                values = lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
                for row, user in enumerate(users):
                    if by_user and is_eval_user(user, self.eval_fraction) != (self.split == "eval"):
                        continue
                    ids = values[offsets[row] : offsets[row + 1]]
                    if len(ids) < 2:
                        continue
                    if len(ids) <= self.context_length:
                        pieces_of_user = [ids]
                    elif self.windows == "all":
                        pieces_of_user = event_windows(ids, self.context_length, self.sep_token_id)
                    else:
                        pieces_of_user = [truncate_window(ids, self.context_length, self.sep_token_id)]
                        self.stats.truncated += 1
                    for piece in pieces_of_user:
                        if len(piece) < 2:
                            continue
                        yield piece
                        yielded += 1
                        if self.max_sequences is not None and yielded >= self.max_sequences:
                            return

    def _drain(self, buffer: list[np.ndarray], rng: np.random.Generator, plan: deque | None, final: bool):
        """Yield the buffer as length-sorted batches in random order; returns the items left for the next buffer
        (with a plan, those short of its next batch size)."""
        lengths = np.fromiter((len(s) for s in buffer), dtype=np.int64, count=len(buffer))
        if self.shuffle:
            # Random tie-breaking among equal lengths, then a random order of whole batches.
            order = np.lexsort((rng.random(len(buffer)), lengths))
        else:
            order = np.argsort(lengths, kind="stable")
        if plan is None:
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            rest = order[len(order) :]
        else:
            batches, start = [], 0
            while plan and start + plan[0] <= len(order):
                batches.append(order[start : start + plan[0]])
                start += plan.popleft()
            rest = order[start:]
            if final and (len(rest) or plan):
                raise RuntimeError(
                    f"{self.path}: the batch plan does not match the items read ({len(rest)} items left over, "
                    f"{len(plan)} planned batches unfilled): did the file change during training?"
                )
        if self.shuffle:
            # A random order of whole batches, but each size keeps its places: the smaller batches stay after the
            # full ones (the last steps of an epoch), so step j has the planned size on every rank at once.
            sizes = np.fromiter((len(b) for b in batches), dtype=np.int64, count=len(batches))
            for size in np.unique(sizes):
                at = np.flatnonzero(sizes == size)
                same = [batches[i] for i in at]
                for i, j in zip(at, rng.permutation(len(at))):
                    batches[i] = same[j]
        for rows in batches:
            self.stats.sequences += len(rows)
            self.stats.tokens += int(lengths[rows].sum())
            self.stats.padded_slots += int(lengths[rows].max()) * len(rows)
            yield [{"input_ids": buffer[row]} for row in rows]
        return [buffer[row] for row in rest]


def batch_sizes(items: int, batches: int, batch_size: int) -> list[int]:
    """Sizes of exactly `batches` batches holding `items` items: `batch_size` each while the later batches still get
    at least one item, more only where `items` exceeds `batches * batch_size`; full batches first, so a single shard
    gets the usual `batch_size, ..., batch_size, rest`."""
    if batches <= 0 or items < batches:
        raise ValueError(f"{items} items cannot fill {batches} batches of at least one item")
    sizes, left = [], items
    for j in range(batches):
        later = batches - j - 1
        size = max(min(batch_size, left - later), math.ceil(left / (later + 1)))
        sizes.append(size)
        left -= size
    return sizes


def plan_batches(counts: list[list[int]], global_batch: int) -> list[list[list[int]]]:
    """Batch sizes per rank and DataLoader worker from the item counts of every shard (`counts[rank][worker]`).

    Every rank runs `ceil(total / global_batch)` batches an epoch (split among its workers), each of about
    `global_batch / ranks` items, so a step of all ranks together trains on `global_batch` items (the last steps of
    an epoch may have fewer) and every item is used exactly once.
    """
    ranks = len(counts)
    if global_batch < ranks:
        raise ValueError(f"a global batch of {global_batch} cannot give each of {ranks} processes a sequence")
    steps = math.ceil(sum(map(sum, counts)) / global_batch)
    plan = []
    for rank, workers in enumerate(counts):
        per_rank = global_batch // ranks + (rank < global_batch % ranks)
        share = [steps // len(workers) + (w < steps % len(workers)) for w in range(len(workers))]
        if any(n < k for n, k in zip(workers, share)):
            raise ValueError(
                f"rank {rank} holds {sum(workers)} items for {steps} batches: fewer than one item per batch (too "
                "many processes or workers for this data, or a batch size too large)"
            )
        plan.append([batch_sizes(n, k, per_rank) if k else [] for n, k in zip(workers, share)])
    return plan


@dataclass
class RankBatches(IterableDataset):
    """One rank's planned batches (lists of items) for a DataLoader with `batch_size=None`: `len` is the number of
    batches per epoch, the same on every rank; `set_epoch` reshuffles. `sizes[w]` are DataLoader worker w's."""

    dataset: SequenceDataset
    sizes: list[list[int]]
    total_items: int = 0  # over every rank: the epoch's items

    def __post_init__(self):
        super().__init__()

    def __len__(self) -> int:
        return sum(len(s) for s in self.sizes)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict[str, np.ndarray]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.sizes):
            raise RuntimeError(f"planned for {len(self.sizes)} DataLoader worker(s), run with {workers}")
        yield from self.dataset.iter_batches(self.sizes[worker])


def rank_batches(dataset: SequenceDataset, global_batch: int, gather=None, num_workers: int = 0) -> RankBatches:
    """This rank's `RankBatches` over `dataset` (its shard set by `num_shards` / `shard_index`). Counts the shard's
    items (one read of the shard) and exchanges the counts through `gather` (a list from every rank, in rank order:
    e.g. torch.distributed.all_gather_object); `gather` may be None on one process."""
    workers = max(1, num_workers)
    local = [dataset.count_items((w, workers)) for w in range(workers)]
    counts = gather(local) if gather is not None else [local]
    if len(counts) != dataset.num_shards:
        raise ValueError(f"counts from {len(counts)} ranks for a dataset cut into {dataset.num_shards} shards")
    return RankBatches(dataset, plan_batches(counts, global_batch)[dataset.shard_index], sum(map(sum, counts)))


@dataclass
class CausalLMCollator:
    """Right-pads items into a PaddedBatch; labels are the ids with padding set to -100.

    No attention_mask is passed on: with right padding a causal query never attends to a later pad key, so the
    real positions (the only ones in the loss) are exact without it, and SDPA can use its flash kernel.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = PaddedBatch.from_sequences(
            [item["input_ids"] for item in items], self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of
        )
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)  # (B, T)
        return {"input_ids": batch.input_ids, "labels": labels}


__all__ = [
    "SequenceDataset",
    "CausalLMCollator",
    "RankBatches",
    "StreamStats",
    "batch_sizes",
    "context_warning",
    "count_sequences",
    "event_windows",
    "is_eval_user",
    "length_summary",
    "open_sequences",
    "plan_batches",
    "rank_batches",
]
