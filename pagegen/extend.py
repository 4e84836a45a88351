"""The public paged-extend op (prefill / chunked prefill over a paged prefix): validate, pick the
config, launch the cached kernel.

Design decision: the new tokens' K/V are already in the pool (written by kv_write before this op
runs), so a sequence's whole history, cached prefix and new tokens alike, is reached through its
block table and nothing is passed twice. This keeps the prefix cache whole: the blocks holding the
new tokens are ordinary pool blocks that later requests may share.
"""

from __future__ import annotations

import math

import torch
import triton

from pagegen import codegen
from pagegen._checks import (
    TORCH_DTYPES,
    check_device,
    check_q_and_pool,
    check_tensor,
    interpreting,
    is_packed_pool,
    kv_strides,
)
from pagegen.decode import check_capacity
from pagegen.dispatch import select_config
from pagegen.features import NO_FEATURES, Features, check_features
from pagegen.spec import Config, KernelSpec, default_config, keep

LOG2E = 1.4426950408889634


def extend_spec(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, layout: str,
                features: Features = NO_FEATURES) -> KernelSpec:
    """Validate the extend inputs (cheap checks, no GPU sync) and return the KernelSpec they need."""
    bs, hk, d, hq = check_q_and_pool(q, k_cache, v_cache, layout)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    b = seq_lens.shape[0]
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but seq_lens has {b} sequences")
    if b > 65535:
        raise ValueError(f"seq_lens has {b} sequences; at most 65535 a call (the grid's second dim)")
    if cu_seqlens_q.shape[0] != b + 1:
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries; expected batch + 1 = {b + 1} "
            "(query-token offsets, starting at 0)"
        )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    check_device({"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables,
                  "cu_seqlens_q": cu_seqlens_q, "seq_lens": seq_lens})
    return KernelSpec("extend", head_dim=d, block_size=bs, layout=layout, dtype=TORCH_DTYPES[q.dtype],
                      group_size=hq // hk, kv_packed=is_packed_pool(k_cache), **features.spec_flags())


def check_extend_lengths(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, total_q: int, max_q_len: int) -> None:
    """Full check of the query offsets against q and seq_lens. Reads device tensors (syncs):
    used with validate=True and always for CPU tensors."""
    cu = cu_seqlens_q.long().cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    if int(cu[-1]) != total_q:
        raise ValueError(f"cu_seqlens_q must end at q.shape[0]={total_q}, got {int(cu[-1])}")
    q_lens = cu[1:] - cu[:-1]
    if q_lens.numel() == 0:
        return
    if int(q_lens.min()) < 0:
        raise ValueError("cu_seqlens_q must be non-decreasing (a sequence has a negative query count)")
    if int(q_lens.max()) > max_q_len:
        raise ValueError(f"a sequence has {int(q_lens.max())} query tokens, more than max_q_len={max_q_len}")
    short = q_lens > seq_lens.long().cpu()
    if bool(short.any()):
        i = int(short.nonzero()[0])
        raise ValueError(
            f"sequence {i} has {int(q_lens[i])} query tokens but seq_lens[{i}]={int(seq_lens[i])}: seq_lens counts "
            "all cached tokens including the new ones, whose K/V must be written to the pool first"
        )


def paged_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    layout: str = "NHD",
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
    max_q_len: int | None = None,
    max_seq_len: int | None = None,
    validate: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged KV (prefix + themselves).

    q: [total_q, Hq, D] fp16/bf16, the new tokens of all sequences back to back; cu_seqlens_q:
    [B + 1] int32 offsets into q (sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]);
    k_cache, v_cache: the pool in `layout` (NHD [num_blocks, block_size, Hkv, D] or HND [num_blocks,
    Hkv, block_size, D]), same dtype as q; block_tables: [B, max_blocks] int32 physical block ids;
    seq_lens: [B] int32 tokens cached per sequence INCLUDING the new ones: the new tokens' K/V must
    already be written into the pool (by kv_write), at positions seq_len - q_len .. seq_len - 1.
    New token i of sequence b is at absolute position p = seq_lens[b] - q_len_b + i and attends to
    positions 0..p (causal, lower-right aligned); query head h uses KV head h // (Hq / Hkv).
    Returns out [total_q, Hq, D] = softmax(q k^T * scale + causal mask) v; scale defaults to 1/sqrt(D).
    The pools may be views of one K|V tensor, as in paged_decode.

    Features (as in paged_decode; None = off): sliding_window W (token p sees positions p - W + 1 ..
    p; the kernel skips the keys below a tile's window), softcap c, sinks [Hq] fp32, alibi_slopes
    [Hq] fp32 (scores + slope * (key_pos - query_pos)).

    config: a Config to use instead of the tuned/heuristic one. max_q_len: an upper bound of the
    per-sequence query counts known on the host (sizes the grid; default q.shape[0]); a smaller bound
    launches fewer idle programs. max_seq_len: an upper bound of seq_lens known on the host (picks
    the tuned shape bucket; default block_tables' capacity).
    validate: also check offsets, lengths and block ids (reads them: syncs with the GPU).
    """
    features = NO_FEATURES
    if sliding_window is not None or softcap is not None or sinks is not None or alibi_slopes is not None:
        check_tensor("q", q, ndim=3)
        features = check_features(q.shape[1], q.device, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                  alibi_slopes=alibi_slopes)
    spec = extend_spec(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout, features)
    total_q, hq, d = q.shape
    hk = hq // spec.group_size
    if max_q_len is None:
        max_q_len = total_q
    elif not isinstance(max_q_len, int) or isinstance(max_q_len, bool) or max_q_len < 0:
        raise ValueError(f"max_q_len must be a non-negative int, got {max_q_len!r}")
    elif max_q_len > total_q:
        raise ValueError(f"max_q_len={max_q_len} exceeds q.shape[0]={total_q} (the total of all query tokens)")
    ctx_bound = block_tables.shape[1] * spec.block_size
    if max_seq_len is not None:
        if max_seq_len > ctx_bound:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds block_tables capacity ({block_tables.shape[1]} blocks x "
                f"{spec.block_size} tokens = {ctx_bound})"
            )
        ctx_bound = max(1, max_seq_len)
    if validate or q.device.type == "cpu":
        check_extend_lengths(cu_seqlens_q, seq_lens, total_q, max_q_len)
        check_capacity(block_tables, seq_lens, spec.block_size, k_cache.shape[0])
    if config is None:
        config = select_config(spec, total_q, features.effective_ctx(ctx_bound), hk)
        if keep(spec, config) is not None:
            config = default_config(spec)
    else:
        reason = keep(spec, config)
        if reason:
            raise ValueError(f"config {config} is not legal for {spec.variant_key()}: {reason}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, contiguous in its last dim")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not scale > 0 or math.isinf(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if total_q and seq_lens.shape[0] and max_q_len:
        launch_extend(spec, config, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, max_q_len,
                      features)
    return out


def launch_extend(spec: KernelSpec, config: Config, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                  scale: float, max_q_len: int, features: Features = NO_FEATURES) -> None:
    """Launch extend_kernel with already-validated arguments. No host sync."""
    mod = codegen.load(spec)
    b = seq_lens.shape[0]
    hq = q.shape[1]
    hk = hq // spec.group_size
    block_q = config.block_m // spec.group_size  # query tokens a program (keep() ensures >= 1)
    num_q_tiles = triton.cdiv(max_q_len, block_q)
    mod.extend_kernel[(num_q_tiles * hk, b)](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens,
        scale * LOG2E, *features.kernel_args(),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        *kv_strides(k_cache, spec.layout, spec.kv_packed),
        hk, num_q_tiles,
        BLOCK_M=config.block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n, DOT_FP32=interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
