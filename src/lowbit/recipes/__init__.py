"""Named presets as YAML, and the loader that turns a preset into algorithm objects."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..algorithms import ALGORITHMS
from ..errors import LowbitError
from ..quant import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


class RecipeError(LowbitError, ValueError):
    """A recipe name that does not exist, or a YAML file that does not describe a recipe."""


@dataclass
class Recipe:
    name: str
    description: str
    weights: QuantSpec
    steps: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    # None: activations stay in float (weight-only recipes)
    activations: QuantSpec | None = None

    def build(self) -> list:
        algs = []
        for step in self.steps:
            step = dict(step)
            method = step.pop("method", None)
            if method not in ALGORITHMS:
                raise RecipeError(f"recipe {self.name}: unknown method {method!r} (known: {', '.join(sorted(ALGORITHMS))})")
            cls = ALGORITHMS[method]
            check_step_options(self.name, method, cls, step)
            if getattr(cls, "takes_activations", False):
                step.setdefault("activations", self.activations)
            try:
                algs.append(cls(self.weights, **step))
            except LowbitError:
                raise
            except (ValueError, TypeError) as e:  # a bad option value: one clear line, not a traceback
                raise RecipeError(f"recipe {self.name}: step {method}: {e}") from e
        return algs

    def to_dict(self) -> dict:
        d = {"name": self.name, "weights": self.weights.to_dict(), "steps": self.steps}
        if self.activations is not None:
            d["activations"] = self.activations.to_dict()
        return d


def check_step_options(recipe: str, method: str, cls, step: dict) -> None:
    """Refuses an option the method does not take, naming it and the ones it does (a misspelt key in
    a YAML file or a --set would otherwise end in a bare TypeError from the constructor)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n in params if n not in ("self", "spec")]
    unknown = sorted(set(step) - set(known))
    if unknown:
        raise RecipeError(f"recipe {recipe}: method {method} has no option {', '.join(map(repr, unknown))} "
                          f"(its options: {', '.join(known)})")


def parse_override(text: str) -> tuple[str, str, object]:
    """`METHOD.KEY=VALUE` (the CLI's --set) -> (method, key, value), VALUE read as YAML: 0.5, true,
    asym, [q_proj, k_proj]."""
    head, sep, value = str(text).partition("=")
    method, dot, key = head.strip().partition(".")
    if not sep or not dot or not method or not key:
        raise RecipeError(f"--set takes METHOD.KEY=VALUE (e.g. awq.clip_mode=asym), got {text!r}")
    try:
        return method, key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {text!r}: the value is not valid YAML ({e})") from e


def with_step_options(recipe: Recipe, method: str, options: dict) -> Recipe:
    """The recipe with `options` set in every step of `method` (checked when the recipe is built)."""
    if not any(st.get("method") == method for st in recipe.steps):
        raise RecipeError(f"recipe {recipe.name} has no {method!r} step "
                          f"(its steps: {', '.join(str(st.get('method')) for st in recipe.steps)})")
    steps = [dict(st, **options) if st.get("method") == method else st for st in recipe.steps]
    return dataclasses.replace(recipe, steps=steps)


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """The recipe with each `METHOD.KEY=VALUE` set in every step of that method (checked when the
    recipe is built); the recipe's name records them."""
    if not overrides:
        return recipe
    for text in overrides:
        method, key, value = parse_override(text)
        try:
            recipe = with_step_options(recipe, method, {key: value})
        except RecipeError as e:
            raise RecipeError(f"--set {text!r}: {e}") from None
    return dataclasses.replace(recipe, name=f"{recipe.name} [{', '.join(overrides)}]")


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def weight_spec(bits: int, symmetric: bool, group_size: int, granularity: str | None = None) -> QuantSpec:
    """`granularity: tensor` (one scale per weight) overrides group_size; else -1 is per channel."""
    if granularity not in (None, "tensor", "channel", "group"):
        raise RecipeError(f"weights granularity must be tensor, channel or group, got {granularity!r}")
    if granularity == "tensor":
        gran = PerTensor()
    else:
        gran = PerChannel() if group_size in (-1, 0, None) or granularity == "channel" else PerGroup(int(group_size))
    return QuantSpec(bits=int(bits), symmetric=bool(symmetric), granularity=gran)


_ACT_GRANULARITIES = {"token": PerToken, "tensor": PerTensor}


def activation_spec(a: dict) -> QuantSpec:
    """An `activations:` block: bits, symmetric, granularity (token / tensor), dynamic, observer."""
    unknown = set(a) - {"bits", "symmetric", "granularity", "dynamic", "observer"}
    if unknown:
        raise RecipeError(f"unknown activations keys: {sorted(unknown)}")
    g = a.get("granularity", "token")
    if g not in _ACT_GRANULARITIES:
        raise RecipeError(f"activations granularity must be one of {sorted(_ACT_GRANULARITIES)}, got {g!r}")
    return QuantSpec(bits=int(a.get("bits", 8)), symmetric=bool(a.get("symmetric", True)),
                     granularity=_ACT_GRANULARITIES[g](), dynamic=bool(a.get("dynamic", True)),
                     observer=a.get("observer", "minmax"))


def load_recipe(name_or_path: str | Path, *, bits: int | None = None, group_size: int | None = None,
                symmetric: bool | None = None) -> Recipe:
    """A preset by name (`w4a16-rtn`) or a YAML file; keyword overrides replace the weight settings."""
    p = Path(str(name_or_path))
    if p.suffix in (".yaml", ".yml") and p.is_file():
        text = p.read_text()
    else:
        res = resources.files(__name__) / f"{name_or_path}.yaml"
        if not res.is_file():
            raise RecipeError(f"no recipe {name_or_path!r}; presets: {', '.join(available())}, or a path to a .yaml file")
        text = res.read_text()
    try:
        d = yaml.safe_load(text)
        w = dict(d.get("weights") or {})
        if bits is not None:
            w["bits"] = bits
        if group_size is not None:
            w["group_size"] = group_size
        if symmetric is not None:
            w["symmetric"] = symmetric
        spec = weight_spec(w.get("bits", 4), w.get("symmetric", False), w.get("group_size", 128),
                           w.get("granularity"))
        spec = dataclasses.replace(spec, **{k: w[k] for k in ("dtype", "observer") if k in w})
        name = d.get("name", p.stem)
        if bits is not None or group_size is not None or symmetric is not None:
            name = f"{name} ({spec})"
        return Recipe(name=name, description=d.get("description", ""), weights=spec,
                      steps=list(d.get("steps") or [{"method": "rtn"}]), calibration=dict(d.get("calibration") or {}),
                      activations=activation_spec(dict(d["activations"])) if d.get("activations") else None)
    except (yaml.YAMLError, AttributeError, TypeError, KeyError) as e:
        raise RecipeError(f"recipe {name_or_path}: not a valid recipe ({e})") from e
