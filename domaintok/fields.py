"""Field encoders, one per field type: fit a small state with DuckDB, then encode whole Arrow columns to token ids.

`encode_padded` gives an (n, width) int32 block per field, global ids left-aligned in each row and 0 ([PAD], never a
field token) in unused cells; `encode` gives the same ids as a ragged pair (counts int64[n], ids int32[sum(counts)]).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domaintok.schema import FieldSpec

Ragged = tuple[np.ndarray, np.ndarray]  # counts int64[n], ids int32[counts.sum()]

# Gap to the user's previous event, in seconds: bin k holds gaps < GAP_EDGES_S[k] (log-spaced, 1 min .. 1 year).
GAP_EDGES_S = np.array([60, 600, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400, 90 * 86400, 365 * 86400])


def _fixed(ids2d: np.ndarray, valid: np.ndarray | None = None) -> Ragged:
    """Ragged form of an (n, w) id matrix; where `valid` (n, w) is given only those cells are kept (row-major)."""
    n, w = ids2d.shape
    if valid is None:
        return np.full(n, w, dtype=np.int64), ids2d.astype(np.int32, copy=False).ravel()
    return valid.sum(axis=1).astype(np.int64), ids2d[valid].astype(np.int32, copy=False)


def padded_to_ragged(block: np.ndarray) -> Ragged:
    """Ragged form of a padded (n, w) block: the nonzero cells of each row, in row-major order."""
    nonzero = block != 0
    return nonzero.sum(axis=1).astype(np.int64), block[nonzero].astype(np.int32, copy=False)


def ragged_to_padded(counts: np.ndarray, ids: np.ndarray, width: int) -> np.ndarray:
    """Padded (n, width) int32 block of a ragged pair whose counts are all <= width."""
    n = len(counts)
    out = np.zeros((n, width), np.int32)
    if n and len(ids) == n * width:  # every row full: a reshape, no index arithmetic
        out[:] = ids.reshape(n, width)
        return out
    row_start = np.cumsum(counts) - counts
    within = np.arange(len(ids), dtype=np.int64) - np.repeat(row_start, counts)
    out[np.repeat(np.arange(n), counts), within] = ids
    return out


def _as_array(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _floats(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """float64[n] with nulls as NaN."""
    arr = _as_array(col)
    if not pa.types.is_float64(arr.type):
        arr = arr.cast(pa.float64())
    return arr.fill_null(np.nan).to_numpy(zero_copy_only=False)


def _strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = _as_array(col)
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def ragged_gather(lengths: np.ndarray, flat: np.ndarray, index: np.ndarray) -> Ragged:
    """Rows `index` of a ragged array given as (lengths[m], flat): returns (lengths[index], their ids concatenated)."""
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    counts = lengths[index].astype(np.int64)
    total = int(counts.sum())
    out_starts = np.cumsum(counts) - counts
    # position of each output element inside its row, then shifted to the row's start in `flat`
    within = np.arange(total, dtype=np.int64) - np.repeat(out_starts, counts)
    return counts, flat[np.repeat(starts[index], counts) + within]


def stable_hash64(values: pa.Array) -> np.ndarray:
    """FNV-1a 64 over the UTF-8 bytes, then the splitmix64 finalizer: uint64[n], identical in every process and version.

    Vectorized over byte positions (strings sorted by length so each step touches only strings that long); nulls hash
    like the empty string (callers mask them).
    """
    arr = _strings(values)
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + n + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    sorted_len = lengths[order]
    starts = offsets[:-1][order]
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    max_len = int(sorted_len[0]) if n else 0
    ascending = sorted_len[::-1]
    for j in range(max_len):
        k = n - int(np.searchsorted(ascending, j, side="right"))  # strings longer than j come first
        h[:k] ^= data[starts[:k] + j].astype(np.uint64)
        h[:k] *= prime
    # splitmix64 finalizer: FNV's low bits mix poorly, and tokens take bit slices
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    out = np.empty(n, dtype=np.uint64)
    out[order] = h
    return out


class FieldEncoder:
    """Base: a field spec, its typed params, its fitted state and its first token id `base` (0 until the vocabulary
    layout places it: `placed` returns the encoder at its ids, so an encoder's ids never change under it)."""

    def __init__(self, spec: FieldSpec, state: dict[str, Any] | None = None, *, base: int = 0):
        self.spec = spec
        self.params = spec.typed_params()
        self.prefix = spec.name.upper()
        self.base = int(base)
        self.state: dict[str, Any] = dict(state or {})

    def placed(self, base: int, **shared: Any) -> FieldEncoder:
        """This fitted encoder with its tokens from `base` on; `shared` holds the schema-wide pieces some encoders
        use (the text fields' BPE)."""
        return type(self)(self.spec, self.state, base=base)

    def fit(self, con, view: str, col: str) -> None:  # noqa: D102 - data-free encoders have nothing to fit
        self.state = {}

    def suffixes(self) -> list[str]:
        raise NotImplementedError

    def token_names(self) -> list[str]:
        return [f"[{self.prefix}_{s}]" for s in self.suffixes()]

    @property
    def n_tokens(self) -> int:
        return len(self.suffixes())

    @property
    def max_tokens_per_event(self) -> int:
        return 1

    @property
    def width(self) -> int:
        """Columns of the padded block: the most tokens one event can get (a null still gets its NULL token)."""
        return max(1, self.max_tokens_per_event)

    def encode(self, col: pa.Array | pa.ChunkedArray) -> Ragged:
        raise NotImplementedError

    def encode_padded(self, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n, width) int32 ids, 0 in unused cells: the tokenizer lays the fields side by side without index math."""
        counts, ids = self.encode(col)
        return ragged_to_padded(counts, ids, self.width)


class SignEncoder(FieldEncoder):
    """[F_NULL] [F_POS] [F_NEG] [F_ZERO]: NaN/null -> NULL, +/-0 -> ZERO, +inf -> POS, -inf -> NEG."""

    def suffixes(self):
        return ["NULL", "POS", "NEG", "ZERO"]

    def encode(self, col):
        x = _floats(col)
        local = np.where(np.isnan(x), 0, np.where(x > 0, 1, np.where(x < 0, 2, 3)))
        return _fixed((local + self.base)[:, None])


class ContinuousEncoder(FieldEncoder):
    """[F_NULL] then [F_00]..[F_{n-1}]: quantile bins of |x|; zero falls in bin 0, +/-inf in the top bin, NaN -> NULL."""

    def fit(self, con, view, col):
        n = self.params.n_bins
        qs = [i / n for i in range(1, n)]
        row = con.execute(
            f'SELECT quantile_cont(abs("{col}"), $qs) FROM {view} WHERE isfinite("{col}")', {"qs": qs}
        ).fetchall()[0]
        edges = row[0] if row and row[0] is not None else [0.0] * (n - 1)
        self.state = {"edges": [float(e) for e in edges]}

    def suffixes(self):
        return ["NULL", *(f"{i:02d}" for i in range(self.params.n_bins))]

    def encode(self, col):
        x = np.abs(_floats(col))
        edges = np.asarray(self.state["edges"], dtype=np.float64)
        # side="right": a value equal to an edge goes to the bin above it, so zero (<= every edge) is bin 0 only
        # when the first edge is > 0; NaN sorts last in searchsorted and is overwritten by NULL below.
        bins = np.searchsorted(edges, x, side="right")
        local = np.where(np.isnan(x), 0, bins + 1)
        return _fixed((local + self.base)[:, None])


class DiscreteEncoder(FieldEncoder):
    """[F_NULL] [F_NEG] [F_OVER] [F_0]..[F_max]: integers (truncated toward zero); negatives -> NEG or their magnitude."""

    def suffixes(self):
        return ["NULL", "NEG", "OVER", *(str(i) for i in range(self.params.max_value + 1))]

    def encode(self, col):
        x = _floats(col)
        if self.params.negatives == "abs":
            x = np.abs(x)
        finite = np.isfinite(x)
        v = np.trunc(np.where(finite, x, 0.0))
        local = np.where(v > self.params.max_value, 2, np.where(v < 0, 1, v + 3))
        local = np.where(np.isnan(x), 0, np.where(np.isposinf(x), 2, np.where(np.isneginf(x), 1, local)))
        return _fixed((local.astype(np.int64) + self.base)[:, None])


class CategoricalEncoder(FieldEncoder):
    """[F_NULL] [F_UNK] then one token per fitted value (most frequent first, ties by value)."""

    def fit(self, con, view, col):
        rows = con.execute(
            f'SELECT "{col}", count(*) AS c FROM {view} WHERE "{col}" IS NOT NULL GROUP BY "{col}" '
            f'HAVING count(*) >= $minf ORDER BY c DESC, "{col}" LIMIT $maxn',
            {"minf": self.params.min_frequency, "maxn": self.params.max_size},
        ).fetchall()
        self.state = {"values": [r[0] for r in rows]}
        self._value_set = None

    def suffixes(self):
        width = max(3, len(str(len(self.state.get("values", [])))))
        return ["NULL", "UNK", *(f"{i:0{width}d}" for i in range(len(self.state.get("values", []))))]

    def encode(self, col):
        arr = _strings(col)
        if getattr(self, "_value_set", None) is None:
            self._value_set = pa.array(self.state["values"], type=pa.string())
        idx = pc.index_in(arr, value_set=self._value_set)
        local = idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 2
        local = np.where(local == 1, 1, local)  # unseen value -> UNK (index -1 + 2)
        if arr.null_count:
            local = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, local)
        return _fixed((local + self.base)[:, None])


class EntityEncoder(FieldEncoder):
    """High-cardinality ids (products, merchants). `ids: hashed`: [F_NULL] then n_tokens groups of `buckets` tokens
    [F_j_b], token j of a value being bits 16j..16j+15 of its hash mod buckets. `ids: semantic`: [F_NULL], then per
    level the codes [F_L{l}_ccc] and the disambiguation digits [F_D_dd] of the value's semantic ID
    (domaintok/semantic_ids.py), fitted on the items' content text and/or their co-occurrence in users' histories."""

    def __init__(self, spec, state=None, *, base=0):
        super().__init__(spec, state, base=base)
        self._semantic = None  # SemanticIds, built from the state on first use

    @property
    def semantic(self):
        if self._semantic is None:
            from domaintok.semantic_ids import SemanticIds

            self._semantic = SemanticIds.from_dict(self.state["semantic"])
        return self._semantic

    def fit(self, con, view, col):
        if self.params.ids != "semantic":
            self.state = {}
            return
        from domaintok.semantic_ids import SemanticIdParams, fit_semantic_ids, item_sequences

        params = msgspec.convert(self.params.semantic, SemanticIdParams)
        has_text = self.params.content is not None
        value = f'"{col}".value' if has_text else f'"{col}"'
        if has_text:  # each item once, with its most frequent non-null text (ties: the smallest text)
            items = con.sql(
                f'SELECT v, first(t ORDER BY t IS NULL, c DESC, t) AS t FROM (SELECT {value} AS v, "{col}".text AS t, '
                f"count(*) AS c FROM {view} WHERE {value} IS NOT NULL GROUP BY ALL) GROUP BY v ORDER BY v"
            ).to_arrow_table()
        else:
            items = con.sql(f"SELECT DISTINCT {value} AS v FROM {view} WHERE {value} IS NOT NULL ORDER BY v").to_arrow_table()
        sequences = None
        if params.source != "content":
            events = con.sql(f"SELECT __user, __ts, {value} AS v FROM {view} ORDER BY __user, __ts, __input, __row")
            events = events.to_arrow_table()
            sequences = item_sequences(items.column("v"), events.column("v"), events.column("__user"))
        texts = items.column("t") if has_text else None
        self.state = {"semantic": fit_semantic_ids(items.column("v"), texts, sequences, params).to_dict()}
        self._semantic = None

    def _layout(self) -> tuple[list[int], int]:
        """Codes per level then digits (the ID's positions), and the width of a level's code in token names."""
        sizes = self.semantic.vocab_sizes
        return sizes, len(str(max(sizes) - 1))

    def suffixes(self):
        if self.params.ids != "semantic":
            b, k = self.params.buckets, self.params.n_tokens
            width = len(str(b - 1))
            return ["NULL", *(f"{j}_{i:0{width}d}" for j in range(k) for i in range(b))]
        sizes, width = self._layout()
        out = ["NULL"]
        for level, size in enumerate(sizes[:-1]):
            out += [f"L{level}_{c:0{width}d}" for c in range(size)]
        return out + [f"D_{d:0{width}d}" for d in range(sizes[-1])]

    @property
    def max_tokens_per_event(self):
        if self.params.ids == "semantic":
            return len(self.semantic.vocab_sizes)
        return self.params.n_tokens

    def encode(self, col):
        return padded_to_ragged(self.encode_padded(col))

    def encode_padded(self, col):
        if self.params.ids == "semantic":
            return self._encode_semantic(_as_array(col))
        arr = _strings(col)
        b, k = self.params.buckets, self.params.n_tokens
        # hash each distinct value of the batch once
        enc = arr.dictionary_encode()
        m = len(enc.dictionary)
        h = np.append(stable_hash64(enc.dictionary), np.uint64(0))  # row m stands for null (masked below)
        idx = enc.indices.fill_null(m).to_numpy(zero_copy_only=False).astype(np.int64)
        shifts = np.arange(k, dtype=np.uint64) * np.uint64(16)
        parts = ((h[:, None] >> shifts[None, :]) & np.uint64(0xFFFF)) % np.uint64(b)  # (m, k)
        # ids of each distinct value first (m + 1 rows, the last one null: [NULL, 0, ...]), then one row gather
        table = (parts.astype(np.int64) + 1 + np.arange(k) * b + self.base).astype(np.int32)
        table[m, 0], table[m, 1:] = self.base, 0
        return table[idx]

    def _encode_semantic(self, arr: pa.Array) -> np.ndarray:
        """Each value's semantic ID as token ids (seen items: their fitted ID; unseen ones: from their text when the
        field has `content`, else hashed); a null value is the single [F_NULL]."""
        if pa.types.is_struct(arr.type):
            values, texts = arr.field("value"), arr.field("text")
            if arr.null_count:
                values = pc.if_else(arr.is_valid(), values, pa.nulls(len(arr), values.type))
        else:
            values, texts = _strings(arr), None
        ids = self.semantic.ids_for(values, texts)  # (n, levels + 1), -1 rows for nulls
        sizes = np.asarray(self.semantic.vocab_sizes, np.int64)
        offsets = self.base + 1 + np.concatenate([[0], np.cumsum(sizes[:-1])])
        out = (ids + offsets[None, :]).astype(np.int32)
        null = ids[:, 0] < 0
        out[null] = 0
        out[null, 0] = self.base
        return out


class TemporalEncoder(FieldEncoder):
    """[F_NULL], calendar part tokens in the schema timezone ([F_MON_01].., [F_DOW_0] Monday.., [F_DOM_01]..,
    [F_HOUR_00].., [F_Q1].., [F_YEAR_BEFORE] [F_YEAR_yyyy].. [F_YEAR_AFTER]), then [F_GAP_FIRST] [F_GAP_00]..[F_GAP_10]."""

    def fit(self, con, view, col):
        self.state = {}
        if "year" in self.params.parts:
            lo, hi = con.execute(f'SELECT min(year("{col}")), max(year("{col}")) FROM {view}').fetchall()[0]
            lo = int(lo) if lo is not None else 2000
            hi = int(hi) if hi is not None else lo
            self.state = {"year_min": lo, "year_max": hi}

    def _part_suffixes(self, part: str) -> list[str]:
        if part == "month":
            return [f"MON_{i:02d}" for i in range(1, 13)]
        if part == "dow":
            return [f"DOW_{i}" for i in range(7)]
        if part == "dom":
            return [f"DOM_{i:02d}" for i in range(1, 32)]
        if part == "hour":
            return [f"HOUR_{i:02d}" for i in range(24)]
        if part == "quarter":
            return [f"Q{i}" for i in range(1, 5)]
        years = range(self.state["year_min"], self.state["year_max"] + 1)
        return ["YEAR_BEFORE", *(f"YEAR_{y}" for y in years), "YEAR_AFTER"]

    def suffixes(self):
        out = ["NULL"]
        for part in self.params.parts:
            out += self._part_suffixes(part)
        if self.params.time_since_previous:
            out += ["GAP_FIRST", *(f"GAP_{i:02d}" for i in range(len(GAP_EDGES_S) + 1))]
        return out

    @property
    def max_tokens_per_event(self):
        return len(self.params.parts) + int(self.params.time_since_previous)

    @property
    def calendar_ids(self) -> list[tuple[str, int]]:
        """(part, id of its first token) per calendar part, in the schema's order: the columns the context step
        (domaintok/context.py) compares with the previous event when `only_changes` is set."""
        out, first = [], self.base + 1
        for part in self.params.parts:
            out.append((part, first))
            first += len(self._part_suffixes(part))
        return out

    @property
    def gap_first_id(self) -> int:
        """Id of [F_GAP_FIRST]; the gap tokens follow it in bin order (`gap_bins`)."""
        return self.base + 1 + sum(len(self._part_suffixes(p)) for p in self.params.parts)

    @staticmethod
    def gap_bins(gap_us: np.ndarray) -> np.ndarray:
        """Local gap token: 0 ([F_GAP_FIRST]) for gap < 0 (the user's first event), else 1 + log bin."""
        bins = np.searchsorted(GAP_EDGES_S * 1_000_000, gap_us, side="right") + 1
        return np.where(gap_us < 0, 0, bins)

    def encode(self, col):
        return padded_to_ragged(self.encode_padded(col))

    def encode_padded(self, col):
        arr = _as_array(col)
        n = len(arr)
        parts = calendar_parts(arr, self.params.parts)
        cols = []
        offset = self.base + 1
        for part in self.params.parts:
            local = parts[part]
            if part == "year":
                lo, hi = self.state["year_min"], self.state["year_max"]
                local = np.clip(local - lo + 1, 0, hi - lo + 2)
            cols.append(local + offset)
            offset += len(self._part_suffixes(part))
        # the time-since-previous cell (the last column) stays empty: it depends on the previous event, so the
        # context step fills it once the events are in order (domaintok/context.py)
        out = np.zeros((n, self.width), np.int32)
        for j, c in enumerate(cols):
            out[:, j] = c
        if arr.null_count:
            null = arr.is_null().to_numpy(zero_copy_only=False)
            out[null] = 0
            out[null, 0] = self.base  # a null time is the single [F_NULL] token
        return out


def calendar_parts(arr: pa.Array, parts: list[str]) -> dict[str, np.ndarray]:
    """Calendar parts (0-based month/dom/quarter, Monday=0 dow, hour, year) of timestamps as int64 arrays, read in the
    array's own timezone: one tz conversion (pyarrow), then integer arithmetic (days-to-civil, H. Hinnant)."""
    if arr.type.tz is not None:
        arr = pc.local_timestamp(arr)  # wall-clock time in the array's timezone, DST applied
    us = arr.cast(pa.timestamp("us")).fill_null(0).view(pa.int64()).to_numpy(zero_copy_only=False)
    days = us // 86_400_000_000
    out = {}
    if "hour" in parts:
        out["hour"] = (us // 3_600_000_000) % 24
    if not {"dow", "month", "dom", "quarter", "year"} & set(parts):
        return out
    # the date parts of each day in the batch's span, computed once per day, then gathered per event
    first = int(days.min()) if len(days) else 0
    span = int(days.max()) - first + 1 if len(days) else 0
    if span > 4 * len(days) + 1024:  # scattered far-apart dates: per event is cheaper
        return {**out, **_date_parts(days, parts)}
    offset = days - first
    for part, table in _date_parts(np.arange(first, first + span, dtype=np.int64), parts).items():
        if part in parts:
            out[part] = table[offset]
    return out


def _date_parts(days: np.ndarray, parts: list[str]) -> dict[str, np.ndarray]:
    """dow, month, dom, quarter, year of days since 1970-01-01 (integer days-to-civil, H. Hinnant)."""
    out = {}
    if "dow" in parts:
        out["dow"] = (days + 3) % 7  # 1970-01-01 was a Thursday
    if {"month", "dom", "quarter", "year"} & set(parts):
        z = days + 719468
        era = z // 146097
        doe = z - era * 146097
        yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
        doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
        mp = (5 * doy + 2) // 153
        month = np.where(mp < 10, mp + 3, mp - 9)  # 1..12
        out["month"] = month - 1
        out["dom"] = doy - (153 * mp + 2) // 5  # 0-based day of month
        out["quarter"] = (month - 1) // 3
        out["year"] = yoe + era * 400 + (month <= 2)
    return out


# A text whose only whitespace is single spaces between chunks (anything the pre-tokenizer's Unicode \s could match,
# and zero-width look-alikes, count as other whitespace): see TextEncoder._pieces.
_NOT_SPACE = r"[^\s\x{0B}\x{85}\p{Z}\x{180E}\x{200B}-\x{200D}\x{2060}\x{FEFF}]"
_CHUNKED_TEXT = f"^{_NOT_SPACE}+(?: {_NOT_SPACE}+)*$"


class TextEncoder(FieldEncoder):
    """[F_NULL] for null/blank text; otherwise the shared byte-level BPE pieces of the trimmed text, first max_tokens."""

    def __init__(self, spec, state=None, *, base=0, bpe=None, bpe_base=0):
        super().__init__(spec, state, base=base)
        self.bpe = bpe  # tokenizers.Tokenizer shared by the schema's text fields
        self.bpe_base = bpe_base  # global id of BPE piece 0

    def placed(self, base, *, bpe=None, bpe_base=0, **_):
        return TextEncoder(self.spec, self.state, base=base, bpe=bpe, bpe_base=bpe_base)

    def fit(self, con, view, col):
        self.state = {}

    def suffixes(self):
        return ["NULL"]

    @property
    def max_tokens_per_event(self):
        return self.params.max_tokens

    def normalize(self, col) -> pa.Array:
        arr = pc.utf8_trim_whitespace(_strings(col))
        return pc.utf8_lower(arr) if self.params.lowercase else arr

    CACHE_LIMIT = 200_000  # distinct texts remembered across batches (reset when full)

    def _bpe_whole(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """BPE (Rust, batched) of each text -> (lengths int64[m], flat global piece ids), first max_tokens each."""
        encode_batch = getattr(self.bpe, "encode_batch_fast", self.bpe.encode_batch)
        pieces = [e.ids[: self.params.max_tokens] for e in encode_batch(texts, add_special_tokens=False)] if texts else []
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        flat = np.fromiter((i for p in pieces for i in p), dtype=np.int64, count=int(lengths.sum()))
        return lengths, (flat + self.bpe_base).astype(np.int32)

    def _pieces(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """BPE of distinct texts -> (lengths int64[m], flat global piece ids), first max_tokens each.

        The byte-level pre-tokenizer never lets a piece cross a single space (that space opens the next chunk's first
        piece, exactly as add_prefix_space opens a text's), so a text whose only whitespace is single spaces encodes
        as its space-separated chunks encoded alone, one after the other. Texts share most of their words, so those
        texts cost one BPE call per distinct word instead of per distinct text (the regex pre-tokenizer dominated).
        Any other text (double spaces, tabs, exotic whitespace) is encoded whole.
        """
        m = len(texts)
        chunked = np.zeros(m, bool)
        if m and self._chunkable():
            chunked = pc.match_substring_regex(texts, _CHUNKED_TEXT).fill_null(False).to_numpy(zero_copy_only=False)
        rows = [np.flatnonzero(~chunked), np.flatnonzero(chunked)]
        whole = self._bpe_whole(texts.take(pa.array(rows[0], pa.int64())).to_pylist())
        by_chunk = self._bpe_chunks(texts.take(pa.array(rows[1], pa.int64())))
        lengths = np.concatenate([whole[0], by_chunk[0]])
        flat = np.concatenate([whole[1], by_chunk[1]])
        back = np.empty(m, np.int64)
        back[np.concatenate(rows)] = np.arange(m)  # back into input order
        return ragged_gather(lengths, flat, back)

    def _bpe_chunks(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Pieces of texts made of chunks joined by single spaces: each distinct chunk encoded once, alone."""
        m, cap = len(texts), self.params.max_tokens
        if not m:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        chunks = pc.split_pattern(texts, " ")
        chunk_enc = chunks.flatten().dictionary_encode()
        c_lengths, c_flat = self._bpe_whole(chunk_enc.dictionary.to_pylist())
        counts, ids = ragged_gather(c_lengths, c_flat, chunk_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64))
        text_of_chunk = np.repeat(np.arange(m), np.diff(chunks.offsets.to_numpy(zero_copy_only=False)))
        text_of_piece = np.repeat(text_of_chunk, counts)
        total = np.bincount(text_of_piece, minlength=m)
        within = np.arange(len(ids)) - (np.cumsum(total) - total)[text_of_piece]
        return np.minimum(total, cap).astype(np.int64), ids[within < cap]

    def _chunkable(self) -> bool:
        """Whether the BPE is the byte-level one _pieces' chunk rule holds for (as fit trains it); checked once."""
        key = id(self.bpe)
        if getattr(self, "_chunkable_for", None) != key:
            import json

            cfg = json.loads(self.bpe.to_str())
            pre, model = cfg.get("pre_tokenizer") or {}, cfg.get("model") or {}
            self._chunkable_ok = (
                cfg.get("normalizer") is None
                and pre.get("type") == "ByteLevel"
                and bool(pre.get("add_prefix_space"))
                and pre.get("use_regex", True)
                and model.get("type") == "BPE"
                and model.get("dropout") is None
                and not model.get("continuing_subword_prefix")
                and not model.get("end_of_word_suffix")
            )
            self._chunkable_for = key
        return self._chunkable_ok

    def _lookup(self, distinct: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Pieces of each distinct text, from the cross-batch cache; only texts never seen are sent to the BPE."""
        cache = getattr(self, "_cache", None)
        if cache is None or len(cache[0]) + len(distinct) > self.CACHE_LIMIT:
            cache = self._cache = (pa.array([], pa.string()), np.zeros(0, np.int64), np.zeros(0, np.int32))
        known, k_lengths, k_flat = cache
        pos = pc.index_in(distinct, value_set=known).to_numpy(zero_copy_only=False)
        new = np.isnan(pos) if pos.dtype.kind == "f" else pos < 0
        if new.any():
            fresh = distinct.filter(pa.array(new))
            lengths, flat = self._pieces(fresh)
            known = pa.concat_arrays([known, fresh])
            k_lengths = np.concatenate([k_lengths, lengths])
            k_flat = np.concatenate([k_flat, flat])
            self._cache = (known, k_lengths, k_flat)
            pos = pc.index_in(distinct, value_set=known).to_numpy(zero_copy_only=False)
        return ragged_gather(k_lengths, k_flat, pos.astype(np.int64))

    def encode(self, col):
        return padded_to_ragged(self.encode_padded(col))

    def encode_padded(self, col):
        arr = self.normalize(col)
        enc = arr.dictionary_encode()  # BPE work is per distinct text, and cached across batches
        m = len(enc.dictionary)
        lengths, flat = self._lookup(enc.dictionary.cast(pa.string()))
        # one padded row per distinct text; blank texts and nulls (an extra row m) are the single NULL token
        table = ragged_to_padded(np.append(lengths, 0), flat, self.width)
        table[np.append(lengths, 0) == 0, 0] = self.base
        index = enc.indices.fill_null(m).to_numpy(zero_copy_only=False)
        return table[index]


ENCODERS: dict[str, type[FieldEncoder]] = {
    "sign": SignEncoder,
    "numerical_continuous": ContinuousEncoder,
    "numerical_discrete": DiscreteEncoder,
    "categorical_fixed": CategoricalEncoder,
    "categorical_entity": EntityEncoder,
    "temporal": TemporalEncoder,
    "text": TextEncoder,
}


def make_encoder(spec: FieldSpec, state: dict[str, Any] | None = None) -> FieldEncoder:
    """An encoder of the field's type, not yet placed in a vocabulary (base 0)."""
    return ENCODERS[spec.type](spec, state)
