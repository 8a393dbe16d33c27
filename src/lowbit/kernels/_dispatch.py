"""What every kernel dispatcher does before its own `auto` rule: honour an explicit backend or the
environment override, and refuse names it does not know or weights not prepared for them."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lowbit.errors import SpecError


def forced_backend(op: str, backend: str, env: str, known: Sequence[str], have: Sequence[str]) -> str | None:
    """The backend asked for (the argument, else the `env` variable), checked; None for "auto"."""
    if backend == "auto":
        backend = os.environ.get(env, "auto").strip().lower() or "auto"
    if backend == "auto":
        return None
    if backend not in known:
        raise SpecError(f"{op}: unknown backend {backend!r}; choose from {tuple(known)} or 'auto'")
    if backend not in have:
        raise SpecError(f"{op}: backend {backend!r} was not prepared (have {tuple(have)})")
    return backend
