"""The variant space: what a kernel computes (KernelSpec) and how it runs (Config).

This module is pure data: it imports neither Jinja, Triton, Optuna nor torch. Every value a
user can type reaches a template only after passing the whitelists below.
"""

from __future__ import annotations

import dataclasses
import itertools
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

FAMILIES = ("decode", "extend", "kv_write", "copy_blocks")
BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
HEAD_DIMS = (64, 80, 96, 112, 128, 192, 256)
LAYOUTS = ("NHD", "HND")
DTYPES = ("fp16", "bf16")
# fp8 KV pools (issue 16): (mantissa bits, smallest normal exponent, largest finite value) of each format.
# A stored value is saturate(round_to_nearest_even(x * (1 / scale))); x ~= stored * scale.
FP8_FORMATS = {"fp8_e4m3": (3, -6, 448.0), "fp8_e5m2": (2, -14, 57344.0)}
KV_DTYPES = DTYPES + tuple(FP8_FORMATS)
# how a kv_dtype is spelled inside a variant key (`_kvfp8e4m3`) -> the kv_dtype
KV_KEY_NAMES = {kv.replace("_", ""): kv for kv in KV_DTYPES}
FP8_FAMILIES = ("decode", "extend", "kv_write", "copy_blocks")  # families that render fp8 pools
# group sizes enumerated by `pagegen list`; any group_size >= 1 is legal.
COMMON_GROUP_SIZES = (1, 2, 4, 7, 8, 16)
MAX_GROUP_SIZE = 64
# decode's query tokens per sequence (speculative verify, issue 17): the spec holds the batch's maximum,
# rounded up to one of these; its q_len x group query rows of a KV head share one program (the M dim
# of tl.dot), whose fp32 accumulator [rows padded, head_dim padded] may hold at most MAX_VERIFY_ACC
# elements (64 KiB: 64 registers a thread at 8 warps); larger shapes go to extend (dispatch.attention_path).
Q_LENS = (1, 2, 4, 8, 16)
MAX_VERIFY_ACC = 128 * 128
EXTEND_F32_PER_THREAD = 144  # extend tiles past 128 x 128 accumulator elements: fp32 values a thread may hold

# families whose kernels compute attention (and so have a query group and tunables)
ATTENTION_FAMILIES = ("decode", "extend")
# attention features: KernelSpec flag -> its variant-key suffix (in key order). A flag only says the
# kernel has the feature's code; its value (window, softcap, slopes, sinks) is a runtime argument.
FEATURE_SUFFIXES = {"sliding_window": "win", "softcap": "cap", "sinks": "sink", "alibi": "alibi",
                    "kv_packed": "kvp"}

# tunable values, per axis (the Optuna search space is built from these)
BLOCK_N_VALUES = (16, 32, 64, 128, 256)
BLOCK_M_VALUES = (16, 32, 64, 128)
NUM_WARPS_VALUES = (1, 2, 4, 8)
NUM_STAGES_VALUES = (1, 2, 3, 4, 5)  # 5: Triton (3.6-3.9) double-buffers paged K/V only from 5 on
# values a Config may hold and `pagegen tune --space` may search, but the default search leaves out:
# deeper pipelines for fp8 decode, whose tiles carry half the bytes (its H200 winners sit at 5 stages,
# the default space's edge: bench/NOTES.md). A separate list so existing studies keep their spaces.
OPT_IN_VALUES: dict[str, tuple[int, ...]] = {"num_stages": (6, 7, 8)}
SPLIT_SIZE_VALUES = (0, 256, 512, 1024, 2048, 4096, 8192)
KV_TMA_VALUES = (0, 1)  # extend: 1 = K/V tiles through tensor descriptors (TMA), where kv_tma_reason() allows
# extend's tensor-descriptor K/V path (issue 18): pages of at least this many tokens, so that a key tile of
# block_n <= block_size tokens of one KV head is one 2D box inside one page
KV_TMA_MIN_BLOCK = 64
# shared memory a TMA path adds to the K/V buffers: its mbarriers (8 B each; the sm_90 compile of
# bench/prefill_lab/b_tma_kv.py at 128/64/8/3 and /5 used 36 and 8 B more than the gather's estimate)
KV_TMA_BARRIER_BYTES = 64

# the tunables of each family and their legal values: the one definition of the search space
# (config_space enumerates it; the tuner derives its Optuna space from it)
TUNABLES: dict[str, dict[str, tuple[int, ...]]] = {
    "decode": {"block_n": BLOCK_N_VALUES, "num_warps": NUM_WARPS_VALUES, "num_stages": NUM_STAGES_VALUES,
               "split_size": SPLIT_SIZE_VALUES},
    "extend": {"block_m": BLOCK_M_VALUES, "block_n": BLOCK_N_VALUES, "num_warps": NUM_WARPS_VALUES,
               "num_stages": NUM_STAGES_VALUES, "kv_tma": KV_TMA_VALUES},
    "kv_write": {"block_n": BLOCK_N_VALUES, "num_warps": NUM_WARPS_VALUES},
    "copy_blocks": {"block_n": BLOCK_N_VALUES, "num_warps": NUM_WARPS_VALUES},
}
# what a family that does not tune a field runs with (besides Config's defaults)
_FIXED: dict[str, dict[str, int]] = {"kv_write": {"num_stages": 1}, "copy_blocks": {"num_stages": 1}}


def verify_fits(q_len: int, group_size: int, head_dim: int) -> bool:
    """Whether q_len x group_size query rows (padded to >= 16, a power of two) of head_dim (padded)
    fit one decode program's accumulator (MAX_VERIFY_ACC fp32 elements)."""
    return max(16, next_pow2(q_len * group_size)) * next_pow2(head_dim) <= MAX_VERIFY_ACC


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 4


def short_repr(value: Any, limit: int = 80) -> str:
    """repr(value) cut to at most `limit` characters (and a few items per level, a few levels): what
    error messages show of untrusted input (a hostile value, e.g. a YAML alias bomb, must not make
    the message itself huge)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _choices(name: str, value: Any, legal: tuple) -> None:
    """Raise ValueError unless `value` is one of `legal` and of exactly its type: 64.0 or True is
    not the int 64 or 1 (they compare equal, and would reach a template as `64.0`)."""
    kind = type(legal[0])
    if type(value) is not kind or value not in legal:
        shown = ", ".join(str(v) for v in legal)
        typed = "" if type(value) is kind else f" (expected {kind.__name__}, got {type(value).__name__})"
        raise ValueError(f"{name}={short_repr(value)} is not supported{typed}; supported: {shown}")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """WHAT a kernel computes. Hashable; `variant_key()` names it everywhere."""

    family: str  # decode | extend | kv_write | copy_blocks
    head_dim: int  # elements per head (64..256); padded to a power of two inside kernels
    block_size: int  # tokens per KV page
    layout: str = "NHD"  # NHD = [blocks, block_size, kv_heads, D]; HND = [blocks, kv_heads, block_size, D]
    dtype: str = "bf16"  # q / out dtype
    kv_dtype: str = ""  # KV pool dtype; "" means the same as dtype; or fp8_e4m3 / fp8_e5m2 (scaled)
    group_size: int = 1  # query heads per KV head (GQA); 1 for kv_write / copy_blocks
    # features (attention families only; off = absent from the source and the key):
    sliding_window: bool = False  # a query at p sees keys p - window + 1 .. p (window: runtime int)
    softcap: bool = False  # scores become c * tanh(s / c) (c: runtime float)
    sinks: bool = False  # a learned logit per query head joins the softmax denominator ([Hq] fp32 tensor)
    alibi: bool = False  # scores gain slope[h] * (key_pos - query_pos) ([Hq] fp32 tensor)
    kv_packed: bool = False  # pool views whose second-innermost stride is not head_dim (K|V packed in the last dim)
    q_len: int = 1  # decode only: query tokens per sequence at most (Q_LENS); > 1 adds `_q<n>` to the key

    def __post_init__(self) -> None:
        if isinstance(self.kv_dtype, str) and not self.kv_dtype:
            object.__setattr__(self, "kv_dtype", self.dtype)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the axis if any field is outside the space (values of exactly
        the axis's type: a float or bool is not an int), TypeError for a non-int group_size."""
        _choices("family", self.family, FAMILIES)
        _choices("head_dim", self.head_dim, HEAD_DIMS)
        _choices("block_size", self.block_size, BLOCK_SIZES)
        _choices("layout", self.layout, LAYOUTS)
        _choices("dtype", self.dtype, DTYPES)
        _choices("kv_dtype", self.kv_dtype, KV_DTYPES)
        if self.kv_dtype in DTYPES and self.kv_dtype != self.dtype:
            raise ValueError(f"kv_dtype={self.kv_dtype!r} differs from dtype={self.dtype!r}; mixed fp16/bf16 is not "
                             f"supported: use kv_dtype={self.dtype!r} or an fp8 format ({', '.join(FP8_FORMATS)})")
        if self.is_fp8 and self.family not in FP8_FAMILIES:
            raise ValueError(f"kv_dtype={self.kv_dtype!r} is not supported for family {self.family!r} yet; "
                             f"fp8 pools work with: {', '.join(FP8_FAMILIES)}")
        if type(self.group_size) is not int:
            raise TypeError(f"group_size must be an int, got {type(self.group_size).__name__} "
                            f"{short_repr(self.group_size)}")
        if not 1 <= self.group_size <= MAX_GROUP_SIZE:
            raise ValueError(f"group_size={self.group_size} is not supported; supported: 1..{MAX_GROUP_SIZE}")
        if self.family not in ATTENTION_FAMILIES and self.group_size != 1:
            raise ValueError(f"group_size must be 1 for family {self.family!r} (it has no query heads)")
        for name in FEATURE_SUFFIXES:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.family not in ATTENTION_FAMILIES and self.features:
            raise ValueError(f"features {self.features} need an attention family (decode, extend), not {self.family!r}")
        if not isinstance(self.q_len, int) or isinstance(self.q_len, bool):
            raise TypeError(f"q_len must be an int, got {self.q_len!r}")
        if self.q_len != 1:
            if self.family != "decode":
                raise ValueError(f"q_len={self.q_len} is a decode axis; family {self.family!r} takes q_len=1 "
                                 "(extend reads its query lengths at run time)")
            _choices("q_len", self.q_len, Q_LENS)
            if not verify_fits(self.q_len, self.group_size, self.head_dim):
                raise ValueError(f"q_len={self.q_len} x group_size={self.group_size} query rows of head_dim "
                                 f"{self.head_dim} exceed one decode program's accumulator ({MAX_VERIFY_ACC} "
                                 "fp32 elements): use the extend family for this shape")

    @property
    def features(self) -> tuple[str, ...]:
        """Names of the features that are on, in key order (() for plain attention)."""
        return tuple(name for name in FEATURE_SUFFIXES if getattr(self, name))

    @property
    def is_fp8(self) -> bool:
        """True when the KV pool holds scaled fp8 (kv_dtype in FP8_FORMATS)."""
        return self.kv_dtype in FP8_FORMATS

    @property
    def head_dim_padded(self) -> int:
        """head_dim rounded up to a power of two (the width of register tiles)."""
        return next_pow2(self.head_dim)

    @property
    def group_padded(self) -> int:
        """Query heads of a group padded to the M dimension of tl.dot (>= 16)."""
        return max(16, next_pow2(self.group_size))

    @property
    def rows_padded(self) -> int:
        """Query rows of a decode program (q_len tokens x group heads) padded to the M dim of tl.dot
        (>= 16); equals group_padded when q_len == 1."""
        return max(16, next_pow2(self.q_len * self.group_size))

    def variant_key(self) -> str:
        """Filename-safe name that is a pure function of the spec, e.g. decode_bf16_hd128_bs16_nhd_g4;
        an fp8 pool adds its format (kv_write_bf16_kvfp8e4m3_hd128_bs16_nhd_g1) and features that are
        on add suffixes (FEATURE_SUFFIXES), e.g. decode_bf16_hd64_bs16_nhd_g8_win_sink; decode with
        q_len > 1 adds it after the group (decode_bf16_hd128_bs16_nhd_g4_q4)."""
        kv = "" if self.kv_dtype == self.dtype else f"_kv{self.kv_dtype.replace('_', '')}"
        ql = f"_q{self.q_len}" if self.q_len > 1 else ""
        return (
            f"{self.family}_{self.dtype}{kv}_hd{self.head_dim}_bs{self.block_size}"
            f"_{self.layout.lower()}_g{self.group_size}{ql}"
        ) + "".join(f"_{FEATURE_SUFFIXES[name]}" for name in self.features)

    def to_dict(self) -> dict[str, Any]:
        """Fields as a mapping; features that are off and q_len 1 are left out (so plain specs keep their old
        form)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if (k not in FEATURE_SUFFIXES or v) and (k != "q_len" or v != 1)}

    @classmethod
    def from_key(cls, key: str) -> KernelSpec:
        """Inverse of variant_key(): "decode_bf16_hd128_bs16_nhd_g4" -> KernelSpec.

        Parsed with the axis tuples (FAMILIES, LAYOUTS; the values are checked by the constructor),
        and the result must print back as `key` exactly, so a spec has one spelling (no "hd064",
        no "NHD"). Raises ValueError: "not a variant key" for a malformed key, or the axis's own
        message for a well-formed key with an unsupported value (hd72).
        """
        family = next((f for f in sorted(FAMILIES, key=len, reverse=True)
                       if isinstance(key, str) and key.startswith(f + "_")), None)
        parts = key[len(family) + 1:].split("_") if family is not None else []
        by_suffix = {suffix: name for name, suffix in FEATURE_SUFFIXES.items()}
        features = {}
        while parts and parts[-1] in by_suffix:  # _win, _sink, ... (their order is checked by the round trip)
            features[by_suffix[parts.pop()]] = True
        q_len = 1
        if parts and parts[-1].startswith("q") and _int_after("q", parts[-1]) is not None:  # _q4 (decode verify)
            q_len = _int_after("q", parts.pop())
        kv_dtype = ""
        if len(parts) == 6 and parts[1].startswith("kv"):  # dtype, kv<dtype>, hd, bs, layout, g
            short = parts.pop(1)[2:]
            kv_dtype = KV_KEY_NAMES.get(short, short)  # kvfp8e4m3 -> fp8_e4m3
        if len(parts) == 5:
            dtype, hd, bs, layout, g = parts
            ints = [_int_after(prefix, text) for prefix, text in (("hd", hd), ("bs", bs), ("g", g))]
            if None not in ints:
                spec = cls(family, head_dim=ints[0], block_size=ints[1], layout=layout.upper(), dtype=dtype,
                           kv_dtype=kv_dtype, group_size=ints[2], q_len=q_len, **features)
                if spec.variant_key() == key:
                    return spec
        raise ValueError(
            f"spec {short_repr(key)} is not a variant key; expected e.g. decode_bf16_hd128_bs16_nhd_g4 "
            f"(<family>_<dtype>[_kv<kv_dtype>]_hd<head_dim>_bs<block_size>_<layout>_g<group_size>[_q<q_len>]"
            "[_<feature>...], "
            f"lower case; families: {', '.join(FAMILIES)}; features: {', '.join(FEATURE_SUFFIXES.values())})"
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelSpec:
        """Build from a mapping (YAML); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown KernelSpec fields: {short_repr(sorted(map(str, unknown)))}; "
                             f"expected {sorted(names)}")
        missing = {"family", "head_dim", "block_size"} - set(data)
        if missing:
            raise ValueError(f"KernelSpec is missing fields: {sorted(missing)}")
        return cls(**dict(data))


def _int_after(prefix: str, text: str) -> int | None:
    """The decimal int after `prefix` in `text` ("hd128" -> 128), or None."""
    digits = text[len(prefix):] if text.startswith(prefix) else ""
    return int(digits) if digits.isascii() and digits.isdigit() else None


@dataclass(frozen=True, slots=True)
class Config:
    """HOW a kernel runs. Fields a family does not use keep their defaults and are ignored.

    block_n: KV tokens per inner-loop tile (several pages when block_size < block_n).
    block_m: query rows per program (extend only).
    num_warps / num_stages: Triton launch options (warps per program, software pipelining depth).
    split_size: decode only; KV tokens per split-KV partition (flash-decoding), 0 = no split.
    kv_tma: extend only; 1 = load K/V tiles through tensor descriptors (TMA boxes, one per tile inside
        one page) instead of the block-table gather; legal only where kv_tma_reason(spec) is None and
        block_n <= block_size. Left out of to_dict() when 0, so tables written before it read the same.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    split_size: int = 0
    block_m: int = 64
    kv_tma: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the field if a tunable is outside its legal values (exact ints:
        64.0 and True are refused)."""
        _choices("block_n", self.block_n, BLOCK_N_VALUES)
        _choices("block_m", self.block_m, BLOCK_M_VALUES)
        _choices("num_warps", self.num_warps, NUM_WARPS_VALUES)
        _choices("num_stages", self.num_stages, NUM_STAGES_VALUES + OPT_IN_VALUES["num_stages"])
        _choices("split_size", self.split_size, SPLIT_SIZE_VALUES)
        _choices("kv_tma", self.kv_tma, KV_TMA_VALUES)
        if self.split_size and self.split_size % self.block_n:
            raise ValueError(f"split_size={self.split_size} must be a multiple of block_n={self.block_n}")

    def to_dict(self) -> dict[str, int]:
        """Fields as a mapping; kv_tma is left out when 0 (decode entries and tables written before it
        keep their form; from_dict() reads a missing kv_tma as 0)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "kv_tma" or v}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build and validate from a mapping; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Config fields: {short_repr(sorted(map(str, unknown)))}; "
                             f"expected {sorted(names)}")
        for key, value in data.items():
            if type(value) is not int:
                raise ValueError(f"Config field {key} must be an int, got {short_repr(value)}")
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg


def kv_tma_reason(spec: KernelSpec) -> str | None:
    """Why `spec`'s kernel has no tensor-descriptor (TMA) K/V path, or None when its source renders one
    (templates/extend.py.j2 renders it exactly when this is None; illegal_reason() refuses kv_tma=1 otherwise).

    The path views the pool as one 2D tensor (NHD [num_blocks * PAGE, Hk * D], HND [num_blocks * Hk * PAGE,
    D]) and loads a key tile of one KV head as one box [block_n, D] inside one page, so it needs: pages of
    >= KV_TMA_MIN_BLOCK tokens; a power-of-two head_dim (an NHD box of the padded width would read the next
    head); a pool of q's dtype (fp8 pools keep the gather); no sliding window (its masked edge starts at a
    token that is not tile-aligned, so a tile may straddle two pages); no K|V-packed pool (its rows do not
    form one 2D view)."""
    if spec.family != "extend":
        return f"family {spec.family!r} has no tensor-descriptor K/V path (extend only)"
    if spec.block_size < KV_TMA_MIN_BLOCK:
        return f"block_size={spec.block_size} < {KV_TMA_MIN_BLOCK}: a key tile would span pages (several boxes)"
    if spec.head_dim != spec.head_dim_padded:
        return f"head_dim={spec.head_dim} is not a power of two (a box of the padded width reads past the head)"
    if spec.is_fp8:
        return f"kv_dtype={spec.kv_dtype!r}: fp8 pools use the gather path"
    if spec.sliding_window:
        return "sliding_window: the window edge's tiles are not page-aligned"
    if spec.kv_packed:
        return "kv_packed: a K|V-packed pool has no 2D view"
    return None


def tunables(spec: KernelSpec) -> dict[str, tuple[int, ...]]:
    """The tunables `spec` can vary and their legal values: TUNABLES[spec.family], less kv_tma where the
    spec has no tensor-descriptor path (kv_tma_reason), so the tuner never searches an axis of one value."""
    out = dict(TUNABLES[spec.family])
    if "kv_tma" in out and kv_tma_reason(spec) is not None:
        del out["kv_tma"]
    return out


def illegal_reason(spec: KernelSpec, config: Config) -> str | None:
    """Why `config` is illegal for `spec` (a short reason), or None if it may be compiled.

    Cheap rules only: combinations that cannot compile or waste registers are rejected here
    so the tuner never spends a compile on them.
    """
    try:
        config.validate()
    except ValueError as exc:
        return str(exc)
    d = spec.head_dim_padded
    if config.kv_tma:
        why = kv_tma_reason(spec)
        if why is not None:
            return f"kv_tma=1: {why}"
        if config.block_n > spec.block_size:
            return (f"kv_tma=1 needs block_n <= block_size (a key tile is one box inside one page); got block_n="
                    f"{config.block_n}, block_size={spec.block_size}")
    if spec.family == "decode":
        # register tile: K and V tiles of [block_n, D] plus the [G, D] accumulator
        if config.block_n * d > 256 * 128:
            return f"block_n={config.block_n} x head_dim {d} tile is too large"
        if config.block_n * d >= 128 * 128 and config.num_warps < 4:
            return "large tiles need num_warps >= 4"
        if spec.q_len > 1:
            # fp32 accumulator [rows, D] and scores [rows, block_n], per thread of the program
            rows = spec.rows_padded
            if rows * (d + config.block_n) > 128 * 32 * config.num_warps:
                return (f"{rows} query rows x (head_dim {d} + block_n {config.block_n}) fp32 need more than 128 "
                        f"registers a thread at num_warps={config.num_warps}")
    if spec.family == "extend":
        if config.split_size:
            return "extend does not split KV"
        if config.block_m * config.block_n * d > 128 * 128 * 128:
            return "query x key tile too large for registers"
        if config.block_m < spec.group_size:
            return f"block_m={config.block_m} holds less than one token's {spec.group_size} query heads"
        # the fp32 accumulator [block_m, D]: at most 128 x 128 elements, or, beyond (head_dim 256), the
        # accumulator and scores [block_m, D + block_n] within EXTEND_F32_PER_THREAD a thread (compiled
        # for sm_90 at head_dim 256: 128 x 32 and 128 x 16 at 8 warps 238 and 208 registers, no spills;
        # 128 x 64 at 8 warps spills)
        if (config.block_m * d > 128 * 256 // 2
                and config.block_m * (d + config.block_n) > EXTEND_F32_PER_THREAD * 32 * config.num_warps):
            return (f"block_m={config.block_m} x (head_dim {d} + block_n {config.block_n}) fp32 accumulator and "
                    f"scores exceed {EXTEND_F32_PER_THREAD} registers a thread at num_warps={config.num_warps}")
        # shared memory: the query tile plus the K/V buffers Triton's pipeliner allocates for the
        # block-table gather (compiled for sm_90: 1 buffer at 1 stage, 2 at 2-4, stages - 2 from 5); the TMA
        # path's compile allocated the same buffers plus its mbarriers (KV_TMA_BARRIER_BYTES)
        buffers = 1 if config.num_stages == 1 else max(2, config.num_stages - 2)
        kv_bytes = 1 if spec.is_fp8 else 2  # the buffers hold the pool's elements (fp8: upcast after the load)
        barriers = KV_TMA_BARRIER_BYTES if config.kv_tma else 0
        if buffers * 2 * config.block_n * d * kv_bytes + 2 * config.block_m * d + barriers > 227 * 1024:
            return "K/V pipeline buffers exceed shared memory"
    return None


def default_config(spec: KernelSpec) -> Config:
    """The heuristic config used when no tuned entry exists. Always legal for `spec`.

    Guided by the H100 sweeps in bench/NOTES.md. Decode: block_n 128, 4 warps, 3 stages won the
    large-batch shapes. Extend: block_m 128, 8 warps, 5 stages won 4 of 5 shapes with block_n 128,
    but 128 x 128 sits at 255 registers at head_dim 128 and spills at padded head dims (80), so the
    default takes block_n 64 (186 registers, no spills); tuned tables pick per shape. Where the spec
    renders the tensor-descriptor K/V path (kv_tma_reason; pages of 64 and more), that config takes it:
    on the H200 it was 1.12-1.18x the gather path at all six extend shapes of
    bench/results/extend-h200-2026-12-01-tma-bs64.json (head_dim 128); a pool that cannot take
    descriptors runs the gather path anyway (pagegen.extend.kv_tma_problem). Extend past head_dim 128:
    block_m 128, block_n 32, 8 warps, 5 stages, the fastest of bench/extend.py's grid at head_dim 256
    on the H200 (339 / 383 TFLOP/s at 2048 / 4608 tokens with no prefix, 2.2-2.5x the 64-row tile it
    replaced: bench/results/extend-h200-2026-12-01-hd256-tune.json).
    """
    d = spec.head_dim_padded
    if spec.family == "extend":
        if d <= 128:
            return Config(block_m=128, block_n=64, num_warps=8, num_stages=5, kv_tma=int(kv_tma_reason(spec) is None))
        return Config(block_m=128, block_n=32, num_warps=8, num_stages=5)
    if spec.family == "decode":
        if spec.q_len > 1 and spec.rows_padded > 32:  # verify: many query rows; illegal_reason() bounds their registers
            cfg = Config(block_n=64, num_warps=8, num_stages=3, split_size=0)
            small = Config(block_n=16, num_warps=8, num_stages=3, split_size=0)
            return cfg if illegal_reason(spec, cfg) is None else small
        return Config(block_n=128 if d <= 128 else 64, num_warps=4, num_stages=3, split_size=0)
    return Config(block_n=64, num_warps=4, num_stages=1)


def large_batch_config(spec: KernelSpec) -> Config | None:
    """The heuristic's decode config for calls of at least one program an SM (batch x kv_heads >= SMs),
    where it differs from default_config(spec); None where it does not. Always legal for `spec`.

    Decode from an fp8 pool at a padded head_dim of 128 (one query token): block_n 32, 1 warp, 5 stages,
    split 1024. The fp8 tile is widened to fp16 in registers, so one warp holding 32 keys of K and V is
    what fits (bench/NOTES.md, "Nsight Compute on the H200"); many such programs, each a short split, keep
    the SMs busy. On the H200 this is the winner, or within 2% of it, at every batch of 32 x 8192 tokens
    or more in the reference fp8 study (bench/results/studies/h200.journal: 309-314 / 309 / 163 / 227 us at
    128x4096 / 256x2048 / 32x8192 / the ragged 64x8192, where 128 / 4 / 3 takes 457 / 459 / 236 / 244 on
    HND pools, bench/results/fp8-h200-2026-12-01-hnd.json); at 8x4096 and 1x2048 one-warp tiles are
    1.2-3.8x slower than 4-warp ones in the same study, hence only for full batches.
    """
    if spec.family == "decode" and spec.is_fp8 and spec.q_len == 1 and spec.head_dim_padded == 128:
        return Config(block_n=32, num_warps=1, num_stages=5, split_size=1024)
    return None


def config_space(spec: KernelSpec) -> list[Config]:
    """Every legal Config for `spec` (the grid the tuner searches): the product of tunables(spec),
    filtered by illegal_reason()."""
    names, values = zip(*tunables(spec).items(), strict=True)
    fixed = _FIXED.get(spec.family, {})
    cands = [Config(**fixed, **dict(zip(names, combo, strict=True))) for combo in itertools.product(*values)]
    return [c for c in cands if illegal_reason(spec, c) is None]


def enumerate_specs(
    families: tuple[str, ...] = ATTENTION_FAMILIES,
    head_dims: tuple[int, ...] = HEAD_DIMS,
    block_sizes: tuple[int, ...] = BLOCK_SIZES,
    layouts: tuple[str, ...] = LAYOUTS,
    dtypes: tuple[str, ...] = DTYPES,
    group_sizes: tuple[int, ...] = COMMON_GROUP_SIZES,
) -> Iterator[KernelSpec]:
    """Yield every KernelSpec in the product of the given axis values (validated)."""
    for fam, hd, bs, lay, dt in itertools.product(families, head_dims, block_sizes, layouts, dtypes):
        groups = group_sizes if fam in ATTENTION_FAMILIES else (1,)
        for g in groups:
            yield KernelSpec(family=fam, head_dim=hd, block_size=bs, layout=lay, dtype=dt, group_size=g)
