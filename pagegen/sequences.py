"""Per-sequence bookkeeping over a BlockPool: tokens -> slots, forks, copy-on-write, prefix reuse,
and the padded block-table / seq_lens tensors the kernels read.

A slot is `block * block_size + offset`: the physical place of one token's K/V in the pool (what
kv_write takes). Token i of a sequence lives at `blocks[i // block_size] * block_size + i %
block_size`.

Block tables are kept in a persistent int32 numpy array with one row per running sequence, updated
by one element write when a sequence gets a new block. Building a batch's tables is then one fancy
index (`table[rows, :width]`) in C, not a Python loop over B x width elements; the per-sequence
Python work of a decode step is the append itself.

Contract for prefix caching: a block is registered in the cache when it becomes full at append/add
time, i.e. before its KV is written. The caller must write the KV of every slot it was handed
(kv_write) before a kernel of a *later* step reads blocks another sequence got from the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pagegen.allocator import (
    AllocatorMisuseError,
    BlockHash,
    BlockPool,
    OutOfBlocksError,
    chain_hash,
)

HashFn = Callable[[BlockHash | None, Sequence[int], Hashable], BlockHash]


@dataclass(slots=True)
class SeqState:
    """One running sequence."""

    seq_id: Hashable  # the caller's id
    row: int  # row of this sequence in the manager's block-table array
    blocks: list[int]  # physical block ids in logical order
    tokens: list[int]  # token ids (kept only with prefix caching: full blocks are hashed from them)
    num_tokens: int  # tokens with a slot
    extra_key: Hashable = None  # mixed into every block hash (adapter id, ...)
    num_hashed: int = 0  # leading full blocks whose chained hash is known
    last_hash: BlockHash | None = None  # hash of block num_hashed - 1
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache at add()


@dataclass(slots=True)
class AddResult:
    """What add() did: the prompt tokens reused from the cache and the slots of the others."""

    num_cached_tokens: int  # leading prompt tokens whose KV is already in the pool (multiple of block_size)
    slot_mapping: np.ndarray  # int64 [len(prompt) - num_cached_tokens]: where to write the rest


@dataclass(slots=True)
class AppendResult:
    """What append() did: the new tokens' slots and the block copy to do first, if any."""

    slot_mapping: np.ndarray  # int64 [number of appended tokens]
    cow: tuple[int, int] | None = None  # (src, dst): copy src's KV to dst before writing the new tokens


@dataclass(slots=True)
class BatchAppendResult:
    """What append_batch() did for one token per sequence."""

    slot_mapping: np.ndarray  # int64 [B]
    cow: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) pairs to copy first


class SequenceManager:
    """Maps sequences' tokens to pool slots; owns a BlockPool (or uses the one given).

    num_blocks / pool: the pool size, or an existing pool. block_size: tokens a block.
    enable_prefix_caching: hash full blocks and reuse cached prefixes at add().
    hash_fn: chained block hash (default `chain_hash`; `sha256_chain_hash` resists collisions).
    """

    def __init__(self, num_blocks: int | None = None, block_size: int = 16, *, pool: BlockPool | None = None,
                 enable_prefix_caching: bool = True, hash_fn: HashFn = chain_hash,
                 max_finished_ids: int = 4096) -> None:
        if pool is None:
            if num_blocks is None:
                raise ValueError("give num_blocks or pool")
            pool = BlockPool(num_blocks)
        elif num_blocks is not None and num_blocks != pool.num_blocks:
            raise ValueError(f"num_blocks={num_blocks} but pool has {pool.num_blocks} blocks")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self._seqs: dict[Hashable, SeqState] = {}
        self._table = np.zeros((64, 64), dtype=np.int32)  # [row capacity, max blocks per seq]
        self._free_rows: list[int] = list(range(63, -1, -1))
        self._finished: OrderedDict[Hashable, None] = OrderedDict()  # recent ids, for better errors
        self._max_finished = max_finished_ids

    # -- queries --------------------------------------------------------------------------
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def seq(self, seq_id: Hashable) -> SeqState:
        """The state of a running sequence (read-only by convention)."""
        s = self._seqs.get(seq_id)
        if s is None:
            self._unknown(seq_id, "seq")
        return s

    def num_tokens(self, seq_id: Hashable) -> int:
        return self.seq(seq_id).num_tokens

    def blocks_of(self, seq_id: Hashable) -> list[int]:
        """A copy of the sequence's physical block ids, logical order."""
        return list(self.seq(seq_id).blocks)

    def slots_of(self, seq_id: Hashable, start: int = 0, end: int | None = None) -> np.ndarray:
        """int64 slots of tokens [start, end) of a sequence."""
        s = self.seq(seq_id)
        end = s.num_tokens if end is None else end
        if not 0 <= start <= end <= s.num_tokens:
            raise ValueError(f"token range [{start}, {end}) is outside [0, {s.num_tokens}] of sequence {seq_id!r}")
        return self._slots(s.blocks, start, end)

    def _unknown(self, seq_id: Hashable, op: str) -> None:
        if seq_id in self._finished:
            raise AllocatorMisuseError(f"{op}: sequence {seq_id!r} is finished (its blocks were freed)")
        raise AllocatorMisuseError(f"{op}: unknown sequence {seq_id!r}")

    # -- internals ------------------------------------------------------------------------
    def _slots(self, blocks: list[int], start: int, end: int) -> np.ndarray:
        bs = self.block_size
        if end - start <= 8:
            return np.array([blocks[i // bs] * bs + i % bs for i in range(start, end)], dtype=np.int64)
        first, last = start // bs, -(-end // bs)
        base = np.asarray(blocks[first:last], dtype=np.int64) * bs
        return (base[:, None] + np.arange(bs, dtype=np.int64)).ravel()[start - first * bs:end - first * bs]

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self._table.shape[0]
            self._table = np.concatenate([self._table, np.zeros_like(self._table)], axis=0)
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _ensure_cols(self, n: int) -> None:
        cols = self._table.shape[1]
        if n > cols:
            while cols < n:
                cols *= 2
            grown = np.zeros((self._table.shape[0], cols), dtype=np.int32)
            grown[:, : self._table.shape[1]] = self._table
            self._table = grown

    def _hash_full_blocks(self, s: SeqState) -> None:
        """Hash and register the blocks of `s` that became full (needs s.tokens)."""
        bs = self.block_size
        full = s.num_tokens // bs
        pool, fn, toks = self.pool, self.hash_fn, s.tokens
        h = s.last_hash
        for i in range(s.num_hashed, full):
            h = fn(h, toks[i * bs:(i + 1) * bs], s.extra_key)
            pool.cache_block(s.blocks[i], h)
        s.num_hashed = full
        s.last_hash = h

    def prompt_hashes(self, prompt: Sequence[int], extra_key: Hashable = None, limit: int | None = None) -> list:
        """Chained hashes of the full blocks of `prompt` (at most `limit` blocks)."""
        bs = self.block_size
        n = len(prompt) // bs if limit is None else min(limit, len(prompt) // bs)
        out, h, fn = [], None, self.hash_fn
        for i in range(n):
            h = fn(h, prompt[i * bs:(i + 1) * bs], extra_key)
            out.append(h)
        return out

    # -- mutations ------------------------------------------------------------------------
    def add(self, seq_id: Hashable, prompt: Sequence[int], *, extra_key: Hashable = None) -> AddResult:
        """Start a sequence with `prompt` token ids; reuse the longest cached prefix of full blocks.

        At most the full blocks before the prompt's last token are reused, so at least one token is
        left to compute (its logits are needed). Returns the number of reused tokens and the slots
        of the remaining prompt tokens. All or nothing: raises OutOfBlocksError (nothing changed)
        or AllocatorMisuseError for an id already running.
        """
        if seq_id in self._seqs:
            raise AllocatorMisuseError(f"add: sequence {seq_id!r} is already running")
        prompt = list(prompt)
        n = len(prompt)
        bs = self.block_size
        pool = self.pool
        hashes: list = []
        cached: list[int] = []
        if self.enable_prefix_caching and n > bs:
            hashes = self.prompt_hashes(prompt, extra_key, limit=(n - 1) // bs)
            cached = pool.find_prefix(hashes)
        need = -(-n // bs) - len(cached)
        available = pool.num_allocatable - pool.evictable_among(cached)
        if need > available:
            raise OutOfBlocksError(need, available, f"prompt of {n} tokens of sequence {seq_id!r}")
        if hashes:
            pool.acquire_cached(cached, queried=len(hashes))
        blocks = cached + pool.allocate(need)
        row = self._take_row()
        self._ensure_cols(len(blocks))
        self._table[row, : len(blocks)] = blocks
        for i in range(len(cached), len(hashes)):  # full prompt blocks computed here: cache them
            pool.cache_block(blocks[i], hashes[i])
        s = SeqState(seq_id, row, blocks, prompt if self.enable_prefix_caching else [], n, extra_key,
                     num_hashed=len(hashes), last_hash=hashes[-1] if hashes else None,
                     num_cached_tokens=len(cached) * bs)
        self._seqs[seq_id] = s
        self._finished.pop(seq_id, None)
        if self.enable_prefix_caching:
            self._hash_full_blocks(s)
        return AddResult(s.num_cached_tokens, self._slots(blocks, s.num_cached_tokens, n))

    def append(self, seq_id: Hashable, tokens: Sequence[int]) -> AppendResult:
        """Append token ids to a running sequence; returns their slots and a (src, dst) block copy
        when the last block was shared (copy-on-write; copy before writing). All or nothing."""
        s = self._seqs.get(seq_id)
        if s is None:
            self._unknown(seq_id, "append")
        k = len(tokens)
        bs = self.block_size
        pool = self.pool
        n = s.num_tokens
        off = n % bs
        shared = off != 0 and pool._ref[s.blocks[-1]] > 1
        grow = -(-(n + k) // bs) - len(s.blocks)
        need = grow + (1 if shared and k else 0)
        if need > pool.num_allocatable:
            raise OutOfBlocksError(need, pool.num_allocatable, f"appending {k} tokens to sequence {seq_id!r}")
        cow = None
        if shared and k:
            cow = pool.copy_on_write(s.blocks[-1])
            s.blocks[-1] = cow[1]
            self._table[s.row, len(s.blocks) - 1] = cow[1]
        if grow:
            new = pool.allocate(grow)
            nb = len(s.blocks)
            s.blocks.extend(new)
            self._ensure_cols(len(s.blocks))
            self._table[s.row, nb: nb + grow] = new
        s.num_tokens = n + k
        if self.enable_prefix_caching:
            s.tokens.extend(tokens)
            if (n + k) // bs > s.num_hashed:
                self._hash_full_blocks(s)
        return AppendResult(self._slots(s.blocks, n, n + k), cow)

    def append_batch(self, seq_ids: Sequence[Hashable], tokens: Sequence[int]) -> BatchAppendResult:
        """Append one token to each sequence (a decode step). All or nothing across the batch.

        seq_ids: B distinct running ids; tokens: B token ids. Returns the B slots (int64) and the
        copy-on-write pairs to copy before writing.
        """
        b = len(seq_ids)
        if len(tokens) != b:
            raise ValueError(f"tokens has {len(tokens)} entries but seq_ids has {b}")
        seqs = self._seqs
        try:
            states = [seqs[i] for i in seq_ids]
        except KeyError as exc:
            self._unknown(exc.args[0], "append_batch")
        if len({s.row for s in states}) != b:
            raise AllocatorMisuseError("append_batch: a sequence appears twice in seq_ids")
        pool = self.pool
        bs = self.block_size
        ref = pool._ref
        if pool.num_allocatable < b:  # maybe short: count exactly before changing anything
            need = 0
            sharers: dict[int, int] = {}  # shared, partly filled last block -> sequences here appending into it
            for s in states:
                if s.num_tokens % bs == 0:
                    need += 1
                elif ref[s.blocks[-1]] > 1:
                    sharers[s.blocks[-1]] = sharers.get(s.blocks[-1], 0) + 1
            # each copy-on-write drops one reference to the shared block, so once the other holders
            # have copied, the last one writes in place: k of its r holders copy min(k, r - 1) times
            need += sum(min(k, ref[blk] - 1) for blk, k in sharers.items())
            if need > pool.num_allocatable:
                raise OutOfBlocksError(need, pool.num_allocatable, f"a decode step of {b} sequences")
        caching = self.enable_prefix_caching
        table = self._table
        slots = [0] * b
        cow: list[tuple[int, int]] = []
        for j, s in enumerate(states):
            n = s.num_tokens
            off = n % bs
            blocks = s.blocks
            if off == 0:
                nb = len(blocks)
                blk = pool.allocate_one()
                blocks.append(blk)
                if nb >= table.shape[1]:
                    self._ensure_cols(nb + 1)
                    table = self._table
                table[s.row, nb] = blk
            else:
                blk = blocks[-1]
                if ref[blk] > 1:
                    pair = pool.copy_on_write(blk)
                    cow.append(pair)
                    blk = pair[1]
                    blocks[-1] = blk
                    table[s.row, len(blocks) - 1] = blk
            slots[j] = blk * bs + off
            s.num_tokens = n + 1
            if caching:
                s.tokens.append(tokens[j])
                if off == bs - 1:
                    self._hash_full_blocks(s)
        return BatchAppendResult(np.array(slots, dtype=np.int64), cow)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Start `child_id` as a copy of running `parent_id` sharing all its blocks (refs + 1).
        The first append to either into a shared, partly filled block copies it (copy-on-write)."""
        p = self._seqs.get(parent_id)
        if p is None:
            self._unknown(parent_id, "fork")
        if child_id in self._seqs:
            raise AllocatorMisuseError(f"fork: sequence {child_id!r} is already running")
        self.pool.share(p.blocks)
        row = self._take_row()
        nb = len(p.blocks)
        self._table[row, :nb] = self._table[p.row, :nb]
        self._seqs[child_id] = SeqState(child_id, row, list(p.blocks), list(p.tokens), p.num_tokens, p.extra_key,
                                        p.num_hashed, p.last_hash, p.num_cached_tokens)
        self._finished.pop(child_id, None)

    def free(self, seq_id: Hashable) -> None:
        """Finish a sequence: release its blocks (tail first, so cached tails are evicted before
        shared heads). Raises AllocatorMisuseError for an unknown or already finished id."""
        s = self._seqs.get(seq_id)
        if s is None:
            self._unknown(seq_id, "free")
        self.pool.free(reversed(s.blocks))
        del self._seqs[seq_id]
        self._free_rows.append(s.row)
        self._finished[seq_id] = None
        if len(self._finished) > self._max_finished:
            self._finished.popitem(last=False)

    # -- kernel inputs --------------------------------------------------------------------
    def block_table_arrays(self, seq_ids: Sequence[Hashable], *, width: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
        """(block_tables int32 [B, W], seq_lens int32 [B]) as numpy arrays.

        W = `width` or the most blocks any of the sequences holds (at least 1). Entries past a
        sequence's blocks are padding (kernels never read them: they mask by seq_len).
        """
        seqs = self._seqs
        try:
            states = [seqs[i] for i in seq_ids]
        except KeyError as exc:
            self._unknown(exc.args[0], "block_tables")
        b = len(states)
        rows = np.fromiter((s.row for s in states), dtype=np.intp, count=b)
        lens = np.fromiter((s.num_tokens for s in states), dtype=np.int32, count=b)
        need = -(-int(lens.max()) // self.block_size) if b else 0
        w = max(1, need) if width is None else width
        if w < need:
            raise ValueError(f"width={width} is narrower than the longest sequence's {need} blocks")
        table = self._table
        if w <= table.shape[1]:
            bt = table[rows, :w]
        else:
            bt = np.zeros((b, w), dtype=np.int32)
            bt[:, : table.shape[1]] = table[rows]
        return bt, lens

    def block_tables(self, seq_ids: Sequence[Hashable], *, device=None, width: int | None = None):
        """(block_tables torch.int32 [B, W], seq_lens torch.int32 [B]) for the kernels, on `device`.

        See block_table_arrays; padding entries hold stale block ids or 0, never read by kernels.
        """
        import torch

        bt, lens = self.block_table_arrays(seq_ids, width=width)
        bt_t, lens_t = torch.from_numpy(bt), torch.from_numpy(lens)
        if device is not None and torch.device(device).type != "cpu":
            bt_t = bt_t.pin_memory().to(device, non_blocking=True)
            lens_t = lens_t.pin_memory().to(device, non_blocking=True)
        return bt_t, lens_t

    # -- checks ---------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Pool invariants, plus: every block of every sequence is held, the table rows match the
        block lists, and each sequence has exactly the blocks its tokens need."""
        self.pool.check_invariants()
        bs = self.block_size
        rows = set()
        for s in self._seqs.values():
            assert s.row not in rows, f"row {s.row} used twice"
            rows.add(s.row)
            assert len(s.blocks) == -(-s.num_tokens // bs), (
                f"sequence {s.seq_id!r}: {len(s.blocks)} blocks for {s.num_tokens} tokens")
            for b in s.blocks:
                assert self.pool._ref[b] > 0, f"sequence {s.seq_id!r} holds block {b} with ref 0"
            assert list(self._table[s.row, : len(s.blocks)]) == s.blocks, f"table row of {s.seq_id!r} is stale"
        assert not rows & set(self._free_rows), "a running sequence's row is on the free-row list"
