"""Public KV-pool ops: kv_write (scatter new K/V by slot) and copy_blocks (copy-on-write).

Both validate cheaply (no GPU sync unless validate=True, or on CPU where reading is free), pick
the launch config (given, else the spec's default), and launch the rendered kernel. Both work in
place on the pool tensors and return nothing.
"""

from __future__ import annotations

import torch
import triton

from pagegen import codegen
from pagegen._checks import (
    TORCH_DTYPES,
    TORCH_KV_DTYPES,
    check_config,
    check_device,
    check_layout,
    check_tensor,
    kv_strides,
    packed,
    pool_geometry,
)
from pagegen.spec import Config, KernelSpec, default_config

INDEX_DTYPES = (torch.int32, torch.int64)


def _pools(k_cache: torch.Tensor, v_cache: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    check_layout(layout)
    geom = pool_geometry("k_cache", k_cache, layout)
    check_tensor("v_cache", v_cache, ndim=4)
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(
            f"v_cache must match k_cache in shape and strides: got {tuple(v_cache.shape)} {v_cache.stride()} "
            f"vs {tuple(k_cache.shape)} {k_cache.stride()}"
        )
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache dtype {v_cache.dtype} differs from k_cache dtype {k_cache.dtype}")
    return geom


def _config(spec: KernelSpec, config: Config | None) -> Config:
    """The given config (checked), else the spec's default with tiles capped at 4096 elements
    ([block_n, head_dim_padded]) so wide heads do not spill registers in these pure copies."""
    if config is None:
        base = default_config(spec)
        block_n = max(16, min(base.block_n, 4096 // spec.head_dim_padded))
        return Config(block_n=block_n, num_warps=base.num_warps, num_stages=base.num_stages)
    return check_config(spec, config)


def kv_write_spec(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, layout: str) -> KernelSpec:
    """Validate kv_write's inputs (cheap, no sync) and return the KernelSpec they need."""
    nb, bs, hk, d = _pools(k_cache, v_cache, layout)
    check_tensor("k_new", k_new, ndim=3, dtypes=tuple(TORCH_DTYPES))
    check_tensor("v_new", v_new, ndim=3, dtypes=tuple(TORCH_DTYPES))
    if tuple(k_new.shape[1:]) != (hk, d):
        raise ValueError(f"k_new has shape {tuple(k_new.shape)}; expected [T, {hk}, {d}] to match the pool's "
                         f"kv_heads={hk}, head_dim={d}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new has shape {tuple(v_new.shape)} but k_new has {tuple(k_new.shape)}")
    fp8 = k_cache.dtype not in TORCH_DTYPES
    if v_new.dtype != k_new.dtype or (not fp8 and k_new.dtype != k_cache.dtype):
        raise TypeError(f"k_new/v_new dtype {k_new.dtype}/{v_new.dtype} must equal the pool dtype {k_cache.dtype}"
                        " (an fp8 pool takes fp16 or bf16 rows of one dtype)")
    if k_new.stride(2) != 1 or v_new.stride(2) != 1:
        raise ValueError("k_new and v_new must be contiguous in their last dim (head_dim)")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES)
    if slot_mapping.shape[0] != k_new.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but k_new has {k_new.shape[0]} tokens")
    check_device({"k_new": k_new, "v_new": v_new, "k_cache": k_cache, "v_cache": v_cache,
                  "slot_mapping": slot_mapping})
    return KernelSpec("kv_write", head_dim=d, block_size=bs, layout=layout, dtype=TORCH_DTYPES[k_new.dtype],
                      kv_dtype=TORCH_KV_DTYPES[k_cache.dtype])


def fp8_scales(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, kv_dtype: str, kv_heads: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Check the dequantization scales of an fp8 pool (cheap, no sync).

    k_scale, v_scale: float32 tensors on the pool's device with 1 element (one scale for the
    tensor) or [kv_heads] (one per KV head). Returns (k_scale, v_scale, stride_ks, stride_vs),
    a stride being the step between heads' scales: 0 for one scale for the tensor.
    """
    out: list = []
    for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sc is None:
            raise ValueError(f"{name} is required for an {kv_dtype} pool: pass a float32 tensor of 1 or "
                             f"{kv_heads} (kv_heads) scales, e.g. torch.ones(1, device=...)")
        check_tensor(name, sc, dtypes=(torch.float32,))
        if sc.numel() == 1:
            out += [sc.reshape(1), 0]
        elif sc.dim() == 1 and sc.shape[0] == kv_heads:
            out += [sc, sc.stride(0)]
        else:
            raise ValueError(f"{name} has shape {tuple(sc.shape)}; expected 1 element (per tensor) or "
                             f"[{kv_heads}] (one per KV head)")
        if sc.device != device:
            raise ValueError(f"{name} is on {sc.device} but the pool is on {device}; move the scales there")
    return out[0], out[2], out[1], out[3]


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Every non-negative slot < num_slots and no slot twice. Reads the tensor (syncs)."""
    live = slot_mapping[slot_mapping >= 0]
    if live.numel():
        top = int(live.max())
        if top >= num_slots:
            raise ValueError(f"slot_mapping has slot {top}; the pool has {num_slots} slots (num_blocks x block_size)")
        if live.unique().numel() != live.numel():
            raise ValueError("slot_mapping repeats a slot; each slot may be written by one token only")


def kv_write(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    layout: str = "NHD",
    config: Config | None = None,
    validate: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write the K/V rows of T new tokens into the paged pool, in place.

    k_new, v_new: [T, Hkv, D], the pool's dtype, last dim contiguous (other strides free, e.g.
    views of a fused QKV output). k_cache, v_cache: NHD [num_blocks, block_size, Hkv, D] or HND
    [num_blocks, Hkv, block_size, D]. slot_mapping: [T] int32/int64, token t goes to block
    slot // block_size at offset slot % block_size; a negative slot skips the token (a strided
    view is copied contiguous first).
    For each t with slot >= 0: pool[block, offset, h, :] = new[t, h, :] (NHD indexing).
    config: launch config (block_n = tokens a program); default: the spec's default.
    validate: also check slots against the pool and for repeats (reads slot_mapping: syncs). Without
    it, on a GPU, a slot >= num_blocks x block_size writes out of bounds and a repeated slot leaves
    an unspecified one of its tokens; CPU tensors (the interpreter) are always checked.
    k_scale, v_scale: fp8 pools (float8_e4m3fn / float8_e5m2) only, and required there: float32
    device tensors of 1 element (per tensor) or [Hkv] (per KV head). Each element is stored as
    saturate(round_to_nearest_even(new * (1 / scale))), so new ~= stored * scale; new values of
    the scales need no recompile and no sync. Scales must be finite and > 0 (not checked: that
    would read them). k_new/v_new are then fp16 or bf16.
    """
    spec = kv_write_spec(k_new, v_new, k_cache, v_cache, slot_mapping, layout)
    scales: tuple = ()  # fp8: (k_scale, v_scale) and (stride_ks, stride_vs) join the kernel's arguments
    if spec.is_fp8:
        k_sc, v_sc, stride_ks, stride_vs = fp8_scales(k_scale, v_scale, spec.kv_dtype, k_new.shape[1], k_cache.device)
        scales = (k_sc, v_sc)
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"k_scale/v_scale apply to fp8 pools only; this pool is {k_cache.dtype}: drop them")
    cfg = _config(spec, config)
    slot_mapping = packed("slot_mapping", slot_mapping, copy=True)
    t = k_new.shape[0]
    if validate or slot_mapping.device.type == "cpu":
        check_slots(slot_mapping, k_cache.shape[0] * spec.block_size)
    if t == 0:
        return
    hk = k_new.shape[1]
    stride_blk, stride_inner = kv_strides(k_cache, layout)
    mod = codegen.load(spec)
    mod.kv_write_kernel[(triton.cdiv(t, cfg.block_n), hk)](
        k_new, v_new, k_cache, v_cache, slot_mapping, *scales, t,
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        stride_blk, stride_inner, *((stride_ks, stride_vs) if scales else ()),
        BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def copy_blocks_spec(k_cache: torch.Tensor, v_cache: torch.Tensor, block_pairs: torch.Tensor,
                     layout: str) -> KernelSpec:
    """Validate copy_blocks' inputs (cheap, no sync) and return the KernelSpec they need."""
    _nb, bs, _hk, d = _pools(k_cache, v_cache, layout)
    check_tensor("block_pairs", block_pairs, ndim=2, dtypes=INDEX_DTYPES)
    if block_pairs.shape[1] != 2:
        raise ValueError(f"block_pairs has shape {tuple(block_pairs.shape)}; expected [P, 2] (src, dst) rows")
    check_device({"k_cache": k_cache, "v_cache": v_cache, "block_pairs": block_pairs})
    kv = TORCH_KV_DTYPES[k_cache.dtype]  # an fp8 pool is copied byte for byte (dtype is a placeholder)
    return KernelSpec("copy_blocks", head_dim=d, block_size=bs, layout=layout,
                      dtype=kv if kv in TORCH_DTYPES.values() else "bf16", kv_dtype=kv)


def check_pairs(block_pairs: torch.Tensor, num_blocks: int) -> None:
    """Ids in [0, num_blocks), no repeated destination, no block both source and destination.
    Reads the tensor (syncs)."""
    if not block_pairs.numel():
        return
    lo, hi = int(block_pairs.min()), int(block_pairs.max())
    if lo < 0 or hi >= num_blocks:
        raise ValueError(f"block_pairs holds block ids outside [0, {num_blocks}): min {lo}, max {hi}")
    src, dst = block_pairs[:, 0], block_pairs[:, 1]
    if dst.unique().numel() != dst.numel():
        raise ValueError("block_pairs repeats a destination block")
    if torch.isin(dst, src).any():
        raise ValueError("block_pairs has a block that is both a source and a destination; copy in two calls")


def copy_blocks(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_pairs: torch.Tensor,
    *,
    layout: str = "NHD",
    config: Config | None = None,
    validate: bool = False,
) -> None:
    """Copy whole blocks of the K and V pools, in place: for each row (src, dst) of block_pairs,
    pool[dst] = pool[src] (all tokens and heads of the block).

    k_cache, v_cache: the pools in `layout`; block_pairs: [P, 2] int32/int64 (src, dst) (a strided
    view is copied contiguous first), with no overlap between sources and destinations.
    config: launch config (block_n = rows of head_dim elements a program copies).
    validate: check ids and overlap (reads pairs: syncs). Without it, on a GPU, ids outside
    [0, num_blocks) read or write out of bounds and overlapping or repeated destinations give
    unspecified contents. CPU tensors are always checked.
    """
    spec = copy_blocks_spec(k_cache, v_cache, block_pairs, layout)
    cfg = _config(spec, config)
    block_pairs = packed("block_pairs", block_pairs, copy=True, full=True)
    if validate or block_pairs.device.type == "cpu":
        check_pairs(block_pairs, k_cache.shape[0])
    p = block_pairs.shape[0]
    if p == 0:
        return
    hk = k_cache.shape[2] if layout == "NHD" else k_cache.shape[1]
    stride_blk, stride_inner = kv_strides(k_cache, layout)
    mod = codegen.load(spec)
    mod.copy_blocks_kernel[(p, triton.cdiv(spec.block_size * hk, cfg.block_n))](
        k_cache, v_cache, block_pairs, hk, stride_blk, stride_inner,
        BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
