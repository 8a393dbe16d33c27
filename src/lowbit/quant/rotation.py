"""Randomized block-Hadamard rotations of a linear's input (incoherence processing).

`y = W x = (W R^T)(R x)` for any orthogonal R, so a linear can be stored with the weight `W R^T` and
fed `R x`: the float output is unchanged. What changes is what rounding sees. A per-token int8 scale
is set by the token's largest entry; in these models a few channels sit far above the rest (the
large channels of an RMSNorm output, SwiGLU's spikes), so most entries use a few steps of the grid.
After `R` each entry is a signed mix of `block` channels, the large ones are spread over the whole
block and the token's absmax over its RMS falls towards that of a Gaussian; the same holds for the
weight rows, which `W R^T` mixes the same way. (QuaRot, Ashkboos et al. 2024, and QuIP#, Tseng et al.
2024, rotate for the same reason.)

R = blockdiag(H_b, ..., H_b) diag(signs): a random sign per input channel, then the normalized
Sylvester-Hadamard matrix of order `block` (a power of two) on each run of `block` channels. It is
orthogonal, costs `block` multiply-adds per entry as a small matmul, and is fixed by the signs (int8,
one per input channel, stored with the module) and the block size.
"""

from __future__ import annotations

import functools

import torch

from ..errors import SpecError

__all__ = ["hadamard", "rotation_signs", "check_rotation_block", "rotate", "unrotate"]


@functools.lru_cache(maxsize=16)
def _hadamard64(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The normalized Sylvester-Hadamard matrix of order n (a power of two): symmetric, orthogonal."""
    if n < 1 or n & (n - 1):
        raise SpecError(f"a Hadamard rotation block must be a power of two, got {n}")
    return _hadamard64(n).to(dtype=dtype, device=device)


def check_rotation_block(in_features: int, block: int, name: str = "") -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block < 2 or block & (block - 1):
        raise SpecError(f"layer {name or '?'}: the rotation block must be a power of two >= 2, got {block!r}")
    if in_features % block:
        raise SpecError(f"layer {name or '?'}: {in_features} input features are not divisible by the rotation "
                        f"block {block}; pick a block that divides them (or no rotation)")


def rotation_signs(in_features: int, seed: int = 0) -> torch.Tensor:
    """One random sign (int8, +-1) per input channel; the same (in_features, seed) gives the same signs,
    so linears reading one tensor share one rotation."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(in_features))
    return (torch.randint(0, 2, (in_features,), generator=gen) * 2 - 1).to(torch.int8)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """R x on the last dimension of x (in `dtype`): x times the signs, then H on each block. Applied to
    the rows of a weight `[out, in]` it gives `W R^T`."""
    k = x.shape[-1]
    if signs.numel() != k or k % block:
        raise SpecError(f"rotate: {k} features against {signs.numel()} signs and block {block}")
    h = hadamard(block, dtype, x.device)
    xr = x.to(dtype) * signs.to(dtype=dtype, device=x.device)
    # H is symmetric, so each block's H v is the row-vector product v @ H
    return (xr.reshape(-1, k // block, block) @ h).reshape(x.shape)


def unrotate(y: torch.Tensor, signs: torch.Tensor, block: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """R^T y: the inverse of `rotate` (H on each block, then the signs)."""
    k = y.shape[-1]
    if signs.numel() != k or k % block:
        raise SpecError(f"unrotate: {k} features against {signs.numel()} signs and block {block}")
    h = hadamard(block, dtype, y.device)
    return ((y.to(dtype).reshape(-1, k // block, block) @ h).reshape(y.shape)
            * signs.to(dtype=dtype, device=y.device))
