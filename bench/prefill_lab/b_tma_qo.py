"""b_tma_qo: the Q tile load and the O tile store through tensor descriptors (TMA), K/V gathers as today.
"""
# Copied from pagegen's rendered extend kernel (templates/extend.py.j2 at hash 60d7641b1477dadc; 87d2377ec703894e
# renders the same source); the one change is marked "LAB:". diff against _rendered_extend_bs*.py to see it.
#
# Paged extend (prefill / chunked prefill over a paged prefix, prefix caching).
# Sequence b has seq_len = seq_lens[b] tokens in the pool (reached through its block-table row),
# of which the LAST q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b] are new: their K/V are already in
# the pool (written by kv_write beforehand), their queries are rows cu_seqlens_q[b] .. +q_len of
# q [total_q, Hq, HEAD_DIM]. New token i (0-based) sits at absolute position
# p = seq_len - q_len + i and attends to keys 0..p (causal, lower-right aligned). ctx = seq_len -
# q_len = 0 is a plain prefill; q_len = 1 is decode.
#
# Grid of extend_kernel: (num_q_tiles * kv_heads, batch), num_q_tiles = cdiv(max_q_len, BLOCK_Q).
# Program (pid0, b) takes KV head kvh = pid0 % kv_heads and query tile num_q_tiles - 1 - pid0 //
# kv_heads (the longest, most diagonal-heavy tiles start first); tiles past the sequence's q_len
# return at once, so no host-side per-tile index is needed and nothing syncs.
# A program owns BLOCK_M = M rows of tl.dot made of (query token, head-in-group) pairs, token-major:
# row r is token tile*BLOCK_Q + r // GROUP, query head kvh*GROUP + r % GROUP, with BLOCK_Q =
# BLOCK_M // GROUP tokens a tile. So each K/V tile is loaded once for all 4 heads of the group.
# Keys are walked in tiles of BLOCK_N tokens (several pages when PAGE < BLOCK_N) in two loops:
#   prefix part [0, n_full): every key is visible to every row (no masks at all);
#   diagonal tail [n_full, end): bounds and causal mask, end = last row's position + 1.
# Online softmax in fp32, base 2 (qk_scale = softmax scale * log2(e)); fp32 accumulators.
#
# constexprs: HEAD_DIM=128 (padded to HEAD_DIM_PAD=128), PAGE=16 tokens a block,
# GROUP=4 query heads per KV head; launch-time: BLOCK_M (rows a program), BLOCK_Q (tokens a
# program = BLOCK_M // GROUP), BLOCK_N (keys a tile), DOT_FP32 (upcast tl.dot operands: the
# Triton interpreter mis-computes bf16 dots).
import triton
import triton.language as tl

HEAD_DIM = tl.constexpr(128)
HEAD_DIM_PAD = tl.constexpr(128)
PAGE = tl.constexpr(16)
GROUP = tl.constexpr(4)


@triton.jit
def extend_kernel(
    q_ptr,  # [total_q, Hq, HEAD_DIM]
    k_ptr,  # pool, layout NHD
    v_ptr,  # pool, same shape and strides as k
    out_ptr,  # [total_q, Hq, HEAD_DIM]
    block_tables_ptr,  # [B, max_blocks] int32
    cu_seqlens_q_ptr,  # [B + 1] int32
    seq_lens_ptr,  # [B] int32, cached tokens per sequence, new ones included
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_btb,
    stride_kv_blk, stride_kv_tok,
    num_kv_heads,
    num_q_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    kvh = pid % num_kv_heads
    tile = num_q_tiles - 1 - pid // num_kv_heads
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    tok0 = tile * BLOCK_Q
    if tok0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = tl.maximum(seq_len - q_len, 0)  # (clamped: seq_len < q_len is invalid input, never a fault)

    # -- rows of this program: (token, head-in-group) pairs, token-major --
    offs_m = tl.arange(0, BLOCK_M)
    row_tok = tok0 + offs_m // GROUP  # token index within the sequence's new tokens
    row_pos = ctx_len + row_tok  # absolute position in the sequence
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    # LAB: Q and O through tensor descriptors (TMA) over this sequence's rows [q_len, Hq, D]; one box
    # [BLOCK_Q, GROUP, HEAD_DIM] is this program's (token, head) rows, token-major as BLOCK_M rows.
    # Rows past q_len read as zeros and are not written (the descriptor's shape clips them).
    q_desc = tl.make_tensor_descriptor(q_ptr + q_start.to(tl.int64) * stride_qt,
                                       shape=[q_len, num_kv_heads * GROUP, HEAD_DIM],
                                       strides=[stride_qt, stride_qh, 1], block_shape=[BLOCK_Q, GROUP, HEAD_DIM])
    q = q_desc.load([tok0, kvh * GROUP, 0]).reshape([BLOCK_M, HEAD_DIM_PAD])
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + b * stride_btb

    # keys [0, end) matter to this tile; those below the first row's position + 1 are seen by all
    last_tok = tl.minimum(q_len, tok0 + BLOCK_Q) - 1
    end = ctx_len + last_tok + 1
    n_full = (ctx_len + tok0 + 1) // BLOCK_N * BLOCK_N

    # -- prefix part: whole tiles, no masks --
    for start in range(0, n_full, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        blk = tl.load(bt_row + offs_n // PAGE).to(tl.int64)
        slot = offs_n % PAGE
        kv_off = blk[:, None] * stride_kv_blk + slot[:, None] * stride_kv_tok + kvh * HEAD_DIM + offs_d[None, :]
        k = tl.load(k_ptr + kv_off)
        v = tl.load(v_ptr + kv_off)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # -- scores [BLOCK_M, BLOCK_N] and online softmax, in log2 units --
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one FMA an element
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # -- diagonal tail: bounds + causal mask --
    for start in range(n_full, end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % PAGE
        kv_off = blk[:, None] * stride_kv_blk + slot[:, None] * stride_kv_tok + kvh * HEAD_DIM + offs_d[None, :]
        kv_mask = n_mask[:, None]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # -- scores [BLOCK_M, BLOCK_N] and online softmax, in log2 units --
        s = tl.dot(q, tl.trans(k))
        # causal, lower-right aligned: row at absolute position p sees keys 0..p
        s = tl.where(offs_n[None, :] <= row_pos[:, None], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # every live row saw at least key 0, so l_i > 0 there; dead rows are not stored
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_desc = tl.make_tensor_descriptor(out_ptr + q_start.to(tl.int64) * stride_ot,
                                       shape=[q_len, num_kv_heads * GROUP, HEAD_DIM],
                                       strides=[stride_ot, stride_oh, 1], block_shape=[BLOCK_Q, GROUP, HEAD_DIM])
    o_desc.store([tok0, kvh * GROUP, 0], o.to(out_ptr.dtype.element_ty).reshape([BLOCK_Q, GROUP, HEAD_DIM]))


# ---- lab interface (common.py says what each name means) ----
from common import BASE_ARG_TYPES, base_constexprs, base_launch, ensure_allocator  # noqa: E402

KERNEL = "extend_kernel"
ARG_TYPES = BASE_ARG_TYPES
CONFIGS = [{"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 5}]
POOL_PAGE = 16
INTERPRET = True
PREDICTION = ('0-2%: Q and O are read/written once a program (1/(2 x keys/BLOCK_N) of the traffic); frees a few '
              'registers of address math; the prerequisite for K/V TMA')


def constexprs(cfg):
    return base_constexprs(cfg)


def launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, max_q_len, cfg):
    ensure_allocator(q.device)
    return base_launch(extend_kernel, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale,
                max_q_len, cfg)
