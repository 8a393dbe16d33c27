"""Bytes per weight a quantized model holds in memory: what its packed modules store (the checkpoint's
tensors) and what their kernels prepare at run time (`_runtime`: int4pack, nib, int8 codes, ...),
after one decode and one prefill forward, so that every path has prepared what it reads.

    python bench/runtime_memory.py [--model smollm2-135m] [--recipe w4a16-rtn] [--group-size 64]

RTN needs no calibration; the layout a recipe's modules prepare does not depend on how the codes
were chosen, so an RTN run stands for AWQ and GPTQ at the same bits and group size.
"""

from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit import zoo
from lowbit.nn import W8A8Linear, WQLinear
from lowbit.recipes import load_recipe


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.data_ptr() in seen:  # a run-time entry may be the stored tensor itself
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="w4a16-rtn")
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    model = lowbit.load(zoo.pull(a.model))
    q = lowbit.quantize(model, load_recipe(a.recipe, group_size=a.group_size), progress=False)
    ids = torch.randint(100, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        q(ids)
        q(ids[:, :1])
    n_w = stored = runtime = 0
    keys: set[str] = set()
    for mod in q.modules():
        if isinstance(mod, (WQLinear, W8A8Linear)):
            n_w += mod.in_features * mod.out_features
            stored_t = list(mod.buffers())
            stored += tensor_bytes(stored_t)
            rt = getattr(mod, "_runtime", None) or {}
            keys.update(rt)
            ptrs = {t.data_ptr() for t in stored_t}
            runtime += tensor_bytes(t for t in rt.values() if t.data_ptr() not in ptrs)
    print(f"{a.model} {a.recipe} g{a.group_size}: {n_w / 1e6:.1f} M quantized weights; stored {stored / n_w:.3f} "
          f"byte/weight, run-time tensors {runtime / n_w:.3f} byte/weight beyond them ({', '.join(sorted(keys))})")


if __name__ == "__main__":
    main()
