"""Bit packing of unsigned codes along the last dim, for every width 1..8.

Layout: each run of 8 values becomes `bits` bytes holding one little-endian word of 8 * bits bits,
value i of the run in bits [bits * i, bits * i + bits). So 4-bit puts value 2j in the low nibble of
byte j and 2j + 1 in the high nibble; 2-bit puts values 4j..4j+3 in byte j from the low bits up;
3-bit fills 3 bytes with 8 values. Because the word is little-endian, a run of
m = 8 / gcd(bits, 8) values already ends on a byte boundary (m = 2 at 4 bits, 4 at 6 bits), and the
last dim only has to be a multiple of m.

`pack_words` / `unpack_words` store the same bit stream in int32 words (value i in stream bits
[bits * i, bits * i + bits), word w holding stream bits [32w, 32w + 32)), so values may straddle two
words (3, 5, 6, 7 bits). This is the layout of GPTQ's `qweight` / `qzeros` (its 3-bit "10 | 1 | 10 | 1
| 10" pattern is the same stream) and of compressed-tensors' `pack_to_int32`; a row of n values
takes ceil(n * bits / 32) words, the bits past the last value zero.
"""

from __future__ import annotations

import math

import torch

from ..errors import SpecError

_BYTE_SHIFTS = (0, 8, 16, 24)  # byte i of a little-endian int32 word


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise SpecError(f"packing supports widths 1..8 bits, got {bits!r}")


def _run(bits: int) -> tuple[int, int]:
    """(values, bytes) of the smallest run that ends on a byte boundary."""
    m = 8 // math.gcd(bits, 8)
    return m, m * bits // 8


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that `n` values of `bits` bits pack into (n must be a whole number of runs)."""
    _check_bits(bits)
    m, nb = _run(bits)
    if n < 0 or n % m:
        raise SpecError(f"{bits}-bit packing needs a last dim that is a multiple of {m}, got {n}")
    return n // m * nb


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes `[..., n]` in [0, 2**bits) (any int dtype) -> uint8 `[..., n * bits / 8]`."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex():
        raise SpecError(f"pack needs integer codes, got {codes.dtype}")
    if codes.dim() == 0:
        raise SpecError("pack needs at least one dim")
    n = codes.shape[-1]
    packed_nbytes(n, bits)
    v = codes.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise SpecError(f"codes out of range for {bits} bits: [{int(v.min())}, {int(v.max())}] "
                        f"not in [0, {2 ** bits - 1}]")
    if bits == 8:
        return v.to(torch.uint8)
    m, nb = _run(bits)
    lead = codes.shape[:-1]
    shifts = torch.arange(m, device=v.device, dtype=torch.int64) * bits
    word = (v.reshape(*lead, n // m, m) << shifts).sum(dim=-1, keepdim=True)  # [..., runs, 1], < 2**56
    byte_shifts = torch.arange(nb, device=v.device, dtype=torch.int64) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, n // m * nb)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 `[..., n * bits / 8]` -> uint8 codes `[..., n]`."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise SpecError(f"unpack needs uint8 bytes, got {packed.dtype}")
    nbytes = packed_nbytes(n, bits)
    if packed.dim() == 0 or packed.shape[-1] != nbytes:
        raise SpecError(f"{n} values of {bits} bits need {nbytes} bytes, the last dim has "
                        f"{packed.shape[-1] if packed.dim() else 0}")
    if bits == 8:
        return packed.clone()
    m, nb = _run(bits)
    lead = packed.shape[:-1]
    byte_shifts = torch.arange(nb, device=packed.device, dtype=torch.int64) * 8
    word = (packed.to(torch.int64).reshape(*lead, n // m, nb) << byte_shifts).sum(dim=-1, keepdim=True)
    shifts = torch.arange(m, device=packed.device, dtype=torch.int64) * bits
    return ((word >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(*lead, n)


def packed_nwords(n: int, bits: int) -> int:
    """int32 words that `n` values of `bits` bits take in `pack_words` (the last one may be partial)."""
    _check_bits(bits)
    if n < 0:
        raise SpecError(f"cannot pack {n} values")
    return -(-n * bits // 32)


def pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes `[..., n]` in [0, 2**bits) -> int32 `[..., ceil(n * bits / 32)]`, values in
    order along one bit stream (see the module docstring); any n."""
    _check_bits(bits)
    if codes.dim() == 0:
        raise SpecError("pack_words needs at least one dim")
    if codes.is_floating_point() or codes.is_complex():
        raise SpecError(f"pack_words needs integer codes, got {codes.dtype}")
    n = codes.shape[-1]
    pad = -n % 32  # 32 values are exactly `bits` words, and a whole number of pack() runs
    v = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)) if pad else codes
    stream = pack(v, bits).to(torch.int64)  # [..., (n + pad) * bits / 8] bytes
    shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=stream.device)
    word = (stream.reshape(*codes.shape[:-1], -1, 4) << shifts).sum(dim=-1)  # < 2**32, bytes disjoint
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # the same 32 bits, signed
    return word[..., : packed_nwords(n, bits)].contiguous()


def unpack_words(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_words`: int32 `[..., ceil(n * bits / 32)]` -> uint8 codes `[..., n]`."""
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise SpecError(f"unpack_words needs int32 words, got {words.dtype}")
    nw = packed_nwords(n, bits)
    if words.dim() == 0 or words.shape[-1] != nw:
        raise SpecError(f"{n} values of {bits} bits take {nw} int32 words, the last dim has "
                        f"{words.shape[-1] if words.dim() else 0}")
    full = -(-n // 32) * bits  # words of whole 32-value blocks
    w = words.to(torch.int64)
    if full > nw:
        w = torch.nn.functional.pad(w, (0, full - nw))
    shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int64, device=w.device)
    stream = ((w.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(*words.shape[:-1], full * 4)
    return unpack(stream, bits, full * 32 // bits)[..., :n].contiguous()
