"""DomainTokenizer: a fitted schema and the one object every job holds. The work lives in one module per seam:

- `domaintok/vocab.py`: the id of every token and the Hugging Face tokenizer with the same ids;
- `domaintok/fitting.py`: fitting the field encoders and the text BPE with DuckDB;
- `domaintok/event_encoding.py` + `domaintok/context.py`: events to token ids (per event, then the previous-event step);
- `domaintok/offline.py`: tokenize parquet/Arrow into per-user sequences, streaming and vectorized;
- `domaintok/online.py`: encode online micro-batches with parity to tokenize;
- `domaintok/event_sql.py`: raw events as DuckDB reads them;
and here: the saved state (JSON plus HF tokenizer files), its fingerprint, and the methods users call.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from domaintok import offline
from domaintok.context import PreviousEvent
from domaintok.errors import ArtifactError, DomaintokError
from domaintok.event_encoding import EventEncoding
from domaintok.event_sql import DataLike, EventFilter, read_user_ids
from domaintok.fields import FieldEncoder, TextEncoder, make_encoder
from domaintok.offline import CHUNK_EVENTS, SEQUENCES_SCHEMA, TOKENIZE_MEMORY_LIMIT
from domaintok.online import EventTokens, OnlineEncoder
from domaintok.schema import DomainSchema, schema_from_dict
from domaintok.vocab import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID, VocabLayout

__all__ = [
    "ARTIFACT_FILE", "BOS_ID", "CHUNK_EVENTS", "DEFAULT_MAX_LENGTH", "EOS_ID", "MASK_ID", "PAD_ID", "SEP_ID",
    "SEQUENCES_SCHEMA", "SPECIAL_TOKENS", "TOKENIZE_MEMORY_LIMIT", "UNK_ID", "DomainTokenizer", "EventFilter",
    "EventTokens", "PreviousEvent", "read_user_ids",
]

DEFAULT_MAX_LENGTH = 1024
ARTIFACT_FILE = "domaintok_tokenizer.json"
BPE_FILE = "domaintok_bpe.json"
FORMAT_VERSION = 1


class DomainTokenizer:
    """A fitted schema: field encoders placed at their ids, the shared text BPE, and the window length."""

    def __init__(self, schema: DomainSchema, encoders: list[FieldEncoder], bpe: Any | None, max_length: int,
                 merges: Any | None = None):
        self.schema = schema
        self.max_length = int(max_length)
        self.merges = merges  # domaintok.actionpiece.ActionPiece when the schema has `actionpiece`
        self.layout = VocabLayout(encoders, bpe, schema.name, merges)
        self.encoders = self.layout.encoders
        self.bpe = bpe
        self.bpe_base = self.layout.bpe_base
        self.vocab_size = self.layout.vocab_size
        self.encoding = EventEncoding(self.encoders, self.vocab_size, merges)
        self.context = self.encoding.context
        self.max_event_length = self.encoding.max_event_length
        self.online = OnlineEncoder(schema, self.encoding)
        self.fingerprint = self._compute_fingerprint()
        self.fit_stats: dict[str, Any] = {}

    # ---------------------------------------------------------------- ids
    pad_token_id = PAD_ID
    unk_token_id = UNK_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    sep_token_id = SEP_ID
    mask_token_id = MASK_ID

    def domain_token_names(self) -> list[str]:
        """Special tokens then every field's tokens, in id order (BPE pieces excluded)."""
        return self.layout.domain_token_names()

    def token_names(self) -> list[str]:
        """Every token string in id order (BPE pieces in their byte-level spelling)."""
        return self.layout.token_names()

    def decode_tokens(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return self.layout.decode_tokens(ids)

    def to_hf(self):
        """A transformers PreTrainedTokenizerFast with the same ids (see VocabLayout.hf_tokenizer)."""
        return self.layout.hf_tokenizer(self.max_length, self.fingerprint)

    # ---------------------------------------------------------------- fit
    @classmethod
    def fit(
        cls,
        schema: DomainSchema | str | os.PathLike,
        data: DataLike,
        *,
        bpe_vocab_size: int | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        progress: Callable[[str], None] | None = None,
        restrict: EventFilter | None = None,
    ) -> DomainTokenizer:
        """Fit every field and the text BPE over all of `data` with DuckDB (domaintok/fitting.py); `restrict` (a
        time cutoff, a user subset) drops events before anything is fitted."""
        from domaintok.fitting import fit_tokenizer

        return fit_tokenizer(cls, schema, data, bpe_vocab_size=bpe_vocab_size, max_length=max_length,
                             progress=progress, restrict=restrict)

    # ---------------------------------------------------------------- save / load
    def _state(self) -> dict[str, Any]:
        state = {
            "format": "domaintok-tokenizer",
            "format_version": FORMAT_VERSION,
            "schema": self.schema.to_builtins(),
            "fields": {enc.spec.name: enc.state for enc in self.encoders},
            "max_length": self.max_length,
            "special_tokens": SPECIAL_TOKENS,
        }
        if self.merges is not None:
            state["actionpiece"] = self.merges.to_dict()
        return state

    def _compute_fingerprint(self) -> str:
        state = self._state()
        state.pop("max_length")  # the window length does not change any token id
        h = hashlib.sha256(msgspec.json.encode(state, order="sorted"))
        if self.bpe is not None:
            h.update(self.bpe.to_str().encode())
        return f"{self.schema.fingerprint[:12]}-{h.hexdigest()[:12]}"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the fitted state (JSON), the BPE (tokenizers JSON) and the HF tokenizer files into `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = self._state()
        state["fingerprint"] = self.fingerprint
        state["vocab_size"] = self.vocab_size
        (out / ARTIFACT_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(state), indent=2))
        if self.bpe is not None:
            (out / BPE_FILE).write_text(self.bpe.to_str(pretty=True))
        elif (out / BPE_FILE).exists():
            (out / BPE_FILE).unlink()
        self.to_hf().save_pretrained(str(out))
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DomainTokenizer:
        """Load a tokenizer saved by save_pretrained; ArtifactError when files are missing or do not match."""
        from tokenizers import Tokenizer

        path = Path(directory)
        if not (path / ARTIFACT_FILE).is_file():
            raise ArtifactError(f"tokenizer dir {str(path)!r}: no {ARTIFACT_FILE} (not a fitted domaintok tokenizer)")
        try:
            state = msgspec.json.decode((path / ARTIFACT_FILE).read_bytes())
        except msgspec.DecodeError as exc:
            raise ArtifactError(f"tokenizer dir {str(path)!r}: {ARTIFACT_FILE} is not valid JSON: {exc}") from None
        if state.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"tokenizer dir {str(path)!r}: format_version {state.get('format_version')} != {FORMAT_VERSION}")
        schema = schema_from_dict(state["schema"], origin=str(path / ARTIFACT_FILE))
        encoders = [make_encoder(spec, state["fields"].get(spec.name)) for spec in schema.fields]
        bpe = None
        if any(isinstance(e, TextEncoder) for e in encoders):
            if not (path / BPE_FILE).is_file():
                raise ArtifactError(f"tokenizer dir {str(path)!r}: schema has text fields but {BPE_FILE} is missing")
            bpe = Tokenizer.from_file(str(path / BPE_FILE))
        merges = None
        if state.get("actionpiece") is not None:
            from domaintok.actionpiece import ActionPiece

            merges = ActionPiece.from_dict(state["actionpiece"])
        tok = cls(schema, encoders, bpe, state["max_length"], merges)
        if state.get("fingerprint") != tok.fingerprint:
            raise ArtifactError(
                f"tokenizer dir {str(path)!r}: fingerprint {state.get('fingerprint')} does not match its content ({tok.fingerprint})"
            )
        return tok

    # ---------------------------------------------------------------- offline
    def iter_tokenize(self, data: DataLike, max_length: int | None = None, **kwargs: Any) -> Iterator[pa.RecordBatch]:
        """SEQUENCES_SCHEMA record batches, one row per user in user order (domaintok/offline.py: iter_tokenize)."""
        return offline.iter_tokenize(self, data, max_length, **kwargs)

    def tokenize(self, data: DataLike, max_length: int | None = None, **kwargs: Any) -> pa.Table:
        """One row per user: user_id, input_ids ([BOS] e1 [SEP] ... en [SEP], newest whole events that fit
        max_length), n_events (all events of the user), last_event_ts (UTC)."""
        return offline.tokenize(self, data, max_length, **kwargs)

    def tokenize_to_parquet(self, data: DataLike, out_path: str | os.PathLike, max_length: int | None = None,
                            **kwargs: Any) -> dict[str, Any]:
        """Stream sequences into a parquet file (written to a temp file beside it, then renamed); returns counts."""
        return offline.tokenize_to_parquet(self, data, out_path, max_length, **kwargs)

    def check_max_length(self, max_length: int | None) -> int:
        max_length = self.max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise DomaintokError(f"max_length must be >= 2, got {max_length}")
        return max_length

    # ---------------------------------------------------------------- online
    @property
    def event_struct(self) -> type[msgspec.Struct]:
        """msgspec Struct of one raw event on the wire (canonical names, kw_only, unknown fields refused)."""
        return self.online.event_struct

    def encode_event_tokens(
        self,
        events: Sequence[Mapping[str, Any] | msgspec.Struct] | pa.Table,
        previous: Mapping[str, PreviousEvent] | None = None,
    ) -> EventTokens:
        """Token ids of each raw event, in input order, as tokenize() gives them (domaintok/online.py)."""
        return self.online.encode_event_tokens(events, previous)

    def encode_events(self, events: Sequence[Mapping[str, Any] | msgspec.Struct] | pa.Table,
                      max_length: int | None = None) -> np.ndarray:
        """The full sequence of ONE user's events: exactly the input_ids tokenize() gives for the same events."""
        return self.online.encode_events(events, self.check_max_length(max_length))
