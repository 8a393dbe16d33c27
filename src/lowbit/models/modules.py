"""Module access by dotted path, linear weights in one orientation, and scale folding."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import InvalidWeightsError, LowbitError


def untied_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with the first name of each tied one only (the embedding, not the head tied
    to it): safetensors refuses shared storage."""
    seen: set[tuple] = set()
    out = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """The module at `path`, or None when an attribute on the way is missing or None."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = find_module(root, path)
    if mod is None:
        raise AttributeError(f"{type(root).__name__} has no module at {path!r}")
    return mod


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    if name not in parent._modules:
        raise AttributeError(f"{type(root).__name__} has no module at {path!r}")
    setattr(parent, name, new)  # ModuleList children are registered under "0", "1", ... too


# ----------------------------------------------------------------------------- linears

def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _check_linear(module: nn.Module) -> None:
    if not is_linear(module):
        raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features), whatever the storage order."""
    _check_linear(module)
    w = module.weight
    return (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else (w.shape[0], w.shape[1])


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in]. A view of the parameter: in-place edits reach the module."""
    _check_linear(module)
    # GPT-2's Conv1D stores [in, out] and computes x @ W
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


@torch.no_grad()
def set_linear_weight(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Copies an [out, in] weight into the module's own parameter, keeping its dtype and device."""
    expected = linear_shape(module)
    if tuple(w_out_in.shape) != expected:
        raise InvalidWeightsError(
            f"weight of shape {tuple(w_out_in.shape)} does not fit a layer of (out, in) = {expected}"
        )
    linear_weight(module).copy_(w_out_in)


# ----------------------------------------------------------------------------- norm flavour

# Norms whose output is normalize(x) * (1 + weight). Checked by exact class name: a subclass or a
# renamed copy falls through to the probe below rather than inheriting a guess.
_OFFSET_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})
_UNIT_NORMS = frozenset({
    "LayerNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm",
})


def norm_offset(module: nn.Module) -> float:
    """The constant a norm adds to its weight before multiplying: 0.0 for LayerNorm and Llama-style
    RMSNorm, 1.0 for Gemma's.

    Known classes are answered by name. Others are probed: the norm runs (in float32, on its own
    device) on a zero-mean, unit-RMS input x and on -x; for LayerNorm and RMSNorm alike,
    (out(x) - out(-x)) / 2x is the effective per-channel gain and its difference to the stored
    weight is the offset. Anything other than a clean 0 or 1 raises rather than guessing.
    """
    name = type(module).__name__
    if name in _OFFSET_NORMS:
        return 1.0
    if name in _UNIT_NORMS:
        return 0.0
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() < 2:
        raise LowbitError(f"cannot tell how {name} applies its weight: no 1-D weight to probe")
    d = weight.numel()
    x = torch.ones(d, device=weight.device)
    x[1::2] = -1.0
    if d % 2:
        x[-1] = 0.0  # keeps the mean at zero so LayerNorm's centering leaves x alone
    params = {k: v.detach().float() for k, v in module.named_parameters(recurse=False)}
    params.update({k: v.float() if v.is_floating_point() else v for k, v in module.named_buffers(recurse=False)})
    with torch.no_grad():
        pos = torch.func.functional_call(module, params, (x[None],))[0].float()
        neg = torch.func.functional_call(module, params, (-x[None],))[0].float()
    x_hat = x / x.pow(2).mean().sqrt()
    live = x != 0
    gain = ((pos - neg) / (2 * x_hat))[live]
    offset = (gain - weight.detach().float()[live]).median().item()
    tol = 1e-3 * (1 + weight.detach().float().abs().max().item())
    for candidate in (0.0, 1.0):
        if torch.allclose(gain, weight.detach().float()[live] + candidate, atol=tol, rtol=1e-3):
            return candidate
    raise LowbitError(f"cannot tell how {name} applies its weight (probe found offset {offset:.4g})")


# ----------------------------------------------------------------------------- folding

def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # at least float32: bf16 arithmetic would round the scales away; float64 models stay float64
    return torch.promote_types(t.dtype, torch.float32)


def _out_features(module: nn.Module, kind: str) -> int:
    if kind == "norm":
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise InvalidWeightsError(f"{type(module).__name__} has no weight to absorb scales")
        return weight.numel()
    return linear_shape(module)[0]


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: Iterable[nn.Module], scales: torch.Tensor, kind: str, *,
                offset: float | None = None) -> None:
    """Divides prev's output channels by `scales` and multiplies the linears' input columns by them.

    The composition computes the same function (up to rounding): prev(x) / s feeds W * s.
    kind "norm": weight and bias of a LayerNorm/RMSNorm; for an offset norm the effective gain
    (offset + weight) is divided, the stored weight follows. `offset` overrides detection.
    kind "linear": prev's output rows and bias. Weights keep their dtype; arithmetic is float32 or
    wider.
    """
    if kind == "act":
        raise NotImplementedError(
            "folding a scale across a GELU needs AutoAWQ's ScaledActivation wrapper, which comes with AWQ; "
            "skip pairs of kind 'act' until then"
        )
    if kind not in ("norm", "linear"):
        raise ValueError(f"unknown fold kind {kind!r}; expected 'norm', 'linear' or 'act'")
    linears = list(linears)
    s = scales.detach().reshape(-1)
    n = _out_features(prev, kind)
    if s.numel() != n:
        raise InvalidWeightsError(f"{s.numel()} scales for {type(prev).__name__} with {n} output channels")
    for lin in linears:
        if linear_shape(lin)[1] != n:
            raise InvalidWeightsError(f"a linear with {linear_shape(lin)[1]} inputs cannot follow {n} channels")
    s32 = s.float()
    if not bool(torch.isfinite(s32).all()) or not bool((s32 > 0).all()):
        raise InvalidWeightsError("scales must be finite and positive")

    if kind == "norm":
        off = norm_offset(prev) if offset is None else float(offset)
        w = prev.weight
        sc = s.to(w.device, _compute_dtype(w))
        w.copy_((w.to(sc.dtype) + off) / sc - off)
    else:
        w = linear_weight(prev)
        sc = s.to(w.device, _compute_dtype(w))
        set_linear_weight(prev, w.to(sc.dtype) / sc[:, None])
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        sb = s.to(bias.device, _compute_dtype(bias))
        bias.copy_(bias.to(sb.dtype) / sb)

    for lin in linears:
        w = linear_weight(lin)
        sc = s.to(w.device, _compute_dtype(w))
        set_linear_weight(lin, w.to(sc.dtype) * sc[None, :])
