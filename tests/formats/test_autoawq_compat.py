"""lowbit against the real AutoAWQ (autoawq 0.2.9), both directions, on CPU.

Runs where `awq` imports: `python bench/awq_compat.py` runs this file in AutoAWQ's own venv
(bench/peers/venv.py). Elsewhere it is skipped.

On CPU AutoAWQ's GEMM forward dequantizes with its own `dequantize_gemm` and multiplies in float16
(Triton is switched off: it has no CPU backend); its GEMV forward needs the CUDA `awq_ext` kernels.
Loading a saved checkpoint through `from_quantized` needs IPEX, which refuses torch 2.13, so the
checks work on modules and state dicts, and on a checkpoint AutoAWQ's `save_quantized` wrote.

Tolerances. Integer codes, zero points, scales and AutoAWQ's dequantized float16 weights are
compared bit for bit. Outputs: AutoAWQ rounds the weight to float16 (relative error <= 2**-11;
the inputs here are float16 already), accumulates, and rounds the output and the bias sum to float16
(<= 2**-11 each), so against the exact product it is within 2**-9 * (|x| @ |W|^T + |b|) with room to
spare; lowbit's reference backend computes that product in float32.
"""

import json
import types

import pytest
import torch
from torch import nn

awq_gemm = pytest.importorskip("awq.modules.linear.gemm", reason="AutoAWQ (awq) is not installed in this "
                               "environment; `python bench/awq_compat.py` runs these checks in its own venv")
from awq.modules.linear.gemv import WQLinear_GEMV  # noqa: E402
from awq.quantize.quantizer import AwqQuantizer  # noqa: E402
from awq.utils.packing_utils import dequantize_gemm, reverse_awq_order, unpack_awq  # noqa: E402

import lowbit  # noqa: E402
from lowbit.nn import AWQLinearGEMM, AWQLinearGEMV, WQLinear  # noqa: E402
from lowbit.quant import PerGroup, QuantSpec  # noqa: E402

WQLinear_GEMM = awq_gemm.WQLinear_GEMM
IN, OUT = 256, 96
GROUPS = [32, 64, 128, -1]


@pytest.fixture(autouse=True)
def cpu_autoawq(monkeypatch):
    monkeypatch.setattr(awq_gemm, "TRITON_AVAILABLE", False)  # Triton imports, but cannot run on CPU


def resolved(group_size, in_features=IN):
    return in_features if group_size == -1 else group_size


def lowbit_layer(group_size, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g)
    b = torch.randn(OUT, generator=g).half().float() if bias else None
    spec = QuantSpec(bits=4, symmetric=False, granularity=PerGroup(group_size))
    return WQLinear.from_weight(w, b, spec, name="layer")


def fp16_inputs(seed=1, shape=(2, 7, IN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).half().float()


def bound(x, w, b):
    """2**-9 * (|x| @ |W|^T + |b|): how far AutoAWQ's float16 arithmetic may be from the exact output."""
    t = x.abs().double() @ w.abs().double().t()
    return 2.0**-9 * (t + (0 if b is None else b.abs().double()))


def autoawq_codes(qweight, qzeros):
    iw, iz = reverse_awq_order(*unpack_awq(qweight, qzeros, 4), 4)
    return iw & 15, iz & 15


def check_against_autoawq_gemm(ours, theirs, record_property, tag, monkeypatch):
    """Same weights bit for bit, and the same outputs within the float16 bound."""
    codes, zeros = autoawq_codes(theirs.qweight, theirs.qzeros)
    assert torch.equal(codes.t().to(torch.uint8), ours.codes())
    assert torch.equal(zeros.t().float(), ours.zeros())
    w16 = dequantize_gemm(theirs.qweight, theirs.qzeros, theirs.scales, 4, theirs.group_size)  # [in, out] fp16
    # (q - z) * s is exact in float32, so rounding it once to float16 must give AutoAWQ's float16 weight
    assert torch.equal(w16, ours.dequantize_weight().t().half())

    x = fp16_inputs()
    with torch.no_grad():
        y_theirs = theirs(x)
        monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
        ours._runtime = None
        y_ref = ours(x)
        monkeypatch.delenv("LOWBIT_WINT_BACKEND")
        ours._runtime = None
        y_fast = ours(x)
    w = ours.dequantize_weight()
    exact = x.double() @ w.double().t() + (0 if ours.bias is None else ours.bias.double())
    diff = (y_theirs.double() - y_ref.double()).abs()
    used = float((diff / bound(x, w, ours.bias)).max())  # <= 1: within AutoAWQ's float16 error
    assert used <= 1, f"max diff {diff.max():.3g} is {used:.2f} of the float16 bound"
    torch.testing.assert_close(y_ref.double(), exact, rtol=1e-5, atol=1e-5)  # float32 vs float64
    rel_fast = float((y_fast.double() - y_theirs.double()).norm() / y_theirs.double().norm())
    assert rel_fast < 2e-2  # lowbit's fast paths take bf16 activations (as in tests/nn)
    record_property(f"{tag} max|autoawq - lowbit ref|", float(diff.max()))
    record_property(f"{tag} max|y|", float(y_ref.abs().max()))
    record_property(f"{tag} max diff / fp16 bound", used)
    record_property(f"{tag} rel|autoawq - lowbit fast|", rel_fast)


# ---- (a) what lowbit writes, AutoAWQ reads ------------------------------------------------------

@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bias", [True, False])
def test_lowbit_gemm_tensors_run_in_autoawq(group_size, bias, record_property, monkeypatch):
    ours = AWQLinearGEMM.from_wqlinear(lowbit_layer(group_size, bias))
    theirs = WQLinear_GEMM(4, group_size, IN, OUT, bias, "cpu")
    sd = {k: v.half() if k == "bias" else v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(sd, strict=True)  # names, shapes and dtypes as AutoAWQ registers them
    check_against_autoawq_gemm(ours, theirs, record_property, f"lowbit->autoawq gemm g{group_size} bias={bias}",
                               monkeypatch)


@pytest.mark.parametrize("cls,theirs_cls", [(AWQLinearGEMM, WQLinear_GEMM), (AWQLinearGEMV, WQLinear_GEMV)],
                         ids=["gemm", "gemv"])
@pytest.mark.parametrize("group_size", GROUPS)
def test_lowbit_packing_is_autoawq_packing(cls, theirs_cls, group_size):
    """AutoAWQ's own packer (`from_linear`, given lowbit's scales and zeros) writes the very words lowbit writes."""
    wq = lowbit_layer(group_size, bias=True)
    ours = cls.from_wqlinear(wq)
    lin = nn.Linear(IN, OUT)
    with torch.no_grad():
        lin.weight.copy_(wq.dequantize_weight())
        lin.bias.copy_(wq.bias)
    scales, zeros = wq.scales, wq.zeros()  # [out, groups]
    if theirs_cls is WQLinear_GEMM:  # AutoAWQ's quantizer hands GEMM the transposes
        scales, zeros = scales.t().contiguous(), zeros.t().contiguous()
    # AutoAWQ's packers cannot take -1 (they index groups, and GEMV sizes its zeros, by the raw
    # argument): give them the width
    theirs = theirs_cls.from_linear(lin, 4, resolved(group_size), scales=scales, zeros=zeros)
    for k, v in ours.state_dict().items():
        t = getattr(theirs, k)
        assert t.dtype == (torch.float16 if k == "bias" else v.dtype) and t.shape == v.shape, k
        assert torch.equal(t, v.to(t.dtype)), k


@pytest.mark.parametrize("group_size", GROUPS)
def test_lowbit_gemv_tensors_load_into_autoawq(group_size):
    ours = AWQLinearGEMV.from_wqlinear(lowbit_layer(group_size, bias=True))
    theirs = WQLinear_GEMV(4, group_size, IN, OUT, True, "cpu")
    theirs.load_state_dict({k: v.half() if k == "bias" else v for k, v in ours.state_dict().items()}, strict=True)


def test_autoawq_gemv_forward_on_cpu(record_property, monkeypatch):
    ours = AWQLinearGEMV.from_wqlinear(lowbit_layer(64, bias=True))
    theirs = WQLinear_GEMV(4, 64, IN, OUT, True, "cpu")
    theirs.load_state_dict({k: v.half() if k == "bias" else v for k, v in ours.state_dict().items()})
    x = fp16_inputs()
    try:
        y_theirs = theirs(x)
    except ModuleNotFoundError as e:
        pytest.skip(f"AutoAWQ's GEMV forward needs its CUDA kernels (awq_ext): {str(e).splitlines()[0]}")
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    w = ours.dequantize_weight()
    diff = (y_theirs.double() - ours(x).double()).abs()
    assert (diff <= bound(x, w, ours.bias)).all()
    record_property("lowbit->autoawq gemv g64 max|autoawq - lowbit ref|", float(diff.max()))


# ---- (b) what AutoAWQ writes, lowbit reads ------------------------------------------------------

def autoawq_pseudo_quantize(w, group_size):
    """AutoAWQ's own round-to-nearest (AwqQuantizer.pseudo_quantize_tensor), on float16 as its
    `_apply_quant` runs it."""
    cfg = types.SimpleNamespace(group_size=group_size, zero_point=True, w_bit=4)
    return AwqQuantizer.pseudo_quantize_tensor(cfg, w.half())


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bias", [True, False])
def test_autoawq_modules_load_into_lowbit(group_size, bias, record_property, monkeypatch):
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT, IN, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(OUT, generator=g))
    lin = lin.half()
    w_q, scales, zeros = autoawq_pseudo_quantize(lin.weight.data, group_size)
    lin.weight.data = w_q
    gs = resolved(group_size)
    # AutoAWQ's packers index groups with the raw argument, so -1 has to be given as the width
    theirs = WQLinear_GEMM.from_linear(lin, 4, gs, scales=scales.t().contiguous(),
                                       zeros=zeros.t().contiguous())
    ours = AWQLinearGEMM(IN, OUT, group_size=group_size, bias=bias)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    check_against_autoawq_gemm(ours, theirs, record_property, f"autoawq->lowbit gemm g{group_size} bias={bias}",
                               monkeypatch)
    # AutoAWQ's pseudo-quantized weight is what both compute with
    assert torch.equal(ours.dequantize_weight().half(), w_q)

    theirs_v = WQLinear_GEMV.from_linear(lin, 4, gs, scales=scales, zeros=zeros)
    ours_v = AWQLinearGEMV(IN, OUT, group_size=group_size, bias=bias)
    ours_v.load_state_dict(theirs_v.state_dict(), strict=True)
    assert torch.equal(ours_v.dequantize_weight(), ours.dequantize_weight())


TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory):
    """A tiny random Llama in float16, the dtype AutoAWQ quantizes in (its clip search wants
    out_features that are multiples of 64, hence the wider layers than conftest's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_LLAMA))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("float") / "llama"
    model.half().save_pretrained(path)
    return path


def autoawq_quantize(float_dir, version, out_dir):
    from awq import AutoAWQForCausalLM

    model = AutoAWQForCausalLM.from_pretrained(str(float_dir), device_map="cpu")
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 256, (64,), generator=g).tolist() for _ in range(16)]
    model.quantize(None, quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": version},
                   calib_data=calib, max_calib_seq_len=64, max_calib_samples=16)
    model.save_quantized(str(out_dir))
    return model


@pytest.fixture(scope="module")
def autoawq_checkpoints(float_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("autoawq")
    gemm = autoawq_quantize(float_llama, "GEMM", root / "gemm")
    autoawq_quantize(float_llama, "GEMV", root / "gemv")
    return root, gemm


def logits(model, dtype=torch.float32):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(ids).logits.to(dtype)


def exact_weight(m):
    """`(q - z) * s` `[out, in]` in float32 (exact there) from AutoAWQ's own unpacking. Its
    `dequantize_gemm` gives the same values rounded to float16, as its forward computes them."""
    codes, zeros = autoawq_codes(m.qweight, m.qzeros)
    g = m.group_size
    w = (codes.float() - zeros.float().repeat_interleave(g, dim=0)) * m.scales.float().repeat_interleave(g, dim=0)
    return w.t()


def dequantized_reference(awq_model):
    """AutoAWQ's quantized model in float32, each WQLinear_GEMM replaced by a Linear holding
    `exact_weight`: AutoAWQ's model without its float16 arithmetic."""
    import copy

    ref = copy.deepcopy(awq_model).float()
    for name, m in list(ref.named_modules()):
        if isinstance(m, WQLinear_GEMM):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(exact_weight(m))
                if m.bias is not None:
                    lin.bias.copy_(m.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    return ref


def test_autoawq_checkpoints_load_into_lowbit(autoawq_checkpoints, record_property, monkeypatch):
    root, awq_model = autoawq_checkpoints
    qc = json.loads((root / "gemm" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm"
    theirs = awq_model.model.eval()
    monkeypatch.setenv("LOWBIT_WINT_BACKEND", "ref")
    gemm, gemv = lowbit.load(root / "gemm"), lowbit.load(root / "gemv")
    n_layers = 0
    for name, m in theirs.named_modules():
        if isinstance(m, WQLinear_GEMM):
            n_layers += 1
            ours, ours_v = gemm.get_submodule(name), gemv.get_submodule(name)
            assert isinstance(ours, AWQLinearGEMM) and isinstance(ours_v, AWQLinearGEMV)
            w16 = dequantize_gemm(m.qweight, m.qzeros, m.scales, 4, m.group_size)
            assert torch.equal(ours.dequantize_weight().t().half(), w16), name
            assert torch.equal(ours.dequantize_weight(), exact_weight(m)), name
            # AutoAWQ quantizes deterministically: its GEMV run packed the same weights
            assert torch.equal(ours_v.dequantize_weight(), ours.dequantize_weight()), name
    assert n_layers == 7 * TINY_LLAMA["num_hidden_layers"]

    y_gemm, y_gemv = logits(gemm), logits(gemv)
    torch.testing.assert_close(y_gemv, y_gemm, rtol=0, atol=0)
    # against AutoAWQ's model computed in float32: the same numbers up to summation order
    y_ref = logits(dequantized_reference(theirs))
    torch.testing.assert_close(y_gemm, y_ref, rtol=1e-4, atol=1e-4)
    # against AutoAWQ's own float16 forward: lowbit must be no farther from it than the float32
    # computation of AutoAWQ's own weights is (float16 rounding in AutoAWQ is the whole difference)
    y_theirs = logits(theirs)
    own = float((y_ref - y_theirs).abs().max())
    ours_diff = float((y_gemm - y_theirs).abs().max())
    assert ours_diff <= own * 1.05 + 1e-5
    # lowbit's default kernels (bf16 activations) on the same checkpoint
    monkeypatch.delenv("LOWBIT_WINT_BACKEND")
    y_fast = logits(lowbit.load(root / "gemm"))
    rel_fast = float((y_fast - y_theirs).norm() / y_theirs.norm())
    # bf16 activations through two random blocks (1.4% measured); the ref backend above is the exact check
    assert rel_fast < 5e-2
    record_property("autoawq ckpt: rel|lowbit fast - autoawq fp16 forward|", rel_fast)
    record_property("autoawq ckpt: rel|autoawq fp32 reference - autoawq fp16 forward|",
                    float((y_ref - y_theirs).norm() / y_theirs.norm()))
    record_property("autoawq ckpt: max|lowbit - autoawq fp32 dequant reference|", float((y_gemm - y_ref).abs().max()))
    record_property("autoawq ckpt: max|lowbit - autoawq fp16 forward|", ours_diff)
    record_property("autoawq ckpt: max|autoawq fp32 reference - autoawq fp16 forward|", own)
    record_property("autoawq ckpt: logits max|.|", float(y_theirs.abs().max()))


def test_lowbit_checkpoint_matches_autoawq_in_memory_model(autoawq_checkpoints, tmp_path, monkeypatch):
    """AutoAWQ's quantized model, re-written by lowbit (read, then saved as AWQ gemm), holds the
    same tensors as AutoAWQ's own file."""
    from safetensors.torch import load_file

    root, _ = autoawq_checkpoints
    out = lowbit.save(lowbit.load(root / "gemm", dtype=None), tmp_path / "again", format="awq")
    theirs, ours = load_file(root / "gemm" / "model.safetensors"), load_file(out / "model.safetensors")
    tied = {"lm_head.weight"} if json.loads((root / "gemm" / "config.json").read_text()).get("tie_word_embeddings") \
        else set()
    assert set(ours) == set(theirs) - tied
    for k, v in ours.items():
        assert torch.equal(v, theirs[k].to(v.dtype)), k
