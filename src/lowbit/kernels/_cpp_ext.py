"""Building lowbit's optional C++ kernels: one shared library per source, registering torch ops.

Each source is compiled on first use with ``torch.utils.cpp_extension.load`` (``-O3 -march=native
-fopenmp`` plus any extra flags) into ``${LOWBIT_CACHE:-~/.cache/lowbit}/ext/PREFIX_TAG``, where the
tag hashes the source, the flags, torch's version and the CPU's flags (``-march=native`` binaries do
not move between CPUs). The library is a plain shared object registering ``torch.ops.NAMESPACE.*``:
no pybind11 and light headers (``load_inline`` would prepend torch/extension.h), about 4x faster to
build.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

import torch

BASE_CFLAGS = ("-O3", "-march=native", "-fopenmp")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_cpu_flag(flag: str) -> bool:
    """Whether /proc/cpuinfo lists `flag` (False where there is no such file)."""
    return flag in cpu_flags().split()


def build_dir(prefix: str, source: str, extra_cflags: tuple[str, ...] = ()) -> Path:
    key = source + torch.__version__ + cpu_flags() + (" ".join(extra_cflags) if extra_cflags else "")
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = Path(os.environ.get("LOWBIT_CACHE", "~/.cache/lowbit")).expanduser()
    return root / "ext" / f"{prefix}_{tag}"


def build(prefix: str, source: str, namespace: str, extra_cflags: tuple[str, ...] = ()):
    """Compiles (once per machine) and loads `source`; returns ``torch.ops.<namespace>``."""
    from torch.utils.cpp_extension import load

    d = build_dir(prefix, source, extra_cflags)
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"{prefix}.cpp"
    if not src.exists() or src.read_text() != source:
        tmp = d / f"{prefix}.cpp.{os.getpid()}"
        tmp.write_text(source)
        tmp.replace(src)
    logging.getLogger("lowbit").info("building the C++ %s kernels in %s (once per machine)", prefix, d)
    load(
        name=f"lowbit_{d.name}",
        sources=[str(src)],
        extra_cflags=[*BASE_CFLAGS, *extra_cflags],
        extra_ldflags=["-fopenmp"],
        build_directory=str(d),
        is_python_module=False,
        verbose=False,
    )
    return getattr(torch.ops, namespace)


class Extension:
    """One optional kernel library: `load()` builds it on first use and checks it with `selftest(ops)`
    against the torch expressions it replaces; it returns the ops, or None when the environment
    variable `env` turns it off or the build or the self-test failed (warned once: the torch paths
    take over, slower but the same numbers)."""

    def __init__(self, prefix: str, source: str, namespace: str, env: str, selftest, extra_cflags: tuple[str, ...] = ()):
        self.prefix, self.source, self.namespace, self.env = prefix, source, namespace, env
        self.selftest, self.extra_cflags = selftest, tuple(extra_cflags)
        self.failed = False
        self._ops = None

    def enabled(self) -> bool:
        return os.environ.get(self.env, "1").strip().lower() not in ("0", "false", "no", "off")

    def build_dir(self) -> Path:
        return build_dir(self.prefix, self.source, self.extra_cflags)

    def _load(self):
        if self._ops is None:
            ops = build(self.prefix, self.source, self.namespace, self.extra_cflags)
            self.selftest(ops)
            self._ops = ops
        return self._ops

    def load(self):
        if not self.enabled() or self.failed:
            return None
        try:
            return self._load()
        except Exception as e:  # no compiler, a compile error, a failed self-test: torch ops instead
            self.failed = True
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
            warnings.warn(f"lowbit: C++ {self.prefix} kernels unavailable, using torch ops ({type(e).__name__}: {msg})",
                          RuntimeWarning, stacklevel=3)
            return None
