"""wint_gemm: every backend against wint_gemm_ref, the dispatcher, the fallbacks."""

import pytest
import torch

from lowbit.errors import GroupSizeError, SpecError
from lowbit.kernels import _nib_cpp, _wint_cpp, wint
from lowbit.kernels.wint import (
    BACKEND_ENV,
    INT4CPP_MAX_M,
    INT4PACK_MAX_M,
    INT4PACK_MAX_M_NIBBLES,
    INT8PACK_MAX_M,
    available_backends,
    prepare_wint,
    select_backend,
    unpack_int4pack,
    wint_gemm,
    wint_gemm_ref,
)

BF16_TOL = 1e-2  # relative to the output norm, bf16 activations and bf16 weights/scales

# torch packs int4 weights differently on AVX2-only CPUs: there prepare_wint keeps int8 codes instead
KNOWN_LAYOUT = pytest.mark.skipif(not wint.int4pack_layout_known(),
                                  reason="torch's int4pack layout on this CPU is not the one unpack_int4pack reads")


def make_weight(n, k, bits, group_size, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = torch.rand(n, k // group_size, generator=g) * 0.02 + 0.002
    if sym:
        zeros = torch.full((n, k // group_size), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, 2**bits, (n, k // group_size), generator=g).float()
    return q, scales, zeros


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


def has_ext() -> bool:
    """The C++ kernels (built on first use, cached under LOWBIT_CACHE); absent without a compiler."""
    return _wint_cpp.load() is not None


@pytest.fixture
def no_ext(monkeypatch):
    monkeypatch.setattr(_wint_cpp, "load", lambda: None)


# ---------------------------------------------------------------- reference


def test_ref_matches_float64_dequantize():
    q, s, z = make_weight(48, 96, 4, 32, sym=False)
    x = torch.randn(5, 96, dtype=torch.float64)
    b = torch.randn(48)
    w = (q.double() - z.double().repeat_interleave(32, 1)) * s.double().repeat_interleave(32, 1)
    want = x @ w.t() + b.double()
    got = wint_gemm_ref(x.float(), q, s, z, 32, b)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 1e-6


def test_ref_backend_is_exactly_the_reference():
    q, s, z = make_weight(64, 128, 3, 64, sym=False)
    p = prepare_wint(q, s, z, 3, 64, backends=("ref",))
    x = torch.randn(2, 3, 128)
    b = torch.randn(64)
    assert torch.equal(wint_gemm(x, p, out_features=64, bias=b, backend="ref"), wint_gemm_ref(x, q, s, z, 64, b))


# ---------------------------------------------------------------- every backend


def _cases():
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for gname in ("32", "64", "128", "channel"):
                yield bits, sym, gname


def _applicable(bits, group_size, n, k):
    names = ["ref", "dequant"]
    if bits <= 4 and group_size % 32 == 0 and n % 16 == 0:
        names.append("int4pack")
        if has_ext():
            names.append("int4cpp")
    if group_size == k and k % 16 == 0:
        names.append("int8pack")
    return tuple(names)


@pytest.mark.parametrize("bits,sym,gname", list(_cases()))
def test_backends_match_reference(bits, sym, gname):
    # K=576 (9 x 64: not a multiple of 128 or 256), N=112 (a 64-row block plus a 48-row tail)
    n, k = 112, 576
    if gname == "128":
        k = 640
    group_size = k if gname == "channel" else int(gname)
    q, s, z = make_weight(n, k, bits, group_size, sym, seed=bits * 10 + group_size)
    backends = _applicable(bits, group_size, n, k)
    p = prepare_wint(q, s, z, bits, group_size, backends=backends)
    assert set(available_backends(p)) == set(backends)
    bias = torch.randn(n)
    for m in (1, INT4PACK_MAX_M + 3):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, m, k).to(dtype)  # 3-D [B, T, K]
            ref = wint_gemm_ref(x.float(), q, s, z, group_size, bias)
            for name in backends:
                y = wint_gemm(x, p, out_features=n, bias=bias, backend=name)
                assert y.shape == (2, m, n) and y.dtype == dtype, name
                tol = 1e-6 if name == "ref" and dtype == torch.float32 else BF16_TOL
                assert rel_err(y, ref) < tol, (name, m, dtype, rel_err(y, ref))


@pytest.mark.parametrize("sym", [True, False])
def test_int8pack_asymmetric_correction_is_exact(sym):
    # q - 128 stored, (128 - z) * s added back as a rank-1 term: matches the reference up to
    # bf16 rounding of the output alone when the activations are already bf16.
    n, k = 96, 256
    q, s, z = make_weight(n, k, 8, k, sym, seed=3)
    p = prepare_wint(q, s, z, 8, k, backends=("int8pack",))
    assert ("int8pack_offset" in p) == (not sym)
    x = torch.randn(7, k).to(torch.bfloat16)
    # the op takes bf16 scales: the reference with the same scales isolates the correction
    s16 = s.to(torch.bfloat16).float()
    ref = wint_gemm_ref(x.float(), q, s16, z, k)
    y = wint_gemm(x.float(), p, out_features=n, backend="int8pack")
    assert rel_err(y, ref) < 2e-3


def test_int8pack_lower_bits_per_channel_need_no_offset():
    q, s, z = make_weight(64, 128, 6, 128, sym=False)
    p = prepare_wint(q, s, z, 6, 128)
    assert "int8pack_weight" in p and "int8pack_offset" not in p  # q - z fits int8
    x = torch.randn(3, 128)
    assert rel_err(wint_gemm(x, p, out_features=64), wint_gemm_ref(x, q, s, z, 128)) < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_follows_input(dtype):
    q, s, z = make_weight(64, 128, 4, 64, sym=True)
    p = prepare_wint(q, s, z, 4, 64, backends=("int4pack", "dequant", "ref"))
    b = torch.randn(64)
    for name in ("int4pack", "dequant", "ref", "auto") + (("int4cpp",) if has_ext() else ()):
        for m in (1, 40, 200):
            x = torch.randn(m, 128, dtype=dtype)
            y = wint_gemm(x, p, out_features=64, bias=b, backend=name)
            assert y.dtype == dtype
            assert rel_err(y, wint_gemm_ref(x.float(), q, s, z, 64, b)) < BF16_TOL


@pytest.mark.parametrize("ext", [True, False], ids=["cpp", "torch"])
def test_dequant_from_each_source_agrees(ext, monkeypatch):
    if ext and not has_ext():
        pytest.skip("C++ extension unavailable")
    if not ext:
        monkeypatch.setattr(_wint_cpp, "load", lambda: None)
    # the dequant backend reads int8 codes, the int8pack weight or the int4pack nibbles
    n, k = 208, 512  # 3 blocks of 64 and a 16-row tail
    q, s, z = make_weight(n, k, 4, k, sym=False, seed=5)
    for m in (33, 300):  # per-channel scales go on the output when M <= K / 2, on the weight above
        x = torch.randn(m, k)
        ref = wint_gemm_ref(x, q, s, z, k)
        for backends, key in ((("dequant",), "dequant_codes"), (("int8pack",), "int8pack_weight"),
                              (("int4pack",), "int4pack_weight")):
            p = prepare_wint(q, s, z, 4, k, backends=backends)
            assert key in p
            assert rel_err(wint_gemm(x, p, out_features=n, backend="dequant"), ref) < BF16_TOL, (key, m)


@pytest.mark.parametrize("ext", [True, False], ids=["cpp", "torch"])
def test_dequant_chunks_cover_all_rows(ext, monkeypatch):
    if ext and not has_ext():
        pytest.skip("C++ extension unavailable")
    if not ext:
        monkeypatch.setattr(_wint_cpp, "load", lambda: None)
    monkeypatch.setattr(wint, "DEQUANT_CHUNK_BYTES", 64 * 2 * 256)  # 64 rows per chunk at K=256
    n, k = 336, 256  # 5 blocks of 64 plus a 16-row tail; codes: 6 chunks with a short last one
    q, s, z = make_weight(n, k, 4, 64, sym=False, seed=9)
    x = torch.randn(20, k)
    b = torch.randn(n)
    ref = wint_gemm_ref(x, q, s, z, 64, b)
    for backends in (("dequant",), ("int4pack",)):
        p = prepare_wint(q, s, z, 4, 64, backends=backends)
        assert rel_err(wint_gemm(x, p, out_features=n, bias=b, backend="dequant"), ref) < BF16_TOL


@pytest.mark.parametrize("group", [32, 64, 128])
def test_panel_gemm_matches_ref_across_slices_tiles_and_tail(group, monkeypatch):
    """The many-token C++ path (int4pack_gemm_panels): k-slices (PANEL_BYTES forced small), 6-row
    tiles with every remainder, several blocks per thread chunk, and a 16-row tail left to the
    bf16 dequant path."""
    ext = _wint_cpp.load()
    if ext is None or not ext.has_avx512bf16():
        pytest.skip("needs the C++ extension on an AVX512-BF16 CPU")
    monkeypatch.setattr(wint, "PANELS_MIN_M", 1)
    monkeypatch.setattr(wint, "PANEL_BYTES", 128 * 128)  # k-slices of 128 features: 4 at K=512
    n, k = 336, 512  # 5 blocks of 64 plus a 16-row tail
    q, s, z = make_weight(n, k, 4, group, sym=False, seed=3)
    p = prepare_wint(q, s, z, 4, group)
    b = torch.randn(n)
    called = []
    real = ext.int4pack_gemm_panels
    monkeypatch.setattr(wint._wint_cpp, "load", lambda: _Spy(ext, called))
    for m in (1, 5, 6, 13, 300):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref = wint_gemm_ref(x, q, s, z, group, b)
        got = wint_gemm(x, p, out_features=n, bias=b, backend="dequant")
        assert got.dtype == x.dtype and got.shape == (m, n)
        assert rel_err(got, ref) < BF16_TOL, (group, m)
        # the same bf16 products as the whole-weight dequant path, summed in another order
        monkeypatch.setattr(wint, "PANELS_MIN_M", 10**9)
        old = wint_gemm(x, p, out_features=n, bias=b, backend="dequant")
        monkeypatch.setattr(wint, "PANELS_MIN_M", 1)
        assert rel_err(got, old) < 2e-3, (group, m)
    assert len(called) == 5 and real is not None
    kc, ncb = called[0]
    assert kc == 128 and k % kc == 0


class _Spy:
    """The extension's ops, recording the (kc, ncb) of each int4pack_gemm_panels call."""

    def __init__(self, ext, called):
        self._ext, self._called = ext, called

    def __getattr__(self, name):
        return getattr(self._ext, name)

    def int4pack_gemm_panels(self, x, packed, sz, g, kc, ncb):
        self._called.append((kc, ncb))
        return self._ext.int4pack_gemm_panels(x, packed, sz, g, kc, ncb)


# ---------------------------------------------------------------- dispatcher


def _record_runs(monkeypatch):
    seen = []
    for name in ("int4pack", "int4cpp", "dequant"):
        real = getattr(wint, f"_run_{name}")
        monkeypatch.setattr(wint, f"_run_{name}", lambda *a, _r=real, _n=name: seen.append(_n) or _r(*a))
    return seen


@KNOWN_LAYOUT
def test_auto_without_extension_switches_int4pack_to_dequant(monkeypatch, no_ext):
    q, s, z = make_weight(64, 256, 4, 128, sym=False)
    p = prepare_wint(q, s, z, 4, 128)  # int4pack only: the dequant path unpacks nibbles (slow)
    assert available_backends(p) == ("int4pack", "dequant")
    assert select_backend(1, p) == "int4pack"
    assert select_backend(INT4PACK_MAX_M_NIBBLES, p) == "int4pack"
    assert select_backend(INT4PACK_MAX_M_NIBBLES + 1, p) == "dequant"
    pc = prepare_wint(q, s, z, 4, 128, backends=("int4pack", "dequant"))  # + int8 codes (fast)
    assert "dequant_codes" in pc
    assert select_backend(INT4PACK_MAX_M, pc) == "int4pack"
    assert select_backend(INT4PACK_MAX_M + 1, pc) == "dequant"

    seen = _record_runs(monkeypatch)
    for m in (INT4PACK_MAX_M, INT4PACK_MAX_M + 1):
        x = torch.randn(m, 256)
        assert rel_err(wint_gemm(x, pc, out_features=64), wint_gemm_ref(x, q, s, z, 128)) < BF16_TOL
    assert seen == ["int4pack", "dequant"]


def test_auto_with_extension_switches_int4cpp_to_dequant(monkeypatch):
    if not has_ext():
        pytest.skip("C++ extension unavailable (no compiler?)")
    q, s, z = make_weight(64, 256, 4, 128, sym=False)
    p = prepare_wint(q, s, z, 4, 128)
    assert available_backends(p) == ("int4pack", "int4cpp", "dequant")
    assert select_backend(1, p) == "int4cpp"
    assert select_backend(INT4CPP_MAX_M, p) == "int4cpp"
    assert select_backend(INT4CPP_MAX_M + 1, p) == "dequant"

    seen = _record_runs(monkeypatch)
    for m in (INT4CPP_MAX_M, INT4CPP_MAX_M + 1):
        x = torch.randn(m, 256)
        assert rel_err(wint_gemm(x, p, out_features=64), wint_gemm_ref(x, q, s, z, 128)) < BF16_TOL
    assert seen == ["int4cpp", "dequant"]


def test_auto_picks_int8pack_for_few_tokens_and_dequant_for_many():
    q, s, z = make_weight(64, 256, 8, 256, sym=False)
    p = prepare_wint(q, s, z, 8, 256)
    assert set(available_backends(p)) == {"int8pack", "dequant"}
    assert select_backend(INT8PACK_MAX_M, p) == "int8pack"
    assert select_backend(INT8PACK_MAX_M + 1, p) == "dequant"


def test_environment_variable_forces_a_backend(monkeypatch):
    q, s, z = make_weight(64, 256, 4, 64, sym=True)
    p = prepare_wint(q, s, z, 4, 64, backends=("int4pack", "dequant", "ref"))
    monkeypatch.setenv(BACKEND_ENV, "dequant")
    assert select_backend(1, p) == "dequant"
    assert select_backend(1, p, "ref") == "ref"  # an explicit argument wins
    monkeypatch.setenv(BACKEND_ENV, "int8pack")
    with pytest.raises(SpecError, match="not prepared"):
        wint_gemm(torch.randn(1, 256), p, out_features=64)
    monkeypatch.setenv(BACKEND_ENV, "auto")
    assert select_backend(1, p) in ("int4pack", "int4cpp")


def test_unknown_backend_is_refused():
    q, s, z = make_weight(64, 64, 4, 32, sym=True)
    with pytest.raises(SpecError, match="unknown backend"):
        prepare_wint(q, s, z, 4, 32, backends=("triton",))
    p = prepare_wint(q, s, z, 4, 32)
    with pytest.raises(SpecError, match="unknown backend"):
        wint_gemm(torch.randn(1, 64), p, out_features=64, backend="fast")


# ---------------------------------------------------------------- fallbacks and input checks


def test_group_size_16_falls_back_to_dequant():
    q, s, z = make_weight(64, 128, 4, 16, sym=False)
    p = prepare_wint(q, s, z, 4, 16)
    assert [b for b in available_backends(p) if b != "nib"] == ["dequant"]  # nib (AVX2 CPUs) takes any group
    for name in ("int4pack", "int4cpp"):
        with pytest.raises(SpecError, match=f"{name} cannot run"):
            prepare_wint(q, s, z, 4, 16, backends=(name,))
    x = torch.randn(3, 128)
    assert rel_err(wint_gemm(x, p, out_features=64), wint_gemm_ref(x, q, s, z, 16)) < BF16_TOL


def test_out_features_not_multiple_of_16_falls_back_to_dequant():
    q, s, z = make_weight(40, 64, 4, 32, sym=False)
    p = prepare_wint(q, s, z, 4, 32)
    # (nib, on AVX2 CPUs, has no such limit)
    assert [b for b in available_backends(p) if b != "nib"] == ["dequant"]
    x = torch.randn(2, 64)
    assert rel_err(wint_gemm(x, p, out_features=40), wint_gemm_ref(x, q, s, z, 32)) < BF16_TOL


def test_int8pack_refuses_in_features_not_multiple_of_16():
    # torch 2.13's _weight_int8pack_mm reads out of bounds (segfault, NaN) when K % 16 != 0
    q, s, z = make_weight(32, 72, 8, 72, sym=True)
    with pytest.raises(SpecError, match="multiple of 16"):
        prepare_wint(q, s, z, 8, 72, backends=("int8pack",))
    p = prepare_wint(q, s, z, 8, 72)
    assert available_backends(p) == ("dequant",)
    x = torch.randn(2, 72)
    assert rel_err(wint_gemm(x, p, out_features=32), wint_gemm_ref(x, q, s, z, 72)) < BF16_TOL


def test_int4pack_per_channel_large_k_uses_a_repeated_group():
    q, s, z = make_weight(64, 1536, 4, 1536, sym=False)
    p = prepare_wint(q, s, z, 4, 1536, backends=("int4pack",))
    assert p["int4pack_scales_zeros"].shape == (1536 // 256, 64, 2)
    x = torch.randn(2, 1536)
    y = wint_gemm(x, p, out_features=64, backend="int4pack")
    assert rel_err(y, wint_gemm_ref(x, q, s, z, 1536)) < BF16_TOL


@KNOWN_LAYOUT
@pytest.mark.parametrize("n", [16, 48, 64, 80, 112, 176])
def test_unpack_int4pack_roundtrip(n):
    q = torch.randint(0, 16, (n, 96), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(unpack_int4pack(packed, n, 96), q.to(torch.uint8))


def test_prepare_rejects_bad_input():
    q, s, z = make_weight(32, 64, 4, 32, sym=False)
    with pytest.raises(GroupSizeError):
        prepare_wint(q, s[:, :1], z[:, :1], 4, 48)
    with pytest.raises(SpecError, match="bits"):
        prepare_wint(q, s, z, 9, 32)
    with pytest.raises(SpecError, match="codes"):
        prepare_wint(q + 16, s, z, 4, 32)
    with pytest.raises(SpecError, match="integer-valued"):
        prepare_wint(q, s, z + 0.5, 4, 32)
    with pytest.raises(SpecError, match="shape"):
        prepare_wint(q, s.t(), z, 4, 32)


def test_empty_and_non_contiguous_inputs():
    q, s, z = make_weight(64, 128, 4, 64, sym=False)
    p = prepare_wint(q, s, z, 4, 64)
    assert wint_gemm(torch.randn(0, 128), p, out_features=64).shape == (0, 64)
    assert wint_gemm(torch.randn(2, 0, 128), p, out_features=64).shape == (2, 0, 64)
    x = torch.randn(128, 6).t()  # [6, 128], not contiguous
    for name in available_backends(p):  # int4pack + dequant, or on AVX2 CPUs nib + dequant
        y = wint_gemm(x, p, out_features=64, backend=name)
        assert rel_err(y, wint_gemm_ref(x, q, s, z, 64)) < BF16_TOL, name


def test_prepared_tensors_are_plain_buffers():
    # only tensors, flat names without dots: a module can register them as buffers and save them
    q, s, z = make_weight(64, 128, 4, 128, sym=False)
    for backends in ("auto", ("ref", "int4pack", "dequant"), ("int8pack",)):
        p = prepare_wint(q, s, z, 4, 128, backends=backends)
        assert all(isinstance(v, torch.Tensor) and "." not in key for key, v in p.items())
        m = torch.nn.Module()
        for key, v in p.items():
            m.register_buffer(key, v)
        y = wint_gemm(torch.randn(2, 128), dict(m.named_buffers()), out_features=64)
        assert y.shape == (2, 64)


# ---------------------------------------------------------------- C++ extension


@pytest.mark.parametrize("n,k,group", [(64, 128, 32), (208, 576, 64), (112, 640, 128), (80, 512, 512)])
def test_int4cpp_matches_reference_for_every_row_tile(n, k, group):
    if not has_ext():
        pytest.skip("C++ extension unavailable (no compiler?)")
    q, s, z = make_weight(n, k, 4, group, sym=False, seed=n + k)
    p = prepare_wint(q, s, z, 4, group, backends=("int4cpp",))
    b = torch.randn(n)
    for m in (1, 2, 3, 4, 5, 9):  # tiles of 4 activation rows and every remainder
        x = torch.randn(m, k)
        y = wint_gemm(x, p, out_features=n, bias=b, backend="int4cpp")
        assert rel_err(y, wint_gemm_ref(x, q, s, z, group, b)) < BF16_TOL, m


def test_extension_build_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(_nib_cpp.EXT_ENV, "0")  # the int4pack fallback itself, not the AVX2 kernel
    monkeypatch.setattr(_wint_cpp.EXT, "failed", False)
    monkeypatch.setattr(_wint_cpp.EXT, "_load", lambda: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with pytest.warns(RuntimeWarning, match="C\\+\\+ wint kernels unavailable"):
        assert _wint_cpp.load() is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _wint_cpp.load() is None  # silent the second time
        q, s, z = make_weight(64, 128, 4, 64, sym=False)
        p = prepare_wint(q, s, z, 4, 64)
        assert "int4cpp" not in available_backends(p)
        x = torch.randn(3, 128)
        assert select_backend(3, p) == "int4pack"
        assert rel_err(wint_gemm(x, p, out_features=64), wint_gemm_ref(x, q, s, z, 64)) < BF16_TOL


def test_extension_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(_wint_cpp.EXT_ENV, "0")
    assert _wint_cpp.load() is None


def test_shape_mismatches_are_refused():
    q, s, z = make_weight(64, 128, 4, 64, sym=False)
    p = prepare_wint(q, s, z, 4, 64)
    assert wint.prepared_shape(p) == (64, 128)
    with pytest.raises(SpecError, match="outputs"):
        wint_gemm(torch.randn(2, 128), p, out_features=32)
    with pytest.raises(SpecError, match="features"):
        wint_gemm(torch.randn(2, 96), p, out_features=64)
    with pytest.raises(SpecError, match="no prepared weight"):
        wint_gemm(torch.randn(2, 128), {}, out_features=64)


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_codes_keep_precision_on_rounded_weights(bits):
    # round-to-nearest weights put most codes next to the zero point; with 2/3-bit codes left at
    # the bottom of the 4-bit range the op's bf16 zero' = (8 - z) * s is large, cancels against
    # (q - 8) * s, and the error was 2e-2. prepare_wint centres them: back to bf16 rounding.
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(128, 256, generator=g).view(128, 4, 64)
    lo, hi = w.amin(-1), w.amax(-1)
    s = (hi - lo) / (2**bits - 1)
    z = (-lo / s).round()
    q = ((w / s[..., None]).round() + z[..., None]).clamp(0, 2**bits - 1).view(128, 256).long()
    p = prepare_wint(q, s, z, bits, 64)  # int4pack only: dequant reads the nibbles
    x = torch.randn(5, 256)
    ref = wint_gemm_ref(x, q, s, z, 64)
    for name in available_backends(p):
        assert rel_err(wint_gemm(x, p, out_features=128, backend=name), ref) < 6e-3, name


@pytest.mark.parametrize("ext", [True, False], ids=["cpp", "torch"])
def test_dequant_workspace_first_made_under_inference_mode_serves_normal_calls(ext, monkeypatch):
    from lowbit.kernels import wint as W

    if not ext:  # the torch fallback writes the workspace with in-place torch ops
        monkeypatch.setattr(_wint_cpp, "load", lambda: None)
    W._WORKSPACE.__dict__.clear()
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (128, 256), generator=g)
    s = torch.rand(128, 4, generator=g) + 0.1
    z = torch.full((128, 4), 8.0)
    p = prepare_wint(q, s, z, 4, 64)
    x = torch.randn(300, 256, generator=g)
    with torch.inference_mode():
        a = wint_gemm(x, p, out_features=128, backend="dequant")
    b = wint_gemm(x, p, out_features=128, backend="dequant")
    torch.testing.assert_close(a, b)


# ---- nib: the AVX2 kernel on lowbit's own nibble layout ---------------------------------------------

def has_nib() -> bool:
    return _nib_cpp.load() is not None


def test_nibble_packing_roundtrips():
    q = torch.randint(0, 16, (7, 64), dtype=torch.int64)
    packed = _nib_cpp.pack_nibbles(q)
    assert packed.shape == (7, 32) and packed.dtype == torch.uint8
    assert torch.equal(_nib_cpp.unpack_nibbles(packed), q.to(torch.uint8))
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 16]) << 4)  # codes i and i + 16 of each 32


@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, False), (3, 32, False), (2, 96, True), (4, 24, False),
                                                 (4, -1, True)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_nib_matches_reference(bits, group_size, sym, m):
    if not has_nib():
        pytest.skip("C++ nib kernel unavailable (no compiler?)")
    # an odd row count, 576 inputs: 9 groups of 64 (the offsets' vector loop takes 8, its tail 1)
    n, k = 41, 576
    g = k if group_size == -1 else group_size
    q, s, z = make_weight(n, k, bits, g, sym, seed=bits + m)
    p = prepare_wint(q, s, z, bits, g, backends=("nib",))
    x, bias = torch.randn(1, m, k), torch.randn(n)
    y = wint_gemm(x, p, out_features=n, bias=bias, backend="nib")
    ref = wint_gemm_ref(x.reshape(-1, k), q, s, z, g, bias).reshape(1, m, n)
    # int16 activations (2^-16 of each token's absmax), float32 scales: far inside bf16's error
    assert y.shape == (1, m, n) and rel_err(y, ref) < 1e-4


def test_auto_prepares_nib_where_torch_int4pack_layout_is_unknown(monkeypatch):
    if not has_nib():
        pytest.skip("C++ nib kernel unavailable (no compiler?)")
    monkeypatch.setattr(wint, "int4pack_layout_known", lambda: False)
    q, s, z = make_weight(64, 256, 4, 64, sym=False)
    p = prepare_wint(q, s, z, 4, 64)
    # nib's nibbles are the only copy of the weight (0.5 byte/weight + float32 scales and offsets):
    # its dequant path reads them too
    assert sorted(p) == ["nib_offset", "nib_scales", "nib_weight"]
    assert available_backends(p) == ("nib", "dequant")
    assert select_backend(1, p) == select_backend(wint.NIB_MAX_M, p) == "nib"
    assert select_backend(wint.NIB_MAX_M + 1, p) == "dequant"
    # the dequant path multiplies in bf16 where the CPU has fast bf16 GEMMs (AVX512-BF16, AMX), else float32
    dequant_tol = BF16_TOL if wint.fast_bf16(torch.device("cpu")) else 1e-5
    for m in (1, wint.NIB_MAX_M + 1, 300):
        x = torch.randn(m, 256)
        tol = 1e-4 if m <= wint.NIB_MAX_M else dequant_tol
        assert rel_err(wint_gemm(x, p, out_features=64), wint_gemm_ref(x, q, s, z, 64)) < tol, m
    # and from the nibbles in float32, per chunk of rows (a layer taller than one chunk)
    monkeypatch.setattr(wint, "DEQUANT_CHUNK_BYTES", 2 * 256 * 16)
    q3, s3, z3 = make_weight(40, 256, 3, 32, sym=True, seed=3)
    p3 = prepare_wint(q3, s3, z3, 3, 32)
    x = torch.randn(20, 256)
    want = wint_gemm_ref(x, q3, s3, z3, 32)
    y = wint_gemm(x, p3, out_features=40, backend="dequant")
    assert rel_err(y, want) < dequant_tol
    monkeypatch.setenv(_nib_cpp.EXT_ENV, "0")  # the torch ops that stand in for nib_dequant: same weights
    assert available_backends(p3) == ("dequant",)
    assert torch.equal(wint_gemm(x, p3, out_features=40, backend="dequant"), y)
    q6, s6, z6 = make_weight(16, 64, 6, 64, sym=False)
    with pytest.raises(SpecError, match="nib cannot run"):
        prepare_wint(q6, s6, z6, 6, 64, backends=("nib",))


# ---- 4-bit codebooks (NF4): nibbles and a table lookup per group -----------------------------------

@pytest.mark.parametrize("group_size", [64, 48])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_codebook4_linear_matches_the_looked_up_weight(monkeypatch, group_size, m):
    from lowbit.quant.codebooks import NF4_CODEBOOK

    monkeypatch.setattr(wint, "DEQUANT_CHUNK_BYTES", 2 * 576 * 16)  # several chunks of rows
    g = torch.Generator().manual_seed(group_size + m)
    n, k = 41, 576
    q = torch.randint(0, 16, (n, k), generator=g)
    s = torch.rand(n, k // group_size, generator=g) + 0.1
    w = NF4_CODEBOOK.float()[q] * s.repeat_interleave(group_size, 1)
    p = wint.prepare_codebook4(q, s, NF4_CODEBOOK)
    assert sorted(p) == ["cb_packed", "cb_scales", "codebook"] and p["cb_packed"].numel() == n * k // 2
    x, bias = torch.randn(2, m, k, generator=g), torch.randn(n, generator=g)
    want = torch.nn.functional.linear(x, w, bias)
    y = wint.codebook4_linear(x, p, bias)  # few tokens: nib's lut_gemm where it builds
    assert y.shape == (2, m, n) and rel_err(y, want) < 1e-5
    monkeypatch.setattr(wint, "CODEBOOK4_GEMM_MAX_M", 0)  # the weight rebuilt by lut_dequant
    y = wint.codebook4_linear(x, p, bias)
    assert rel_err(y, want) < 1e-5
    monkeypatch.setenv(_nib_cpp.EXT_ENV, "0")  # the torch ops that stand in for lut_dequant: same weights
    if has_nib():
        monkeypatch.setattr(_nib_cpp, "load", lambda: None)
    torch.testing.assert_close(wint.codebook4_linear(x, p, bias), y, rtol=0, atol=0)
    yb = wint.codebook4_linear(x.bfloat16(), p, bias)
    assert yb.dtype == torch.bfloat16 and rel_err(yb.float(), want) < 2e-2
    assert wint.prepare_codebook4(q[:, :48], s[:, :1], NF4_CODEBOOK) is None  # K not a multiple of 32
