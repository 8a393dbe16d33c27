"""Peer side of bench/gptq_peers.py: GPTQ with GPTQModel 7.6.0, run in its own venv.

    PEER_PYTHON -P bench/peers/gptqmodel_gptq.py --model DIR --samples S.safetensors --bits 4 --group-size 64 \
        --out OUT [--damp 0.05] [--sym] [--act-order] [--static-groups] [--gar]

Loads the model in fp32, quantizes it with GPTQModel's own GPTQ (its layer loop, Hessians, damping with
automatic increase on a failed Cholesky, packing into its GPTQ modules) on the very calibration token
windows the main script wrote, then dequantizes every packed module with GPTQModel's own unpacking
(scales as the checkpoint holds them: fp16) and writes OUT/model.safetensors, OUT/g_idx.safetensors
(the group of each input column: with --act-order they follow the activation order) and
OUT/result.json (see peer_side.py).

Settings that differ from GPTQModel's defaults, so that the scheme matches the other rows:
- asymmetric with a zero point unless --sym (its default is symmetric);
- damping `--damp` (its default 0.05; the main script passes what it was asked for);
- act_group_aware (GAR, a column reordering that GPTQModel 7 turns on by default when desc_act is off)
  is off unless --gar; --act-order sets desc_act (and --static-groups its static_groups);
- offload_to_disk off (the model is 135M parameters; nothing needs to leave memory).
GPTQMODEL_CPU_WORKERS defaults to 2 (this machine's cores); GPTQModel needs it set on CPU.

Run with `-P` so bench/peers/venv.py cannot shadow the standard library's `venv`.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))  # after the standard library (see peer_side.py)
from peer_side import load_calibration, logger, peer_args, save_outputs, timed  # noqa: E402

log = logger("gptqmodel")


def gptq_options(ap) -> None:
    ap.add_argument("--damp", type=float, default=None, help="damp_percent (default: GPTQModel's, 0.05)")
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--act-order", action="store_true", help="desc_act")
    ap.add_argument("--static-groups", action="store_true")
    ap.add_argument("--gar", action="store_true", help="act_group_aware (GPTQModel's default; off here)")
    ap.add_argument("--gptaq", type=float, default=None, help="GPTAQ (asymmetric calibration) with this alpha")


def dense_weight(module, bits: int, packable_cls) -> tuple[torch.Tensor, int]:
    """The [out, in] float weight a packed GPTQ module holds, and how many of its zero points were 0.

    GPTQModel keeps the packed layout of GPTQ checkpoints ("v1"): each stored zero point is z - 1, and
    W[i, o] = scale[g, o] * (code[i, o] - z[g, o]) with g = g_idx[i]. The codes and stored zero points
    are read with GPTQModel's own unpacking (the generic one, not its torch.compile'd fast path),
    caught where it would combine them."""
    got = {}

    def catch(self, codes, zeros, num_itr=1):
        got.update(codes=codes, zeros=zeros)

    module._dequantize_from_codes = types.MethodType(catch, module)  # instance attribute, shadows the method
    try:
        packable_cls.dequantize_weight(module)
    finally:
        del module._dequantize_from_codes
    maxq = (1 << bits) - 1
    codes = got["codes"][: module.in_features].to(torch.float32)  # [in, out]
    stored = got["zeros"].to(torch.int64)  # [groups, out]
    zeros = ((stored + 1) & maxq).to(torch.float32)
    g = module.g_idx.long()
    w = module.scales.to(torch.float32)[g] * (codes - zeros[g])
    return w.t().contiguous(), int((stored & maxq == maxq).sum())


def main() -> None:
    args = peer_args(gptq_options)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))

    import gptqmodel
    import transformers
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.quantization.config import GPTAQConfig, GPTQConfig

    notes = []
    ids = load_calibration(args.samples, log, args.samples_sha256)
    n, seqlen = ids.shape
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * seqlen} for row in ids]

    cfg = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.act_order,
               static_groups=args.static_groups, act_group_aware=args.gar and not args.act_order,
               offload_to_disk=False)
    if args.damp is not None:
        cfg["damp_percent"] = args.damp
    if args.gptaq is not None:
        cfg["gptaq"] = GPTAQConfig(alpha=args.gptaq, device="cpu")
    qcfg = GPTQConfig(**cfg)
    log(f"loading {args.model}")
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=torch.float32)
    model_dtype = str(next(model.model.parameters()).dtype)
    originals = {name: m.weight.detach().float().clone() for name, m in model.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}

    log(f"quantize W{args.bits} g{args.group_size} {'sym' if args.sym else 'asym'} damp {qcfg.damp_percent} "
        f"desc_act {qcfg.desc_act} static_groups {qcfg.static_groups} act_group_aware {qcfg.act_group_aware} "
        f"gptaq {qcfg.gptaq} "
        f"(gptqmodel {gptqmodel.__version__}, CPU workers {os.environ['GPTQMODEL_CPU_WORKERS']})")
    _, quant_seconds, quant_cpu_seconds = timed(lambda: model.quantize(calibration, batch_size=1))
    log(f"quantize done in {quant_seconds:.1f} s (CPU time {quant_cpu_seconds:.1f} s)")

    hf = model.model
    tensors, g_idx, rel_err = {}, {}, []
    n_quant = zero_wraps = 0
    with torch.no_grad():
        for name, module in hf.named_modules():
            if not isinstance(module, PackableQuantLinear):
                continue
            w, wrapped = dense_weight(module, args.bits, PackableQuantLinear)
            zero_wraps += wrapped
            tensors[f"{name}.weight"] = w
            if getattr(module, "bias", None) is not None:
                tensors[f"{name}.bias"] = module.bias.detach().to(torch.float32).contiguous()
            g_idx[name] = module.g_idx.detach().to(torch.int32).cpu()
            if name in originals:
                o = originals[name]
                rel_err.append(float((w - o).norm() / o.norm()))
            n_quant += 1
        for pname, p in hf.named_parameters():  # norms, embeddings, lm_head (tied ones once)
            tensors.setdefault(pname, p.detach().to(torch.float32).contiguous().clone())
    if n_quant != len(originals):
        raise RuntimeError(f"found {n_quant} packed GPTQ modules for {len(originals)} Linears")
    rel_err.sort()
    log(f"unpacked {n_quant} GPTQ modules; relative weight error median {rel_err[len(rel_err) // 2]:.4f}, "
        f"max {rel_err[-1]:.4f}")
    notes.append(f"weights unpacked from GPTQModel's packed modules (fp16 scales, zero points stored minus one); "
                 f"quantize time includes packing; relative weight error median {rel_err[len(rel_err) // 2]:.3f}")
    if zero_wraps:
        notes.append(f"groups with zero point 0 (stored as -1, read back modulo 2^bits): {zero_wraps}")
    save_outputs(args.out, tensors, log, peer="gptqmodel", seconds=quant_seconds, cpu_seconds=quant_cpu_seconds,
                 quantized_linears=n_quant, notes=notes, g_idx=g_idx,
                 versions={"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
                 config={"bits": args.bits, "group_size": args.group_size, "sym": qcfg.sym,
                         "damp_percent": qcfg.damp_percent, "damp_auto_increment": qcfg.damp_auto_increment,
                         "desc_act": qcfg.desc_act, "static_groups": qcfg.static_groups,
                         "act_group_aware": qcfg.act_group_aware, "true_sequential": qcfg.true_sequential,
                         "mse": qcfg.mse, "gptaq_alpha": qcfg.gptaq.alpha if qcfg.gptaq else None,
                         "lm_head": qcfg.lm_head, "model_dtype": model_dtype,
                         "cpu_workers": int(os.environ["GPTQMODEL_CPU_WORKERS"]),
                         "calibration": [int(n), int(seqlen)]})


if __name__ == "__main__":
    main()
