"""What the tuner tunes for: specs of common models and the shape buckets of their workloads.

A shape bucket is a pair whose meaning depends on the family:
  decode: (batch, ctx)     sequences in the step x context length (tokens cached per sequence)
  extend: (q_tokens, ctx)  new query tokens in the step x context length they attend to
The tuner times every bucket of a workload for each candidate config; the table keeps the winner
per bucket; the dispatcher picks the nearest bucket (in log space) at run time.

Attention features: a workload of a spec with features carries the VALUES of its model (the spec's
flags only say which code the kernel has): `window` (tokens, for spec.sliding_window) and `softcap`
(for spec.softcap). Sinks and ALiBi slopes need no value here: the runner draws the sinks (learned
logits: randn * SINK_STD, seed SINK_SEED) and uses the standard ALiBi slopes
(pagegen.features.standard_alibi_slopes). A spec given by its key alone (`pagegen tune --spec`)
gets FEATURE_DEFAULTS (window 4096, softcap 50.0: Mistral-7B's window, Gemma-2's cap).

With a sliding window W a bucket's inputs keep their full context (the kernel must skip the pages
outside the window), but the table records the bucket under its effective context min(W, ctx)
(`Workload.table_shape`), the context the dispatcher looks up at run time (Features.effective_ctx).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pagegen.features import Features, check_features
from pagegen.spec import ATTENTION_FAMILIES, FP8_FORMATS, KernelSpec

ELEM_BYTES = {"fp16": 2, "bf16": 2, **{fp8: 1 for fp8 in FP8_FORMATS}}  # bytes an element, per (kv_)dtype


@dataclass(frozen=True, slots=True)
class Bucket:
    """One workload shape. decode: (batch, ctx); extend: (q_tokens, ctx)."""

    a: int  # decode: batch (sequences); extend: q_tokens (new query tokens)
    ctx: int  # context length in tokens (ragged: the longest)
    weight: float = 1.0  # weight in the tuner's objective
    ragged: bool = False  # decode only: lengths uniform in [ctx // 128, ctx] (seeded), not all ctx

    def __post_init__(self) -> None:
        for name, v in (("batch/q_tokens", self.a), ("ctx", self.ctx)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"bucket {name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"bucket weight must be a finite number > 0, got {self.weight!r}")
        if not isinstance(self.ragged, bool):
            raise ValueError(f"bucket ragged must be true or false, got {self.ragged!r}")

    def lengths(self) -> list[int]:
        """Context length of each sequence of a decode bucket: all ctx, or (ragged) drawn uniformly
        from [max(1, ctx // 128), ctx] with a seed fixed by the shape, so every trial and every
        worker times the same batch. A real serving batch is ragged: a config tuned on uniform
        lengths may leave SMs idle while the longest sequences finish."""
        if not self.ragged:
            return [self.ctx] * self.a
        rng = random.Random(self.a * 1_000_003 + self.ctx)
        return [rng.randint(max(1, self.ctx // 128), self.ctx) for _ in range(self.a)]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a, self.ctx)

    @property
    def name(self) -> str:
        return f"{self.a}x{self.ctx}" + ("r" if self.ragged else "")


# the values of a spec's feature flags when only its key is given (`pagegen tune --spec KEY`)
FEATURE_DEFAULTS: dict[str, float | int] = {"window": 4096, "softcap": 50.0}
# workload value -> the KernelSpec flag it belongs to
FEATURE_VALUES = {"window": "sliding_window", "softcap": "softcap"}
SINK_STD, SINK_SEED = 2.0, 20_250  # the runner's sinks: randn * SINK_STD from this seed (gpt-oss-like logits)


@dataclass(frozen=True, slots=True)
class Workload:
    """A spec to tune and the shapes it is tuned on (kv_heads sets the pool and q widths), with the
    feature values of its model (None: the feature is off; see the module docstring). A decode spec
    with q_len > 1 (speculative verify, `..._q4`) is tuned on (batch, ctx) buckets whose ctx counts
    the q_len new tokens of each sequence (seq_lens), as paged_verify's seq_lens do."""

    spec: KernelSpec
    kv_heads: int  # KV heads per GPU of the model (q heads = kv_heads * group_size)
    buckets: tuple[Bucket, ...]
    models: tuple[str, ...] = ()  # informative names
    window: int | None = None  # sliding window in tokens (spec.sliding_window)
    softcap: float | None = None  # c of c * tanh(s / c) (spec.softcap)

    def __post_init__(self) -> None:
        for b in self.buckets:
            if b.ctx < self.spec.q_len:
                raise ValueError(f"{self.spec.variant_key()}: bucket {b.name} has ctx {b.ctx} < q_len "
                                 f"{self.spec.q_len}; a verify bucket's ctx counts the sequence's new tokens "
                                 f"(give ctx >= {self.spec.q_len})")
        if self.spec.family != "decode" and any(b.ragged for b in self.buckets):
            raise ValueError(f"ragged buckets are for decode only, not {self.spec.family}")
        key = self.spec.variant_key()
        if self.spec.kv_packed:
            raise ValueError(f"{key}: the tuner builds separate K and V pools; K|V-packed pools (_kvp) cannot be "
                             "tuned yet (tune the spec without _kvp: the same kernel math)")
        for name, flag in FEATURE_VALUES.items():
            value, on = getattr(self, name), getattr(self.spec, flag)
            if value is not None and not on:
                raise ValueError(f"{name}={value!r} is given but spec {key} has no {flag}: add the "
                                 f"_{'win' if name == 'window' else 'cap'} suffix to the key or drop {name}")
            if value is None and on:
                raise ValueError(f"spec {key} has {flag} but no value: give `{name}:` (e.g. {name}: "
                                 f"{FEATURE_DEFAULTS[name]})")
        try:  # the one check of the values (the ops' own)
            f = check_features(1, torch.device("cpu"), sliding_window=self.window, softcap=self.softcap)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{key}: {exc}") from None
        object.__setattr__(self, "softcap", f.softcap)  # an int cap becomes a float
        seen: dict[tuple[int, int, bool], Bucket] = {}
        for b in self.buckets:
            k = (*self.table_shape(b), b.ragged)
            if k in seen:
                raise ValueError(f"{key}: buckets {seen[k].name} and {b.name} are the same shape under window "
                                 f"{self.window} (min(window, ctx) = {k[1]}); drop one")
            seen[k] = b

    @classmethod
    def with_defaults(cls, spec: KernelSpec, kv_heads: int, buckets: tuple[Bucket, ...],
                      models: tuple[str, ...] = ()) -> Workload:
        """A workload of a spec known by its key alone: its feature flags get FEATURE_DEFAULTS."""
        vals = {n: FEATURE_DEFAULTS[n] for n, flag in FEATURE_VALUES.items() if getattr(spec, flag)}
        return cls(spec, kv_heads, tuple(buckets), tuple(models), **vals)

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.spec.group_size

    @property
    def features(self) -> Features:
        """The scalar feature values as pagegen.features.Features (sinks and slopes: see the runner)."""
        return Features(sliding_window=self.window, softcap=self.softcap)

    def effective_ctx(self, ctx: int) -> int:
        """Keys the spec.q_len new tokens of a sequence see together at most with `ctx` cached tokens
        (theirs included): min(window + q_len - 1, ctx) (the dispatcher's context)."""
        return self.features.effective_ctx(ctx, self.spec.q_len)

    def seq_lens(self, bucket: Bucket) -> list[int]:
        """seq_lens of a step of `bucket`: bucket.lengths(), each at least spec.q_len (a verify step's
        new tokens are counted in its sequence's length; a ragged draw below q_len is raised to it)."""
        return [max(n, self.spec.q_len) for n in bucket.lengths()]

    def table_shape(self, bucket: Bucket) -> tuple[int, int]:
        """The shape the table records `bucket` under and the dispatcher looks it up by: (a, effective ctx)."""
        return bucket.a, self.effective_ctx(bucket.ctx)

    def feature_values(self) -> dict[str, float | int]:
        """The values that are set ({"window": 4096, "softcap": 50.0}); {} for plain attention."""
        return {n: getattr(self, n) for n in FEATURE_VALUES if getattr(self, n) is not None}


# (model, head_dim, group_size, kv_heads per GPU): the attention shapes of common open models
DEFAULT_MODELS: tuple[tuple[str, int, int, int], ...] = (
    ("Llama-3-8B", 128, 4, 8),  # 32 q heads / 8 KV heads
    ("Llama-3-70B-TP8", 128, 8, 1),  # 64 q / 8 KV heads over 8 GPUs
    ("Qwen2.5-7B", 128, 7, 4),  # 28 q / 4 KV heads
    ("Phi-3-mini", 96, 1, 32),  # 32 q / 32 KV heads
    ("Gemma-2-9B", 256, 2, 8),  # 16 q / 8 KV heads
    ("Llama-3.2-1B", 64, 4, 8),  # 32 q / 8 KV heads, head_dim 64
)

# the reference decode shapes of the benchmarks (batch, ctx), and one ragged batch
DEFAULT_DECODE_BUCKETS: tuple[Bucket, ...] = tuple(
    Bucket(b, c) for b, c in ((1, 2048), (1, 32768), (8, 4096), (32, 2048), (32, 8192), (128, 1024), (128, 4096),
                              (256, 2048))
) + (Bucket(64, 8192, ragged=True),)  # the reference's mixed batch: 64 lengths in [64, 8192]
# a smaller grid for --budget quick; it keeps the ragged batch: a table tuned on uniform lengths
# alone can be slower than the heuristic's ragged rule on a real (ragged) batch
QUICK_DECODE_BUCKETS: tuple[Bucket, ...] = tuple(Bucket(b, c) for b, c in ((1, 2048), (8, 4096), (32, 8192),
                                                                             (128, 2048))) + (
    Bucket(64, 8192, ragged=True),)
# extend: (q_tokens, ctx)
DEFAULT_EXTEND_BUCKETS: tuple[Bucket, ...] = tuple(Bucket(q, c) for q, c in ((128, 2048), (512, 4096), (2048, 8192),
                                                                              (4096, 4096)))
# the CPU interpreter: tiny shapes so a whole study runs in seconds
INTERPRET_BUCKETS: tuple[Bucket, ...] = (Bucket(1, 40), Bucket(3, 70, ragged=True))
INTERPRET_SPEC = KernelSpec("decode", head_dim=64, block_size=16, layout="NHD", dtype="bf16", group_size=2)
INTERPRET_KV_HEADS = 2

# memory cap for one bucket's KV pool while tuning (bytes); larger buckets are skipped with a note
MAX_BUCKET_BYTES = 16 << 30


def default_buckets(family: str, quick: bool = False) -> tuple[Bucket, ...]:
    """The default shape grid of a family (decode: (batch, ctx); extend: (q_tokens, ctx))."""
    if family == "extend":
        return DEFAULT_EXTEND_BUCKETS
    return QUICK_DECODE_BUCKETS if quick else DEFAULT_DECODE_BUCKETS


def default_workloads(family: str = "decode", buckets: Sequence[Bucket] | None = None, *, block_size: int = 16,
                      layout: str = "NHD", dtype: str = "bf16", quick: bool = False) -> list[Workload]:
    """One workload per default model (DEFAULT_MODELS) for `family`."""
    bks = tuple(buckets) if buckets else default_buckets(family, quick)
    out = []
    for name, hd, g, hk in DEFAULT_MODELS:
        spec = KernelSpec(family, head_dim=hd, block_size=block_size, layout=layout, dtype=dtype, group_size=g)
        out.append(Workload(spec=spec, kv_heads=hk, buckets=bks, models=(name,)))
    return out


def interpret_workloads(buckets: Sequence[Bucket] | None = None) -> list[Workload]:
    """The tiny default of `--interpret`: one small spec on tiny buckets."""
    return [Workload(INTERPRET_SPEC, INTERPRET_KV_HEADS, tuple(buckets) if buckets else INTERPRET_BUCKETS,
                     ("interpreter-smoke",))]


def parse_variant_key(key: str) -> KernelSpec:
    """Inverse of KernelSpec.variant_key(): "decode_bf16_hd128_bs16_nhd_g4" -> KernelSpec (surrounding
    blanks ignored); see KernelSpec.from_key."""
    return KernelSpec.from_key(key.strip() if isinstance(key, str) else key)


def default_kv_heads(spec: KernelSpec) -> int:
    """KV heads of the default model with this head_dim and group, else 32 query heads' worth."""
    for _, hd, g, hk in DEFAULT_MODELS:
        if hd == spec.head_dim and g == spec.group_size:
            return hk
    return max(1, 32 // spec.group_size) if spec.group_size <= 32 else 1


def parse_bucket(item: Any, where: str = "bucket") -> Bucket:
    """A bucket from YAML: [a, ctx], "AxCTX" ("AxCTXr": ragged lengths), or
    {batch|q_tokens: a, ctx: c, weight: w, ragged: bool}."""
    try:
        if isinstance(item, str) and re.fullmatch(r"\d+x\d+r?", item.strip()):
            text = item.strip()
            a, c = text.rstrip("r").split("x")
            return Bucket(int(a), int(c), ragged=text.endswith("r"))
        if isinstance(item, (list, tuple)) and len(item) in (2, 3):
            return Bucket(*item)
        if isinstance(item, Mapping):
            extra = set(item) - {"batch", "q_tokens", "ctx", "weight", "ragged"}
            if extra:
                raise ValueError(f"unknown keys {sorted(extra)}")
            a = item.get("batch", item.get("q_tokens"))
            return Bucket(a, item["ctx"], float(item.get("weight", 1.0)), item.get("ragged", False))
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{where}: {exc}; expected [a, ctx], 'AxCTX' or {{batch|q_tokens, ctx, weight}}") from None
    raise ValueError(
        f"{where}: {item!r} is not a bucket; expected [a, ctx], 'AxCTX' or {{batch|q_tokens, ctx, weight}}")


def parse_buckets(items: Iterable[Any], where: str = "buckets") -> tuple[Bucket, ...]:
    out = tuple(parse_bucket(x, f"{where}[{i}]") for i, x in enumerate(items))
    if not out:
        raise ValueError(f"{where}: no buckets given")
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: duplicate buckets {names}")
    return out


MAX_YAML_BYTES = 1 << 20  # a spec or bucket file is a few lines; refuse anything this large


def _read_yaml(path: str | Path) -> Any:
    """yaml.safe_load of a small user file; ValueError (one line, naming the file) for a file that
    is too large, not UTF-8, or not plain YAML data (e.g. a `!!python/object` tag)."""
    p = Path(path)
    if p.stat().st_size > MAX_YAML_BYTES:
        raise ValueError(f"{p}: {p.stat().st_size} bytes is too large for a spec/bucket file "
                         f"(limit {MAX_YAML_BYTES} bytes)")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        first = (str(exc).strip().splitlines() or ["invalid YAML"])[0]
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"{p}: not plain YAML data{where}: {first}") from None


def load_buckets_yaml(path: str | Path) -> tuple[Bucket, ...]:
    """Buckets from a YAML file: a list, or a mapping with a `buckets:` list."""
    data = _read_yaml(path)
    if isinstance(data, Mapping):
        data = data.get("buckets")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of buckets (or a mapping with `buckets:`)")
    return parse_buckets(data, str(path))


def load_specs_yaml(path: str | Path, default: Sequence[Bucket] | None = None) -> list[Workload]:
    """Workloads from a YAML spec list:

    ```yaml
    buckets: [[1, 2048], [32, 8192]]      # optional default for all specs
    specs:
      - {model: Llama-3-8B, family: decode, head_dim: 128, group_size: 4, block_size: 16, kv_heads: 8}
      - {key: decode_bf16_hd64_bs16_nhd_g4, kv_heads: 8, buckets: ["1x512"]}
      - {model: Mistral-7B, key: decode_bf16_hd128_bs16_nhd_g4_win, kv_heads: 8, window: 4096}
      - {model: Gemma-2-9B, key: decode_bf16_hd256_bs16_nhd_g2_win_cap, kv_heads: 8, window: 4096, softcap: 50.0}
    ```
    Feature values (`window`, `softcap`) are required for the spec's feature flags and refused
    without them; sinks (_sink) and ALiBi (_alibi) take no value (see the module docstring).
    """
    data = _read_yaml(path)
    if isinstance(data, list):
        data = {"specs": data}
    if not isinstance(data, Mapping) or not isinstance(data.get("specs"), list):
        raise ValueError(f"{path}: expected a mapping with a `specs:` list")
    top = parse_buckets(data["buckets"], f"{path}:buckets") if data.get("buckets") else None
    out = []
    for i, item in enumerate(data["specs"]):
        where = f"{path}:specs[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected a mapping")
        item = dict(item)
        model = item.pop("model", None)
        hk = item.pop("kv_heads", None)
        bks = item.pop("buckets", None)
        values = {name: item.pop(name) for name in FEATURE_VALUES if name in item}
        try:
            if "key" in item:
                spec = parse_variant_key(item.pop("key"))
                if item:
                    raise ValueError(f"unknown keys {sorted(map(str, item))} beside `key`; expected model, "
                                     f"kv_heads, buckets, {', '.join(FEATURE_VALUES)}")
            else:
                spec = KernelSpec.from_dict(item)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        if spec.family not in ATTENTION_FAMILIES:
            raise ValueError(f"{where}: family {spec.family!r} has no tunable workload")
        fallback = tuple(default or ()) if spec.family == "decode" else ()  # `default` holds decode shapes
        buckets = parse_buckets(bks, f"{where}.buckets") if bks else (top or fallback or default_buckets(spec.family))
        if hk is not None and (isinstance(hk, bool) or not isinstance(hk, int)):
            raise ValueError(f"{where}: kv_heads must be an int, got {hk!r}")
        kv = hk if hk is not None else default_kv_heads(spec)
        if kv < 1:
            raise ValueError(f"{where}: kv_heads must be >= 1, got {kv}")
        try:
            out.append(Workload(spec, kv, buckets, (str(model),) if model else (), **values))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from None
    return out


def decode_bytes(spec: KernelSpec, kv_heads: int, lens: Sequence[int] | int, batch: int = 1,
                 window: int | None = None) -> int:
    """Bytes a decode step must move: every K and V element the kernel reads once (with a sliding
    window W: the last min(W, len) tokens of each sequence), plus q and out. A verify spec (q_len > 1)
    also reads its KV once per sequence (with a window: the last min(W + q_len - 1, len) tokens) and
    moves q_len query and output rows per sequence.

    lens: per-sequence context lengths (new tokens included), or one length shared by `batch` sequences.
    """
    e, ql = ELEM_BYTES[spec.kv_dtype], spec.q_len
    seen = Features(sliding_window=window).effective_ctx
    tokens = min(lens, seen(lens, ql)) * batch if isinstance(lens, int) else sum(min(n, seen(n, ql)) for n in lens)
    nseq = batch if isinstance(lens, int) else len(lens)
    kv = tokens * kv_heads * spec.head_dim * 2 * e
    qo = nseq * ql * kv_heads * spec.group_size * spec.head_dim * 2 * ELEM_BYTES[spec.dtype]
    return kv + qo


def visible_pairs(q_len: int, ctx: int, window: int | None = None) -> int:
    """(query, key) pairs an extend sequence computes: q_len new tokens at the end of ctx tokens, each
    seeing the keys up to itself (with a sliding window W: its last W keys only)."""
    w = ctx if window is None else window
    return sum(min(p + 1, w) for p in range(ctx - q_len, ctx))


def bucket_kv_bytes(spec: KernelSpec, kv_heads: int, bucket: Bucket) -> int:
    """KV pool bytes a bucket needs while tuning (decode: batch x ctx tokens; extend: the
    sequences that hold q_tokens new tokens, ctx tokens each, as the tuner lays them out). The
    memory the pool takes, not the traffic: a windowed workload's pool still holds every token (its
    kernel must skip the pages outside the window); what a step reads is decode_bytes(window=...)."""
    if spec.family == "decode":
        tokens = sum(max(n, spec.q_len) for n in bucket.lengths())
    else:
        tokens = -(-bucket.a // max(1, min(bucket.a, bucket.ctx))) * bucket.ctx
    return tokens * kv_heads * spec.head_dim * 2 * ELEM_BYTES[spec.kv_dtype]
