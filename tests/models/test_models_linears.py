import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lowbit.errors import InvalidWeightsError
from lowbit.models import get_module, is_linear, linear_shape, linear_weight, set_linear_weight, set_module


@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 5), lambda: Conv1D(5, 12)], ids=["linear", "conv1d"])
def test_linear_weight_is_out_by_in_for_both_storages(make):
    torch.manual_seed(0)
    m = make()
    x = torch.randn(3, 12)
    assert is_linear(m) and linear_shape(m) == (5, 12)
    w = linear_weight(m)
    assert w.shape == (5, 12)
    torch.testing.assert_close(m(x), x @ w.T + m.bias)

    new = torch.randn(5, 12)
    set_linear_weight(m, new)
    torch.testing.assert_close(linear_weight(m), new)
    torch.testing.assert_close(m(x), x @ new.T + m.bias)
    with pytest.raises(InvalidWeightsError):
        set_linear_weight(m, torch.randn(12, 5))


def test_non_linears_are_rejected():
    assert not is_linear(nn.LayerNorm(4))
    with pytest.raises(TypeError):
        linear_weight(nn.LayerNorm(4))


def test_set_linear_weight_keeps_dtype():
    m = nn.Linear(4, 2).bfloat16()
    set_linear_weight(m, torch.ones(2, 4, dtype=torch.float64))
    assert m.weight.dtype == torch.bfloat16 and bool((m.weight == 1).all())


def test_get_and_set_module_through_module_lists():
    root = nn.Module()
    root.layers = nn.ModuleList([nn.Sequential(nn.Linear(2, 2)) for _ in range(2)])
    assert get_module(root, "layers.1.0") is root.layers[1][0]
    new = nn.Identity()
    set_module(root, "layers.1.0", new)
    assert root.layers[1][0] is new
    set_module(root, "layers.0", new)
    assert root.layers[0] is new
    with pytest.raises(AttributeError):
        get_module(root, "layers.5")
    with pytest.raises(AttributeError):
        set_module(root, "layers.1.nope", new)
