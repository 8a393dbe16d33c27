import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import SpecError
from lowbit.quant import pack, pack_words, packed_nbytes, packed_nwords, unpack, unpack_words


def run_len(bits):
    return 8 // math.gcd(bits, 8)


def reference_pack(values, bits):
    """The documented layout, one row, with Python ints: runs of 8 values as a little-endian word."""
    out = []
    for start in range(0, len(values), 8):
        run = values[start:start + 8]
        word = sum(v << (bits * i) for i, v in enumerate(run))
        out += list(word.to_bytes(math.ceil(len(run) * bits / 8), "little"))
    return out


@st.composite
def codes(draw):
    bits = draw(st.integers(1, 8))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    n = run_len(bits) * draw(st.integers(0, 6))
    dtype = draw(st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randint(0, 2**bits, (*lead, n), generator=gen).to(dtype), bits


@settings(max_examples=80, deadline=None)
@given(codes())
def test_pack_unpack_is_lossless(case):
    c, bits = case
    n = c.shape[-1]
    p = pack(c, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (*c.shape[:-1], n * bits // 8) == (*c.shape[:-1], packed_nbytes(n, bits))
    u = unpack(p, bits, n)
    assert u.dtype == torch.uint8 and torch.equal(u.long(), c.long())
    if c.dim() == 1:
        assert p.tolist() == reference_pack(c.tolist(), bits)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_matches_reference_for_every_width(bits):
    c = torch.randint(0, 2**bits, (3, 40), generator=torch.Generator().manual_seed(bits))
    p = pack(c, bits)
    for row in range(3):
        assert p[row].tolist() == reference_pack(c[row].tolist(), bits)


def test_4bit_layout_by_hand():
    # value 2j in the low nibble of byte j, 2j+1 in the high nibble
    assert pack(torch.tensor([1, 2, 3, 4, 15, 0]), 4).tolist() == [0x21, 0x43, 0x0F]


def test_2bit_layout_by_hand():
    # four values per byte, first value in the lowest two bits: 1 | 2<<2 | 3<<4 | 0<<6 = 0x39
    assert pack(torch.tensor([1, 2, 3, 0, 3, 3, 3, 3]), 2).tolist() == [0x39, 0xFF]


def test_3bit_packs_8_values_into_3_bytes():
    assert pack(torch.tensor([7, 0, 0, 0, 0, 0, 0, 0]), 3).tolist() == [0x07, 0x00, 0x00]
    assert pack(torch.tensor([0, 0, 0, 0, 0, 0, 0, 7]), 3).tolist() == [0x00, 0x00, 0xE0]
    assert pack(torch.tensor([0, 0, 1, 0, 0, 0, 0, 0]), 3).tolist() == [0x40, 0x00, 0x00]


@pytest.mark.parametrize("bits,n", [(4, 7), (2, 6), (3, 12), (5, 4), (6, 6), (7, 9)])
def test_ragged_last_dim_raises(bits, n):
    with pytest.raises(SpecError, match="multiple of"):
        pack(torch.zeros(2, n, dtype=torch.uint8), bits)


@pytest.mark.parametrize("bad", [torch.tensor([0, 16]), torch.tensor([-1, 3])])
def test_out_of_range_raises(bad):
    with pytest.raises(SpecError, match="out of range"):
        pack(bad, 4)


def test_other_bad_input():
    with pytest.raises(SpecError):
        pack(torch.zeros(8), 4)  # float codes
    with pytest.raises(SpecError):
        pack(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(SpecError):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)  # 8 values need 4 bytes


# ---- int32 words (GPTQ qweight / qzeros, compressed-tensors weight_packed) -------------------------

def words_of(values, bits):
    """Reference: the values as one little-endian bit stream in Python ints, cut into signed int32 words."""
    stream = sum(v << (bits * i) for i, v in enumerate(values))
    out = []
    for w in range(-(-len(values) * bits // 32)):
        word = (stream >> (32 * w)) & 0xFFFFFFFF
        out.append(word - 2**32 if word >= 2**31 else word)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 100), st.integers(0, 2**31 - 1))
def test_words_round_trip_for_any_width_and_length(bits, n, seed):
    c = torch.randint(0, 2**bits, (2, n), generator=torch.Generator().manual_seed(seed))
    w = pack_words(c, bits)
    assert w.dtype == torch.int32 and w.shape == (2, packed_nwords(n, bits))
    assert w[0].tolist() == words_of(c[0].tolist(), bits)
    assert torch.equal(unpack_words(w, bits, n).long(), c)


def test_3bit_words_are_gptqs_10_1_10_1_10_pattern():
    # GPTQ packs 32 3-bit values in 3 words: values 0..9 at bits 3j of word 0, value 10 split
    # (low 2 bits at 30..31, high bit at bit 0 of word 1), 11..20 at 3(j-11)+1, value 21 split
    # (bit 31, then bits 0..1 of word 2), 22..31 at 3(j-22)+2
    c = torch.randint(0, 8, (32,), generator=torch.Generator().manual_seed(3)).tolist()
    w0 = sum(c[j] << 3 * j for j in range(10)) | (c[10] & 3) << 30
    w1 = c[10] >> 2 | sum(c[j] << 3 * (j - 11) + 1 for j in range(11, 21)) | (c[21] & 1) << 31
    w2 = c[21] >> 1 | sum(c[j] << 3 * (j - 22) + 2 for j in range(22, 32))
    expect = [w - 2**32 if w >= 2**31 else w for w in (w0, w1, w2)]
    assert pack_words(torch.tensor(c), 3).tolist() == expect


def test_4bit_words_by_hand():
    # eight values per word, the first in the lowest nibble: GPTQ's symmetric qzeros 0x77777777
    assert pack_words(torch.full((8,), 7), 4).tolist() == [0x77777777]
    assert pack_words(torch.tensor([1, 2, 3, 4, 5, 6, 7, 15]), 4).tolist() == [0xF7654321 - 2**32]


@pytest.mark.parametrize("bits", range(1, 9))
def test_words_are_compressed_tensors_packing(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers",
                                  reason="compressed-tensors is not installed")
    c = torch.randint(0, 2**bits, (5, 100), generator=torch.Generator().manual_seed(bits))
    signed = (c - 2 ** (bits - 1)).to(torch.int8)  # the package packs q + 2^(bits-1)
    assert torch.equal(pack_words(c, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_words(c.t(), bits).t(), helpers.pack_to_int32(signed, bits, packed_dim=0))


def test_bad_words_input():
    with pytest.raises(SpecError, match="out of range"):
        pack_words(torch.tensor([0, 8]), 3)
    with pytest.raises(SpecError, match="int32"):
        unpack_words(torch.zeros(2, 3, dtype=torch.int64), 4, 24)
    with pytest.raises(SpecError, match="take 3 int32 words"):
        unpack_words(torch.zeros(2, 4, dtype=torch.int32), 4, 24)
