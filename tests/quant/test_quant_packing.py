import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import SpecError
from lowbit.quant import pack, packed_nbytes, unpack


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
