"""Calibration data: N seeded samples of L tokens from a text file, a list of texts or an HF dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CalibrationError

# AutoAWQ's and GPTQ's defaults: 128 windows of 512 tokens.
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512


@dataclass
class CalibSource:
    """Where calibration text comes from; `samples(tokenizer)` turns it into token windows.

    The text is tokenized once as a whole and `n_samples` windows of `seqlen` tokens are cut at
    seeded random offsets (the convention of the GPTQ and AWQ reference code), so two runs with
    the same seed see the same tokens. With `bos` each window is BOS and the first seqlen - 1 tokens
    of its slot (the layout of Gemma's evaluation windows); None leaves it to the caller (off in
    `lowbit.quantize`). On Gemma-3-270m, W8A8 SmoothQuant O1 with GPTQ rounding, BOS windows scored no
    better on held-out validation text (ppl 54.74 and 54.99 against 54.76 and 54.57 without, for the
    two alpha-search errors), so it stays opt-in.
    """

    # None: the recipe's `calibration` block decides, else DEFAULT_SAMPLES x DEFAULT_SEQLEN
    n_samples: int | None = None
    seqlen: int | None = None
    seed: int = 0
    label: str = field(default="", compare=False)
    bos: bool | None = None

    def text(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def samples(self, tokenizer, n_samples: int | None = None, seqlen: int | None = None,
                fallback: dict | None = None, bos: bool = False) -> torch.Tensor:
        """`[n, L]` token ids. Sizes: the arguments, else the source's own, else `fallback` (a
        recipe's `calibration` block: n_samples, seqlen), else DEFAULT_SAMPLES x DEFAULT_SEQLEN.
        BOS first in each window: the source's `bos`, else the argument."""
        fallback = fallback or {}
        n = next(v for v in (n_samples, self.n_samples, fallback.get("n_samples"), DEFAULT_SAMPLES) if v is not None)
        length = next(v for v in (seqlen, self.seqlen, fallback.get("seqlen"), DEFAULT_SEQLEN) if v is not None)
        if n < 1 or length < 2:
            raise CalibrationError(f"calibration needs at least 1 sample of 2 tokens (asked for {n} x {length})")
        text = self.text()
        if not text.strip():
            raise CalibrationError(f"calibration text {self.label or ''} is empty".replace("  ", " "))
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() < length + 1:
            raise CalibrationError(
                f"calibration text {self.label} has {ids.numel()} tokens, too short for samples of "
                f"{length} tokens; give more text or a smaller --calib-seqlen"
            )
        gen = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, ids.numel() - length, (n,), generator=gen)
        if not (self.bos if self.bos is not None else bos):
            return torch.stack([ids[s : s + length] for s in starts.tolist()])
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise CalibrationError("calibration windows with BOS, but the tokenizer has no BOS token")
        head = torch.tensor([bos_id], dtype=ids.dtype)
        return torch.stack([torch.cat([head, ids[s : s + length - 1]]) for s in starts.tolist()])


@dataclass
class TextFile(CalibSource):
    path: str = ""

    def text(self) -> str:
        p = Path(self.path)
        if not p.is_file():
            raise CalibrationError(f"calibration file {p} does not exist")
        return p.read_text(encoding="utf-8", errors="replace")


@dataclass
class Texts(CalibSource):
    texts: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n\n".join(self.texts)


@dataclass
class HFDataset(CalibSource):
    """A `datasets` dataset (needs the network or a local cache; never used by the tests)."""

    path: str = ""
    name: str | None = None
    split: str = "train"
    column: str = "text"
    max_rows: int = 5000

    def text(self) -> str:
        try:
            import datasets
        except ImportError as e:  # an optional dependency: say how to get it
            raise CalibrationError("calibration from a dataset needs `pip install datasets`") from e
        ds = datasets.load_dataset(self.path, self.name, split=self.split)
        if self.column not in ds.column_names:
            raise CalibrationError(f"dataset {self.path} has no column {self.column!r} (columns: {ds.column_names})")
        rows = ds.select(range(min(self.max_rows, len(ds))))[self.column]
        return "\n\n".join(r for r in rows if r)


def text_file(path: str | Path, n_samples: int | None = None, seqlen: int | None = None, seed: int = 0,
              bos: bool | None = None) -> TextFile:
    return TextFile(n_samples=n_samples, seqlen=seqlen, seed=seed, label=str(path), bos=bos, path=str(path))


def texts(items: list[str], n_samples: int | None = None, seqlen: int | None = None, seed: int = 0,
          bos: bool | None = None) -> Texts:
    return Texts(n_samples=n_samples, seqlen=seqlen, seed=seed, label="<texts>", bos=bos, texts=list(items))


def hf_dataset(path: str, name: str | None = None, split: str = "train", column: str = "text",
               n_samples: int | None = None, seqlen: int | None = None, seed: int = 0,
               bos: bool | None = None) -> HFDataset:
    return HFDataset(n_samples=n_samples, seqlen=seqlen, seed=seed, label=path, bos=bos, path=path, name=name,
                     split=split, column=column)
