"""The vocabulary layout: which id every token has, and the Hugging Face tokenizer that holds the same ids.

Ids: the special tokens 0..5, then each field's tokens in schema order (each encoder placed at its first id), then
the BPE pieces shared by all text fields, then the ActionPiece merged tokens [AP_nnnnn] when the schema asks for
them. A sequence is [BOS] e1 [SEP] e2 [SEP] ... en [SEP] (events by time, ties by input order), no [EOS]. A new kind
of token gets its ids here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from domaintok.errors import ArtifactError, SchemaError
from domaintok.fields import FieldEncoder

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID, MASK_ID = range(6)


class VocabLayout:
    """Fitted field encoders placed at their ids, the BPE after them, and the names of every id."""

    def __init__(self, encoders: Sequence[FieldEncoder], bpe: Any | None, schema_name: str, merges: Any | None = None):
        bases, next_id = [], len(SPECIAL_TOKENS)
        for enc in encoders:
            bases.append(next_id)
            next_id += enc.n_tokens
        self.bpe = bpe
        self.bpe_base = next_id
        self.encoders = [enc.placed(b, bpe=bpe, bpe_base=next_id) for enc, b in zip(encoders, bases)]
        self.merges_base = next_id + (bpe.get_vocab_size() if bpe is not None else 0)
        self.merges = merges
        if merges is not None and merges.base != self.merges_base:
            raise SchemaError(f"schema {schema_name}: actionpiece merges start at id {merges.base}, the vocabulary "
                              f"at {self.merges_base} (fitted with another vocabulary)")
        self.vocab_size = self.merges_base + (merges.n_merges if merges is not None else 0)
        names = self.domain_token_names()
        if len(set(names)) != len(names):
            dupes = sorted({t for t in names if names.count(t) > 1})
            raise SchemaError(f"schema {schema_name}: fields produce the same token names {dupes[:5]}: rename a field")

    def domain_token_names(self) -> list[str]:
        """Special tokens then every field's tokens, in id order (BPE pieces excluded)."""
        out = list(SPECIAL_TOKENS)
        for enc in self.encoders:
            out += enc.token_names()
        return out

    def merge_token_names(self) -> list[str]:
        """[AP_nnnnn] of each ActionPiece merge, in id order (empty without merges)."""
        return [f"[AP_{r:05d}]" for r in range(self.merges.n_merges)] if self.merges is not None else []

    def token_names(self) -> list[str]:
        """Every token string in id order (BPE pieces in their byte-level spelling)."""
        out = self.domain_token_names()
        if self.bpe is not None:
            inv = {i: t for t, i in self.bpe.get_vocab().items()}
            out += [inv[i] for i in range(self.bpe.get_vocab_size())]
        return out + self.merge_token_names()

    def decode_tokens(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        names = self.token_names()
        return [names[int(i)] for i in ids]

    def hf_tokenizer(self, max_length: int, fingerprint: str):
        """A transformers PreTrainedTokenizerFast with the same ids: specials and domain tokens are special added
        tokens; the model is the byte-level BPE (pieces at their global ids) or a WordLevel when there is no text."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        domain = self.domain_token_names()
        vocab = {t: i for i, t in enumerate(domain)}
        if self.bpe is not None:
            bpe_state = json.loads(self.bpe.to_str())["model"]
            for piece, i in bpe_state["vocab"].items():
                if piece in vocab:
                    raise ArtifactError(f"BPE piece {piece!r} collides with a domain token")
                vocab[piece] = i + self.bpe_base
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe_state["merges"]]
            core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
            core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            core.decoder = decoders.ByteLevel()
        else:
            core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
            core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # stripping the spaces around domain tokens makes `" ".join(token_strings)` encode like tokenize(); the merged
        # tokens come after the BPE pieces, added in id order so each gets its id
        special = domain + self.merge_token_names()
        core.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=True, rstrip=True) for t in special])
        for r, name in enumerate(self.merge_token_names()):
            if core.token_to_id(name) != self.merges_base + r:
                raise ArtifactError(f"merged token {name} did not get its id {self.merges_base + r}")
        for t in SPECIAL_TOKENS:
            if core.token_to_id(t) != SPECIAL_TOKENS.index(t):
                raise ArtifactError(f"special token {t} did not keep its id")
        hf = PreTrainedTokenizerFast(
            tokenizer_object=core,
            pad_token="[PAD]",
            unk_token="[UNK]",
            bos_token="[BOS]",
            eos_token="[EOS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=max_length,
        )
        hf.init_kwargs["domaintok_fingerprint"] = fingerprint
        return hf
