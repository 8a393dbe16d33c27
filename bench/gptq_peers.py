"""GPTQ side by side: lowbit, GPTQModel and llm-compressor in one run, on one machine.

Every method quantizes the same model with the same scheme (bits, groups of --group-size along the
input, asymmetric with a zero point unless --sym, act-order on or off, every decoder Linear, lm_head and
embeddings left in float) on the same calibration token windows (8 x 512 from wiki.valid.tokens, cut by
lowbit.calib.text_file and handed to every method as token ids: lowbit gets the tensor, the peers a
file, and the SHA-256 of the ids is in the report). Each peer runs in its own venv
(bench/peers/venv.py) as a subprocess, times its own quantization (model load excluded, as for lowbit)
and writes its model back as dense float weights (the dequantized values, with the group of each input
column where act-order scatters the groups). Every model's decoder Linears are checked to lie on the
expected per-group grid, then all are evaluated here by lowbit.eval on the same WikiText-2 test windows:
perplexity, KL divergence and top-1 agreement against the float model. A method that fails gets a row
saying why.

    python bench/gptq_peers.py [--model smollm2-135m] [--peers lowbit,gptqmodel,llmcompressor] [--bits 4|3]
        [--group-size 64] [--damp 0.01|default] [--peer-damp gptqmodel=0.05] [--act-order [--static-groups]]
        [--sym] [--n-samples 8] [--seqlen 512] [--json bench/out/gptq_peers.json]

Damping (the fraction of mean diag(H) added to the diagonal) is the setting the peers' defaults
disagree on: GPTQModel uses 0.05, llm-compressor and lowbit 0.01. `--damp X` gives every method X;
`--damp default` lets each use its own; `--peer-damp NAME=X,...` sets single methods. The table says
which damping each row ran with.

What "act-order" means differs by what each peer supports: lowbit and GPTQModel form the groups in
activation order (desc_act; the grid check then groups columns by their g_idx) unless
--static-groups; llm-compressor 0.14 only has static groups with act-order (actorder="weight"), and
computes every group's scale and zero point from the float weights before the sweep in any case.
GPTQModel 7's own default also reorders columns without act-order (act_group_aware); it is off here
unless --gptqmodel-gar. See bench/peers/gptqmodel_gptq.py and bench/peers/llmc_gptq.py.

On a machine shared with other jobs, wall times move a lot: compare times only within one run, and
consider `--threads 1`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lowbit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.peers.common import Peer, PeerBench, add_common_args, chosen_methods  # noqa: E402

# The gptqmodel and llmcompressor venvs are shared with other benchmarks: their names and requirement
# lists must stay exactly these.
PEERS = {
    "gptqmodel": Peer("GPTQModel 7.6.0 GPTQ", "gptqmodel", ("gptqmodel==7.6.0",), "gptqmodel_gptq.py"),
    "llmcompressor": Peer("llm-compressor 0.14.0.1 GPTQ", "llmcompressor", ("llmcompressor==0.14.0.1",),
                          "llmc_gptq.py"),
}
ALL_METHODS = ("lowbit", *PEERS)
DEFAULT_DAMP = {"lowbit": 0.01, "gptqmodel": 0.05, "llmcompressor": 0.01}  # each one's own default


def damping(args: argparse.Namespace, ap: argparse.ArgumentParser) -> dict[str, float | None]:
    """Method -> the damping to ask it for (None: its own default)."""
    if args.damp == "default":
        base = None
    else:
        try:
            base = float(args.damp)
        except ValueError:
            ap.error(f"--damp: a number or 'default', not {args.damp!r}")
    out = {m: base for m in ALL_METHODS}
    for item in filter(None, (s.strip() for s in args.peer_damp.split(","))):
        name, _, value = item.partition("=")
        if name not in ALL_METHODS:
            ap.error(f"--peer-damp: unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
        try:
            out[name] = None if value == "default" else float(value)
        except ValueError:
            ap.error(f"--peer-damp: {item!r} is not NAME=NUMBER")
    return out


def column_order(method: str, args: argparse.Namespace) -> str:
    """How the method orders columns and forms groups under these flags, in a few words."""
    if method == "llmcompressor":
        return "act-order, static groups" if args.act_order else "natural"
    if args.act_order:
        return "act-order, static groups" if args.static_groups else "act-order"
    if method == "gptqmodel" and args.gptqmodel_gar:
        return "natural groups, GAR order"
    return "natural"


def lowbit_quantize(args: argparse.Namespace, damp: float | None, samples):
    """The lowbit row's quantize call: the w{bits}a16-gptq preset (or --lowbit-recipe) with the bench's
    scheme, and its GPTQ step's damping and ordering set from the flags."""
    from lowbit.recipes import available, load_recipe

    name = args.lowbit_recipe or (f"w{args.bits}a16-gptq" if f"w{args.bits}a16-gptq" in available() else "w4a16-gptq")

    def run(model):
        rec = load_recipe(name, bits=args.bits, group_size=args.group_size, symmetric=args.sym)
        steps = [s for s in rec.steps if s.get("method") == "gptq"]
        if not steps:
            raise RuntimeError(f"recipe {name} has no gptq step")
        for step in steps:
            step.update(act_order=args.act_order, static_groups=args.static_groups)
            step["asym_calib"] = args.asym_calib
            if damp is not None:
                step["percdamp"] = damp
        run.percdamp = steps[-1].get("percdamp", DEFAULT_DAMP["lowbit"])
        return lowbit.quantize(model, rec, calib=samples)

    run.recipe = name
    run.percdamp = damp if damp is not None else DEFAULT_DAMP["lowbit"]
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap, ALL_METHODS)
    ap.add_argument("--damp", default="0.01",
                    help="damping for every method, or 'default' for each one's own (GPTQModel 0.05, "
                         "llm-compressor and lowbit 0.01); default 0.01")
    ap.add_argument("--peer-damp", default="", help="per-method damping, e.g. gptqmodel=0.05,llmcompressor=default")
    ap.add_argument("--act-order", action="store_true", help="quantize columns by decreasing diag(H) (desc_act)")
    ap.add_argument("--static-groups", action="store_true",
                    help="with --act-order: groups fixed in model order before the sweep (llm-compressor always)")
    ap.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric with a zero point)")
    ap.add_argument("--gptqmodel-gar", action="store_true",
                    help="leave GPTQModel's act_group_aware column reordering on (its default)")
    ap.add_argument("--asym-calib", type=float, default=0.0, metavar="ALPHA",
                    help="asymmetric calibration (fit the float model's outputs) with this alpha: lowbit's "
                         "asym_calib and GPTQModel's GPTAQ; llm-compressor has none and runs plain GPTQ. "
                         "Default 0: plain GPTQ everywhere (w3a16-gptq's own 0.25 is overridden)")
    ap.add_argument("--lowbit-recipe", default=None,
                    help="lowbit preset or YAML with a gptq step (default: w{bits}a16-gptq)")
    args = ap.parse_args()
    methods = chosen_methods(ap, args, ALL_METHODS)
    damp = damping(args, ap)
    if args.static_groups and not args.act_order:
        ap.error("--static-groups goes with --act-order")

    bench = PeerBench("gptq_peers", args)
    for method in methods:
        extra = {"damp": damp[method] if damp[method] is not None else DEFAULT_DAMP[method],
                 "damp_source": "set" if damp[method] is not None else "its default",
                 "column_order": column_order(method, args)}
        if method == "lowbit":
            q = lowbit_quantize(args, damp["lowbit"], bench.samples)
            row = bench.lowbit_row(
                f"lowbit {lowbit.__version__} {q.recipe}",
                f"quantize {q.recipe} W{args.bits} g{args.group_size} damp {q.percdamp} {extra['column_order']}",
                q, notes=["calibrated on the same token-id tensor as the peers (nothing tokenized in the timed span)"],
                **extra)
            row["damp"] = q.percdamp
            continue
        flags = ["--sym"] * args.sym + ["--act-order"] * args.act_order
        if method == "gptqmodel":
            flags += ["--static-groups"] * args.static_groups + ["--gar"] * args.gptqmodel_gar
            if args.asym_calib:
                flags += ["--gptaq", str(args.asym_calib)]
        if damp[method] is not None:
            flags += ["--damp", str(damp[method])]
        # the row says which objective the peer ran (GPTQModel's GPTAQ under --asym-calib), not just its package
        label = (f"GPTQModel 7.6.0 GPTAQ (alpha {args.asym_calib:g})"
                 if method == "gptqmodel" and args.asym_calib else None)
        row = bench.peer_row(method, PEERS[method], flags, label=label, **extra)
        used = (row.get("config") or {}).get("damp_percent" if method == "gptqmodel" else "dampening_frac")
        if used is not None:
            row["damp"] = used
        if method == "llmcompressor" and args.asym_calib:
            row["notes"].append("no asymmetric calibration in llm-compressor: plain GPTQ")
        if method == "llmcompressor" and args.act_order and not args.static_groups:
            row["notes"].append("act-order with static groups (actorder='weight'): the only act-order its GPTQ has")

    order = "act-order" + (", static groups" if args.static_groups else "") if args.act_order else "no act-order"
    bench.report(
        f"{'symmetric' if args.sym else 'asymmetric'}, {order}", symmetric=args.sym,
        extra_columns=[("damp", lambda r: "–" if r.get("damp") is None else
                        f"{r['damp']:g}{'' if r.get('damp_source') == 'set' else ' (default)'}"),
                       ("column order", lambda r: r.get("column_order", "–"))],
        extra_json={"damp": {m: damp[m] for m in methods}, "act_order": args.act_order,
                    "static_groups": args.static_groups, "gptqmodel_gar": args.gptqmodel_gar,
                    "asym_calib": args.asym_calib},
        timing="the quantize call only (model load excluded; every method starts from the same token ids, "
               "nothing is tokenized in the timed span; GPTQModel's includes packing its modules)")


if __name__ == "__main__":
    main()
