"""FlexAttention baselines of bench/extend.py: one sequence over torch's experimental PagedAttention page
table, and a varlen batch over its packed tokens with a document mask. Page size, heads, head_dim and
device are read from the inputs bench.extend.make_inputs builds."""

from __future__ import annotations

import time

import torch


def run_flex(x: dict):
    """FlexAttention over PagedAttention: logical lower-right causal mask, converted to pages."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    k, v, bt, q_len = x["k"], x["v"], x["bt"], x["q_len"]
    n_pages, bs, hk, d = k.shape  # an NHD pool
    dev = k.device
    pa = PagedAttention(n_pages, bs, 1, device=dev)
    kf = k.permute(2, 0, 1, 3).reshape(1, hk, n_pages * bs, d).contiguous()  # same pages, flex's layout
    vf = v.permute(2, 0, 1, 3).reshape(1, hk, n_pages * bs, d).contiguous()
    nb = bt.shape[1]
    pa.page_table[0, :nb] = bt[0].long()
    pa.capacity[:] = nb * bs
    pa.physical_to_logical[:] = -1
    pa.physical_to_logical[0, bt[0].long()] = torch.arange(nb, device=dev)
    seq_len = x["sl"]

    def mask_mod(b, h, qi, kv):
        return (kv <= qi + (seq_len[b] - q_len)) & (kv < seq_len[b])

    logical = create_block_mask(mask_mod, 1, None, q_len, nb * bs, device=dev, BLOCK_SIZE=(128, bs))
    physical = pa.convert_logical_block_mask(logical)
    compiled = torch.compile(flex_attention, dynamic=False)
    q4 = x["qc"]
    errors = []
    # the mask's KV block is one page (16 tokens), so flex's BLOCK_N must divide it: try spellings
    for opts in ({"BLOCK_M": 128, "BLOCK_N": bs}, {"BLOCK_N": bs}, {"FWD_BLOCK_N": bs}, {"BLOCK_M": 64, "BLOCK_N": bs}):
        def fn(opts=opts):
            o = compiled(q4, kf, vf, block_mask=physical, enable_gqa=True, kernel_options=opts)
            return o[0].transpose(0, 1)

        t0 = time.time()
        try:
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return fn, f"kernel_options={opts}, compile {time.time() - t0:.0f}s"
        except Exception as exc:  # try the next spelling
            errors.append(f"{opts}: {type(exc).__name__}: {str(exc)[:120]}")
            torch._dynamo.reset()
    raise RuntimeError(" | ".join(errors))


def run_flex_varlen(x: dict, compile: bool = True):
    """FlexAttention over a batch's packed tokens made contiguous: q [1, HQ, total_q, D], K/V [1, HK,
    total_kv, D] (every sequence's prefix and new tokens back to back, as SDPA gets them), a document +
    lower-right causal block mask (query and key of the same sequence, key position <= the query's).
    Returns (fn() -> out [total_q, HQ, D], note). compile=False: eager flex (slow; the CPU tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seqs = x["seqs"]
    qp = torch.cat([s["qc"] for s in seqs], dim=2)
    kp = torch.cat([s["kc"] for s in seqs], dim=2)
    vp = torch.cat([s["vc"] for s in seqs], dim=2)
    dev = qp.device
    ids = torch.arange(len(seqs), device=dev)
    q_lens = torch.tensor([s["q_len"] for s in seqs], device=dev)
    ns = torch.tensor([s["max_n"] for s in seqs], device=dev)
    q_doc, kv_doc = ids.repeat_interleave(q_lens), ids.repeat_interleave(ns)
    q_off, kv_off = torch.cumsum(q_lens, 0) - q_lens, torch.cumsum(ns, 0) - ns
    # absolute position of each packed query / key within its own sequence
    q_pos = torch.arange(qp.shape[2], device=dev) - q_off[q_doc] + (ns - q_lens)[q_doc]
    kv_pos = torch.arange(kp.shape[2], device=dev) - kv_off[kv_doc]

    def mask_mod(b, h, qi, kv):
        return (q_doc[qi] == kv_doc[kv]) & (kv_pos[kv] <= q_pos[qi])

    t0 = time.time()
    block_mask = create_block_mask(mask_mod, 1, None, qp.shape[2], kp.shape[2], device=dev)
    attend = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def fn():
        return attend(qp, kp, vp, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)

    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return fn, f"packed contiguous, document mask, {'compile' if compile else 'eager'} {time.time() - t0:.0f}s"
