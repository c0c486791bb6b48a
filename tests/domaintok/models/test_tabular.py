"""PLR periodic embeddings and DCNv2 cross networks: shapes, gradients, parameter sets, the cross formula."""

from __future__ import annotations

import math

import pytest
import torch

from domaintok.models.tabular import CrossLayer, DCNv2, PeriodicEmbeddings


@pytest.mark.parametrize("lite", [False, True])
def test_plr_shapes_and_gradients(lite):
    torch.manual_seed(0)
    plr = PeriodicEmbeddings(n_features=5, d_embedding=8, n_frequencies=6, frequency_init_scale=0.1, lite=lite)
    x = torch.randn(3, 5, requires_grad=True)
    out = plr(x)
    assert out.shape == (3, 5, 8)
    assert (out >= 0).all()  # ReLU output
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in plr.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_plr_has_no_phase_parameter():
    plr = PeriodicEmbeddings(n_features=4, d_embedding=8, n_frequencies=6)
    names = {name for name, _ in plr.named_parameters()}
    assert names == {"frequencies", "weight", "bias"}
    lite = PeriodicEmbeddings(n_features=4, d_embedding=8, n_frequencies=6, lite=True)
    assert {name for name, _ in lite.named_parameters()} == {"frequencies", "linear.weight", "linear.bias"}
    # The lite variant shares its Linear: parameters do not grow with the number of features past the frequencies.
    assert lite.linear.weight.shape == (8, 12)


def test_plr_matches_the_formula_and_init_scale():
    torch.manual_seed(0)
    plr = PeriodicEmbeddings(n_features=2, d_embedding=3, n_frequencies=4, frequency_init_scale=0.01)
    assert plr.frequencies.abs().max() <= 0.03 + 1e-7  # truncated at 3 sigma
    x = torch.tensor([[0.5, -2.0]])
    angles = 2 * math.pi * plr.frequencies[1] * -2.0  # feature 1: (K,)
    periodic = torch.cat([torch.cos(angles), torch.sin(angles)])  # (2K,)
    expected = torch.relu(periodic @ plr.weight[1] + plr.bias[1])  # (D,)
    torch.testing.assert_close(plr(x)[0, 1], expected)


def test_plr_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        PeriodicEmbeddings(n_features=3)(torch.zeros(2, 4))


def test_cross_layer_full_rank_formula():
    torch.manual_seed(0)
    layer = CrossLayer(4)
    x0, x = torch.randn(2, 4), torch.randn(2, 4)
    expected = x0 * (x @ layer.weight.weight.T + layer.weight.bias) + x
    torch.testing.assert_close(layer(x0, x), expected)


def test_cross_layer_low_rank_is_u_v_transpose():
    torch.manual_seed(0)
    layer = CrossLayer(6, rank=2)
    assert sum(p.numel() for p in layer.parameters()) == 6 * 2 + 2 * 6 + 6
    x0, x = torch.randn(3, 6), torch.randn(3, 6)
    W = layer.up.weight @ layer.down.weight  # (6, 2) @ (2, 6) = U V^T
    torch.testing.assert_close(layer(x0, x), x0 * (x @ W.T + layer.up.bias) + x)


@pytest.mark.parametrize(
    ("structure", "deep", "rank", "width"),
    [("stacked", (16, 8), None, 8), ("parallel", (16, 8), 3, 10 + 8), ("stacked", (), None, 10)],
)
def test_dcnv2_shapes_and_gradients(structure, deep, rank, width):
    torch.manual_seed(0)
    net = DCNv2(10, n_cross_layers=2, deep_layers=deep, rank=rank, structure=structure, dropout=0.0)
    assert net.output_dim == width
    x = torch.randn(4, 10, requires_grad=True)
    out = net(x)
    assert out.shape == (4, width)
    out.pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_dcnv2_rejects_unknown_structure():
    with pytest.raises(ValueError, match="structure"):
        DCNv2(4, structure="mixture")
