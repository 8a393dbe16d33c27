"""`lowbit report`: the measurements behind the plots, bad input, and the page rendering in Chromium."""

import copy
import json
import re
import shutil
import subprocess

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.report import _place_labels, layer_errors, recovered_scales, write_report
from lowbit.models import fold_scales

from ..conftest import WIKI_VALID, save_tiny_checkpoint, tiny_model


def ids(n=2, length=24, seed=0):
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def test_recovered_scales_undo_a_column_scaling():
    w = torch.randn(64, 32)
    s = torch.rand(32) * 4 + 0.25
    assert torch.allclose(recovered_scales(w * s, w), s, rtol=1e-5)


def test_clustered_labels_do_not_overlap():
    """Five W8 rows within 3% of each other (as in the bench table) get five separate label boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation, Text

    fig, ax = plt.subplots(figsize=(8, 5))
    pts = [(8.0, 29.5), (8.05, 29.7), (8.02, 29.25), (8.06, 30.1), (8.05, 29.8), (4.35, 33.8), (3.3, 67.0), (32, 29.2)]
    ax.scatter(*zip(*pts))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.margins(x=0.25, y=0.18)
    _place_labels(ax, pts, [f"a fairly long method name {i}" for i in range(len(pts))])
    renderer = fig.canvas.get_renderer()
    anns = [c for c in ax.get_children() if isinstance(c, Annotation)]
    assert len(anns) == len(pts)
    boxes = []
    for a in anns:
        a.update_positions(renderer)
        boxes.append(Text.get_window_extent(a, renderer))
    plt.close(fig)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (anns[i].get_text(), anns[j].get_text())


def test_folded_scales_are_not_counted_as_error():
    """A float model with AWQ-style scales folded in (norm -> q/k/v, up -> down) computes the same
    function: the report must see no weight error and a very high SQNR, and recover the scales."""
    fp = tiny_model("llama")
    folded = copy.deepcopy(fp)
    block = folded.model.layers[0]
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 3 + 0.3
    fold_scales(block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj], s,
                "norm")
    s2 = torch.rand(128, generator=torch.Generator().manual_seed(2)) * 3 + 0.3
    fold_scales(block.mlp.up_proj, [block.mlp.down_proj], s2, "linear")
    rows, scales, amax = layer_errors(folded, fp, ids(), progress=False)
    by = {r["path"]: r for r in rows}
    for r in rows:
        assert r["rel_weight_error"] < 1e-4, r
        assert r["sqnr_alone_db"] > 60, r
        assert r["sqnr_in_model_db"] > 50, r
    assert torch.allclose(scales["model.layers.0.self_attn.q_proj"], s, rtol=1e-4)
    assert torch.allclose(scales["model.layers.0.mlp.down_proj"], s2, rtol=1e-4)
    assert by["model.layers.0.self_attn.q_proj"]["scale_log2_absmax"] > 0.5
    assert amax["model.layers.1.mlp.down_proj"].shape == (128,)


def test_quantization_error_is_measured(tiny_llama):
    fp = tiny_llama
    q = lowbit.quantize(copy.deepcopy(fp), "w3a16-rtn", group_size=32, progress=False)
    rows, _, _ = layer_errors(q, fp, ids(), progress=False)
    assert len(rows) == 14  # 2 blocks x 7 linears
    for r in rows:
        assert 0.02 < r["rel_weight_error"] < 0.5, r
        assert 5 < r["sqnr_alone_db"] < 40, r
    # errors accumulate: the last block's output in the model is worse than the layer alone
    last = [r for r in rows if r["block"] == 1 and r["name"] == "mlp.down_proj"][0]
    assert last["sqnr_in_model_db"] < last["sqnr_alone_db"]


def test_a_model_of_another_shape_is_refused(tiny_llama):
    other = tiny_model("llama", intermediate_size=96)
    with pytest.raises(LowbitError, match="quantization of this reference"):
        write_report(other, tiny_llama, ids(), "unused", progress=False)


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_cli_report_renders_in_chromium(tmp_path, capsys):
    src = save_tiny_checkpoint(tmp_path / "tiny")
    assert main(["quantize", str(src), "--recipe", "w4a16-awq", "--group-size", "32", "--calib", str(WIKI_VALID),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--out", str(tmp_path / "q")]) == 0
    results = {"model": "tiny", "windows": 2, "seqlen": 32, "rows": [
        {"method": "float (fp32)", "bits_per_weight": 32.0, "ppl": 100.0, "status": "ok"},
        {"method": "w4a16-awq", "bits_per_weight": 4.5, "ppl": 120.0, "status": "ok"},
        {"method": "peer", "bits_per_weight": 4.2, "ppl": 130.0, "status": "ok", "kind": "peer"}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "q"), "--ref", str(src), "--results", str(tmp_path / "results.json"),
                 "--calib-seqlen", "32", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    imgs = re.findall(r"<img src=['\"]([^'\"]+)['\"]", page)
    assert {"layer_error.png", "ppl_vs_bits.png", "act_absmax_0.png", "scales_0.png"} <= set(imgs)
    assert all((out / i).is_file() for i in imgs)
    assert "does not record the scales" in page  # AWQ ran; lowbit's format keeps no scales
    report = json.loads((out / "report.json").read_text())
    assert report["scaling_methods"] == ["awq"] and len(report["layers"]) == 14

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium; `make test` tries to): "
                    "the page was written but not rendered")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", (out / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[:500]
    assert loaded.group(1) == loaded.group(2) == str(len(imgs))


def test_cli_report_bad_input(tmp_path, capsys):
    src = save_tiny_checkpoint(tmp_path / "tiny")
    code = main(["report", str(src), "--ref", str(src), "--results", str(tmp_path / "missing.json"),
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "not a readable results.json" in err
    assert not (tmp_path / "r").exists()
    (tmp_path / "r").mkdir()
    assert main(["report", str(src), "--ref", str(src), "--out", str(tmp_path / "r")]) == 2
    assert "exists" in capsys.readouterr().err
