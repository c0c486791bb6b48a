"""Tabular layers of joint fusion: PLR periodic embeddings of numeric features and DCNv2 cross networks.

PLR follows Gorishniy et al. 2022 ("On Embeddings for Numerical Features in Tabular Deep Learning"); DCNv2 follows
Wang et al. 2021 ("DCN V2: Improved Deep & Cross Network"). Shape legend: B = batch, F = features, K = frequencies,
D = embedding width per feature, X = width of the flattened tabular vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class PeriodicEmbeddings(nn.Module):
    """PLR: per feature, ReLU(Linear(cat(cos, sin)(2 pi w x))) with learned frequencies w and no phase.

    The paper's periodic module has no phase parameter (a phase is redundant once both cos and sin are fed to
    the linear layer), unlike the seed sketch. Frequencies start N(0, sigma^2), truncated at 3 sigma, with a
    small sigma (0.01..0.1) so that at init the embedding is close to linear in x; inputs should be standardized.

    Args:
        n_features: F, the number of numeric features.
        d_embedding: D, the output width per feature.
        n_frequencies: K, frequencies per feature.
        frequency_init_scale: sigma of the frequency init; the most important hyperparameter of PLR.
        lite: share the Linear after the periodic part across features (the "PLR(lite)" variant of the
            rtdl_num_embeddings package); the frequencies stay per feature.
    """

    def __init__(
        self,
        n_features: int,
        d_embedding: int = 24,
        n_frequencies: int = 48,
        frequency_init_scale: float = 0.01,
        lite: bool = False,
    ):
        super().__init__()
        if n_features <= 0 or d_embedding <= 0 or n_frequencies <= 0:
            raise ValueError("n_features, d_embedding and n_frequencies must be positive")
        if frequency_init_scale <= 0:
            raise ValueError(f"frequency_init_scale must be positive, got {frequency_init_scale}")
        self.n_features = n_features
        self.d_embedding = d_embedding
        self.n_frequencies = n_frequencies
        self.frequency_init_scale = frequency_init_scale
        self.lite = lite
        self.frequencies = nn.Parameter(torch.empty(n_features, n_frequencies))  # (F, K)
        if lite:
            self.linear = nn.Linear(2 * n_frequencies, d_embedding)
        else:
            # One Linear(2K -> D) per feature, batched as a (F, 2K, D) tensor.
            self.weight = nn.Parameter(torch.empty(n_features, 2 * n_frequencies, d_embedding))  # (F, 2K, D)
            self.bias = nn.Parameter(torch.empty(n_features, d_embedding))  # (F, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        sigma = self.frequency_init_scale
        nn.init.trunc_normal_(self.frequencies, 0.0, sigma, a=-3 * sigma, b=3 * sigma)
        if self.lite:
            self.linear.reset_parameters()
        else:
            # Same init as nn.Linear(2K, D), feature by feature.
            bound = 1 / math.sqrt(2 * self.n_frequencies)
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Numeric features (B, F) -> embeddings (B, F, D)."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected (B, {self.n_features}) numeric features, got {tuple(x.shape)}")
        angles = 2 * math.pi * self.frequencies[None] * x[..., None]  # (1, F, K) * (B, F, 1) -> (B, F, K)
        periodic = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, F, 2K)
        if self.lite:
            out = self.linear(periodic)  # (B, F, D)
        else:
            out = torch.einsum("bfk,fkd->bfd", periodic, self.weight) + self.bias  # (B, F, D)
        return F.relu(out)


class CrossLayer(nn.Module):
    """One DCNv2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l, with W full rank or low rank (W = U V^T).

    Args:
        dim: X, the width of x0 and x_l.
        rank: None for a full-rank W (X x X); an int r < X for the low-rank mixture-free variant, W = U V^T
            with U, V of shape (X, r), which costs 2 X r parameters instead of X^2.
    """

    def __init__(self, dim: int, rank: int | None = None):
        super().__init__()
        if rank is not None and not 0 < rank:
            raise ValueError(f"rank must be a positive integer or None, got {rank}")
        self.rank = rank
        if rank is None:
            self.weight = nn.Linear(dim, dim)
        else:
            self.down = nn.Linear(dim, rank, bias=False)  # V^T: (X -> r)
            self.up = nn.Linear(rank, dim)  # U and the bias b: (r -> X)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0, x_l (B, X) -> x_{l+1} (B, X)."""
        projected = self.weight(x) if self.rank is None else self.up(self.down(x))  # (B, X)
        return x0 * projected + x


class DCNv2(nn.Module):
    """DCNv2: a stack of cross layers and a deep MLP tower, combined "stacked" or "parallel".

    stacked: deep(cross(x0)), output width deep_layers[-1] (the paper's better-performing default).
    parallel: cat(cross(x0), deep(x0)), output width X + deep_layers[-1].
    With no deep layers the output is the cross stack alone (width X).

    Args:
        d_in: X, the width of the flattened tabular input.
        n_cross_layers: number of cross layers.
        deep_layers: widths of the deep tower's hidden layers (ReLU, dropout after each).
        rank: None for full-rank cross layers, else the low-rank r.
        structure: "stacked" or "parallel".
        dropout: dropout after each deep layer.
    """

    def __init__(
        self,
        d_in: int,
        n_cross_layers: int = 2,
        deep_layers: Sequence[int] = (128, 128),
        rank: int | None = None,
        structure: Literal["stacked", "parallel"] = "stacked",
        dropout: float = 0.1,
    ):
        super().__init__()
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be 'stacked' or 'parallel', got {structure!r}")
        self.structure = structure
        self.cross = nn.ModuleList(CrossLayer(d_in, rank) for _ in range(n_cross_layers))
        layers: list[nn.Module] = []
        width = d_in
        for hidden in deep_layers:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        self.deep = nn.Sequential(*layers)
        deep_out = deep_layers[-1] if deep_layers else 0
        if not deep_layers:
            self.output_dim = d_in
        elif structure == "stacked":
            self.output_dim = deep_out
        else:
            self.output_dim = d_in + deep_out

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Flattened tabular input (B, X) -> (B, output_dim)."""
        x = x0
        for layer in self.cross:
            x = layer(x0, x)  # (B, X)
        if len(self.deep) == 0:
            return x
        if self.structure == "stacked":
            return self.deep(x)  # (B, deep_layers[-1])
        return torch.cat([x, self.deep(x0)], dim=-1)  # (B, X + deep_layers[-1])


__all__ = ["PeriodicEmbeddings", "CrossLayer", "DCNv2"]
