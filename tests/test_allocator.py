"""BlockPool, SequenceManager and KVCache: unit tests plus a hypothesis state machine.

The state machine keeps a shadow "KV memory", one value per slot: the KV of token i of a sequence
is a chained id of (its whole prefix, the extra key), as real K/V depend on every earlier token.
Every slot the allocator hands out gets that value written, every copy-on-write pair is copied
first. After every step each running sequence must read back exactly its own history through its
blocks, and every cached prefix block must hold the values its hash names. Pure Python: no
kernels run here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagegen import AllocatorMisuseError, BlockPool, KVCache, OutOfBlocksError, SequenceManager
from pagegen.allocator import chain_hash, sha256_chain_hash
from pagegen.kv_cache import blocks_for_budget, bytes_per_block


def manager_state(m: SequenceManager) -> tuple:
    """Everything observable about a manager and its pool (for 'an error changed nothing')."""
    seqs = tuple(
        (k, s.row, tuple(s.blocks), tuple(s.tokens), s.num_tokens, s.num_hashed, s.last_hash)
        for k, s in m._seqs.items()
    )
    return m.pool.snapshot(), seqs, tuple(m._free_rows), m._table.tobytes()


# -- BlockPool ------------------------------------------------------------------------------
def test_allocate_all_or_nothing_and_order():
    p = BlockPool(4)
    assert p.allocate(2) == [0, 1]  # the free stack hands out low ids first
    before = p.snapshot()
    with pytest.raises(OutOfBlocksError, match="asked for 3, only 2 free") as info:
        p.allocate(3)
    assert (info.value.asked, info.value.available) == (3, 2)
    assert p.snapshot() == before
    p.free([1])
    assert p.allocate(1) == [1]  # LIFO: the block freed last comes back first
    assert p.allocate(0) == []
    p.check_invariants()


def test_free_misuse_changes_nothing():
    p = BlockPool(4)
    a = p.allocate(2)
    before = p.snapshot()
    with pytest.raises(AllocatorMisuseError, match="double free"):
        p.free([a[0], 3])  # 3 was never allocated: nothing of the call happens, not even a[0]
    with pytest.raises(AllocatorMisuseError, match="given 2 times but held 1"):
        p.free([a[0], a[0]])
    with pytest.raises(AllocatorMisuseError, match="unknown block 7"):
        p.free([7])
    with pytest.raises(AllocatorMisuseError, match="unknown block -1"):
        p.free([-1])
    assert p.snapshot() == before
    p.free(a)
    with pytest.raises(AllocatorMisuseError, match="double free"):
        p.free([a[0]])
    assert p.stats().free == 4


def test_block_ids_are_plain_ints():
    p = BlockPool(4)
    p.allocate(2)
    before = p.snapshot()
    for bad in (True, 1.0, "1", None, np.int64(1), -1, 4):
        for call in (p.free, p.share):
            with pytest.raises(AllocatorMisuseError, match="block ids are ints"):
                call([bad])
        assert p.snapshot() == before
    with pytest.raises(ValueError):
        p.allocate(True)


def test_share_and_copy_on_write():
    p = BlockPool(3)
    (b,) = p.allocate(1)
    assert p.copy_on_write(b) is None  # sole holder writes in place
    p.share([b])
    assert p.ref_count(b) == 2
    src, dst = p.copy_on_write(b)
    assert src == b and dst != b and p.ref_count(b) == 1 and p.ref_count(dst) == 1
    assert p.stats().cow_copies == 1
    p.share([dst])
    p.allocate(1)
    before = p.snapshot()
    with pytest.raises(OutOfBlocksError):
        p.copy_on_write(dst)
    assert p.snapshot() == before
    with pytest.raises(AllocatorMisuseError, match="not held"):
        BlockPool(2).share([0])


def test_prefix_cache_eviction_only_when_free_list_empty_lru():
    p = BlockPool(4)
    a, b = p.allocate(2)
    assert p.cache_block(a, "h0") and p.cache_block(b, "h1")
    assert not p.cache_block(p.allocate(1)[0], "h0")  # that prefix is already held by block a
    p.free([2])
    p.free([b])  # released first -> evicted first
    p.free([a])
    s = p.stats()
    assert (s.used, s.cached, s.free) == (0, 2, 2)
    got = p.allocate(2)  # the two free blocks: no eviction yet
    assert sorted(got) == [2, 3] and p.stats().evictions == 0 and p.stats().cached == 2
    (c,) = p.allocate(1)  # free list empty -> evict the least recently released cached block
    assert c == b and p.stats().evictions == 1
    assert p.find_prefix(["h0", "h1"]) == [a]
    assert p.match_prefix(["h0", "h1"]) == [a]  # revives a from the LRU list
    s = p.stats()
    assert (s.prefix_queries, s.prefix_hits, s.cached, s.used) == (2, 1, 0, 4)
    assert s.hit_rate == 0.5
    with pytest.raises(OutOfBlocksError, match="asked for 1, only 0"):
        p.allocate(1)
    p.check_invariants()


def test_lru_revived_block_moves_to_young_end():
    p = BlockPool(2)
    a, b = p.allocate(2)
    p.cache_block(a, "a")
    p.cache_block(b, "b")
    p.free([a])
    p.free([b])
    p.match_prefix(["a"])  # a revived, then released again: now younger than b
    p.free([a])
    assert p.allocate(1) == [b]


def test_chain_hash_depends_on_parent_tokens_and_extra():
    h = chain_hash(None, [1, 2, 3])
    assert h == chain_hash(None, (1, 2, 3))
    assert h != chain_hash(0, [1, 2, 3])
    assert h != chain_hash(None, [1, 2, 4])
    assert h != chain_hash(None, [1, 2, 3], extra="lora-7")
    s = sha256_chain_hash(None, [1, 2, 3])
    assert isinstance(s, bytes) and len(s) == 32 and s != sha256_chain_hash(s, [1, 2, 3])


def test_pool_rejects_bad_sizes():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_blocks"):
            BlockPool(bad)
    with pytest.raises(ValueError, match="non-negative"):
        BlockPool(2).allocate(-1)


# -- SequenceManager --------------------------------------------------------------------------
def test_add_append_slots_and_tables():
    m = SequenceManager(16, block_size=4)
    r = m.add("a", list(range(10)))
    assert r.num_cached_tokens == 0
    blocks = m.blocks_of("a")
    assert len(blocks) == 3
    want = [blocks[i // 4] * 4 + i % 4 for i in range(10)]
    assert r.slot_mapping.dtype == np.int64 and r.slot_mapping.tolist() == want
    a = m.append("a", [10, 11, 12])
    assert a.cow is None
    blocks = m.blocks_of("a")
    assert a.slot_mapping.tolist() == [blocks[i // 4] * 4 + i % 4 for i in (10, 11, 12)]
    m.add("b", [5])
    bt, lens = m.block_tables(["a", "b"])
    assert bt.dtype == torch.int32 and lens.dtype == torch.int32 and bt.shape == (2, 4)
    assert bt[0].tolist() == blocks and bt[1, 0].item() == m.blocks_of("b")[0]
    assert lens.tolist() == [13, 1]
    bt, _ = m.block_tables(["b"], width=6)
    assert bt.shape == (1, 6)
    with pytest.raises(ValueError, match="narrower"):
        m.block_tables(["a"], width=2)
    m.check_invariants()


def test_prefix_reuse_leaves_one_token_and_respects_extra_key():
    m = SequenceManager(32, block_size=4)
    prompt = list(range(100, 112))  # 3 full blocks
    m.add("a", prompt)
    r = m.add("b", prompt)
    assert r.num_cached_tokens == 8  # the last full block is recomputed: its last token needs logits
    assert m.blocks_of("b")[:2] == m.blocks_of("a")[:2] and m.blocks_of("b")[2] != m.blocks_of("a")[2]
    assert r.slot_mapping.shape == (4,)
    assert m.add("c", prompt + [1], extra_key="lora").num_cached_tokens == 0
    assert m.add("d", prompt + [1]).num_cached_tokens == 12
    st_ = m.pool.stats()
    assert st_.prefix_hits == 2 + 3 and st_.prefix_queries == 2 + 2 + 3 + 3  # a, b, c, d
    for s in "abcd":
        m.free(s)
    assert m.pool.stats().used == 0
    assert m.add("e", prompt + [2]).num_cached_tokens == 12  # cached blocks outlive their sequences
    m.check_invariants()


def test_fork_copy_on_write_and_finished_errors():
    m = SequenceManager(8, block_size=4)
    m.add("p", [1, 2, 3, 4, 5, 6])  # 1.5 blocks
    m.fork("p", "c")
    shared_last = m.blocks_of("p")[-1]
    assert m.pool.ref_count(shared_last) == 2
    r = m.append("c", [7])
    assert r.cow is not None and r.cow[0] == shared_last
    assert m.blocks_of("c")[-1] == r.cow[1] and m.blocks_of("p")[-1] == shared_last
    assert m.pool.ref_count(shared_last) == 1
    assert m.append("p", [8]).cow is None  # p is now the sole holder: writes in place
    assert r.slot_mapping.tolist() == [r.cow[1] * 4 + 2]
    m.free("c")
    before = manager_state(m)
    with pytest.raises(AllocatorMisuseError, match="'c' is finished"):
        m.append("c", [1])
    with pytest.raises(AllocatorMisuseError, match="'c' is finished"):
        m.free("c")
    with pytest.raises(AllocatorMisuseError, match="unknown sequence 'zz'"):
        m.fork("zz", "y")
    with pytest.raises(AllocatorMisuseError, match="already running"):
        m.add("p", [1])
    with pytest.raises(AllocatorMisuseError, match="appears twice"):
        m.append_batch(["p", "p"], [1, 2])
    assert manager_state(m) == before


def test_out_of_blocks_changes_nothing():
    m = SequenceManager(4, block_size=2)
    m.add("a", [1, 2, 3])  # 2 blocks
    m.add("b", [4, 5])  # 1 block (full)
    before = manager_state(m)
    with pytest.raises(OutOfBlocksError, match="asked for 2, only 1"):
        m.add("c", [7, 8, 9])
    with pytest.raises(OutOfBlocksError, match="asked for 2, only 1"):
        m.append("a", [9, 9, 9, 9, 9])
    assert manager_state(m) == before
    m.fork("b", "b2")
    before = manager_state(m)
    with pytest.raises(OutOfBlocksError, match="decode step of 3"):
        m.append_batch(["a", "b", "b2"], [1, 2, 3])  # a fits in place, b and b2 each need a block
    assert manager_state(m) == before
    m.check_invariants()


def test_append_batch_matches_single_appends_and_vectorised_tables():
    rng = np.random.default_rng(0)
    m1 = SequenceManager(4000, block_size=16)
    m2 = SequenceManager(4000, block_size=16)
    ids = list(range(300))
    for i in ids:
        prompt = rng.integers(0, 50, int(rng.integers(1, 80))).tolist()
        m1.add(i, prompt)
        m2.add(i, prompt)
    for step in range(20):
        toks = rng.integers(0, 50, len(ids)).tolist()
        got = m1.append_batch(ids, toks).slot_mapping
        want = np.concatenate([m2.append(i, [t]).slot_mapping for i, t in zip(ids, toks, strict=True)])
        assert np.array_equal(got, want), step
    bt, lens = m1.block_tables(ids[::-1])
    for r, i in enumerate(ids[::-1]):
        blocks = m1.blocks_of(i)
        assert bt[r, : len(blocks)].tolist() == blocks and lens[r] == m1.num_tokens(i)
    m1.check_invariants()


def test_table_grows_rows_and_columns():
    m = SequenceManager(400, block_size=1)
    m.add("long", list(range(100)))  # 100 blocks: more columns than the initial table
    m.add("short", [1])
    for _ in range(70):  # column growth inside append_batch too
        m.append_batch(["short", "long"], [2, 3])
    for i in range(70):  # more rows than the initial table
        m.add(i, [i])
    bt, lens = m.block_tables(["long", "short", 69])
    assert bt.shape == (3, 170) and lens.tolist() == [170, 71, 1]
    assert bt[0].tolist() == m.blocks_of("long") and bt[1, :71].tolist() == m.blocks_of("short")
    m.check_invariants()


def test_sha256_hash_fn_and_no_caching_mode():
    m = SequenceManager(16, block_size=2, hash_fn=sha256_chain_hash)
    m.add("a", [1, 2, 3, 4, 5])
    assert m.add("b", [1, 2, 3, 4, 6]).num_cached_tokens == 4
    m = SequenceManager(16, block_size=2, enable_prefix_caching=False)
    m.add("a", [1, 2, 3, 4, 5])
    assert m.add("b", [1, 2, 3, 4, 6]).num_cached_tokens == 0
    assert m.pool.stats().prefix_queries == 0
    m.free("a")
    assert m.pool.stats().cached == 0  # nothing hashed: freed blocks go straight to the free list


# -- KVCache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_kv_cache_shapes_and_budget(layout):
    per = bytes_per_block(16, 2, 64, torch.float16, num_layers=3)
    assert per == 2 * 3 * 16 * 2 * 64 * 2
    c = KVCache(block_size=16, kv_heads=2, head_dim=64, layout=layout, dtype=torch.float16, device="cpu",
                num_layers=3, memory_bytes=per * 5 + per - 1)
    assert c.num_blocks == 5 and c.nbytes == per * 5
    shape = (5, 16, 2, 64) if layout == "NHD" else (5, 2, 16, 64)
    assert c.k.shape == (3, *shape) and c.v.shape == (3, *shape) and c.layer(1)[0].shape == shape
    m = c.sequence_manager()
    assert m.pool.num_blocks == 5 and m.block_size == 16
    assert blocks_for_budget(10 * per, 16, 2, 64, torch.float16, 3) == 10


def test_kv_cache_errors():
    kw = dict(block_size=16, kv_heads=2, head_dim=64, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="below one KV block"):
        KVCache(memory_bytes=100, **kw)
    with pytest.raises(ValueError, match="exactly one of"):
        KVCache(num_blocks=4, memory_bytes=10**6, **kw)
    with pytest.raises(ValueError, match="exactly one of"):
        KVCache(**kw)
    with pytest.raises(ValueError, match="memory_fraction needs a CUDA device"):
        KVCache(memory_fraction=0.5, **kw)
    with pytest.raises(ValueError, match="block_size=12"):
        KVCache(num_blocks=4, **{**kw, "block_size": 12})
    with pytest.raises(TypeError, match="dtype"):
        KVCache(num_blocks=4, **{**kw, "dtype": torch.float32})
    with pytest.raises(ValueError, match="layout"):
        KVCache(num_blocks=4, layout="NDH", **kw)


@pytest.mark.gpu
def test_kv_cache_memory_fraction_cuda():
    c = KVCache(block_size=16, kv_heads=8, head_dim=128, device="cuda", memory_fraction=0.01)
    free, _ = torch.cuda.mem_get_info()
    assert c.num_blocks >= 1 and c.nbytes <= 0.011 * (free + c.nbytes)


# -- the state machine --------------------------------------------------------------------------
SYSTEM_PROMPTS = [[7, 7, 1, 2, 3, 4, 5, 6, 7, 8], [9, 1, 9, 1, 9]]


class AllocatorMachine(RuleBasedStateMachine):
    """Random add / append / decode step / fork / free / raw allocate / lookup / misuse."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(6, 28), caching=st.booleans())
    def setup(self, block_size, num_blocks, caching):
        self.m = SequenceManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.pool = self.m.pool
        self.bs = block_size
        self.mem = np.full(num_blocks * block_size, -1, dtype=np.int64)  # shadow KV: token id per slot
        self.hist: dict[int, list[int]] = {}  # each running sequence's token history
        self.kv: dict[int, list[int]] = {}  # the KV id of each of its tokens
        self.extra: dict[int, object] = {}
        self.raw: list[int] = []  # blocks held directly through the pool
        self.next_id = 0
        self.finished: list[int] = []

    # -- helpers --
    def _expect_unchanged(self, fn, err):
        before = manager_state(self.m)
        with pytest.raises(err):
            fn()
        assert manager_state(self.m) == before, "a failed call changed the allocator state"

    @staticmethod
    def _kv_ids(prev: int | None, tokens, extra) -> list[int]:
        out = []
        for t in tokens:
            prev = hash((prev, t, extra))
            out.append(prev)
        return out

    def _extend(self, sid, tokens) -> list[int]:
        new = self._kv_ids(self.kv[sid][-1] if self.kv[sid] else None, tokens, self.extra[sid])
        self.hist[sid].extend(tokens)
        self.kv[sid].extend(new)
        return new

    def _write(self, slots, values):
        self.mem[np.asarray(slots, dtype=np.int64)] = values

    def _cow(self, pair):
        if pair is not None:
            event("copy-on-write")
            src, dst = pair
            bs = self.bs
            self.mem[dst * bs:(dst + 1) * bs] = self.mem[src * bs:(src + 1) * bs]

    # -- rules --
    @rule(sys=st.sampled_from([0, 1, None]), tail=st.lists(st.integers(0, 3), max_size=9),
          extra=st.sampled_from([None, "lora"]))
    def add(self, sys, tail, extra):
        prompt = (SYSTEM_PROMPTS[sys] if sys is not None else []) + tail
        sid = self.next_id
        self.next_id += 1
        try:
            r = self.m.add(sid, prompt, extra_key=extra)
        except OutOfBlocksError as exc:
            event("add: out of blocks")
            assert exc.asked > exc.available
            self.next_id -= 1
            self._expect_unchanged(lambda: self.m.add(sid, prompt, extra_key=extra), OutOfBlocksError)
            return
        assert r.num_cached_tokens % self.bs == 0 and r.num_cached_tokens < max(1, len(prompt))
        if r.num_cached_tokens:
            event("add: prefix hit")
        self.hist[sid], self.kv[sid], self.extra[sid] = [], [], extra
        kv = self._extend(sid, prompt)
        # reused blocks must already hold this prompt's KV
        cached = self.m.slots_of(sid, 0, r.num_cached_tokens)
        assert self.mem[cached].tolist() == kv[: r.num_cached_tokens]
        self._write(r.slot_mapping, kv[r.num_cached_tokens:])

    @precondition(lambda self: self.hist)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 3), min_size=0, max_size=9))
    def append(self, data, tokens):
        sid = data.draw(st.sampled_from(sorted(self.hist)))
        try:
            r = self.m.append(sid, tokens)
        except OutOfBlocksError:
            self._expect_unchanged(lambda: self.m.append(sid, tokens), OutOfBlocksError)
            return
        self._cow(r.cow)
        self._write(r.slot_mapping, self._extend(sid, tokens))

    def _one_at_a_time_fits(self, ids, toks) -> bool:
        """Whether appending toks[j] to ids[j] one call at a time fits (tried on a copy)."""
        trial = copy.deepcopy(self.m)
        try:
            for i, t in zip(ids, toks, strict=True):
                trial.append(i, [t])
        except OutOfBlocksError:
            return False
        return True

    def _step(self, ids, toks):
        """One append_batch; refused only when one-at-a-time appends would not fit either."""
        try:
            r = self.m.append_batch(ids, toks)
        except OutOfBlocksError:
            assert not self._one_at_a_time_fits(ids, toks), "append_batch refused a step that fits"
            self._expect_unchanged(lambda: self.m.append_batch(ids, toks), OutOfBlocksError)
            return
        for pair in r.cow:
            self._cow(pair)
        self._write(r.slot_mapping, [self._extend(i, [t])[0] for i, t in zip(ids, toks, strict=True)])

    @precondition(lambda self: self.hist)
    @rule(data=st.data())
    def decode_step(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.hist)), min_size=1, unique=True))
        toks = data.draw(st.lists(st.integers(0, 3), min_size=len(ids), max_size=len(ids)))
        self._step(ids, toks)

    @precondition(lambda self: self.hist)
    @rule(data=st.data(), n_children=st.integers(1, 3))
    def fork_then_decode_together(self, data, n_children):
        """Fork a sequence (parallel sampling, beam search) and append to all siblings in one step:
        they share the partly filled last block, so only all but one of them copy it."""
        parent = data.draw(st.sampled_from(sorted(self.hist)))
        family = [parent]
        for _ in range(n_children):
            child = self.next_id
            self.next_id += 1
            self.m.fork(parent, child)
            self.hist[child] = list(self.hist[parent])
            self.kv[child] = list(self.kv[parent])
            self.extra[child] = self.extra[parent]
            family.append(child)
        others = data.draw(st.lists(st.sampled_from(sorted(self.hist)), unique=True, max_size=3))
        ids = data.draw(st.permutations(family + [i for i in others if i not in family]))
        toks = data.draw(st.lists(st.integers(0, 3), min_size=len(ids), max_size=len(ids)))
        if self.m.num_tokens(parent) % self.bs:
            event("fork: siblings share a partly filled block in one step")
        self._step(ids, toks)

    @precondition(lambda self: self.hist)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.hist)))
        child = self.next_id
        self.next_id += 1
        self.m.fork(parent, child)
        self.hist[child] = list(self.hist[parent])
        self.kv[child] = list(self.kv[parent])
        self.extra[child] = self.extra[parent]

    @precondition(lambda self: self.hist)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.hist)))
        self.m.free(sid)
        del self.hist[sid], self.kv[sid], self.extra[sid]
        self.finished.append(sid)

    @rule(n=st.integers(0, 4))
    def raw_allocate(self, n):
        if not self.pool.can_allocate(n):
            self._expect_unchanged(lambda: self.pool.allocate(n), OutOfBlocksError)
            return
        got = self.pool.allocate(n)
        assert len(set(got)) == n
        self.mem[[b * self.bs + i for b in got for i in range(self.bs)]] = -1  # garbage in new memory
        self.raw.extend(got)

    @precondition(lambda self: self.raw)
    @rule(data=st.data())
    def raw_free(self, data):
        k = data.draw(st.integers(1, len(self.raw)))
        blocks, self.raw = self.raw[:k], self.raw[k:]
        self.pool.free(blocks)

    @rule(sys=st.sampled_from([0, 1]), extra=st.sampled_from([None, "lora"]))
    def lookup(self, sys, extra):
        prompt = SYSTEM_PROMPTS[sys]
        before = manager_state(self.m)
        found = self.pool.find_prefix(self.m.prompt_hashes(prompt, extra))
        assert manager_state(self.m) == before
        kv = self._kv_ids(None, prompt, extra)
        for i, b in enumerate(found):  # a cached block holds exactly the KV its hash names
            assert self.mem[b * self.bs:(b + 1) * self.bs].tolist() == kv[i * self.bs:(i + 1) * self.bs]

    @rule(data=st.data())
    def misuse(self, data):
        kind = data.draw(st.sampled_from(["append_finished", "free_finished", "free_unknown", "double_free",
                                          "free_not_an_int"]))
        if kind == "append_finished" and self.finished:
            self._expect_unchanged(lambda: self.m.append(self.finished[-1], [1]), AllocatorMisuseError)
        elif kind == "free_finished" and self.finished:
            self._expect_unchanged(lambda: self.m.free(self.finished[-1]), AllocatorMisuseError)
        elif kind == "free_unknown":
            self._expect_unchanged(lambda: self.pool.free([self.pool.num_blocks]), AllocatorMisuseError)
        elif kind == "free_not_an_int":
            bad = data.draw(st.sampled_from([True, False, 1.0, np.int64(0), "0", None]))
            self._expect_unchanged(lambda: self.pool.free([bad]), AllocatorMisuseError)
        else:
            unheld = [b for b in range(self.pool.num_blocks) if self.pool.ref_count(b) == 0]
            if unheld:
                self._expect_unchanged(lambda: self.pool.free([unheld[0]]), AllocatorMisuseError)

    # -- invariants, after every step --
    @invariant()
    def counts_match_holders(self):
        if not hasattr(self, "m"):
            return
        self.m.check_invariants()
        holders = np.zeros(self.pool.num_blocks, dtype=np.int64)
        for sid in self.hist:
            for b in self.m.blocks_of(sid):
                holders[b] += 1
        for b in self.raw:
            holders[b] += 1
        refs = np.array([self.pool.ref_count(b) for b in range(self.pool.num_blocks)])
        assert np.array_equal(refs, holders), "reference counts differ from the number of holders"
        free = [b for b in range(self.pool.num_blocks) if self.pool.is_free(b)]
        assert not any(holders[b] for b in free), "a block is both free and held"
        s = self.pool.stats()
        assert s.free + s.used + s.cached == self.pool.num_blocks
        assert s.used == int((holders > 0).sum()) and s.free == len(free)
        if s.evictions:
            event("evicted a cached block")

    @invariant()
    def every_sequence_reads_its_own_history(self):
        if not hasattr(self, "m"):
            return
        for sid, toks in self.hist.items():
            assert self.m.num_tokens(sid) == len(toks)
            assert self.mem[self.m.slots_of(sid)].tolist() == self.kv[sid], f"sequence {sid} reads someone else's KV"
        bt, lens = self.m.block_table_arrays(sorted(self.hist))
        for r, sid in enumerate(sorted(self.hist)):
            nb = len(self.m.blocks_of(sid))
            assert bt[r, :nb].tolist() == self.m.blocks_of(sid) and lens[r] == len(self.hist[sid])

    def teardown(self):
        if not hasattr(self, "m"):
            return
        for sid in list(self.hist):
            self.m.free(sid)
        self.pool.free(self.raw)
        s = self.pool.stats()
        assert s.used == 0 and s.free + s.cached == self.pool.num_blocks, "blocks leaked"
        assert len(self.m) == 0
        self.pool.check_invariants()


AllocatorMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_allocator_state_machine = AllocatorMachine.TestCase
