"""Input validation shared by the public ops (decode, extend, kv_ops) and their plans.

Every check here reads host-side attributes only (shape, strides, dtype, device) and never syncs
with the GPU, except `check_capacity`, which reads lengths and block ids (validate=True, and always
for CPU tensors). Every check raises ValueError / TypeError naming the argument, what it got and
what it expected. One owner each: the softmax scale (`check_scale`), the output tensor
(`check_out`), the length bound (`ctx_bound`), the illegal-config error (`IllegalConfigError`),
the strided-metadata rule (`packed`), the plan-argument comparison (`check_like`), LOG2E.
"""

from __future__ import annotations

import math

import torch

from pagegen.features import NO_FEATURES, Features
from pagegen.gpu import interpreting  # re-exported: the one definition lives with the live device
from pagegen.spec import BLOCK_SIZES, HEAD_DIMS, LAYOUTS, Config, KernelSpec, illegal_reason

TORCH_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# pool element types: q/out dtypes, or scaled fp8 (issue 16)
TORCH_KV_DTYPES = {**TORCH_DTYPES, torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}
LOG2E = 1.4426950408889634  # log2(e): the kernels take scale * LOG2E and use exp2

__all__ = [
    "LOG2E", "TORCH_DTYPES", "IllegalConfigError", "attention_spec", "check_capacity", "check_config", "check_device",
    "check_length_hints",
    "check_layout", "check_like", "check_max_len", "check_out", "check_q_and_pool", "check_scale", "check_tensor",
    "ctx_bound", "interpreter_problem", "interpreting", "is_packed", "kv_strides", "packed", "pool_geometry",
    "signature", "strided_metadata", "upcast_dots",
]


def _major_minor(v: str) -> tuple[int, int]:
    parts = (v.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in x if ch.isdigit()) or 0) for x in parts)  # type: ignore[return-value]


def upcast_dots(spec: KernelSpec) -> bool:
    """The DOT_FP32 launch constexpr: upcast tl.dot operands to fp32. Only under the Triton interpreter,
    which mis-computes bf16 dots; fp8 pools already run their dots in fp16 (exact there too), so they keep
    the compiled kernel's path and the CPU tests check the code the GPU runs."""
    return interpreting() and not spec.is_fp8


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter cannot run pagegen's kernels here, or None when it can.

    The versions default to the installed Triton and NumPy (pass them to ask about another pair).
    Measured: Triton 3.6's interpreter converts 1-element arrays to loop bounds with int(), which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); every
    kernel with a data-dependent loop then fails. Triton 3.9 squeezes first and works; 3.6 with
    NumPy 2.3 works. Versions between 3.6 and 3.9 were not tried and are not flagged.
    """
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    if numpy_version is None:
        import numpy

        numpy_version = numpy.__version__
    if _major_minor(triton_version) <= (3, 6) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter cannot run with NumPy {numpy_version} (it calls "
                "int() on 1-element arrays, which NumPy >= 2.4 refuses): install numpy<2.4, or Triton >= 3.9")
    return None


class IllegalConfigError(ValueError):
    """A Config that cannot run a KernelSpec (the one error for it: ops, plans and the CLI)."""

    def __init__(self, spec: KernelSpec, config: Config, reason: str) -> None:
        super().__init__(f"config {config} is not legal for {spec.variant_key()}: {reason}; pick values the "
                         "spec allows (`pagegen list` shows the axes) or pass config=None for the tuned one")
        self.spec, self.config, self.reason = spec, config, reason


def check_config(spec: KernelSpec, config: Config) -> Config:
    """`config` if it may run `spec`, else IllegalConfigError naming the reason (spec.illegal_reason)."""
    if not isinstance(config, Config):
        raise TypeError(f"config must be a pagegen.Config, got {type(config).__name__}")
    reason = illegal_reason(spec, config)
    if reason:
        raise IllegalConfigError(spec, config, reason)
    return config


def check_length_hints(batch: int, max_seq_len: int | None, sum_seq_lens: int | None) -> None:
    """The host-side length hints of decode and verify: max_seq_len an int (or None), sum_seq_lens an
    int in [0, batch x max_seq_len] that needs max_seq_len beside it (or None)."""
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)):
        raise TypeError(f"max_seq_len must be an int, got {type(max_seq_len).__name__}")
    if sum_seq_lens is None:
        return
    if max_seq_len is None:
        raise ValueError("sum_seq_lens needs max_seq_len (the longest sequence) beside it")
    if isinstance(sum_seq_lens, bool) or not isinstance(sum_seq_lens, int):
        raise TypeError(f"sum_seq_lens must be an int, got {type(sum_seq_lens).__name__}")
    if not 0 <= sum_seq_lens <= batch * max_seq_len:
        raise ValueError(f"sum_seq_lens={sum_seq_lens} is impossible for {batch} sequences of at most "
                         f"max_seq_len={max_seq_len} tokens each")


def check_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale as a float: 1/sqrt(head_dim) for None, else a finite number > 0."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def check_max_len(name: str, value: int | None, bound: int, what: str) -> None:
    """A host-side length bound: None, or an int in [0, bound] (`what` says where bound comes from)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > bound:
        raise ValueError(f"{name}={value} exceeds {what}")


def ctx_bound(max_seq_len: int | None, block_tables: torch.Tensor, block_size: int) -> int:
    """The longest context a call can have: max_seq_len (checked) or block_tables' capacity."""
    capacity = block_tables.shape[1] * block_size
    check_max_len("max_seq_len", max_seq_len, capacity,
                  f"block_tables capacity ({block_tables.shape[1]} blocks x {block_size} tokens = {capacity})")
    return capacity if max_seq_len is None else max(1, max_seq_len)


def check_tensor(name: str, t: object, ndim: int | None = None, dtypes: tuple | None = None) -> torch.Tensor:
    """Check that `t` is a tensor of the given rank and one of `dtypes`; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        shown = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {shown}")
    return t


def check_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    """All tensors on one device; CUDA, or CPU under TRITON_INTERPRET=1. Returns the device."""
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; all tensors must share a device")
    if first.type == "cpu" and not interpreting():
        raise ValueError(
            f"{first_name} is a CPU tensor: pagegen kernels need CUDA tensors, or TRITON_INTERPRET=1 "
            "to run them on the CPU in Triton's interpreter"
        )
    if first.type not in ("cpu", "cuda"):
        raise ValueError(f"{first_name} is on {first}; expected a CUDA device")
    return first


def check_layout(layout: str) -> None:
    """layout is one of spec.LAYOUTS."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; supported: {', '.join(LAYOUTS)}")


def pool_geometry(name: str, cache: torch.Tensor, layout: str, packed_ok: bool = False) -> tuple[int, int, int, int]:
    """(num_blocks, block_size, kv_heads, head_dim) of a pool tensor in `layout`, validated.
    packed_ok: also accept a second-innermost stride > head_dim (a view of a K|V-packed pool)."""
    check_tensor(name, cache, ndim=4, dtypes=tuple(TORCH_KV_DTYPES))
    if layout == "NHD":
        nb, bs, hk, d = cache.shape
    else:
        nb, hk, bs, d = cache.shape
    if bs not in BLOCK_SIZES:
        raise ValueError(
            f"{name} has block_size={bs} (layout {layout}); supported: {', '.join(map(str, BLOCK_SIZES))}"
        )
    if d not in HEAD_DIMS:
        raise ValueError(f"{name} has head_dim={d}; supported: {', '.join(map(str, HEAD_DIMS))}")
    # the kernels assume the two innermost dims are packed (one runtime inner stride); attention
    # kernels also read views of K|V-packed pools (a second runtime stride, spec.kv_packed)
    if cache.stride(3) != 1 or not (cache.stride(2) == d or (packed_ok and cache.stride(2) > d)):
        what = "contiguous in its last dim with a second-innermost stride >= head_dim" if packed_ok else (
            "contiguous in its last two dims")
        raise ValueError(f"{name} must be {what} (got strides {cache.stride()})")
    return nb, bs, hk, d


def kv_strides(cache: torch.Tensor, layout: str, packed: bool = False) -> tuple[int, ...]:
    """The (block stride, inner stride) pair the layout macros take: NHD -> token, HND -> head;
    packed (a K|V-packed pool view, see is_packed_pool): the second-innermost stride follows."""
    return (cache.stride(0), cache.stride(1), cache.stride(2)) if packed else (cache.stride(0), cache.stride(1))


def is_packed_pool(cache: torch.Tensor) -> bool:
    """Whether a pool view's second-innermost stride is not head_dim (K and V packed in the last dim)."""
    return cache.stride(2) != cache.shape[3]


def check_q_and_pool(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     layout: str) -> tuple[int, int, int, int]:
    """Checks shared by the attention ops: q [..., Hq, D] against the K/V pools in `layout`.
    Returns (block_size, kv_heads, head_dim, q_heads)."""
    check_layout(layout)
    check_tensor("q", q, ndim=3, dtypes=tuple(TORCH_DTYPES))
    _, bs, hk, d = pool_geometry("k_cache", k_cache, layout, packed_ok=True)
    check_tensor("v_cache", v_cache, ndim=4)
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(
            f"v_cache must match k_cache in shape and strides: got {tuple(v_cache.shape)} vs {tuple(k_cache.shape)}"
        )
    fp8 = k_cache.dtype in TORCH_KV_DTYPES and k_cache.dtype not in TORCH_DTYPES  # scaled fp8 pool, any q dtype
    if v_cache.dtype != k_cache.dtype or not (fp8 or k_cache.dtype == q.dtype):
        raise TypeError(f"k_cache/v_cache dtype {k_cache.dtype}/{v_cache.dtype} must equal q's dtype {q.dtype}, "
                        "or both be one fp8 format (float8_e4m3fn / float8_e5m2, with k_scale/v_scale)")
    _, hq, qd = q.shape
    if qd != d:
        raise ValueError(f"q has head_dim={qd} but the KV pool has head_dim={d}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in its last dim")
    if hq % hk:
        raise ValueError(f"q has {hq} heads, not a multiple of the pool's {hk} KV heads")
    return bs, hk, d, hq


def is_packed(t: torch.Tensor, full: bool = False) -> bool:
    """Whether the kernels can read metadata tensor t as it is: its last dim packed (stride 1, or
    length <= 1), or the whole tensor contiguous when `full`."""
    return t.is_contiguous() if full else (t.shape[-1] <= 1 or t.stride(-1) == 1)


def packed(name: str, t: torch.Tensor, *, copy: bool, full: bool = False) -> torch.Tensor:
    """A metadata tensor the kernels can read (see is_packed). The kernels read seq_lens,
    cu_seqlens_q, slot_mapping and block pairs as packed arrays and block tables through their row
    stride only, so a strided view (a column `meta[:, 0]`, every other entry `x[::2]`) would be
    misread. One-shot ops (`copy=True`) take a contiguous copy (a small extra kernel; pass packed
    tensors to avoid it); plans (`copy=False`) refuse, because they launch the same tensors every
    step with no checks."""
    if is_packed(t, full):
        return t
    if copy:
        return t.contiguous()
    raise ValueError(
        f"{name} is a strided view (shape {tuple(t.shape)}, strides {t.stride()}); the kernels read it packed and a "
        f"plan launches it unchecked: give the plan a contiguous tensor ({name}.contiguous()) and copy each step's "
        "values into it"
    )


def strided_metadata(metas: tuple[tuple[str, torch.Tensor], ...], *, copy: bool) -> tuple[bool, ...]:
    """Which of the named metadata tensors a one-shot op must copy (`copy=True`); with
    `copy=False` (a plan) any strided one is refused (see packed)."""
    if not copy:
        for name, t in metas:
            packed(name, t, copy=False)
    return tuple(not is_packed(t) for _, t in metas)


def signature(t: torch.Tensor) -> tuple:
    """(shape, strides, dtype, device) of t: what a plan bakes in (host-side attributes only)."""
    return (t.shape, t.stride(), t.dtype, t.device)


def check_like(names: tuple[str, ...], planned: tuple[tuple, ...], given: tuple) -> None:
    """Raise ValueError naming the first tensor of `given` whose shape, strides, dtype or device
    differ from `planned` (signatures of the tensors a plan was built for). Host-side: no sync."""
    for name, want, t in zip(names, planned, given, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not (t.shape == want[0] and t.stride() == want[1] and t.dtype == want[2] and t.device == want[3]):
            got = signature(t)
            raise ValueError(
                f"{name} does not match the plan: planned shape {tuple(want[0])} strides {want[1]} {want[2]} on "
                f"{want[3]}, got shape {tuple(got[0])} strides {got[1]} {got[2]} on {got[3]}; a plan runs only on "
                "tensors laid out like the ones it was built with (build another plan for another layout)"
            )


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The output tensor of an attention op: a new [q.shape] tensor for None (contiguous), else
    `out` checked: q's shape, dtype and device, last dim contiguous (other strides free)."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, contiguous in its last dim; "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}")
    return out


def attention_spec(family: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, layout: str,
                   extra: dict[str, torch.Tensor] | None = None, features: Features = NO_FEATURES) -> KernelSpec:
    """Checks shared by decode and extend (cheap, no sync) and the KernelSpec they need.

    q [.., Hq, D] against the pool in `layout`; block_tables [B, max_blocks] int32 and seq_lens [B]
    int32 with one row per sequence; `extra` tensors (extend's cu_seqlens_q) share the device;
    `features` (checked by pagegen.features.check_features) and a K|V-packed pool view (see
    is_packed_pool) select the kernel variant."""
    bs, hk, d, hq = check_q_and_pool(q, k_cache, v_cache, layout)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    b = seq_lens.shape[0]
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but seq_lens has {b} sequences")
    check_device({"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables, "seq_lens": seq_lens,
                  **(extra or {})})
    return KernelSpec(family, head_dim=d, block_size=bs, layout=layout, dtype=TORCH_DTYPES[q.dtype],
                      kv_dtype=TORCH_KV_DTYPES[k_cache.dtype], group_size=hq // hk,
                      kv_packed=is_packed_pool(k_cache), **features.spec_flags())


def check_capacity(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_blocks: int,
                   max_seq_len: int | None = None) -> None:
    """Full check of the lengths and block ids an attention op will read: every seq_len in
    [0, min(max_seq_len, block_tables capacity)] and every block id of a token in use within
    [0, num_blocks). Reads device tensors (syncs): used with validate=True and always on the CPU."""
    if not seq_lens.numel():
        return
    capacity = block_tables.shape[1] * block_size
    lens = seq_lens.long()
    longest, shortest = int(lens.max()), int(lens.min())
    if shortest < 0:
        raise ValueError(f"seq_lens has a negative length ({shortest})")
    if longest > capacity:
        raise ValueError(
            f"block_tables is too narrow: {block_tables.shape[1]} blocks x {block_size} tokens = {capacity} "
            f"tokens, but seq_lens has a sequence of {longest} tokens"
        )
    if max_seq_len is not None and longest > max_seq_len:
        raise ValueError(f"seq_lens has a sequence of {longest} tokens but max_seq_len={max_seq_len} (the bound the "
                         "launch was sized for; tokens beyond it would be dropped): pass max_seq_len >= max(seq_lens)")
    used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] * block_size < lens[:, None]
    ids = block_tables[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_tables holds block ids outside [0, {num_blocks}) for tokens in use "
                         f"(min {int(ids.min())}, max {int(ids.max())})")
