"""The domain transformer: a pre-norm GPT decoder over domain tokens, NoPE by default, SDPA attention.

`DomainTransformerModel` returns hidden states and the user embedding; `DomainTransformerForCausalLM` adds the
tied LM head and the next-token loss used for pretraining.

Shape legend: B = batch size, T = sequence length (tokens), H = hidden size, N = attention heads,
D = head dim (H / N), V = vocabulary size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from domaintok.models.configuration_domain_transformer import DomainTransformerConfig

_ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, T, T), True = may attend: causal AND key is a real token.

    Every query may also attend to itself, so a pad query (or an all-pad row) never has an empty softmax row,
    which SDPA would turn into NaN; real queries are unaffected since their own key is real.
    """
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]  # (T, T): key j <= query i
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    diagonal = positions[None, :] == positions[:, None]  # (T, T)
    return (causal & keys) | diagonal  # (B, 1, T, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position (B,) of each row's final real token; 0 for an all-pad row. Works for any padding side."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device)
    # argmax of position * mask: the largest position holding a real token (a pure tensor op, so it exports).
    return (positions[None, :] * attention_mask.long()).argmax(dim=-1)


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean (B, H) of hidden states (B, T, H) over the real tokens of each row; zeros for an all-pad row."""
    weights = attention_mask.to(hidden_states.dtype)[..., None]  # (B, T, 1)
    total = (hidden_states * weights).sum(dim=1)  # (B, H)
    return total / weights.sum(dim=1).clamp_min(1.0)


class DomainTransformerAttention(nn.Module):
    """Multi-head causal self-attention through `F.scaled_dot_product_attention` (flash kernels on GPU)."""

    def __init__(self, config: DomainTransformerConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.attention_dropout = config.attention_dropout

    def forward(self, hidden_states: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)  # (B, T, 3H)
        qkv = qkv.view(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, N, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, N, T, D)
        dropout = self.attention_dropout if self.training else 0.0
        if attn_mask is None:
            # Pure causal: SDPA may pick the flash kernel, which takes no explicit mask.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, T, H)  # (B, N, T, D) -> (B, T, H)
        return self.out_proj(out)

    def forward_one_query(self, hidden_states: torch.Tensor, index: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H) for one query per row, at position `index` (B,), over the keys `key_mask` (B, T)
        allows; keys and values are computed for every position, the query only where it is asked for."""
        B, T, H = hidden_states.shape
        # The projection runs as a module (not on its weight slices), so adapters wrapped around it (LoRA) apply.
        qkv = self.qkv_proj(hidden_states)  # (B, T, 3H)
        k, v = qkv[..., H:].view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, N, T, D)
        q = qkv[torch.arange(B, device=index.device), index, :H]  # (B, H)
        q = q.view(B, self.num_heads, 1, self.head_dim)  # (B, N, 1, D)
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=dropout)
        return self.out_proj(out.reshape(B, H))  # (B, N, 1, D) -> (B, H)


class DomainTransformerMLP(nn.Module):
    def __init__(self, config: DomainTransformerConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.act = _ACTIVATIONS[config.hidden_act]()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(hidden_states)))  # (B, T, H) -> (B, T, 4H) -> (B, T, H)


class DomainTransformerBlock(GradientCheckpointingLayer):
    """Pre-norm decoder block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: DomainTransformerConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = DomainTransformerAttention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = DomainTransformerMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.dropout(self.attn(self.attn_norm(hidden_states), attn_mask))
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))  # (B, T, H)

    def forward_one_query(self, hidden_states: torch.Tensor, index: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """The block's output (B, H) at position `index` (B,) of each row only; equal to forward()[b, index[b]]
        when `key_mask` (B, T) is the causal + padding row of that position. The residual stream of the other
        positions is never needed after the last block, so neither their attention nor their MLP is computed."""
        attended = self.attn.forward_one_query(self.attn_norm(hidden_states), index, key_mask)  # (B, H)
        rows = torch.arange(hidden_states.shape[0], device=index.device)
        hidden = hidden_states[rows, index] + self.dropout(attended)  # (B, H)
        return hidden + self.dropout(self.mlp(self.mlp_norm(hidden)))  # (B, H)


class DomainTransformerPreTrainedModel(PreTrainedModel):
    """Weight init, config class and loading conventions shared by the bare model and its heads."""

    config_class = DomainTransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DomainTransformerBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # normal(0, initializer_range) for Linear/Embedding, ones/zeros for norms
        if isinstance(module, (DomainTransformerAttention, DomainTransformerMLP)):
            # GPT-2 scaled init: two residual additions per block, so the residual stream's variance stays
            # independent of depth at initialization.
            std = self.config.initializer_range / math.sqrt(2 * self.config.num_hidden_layers)
            projection = module.out_proj if isinstance(module, DomainTransformerAttention) else module.down_proj
            # transformers' init functions skip tensors already loaded from a checkpoint.
            init.normal_(projection.weight, mean=0.0, std=std)


class DomainTransformerModel(DomainTransformerPreTrainedModel):
    """The bare decoder: token ids (B, T) -> final-normed hidden states (B, T, H), and the user embedding (B, H)."""

    def __init__(self, config: DomainTransformerConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            # NoPE (Kazemnejad et al. 2023): causal attention alone tells the model the order of the tokens.
            self.embed_positions = None
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DomainTransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)
        self.gradient_checkpointing = False
        # merged tokens' parts as (index, weight) tensors, built from the config on first use on each device (plain
        # attributes, not buffers: nothing extra in the weights file, and nothing for loading to skip or fill)
        self._merged_parts: tuple[torch.Tensor, torch.Tensor] | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        """Run the decoder.

        `attention_mask` (B, T) marks real tokens with 1. None means no padding, and lets SDPA use its flash
        kernel. Right padding needs no mask for the real positions (a causal query never sees a later pad key),
        so callers that only read real positions (the loss, the user embedding) may omit it for speed; with a
        mask, pad keys are excluded for every padding layout.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states = self._input_states(input_ids)  # (B, T, H)
        attn_mask = None if attention_mask is None else causal_padding_mask(attention_mask)  # (B, 1, T, T)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attn_mask)  # positional: gradient checkpointing needs it
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        hidden_states = self.norm(hidden_states)  # (B, T, H)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, all_hidden_states) if v is not None)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)

    def _input_states(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token (+ learned position) embeddings (B, T, H), after dropout: the input of the first block."""
        T = input_ids.shape[1]
        if self.config.merged_tokens_parts:
            hidden_states = F.embedding(input_ids, self.composed_embeddings())  # (B, T, H)
        else:
            hidden_states = self.embed_tokens(input_ids)  # (B, T, H)
        if self.embed_positions is not None:
            if T > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence of {T} tokens is longer than max_position_embeddings="
                    f"{self.config.max_position_embeddings} of this learned-position model"
                )
            positions = torch.arange(T, device=input_ids.device)
            hidden_states = hidden_states + self.embed_positions(positions)[None]  # (1, T, H) broadcast over B
        return self.dropout(hidden_states)

    def composed_embeddings(self) -> torch.Tensor:
        """The input embedding table (V, H) with each merged token's row plus the mean of its parts' rows
        (`config.merged_tokens_parts`); the tied LM head keeps the plain rows. (V, M, K parts at most: a gather of
        M x K rows per forward, small beside the decoder.)"""
        weight = self.embed_tokens.weight  # (V, H)
        if self._merged_parts is None or self._merged_parts[0].device != weight.device:
            parts = self.config.merged_tokens_parts
            width = max(len(ids) for ids in parts)
            index = torch.zeros(len(parts), width, dtype=torch.long)
            share = torch.zeros(len(parts), width)
            for r, ids in enumerate(parts):
                index[r, : len(ids)] = torch.tensor(ids)
                share[r, : len(ids)] = 1.0 / len(ids)
            self._merged_parts = (index.to(weight.device), share.to(weight.device))
        index, share = self._merged_parts
        base = self.config.merged_tokens_base
        merged = weight[base : base + len(index)] + (weight[index] * share.to(weight.dtype)[..., None]).sum(1)  # (M, H)
        return torch.cat([weight[:base], merged, weight[base + len(index) :]])

    def _pool(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.config.embedding_layernorm:
            embedding = F.layer_norm(embedding, (embedding.shape[-1],), eps=self.config.layer_norm_eps)
        return embedding

    def user_embedding(self, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The user embedding (B, H) by `config.pooling`: the final real token's last hidden state ("last") or
        the mean over real tokens ("mean"), LayerNorm'd if configured."""
        if self.config.pooling == "mean":
            return self._pool(masked_mean(last_hidden_state, attention_mask))
        index = last_token_index(attention_mask)  # (B,)
        batch = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
        return self._pool(last_hidden_state[batch, index])  # (B, T, H) -> (B, H)

    def embed(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, right_padded: bool = False
    ) -> torch.Tensor:
        """Token ids (B, T) and their mask -> user embeddings (B, H), equal to user_embedding(forward(...)).

        Only the final real token's last hidden state is read, so the last block runs for that one query per row
        (its keys and values still cover every position): for the 2-layer `tiny` model that is about a third of
        the work. `right_padded=True` promises that padding only follows the real tokens; then the earlier blocks
        need no padding mask (a causal query never sees a later key) and SDPA keeps its fused causal kernel.
        Any padding side works without it. With `config.pooling == "mean"` every position of the last block is
        needed, so the whole decoder runs.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.pooling == "mean":
            attn_mask = None if right_padded else causal_padding_mask(attention_mask)  # (B, 1, T, T)
            hidden_states = self._input_states(input_ids)  # (B, T, H)
            for layer in self.layers:
                hidden_states = layer(hidden_states, attn_mask)
            return self._pool(masked_mean(self.norm(hidden_states), attention_mask))  # (B, T, H) -> (B, H)
        index = last_token_index(attention_mask)  # (B,)
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        key_mask = attention_mask.bool() & (positions[None, :] <= index[:, None])  # (B, T): real keys up to the query
        attn_mask = None if right_padded else causal_padding_mask(attention_mask)  # (B, 1, T, T)
        hidden_states = self._input_states(input_ids)  # (B, T, H)
        *blocks, last = self.layers
        for layer in blocks:
            hidden_states = layer(hidden_states, attn_mask)
        hidden = last.forward_one_query(hidden_states, index, key_mask)  # (B, H)
        return self._pool(self.norm(hidden))


class DomainTransformerForCausalLM(DomainTransformerPreTrainedModel):
    """The decoder plus a tied LM head; returns the next-token loss when `labels` are given (pretraining)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DomainTransformerConfig):
        super().__init__(config)
        self.model = DomainTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            # The tied head is never written to disk; saying so lets the Trainer re-tie it on resume, silently.
            self._keys_to_ignore_on_save = {"lm_head.weight"}
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        view_input_ids: torch.LongTensor | None = None,
        view_attention_mask: torch.Tensor | None = None,
        **loss_kwargs,
    ) -> CausalLMOutput | tuple:
        """Logits (B, T, V); with `labels` (B, T) the mean next-token cross-entropy.

        Labels equal to -100 and positions where `attention_mask` is 0 are not predicted. `loss_kwargs` takes
        the Trainer's `num_items_in_batch`, so gradient accumulation averages over tokens, not micro-batches.
        `view_input_ids` (V', T') right-padded with `view_attention_mask` adds their user embeddings (V', H) as
        `view_embeddings` (a contrastive objective's views, through the same forward so wrappers such as DDP see
        them); `input_ids=None` then skips the language model.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        view_embeddings = None
        if view_input_ids is not None:
            view_embeddings = self.model.embed(view_input_ids, view_attention_mask, right_padded=True)  # (V', H)
        if input_ids is None:
            if view_embeddings is None:
                raise ValueError("forward needs input_ids or view_input_ids")
            return DomainTransformerPretrainingOutput(view_embeddings=view_embeddings)
        outputs = self.model(
            input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden_states, return_dict=True
        )
        logits = self.lm_head(outputs.last_hidden_state)  # (B, T, H) -> (B, T, V)
        loss = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)  # (B, T)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs
            )
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        if view_embeddings is not None:
            return DomainTransformerPretrainingOutput(
                loss=loss, logits=logits, hidden_states=outputs.hidden_states, view_embeddings=view_embeddings
            )
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


@dataclass
class DomainTransformerPretrainingOutput(CausalLMOutput):
    """CausalLMOutput plus the user embeddings (V', H) of the contrastive views, when any were given."""

    view_embeddings: torch.Tensor | None = None


__all__ = [
    "DomainTransformerPreTrainedModel",
    "DomainTransformerModel",
    "DomainTransformerForCausalLM",
    "DomainTransformerPretrainingOutput",
    "causal_padding_mask",
    "last_token_index",
    "masked_mean",
]


from domaintok._autoregister import models_loaded  # noqa: E402  (registers the Auto classes: see that module)

models_loaded()
