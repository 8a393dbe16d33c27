"""`lowbit report`: what quantization did to a model, layer by layer, as an HTML page with PNG plots.

Given the quantized model, its float original and a few hundred tokens, it measures and draws:

- per-layer quantization error: for every decoder linear, the relative weight error and the output
  SQNR, both of the layer alone (the float layer's own input, fed to the quantized layer) and inside the
  quantized model (each layer fed by the quantized layers before it, so errors accumulate with depth);
- activation outlier maps: the per-channel absolute maximum of each linear's input in every block of
  the float model, the picture behind SmoothQuant and LLM.int8 (a few channels orders of magnitude
  above the rest, in the same place in every block);
- the per-input-channel scales a scaling method (AWQ, SmoothQuant) folded into the weights. Checkpoints
  that record them show them as recorded; otherwise the page says so and shows the scales recovered
  from the weights: AWQ stores Q(W diag(s)), so the least-squares ratio of each quantized weight column
  to its float column, s_j = <Wq[:, j], W[:, j]> / ||W[:, j]||^2, is s_j up to the rounding noise.
  The weight errors and the layer-alone SQNR use these scales (W diag(s), x / s), so a folded scale is
  not counted as error;
- perplexity against bits per weight across methods, from a bench/methods.py results.json.

It lives in `lowbit.eval` because it measures models without changing them (hooks come off, modes are
restored), like the perplexity and speed code beside it; loading checkpoints stays in the CLI.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.eval._common import eval_mode, model_device
from lowbit.formats.atomic import atomic_dir
from lowbit.models import find_module, get_adapter, get_blocks, linear_weight

__all__ = ["layer_errors", "write_report", "self_generated_ids", "recovered_scales"]

# scaling methods whose scales a report looks for
SCALING_METHODS = ("awq", "smoothquant")


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """[out, in] float weight of a packed module (its dequantized values) or of a float linear."""
    deq = getattr(module, "dequantize_weight", None)
    w = deq() if callable(deq) else linear_weight(module)
    return w.detach().float()


def _linear_paths(model: nn.Module) -> list[tuple[int, str, str]]:
    """(block index, block-relative name, full path) of every decoder linear, in block order."""
    adapter = get_adapter(model)
    out = []
    for i, block in enumerate(get_blocks(model, adapter)):
        for name in adapter.linears:
            if find_module(block, name) is not None:
                out.append((i, name, f"{adapter.blocks}.{i}.{name}"))
    return out


def recovered_scales(w_q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[in] least-squares per-input-column scale s with w_q ~= w * s (see the module docstring)."""
    num = (w_q * w).sum(0)
    den = w.pow(2).sum(0)
    s = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))
    # a dead or sign-flipped column carries no scale to recover
    return torch.where(s > 0, s, torch.ones_like(s))


def recovered_row_column_scales(w_q: torch.Tensor, w: torch.Tensor, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """([out] r, [in] s) with w_q ~= diag(r) w diag(s): a linear that feeds another one (v -> o, up -> down)
    carries the next one's inverse scales on its rows, on top of its own input scales. Alternating least
    squares; the geometric mean of r is 1, so a linear with no row scaling gets r ~= 1."""
    r = torch.ones(w.shape[0])
    s = torch.ones(w.shape[1])
    for _ in range(iters):
        s = recovered_scales(w_q, r[:, None] * w)
        r = recovered_scales(w_q.t(), (w * s).t())
        g = r.log().mean().exp()
        r, s = r / g, s * g
    return r, s


def _hooked(model: nn.Module, paths: list[str], fn):
    handles = []
    for path in paths:
        m = find_module(model, path)
        handles.append(m.register_forward_hook(lambda mod, args, out, path=path: fn(path, args[0], out)))
    return handles


@torch.no_grad()
def layer_errors(qmodel: nn.Module, fp: nn.Module, ids: torch.Tensor,
                 progress: bool = True) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(rows, scales, amax). rows: per decoder linear, the relative weight error, the output SQNR alone
    and in the model (dB), the recovered scales' largest |log2|. scales: {path: recovered scales [in]};
    the recovered row scales (AWQ's inverse scales on a linear that feeds another) are divided out too.
    amax: {path: per-channel abs max of the float linear's input [in]}. `ids` [n, L]: the tokens."""
    paths = _linear_paths(fp)
    scales, row_scales, rows = {}, {}, []
    for block, name, path in paths:
        qm = find_module(qmodel, path)
        if qm is None:
            raise LowbitError(f"the quantized model has no {path}: is it a quantization of this reference model?")
        w, w_q = _dense_weight(find_module(fp, path)), _dense_weight(qm)
        if w.shape != w_q.shape:
            raise LowbitError(f"{path}: quantized weight {tuple(w_q.shape)} vs reference {tuple(w.shape)}: "
                              f"is it a quantization of this reference model?")
        r, s = recovered_row_column_scales(w_q, w)
        scales[path], row_scales[path] = s, r
        w_eff = r[:, None] * w * s
        rel = ((w_q - w_eff).norm() / w_eff.norm().clamp_min(1e-30)).item()
        rows.append({"path": path, "block": block, "name": name, "rel_weight_error": rel,
                     "scale_log2_absmax": s.log2().abs().max().item(), "quantized": type(qm).__name__})

    # the quantized model's outputs at every linear, window by window; the float pass then compares
    # each float linear's output with them (in the model) and with the quantized layer fed its input (alone)
    q_out: dict[str, list[torch.Tensor]] = defaultdict(list)
    hs = _hooked(qmodel, [p for _, _, p in paths], lambda p, x, y: q_out[p].append(y.detach().float().cpu()))
    try:
        with eval_mode(qmodel):
            for row in tqdm(ids, desc="report: quantized pass", disable=not progress):
                qmodel(input_ids=row[None].to(model_device(qmodel)), use_cache=False)
    finally:
        for h in hs:
            h.remove()

    # ||y||^2, ||y - alone||^2, <y_q, y>, ||y_q||^2 with y the float output times the row scales
    sums = {p: [0.0, 0.0, 0.0, 0.0] for _, _, p in paths}
    amax: dict[str, torch.Tensor] = {}
    window = [0]

    def compare(path, x, y):
        x2 = x.detach().float().reshape(-1, x.shape[-1])
        a = x2.abs().amax(0).cpu()
        amax[path] = a if path not in amax else torch.maximum(amax[path], a)
        qm = find_module(qmodel, path)
        alone = qm(x / scales[path].to(x.dtype).to(x.device)).detach().float().cpu()
        y = y.detach().float().cpu() * row_scales[path]  # what the quantized layer, fed x / s, should return
        acc = sums[path]
        acc[0] += y.double().pow(2).sum().item()
        acc[1] += (y - alone).double().pow(2).sum().item()
        yq = q_out[path][window[0]].double()
        acc[2] += (yq * y.double()).sum().item()
        acc[3] += yq.pow(2).sum().item()

    hs = _hooked(fp, [p for _, _, p in paths], compare)
    try:
        with eval_mode(fp, qmodel):
            for k, row in enumerate(tqdm(ids, desc="report: float pass", disable=not progress)):
                window[0] = k
                fp(input_ids=row[None].to(model_device(fp)), use_cache=False)
    finally:
        for h in hs:
            h.remove()

    def db(signal, noise):
        if noise == 0:
            return math.inf
        return 10 * math.log10(signal / noise) if signal > 0 else -math.inf

    for r in rows:
        signal, alone, dot, q_energy = sums[r["path"]]
        r["sqnr_alone_db"] = db(signal, alone)
        # inside the model the split of a folded scale between this linear's rows and its inputs is
        # what the method chose, which the weights leave open up to one factor: fitted here as g
        g_signal = dot * dot / signal if signal > 0 else 0.0
        r["sqnr_in_model_db"] = db(g_signal, max(q_energy - g_signal, 0.0))
    return rows, scales, amax


# ---------------------------------------------------------------------------------------------- tokens


@torch.no_grad()
def self_generated_ids(fp: nn.Module, tokenizer, n_tokens: int = 128, seed: int = 0) -> torch.Tensor:
    """[1, n_tokens] ids the float model samples itself from BOS (or token 0): text from the model's own
    distribution when no calibration file is given."""
    start = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    ids = torch.tensor([[0 if start is None else start]], device=model_device(fp))
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    cache = None
    nxt = ids
    with eval_mode(fp):
        for _ in range(n_tokens - 1):
            out = fp(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float(), -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], 1)
    return ids.cpu()


# ---------------------------------------------------------------------------------------------- scales


def recorded_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Smoothing / AWQ scales a checkpoint kept as buffers (names with "smooth" or "awq_scale")."""
    return {name: buf.detach().float().cpu() for name, buf in model.named_buffers()
            if "smooth" in name.rsplit(".", 1)[-1] or "awq_scale" in name.rsplit(".", 1)[-1]}


def scaling_methods(model: nn.Module) -> list[str]:
    recipe = getattr(model, "lowbit_recipe", None) or {}
    steps = recipe.get("algorithms") or recipe.get("steps") or []
    return [s.get("method") for s in steps if isinstance(s, dict) and s.get("method") in SCALING_METHODS]


# ---------------------------------------------------------------------------------------------- plots


def _input_groups(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """(label, block-relative linears) for each distinct linear input: q/k/v share one, gate/up another."""
    adapter = get_adapter(model)
    shared = {n: g for g in adapter.shared_input for n in g}
    seen, out = set(), []
    for name in adapter.linears:
        group = shared.get(name, (name,))
        if group[0] in seen:
            continue
        seen.add(group[0])
        out.append(("input of " + ", ".join(n.rsplit(".", 1)[-1] for n in group), group))
    return out


def _block_matrix(values: dict[str, torch.Tensor], blocks_prefix: str, n_blocks: int, name: str) -> torch.Tensor | None:
    rows = [values.get(f"{blocks_prefix}.{i}.{name}") for i in range(n_blocks)]
    if any(r is None for r in rows) or len({r.numel() for r in rows}) != 1:
        return None
    return torch.stack(rows)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_layer_errors(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    names = sorted({r["name"] for r in rows}, key=[r["name"] for r in rows].index)
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for name in names:
        sel = [r for r in rows if r["name"] == name]
        x = [r["block"] for r in sel]
        short = name.rsplit(".", 1)[-1]
        axes[0].plot(x, [r["rel_weight_error"] for r in sel], marker="o", ms=3, label=short)
        axes[1].plot(x, [r["sqnr_alone_db"] for r in sel], marker="o", ms=3, label=short)
        axes[2].plot(x, [r["sqnr_in_model_db"] for r in sel], marker="o", ms=3, label=short)
    axes[0].set_ylabel("relative weight error")
    axes[1].set_ylabel("output SQNR, layer alone (dB)")
    axes[2].set_ylabel("output SQNR in the model (dB)")
    axes[2].set_xlabel("block")
    from matplotlib.ticker import MaxNLocator

    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(ncol=len(names), fontsize=8, loc="upper right")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    _save(fig, path)


def plot_channel_map(matrix: torch.Tensor, path: Path, title: str, label: str, cmap: str = "viridis",
                     center: bool = False) -> None:
    """A [blocks, channels] heatmap; `center`: a diverging map around 0 (log scales), else a plain one."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3.2))
    # a figure this wide shows ~700 columns: pool wider maps so that a lone outlier channel survives
    k = math.ceil(matrix.shape[1] / 384)
    if k > 1:
        pad = k * math.ceil(matrix.shape[1] / k) - matrix.shape[1]
        m = torch.nn.functional.pad(matrix, (0, pad), value=0.0 if center else float(matrix.min()))
        m = m.reshape(matrix.shape[0], -1, k)
        # centered maps keep each bin's value farthest from 0 (sign kept), the others its maximum
        matrix = m.gather(2, m.abs().argmax(2, keepdim=True)).squeeze(2) if center else m.amax(2)
    data = matrix.numpy()
    kw = {}
    if center:
        lim = float(abs(data).max()) or 1.0
        kw = {"vmin": -lim, "vmax": lim}
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, **kw)
    ax.set_xlabel("input channel" + (f" (bins of {k}, each showing its extreme)" if k > 1 else ""))
    if k > 1:
        ax.xaxis.set_major_formatter(lambda v, _: f"{int(v * k)}")
    ax.set_ylabel("block")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def _place_labels(ax, points: list[tuple[float, float]], labels: list[str], fontsize: int = 7) -> None:
    """Annotates each point with its label at the first nearby spot whose box overlaps no label placed
    before it and no marker; clustered points (several W8 rows within a few percent of each other) would
    otherwise print their names on top of each other. A label pushed away from its point gets a leader line."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    marker_boxes = []
    for x, y in points:
        px, py = ax.transData.transform((x, y))
        marker_boxes.append((px - 3, py - 3, px + 3, py + 3))
    placed: list[tuple[float, float, float, float]] = []
    offsets = [(5, 2), (5, -9), (-5, 2), (-5, -9)]
    offsets += [(dx, dy) for r in (12, 22, 34, 48, 64, 82) for dy in (r, -r) for dx in (5, -5, 30, -30, 60, -60, 100, -100)]

    frame = ax.get_window_extent(renderer)

    def overlap(b) -> float:
        """Area of the box outside the axes plus its area over earlier labels and markers."""
        inside = max(0.0, min(b[2], frame.x1) - max(b[0], frame.x0)) * max(0.0, min(b[3], frame.y1) - max(b[1], frame.y0))
        cost = (b[2] - b[0]) * (b[3] - b[1]) - inside
        for o in placed + marker_boxes:
            cost += max(0.0, min(b[2], o[2]) - max(b[0], o[0])) * max(0.0, min(b[3], o[3]) - max(b[1], o[1]))
        return cost

    # top-down so that labels in a column stack in the order of their points
    for i in sorted(range(len(points)), key=lambda i: -points[i][1]):
        best = None
        for dx, dy in offsets:
            far = abs(dy) > 9
            ann = ax.annotate(labels[i], points[i], xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha="left" if dx > 0 else "right", va="bottom",
                              arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if far else None)
            ann.update_positions(renderer)
            bb = Text.get_window_extent(ann, renderer)  # the text alone: an Annotation's box spans its leader too
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            cost = overlap(box)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, box)
            else:
                ann.remove()
            if cost == 0:
                break
        placed.append(best[2])  # the least-overlapping spot when none is free: a label is never dropped


def plot_ppl_vs_bits(rows: list[dict], path: Path, title: str) -> int:
    """Scatter of ppl against bits per weight for the rows that have both; returns how many."""
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("ppl") and r.get("bits_per_weight") and str(r.get("status", "ok")) == "ok"
           and math.isfinite(r["ppl"])]
    if not pts:
        return 0
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for r in pts:
        peer = r.get("kind") == "peer"
        ax.scatter(r["bits_per_weight"], r["ppl"], marker="s" if peer else "o", color="tab:orange" if peer else "tab:blue")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.margins(x=0.25, y=0.18)  # room for the labels of the outermost points
    ax.set_xlabel("bits per weight (decoder linears; log scale)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    _place_labels(ax, [(r["bits_per_weight"], r["ppl"]) for r in pts], [str(r["method"])[:40] for r in pts])
    _save(fig, path)
    return len(pts)


# ---------------------------------------------------------------------------------------------- page

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; }} .note {{ color: #555; font-size: 14px; }}
</style></head>
<body>
<h1>{title}</h1>
{body}
<script>
// Marks the page once every image has loaded (a test reads this with headless Chromium's --dump-dom).
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.documentElement.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    body = []
    for r in rows:
        cells = []
        for _, key, spec in cols:
            v = r.get(key)
            cells.append(f"<td>{html.escape(format(v, spec) if isinstance(v, (int, float)) and spec else str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(qmodel: nn.Module, fp: nn.Module, ids: torch.Tensor, out_dir: str | os.PathLike, *,
                 results: dict | None = None, title: str = "lowbit report", source: str = "",
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Measures `qmodel` against `fp` on `ids` [n, L], draws the plots and writes OUT/index.html with
    them and OUT/report.json with the figures. Returns the path of index.html."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also what makes the plots reproducible in CI
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LowbitError(f"report tokens must be [n, L >= 2], got {list(ids.shape)}")
    rows, scales, amax = layer_errors(qmodel, fp, ids, progress)
    adapter = get_adapter(fp)
    n_blocks = len(get_blocks(fp, adapter))
    methods = scaling_methods(qmodel)
    recorded = recorded_scales(qmodel)
    body = [f"<p class=note>{html.escape(source)}<br>{ids.shape[0]} x {ids.shape[1]} tokens; "
            f"{len(rows)} decoder linears in {n_blocks} blocks; recipe: "
            f"{html.escape(str((getattr(qmodel, 'lowbit_recipe', None) or {}).get('name', 'not recorded')))}</p>"]
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        plot_layer_errors(rows, tmp / "layer_error.png", "quantization error per decoder linear")
        body.append("<h2>Per-layer quantization error</h2>"
                    "<p class=note>Relative weight error ||Wq - diag(r) W diag(s)|| / ||diag(r) W diag(s)|| (s: the "
                    "per-input-channel scales below, r: the per-output-row scales a linear feeding another carries; both "
                    "1 when nothing was folded); output SQNR of the layer alone (the float layer's "
                    "input, divided by s, fed to the quantized layer) and inside the quantized model (fed by the "
                    "quantized layers before it: errors accumulate with depth).</p>"
                    '<img src="layer_error.png" alt="per-layer error">')
        worst = sorted(rows, key=lambda r: r["sqnr_alone_db"])[:10]
        body.append("<h3>Lowest SQNR, layer alone</h3>" + _table(worst, [
            ("linear", "path", ""), ("module", "quantized", ""), ("rel. weight error", "rel_weight_error", ".4f"),
            ("SQNR alone dB", "sqnr_alone_db", ".1f"), ("SQNR in model dB", "sqnr_in_model_db", ".1f")]))

        body.append("<h2>Activation outliers per block</h2><p class=note>log10 of the per-channel absolute maximum of "
                    "each linear's input in the float model, one row per block. Channels that stand out in every "
                    "block are what SmoothQuant migrates into the weights and LLM.int8() keeps in 16 bits.</p>")
        outliers = []
        for k, (label, group) in enumerate(_input_groups(fp)):
            m = _block_matrix(amax, adapter.blocks, n_blocks, group[0])
            if m is None:
                continue
            fname = f"act_absmax_{k}.png"
            plot_channel_map(m.clamp_min(1e-8).log10(), tmp / fname, label, "log10 |x| max")
            body.append(f"<h3>{html.escape(label)}</h3><img src='{fname}' alt='{html.escape(label)}'>")
            med = m.median(dim=1).values.clamp_min(1e-8)
            ratio = m.max(dim=1).values / med
            outliers.append({"input": label, "max_over_median_worst_block": ratio.max().item(),
                             "worst_block": int(ratio.argmax()), "top_channels": m.max(0).values.topk(
                                 min(5, m.shape[1])).indices.tolist()})
        body.append(_table(outliers, [("input", "input", ""), ("max / median (worst block)",
                                                                 "max_over_median_worst_block", ".1f"),
                                      ("worst block", "worst_block", "d"), ("top channels", "top_channels", "")]))

        body.append("<h2>Scales folded by AWQ / SmoothQuant</h2>")
        if recorded:
            body.append(f"<p class=note>The checkpoint records {len(recorded)} scale tensors: "
                        f"{html.escape(', '.join(list(recorded)[:6]))}{' ...' if len(recorded) > 6 else ''}.</p>")
        elif methods:
            body.append(f"<p class=note>The recipe ran {html.escape(', '.join(methods))}, but this checkpoint does not "
                        "record the scales it chose. Shown: the scales recovered from the weights (least-squares "
                        "ratio of each quantized column to the float one), log2, per block.</p>")
        else:
            body.append("<p class=note>Not recorded: this checkpoint records no scales, and its recipe names no scaling "
                        "method (AWQ, SmoothQuant). The scales recovered from the weights are shown for reference; "
                        "without a scaling method they are 1 up to rounding noise.</p>")
        for k, (label, group) in enumerate(_input_groups(fp)):
            m = _block_matrix(scales, adapter.blocks, n_blocks, group[0])
            if m is None:
                continue
            fname = f"scales_{k}.png"
            plot_channel_map(m.log2(), tmp / fname, f"scales of {', '.join(n.rsplit('.', 1)[-1] for n in group)}",
                             "log2 s", cmap="coolwarm", center=True)
            body.append(f"<img src='{fname}' alt='scales {k}'>")

        body.append("<h2>Perplexity against bits per weight</h2>")
        n_pts = 0
        if results:
            n_pts = plot_ppl_vs_bits(results.get("rows", []), tmp / "ppl_vs_bits.png",
                                     f"{results.get('model', '')}: {results.get('windows', '?')} windows x "
                                     f"{results.get('seqlen', '?')} tokens")
        if n_pts:
            body.append("<p class=note>From the results file: circles lowbit presets, squares peers.</p>"
                        "<img src='ppl_vs_bits.png' alt='ppl vs bits'>")
        else:
            body.append("<p class=note>No results file given (bench/methods.py writes one: --results FILE), "
                        "or it has no row with both perplexity and bits per weight.</p>")
        (tmp / "index.html").write_text(_PAGE.format(title=html.escape(title), body="\n".join(body)), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(
            {"layers": rows, "outliers": outliers, "scaling_methods": methods, "recorded_scales": sorted(recorded),
             "tokens": list(ids.shape)}, indent=1, default=str))
    return Path(out_dir) / "index.html"
