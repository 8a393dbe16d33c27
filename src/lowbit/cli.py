"""`lowbit`: quantize, eval, bench, report, convert, zoo. Bad input ends in one line on stderr and status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import LowbitError


def _bool_pair(p: argparse.ArgumentParser, name: str, help: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=help)
    g.add_argument(f"--no-{name}", dest=name, action="store_false")


def _recipe_args(p: argparse.ArgumentParser, default: str, help: str) -> None:
    """--recipe and the weight settings that override it."""
    p.add_argument("--recipe", default=default, help=help)
    p.add_argument("--bits", type=int)
    p.add_argument("--group-size", type=int, help="-1 for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_true", default=None)
    sym.add_argument("--asym", dest="symmetric", action="store_false")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="set one option of the recipe's METHOD step (repeatable; VALUE read as YAML), "
                        "e.g. --set awq.clip_mode=asym --set gptq.act_order=false")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize Hugging Face causal LMs to low bits.")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model with a recipe and save it")
    q.add_argument("model", help="HF checkpoint directory or zoo name (smollm2-135m, gemma3-270m)")
    _recipe_args(q, "w4a16-rtn", "preset name or a recipe .yaml file")
    q.add_argument("--calib", help="calibration text file")
    q.add_argument("--calib-samples", type=int)
    q.add_argument("--calib-seqlen", type=int)
    q.add_argument("--calib-bos", action="store_true",
                   help="start each calibration window with BOS (the layout of Gemma's evaluation windows)")
    q.add_argument("--out", required=True)
    q.add_argument("--format", default="lowbit", choices=["lowbit", "awq", "gptq", "compressed-tensors"],
                   help="checkpoint format: lowbit's own; AutoAWQ's (4-bit asymmetric; vLLM, SGLang, transformers); "
                        "GPTQ v1 (2/3/4/8-bit; GPTQModel, vLLM, transformers); compressed-tensors pack-quantized "
                        "(no act-order; vLLM, llm-compressor)")
    q.add_argument("--awq-version", default="gemm", choices=["gemm", "gemv"], help="AutoAWQ layout (--format awq)")
    q.add_argument("--float-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="store the unquantized tensors (embeddings, norms, lm_head) in this dtype (--format lowbit; "
                        "default: the model's own)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--device", default=None)

    t = sub.add_parser("train-qat", help="quantization-aware training from a PTQ start, packed and saved like PTQ")
    t.add_argument("model", help="HF checkpoint directory or zoo name (the float model; also the distillation teacher)")
    _recipe_args(t, "w4a16-qat", "a QAT preset (w4a16-qat, w3a16-qat, w2a16-qat, w4a8-qat) or .yaml")
    t.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    t.add_argument("--calib", help="training text file (also the PTQ start's calibration)")
    t.add_argument("--calib-samples", type=int, help="PTQ start: calibration windows")
    t.add_argument("--calib-seqlen", type=int)
    t.add_argument("--train-samples", type=int, help="training windows (default: steps x batch size)")
    t.add_argument("--train-seqlen", type=int, help="tokens per training window (default: the recipe's seqlen)")
    t.add_argument("--checkpoint-every", type=int, help="steps between training-state checkpoints")
    t.add_argument("--state", help="training-state directory (default: OUT.qat-state)")
    t.add_argument("--resume", help="continue the run saved in this training-state directory")
    t.add_argument("--out", required=True)
    t.add_argument("--format", default="lowbit", choices=["lowbit", "gptq", "compressed-tensors"])
    t.add_argument("--overwrite", action="store_true")

    e = sub.add_parser("eval", help="perplexity, KL to a reference model, bits per weight")
    e.add_argument("model", help="checkpoint directory (lowbit or HF) or zoo name")
    e.add_argument("--ppl", required=True, help="text file, e.g. ../shared/data/wikitext-2/wiki.test.joined.txt")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    _bool_pair(e, "bos", "put BOS at the start of each window (default: on for Gemma, off otherwise)")
    e.add_argument("--ref", help="original model for KL divergence and top-1 agreement")
    e.add_argument("--json", help="write the results here")

    b = sub.add_parser("bench", help="prefill and decode throughput, peak memory")
    b.add_argument("model")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--json")

    r = sub.add_parser("report", help="HTML page and PNG plots: per-layer error, activation outliers, scales")
    r.add_argument("model", help="quantized checkpoint directory")
    r.add_argument("--ref", required=True, help="the float model it was quantized from (directory or zoo name)")
    r.add_argument("--results", help="a bench/methods.py results.json, for perplexity against bits per weight")
    r.add_argument("--calib", help="text file to draw the tokens from (default: text the float model samples)")
    r.add_argument("--calib-samples", type=int, default=2)
    r.add_argument("--calib-seqlen", type=int, default=128)
    r.add_argument("--out", required=True)
    r.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("convert", help="import a GGUF file into a plain HF checkpoint")
    c.add_argument("gguf")
    c.add_argument("out")
    c.add_argument("--overwrite", action="store_true")

    z = sub.add_parser("zoo", help="reference models: list, pull, path")
    z.add_argument("action", choices=["list", "pull", "path"])
    z.add_argument("name", nargs="?")
    return p


def _write_json(path: str | None, result: dict) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if path:
        from .formats import atomic_file

        with atomic_file(path) as tmp:
            Path(tmp).write_text(text + "\n")


def check_recipe_fits_format(recipe, fmt: str) -> None:
    """Refuse a recipe whose weights the checkpoint format cannot hold (the layer shapes are checked
    when saving)."""
    w = recipe.weights
    if fmt != "lowbit" and any(step.get("method") == "spqr" for step in recipe.steps):
        raise LowbitError(f"--format {fmt} has no sparse outliers or quantized group statistics; recipe {recipe.name} "
                          f"(SpQR) is saved in lowbit's own format only (--format lowbit)")
    if fmt != "lowbit" and recipe.activations is not None:
        llm_int8 = any(step.get("method") == "llm_int8" for step in recipe.steps)
        w4 = w.bits != 8  # W4A8: lowbit's packed int4 with integer group scales has no compressed-tensors form
        if fmt != "compressed-tensors" or llm_int8 or w4:
            raise LowbitError(f"--format {fmt} has no form for recipe {recipe.name}'s quantized activations; use "
                              f"--format lowbit" + ("" if llm_int8 or w4 else " or compressed-tensors"))
        return  # W8A8 goes into compressed-tensors' int-quantized
    if fmt == "awq" and (w.bits != 4 or w.symmetric or w.dtype != "int"):
        raise LowbitError(f"--format awq stores 4-bit asymmetric integer weights; recipe {recipe.name} has {w}")
    if fmt in ("gptq", "compressed-tensors") and w.dtype != "int":
        raise LowbitError(f"--format {fmt} stores integer weights (uniform levels); recipe {recipe.name} has {w}")
    if fmt == "gptq" and w.bits not in (2, 3, 4, 8):
        raise LowbitError(f"--format gptq stores 2, 3, 4 or 8-bit weights; recipe {recipe.name} has {w}")
    if fmt == "compressed-tensors" and any(step.get("act_order") for step in recipe.steps):
        raise LowbitError(f"--format compressed-tensors has no act-order (its g_idx ordering was removed); recipe "
                          f"{recipe.name} quantizes with act_order: use --format gptq or lowbit, or a recipe with "
                          f"act_order: false")


def cmd_quantize(a) -> None:
    from . import api, calib
    from .recipes import apply_overrides, load_recipe

    from .formats.atomic import check_output_dir

    out = check_output_dir(a.out, a.overwrite)  # before minutes of work, not after
    recipe = apply_overrides(load_recipe(a.recipe, bits=a.bits, group_size=a.group_size, symmetric=a.symmetric),
                             a.overrides)
    recipe.build()  # a bad option fails here, before the model loads
    if a.calib is not None and not Path(a.calib).is_file():
        raise LowbitError(f"calibration file {a.calib} does not exist")
    check_recipe_fits_format(recipe, a.format)  # before minutes of work, not after
    if a.float_dtype is not None and a.format != "lowbit":
        raise LowbitError(f"--float-dtype applies to --format lowbit; {a.format} checkpoints store fp16")
    t0 = time.perf_counter()
    model = api.load(a.model)
    src = calib.text_file(a.calib, bos=True if a.calib_bos else None) if a.calib else None
    api.quantize(model, recipe, src, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen, device=a.device)
    elapsed = time.perf_counter() - t0
    api.save(model, out, format=a.format, version=a.awq_version if a.format == "awq" else None,
             overwrite=a.overwrite, float_dtype=a.float_dtype)
    print(f"quantized {a.model} with {recipe.name} in {elapsed:.1f} s -> {out} ({a.format} format)")


def cmd_train_qat(a) -> None:
    import dataclasses

    from . import api, calib
    from .algorithms import qat
    from .formats.atomic import check_output_dir
    from .recipes import apply_overrides, load_recipe

    out = check_output_dir(a.out, a.overwrite)
    recipe = apply_overrides(load_recipe(a.recipe, bits=a.bits, group_size=a.group_size, symmetric=a.symmetric),
                             a.overrides)
    start, cfg = qat.split_recipe(recipe)
    start.build()  # a bad option fails here, before the model loads
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("steps", a.steps), ("checkpoint_every", a.checkpoint_every))
                                      if v is not None})
    check_recipe_fits_format(start, a.format)
    if a.resume is None and a.calib is None:
        raise LowbitError("train-qat needs --calib FILE: the text it trains on")
    if a.calib is not None and not Path(a.calib).is_file():
        raise LowbitError(f"calibration file {a.calib} does not exist")
    t0 = time.perf_counter()
    model = api.load(a.model)
    teacher = api.load(a.model) if cfg.distill > 0 else None
    if a.resume:
        trainer = qat.QATTrainer.resume(model, a.resume, teacher=teacher, steps=a.steps)
    else:
        src = calib.text_file(a.calib)
        api.quantize(model, start, src, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen)
        samples = src.samples(model.lowbit_tokenizer, a.train_samples or cfg.steps * cfg.batch_size,
                              a.train_seqlen, fallback=recipe.calibration)
        qat.prepare(model)
        trainer = qat.QATTrainer(model, samples, cfg, teacher=teacher, state_dir=a.state or f"{out}.qat-state")
    trainer.train()
    qat.convert(model)
    model.lowbit_recipe = {**recipe.to_dict(), "algorithms": [{"method": "qat", **dataclasses.asdict(trainer.config)}]}
    api.save(model, out, format=a.format, overwrite=a.overwrite)
    last = trainer.history[-1]["loss"] if trainer.history else float("nan")
    print(f"trained {a.model} with {recipe.name} for {trainer.step} steps (last loss {last:.4f}) in "
          f"{time.perf_counter() - t0:.1f} s -> {out} ({a.format} format); training state in {trainer.state_dir}")


def cmd_eval(a) -> None:
    from . import api
    from .eval import bits_per_weight, evaluate, load_windows, model_bytes
    from .models import expects_bos

    model = api.load(a.model)
    tok = model.lowbit_tokenizer
    if tok is None:
        raise LowbitError(f"{a.model} has no tokenizer files; evaluation needs one")
    bos = expects_bos(model) if a.bos is None else a.bos
    windows = load_windows(tok, a.ppl, seqlen=a.seqlen, windows=a.windows, bos=bos)
    ref = api.load(a.ref) if a.ref else None
    t0 = time.perf_counter()
    res = evaluate(model, windows, ref_model=ref)
    res.update(bits_per_weight(model))
    res["model_bytes"] = model_bytes(model.lowbit_source)
    res.update(model=str(a.model), ref=a.ref, bos=bos, text=str(a.ppl), eval_seconds=round(time.perf_counter() - t0, 1))
    _write_json(a.json, res)


def cmd_bench(a) -> None:
    from . import api
    from .eval import measure_throughput

    model = api.load(a.model)
    res = measure_throughput(model, prompt_len=a.prompt_len, new_tokens=a.new_tokens)
    res["model"] = str(a.model)
    _write_json(a.json, res)


def cmd_report(a) -> None:
    from . import api, calib
    from .eval.report import self_generated_ids, write_report
    from .formats.atomic import check_output_dir

    check_output_dir(a.out, a.overwrite)
    results = None
    if a.results:
        try:
            results = json.loads(Path(a.results).read_text())
        except (OSError, ValueError) as e:
            raise LowbitError(f"--results {a.results}: not a readable results.json ({e})") from None
    if a.calib is not None and not Path(a.calib).is_file():
        raise LowbitError(f"calibration file {a.calib} does not exist")
    qmodel, fp = api.load(a.model), api.load(a.ref)
    tok = fp.lowbit_tokenizer
    if a.calib:
        if tok is None:
            raise LowbitError(f"{a.ref} has no tokenizer files; --calib needs one")
        ids = calib.text_file(a.calib, n_samples=a.calib_samples, seqlen=a.calib_seqlen).samples(tok)
        where = f"{a.calib_samples} x {a.calib_seqlen} tokens of {Path(a.calib).name}"
    else:
        ids = self_generated_ids(fp, tok, a.calib_seqlen)
        where = f"{a.calib_seqlen} tokens sampled from the float model"
    page = write_report(qmodel, fp, ids, a.out, results=results, overwrite=a.overwrite,
                        title=f"lowbit report: {Path(str(a.model)).name}",
                        source=f"{a.model} against {a.ref}; {where}")
    print(f"wrote {page}")


def cmd_convert(a) -> None:
    from .formats.gguf import convert_gguf

    out = convert_gguf(a.gguf, a.out, overwrite=a.overwrite)
    print(f"converted {a.gguf} -> {out}")


def cmd_zoo(a) -> None:
    from . import zoo

    if a.action == "list":
        for name, entry in zoo.ZOO.items():
            print(name)
        return
    if not a.name:
        raise LowbitError(f"zoo {a.action} needs a model name ({', '.join(zoo.ZOO)})")
    print(zoo.pull(a.name) if a.action == "pull" else zoo.path(a.name))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"quantize": cmd_quantize, "train-qat": cmd_train_qat, "eval": cmd_eval, "bench": cmd_bench, "report": cmd_report, "convert": cmd_convert,
         "zoo": cmd_zoo}[args.cmd](args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
