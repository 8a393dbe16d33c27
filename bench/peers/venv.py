"""Private virtual environments for the peer packages lowbit is compared with.

Each peer pins its own transformers (llm-compressor wants <= 5.17, AutoAWQ predates 5.x), so each
gets a venv of its own under ${LOWBIT_PEERS:-~/.cache/lowbit/peers}/NAME, with torch pinned to the
CPU wheel the main venv uses: any other route lets pip pull a CUDA build of several gigabytes.

    python = ensure_venv("llmcompressor", ["llmcompressor==0.14.0.1"])
    subprocess.run([str(python), "script.py"])

Idempotent (a marker records what was installed) and safe to call from two processes at once
(a file lock serialises the installs).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

TORCH_PIN = "torch==2.13.0"


def peers_root() -> Path:
    return Path(os.environ.get("LOWBIT_PEERS", Path.home() / ".cache" / "lowbit" / "peers"))


def ensure_venv(name: str, requirements: list[str], *, quiet: bool = True) -> Path:
    """The python executable of venv NAME, created and filled with `requirements` if needed."""
    root = peers_root() / name
    python = root / "bin" / "python"
    marker = root / ".lowbit-ready"
    want = json.dumps({"torch": TORCH_PIN, "requirements": sorted(requirements)})
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == want and python.exists():
            return python
        print(f"[peers] setting up {root} with {', '.join(requirements)} (once; a few minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
        q = ["-q"] if quiet else []
        pip = [str(python), "-m", "pip", "install", *q, "--disable-pip-version-check"]
        subprocess.run([*pip, TORCH_PIN], check=True)
        constraints = root / "constraints.txt"
        constraints.write_text(TORCH_PIN + "\n")
        subprocess.run([*pip, "-c", str(constraints), *requirements], check=True)
        marker.write_text(want)
    return python


if __name__ == "__main__":  # python bench/peers/venv.py NAME REQ [REQ ...]
    print(ensure_venv(sys.argv[1], sys.argv[2:]))
