"""Plain-torch ground truth. Slow and simple on purpose: it gathers pages through the block
table one sequence at a time and computes in float64.

Attention features (None = off), as the ops take them:
  sliding_window W: a query at absolute position p sees keys p - W + 1 .. p (itself included);
  softcap c: scores s = q.k * scale become c * tanh(s / c);
  alibi_slopes [Hq]: then s += slope[h] * (key_pos - query_pos);
  sinks [Hq]: a logit per query head that joins the softmax denominator (a key of value 0).
"""

from __future__ import annotations

import math

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n_tokens: int, layout: str) -> torch.Tensor:
    """The first `n_tokens` cached rows of one sequence as [n_tokens, kv_heads, head_dim].

    cache: NHD [num_blocks, block_size, kv_heads, D] or HND [num_blocks, kv_heads, block_size, D];
    block_table: [max_blocks] physical block ids of the sequence.
    """
    bs = cache.shape[1] if layout == "NHD" else cache.shape[2]
    n_blocks = -(-n_tokens // bs)
    blocks = cache[block_table[:n_blocks].long()]
    if layout == "HND":
        blocks = blocks.transpose(1, 2)  # -> [n, block_size, kv_heads, D]
    return blocks.reshape(-1, blocks.shape[2], blocks.shape[3])[:n_tokens]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float, *,
           causal: bool, sliding_window: int | None = None, softcap: float | None = None,
           sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of query rows at absolute positions q_pos over keys 0..n-1, in float64.

    q: [m, Hq, D]; k, v: [n, Hq, D] (KV heads already repeated per group); q_pos: [m] positions.
    causal: a query sees no key after its own position. Returns [m, Hq, D]; a row that sees no key
    (and has no sink) gives zeros.
    """
    n = k.shape[0]
    k_pos = torch.arange(n, device=q.device)
    scores = torch.einsum("qhd,nhd->hqn", q.double(), k.double()) * scale  # [Hq, m, n]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        dist = (k_pos[None, :] - q_pos[:, None]).double()  # [m, n]
        scores = scores + alibi_slopes.double().to(q.device)[:, None, None] * dist[None]
    visible = torch.ones(q_pos.shape[0], n, dtype=torch.bool, device=q.device)
    if causal:
        visible &= k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # one more key per head whose logit is the sink and whose value is 0
        sink = sinks.double().to(q.device)[:, None, None].expand(-1, scores.shape[1], 1)
        scores = torch.cat([scores, sink], dim=2)
    m = scores.amax(dim=2, keepdim=True).clamp_min(-1e300)  # rows that see nothing: weights 0, not NaN
    w = torch.exp(scores - m)
    w = w / w.sum(dim=2, keepdim=True).clamp_min(1e-300)
    return torch.einsum("hqn,nhd->qhd", w[:, :, :n], v.double())


def paged_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    layout: str = "NHD",
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over its paged KV, in float64.

    q: [B, Hq, D]; caches in `layout`; block_tables: [B, max_blocks]; seq_lens: [B]. The query
    sits at position seq_len - 1. Features as in the module docstring.
    Returns [B, Hq, D] in float64 (a sequence of length 0 gives zeros).
    """
    b, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, d, dtype=torch.float64, device=q.device)
    for i in range(b):
        n = int(seq_lens[i])
        if n == 0:
            continue
        k = gather_kv(k_cache, block_tables[i], n, layout).double()  # [n, Hk, D]
        v = gather_kv(v_cache, block_tables[i], n, layout).double()
        group = hq // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        out[i] = attend(q[i : i + 1], k, v, torch.tensor([n - 1], device=q.device), scale, causal=True,
                        sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)[0]
    return out


def paged_extend_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    layout: str = "NHD",
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend (prefill over a paged prefix) attention, in float64, one sequence at a time.

    q: [total_q, Hq, D], sequence b owning rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]; caches in
    `layout`; block_tables: [B, max_blocks]; seq_lens: [B] cached tokens including the new ones.
    New token i of sequence b sits at position seq_lens[b] - q_len + i and sees positions 0..itself
    (with a window, its last W). Features as in the module docstring.
    Returns [total_q, Hq, D] in float64.
    """
    t, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(t, hq, d, dtype=torch.float64, device=q.device)
    cu = [int(x) for x in cu_seqlens_q]
    for i in range(seq_lens.shape[0]):
        n = int(seq_lens[i])
        lo, hi = cu[i], cu[i + 1]
        if hi == lo:
            continue
        k = gather_kv(k_cache, block_tables[i], n, layout).double()  # [n, Hk, D]
        v = gather_kv(v_cache, block_tables[i], n, layout).double()
        group = hq // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        pos = torch.arange(n - (hi - lo), n, device=q.device)  # absolute positions of the new tokens
        out[lo:hi] = attend(q[lo:hi], k, v, pos, scale, causal=True, sliding_window=sliding_window, softcap=softcap,
                            sinks=sinks, alibi_slopes=alibi_slopes)
    return out


def paged_verify_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, *, cu_seqlens_q: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """A verify step (a few new tokens per sequence) in float64: paged_extend_ref's function, with q
    either [B, q_len, Hq, D] (uniform) or [total_q, Hq, D] with cu_seqlens_q [B + 1].
    Other keyword arguments (layout, scale, features) go to paged_extend_ref. Returns q's shape, float64."""
    if cu_seqlens_q is not None:
        return paged_extend_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, **kwargs)
    b, ql, hq, d = q.shape
    cu = torch.arange(0, (b + 1) * ql, ql, dtype=torch.int32)
    out = paged_extend_ref(q.reshape(b * ql, hq, d), k_cache, v_cache, block_tables, cu, seq_lens, **kwargs)
    return out.view(b, ql, hq, d)


def kv_write_ref(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    layout: str = "NHD",
) -> None:
    """In place: for each token t with slot_mapping[t] >= 0, write k_new[t], v_new[t] ([Hkv, D])
    at block slot // block_size, offset slot % block_size of the pools (layout NHD or HND)."""
    bs = k_cache.shape[1] if layout == "NHD" else k_cache.shape[2]
    slots = slot_mapping.long().to(k_cache.device)
    live = slots >= 0
    blk, off = slots[live] // bs, slots[live] % bs
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        rows = new.to(cache.device)[live].to(cache.dtype)
        if layout == "NHD":
            cache[blk, off] = rows
        else:
            cache[blk, :, off] = rows  # advanced dims first: [n, Hkv, D]


def copy_blocks_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_pairs: torch.Tensor, *,
                    layout: str = "NHD") -> None:
    """In place: for each row (src, dst) of block_pairs [P, 2], pool[dst] = pool[src] for K and V
    (the block is dim 0 in both layouts)."""
    del layout  # blocks are the leading dim in every layout
    for src, dst in block_pairs.long().tolist():
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


# -- fp8 KV pools (issue 16): the rounding the kernels do, and attention over the dequantized pool --

def _scale_view(scale: torch.Tensor | float, x: torch.Tensor, head_axis: int) -> torch.Tensor:
    """`scale` (a number, 1 element, or one per KV head) shaped to broadcast over x's KV-head axis."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1)
    if s.numel() == 1:
        return s.reshape([1] * x.dim())
    shape = [1] * x.dim()
    shape[head_axis] = s.numel()
    return s.reshape(shape)


def quantize_fp8_ref(x: torch.Tensor, scale: torch.Tensor | float, fp8_dtype: torch.dtype, *,
                     head_axis: int = -2) -> torch.Tensor:
    """x quantized as kv_write stores it: saturate(round_to_nearest_even(x * (1 / scale))) in fp8.

    x: [..., Hkv, D] (KV heads on `head_axis`), fp16/bf16/fp32; scale: a number, 1 element, or [Hkv]
    float32 (one per KV head). The product is taken in fp32 with the fp32 reciprocal, as the kernel
    does; torch's cast rounds to nearest even (checked against a brute-force search in tests).
    Returns a tensor of x's shape in fp8_dtype (torch.float8_e4m3fn or torch.float8_e5m2).
    """
    fmax = torch.finfo(fp8_dtype).max
    inv = 1.0 / _scale_view(scale, x, head_axis)
    return (x.float() * inv).clamp(-fmax, fmax).to(fp8_dtype)


def absmax_scale_ref(x: torch.Tensor, fp8_dtype: torch.dtype, *, head_axis: int | None = None) -> torch.Tensor:
    """The scale that maps x's largest magnitude to the format's largest finite value (448 for e4m3,
    57344 for e5m2): amax(|x|) / fmax as float32, over the whole tensor ([1], head_axis=None) or per
    KV head ([Hkv], the amax over every axis but head_axis). An all-zero tensor (or head) gets 1.0."""
    fmax = torch.finfo(fp8_dtype).max
    a = x.detach().abs().float()
    if head_axis is None:
        amax = a.amax().reshape(1)
    else:
        axis = head_axis % x.dim()
        amax = a.amax(dim=[i for i in range(x.dim()) if i != axis])
    return torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).contiguous()


def dequantize_fp8_ref(x8: torch.Tensor, scale: torch.Tensor | float, *, head_axis: int = -2) -> torch.Tensor:
    """stored * scale in float64 (exact): x8 [..., Hkv, D] fp8, scale as in quantize_fp8_ref."""
    return x8.double() * _scale_view(scale, x8, head_axis).double()


def dequantize_pool_ref(cache: torch.Tensor, scale: torch.Tensor | float, *, layout: str = "NHD") -> torch.Tensor:
    """A whole fp8 pool in float64 (NHD [blocks, block_size, Hkv, D] or HND [blocks, Hkv, block_size, D])."""
    return dequantize_fp8_ref(cache, scale, head_axis=2 if layout == "NHD" else 1)


def paged_decode_fp8_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, *, k_scale: torch.Tensor | float, v_scale: torch.Tensor | float,
                         layout: str = "NHD", **kwargs) -> torch.Tensor:
    """paged_decode_ref over fp8 pools: dequantize K and V exactly (float64), then the float64
    attention, so a check against it measures the kernel's error, not the quantization's.
    Other keyword arguments go to paged_decode_ref. Returns [B, Hq, D] float64."""
    return paged_decode_ref(q, dequantize_pool_ref(k_cache, k_scale, layout=layout),
                            dequantize_pool_ref(v_cache, v_scale, layout=layout), block_tables, seq_lens,
                            layout=layout, **kwargs)


def paged_extend_fp8_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, k_scale: torch.Tensor | float,
                         v_scale: torch.Tensor | float, layout: str = "NHD", **kwargs) -> torch.Tensor:
    """paged_extend_ref over fp8 pools (dequantized exactly first, as paged_decode_fp8_ref).
    Returns [total_q, Hq, D] float64."""
    return paged_extend_ref(q, dequantize_pool_ref(k_cache, k_scale, layout=layout),
                            dequantize_pool_ref(v_cache, v_scale, layout=layout), block_tables, cu_seqlens_q,
                            seq_lens, layout=layout, **kwargs)


def kv_write_fp8_ref(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, *, k_scale: torch.Tensor | float, v_scale: torch.Tensor | float,
                     layout: str = "NHD") -> None:
    """kv_write_ref into fp8 pools: k_new/v_new [T, Hkv, D] quantized by quantize_fp8_ref first."""
    kv_write_ref(quantize_fp8_ref(k_new, k_scale, k_cache.dtype), quantize_fp8_ref(v_new, v_scale, v_cache.dtype),
                 k_cache, v_cache, slot_mapping, layout=layout)
