"""Semantic IDs for entity values: item vectors from content text and/or co-occurrence, then residual k-means codes.

Fitting needs scipy/scikit-learn (truncated SVD, imported inside the fit); serving (`SemanticIds.ids_for`) needs only
numpy and pyarrow, reading the JSON-able state that `to_dict` / `to_json` save.

An ID is `levels` codes (coarse to fine) plus a disambiguation digit, int64[levels + 1]:
- a seen item (one of the fitted values) gets its stored ID, unique among the seen items;
- an unseen item with content text gets the level codes of the first seen item whose text is the same once
  normalized (lowercase words), else those of its content vector; its digit is a stable hash of its value;
- an unseen item without usable text (or any unseen item of a co-occurrence-only model) gets a fully hashed ID;
- a null value gets a row of `NULL_ID` (-1), for the caller to map to its NULL token.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domaintok.errors import DomaintokError
from domaintok.fields import stable_hash64

FORMAT = "domaintok.semantic_ids/1"
NULL_ID = -1
# Where an ID came from (`SemanticIds.ids_and_origin`).
ORIGIN_NULL, ORIGIN_SEEN, ORIGIN_CONTENT, ORIGIN_HASHED = -1, 0, 1, 2

Values = Sequence[str | None] | pa.Array | pa.ChunkedArray

_GOLDEN = 0x9E3779B97F4A7C15
_WORD_BREAK = r"[^\pL\pN]+"  # anything but a letter or digit separates words
_SPACE = 32
# Distances closer than this to the best one are recomputed exactly, so that an item's codes depend only on its own
# vector, never on BLAS blocking (batch size, threads): a text gets the same codes at fit time and when served alone.
_TIE_EPS = 1e-6
_CHUNK_ELEMENTS = 1 << 22  # elements of the largest temporary array (rows x codes, rows x buckets, ...)
_TEXT_BLOCK = 4096  # texts vectorized together


class SemanticIdParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every setting of a semantic ID fit; saved in the state so a loaded model knows how it was made.

    levels: codes per ID before the disambiguation digit (coarse to fine).
    codes: codebook size per level; a level gets fewer when there are fewer distinct vectors to split
        (fewer items than codes), so no code is ever dead.
    disambiguation: range of the final digit; more seen items than this sharing all level codes is an error.
    source: item vectors from "content" text, item "cooccurrence" in user sequences, or "both" concatenated.
    dims: SVD dimensions per part (capped by the data's rank).
    buckets: hashed n-gram buckets of the content vectorizer (the saved projection is buckets x dims float32).
    ngram_min, ngram_max: n-gram lengths, in UTF-8 bytes of lowercased, space-padded words (characters for ASCII).
    window: events after each event that count as co-occurring with it (pass baskets as sequences for baskets).
    content_weight: share of the squared norm given to the content part when source="both" (the rest: co-occurrence).
    iterations: Lloyd iterations per level at most (stops earlier when assignments settle).
    seed: seeds SVD and k-means; the same seed and data give byte-identical state.
    """

    levels: int = 3
    codes: int = 256
    disambiguation: int = 64
    source: Literal["content", "cooccurrence", "both"] = "both"
    dims: int = 32
    buckets: int = 4096
    ngram_min: int = 2
    ngram_max: int = 4
    window: int = 5
    content_weight: float = 0.5
    iterations: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [
            f"{name}={getattr(self, name)} must be >= {low}"
            for name, low in (("levels", 1), ("codes", 1), ("disambiguation", 1), ("dims", 1), ("buckets", 2),
                              ("window", 1), ("iterations", 1), ("seed", 0))
            if getattr(self, name) < low
        ]
        if not 1 <= self.ngram_min <= self.ngram_max <= 7:
            bad.append(f"ngram range [{self.ngram_min}, {self.ngram_max}] must have 1 <= ngram_min <= ngram_max <= 7")
        if not 0.0 <= self.content_weight <= 1.0:
            bad.append(f"content_weight={self.content_weight} must be within [0, 1]")
        if bad:
            raise DomaintokError("semantic id params: " + "; ".join(bad))


def _params_from_dict(raw: Any) -> SemanticIdParams:
    try:
        return msgspec.convert(raw, SemanticIdParams)
    except msgspec.ValidationError as exc:
        raise DomaintokError(f"semantic id params: {exc}") from None


# --- small shared pieces ----------------------------------------------------------------------------------------


def _strings(values: Values) -> pa.Array:
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if not isinstance(arr, pa.Array):
        arr = pa.array(list(arr), type=pa.string())
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (as in `stable_hash64`): spreads packed n-gram bytes over all 64 bits."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _hash_slots(values: pa.Array, sizes: Sequence[int]) -> np.ndarray:
    """int64 (n, len(sizes)): slot j is an independent stable hash of the value mod sizes[j], equal in every process."""
    h = stable_hash64(values)
    out = np.empty((len(values), len(sizes)), dtype=np.int64)
    for j, size in enumerate(sizes):
        salt = np.uint64(((j + 1) * _GOLDEN) % (1 << 64))
        out[:, j] = (_splitmix64(h + salt) % np.uint64(size)).astype(np.int64)
    return out


_PACKED_DTYPES = ("<f4", "<u8", "<i4")


def _pack(a: np.ndarray, dtype: str = "<f4") -> dict[str, Any]:
    """An array as JSON builtins: little-endian bytes in base64 (exact round trip; 5.3 bytes per float32)."""
    packed = np.ascontiguousarray(a, dtype=dtype)
    return {"dtype": dtype, "shape": list(packed.shape), "data": base64.b64encode(packed.tobytes()).decode("ascii")}


def _unpack(d: Any, what: str) -> np.ndarray:
    """The array `_pack` saved; float32 comes back as float64 (the values the fit itself used, see `_f32`)."""
    try:
        if d["dtype"] not in _PACKED_DTYPES:
            raise ValueError(f"dtype {d['dtype']!r} is not one of {_PACKED_DTYPES}")
        a = np.frombuffer(base64.b64decode(d["data"], validate=True), dtype=d["dtype"]).reshape(d["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DomaintokError(f"semantic id state: {what} is not a packed array ({exc})") from None
    return a.astype(np.float64) if d["dtype"] == "<f4" else a.astype(a.dtype.newbyteorder("="))


def _f32(a: np.ndarray) -> np.ndarray:
    """The float64 values a saved-and-loaded float32 array will have: fit uses these so a round trip changes nothing."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _l2_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit norm (zero rows stay zero) and the mask of nonzero rows."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    nonzero = norm > 0
    out = np.zeros_like(x)
    out[nonzero] = x[nonzero] / norm[nonzero, None]
    return out, nonzero


# --- content: hashed character n-grams, TF-IDF, projection ------------------------------------------------------


def _padded_words(texts: Values) -> pa.Array:
    """Lowercased words joined by single spaces with a space at each end (" red wool hat "); null where no word."""
    words = pc.utf8_trim(pc.replace_substring_regex(pc.utf8_lower(_strings(texts)), _WORD_BREAK, " "), " ")
    words = pc.if_else(pc.equal(words, ""), pa.scalar(None, pa.string()), words)
    return pc.binary_join_element_wise(" ", words, " ", "")


def _ngram_counts(padded: pa.Array, nmin: int, nmax: int, buckets: int) -> tuple[np.ndarray, ...]:
    """(row, bucket, count) of every hashed n-gram, sorted by row then bucket; an n-gram never spans two words.

    A window of the padded text is a word n-gram when no space sits strictly inside it (" red", "red ", " red ").
    Its bytes are packed with its length into a uint64 (exact identity), then splitmix-hashed into a bucket.
    """
    arr = padded.cast(pa.string())
    m = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32)[arr.offset : arr.offset + m + 1].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    valid = np.asarray(arr.is_valid(), dtype=bool) if arr.null_count else np.ones(m, dtype=bool)
    lengths = np.where(valid, np.diff(offsets), 0)
    row = np.repeat(np.arange(m, dtype=np.int64), lengths)
    pos = np.arange(len(row), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths) + offsets[:-1][row]
    end = offsets[1:][row]
    keys, rows = [], []
    for n in range(nmin, nmax + 1):
        keep = pos + n <= end
        if n == 1:  # a lone space is no unigram
            keep &= data[pos] != _SPACE
        for i in range(1, n - 1):
            keep[keep] &= data[pos[keep] + i] != _SPACE
        p = pos[keep]
        key = np.full(len(p), np.uint64(n) << np.uint64(56), dtype=np.uint64)
        for i in range(n):
            key |= data[p + i].astype(np.uint64) << np.uint64(8 * i)
        keys.append(key)
        rows.append(row[keep])
    bucket = (_splitmix64(np.concatenate(keys)) % np.uint64(buckets)).astype(np.int64)
    cell, count = np.unique(np.concatenate(rows) * buckets + bucket, return_counts=True)
    return cell // buckets, cell % buckets, count.astype(np.float64)


def _tfidf(rows: np.ndarray, cols: np.ndarray, tf: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """TF-IDF weights of sorted (row, bucket) cells, each row scaled to unit L2 norm."""
    w = tf * idf[cols]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    norm = np.sqrt(np.add.reduceat(w * w, starts)) if len(rows) else np.zeros(0)
    return w / np.repeat(norm, np.diff(np.r_[starts, len(rows)]))


def _project(m: int, rows: np.ndarray, cols: np.ndarray, w: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """(m, dims) = TF-IDF rows @ projection: blocks of rows made dense (cells are unique), then one BLAS matmul each,
    3x faster than gather + segment sums; bitwise BLAS differences are harmless (see _TIE_EPS)."""
    buckets = projection.shape[0]
    out = np.zeros((m, projection.shape[1]))
    step = max(1, _CHUNK_ELEMENTS // buckets)
    bounds = np.searchsorted(rows, np.arange(0, m + step, step))  # rows are sorted
    for block, lo in enumerate(range(0, m, step)):
        a, b = bounds[block], bounds[block + 1]
        dense = np.zeros((min(step, m - lo), buckets))
        dense[rows[a:b] - lo, cols[a:b]] = w[a:b]
        out[lo : lo + step] = dense @ projection
    return out


def _content_vectors(padded: pa.Array, content: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Unit content vectors (n, dims) of `_padded_words` texts under a fitted vectorizer, and the mask of those that
    have one (no word, or only n-grams the fit never saw: a zero row). Texts go in blocks, so memory stays flat."""
    out = np.zeros((len(padded), content["projection"].shape[1]))
    for lo in range(0, len(padded), _TEXT_BLOCK):
        block = padded.slice(lo, _TEXT_BLOCK)
        rows, cols, tf = _ngram_counts(block, content["ngram_min"], content["ngram_max"], content["buckets"])
        w = _tfidf(rows, cols, tf, content["idf"])
        out[lo : lo + len(block)] = _project(len(block), rows, cols, w, content["projection"])
    return _l2_rows(out)


def _fit_content(padded: pa.Array, params: SemanticIdParams) -> dict[str, Any]:
    """Fit the vectorizer on the items' `_padded_words` texts: idf per bucket, projection = top right singular
    vectors of the TF-IDF matrix (truncated SVD, as LSA)."""
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd

    rows, cols, tf = _ngram_counts(padded, params.ngram_min, params.ngram_max, params.buckets)
    n_docs = len(np.unique(rows))
    df = np.bincount(cols, minlength=params.buckets)
    idf = _f32(np.log((1.0 + n_docs) / (1.0 + df)) + 1.0)  # smoothed, as scikit-learn's TfidfVectorizer
    rank = min(params.dims, n_docs - 1, int((df > 0).sum()) - 1)
    if rank < 1:
        raise DomaintokError(f"semantic ids: content needs texts with words for at least 2 items, got {n_docs}")
    x = sparse.csr_matrix((_tfidf(rows, cols, tf, idf), (rows, cols)), shape=(len(padded), params.buckets))
    _, _, vt = randomized_svd(x, rank, n_iter=7, random_state=params.seed)
    return {"buckets": params.buckets, "ngram_min": params.ngram_min, "ngram_max": params.ngram_max,
            "idf": idf, "projection": _f32(vt.T)}


# --- co-occurrence: window pairs, PPMI, SVD -----------------------------------------------------------------------


def _flatten_sequences(sequences: Sequence[np.ndarray], rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item, sequence id) of every known event, items renumbered by `rank`; -1 (unknown item) events dropped."""
    n = len(rank)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences] or [np.zeros(0, np.int64)])
    if len(flat) and (flat.min() < -1 or flat.max() >= n):
        raise DomaintokError(f"semantic ids: sequences hold item indices outside [-1, {n}) (indices into `items`)")
    seq = np.repeat(np.arange(len(lengths)), lengths)
    known = flat >= 0
    return rank[flat[known]], seq[known]


def _ppmi(items: np.ndarray, seq: np.ndarray, n: int, window: int) -> Any:
    """Positive PMI of items co-occurring within `window` events of one sequence (context counts smoothed ^0.75)."""
    from scipy import sparse

    a_parts, b_parts = [], []
    for d in range(1, window + 1):
        same = (seq[d:] == seq[:-d]) & (items[d:] != items[:-d])
        a_parts.append(items[:-d][same])
        b_parts.append(items[d:][same])
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    counts = sparse.csr_matrix((np.ones(2 * len(a)), (np.r_[a, b], np.r_[b, a])), shape=(n, n))
    counts.sum_duplicates()
    row_total = np.asarray(counts.sum(axis=1)).ravel()
    context = row_total**0.75
    context /= max(context.sum(), 1.0)
    coo = counts.tocoo()
    pmi = np.log(coo.data) - np.log(row_total[coo.row]) - np.log(context[coo.col])
    keep = pmi > 0
    return sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n, n))


def _fit_cooccurrence(sequences: Sequence[np.ndarray], rank: np.ndarray, params: SemanticIdParams) -> np.ndarray:
    """Co-occurrence vectors (n, dims) = U sqrt(S) of the PPMI matrix; zero rows for items that co-occur with none."""
    from sklearn.utils.extmath import randomized_svd

    n = len(rank)
    items, seq = _flatten_sequences(sequences, rank)
    ppmi = _ppmi(items, seq, n, params.window)
    active = int((ppmi.getnnz(axis=1) > 0).sum())
    k = min(params.dims, active - 1)
    if k < 1:
        raise DomaintokError(f"semantic ids: co-occurrence needs at least 2 items that co-occur, got {active}")
    u, s, _ = randomized_svd(ppmi, k, n_iter=7, random_state=params.seed)
    return u * np.sqrt(s)


def _fit_impute(content: np.ndarray, collab: np.ndarray, both: np.ndarray) -> np.ndarray:
    """Ridge map content -> co-occurrence vector, so an item with text but no history lands in the joint space."""
    c, k = content[both], collab[both]
    return _f32(np.linalg.solve(c.T @ c + np.eye(c.shape[1]), c.T @ k))


def _joint(content: np.ndarray | None, collab: np.ndarray | None, state: dict[str, Any]) -> np.ndarray:
    """Item vectors of the model's source: unit parts, weighted so the concatenation has norm <= 1."""
    if state["source"] == "content":
        return content
    if state["source"] == "cooccurrence":
        return collab
    w = state["content_weight"]
    return np.hstack([np.sqrt(w) * content, np.sqrt(1.0 - w) * collab])


def _impute(content: np.ndarray, impute: np.ndarray) -> np.ndarray:
    return _l2_rows(content @ impute)[0]


# --- residual k-means -------------------------------------------------------------------------------------------


def _nearest(x: np.ndarray, codebook: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest code of each row and its squared distance, in row blocks of bounded memory."""
    best = np.zeros(len(x), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(1, len(codebook)))
    for lo in range(0, len(x), step):
        best[lo : lo + step] = _nearest_block(x[lo : lo + step], codebook)
    return best, ((x - codebook[best]) ** 2).sum(axis=1)


def _nearest_block(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Nearest codes by |x|^2 - 2 x.c + |c|^2 (one matmul); rows whose best two are within _TIE_EPS are settled by
    exact per-row differences, whose result depends on the row alone."""
    d = (x * x).sum(axis=1)[:, None] - 2.0 * (x @ codebook.T) + (codebook * codebook).sum(axis=1)[None, :]
    best = np.argmin(d, axis=1)
    if codebook.shape[0] > 1:
        best_d = d[np.arange(len(x)), best]
        d[np.arange(len(x)), best] = np.inf
        close = np.flatnonzero(d.min(axis=1) - best_d < _TIE_EPS)
        step = max(1, _CHUNK_ELEMENTS // max(1, codebook.size))
        for lo in range(0, len(close), step):
            rows = close[lo : lo + step]
            best[rows] = np.argmin(((x[rows, None, :] - codebook[None, :, :]) ** 2).sum(axis=2), axis=1)
    return best


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to its squared distance to the nearest
    centre so far (spread-out seeds: fewer Lloyd iterations, fewer empty codes)."""
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(len(x))]
    dist = ((x - centres[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = dist.sum()
        i = int(rng.choice(len(x), p=dist / total)) if total > 0 else int(rng.integers(len(x)))
        centres[j] = x[i]
        np.minimum(dist, ((x - x[i]) ** 2).sum(axis=1), out=dist)
    return centres


def _reseed_dead(x: np.ndarray, codebook: np.ndarray, assign: np.ndarray, dist: np.ndarray) -> bool:
    """Move every dead code onto a point of largest error (distinct points, from clusters that keep a member).

    Returns whether any code was dead. Such a point is at distance 0 from its new code, so the code gets a member.
    """
    counts = np.bincount(assign, minlength=len(codebook))
    dead = np.flatnonzero(counts == 0)
    if not len(dead):
        return False
    order = np.argsort(-dist, kind="stable")
    order = order[(dist[order] > 0) & (counts[assign[order]] > 1)]
    _, first = np.unique(x[order], axis=0, return_index=True)
    donors = order[np.sort(first)][: len(dead)]
    codebook[dead[: len(donors)]] = x[donors]
    return True


def _kmeans(x: np.ndarray, k: int, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means from k-means++ seeds. Ends with float32-exact codes (what the state saves) that all have a
    member, so no token of the vocabulary is dead (needs k <= distinct rows)."""
    codebook = _kmeans_pp(x, k, rng)
    assign = None
    for _ in range(iterations):
        new_assign, dist = _nearest(x, codebook)
        if assign is not None and np.array_equal(new_assign, assign):
            break
        assign = new_assign
        sums = np.zeros_like(codebook)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        codebook = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], codebook)
        _reseed_dead(x, codebook, assign, dist)
    codebook = _f32(codebook)
    for _ in range(4 * k + 4):
        assign, dist = _nearest(x, codebook)
        if not _reseed_dead(x, codebook, assign, dist):
            return codebook
        codebook = _f32(codebook)
    raise DomaintokError(f"semantic ids: k-means could not give all {k} codes a member; lower codes")  # not reached


def _fit_codebooks(x: np.ndarray, params: SemanticIdParams) -> tuple[list[np.ndarray], list[float]]:
    """Residual k-means: level l clusters what levels < l left over. Returns codebooks and the mean squared residual
    before quantization and after each level (it falls level by level)."""
    rng = np.random.default_rng(params.seed)
    residual = x.copy()
    codebooks, errors = [], [float((residual**2).sum(axis=1).mean())]
    for _ in range(params.levels):
        distinct = len(np.unique(residual, axis=0))
        codebook = _kmeans(residual, min(params.codes, distinct), params.iterations, rng)
        assign, _ = _nearest(residual, codebook)
        residual -= codebook[assign]
        codebooks.append(codebook)
        errors.append(float((residual**2).sum(axis=1).mean()))
    return codebooks, errors


def _quantize(x: np.ndarray, codebooks: Sequence[np.ndarray]) -> np.ndarray:
    """int64 (n, levels): the residual codes of each row (the serving path uses exactly this)."""
    residual = x.copy()
    codes = np.empty((len(x), len(codebooks)), dtype=np.int64)
    for level, codebook in enumerate(codebooks):
        codes[:, level], _ = _nearest(residual, codebook)
        residual -= codebook[codes[:, level]]
    return codes


def _disambiguate(codes: np.ndarray, digit_range: int, items: pa.Array) -> np.ndarray:
    """Final digit of each seen item: 0, 1, 2, ... among items sharing all level codes, in item (value) order."""
    n = len(codes)
    order = np.lexsort(codes.T[::-1])  # stable: ties keep item order
    ordered = codes[order]
    new_group = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    rank = np.arange(n) - group_start
    if rank.max() >= digit_range:
        last = int(np.argmax(rank))
        members = order[group_start[last] : last + 1]
        examples = ", ".join(repr(v) for v in items.take(pa.array(members[:3])).to_pylist())
        raise DomaintokError(
            f"semantic ids: {len(members)} items ({examples}, ...) share the codes {tuple(ordered[last].tolist())} "
            f"but the disambiguation digit holds only {digit_range}: raise codes or levels, or disambiguation "
            "(items with the same text and no co-occurrence always share codes: null junk texts to hash them)"
        )
    digits = np.empty(n, dtype=np.int64)
    digits[order] = rank
    return digits



# --- texts of seen items ------------------------------------------------------------------------------------------


def _text_table(padded: pa.Array, usable: np.ndarray) -> dict[str, Any]:
    """Sorted stable hashes of the seen items' normalized texts and, per hash, the first item (by value) having it.

    An unseen item whose text normalizes to a seen item's gets that item's level codes: with source="both" its own
    vector could only impute the co-occurrence part, and the same description is the same product far more often.
    """
    rows = np.flatnonzero(usable)
    h = stable_hash64(padded.take(pa.array(rows)))
    order = np.lexsort((rows, h))
    h, rows = h[order], rows[order]
    first = np.r_[True, h[1:] != h[:-1]] if len(h) else np.zeros(0, bool)
    return {"hashes": _pack(h[first], "<u8"), "items": _pack(rows[first], "<i4")}


def _match_texts(padded: pa.Array, hashes: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Index of the seen item whose normalized text equals each text's, or -1 (also for null texts)."""
    h = stable_hash64(padded)
    pos = np.minimum(np.searchsorted(hashes, h), max(len(hashes) - 1, 0))
    found = (hashes[pos] == h) & np.asarray(padded.is_valid(), dtype=bool) if len(hashes) else np.zeros(len(h), bool)
    return np.where(found, items[pos] if len(hashes) else -1, -1)


# --- the fitted model -------------------------------------------------------------------------------------------


class SemanticIds:
    """A fitted semantic ID model: seen values -> stored IDs, unseen values -> content codes or a hashed ID.

    Build it with `fit_semantic_ids` or `SemanticIds.from_dict(state)`; `to_dict()` gives JSON builtins only.
    `vectors` (float64 (n_items, dims), rows in `items` order) and `errors` (mean squared residual before
    quantization and after each level) are set by the fit for inspection; neither is saved.
    """

    def __init__(self, state: dict[str, Any]):
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise DomaintokError(f"semantic id state: expected format {FORMAT!r}, got {got!r}")
        self._state = copy.deepcopy(state)
        self.params = _params_from_dict(state["params"])
        self.items = pa.array(state["items"], type=pa.string())
        self._ids = np.asarray(state["ids"], dtype=np.int64).reshape(len(self.items), self.params.levels + 1)
        self.codebooks = [_unpack(c, f"codebook {i}") for i, c in enumerate(state["codebooks"])]
        content = state["content"]
        self._content = None
        if content is not None:
            self._content = {**content, "idf": _unpack(content["idf"], "idf"),
                             "projection": _unpack(content["projection"], "projection")}
            self._text_hashes = _unpack(state["texts"]["hashes"], "text hashes")
            self._text_items = _unpack(state["texts"]["items"], "text items").astype(np.int64)
        self._impute = None if state["impute"] is None else _unpack(state["impute"], "impute")
        self._mix = {"source": self.params.source, "content_weight": self.params.content_weight}
        self.vectors: np.ndarray | None = None
        self.errors: list[float] | None = None

    @property
    def levels(self) -> int:
        return self.params.levels

    @property
    def vocab_sizes(self) -> list[int]:
        """Range of each ID position: the codebook size of each level (<= codes), then the disambiguation range."""
        return [len(c) for c in self.codebooks] + [self.params.disambiguation]

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SemanticIds:
        return cls(state)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    @classmethod
    def from_json(cls, text: str | bytes) -> SemanticIds:
        return cls(json.loads(text))

    def to_json(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the same seed and data give the same bytes."""
        return json.dumps(self._state, sort_keys=True, separators=(",", ":")).encode()

    def content_vectors(self, texts: Values) -> tuple[np.ndarray, np.ndarray]:
        """Unit content vectors (n, dims) of texts, and the mask of texts that have one (zero rows elsewhere)."""
        if self._content is None:
            raise DomaintokError(f"semantic ids: a source={self.params.source!r} model has no content vectorizer")
        return _content_vectors(_padded_words(texts), self._content)

    def ids_for(self, values: Values, texts: Values | None = None) -> np.ndarray:
        """int64 (n, levels + 1) IDs of values; texts (aligned) are read for unseen values only; nulls: NULL_ID rows."""
        return self.ids_and_origin(values, texts)[0]

    def ids_and_origin(self, values: Values, texts: Values | None = None) -> tuple[np.ndarray, np.ndarray]:
        """IDs as `ids_for`, and int8 origin per row: ORIGIN_SEEN / _CONTENT / _HASHED / _NULL.

        Seen values: one vectorized lookup. Unseen values: hashed, then, where they have a text and the model has
        content, the level codes come from the text (a seen item's with the same text, else the content vector's).
        """
        arr = _strings(values)
        n = len(arr)
        ids = np.full((n, self.levels + 1), NULL_ID, dtype=np.int64)
        origin = np.full(n, ORIGIN_NULL, dtype=np.int8)
        index = pc.index_in(arr, value_set=self.items).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        seen = index >= 0
        ids[seen], origin[seen] = self._ids[index[seen]], ORIGIN_SEEN
        unseen = np.flatnonzero(~seen & np.asarray(arr.is_valid(), dtype=bool))
        if not len(unseen):
            return ids, origin
        ids[unseen], origin[unseen] = _hash_slots(arr.take(pa.array(unseen)), self.vocab_sizes), ORIGIN_HASHED
        if texts is not None and self._content is not None:
            texts_arr = _strings(texts)
            if len(texts_arr) != n:
                raise DomaintokError(f"semantic ids: {len(texts_arr)} texts for {n} values")
            codes, has = self._codes_from_text(texts_arr.take(pa.array(unseen)))
            ids[unseen[has], : self.levels], origin[unseen[has]] = codes[has], ORIGIN_CONTENT
        return ids, origin

    def _codes_from_text(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Level codes (m, levels) from texts and the mask of texts that gave some; each distinct text is done once."""
        enc = texts.dictionary_encode()
        padded = _padded_words(enc.dictionary)
        codes = np.zeros((len(padded) + 1, self.levels), dtype=np.int64)  # the last row stands for null
        has = np.zeros(len(padded) + 1, dtype=bool)
        match = _match_texts(padded, self._text_hashes, self._text_items)
        codes[:-1][match >= 0], has[:-1][match >= 0] = self._ids[match[match >= 0], : self.levels], True
        rest = np.flatnonzero(match < 0)
        content, has_content = _content_vectors(padded.take(pa.array(rest)), self._content)
        collab = _impute(content, self._impute) if self._impute is not None else None
        vectors = _joint(content, collab, self._mix)
        codes[rest[has_content]], has[rest[has_content]] = _quantize(vectors[has_content], self.codebooks), True
        index = enc.indices.fill_null(len(padded)).to_numpy(zero_copy_only=False).astype(np.int64)
        return codes[index], has[index]


def item_sequences(
    items: Values, event_items: Values, event_users: Values, event_times: Values | None = None
) -> list[np.ndarray]:
    """Per-user sequences of indices into `items` (-1 for values not among them), ordered by time then input order.

    Events with a null user are dropped. This turns a user/item/time table into `fit_semantic_ids`'s `sequences`.
    """
    idx = pc.index_in(_strings(event_items), value_set=_strings(items)).fill_null(-1)
    cols = {"u": event_users, "i": idx, "r": pa.array(np.arange(len(idx)))}
    if event_times is not None:
        cols["t"] = event_times
    table = pa.table(cols)
    table = table.filter(pc.is_valid(table["u"]))
    keys = [("u", "ascending")] + ([("t", "ascending")] if event_times is not None else []) + [("r", "ascending")]
    table = table.take(pc.sort_indices(table, sort_keys=keys))
    users = table["u"].combine_chunks()
    if len(users) == 0:
        return []
    boundaries = np.flatnonzero(pc.not_equal(users[1:], users[:-1]).to_numpy(zero_copy_only=False)) + 1
    return np.split(table["i"].to_numpy().astype(np.int64), boundaries)


# --- fitting ----------------------------------------------------------------------------------------------------


def _sorted_items(items: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Items sorted by value (so the fit does not depend on input order) and rank[i] = sorted position of items[i]."""
    if items.null_count:
        raise DomaintokError("semantic ids: items must not be null")
    duplicates = len(items) - len(pc.unique(items))
    if duplicates:
        raise DomaintokError(f"semantic ids: items must be distinct, got {duplicates} repeated values")
    order = pc.sort_indices(items).to_numpy()
    rank = np.empty(len(items), dtype=np.int64)
    rank[order] = np.arange(len(items))
    return items.take(pa.array(order)), rank


def _check_inputs(
    n: int, texts: Values | None, sequences: Sequence[np.ndarray] | None, params: SemanticIdParams
) -> None:
    if n == 0:
        raise DomaintokError("semantic ids: no items to fit")
    if params.source in ("content", "both") and texts is None:
        raise DomaintokError(f"semantic ids: source={params.source!r} needs texts (one per item, null where none)")
    if params.source in ("cooccurrence", "both") and sequences is None:
        raise DomaintokError(f"semantic ids: source={params.source!r} needs sequences of item indices")
    if texts is not None and len(texts) != n:
        raise DomaintokError(f"semantic ids: {len(texts)} texts for {n} items (one per item, null where none)")


def _item_vectors(
    padded: pa.Array | None, sequences: Sequence[np.ndarray] | None, rank: np.ndarray, params: SemanticIdParams
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None, np.ndarray | None]:
    """Joint vectors of the sorted items, the mask of items that have one, the content state and the impute map."""
    n = len(rank)
    content = collab = content_state = impute = None
    has_c = has_k = np.zeros(n, dtype=bool)
    if params.source in ("content", "both"):
        content_state = _fit_content(padded, params)
        content, has_c = _content_vectors(padded, content_state)
    if params.source in ("cooccurrence", "both"):
        collab, has_k = _l2_rows(_fit_cooccurrence(sequences, rank, params))
    if params.source == "both":
        if not (has_c & has_k).any():
            raise DomaintokError("semantic ids: source='both' needs items that have both a text and co-occurrences")
        impute = _fit_impute(content, collab, has_c & has_k)
        text_only = has_c & ~has_k
        collab[text_only] = _impute(content[text_only], impute)
    mix = {"source": params.source, "content_weight": params.content_weight}
    return _joint(content, collab, mix), has_c | has_k, content_state, impute


def _state(
    items: pa.Array, ids: np.ndarray, content: dict[str, Any] | None, texts: dict[str, Any] | None,
    impute: np.ndarray | None, codebooks: list[np.ndarray], stats: dict[str, Any], params: SemanticIdParams,
) -> dict[str, Any]:
    """The saved form: JSON builtins only, arrays packed (see `_pack`)."""
    if content is not None:
        content = {**content, "idf": _pack(content["idf"]), "projection": _pack(content["projection"])}
    return {
        "format": FORMAT,
        "params": msgspec.to_builtins(params),
        "items": items.to_pylist(),
        "ids": ids.tolist(),
        "content": content,
        "texts": texts,
        "impute": None if impute is None else _pack(impute),
        "codebooks": [_pack(c) for c in codebooks],
        "stats": stats,
    }


def fit_semantic_ids(
    items: Values,
    texts: Values | None = None,
    sequences: Sequence[np.ndarray] | None = None,
    params: SemanticIdParams | None = None,
) -> SemanticIds:
    """Fit semantic IDs for distinct item values.

    texts: one content text per item (null where none), for source "content" / "both".
    sequences: arrays of indices into `items` (one array per user, in time order; -1 for unknown events), for
        "cooccurrence" / "both"; `item_sequences` builds them from an event table.
    Items with no vector (no words, no co-occurrence) get hashed codes, like unseen items without content; the
    disambiguation digit then makes every item's full ID unique. The same data and params give the same state.
    """
    params = params or SemanticIdParams()
    arr = _strings(items)
    _check_inputs(len(arr), texts, sequences, params)
    sorted_items, rank = _sorted_items(arr)
    padded = None if texts is None else _padded_words(_strings(texts).take(pa.array(np.argsort(rank))))
    import scipy.sparse  # noqa: F401  loaded before the limit below, which covers only loaded BLAS libraries
    import sklearn.utils.extmath  # noqa: F401
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    # One BLAS thread: a multi-threaded BLAS sums in another order, and the SVD of nearly equal singular values
    # turns those last bits into other vectors, so the state would depend on the machine's thread count.
    with threadpool_limits(limits=1, user_api="blas"):
        vectors, has, content_state, impute = _item_vectors(padded, sequences, rank, params)
        if not has.any():
            raise DomaintokError("semantic ids: no item has a vector (no words in any text, no co-occurrence)")
        codebooks, errors = _fit_codebooks(vectors[has], params)
    sizes = [len(c) for c in codebooks] + [params.disambiguation]
    codes = _hash_slots(sorted_items, sizes)[:, : params.levels]
    codes[has] = _quantize(vectors[has], codebooks)
    ids = np.column_stack([codes, _disambiguate(codes, params.disambiguation, sorted_items)])
    texts_state = None if content_state is None else _text_table(padded, has)
    stats = {"items": len(rank), "quantized": int(has.sum()), "hashed": int((~has).sum()),
             "errors": [float(f"{e:.6g}") for e in errors]}
    model = SemanticIds(_state(sorted_items, ids, content_state, texts_state, impute, codebooks, stats, params))
    model.vectors, model.errors = vectors, errors
    return model
