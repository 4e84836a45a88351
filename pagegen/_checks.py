"""Input validation shared by the public ops: cheap checks that never sync with the GPU.

Every check raises ValueError / TypeError naming the argument, what it got and what it expected.
"""

from __future__ import annotations

import os

import torch

from pagegen.spec import BLOCK_SIZES, HEAD_DIMS, LAYOUTS

TORCH_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# pool element types: q/out dtypes, or scaled fp8 (issue 16)
TORCH_KV_DTYPES = {**TORCH_DTYPES, torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2"}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run pagegen's kernels here, or None when it can.

    Measured: Triton 3.6's interpreter converts 1-element arrays to loop bounds with int(), which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); every
    kernel with a data-dependent loop then fails. Triton 3.9 squeezes first and works; 3.6 with
    NumPy 2.3 works. Versions between 3.6 and 3.9 were not tried and are not flagged.
    """
    import numpy
    import triton

    def major_minor(v: str) -> tuple[int, int]:
        parts = (v.split("+")[0].split(".") + ["0", "0"])[:2]
        return tuple(int("".join(ch for ch in x if ch.isdigit()) or 0) for x in parts)  # type: ignore[return-value]

    if major_minor(triton.__version__) <= (3, 6) and major_minor(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run with NumPy {numpy.__version__} (it calls "
                "int() on 1-element arrays, which NumPy >= 2.4 refuses): install numpy<2.4, or Triton >= 3.9")
    return None


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
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"k_cache/v_cache dtype {k_cache.dtype}/{v_cache.dtype} must equal q's dtype {q.dtype}")
    _, hq, qd = q.shape
    if qd != d:
        raise ValueError(f"q has head_dim={qd} but the KV pool has head_dim={d}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in its last dim")
    if hq % hk:
        raise ValueError(f"q has {hq} heads, not a multiple of the pool's {hk} KV heads")
    return bs, hk, d, hq
