"""What every lab variant shares: the reference spec, the launch of a kernel with today's signature,
and the compile-time argument types (for inspect_sass.py).

The reference spec: bf16 (fp16 in the CPU checks), head_dim 128, group 4 (32 q / 8 KV heads on the
GPU), NHD pool, block 16 (block 64 for the K/V-TMA variant). A variant module exposes:
  KERNEL       name of its @triton.jit entry point
  ARG_TYPES    Triton type strings of its pointer / float arguments (the rest compile as i32)
  CONFIGS      launch configs (dicts: block_m, block_n, num_warps, num_stages, + variant keys)
  POOL_PAGE    tokens per page the variant is rendered for (its PAGE constexpr)
  INTERPRET    whether it runs in the CPU interpreter (TMA / warp specialization may not)
  PREDICTION   one line: what it should buy and why
  constexprs(cfg) -> dict, launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
  scale, max_q_len, cfg) -> None
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

LOG2E = 1.4426950408889634
HEAD_DIM = 128
GROUP = 4

# today's signature (templates/extend.py.j2): pointer and float arguments; ints compile as i32
BASE_ARG_TYPES = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "block_tables_ptr": "*i32",
    "cu_seqlens_q_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": "fp32",
}

# the configs worth reading: the heuristic default (spec.default_config) and the H100 tuned winner
DEFAULT_CFG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 5}
TUNED_CFG = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 5}


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the kernels then upcast dot operands: bf16 dots are wrong there)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def base_constexprs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Constexpr arguments of a kernel with today's signature, for `cfg`."""
    return {"BLOCK_M": cfg["block_m"], "BLOCK_Q": cfg["block_m"] // GROUP, "BLOCK_N": cfg["block_n"],
            "DOT_FP32": interpreting()}


def kv_strides_nhd(k_cache: torch.Tensor) -> tuple[int, int]:
    """(stride of a block, stride of a token) of an NHD pool [num_blocks, PAGE, Hk, D]."""
    return k_cache.stride(0), k_cache.stride(1)


def base_launch(kernel: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                scale: float, max_q_len: int, cfg: dict[str, Any], grid: tuple[int, ...] | None = None,
                **extra: Any) -> Any:
    """Launch `kernel` (today's signature) as pagegen.extend.launch_extend does.

    q/out: [total_q, Hq, D]; k_cache/v_cache: NHD pools; grid defaults to (num_q_tiles * Hk, B).
    `extra` are additional keyword arguments of the variant's kernel. Returns the CompiledKernel.
    """
    b = seq_lens.shape[0]
    hk = q.shape[1] // GROUP
    block_q = cfg["block_m"] // GROUP
    num_q_tiles = triton.cdiv(max_q_len, block_q)
    if grid is None:
        grid = (num_q_tiles * hk, b)
    s_blk, s_tok = kv_strides_nhd(k_cache)
    return kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        s_blk, s_tok,
        hk, num_q_tiles,
        **base_constexprs(cfg), **extra,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


_allocator_device: str | None = None


def ensure_allocator(device: torch.device) -> None:
    """Give Triton a scratch allocator (device-side tl.make_tensor_descriptor needs 128 B a program)."""
    global _allocator_device
    if _allocator_device == str(device):
        return

    def alloc(size: int, alignment: int, stream: Any) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)

    triton.set_allocator(alloc)
    _allocator_device = str(device)
