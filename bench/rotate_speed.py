"""What the input rotation (`rotate: hadamard`) costs at run time: MixedInt8Linear (LLM.int8()) and
W4A8Linear with and without it, and the rotation of x alone, against float32 and bf16 `F.linear`.

The rotation is a `[M, K/b, b] @ [b, b]` matmul on x (b = the rotation block), so it adds b
multiply-adds per input entry to the linear's N: about b / N of the GEMM's work. Wall medians, x in
float32 (the models' compute dtype here) with a few large channels under LLM.int8()'s threshold, so
that the decomposition's float columns do not differ between the two.

    OMP_NUM_THREADS=2 python bench/rotate_speed.py [--shapes 4096x4096,4096x11008] [--m 1,128,512]
        [--block 64] [--modules llm_int8,w4a8] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.nn import MixedInt8Linear, W4A8Linear
from lowbit.quant.rotation import rotate, rotation_signs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.measure import write_json  # noqa: E402
from bench.w8a8 import median_ms  # noqa: E402


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008", help="KxN (in x out), comma-separated")
    ap.add_argument("--m", default="1,128,512", help="token counts")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--modules", default="llm_int8,w4a8", help="which modules to time: llm_int8, w4a8")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, generator=g) * 0.02
        wb = w.to(torch.bfloat16)
        mods = {}
        if "llm_int8" in a.modules.split(","):
            mods["llm_int8"] = MixedInt8Linear.from_weight(w, None)
            mods["llm_int8 rot"] = MixedInt8Linear.from_weight(w, None, rotate_block=a.block)
        if "w4a8" in a.modules.split(","):
            mods["w4a8"] = W4A8Linear.from_weight(w, None, group_size=64)
            mods["w4a8 rot"] = W4A8Linear.from_weight(w, None, group_size=64, rotate_block=a.block)
        signs = rotation_signs(k)
        for m in (int(v) for v in a.m.split(",")):
            x = torch.randn(m, k, generator=g)
            x[:, :: max(k // 8, 1)] = 5.0
            xb = x.to(torch.bfloat16)
            row = {"shape": f"{k}x{n}", "M": m, "fp32_ms": median_ms(lambda: F.linear(x, w)),
                   "bf16_ms": median_ms(lambda: F.linear(xb, wb)),
                   "rotate_x_ms": median_ms(lambda: rotate(x, signs, a.block))}
            for name, mod in mods.items():
                row[f"{name}_ms"] = median_ms(lambda: mod(x))
            rows.append(row)
            print(" ".join(f"{k_}={v:.3f}" if isinstance(v, float) else f"{k_}={v}" for k_, v in row.items()),
                  flush=True)
    keys = [k_ for k_ in rows[0] if k_.endswith("_ms")]
    print("\n| K x N | M | " + " | ".join(k_[:-3].replace("_", " ") + " ms" for k_ in keys) + " |")
    print("|---|---:|" + "---:|" * len(keys))
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | " + " | ".join(f"{r[k_]:.2f}" for k_ in keys) + " |")
    if a.json:
        write_json(a.json, {"threads": torch.get_num_threads(), "block": a.block, "rows": rows})


if __name__ == "__main__":
    main()
