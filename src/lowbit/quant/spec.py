"""What to quantize to: granularity types and `QuantSpec`.

Granularity says which elements share one scale. Every granularity reduces over the LAST dim of the
tensor it is applied to (PerTensor over all of it), so the same spec works for a weight `[out, in]`
and an activation `[..., tokens, features]`:

- `PerTensor()`          one scale for the whole tensor;
- `PerChannel()`         one scale per row of a weight `[out, in]` (reduces over `in`);
- `PerToken()`           one scale per token of an activation `[..., tokens, features]`; the same
                         reduction as PerChannel, named for what it means on activations;
- `PerGroup(G)`          the last dim split into groups of G; `PerGroup(-1)` is one group over the
                         whole last dim, i.e. per-channel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import GroupSizeError, SpecError

DTYPES = ("int", "nf4", "codebook")
OBSERVERS = ("minmax", "percentile", "mse")


class Granularity:
    """Base of the granularity types; `isinstance(g, Granularity)` is how specs validate."""

    def to_dict(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class PerTensor(Granularity):
    def to_dict(self) -> dict:
        return {"type": "tensor"}

    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    def to_dict(self) -> dict:
        return {"type": "channel"}

    def __str__(self) -> str:
        return "per-channel"


@dataclass(frozen=True)
class PerToken(Granularity):
    def to_dict(self) -> dict:
        return {"type": "token"}

    def __str__(self) -> str:
        return "per-token"


@dataclass(frozen=True)
class PerGroup(Granularity):
    group_size: int

    def __post_init__(self):
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or (g <= 0 and g != -1):
            raise SpecError(f"group_size must be a positive int or -1 (whole row), got {g!r}")

    def to_dict(self) -> dict:
        return {"type": "group", "group_size": self.group_size}

    def __str__(self) -> str:
        return f"g{self.group_size}"


_GRANULARITY_TYPES = {"tensor": PerTensor, "channel": PerChannel, "token": PerToken, "group": PerGroup}


def granularity_from_dict(d: dict) -> Granularity:
    """Inverse of `Granularity.to_dict`: `{"type": "group", "group_size": 64}` -> `PerGroup(64)`."""
    if not isinstance(d, dict) or d.get("type") not in _GRANULARITY_TYPES:
        raise SpecError(f"granularity must be a dict with type in {sorted(_GRANULARITY_TYPES)}, got {d!r}")
    if d["type"] == "group":
        if "group_size" not in d:
            raise SpecError("group granularity needs a group_size")
        return PerGroup(d["group_size"])
    return _GRANULARITY_TYPES[d["type"]]()


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    `dtype`: "int" (uniform integer grid), "nf4" (QLoRA NormalFloat, bits=4) or "codebook" (a learned
    2**bits-entry codebook). Codebook kinds scale by the per-group absmax and ignore `symmetric`.
    `dynamic`: for activations, compute qparams per call instead of from calibration.
    `observer`: how static qparams are chosen from data ("minmax", "percentile", "mse").
    """

    bits: int = 4
    symmetric: bool = False
    granularity: Granularity = field(default_factory=lambda: PerGroup(128))
    dynamic: bool = False
    dtype: str = "int"
    observer: str = "minmax"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SpecError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.granularity, Granularity):
            raise SpecError(f"granularity must be PerTensor/PerChannel/PerGroup/PerToken, got {self.granularity!r}")
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.dtype == "nf4" and self.bits != 4:
            raise SpecError(f"nf4 needs bits=4, got bits={self.bits}")
        if self.observer not in OBSERVERS:
            raise SpecError(f"observer must be one of {OBSERVERS}, got {self.observer!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def is_codebook(self) -> bool:
        """True when codes index a codebook (nf4, learned) rather than a uniform grid."""
        return self.dtype != "int"

    def replace(self, **changes) -> "QuantSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "granularity": self.granularity.to_dict(),
            "dynamic": self.dynamic,
            "dtype": self.dtype,
            "observer": self.observer,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        if not isinstance(d, dict):
            raise SpecError(f"a quant spec must be a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SpecError(f"unknown quant spec keys: {sorted(unknown)}")
        kw = dict(d)
        if "granularity" in kw:
            kw["granularity"] = granularity_from_dict(kw["granularity"])
        return cls(**kw)

    def __str__(self) -> str:
        if self.dtype == "int":
            head = f"int{self.bits} {'sym' if self.symmetric else 'asym'}"
        elif self.dtype == "nf4":
            head = "nf4"
        else:
            head = f"codebook{self.bits}"
        parts = [head, str(self.granularity)]
        if self.dynamic:
            parts.append("dynamic")
        if self.observer != "minmax":
            parts.append(self.observer)
        return " ".join(parts)


def check_group_size(in_features: int, group_size: int, layer_name: str = "") -> None:
    """Raise GroupSizeError unless `group_size` divides `in_features` (-1 means the whole row).

    The message names the layer and offers the nearest group sizes that do divide it.
    """
    if group_size == -1 or (group_size > 0 and in_features % group_size == 0):
        return
    where = f"layer {layer_name}: " if layer_name else ""
    # Powers of two are what kernels and checkpoint formats expect; 8 is the smallest worth having.
    ok = [g for g in (2**k for k in range(3, 31)) if g <= in_features and in_features % g == 0]
    if group_size > 0:
        below = [g for g in ok if g < group_size]
        above = [g for g in ok if g > group_size]
        near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    else:
        near = ok[-2:]
    hint = " or ".join(str(g) for g in near)
    hint = f"try {hint}, or per-channel (-1)" if hint else "try per-channel (-1)"
    raise GroupSizeError(f"{where}group size {group_size} does not divide in_features {in_features}; {hint}")
