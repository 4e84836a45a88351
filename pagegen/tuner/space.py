"""The tuner's search space, derived in this one place from `spec.TUNABLES` (the legal values).

    search_space(spec)            -> {tunable: [values]}   the spec's full space (spec.tunables: the
                                                            family's, less kv_tma where the spec has no TMA path)
    search_space(spec, interpret) -> a small subset for the Triton interpreter
    parse_space(text, family)     -> a restriction given on the command line (--space)

Combinations that `spec.illegal_reason()` rejects stay in the space; the driver prunes them before compiling.
"""

from __future__ import annotations

from typing import Any

from pagegen.spec import OPT_IN_VALUES, TUNABLES, Config, KernelSpec, tunables

# under the interpreter warps and stages mean nothing and large tiles only cost time: the values
# tried there (each a subset of the legal values)
INTERPRET_VALUES: dict[str, tuple[int, ...]] = {
    "block_n": (16, 32, 64), "num_warps": (1, 4), "num_stages": (1, 2), "split_size": (0, 256), "block_m": (16, 32),
}


def search_space(spec: KernelSpec, interpret: bool = False) -> dict[str, list[int]]:
    """Categorical choices per tunable of spec (spec.tunables; interpret: the small interpreter subset)."""
    space = {name: list(values) for name, values in tunables(spec).items()}
    if interpret:
        space = {name: [v for v in values if v in INTERPRET_VALUES.get(name, values)] for name, values in space.items()}
    return space


def interpret_space(spec: KernelSpec) -> dict[str, list[int]]:
    """The interpreter's small space (search_space(spec, interpret=True))."""
    return search_space(spec, interpret=True)


def parse_space(text: str, family: str = "decode") -> dict[str, list[int]]:
    """A restricted search space from "block_n=32,64;num_warps=4,8;split_size=0,512": the named
    tunables take the listed values (the family's values or spec.OPT_IN_VALUES, e.g. num_stages=6,8),
    the others the family's full range. ValueError names the
    part that is wrong and the legal values."""
    full = {name: list(values) for name, values in TUNABLES[family].items()}
    out = dict(full)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in full:
            raise ValueError(f"--space: unknown tunable {name!r} for {family}; expected one of {', '.join(full)}")
        try:
            vals = sorted({int(v) for v in values.split(",") if v.strip()})
        except ValueError:
            raise ValueError(f"--space: {part!r} must be name=int,int,...") from None
        legal = full[name] + list(OPT_IN_VALUES.get(name, ()))
        bad = [v for v in vals if v not in legal]
        if not vals or bad:
            raise ValueError(f"--space: {name} values {bad or vals} not in the legal {legal}")
        out[name] = vals
    return out


def params_of(cfg: Config, space: dict[str, list[int]]) -> dict[str, int]:
    """The values of `cfg` for the tunables of `space` (an Optuna parameter dict)."""
    return {k: getattr(cfg, k) for k in space}


def config_of(params: dict[str, Any]) -> Config:
    """The Config of an Optuna parameter dict (fields not in it keep Config's defaults)."""
    return Config(**{k: int(v) for k, v in params.items()})


def in_space(params: dict[str, int], space: dict[str, list[int]]) -> bool:
    """True when every tunable of `space` has a value `params` gives and the space allows."""
    return all(params.get(k) in v for k, v in space.items())
