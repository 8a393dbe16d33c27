"""Weight-only quantized GEMM: ``y = x @ dequantize(q, scales, zeros).T + bias``.

Canonical weight (what packed modules store and checkpoints hold)::

    q       [N, K]       integer codes in [0, 2**bits)
    scales  [N, K // G]  float
    zeros   [N, K // G]  float, integer-valued, in code units (symmetric: 2**(bits-1))
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

``prepare_wint`` turns it once into the runtime tensors of the fast backends (a flat
``dict[str, Tensor]`` a module can register as buffers); ``wint_gemm`` picks a backend by the
number of tokens and runs it. Nothing here holds state.

Backends (all but ``ref`` compute with bf16 activations and fp32 accumulation):

- ``ref``: dequantize in float32 and ``F.linear`` (exact; the test oracle).
- ``int4pack``: ``aten._weight_int4pack_mm_for_cpu`` for bits <= 4 (2- and 3-bit codes are
  4-bit codes too). Group sizes 32/64/128/256; a larger group (per-channel included) runs as
  the largest of those dividing it, its scale repeated. Needs N % 16 == 0.
- ``int4cpp``: our C++ kernel (``_wint_cpp``, AVX512-BF16) on the same int4pack tensors, about
  2.5x faster than the aten op; there when the extension builds (on first use, cached).
- ``int8pack``: ``aten._weight_int8pack_mm`` for per-channel weights (bits 5..8). Codes are
  stored as ``q - zeros`` when that fits int8, else as ``q - 128`` with the asymmetric part
  added back exactly as a rank-1 term ``x.sum(-1) * (128 - zeros) * scales``. Needs
  K % 16 == 0 (torch 2.13 reads out of bounds otherwise).
- ``nib``: our C++ kernel for CPUs without AVX512 (``_nib_cpp``, AVX2 + FMA) on lowbit's own nibble
  layout (0.5 byte/weight, float32 scales and offsets), activations rounded to int16 per token; for a
  few tokens.
  ``auto`` uses it where torch's int4pack layout is not the AVX512 one (AVX2 CPUs: there the aten
  op is 2-3x slower and the int4cpp kernels do not run) up to ``NIB_MAX_M`` tokens, and keeps no
  other form of the weight there: the dequant path reads the nibbles too (0.625 byte/weight at run
  time for g64, where int4pack plus int8 codes made it about 2.2).
- ``dequant``: dequantize N-chunks of the weight to bf16 (float32 on CPUs without fast bf16) and run
  a GEMM per chunk (chunks stay in cache and reuse one buffer). Reads whichever compact form was
  prepared: nib's nibbles (float32 scales, ``nib_dequant``), int8 codes
  ``q - zeros`` (1 byte/weight, the fastest with torch ops alone), the int8pack weight, or the
  int4pack nibbles (no extra memory; fastest of all with the C++ extension, about 2x the codes
  path with torch ops alone).

The weight-only kernels are GEMV-like: fast for a few tokens (bandwidth-bound decode), 2-3x
slower than a bf16 GEMM for hundreds of tokens (compute-bound prefill). ``auto`` switches at
the ``*_MAX_M`` token counts (figures next to the constants).
"""

from __future__ import annotations


import functools
import threading
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from lowbit.errors import GroupSizeError, SpecError
from lowbit.kernels import _nib_cpp, _wint_cpp
from lowbit.kernels._dispatch import fast_bf16, forced_backend

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "INT4PACK_MAX_M",
    "INT4CPP_MAX_M",
    "INT4PACK_MAX_M_NIBBLES",
    "INT8PACK_MAX_M",
    "NIB_MAX_M",
    "wint_gemm_ref",
    "prepare_wint",
    "select_backend",
    "available_backends",
    "prepared_shape",
    "unpack_int4pack",
    "wint_gemm",
    "prepare_codebook4",
    "codebook4_linear",
]

BACKENDS = ("ref", "int4pack", "int4cpp", "int8pack", "nib", "dequant")
BACKEND_ENV = "LOWBIT_WINT_BACKEND"  # force a backend (tests, benchmarks); "auto" or unset: dispatch

# THRESHOLDS: largest token count M (rows of x) for which ``auto`` runs the weight-only kernel;
# above it, dequantize + bf16 GEMM. Measured on the 2-core AMD EPYC dev machine (Zen4:
# avx512_bf16, avx512_vnni, no AMX), torch 2.13, g64 asymmetric weights; 1 thread, process CPU
# time (the shared cores made 2-thread wall times unusable; see bench/kernels.py for those).
# ms, weight-only kernel vs the dequant path it competes with:
#
#   int4cpp vs the panel GEMM (C++, AVX512-BF16; `int4pack_gemm_panels`, the dequant path from
#   PANELS_MIN_M tokens):                  M=16        M=32        M=48        M=64        M=128
#     4096x4096                            4.21/4.17   6.36/6.26   9.17/8.48   12.0/11.4   24.2/20.6
#     576x1536                                         0.33/0.30               0.63/0.55   -> 32
#   before it (int4cpp vs dequant from nibbles, C++; what CPUs without AVX512-BF16 still run):
#   int4cpp vs dequant from nibbles (C++)  M=64        M=128       M=256
#     576x576                              0.26/0.30   0.64/0.57   1.09/0.87
#     576x1536                             0.64/0.72   1.27/1.23   2.58/2.35
#     4096x4096                            12.3/13.9   23.7/24.4   47.6/44.7
#     4096x11008                           30.5/37.5   62.4/70.9   119/113     -> 128
#   int4pack vs dequant from int8 codes    M=16        M=32        M=64
#     576x576                              0.14/0.23   0.26/0.28   0.53/0.39
#     1536x576                             0.35/0.53   0.67/0.64   1.33/0.88
#     4096x4096                            6.6/10.0    12.8/12.5   25.4/17.8
#     4096x11008                           17.2/24.8   34.1/31.8   68.3/44.1  -> 32
#   int4pack vs dequant from nibbles (torch, no C++): M=64 26.2/34.3, M=128 59.8/58.2
#     (4096x4096); 576x1536 M=64 1.41/1.83, M=128 2.82/2.38                  -> 96
#   int8pack vs dequant from its int8 weight (per-channel scale applied to the output)
#     asym (rank-1 offset)                 M=4         M=8         M=16
#     576x1536                             0.13/0.29   0.23/0.32   0.43/0.39
#     4096x4096                            2.0/4.5     4.4/5.6     8.2/6.4
#     4096x11008                           6.2/12.4    11.7/13.7   22.9/17.1  -> 8
# The two vCPUs gave no speedup over one thread for any of these ops (contended by other
# tenants), so these are one-core figures; with two free cores int8pack scaled 2x and tied
# the dequant path at M=16 on 4096x4096.
INT4CPP_MAX_M = 32
INT4PACK_MAX_M = 32
INT4PACK_MAX_M_NIBBLES = 96
INT8PACK_MAX_M = 8
# nib (AVX2 CPUs) against float32 F.linear, g64, 1 thread, process CPU time, 2-core AMD EPYC with AVX2
# alone: 4096x4096 M=1 0.87 / 3.82 ms, 4096x11008 M=1 2.90 / 11.15 (bench/out/kernels_avx2_s17.json).
# Against the dequant path that reads its nibbles (nib_dequant + float32 GEMM per chunk; at M=8 its
# torch-ops version), ms, one session, same conditions (bench/RESULTS.md, W4 on the AVX2 machine);
# int4pack was slower than nib at 8, 32 and 64 tokens:
#                    M=8          M=32         M=64          M=512
#   4096x4096        8.2 / 38.9   24.3 / 44.9  38.8 / 77.5   447 / 304
#   4096x11008       17.9 / 84.7  72.5 / 98.7  116.8 / 168.6 1226 / 848          -> 64
NIB_MAX_M = 64

# int4pack group sizes accepted by aten._weight_int4pack_mm_for_cpu (torch 2.13).
INT4PACK_GROUP_SIZES = (256, 128, 64, 32)
# bf16 bytes of weight dequantized per chunk on the dequant path (fits L2 with the codes).
DEQUANT_CHUNK_BYTES = 2 * 1024 * 1024
# From this many tokens the int4pack dequant path dequantizes the whole weight (a transient bf16
# copy of one layer, freed after the call) and runs one GEMM: at M=512 on 4096x4096 that ran
# about 2x faster than chunks of 2 MiB, whose thin GEMMs oneDNN handles poorly.
DEQUANT_WHOLE_MIN_M = 256
# From this many tokens, with the C++ extension on an AVX512-BF16 CPU, the int4pack dequant path
# runs int4pack_gemm_panels instead (dequantizing into the GEMM's own k-pair panels). ms at 1
# thread, panels / the whole-weight dequant + bf16 GEMM it replaces / bf16 F.linear on a bf16
# weight (wall, one session): 4096x4096 M=512 81.3 / 91.4 / 83.4; 4096x11008 M=512 209.5 / 241.8
# / 220.6. bench/kernels.py (1 thread, CPU time; bench/out/kernels_panels.json), panels / bf16:
# 4096x4096 M=64 11.2 / 12.0, M=512 77.9 / 80.6; 4096x11008 M=512 209.6 / 214.6; 576x1536 M=512
# 4.45 / 4.27 (K=576 is too short a slice to hide the panel's fill)
PANELS_MIN_M = 32
# bf16 bytes of one block's k-slice panel (64 rows): stays in L2 while every tile of x runs over it
PANEL_BYTES = 512 * 1024

_BF16 = torch.bfloat16


# ----------------------------------------------------------------------------------------
# reference


def _expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K // G] -> [N, K] float32."""
    return t.float().repeat_interleave(group_size, dim=1)


def _check_canonical(q, scales, zeros, group_size) -> tuple[int, int]:
    if q.dim() != 2:
        raise SpecError(f"wint: q must be 2-D [out, in], got shape {tuple(q.shape)}")
    if q.is_floating_point() or q.is_complex():
        raise SpecError(f"wint: q must hold integer codes, got {q.dtype}")
    n, k = q.shape
    if group_size <= 0 or k % group_size:
        raise GroupSizeError(f"wint: group size {group_size} does not divide in_features {k}")
    want = (n, k // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != want:
            raise SpecError(f"wint: {name} must have shape {want}, got {tuple(t.shape)}")
    return n, k


def wint_gemm_ref(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize in float32 and ``F.linear``; output in x's dtype. The reference of every backend."""
    _check_canonical(q, scales, zeros, group_size)
    w = (q.float() - _expand_groups(zeros, group_size)) * _expand_groups(scales, group_size)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


# ----------------------------------------------------------------------------------------
# preparation


def _int4pack_group(group_size: int) -> int | None:
    """Largest op-accepted group size dividing ``group_size`` (None if there is none)."""
    for g in INT4PACK_GROUP_SIZES:
        if group_size % g == 0:
            return g
    return None


def _int4pack_refusal(n: int, k: int, bits: int, group_size: int) -> str | None:
    if bits > 4:
        return f"{bits}-bit codes do not fit 4 bits"
    if _int4pack_group(group_size) is None:
        return f"group size {group_size} is not a multiple of 32"
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    return None


def _int8pack_refusal(n: int, k: int, bits: int, group_size: int) -> str | None:
    if group_size != k:
        return f"group size {group_size} is not per-channel (in_features {k})"
    if k % 16:
        return f"in_features {k} is not a multiple of 16"
    return None


def _int8_codes(q: torch.Tensor, zeros_full: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int8 codes c and optional per-group offset o with W = (c + o_code) * s exactly.

    ``q - zeros`` when it fits int8 (always for bits <= 7 with zeros in range): no offset.
    Else ``q - 128`` and offset ``(128 - zeros) * scales`` (float32, [N, K // G]).
    """
    d = q.float() - zeros_full
    if d.min() >= -128 and d.max() <= 127:
        return d.to(torch.int8), None
    return (q.to(torch.int16) - 128).to(torch.int8), (128.0 - zeros.float()) * scales.float()


@functools.lru_cache(maxsize=1)
def int4pack_layout_known() -> bool:
    """Whether this CPU's torch packs int4 weights in the layout ``unpack_int4pack`` reads (the
    AVX512 one; torch packs differently on AVX2-only CPUs, where the dequant path keeps int8 codes
    and the C++ kernels fail their self-test)."""
    q = torch.arange(64 * 32, dtype=torch.int32).reshape(64, 32) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return torch.equal(unpack_int4pack(packed, 64, 32), q.to(torch.uint8))


def unpack_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes [N, K] uint8 from ``aten._convert_weight_to_int4pack_for_cpu`` output [N, K // 2].

    torch 2.13 layout: blocks of 64 rows stored as [K, 32] bytes (low nibble row j, high nibble
    row 32 + j); a tail of 16/32/48 rows as [K, tail // 2] bytes (low even row, high odd row).
    ``prepare_wint`` checks this against the op before relying on it.
    """
    flat = packed.reshape(-1)
    out = torch.empty(n, k, dtype=torch.uint8)
    nfull = n // 64 * 64
    if nfull:
        b = flat[: nfull * k // 2].view(nfull // 64, k, 32)
        out[:nfull] = torch.cat([b & 15, b >> 4], dim=2).transpose(1, 2).reshape(nfull, k)
    tail = n - nfull
    if tail:
        t = flat[nfull * k // 2 :].view(k, tail // 2)
        out[nfull:] = torch.stack([t & 15, t >> 4], dim=2).reshape(k, tail).t()
    return out


def prepare_wint(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    backends: str | Iterable[str] = "auto",
) -> dict[str, torch.Tensor]:
    """Runtime tensors for the fast backends, from the canonical weight.

    ``backends``: ``"auto"``, or an iterable of names from ``BACKENDS``. ``auto`` keeps one
    compact form: int4pack for bits <= 4 (0.5 byte/weight; ``int4pack``, ``int4cpp`` and
    ``dequant`` all read it), or nib's nibbles on CPUs that use nib (``nib`` and ``dequant`` read
    them), int8pack for per-channel bits 5..8, else int8 dequant codes.
    Adding ``"dequant"`` to an explicit list also keeps int8 codes (1 byte/weight more), the
    fastest prefill when the C++ extension is unavailable. ``int4cpp`` needs nothing of its
    own (it reads the int4pack tensors). Naming a backend the weight cannot use raises
    ``SpecError``. The result holds only tensors under flat keys, so a module can register
    them as buffers.
    """
    n, k = _check_canonical(q, scales, zeros, group_size)
    if not 2 <= bits <= 8:
        raise SpecError(f"wint: bits must be in 2..8, got {bits}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise SpecError(f"wint: codes must lie in [0, {2**bits}) for {bits} bits")
    zf = zeros.float()
    if not torch.equal(zf, zf.round()):
        raise SpecError("wint: zeros must be integer-valued (code units)")

    auto = isinstance(backends, str) and backends == "auto"
    if auto:
        wanted: set[str] = set()
    else:
        wanted = {backends} if isinstance(backends, str) else set(backends)
        unknown = wanted - set(BACKENDS)
        if unknown:
            raise SpecError(f"wint: unknown backend(s) {sorted(unknown)}; choose from {BACKENDS}")

    out: dict[str, torch.Tensor] = {}
    q = q.cpu()
    scales_f = scales.detach().float().cpu()
    zeros_f = zf.cpu()
    zeros_full = _expand_groups(zeros_f, group_size)

    if "ref" in wanted:
        out["ref_q"] = q.to(torch.uint8)
        out["ref_scales"] = scales_f.clone()
        out["ref_zeros"] = zeros_f.clone()

    # nib (AVX2 CPUs) --------------------------------------------------------------------
    why_nib = (None if bits <= 4 and k % 32 == 0 and group_size <= 4096 else
               f"{bits} bits, {k} input features, groups of {group_size} (needs <= 4 bits, K a multiple of 32, "
               f"groups of at most 4096)")
    if "nib" in wanted and why_nib:
        raise SpecError(f"wint: nib cannot run this weight: {why_nib}")
    use_nib = "nib" in wanted or (auto and why_nib is None and not int4pack_layout_known()
                                  and _nib_cpp.load() is not None)
    if use_nib:
        out["nib_weight"] = _nib_cpp.pack_nibbles(q)  # [N, K // 2] uint8 (see pack_nibbles)
        out["nib_scales"] = scales_f.contiguous()  # [N, K // G] float32
        out["nib_offset"] = (-zeros_f * scales_f).contiguous()  # [N, K // G]: W = q * scale + offset

    # int4pack -------------------------------------------------------------------------
    why4 = _int4pack_refusal(n, k, bits, group_size)
    for name in ("int4pack", "int4cpp"):
        if name in wanted and why4:
            raise SpecError(f"wint: {name} cannot run this weight: {why4}")
    int4_dequant_ok = False
    # under auto nib is the only form on CPUs that use it: its nibbles feed the dequant path too
    # (int4pack is the slower few-token kernel there, and the int8 codes cost a byte a weight more)
    nib_only = auto and use_nib
    if (auto and not nib_only or "int4pack" in wanted or "int4cpp" in wanted) and why4 is None:
        g = _int4pack_group(group_size)
        rep = group_size // g
        # 2- and 3-bit codes are moved to the middle of the 4-bit range (q + shift, z + shift:
        # the same weight) so that the op's zero' = (8 - z) * s stays small: it is stored in bf16,
        # and a large zero' cancelling a large (q - 8) * s loses the small weights' precision
        shift = 8 - 2 ** (bits - 1)
        q4 = (q.to(torch.int32) + shift).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        s = scales_f.repeat_interleave(rep, dim=1)  # [N, K // g]
        z = zeros_f.repeat_interleave(rep, dim=1) + shift
        # op convention: w = (q - 8) * scale + zero'  =>  zero' = (8 - z) * s
        sz = torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(_BF16)
        out["int4pack_weight"] = packed  # [N, K // 2] uint8, torch's private layout
        out["int4pack_scales_zeros"] = sz  # [K // g, N, 2] bf16
        # the dequant path can read the nibbles back if torch's layout is the one we know
        # (on CPUs whose layout the probe already found foreign, skip unpacking every layer to learn it again)
        int4_dequant_ok = int4pack_layout_known() and torch.equal(unpack_int4pack(packed, n, k), q4.to(torch.uint8))

    # int8 codes (int8pack weight and/or dequant codes) --------------------------------
    why8 = _int8pack_refusal(n, k, bits, group_size)
    if "int8pack" in wanted and why8:
        raise SpecError(f"wint: int8pack cannot run this weight: {why8}")
    use8 = ("int8pack" in wanted) or (auto and bits > 4 and why8 is None)
    # codes when asked for, when nothing else can feed the dequant path, or when torch's
    # int4pack layout is not the one the nibble reader knows
    want_codes = "dequant" in wanted or (not use8 and not int4_dequant_ok and not nib_only)
    if use8 or want_codes:
        codes, offset = _int8_codes(q, zeros_full, scales_f, zeros_f, group_size)
    if use8:
        out["int8pack_weight"] = codes  # [N, K] int8
        out["int8pack_scales"] = scales_f[:, 0].to(_BF16)  # [N]
        if offset is not None:
            out["int8pack_offset"] = offset[:, 0].contiguous()  # [N] fp32, times x.sum(-1)
    if want_codes and not use8:
        out["dequant_codes"] = codes  # [N, K] int8
        out["dequant_scales"] = scales_f.to(_BF16)  # [N, K // G]
        if offset is not None:
            out["dequant_offset"] = offset.to(_BF16)  # [N, K // G]
    if not out:
        raise SpecError("wint: no backend prepared")
    return out


# ----------------------------------------------------------------------------------------
# dispatch


def available_backends(prepared: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """Backends the prepared tensors can run, in ``BACKENDS`` order."""
    have = []
    if "ref_q" in prepared:
        have.append("ref")
    if "int4pack_weight" in prepared:
        have.append("int4pack")
        if _wint_cpp.load() is not None:
            have.append("int4cpp")
    if "int8pack_weight" in prepared:
        have.append("int8pack")
    if "nib_weight" in prepared and _nib_cpp.load() is not None:
        have.append("nib")
    if _dequant_source(prepared) is not None:
        have.append("dequant")
    return tuple(have)


def prepared_shape(prepared: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(out_features, in_features) of a ``prepare_wint`` result."""
    for key, k_mult in (("ref_q", 1), ("dequant_codes", 1), ("int8pack_weight", 1), ("int4pack_weight", 2),
                        ("nib_weight", 2)):
        if key in prepared:
            w = prepared[key]
            return w.shape[0], w.shape[1] * k_mult
    raise SpecError(f"wint: no prepared weight among keys {sorted(prepared)}")


def _dequant_source(prepared: Mapping[str, torch.Tensor]) -> str | None:
    if "dequant_codes" in prepared:
        return "codes"
    if "int8pack_weight" in prepared:
        return "int8pack"
    if "int4pack_weight" in prepared:
        return "int4pack"
    if "nib_weight" in prepared:
        return "nib"
    return None


def select_backend(m: int, prepared: Mapping[str, torch.Tensor], backend: str = "auto") -> str:
    """Backend ``wint_gemm`` runs for ``m`` rows of activations.

    An explicit ``backend`` wins, then the ``LOWBIT_WINT_BACKEND`` environment variable, then
    ``auto``: the weight-only op up to its ``*_MAX_M`` tokens, dequantize + bf16 GEMM above.
    """
    have = available_backends(prepared)
    if not have:
        raise SpecError(f"wint: no prepared weight among keys {sorted(prepared)}")
    forced = forced_backend("wint", backend, BACKEND_ENV, BACKENDS, have)
    if forced is not None:
        return forced
    if "nib" in have and m <= NIB_MAX_M:
        return "nib"
    if "int4cpp" in have and m <= INT4CPP_MAX_M:
        return "int4cpp"
    if "int4pack" in have:
        # torch ops unpacking nibbles (with the C++ extension the nibbles are read in C++)
        slow_dequant = _dequant_source(prepared) == "int4pack" and "int4cpp" not in have
        if m <= (INT4PACK_MAX_M_NIBBLES if slow_dequant else INT4PACK_MAX_M):
            return "int4pack"
    if "int8pack" in have and m <= INT8PACK_MAX_M:
        return "int8pack"
    if "dequant" in have:
        return "dequant"
    return have[0]


def _run_ref(x2, p, bias):
    n, k = p["ref_q"].shape
    g = k // p["ref_scales"].shape[1]
    return wint_gemm_ref(x2, p["ref_q"], p["ref_scales"], p["ref_zeros"], g, bias)


def _run_int4pack(x2, p, bias):
    w, sz = p["int4pack_weight"], p["int4pack_scales_zeros"]
    g = 2 * w.shape[1] // sz.shape[0]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(_BF16).contiguous(), w, g, sz)
    y = y.to(x2.dtype)
    return y if bias is None else y.add_(bias.to(y.dtype))


def _run_int4cpp(x2, p, bias):
    ext = _wint_cpp.load()
    w, sz = p["int4pack_weight"], p["int4pack_scales_zeros"]
    g = 2 * w.shape[1] // sz.shape[0]
    y = ext.int4pack_gemm(x2.to(_BF16).contiguous(), w, sz, g)  # fp32 [M, N]
    if bias is not None:
        y.add_(bias.float())
    return y.to(x2.dtype)


def _run_nib(x2, p, bias):
    sc = p["nib_scales"]
    g = 2 * p["nib_weight"].shape[1] // sc.shape[1]
    y = _nib_cpp.load().nib_gemm(x2.float().contiguous(), p["nib_weight"], sc, p["nib_offset"], g)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x2.dtype)


def _run_int8pack(x2, p, bias):
    xb = x2.to(_BF16).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(xb, p["int8pack_weight"], p["int8pack_scales"])
    off = p.get("int8pack_offset")
    if off is None:
        y = y.to(x2.dtype)
        return y if bias is None else y.add_(bias.to(y.dtype))
    # exact asymmetric part: sum_k x[m, k] * (128 - z[n]) * s[n]  (rank 1), added in fp32
    y = torch.addcmul(y.float(), xb.float().sum(-1, keepdim=True), off)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x2.dtype)


_WORKSPACE = threading.local()


def _workspace(numel: int, dtype: torch.dtype = _BF16) -> torch.Tensor:
    """A reused buffer of at least numel elements of `dtype` (per thread). A fresh tensor of tens of MB
    per call costs more in page faults than the dequantization itself; keeping one sized for the
    largest layer seen costs that layer's bf16 size once, not per layer."""
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        # a normal tensor even when first needed under inference_mode, so later calls outside it
        # may still write into it
        with torch.inference_mode(False):
            buf = _WORKSPACE.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _chunk_rows(k: int, align: int) -> int:
    rows = max(align, DEQUANT_CHUNK_BYTES // (2 * k) // align * align)
    return rows


def _chunked_linear(xb, n, k, buf, fill):
    """[M, N] = x @ W^T in xb's dtype, W made one chunk of rows at a time in `buf` (flat, a whole
    number of rows of k): `fill(w, n0, n1)` writes rows n0..n1 of W into w `[n1 - n0, k]`."""
    rows = buf.numel() // k
    outs = []
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = buf[: (n1 - n0) * k].view(n1 - n0, k)
        fill(w, n0, n1)
        outs.append(F.linear(xb, w.to(xb.dtype)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _chunked_codes_linear(xb, codes, fill=None):
    """`_chunked_linear` with W made from int8 codes [N, K], one L2-sized chunk of rows at a time;
    `fill(w, n0, n1)` turns a chunk of codes into weights in place."""
    n, k = codes.shape

    def from_codes(w, n0, n1):
        w.copy_(codes[n0:n1])
        if fill is not None:
            fill(w, n0, n1)

    return _chunked_linear(xb, n, k, torch.empty(min(n, _chunk_rows(k, 16)) * k, dtype=xb.dtype), from_codes)


def _dequant_linear_codes(xb, codes, scales, offset):
    """[M, N] in xb's dtype from int8 codes [N, K] and bf16 scales (+ offsets) [N, K // G]."""
    k = codes.shape[1]
    ng = scales.shape[1]

    def fill(w, n0, n1):
        wg = w.view(n1 - n0, ng, k // ng)
        wg.mul_(scales[n0:n1, :, None])
        if offset is not None:
            wg.add_(offset[n0:n1, :, None])

    return _chunked_codes_linear(xb, codes, fill)


def _dequant_linear_nib(xb, packed, scales, offset):
    """[M, N] in xb's dtype from nib's nibbles [N, K / 2] and float32 scales and offsets [N, K // G]
    (W = q * scale + offset), one chunk of rows at a time in one reused float32 buffer."""
    n, k = packed.shape[0], packed.shape[1] * 2
    ng = scales.shape[1]
    ext = _nib_cpp.load()

    def from_nibbles(w, n0, n1):
        if ext is not None:  # one pass (the torch ops below take four and ran 12% slower at M=512)
            ext.nib_dequant(packed, scales, offset, k // ng, n0, n1, w)
            return
        src = packed[n0:n1].view(n1 - n0, k // 32, 16)  # byte i of a run: codes i and i + 16
        w4 = w.view(n1 - n0, k // 32, 2, 16)
        torch.bitwise_and(src, 15, out=w4[:, :, 0])
        torch.bitwise_right_shift(src, 4, out=w4[:, :, 1])
        w.view(n1 - n0, ng, k // ng).mul_(scales[n0:n1, :, None]).add_(offset[n0:n1, :, None])

    return _chunked_linear(xb, n, k, _workspace(min(n, _chunk_rows(k, 16)) * k, torch.float32), from_nibbles)


# up to this many tokens codebook4_linear multiplies in nib's lut_gemm (table lookups in registers), above
# it rebuilds the weight chunk by chunk for a float32 GEMM; see bench/RESULTS.md (NF4)
CODEBOOK4_GEMM_MAX_M = 8


def prepare_codebook4(codes: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor) -> dict | None:
    """The run-time tensors of a 4-bit codebook weight (NF4): nib's nibbles of the codes `[N, K]` (0..15),
    float32 group scales `[N, K // G]` and the 16 codebook values; None where K is not a multiple of 32
    (nib's layout) or the codebook has more than 16 entries."""
    n, k = codes.shape
    if k % 32 or codebook.numel() != 16:
        return None
    return {"cb_packed": _nib_cpp.pack_nibbles(codes), "cb_scales": scales.float().contiguous(),
            "codebook": codebook.float().contiguous()}


def codebook4_linear(x: torch.Tensor, prepared: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` in x's dtype for W = codebook[q] * scale of q's group (from
    `prepare_codebook4`): up to CODEBOOK4_GEMM_MAX_M tokens by nib's lut_gemm where the extension
    builds; otherwise W is made one chunk of rows at a time in a reused float32 buffer (a 16-entry table
    a group, in C++ where the extension builds), then multiplied in x's dtype (float32 or bf16)."""
    packed, scales, cb = prepared["cb_packed"], prepared["cb_scales"], prepared["codebook"]
    n, k = packed.shape[0], packed.shape[1] * 2
    ng = scales.shape[1]
    ext = _nib_cpp.load()

    def fill(w, n0, n1):
        if ext is not None:
            ext.lut_dequant(packed, scales, cb, k // ng, n0, n1, w)
            return
        q = _nib_cpp.unpack_nibbles(packed[n0:n1]).long()
        torch.mul(cb[q].view(n1 - n0, ng, k // ng), scales[n0:n1, :, None], out=w.view(n1 - n0, ng, k // ng))

    x2 = x.reshape(-1, k)
    if ext is not None and x2.shape[0] <= CODEBOOK4_GEMM_MAX_M:
        y = ext.lut_gemm(x2.float().contiguous(), packed, scales, cb, k // ng)
    else:
        xb = x2 if x2.dtype in (torch.float32, _BF16) else x2.float()
        y = _chunked_linear(xb, n, k, _workspace(min(n, _chunk_rows(k, 16)) * k, torch.float32), fill)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _codes_linear_per_channel(xb, codes, scales, offset):
    """fp32 [M, N] = (x @ codes^T) * s (+ x.sum(-1) * offset): per-channel scales go on the output,
    so dequantizing is a single int8 -> bf16 conversion per chunk."""
    y = _chunked_codes_linear(xb, codes).float().mul_(scales.float())
    if offset is not None:
        y.addcmul_(xb.float().sum(-1, keepdim=True), offset.float())
    return y


def _int4pack_scale_offset(sz, cols, dtype=_BF16):
    """s, c [K // g, 1, cols] in `dtype` with W = q * s + c, from the op's (scale, zero) pairs."""
    s = sz[:, cols, 0].float()
    c = sz[:, cols, 1].float() - 8.0 * s
    return s.to(dtype)[:, None, :], c.to(dtype)[:, None, :]


def _panel_blocking(k: int, g: int, nblk: int) -> tuple[int, int]:
    """(kc, ncb) for ``int4pack_gemm_panels``: k-slices whose 64-row bf16 panel fits PANEL_BYTES
    (a whole number of groups, split evenly), and chunks of blocks giving each thread about 4."""
    n_slices = -(-k * 128 // PANEL_BYTES)
    kc = -(-(k // g) // n_slices) * g
    ncb = max(1, min(8, nblk // (4 * torch.get_num_threads())))
    return kc, ncb


def _dequant_linear_int4pack(xb, packed, sz, n):
    """[M, N] from int4pack nibbles: in xb's dtype, dequantized per chunk as W^T [K, rows] (no extra
    memory), or float32 from the C++ panel GEMM for PANELS_MIN_M tokens and more.

    With the C++ extension (bf16 only) one pass per chunk; without it, torch ops (about 4x the codes
    path).
    """
    k = packed.shape[1] * 2
    ng = sz.shape[0]
    g = k // ng
    flat = packed.reshape(-1)
    nfull = n // 64 * 64
    nblk = nfull // 64
    outs = []
    ext = _wint_cpp.load() if xb.dtype == _BF16 else None
    if nblk and ext is not None and xb.shape[0] >= PANELS_MIN_M and g % 2 == 0 and ext.has_avx512bf16():
        outs.append(ext.int4pack_gemm_panels(xb.contiguous(), packed, sz, g, *_panel_blocking(k, g, nblk)))
        nblk = 0
    if nblk:
        nb = min(nblk, max(1, _chunk_rows(k, 64) // 64))
        if xb.shape[0] >= DEQUANT_WHOLE_MIN_M:
            # prefill: one GEMM over the whole transient bf16 weight beats many thin ones
            nb = nblk
        wflat = _workspace(k * nb * 64, xb.dtype)
        if ext is None:
            pb = flat[: nfull * k // 2].view(nblk, k, 32)
            u = torch.empty(k, nb, 2, 32, dtype=torch.uint8)
        for b0 in range(0, nblk, nb):
            b1 = min(nblk, b0 + nb)
            cb = b1 - b0
            wt = wflat[: k * cb * 64].view(k, cb * 64)
            if ext is not None:
                ext.int4pack_dequant_t(packed, sz, g, b0, b1, wt)
            else:
                src = pb[b0:b1].transpose(0, 1)  # [K, cb, 32]
                uu = u[:, :cb]
                torch.bitwise_and(src, 15, out=uu[:, :, 0])  # rows 64b + j
                torch.bitwise_right_shift(src, 4, out=uu[:, :, 1])  # rows 64b + 32 + j
                wt.copy_(uu.reshape(k, cb * 64))
                s, c = _int4pack_scale_offset(sz, slice(b0 * 64, b1 * 64), xb.dtype)
                wt.view(ng, g, cb * 64).mul_(s).add_(c)
            outs.append(xb @ wt)
    if n > nfull:  # tail of 16/32/48 rows: [K, tail // 2] bytes, low nibble even row
        tail = n - nfull
        t = flat[nfull * k // 2 :].view(k, tail // 2)
        # in float32: a layer narrower than 64 outputs (k/v of small GQA models) is all tail, and
        # q * s + c rounded to bf16 (c = zero - 8 s is large against q * s) tripled its error
        wt = torch.stack([t & 15, t >> 4], dim=2).reshape(k, tail).float()
        s, c = _int4pack_scale_offset(sz, slice(nfull, n), torch.float32)
        wt.view(ng, g, tail).mul_(s).add_(c)
        outs.append(xb.float() @ wt)
    if len(outs) > 1 and outs[0].dtype != outs[1].dtype:
        outs[1] = outs[1].to(outs[0].dtype)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _run_dequant(x2, p, bias, n):
    # bf16 GEMMs where the CPU runs them in vector units; float32 elsewhere (AVX2-only CPUs, where
    # torch's bf16 GEMM is a scalar loop 8-10x slower than float32)
    xb = x2.to(_BF16 if fast_bf16(x2.device) else torch.float32)
    src = _dequant_source(p)
    # per-channel scales: on the output (one pass fewer over the weight) unless the output is
    # the larger of the two (M > K / 2)
    scale_out = 2 * xb.shape[0] <= xb.shape[1]
    if src == "codes":
        codes, sc, off = p["dequant_codes"], p["dequant_scales"], p.get("dequant_offset")
        if sc.shape[1] == 1 and scale_out:
            y = _codes_linear_per_channel(xb, codes, sc[:, 0], None if off is None else off[:, 0])
        else:
            y = _dequant_linear_codes(xb, codes, sc, off)
    elif src == "int8pack":
        sc, off = p["int8pack_scales"], p.get("int8pack_offset")
        if scale_out:
            y = _codes_linear_per_channel(xb, p["int8pack_weight"], sc, off)
        else:
            y = _dequant_linear_codes(xb, p["int8pack_weight"], sc[:, None],
                                      None if off is None else off[:, None].to(xb.dtype))
    elif src == "nib":
        y = _dequant_linear_nib(xb, p["nib_weight"], p["nib_scales"], p["nib_offset"])
    else:
        y = _dequant_linear_int4pack(xb, p["int4pack_weight"], p["int4pack_scales_zeros"], n)
    y = y.to(x2.dtype)
    return y if bias is None else y.add_(bias.to(y.dtype))


def wint_gemm(
    x: torch.Tensor,
    prepared: Mapping[str, torch.Tensor],
    *,
    out_features: int,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` -> ``[..., out_features]`` in x's dtype.

    ``backend``: ``"auto"`` (by token count, see ``select_backend``) or one of ``BACKENDS``.
    Fast backends compute with bf16 activations and fp32 accumulation.
    """
    n, k = prepared_shape(prepared)
    if n != out_features:
        raise SpecError(f"wint: prepared weight has {n} outputs, expected {out_features}")
    if x.shape[-1] != k:
        raise SpecError(f"wint: x has {x.shape[-1]} features, the weight expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    name = select_backend(m, prepared, backend)
    if m == 0:
        return x.new_zeros(*lead, n)
    if name == "ref":
        y = _run_ref(x2, prepared, bias)
    elif name == "int4pack":
        y = _run_int4pack(x2, prepared, bias)
    elif name == "int4cpp":
        y = _run_int4cpp(x2, prepared, bias)
    elif name == "int8pack":
        y = _run_int8pack(x2, prepared, bias)
    elif name == "nib":
        y = _run_nib(x2, prepared, bias)
    else:
        y = _run_dequant(x2, prepared, bias, n)
    return y.reshape(*lead, n)
