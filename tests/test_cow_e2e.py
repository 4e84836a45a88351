"""End to end: allocator + kv_write + copy_blocks + paged_decode.

Sequences write their K/V through kv_write at the slots the SequenceManager hands out; one shares
a cached prefix, two are forks whose shared, partly filled last block is copied on write through
copy_blocks. The decode output of every sequence must equal the reference computed from that
sequence's own token history in a private, contiguous pool.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, TOL, rel_err

import pagegen
from pagegen import KVCache, copy_blocks, kv_write
from pagegen.reference import paged_decode_ref

BS, HKV, HQ, D, VOCAB, MAX_POS = 8, 2, 4, 64, 32, 64


class Model:
    """K/V of a token = embedding(token) + embedding(position): a wrong block or a missed copy shows."""

    def __init__(self, dtype: torch.dtype, device: str, gen: torch.Generator) -> None:
        self.tok_k = torch.randn(VOCAB, HKV, D, generator=gen)
        self.tok_v = torch.randn(VOCAB, HKV, D, generator=gen)
        self.pos_k = torch.randn(MAX_POS, HKV, D, generator=gen)
        self.pos_v = torch.randn(MAX_POS, HKV, D, generator=gen)
        self.dtype, self.device = dtype, device

    def kv(self, tokens: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, HKV, D] K and V of `tokens` at positions start.."""
        t = torch.tensor(tokens, dtype=torch.long)
        pos = torch.arange(start, start + len(tokens))
        k = (self.tok_k[t] + self.pos_k[pos]).to(self.dtype).to(self.device)
        v = (self.tok_v[t] + self.pos_v[pos]).to(self.dtype).to(self.device)
        return k, v


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fork_cow_prefix_sharing_decode(layout, dtype, device):
    gen = torch.Generator().manual_seed(11)
    dt = DTYPES[dtype]
    model = Model(dt, device, gen)
    cache = KVCache(block_size=BS, kv_heads=HKV, head_dim=D, layout=layout, dtype=dt, device=device,
                    num_blocks=16).fill_(float("nan"))  # poisoned: any read of an unwritten slot shows
    k_cache, v_cache = cache.layer(0)
    m = cache.sequence_manager()
    hist: dict[str, list[int]] = {}

    def write(sid: str, tokens: list[int], start: int, slots) -> None:
        k, v = model.kv(tokens, start)
        kv_write(k, v, k_cache, v_cache, torch.from_numpy(slots).to(device), layout=layout)

    def cow(pairs: list[tuple[int, int]]) -> None:
        if pairs:
            copy_blocks(k_cache, v_cache, torch.tensor(pairs, dtype=torch.int32, device=device), layout=layout)

    def add(sid: str, prompt: list[int]) -> int:
        r = m.add(sid, prompt)
        write(sid, prompt[r.num_cached_tokens:], r.num_cached_tokens, r.slot_mapping)
        hist[sid] = list(prompt)
        return r.num_cached_tokens

    def append(sid: str, tokens: list[int]):
        r = m.append(sid, tokens)
        cow([r.cow] if r.cow else [])  # copy the shared block before writing into the copy
        write(sid, tokens, len(hist[sid]), r.slot_mapping)
        hist[sid] += tokens
        return r.cow

    def fork(parent: str, child: str) -> None:
        m.fork(parent, child)
        hist[child] = list(hist[parent])

    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=gen).tolist()  # noqa: E731

    # -- A: 21-token prompt (2 full blocks + 5); C shares A's first two blocks from the cache --
    prompt_a = rand(21)
    assert add("A", prompt_a) == 0
    assert add("C", prompt_a[:16] + rand(3)) == 16
    assert m.blocks_of("C")[:2] == m.blocks_of("A")[:2]

    # -- B = fork(A); A appends into the shared partial block -> copy-on-write --
    fork("A", "B")
    shared = m.blocks_of("A")[-1]
    pair = append("A", rand(2))
    assert pair is not None and pair[0] == shared and m.blocks_of("B")[-1] == shared
    assert append("B", rand(5)) is None  # B is now the block's only holder; it also crosses a block edge

    # -- D = fork(A); a decode step of all four: A's last block is shared with D again --
    fork("A", "D")
    ids = ["A", "B", "C", "D"]
    toks = rand(len(ids))
    step = m.append_batch(ids, toks)
    assert [p[0] for p in step.cow] == [m.blocks_of("D")[-1]]
    cow(step.cow)
    pos = torch.tensor([len(hist[s]) for s in ids])
    t = torch.tensor(toks)
    k_new = (model.tok_k[t] + model.pos_k[pos]).to(dt).to(device)
    v_new = (model.tok_v[t] + model.pos_v[pos]).to(dt).to(device)
    kv_write(k_new, v_new, k_cache, v_cache, torch.from_numpy(step.slot_mapping).to(device), layout=layout)
    for s, tok in zip(ids, toks, strict=True):
        hist[s].append(tok)
    m.check_invariants()

    # -- decode over the shared pool vs each sequence's own history in a private pool --
    bt, lens = m.block_tables(ids, device=device)
    assert lens.tolist() == [len(hist[s]) for s in ids]
    q = torch.randn(len(ids), HQ, D, generator=gen).to(dt).to(device)
    out = pagegen.paged_decode(q, k_cache, v_cache, bt, lens, layout=layout)
    for i, s in enumerate(ids):
        n = len(hist[s])
        k, v = model.kv(hist[s], 0)
        nb = -(-n // BS)
        pad = nb * BS - n
        k_priv = torch.cat([k, torch.zeros(pad, HKV, D, dtype=dt, device=device)]).reshape(nb, BS, HKV, D)
        v_priv = torch.cat([v, torch.zeros(pad, HKV, D, dtype=dt, device=device)]).reshape(nb, BS, HKV, D)
        ref = paged_decode_ref(q[i : i + 1], k_priv, v_priv, torch.arange(nb, dtype=torch.int32)[None],
                               torch.tensor([n], dtype=torch.int32), layout="NHD")
        err = rel_err(out[i : i + 1], ref)
        assert err < TOL[dt], f"sequence {s}: rel err {err:.2e}"

    # -- finishing everything returns every block; cached prefixes stay reusable --
    for s in ids:
        m.free(s)
    st = m.pool.stats()
    assert st.used == 0 and st.free + st.cached == cache.num_blocks
    m.pool.check_invariants()
