import json
import re

import pytest

from lowbit.errors import GroupSizeError, SpecError
from lowbit.quant import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec, check_group_size

SPECS = [
    QuantSpec(),
    QuantSpec(bits=8, symmetric=True, granularity=PerChannel()),
    QuantSpec(bits=8, symmetric=True, granularity=PerToken(), dynamic=True),
    QuantSpec(bits=8, symmetric=True, granularity=PerTensor(), observer="percentile"),
    QuantSpec(bits=4, dtype="nf4", granularity=PerGroup(64)),
    QuantSpec(bits=3, dtype="codebook", granularity=PerGroup(-1), observer="mse"),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_to_dict_round_trips_through_json(spec):
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_granularity_dict_form():
    assert QuantSpec(granularity=PerGroup(64)).to_dict()["granularity"] == {"type": "group", "group_size": 64}
    assert QuantSpec(granularity=PerToken()).to_dict()["granularity"] == {"type": "token"}


def test_str_is_short():
    assert str(QuantSpec(granularity=PerGroup(64))) == "int4 asym g64"
    assert str(QuantSpec(bits=8, symmetric=True, granularity=PerToken(), dynamic=True)) == "int8 sym per-token dynamic"
    assert str(QuantSpec(dtype="nf4", granularity=PerGroup(64))) == "nf4 g64"


@pytest.mark.parametrize("bits,sym,lo,hi", [(4, False, 0, 15), (4, True, -8, 7), (8, True, -128, 127), (2, False, 0, 3)])
def test_qmin_qmax(bits, sym, lo, hi):
    s = QuantSpec(bits=bits, symmetric=sym)
    assert (s.qmin, s.qmax) == (lo, hi)


@pytest.mark.parametrize("kw", [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(dtype="nf4", bits=3),
                                dict(dtype="fp4"), dict(observer="kl"), dict(granularity="group")])
def test_bad_spec_raises(kw):
    with pytest.raises(SpecError):
        QuantSpec(**kw)


def test_bad_group_and_dict():
    with pytest.raises(SpecError):
        PerGroup(0)
    with pytest.raises(SpecError, match="unknown"):
        QuantSpec.from_dict({"bits": 4, "groupsize": 128})
    with pytest.raises(SpecError):
        QuantSpec.from_dict({"granularity": {"type": "row"}})


def test_group_size_error_names_layer_and_suggests_divisors():
    name = "model.layers.3.mlp.down_proj"
    with pytest.raises(GroupSizeError) as e:
        check_group_size(11008, 96, name)
    msg = str(e.value)
    assert name in msg and "\n" not in msg
    suggested = [int(g) for g in re.findall(r"\b(\d+)\b", msg.split("try", 1)[1]) if g != "1"]
    assert suggested and all(11008 % g == 0 for g in suggested)
    assert 64 in suggested and 128 in suggested
    assert "per-channel" in msg


def test_group_size_error_without_power_of_two_divisor_offers_per_channel():
    with pytest.raises(GroupSizeError, match="per-channel"):
        check_group_size(100, 64, "lm_head")
    check_group_size(100, -1)
    check_group_size(4096, 128)
