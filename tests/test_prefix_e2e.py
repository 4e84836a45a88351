"""Prefix caching end to end: allocator (SequenceManager) + kv_write + paged_extend.

Request A prefills a system prompt + its question. Request B with the same system prompt gets the
system prompt's full blocks from the prefix cache, writes and computes only its own tokens through
extend, and its output equals a full recomputation of B from scratch (fresh pool, no cache).

A toy "model" stands in for the layers: token t at position i has q/k/v = E[t] + P[i] (fixed random
tables), so equal prefixes give equal K/V, as in a real model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TOL, rel_err

import pagegen
from pagegen.reference import paged_extend_ref

BS, HK, GROUP, D = 16, 2, 4, 64
DTYPE = torch.float16


class ToyModel:
    """q [n, Hq, D], k/v [n, Hk, D] of a token sequence; position-dependent, deterministic."""

    def __init__(self, vocab: int = 100, max_pos: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.eq = torch.randn(vocab, HK * GROUP, D, generator=g)
        self.ek = torch.randn(vocab, HK, D, generator=g)
        self.ev = torch.randn(vocab, HK, D, generator=g)
        self.pos = torch.randn(max_pos, 1, D, generator=g)

    def qkv(self, tokens: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.tensor(tokens)
        p = self.pos[: len(tokens)]
        return tuple((e[t] + p).to(DTYPE).to(device) for e in (self.eq, self.ek, self.ev))


def prefill(cache: pagegen.KVCache, sm, seq_id: str, prompt: list[int], model: ToyModel, device: str):
    """Add a request, write the K/V of its uncached tokens, extend over them.
    Returns (output rows of the computed tokens [n - cached, Hq, D], tokens reused from the cache)."""
    res = sm.add(seq_id, prompt)
    start = res.num_cached_tokens
    q, k, v = model.qkv(prompt, device)
    k_cache, v_cache = cache.layer(0)
    slots = torch.from_numpy(res.slot_mapping).to(device)
    pagegen.kv_write(k[start:], v[start:], k_cache, v_cache, slots, layout=cache.layout)
    bt, lens = sm.block_tables([seq_id], device=device)
    n_new = len(prompt) - start
    cu = torch.tensor([0, n_new], dtype=torch.int32, device=device)
    out = torch.full_like(q[start:], float("nan"))
    pagegen.paged_extend(q[start:], k_cache, v_cache, bt, cu, lens, layout=cache.layout, out=out)
    return out, start, (bt, lens, cu, q[start:])


@pytest.mark.parametrize("a_finished", [False, True], ids=["A-running", "A-finished"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_prefix_reuse_equals_full_recompute(device, layout, a_finished):
    model = ToyModel()
    g = torch.Generator().manual_seed(1)
    system = torch.randint(0, 100, (40,), generator=g).tolist()  # 2 full blocks + 8 tokens
    prompt_a = system + torch.randint(0, 100, (13,), generator=g).tolist()
    prompt_b = system + torch.randint(0, 100, (21,), generator=g).tolist()

    cache = pagegen.KVCache(block_size=BS, kv_heads=HK, head_dim=D, layout=layout, dtype=DTYPE, device=device,
                            num_blocks=16).fill_(float("nan"))  # unwritten slots are NaN
    sm = cache.sequence_manager()
    out_a, cached_a, _ = prefill(cache, sm, "A", prompt_a, model, device)
    assert cached_a == 0
    k_cache, v_cache = cache.layer(0)
    bt_a, lens_a = sm.block_tables(["A"], device="cpu")
    cu_a = torch.tensor([0, len(prompt_a)], dtype=torch.int32)
    ref_a = paged_extend_ref(model.qkv(prompt_a, "cpu")[0], k_cache.cpu(), v_cache.cpu(), bt_a, cu_a, lens_a,
                             layout=layout)
    assert rel_err(out_a, ref_a) < TOL[DTYPE]
    blocks_a = sm.blocks_of("A")
    if a_finished:
        sm.free("A")  # A's full blocks stay in the prefix cache (ref 0, hashed)

    out_b, cached_b, (bt_b, lens_b, cu_b, q_b) = prefill(cache, sm, "B", prompt_b, model, device)
    assert cached_b == 2 * BS  # the system prompt's two full blocks came from the cache
    assert sm.blocks_of("B")[:2] == blocks_a[:2]  # the same physical blocks
    assert out_b.shape[0] == len(prompt_b) - 2 * BS  # only B's own tokens were computed
    sm.check_invariants()

    # full recomputation of B from scratch: a fresh pool, no prefix cache
    fresh = pagegen.KVCache(block_size=BS, kv_heads=HK, head_dim=D, layout=layout, dtype=DTYPE, device=device,
                            num_blocks=16).fill_(float("nan"))
    sm_fresh = fresh.sequence_manager(enable_prefix_caching=False)
    full_b, cached, _ = prefill(fresh, sm_fresh, "B", prompt_b, model, device)
    assert cached == 0
    assert rel_err(out_b, full_b[2 * BS:].double()) < 2e-3
    ref_b = paged_extend_ref(q_b.cpu(), k_cache.cpu(), v_cache.cpu(), bt_b.cpu(), cu_b.cpu(), lens_b.cpu(),
                             layout=layout)
    assert rel_err(out_b, ref_b) < TOL[DTYPE]


def test_batched_extend_of_two_requests_sharing_a_prefix(device):
    """A's continuation chunk and B's new tokens in ONE extend call over a shared cached prefix."""
    model = ToyModel(seed=3)
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 100, (35,), generator=g).tolist()
    cache = pagegen.KVCache(block_size=BS, kv_heads=HK, head_dim=D, dtype=DTYPE, device=device,
                            num_blocks=24).fill_(float("nan"))
    sm = cache.sequence_manager()
    prefill(cache, sm, "A", system + [7, 8, 9], model, device)
    k_cache, v_cache = cache.layer(0)
    # B arrives with the same system prompt; A gets 17 more tokens (chunked prefill) in the same step
    prompt_b = system + torch.randint(0, 100, (30,), generator=g).tolist()
    res_b = sm.add("B", prompt_b)
    assert res_b.num_cached_tokens == 2 * BS
    more_a = torch.randint(0, 100, (17,), generator=g).tolist()
    n_a = sm.num_tokens("A")
    res_a = sm.append("A", more_a)
    assert res_a.cow is None
    full_a = system + [7, 8, 9] + more_a
    qa, ka, va = model.qkv(full_a, device)
    qb, kb, vb = model.qkv(prompt_b, device)
    s_b = res_b.num_cached_tokens
    k_new = torch.cat([ka[n_a:], kb[s_b:]])
    v_new = torch.cat([va[n_a:], vb[s_b:]])
    slots = torch.from_numpy(np.concatenate([res_a.slot_mapping, res_b.slot_mapping])).to(device)
    pagegen.kv_write(k_new, v_new, k_cache, v_cache, slots)
    q = torch.cat([qa[n_a:], qb[s_b:]])
    q_lens = [len(full_a) - n_a, len(prompt_b) - s_b]
    cu = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=device)
    bt, lens = sm.block_tables(["A", "B"], device=device)
    out = torch.full_like(q, float("nan"))
    pagegen.paged_extend(q, k_cache, v_cache, bt, cu, lens, out=out, max_q_len=max(q_lens))
    ref = paged_extend_ref(q.cpu(), k_cache.cpu(), v_cache.cpu(), bt.cpu(), cu.cpu(), lens.cpu())
    assert rel_err(out, ref) < TOL[DTYPE]
