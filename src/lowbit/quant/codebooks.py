"""Non-linear codebooks: values in [-1, 1] that a per-group absmax scale stretches onto a weight.

`NF4_CODEBOOK` is QLoRA's NormalFloat-4 (quantiles of a standard normal, rescaled so the ends are
±1, with an exact 0). `kmeans_codebook` learns one from the data instead (Lloyd's algorithm in 1-D).
"""

from __future__ import annotations

import torch

from ..errors import InvalidWeightsError, SpecError

# Dettmers et al., "QLoRA" (2023), Appendix E: the 16 NF4 levels, sorted; 7 negative, 0, 8 positive.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# Lloyd's assignment step touches every sample each iteration; beyond this a random subsample
# pins the codebook just as well at a fraction of the cost.
_KMEANS_MAX_SAMPLES = 1 << 20


def nearest_code(v: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape of v) of the codebook entry nearest to each value of v.

    In 1-D the nearest entry is found by bucketing against the midpoints of the sorted codebook,
    O(n log K) and no [n, K] distance matrix.
    """
    cb, order = codebook.to(v.device, torch.float32).sort()
    mids = (cb[1:] + cb[:-1]) / 2
    return order[torch.bucketize(v.float().contiguous(), mids)]


def _panter_dite_init(v_sorted: torch.Tensor, k: int, bins: int = 512) -> torch.Tensor:
    """k starting centroids spaced by the cumulative density^(1/3) of the data.

    That spacing is the high-resolution optimum (Panter & Dite, 1951): plain quantiles crowd the
    centre and leave Lloyd dozens of iterations of slow outward creep; this starts next to the optimum.
    """
    lo, hi = float(v_sorted[0]), float(v_sorted[-1])
    if lo == hi:
        return torch.full((k,), lo, device=v_sorted.device)
    density = torch.histc(v_sorted, bins, lo, hi).div_(v_sorted.numel()).pow_(1 / 3)
    cdf = density.cumsum(0)
    cdf = cdf / cdf[-1]
    targets = (torch.arange(k, device=v_sorted.device, dtype=torch.float32) + 0.5) / k
    idx = torch.searchsorted(cdf, targets).clamp_max(bins - 1)
    return lo + (idx.float() + 0.5) * (hi - lo) / bins  # bin centres


def kmeans_codebook(x: torch.Tensor, bits: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """A learned codebook `[2**bits]` float32, sorted, for the values of `x / x.abs().max()`.

    Pass x already divided by its per-group absmax (as `choose_qparams` does) and the division is a
    no-op. Lloyd iterations from a density^(1/3) start; deterministic: `seed` only picks the
    subsample used when x has more than 2**20 values.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SpecError(f"codebook bits must be an int in 1..8, got {bits!r}")
    v = x.detach().reshape(-1).float()
    if v.numel() == 0:
        raise InvalidWeightsError("cannot learn a codebook from an empty tensor")
    if not bool(torch.isfinite(v).all()):
        raise InvalidWeightsError("cannot learn a codebook from values with NaN or Inf")
    amax = v.abs().max()
    if amax > 0:
        v = v / amax
    if v.numel() > _KMEANS_MAX_SAMPLES:
        g = torch.Generator(device="cpu").manual_seed(seed)
        idx = torch.randint(v.numel(), (_KMEANS_MAX_SAMPLES,), generator=g).to(v.device)
        v = v[idx]
    k = 2**bits
    v_sorted = v.sort().values
    c = _panter_dite_init(v_sorted, k)
    for _ in range(iters):
        mids = (c[1:] + c[:-1]) / 2
        assign = torch.bucketize(v_sorted, mids)
        sums = torch.zeros(k, device=v.device).scatter_add_(0, assign, v_sorted)
        counts = torch.bincount(assign, minlength=k).float()
        # An empty cluster keeps its centroid instead of collapsing to 0.
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c).sort().values
        if torch.equal(new, c):
            break
        c = new
    return c
