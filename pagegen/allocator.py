"""The KV block pool: reference counts, prefix caching by chained block hashes, LRU eviction.

Pure Python on purpose (no torch): it decides *which* physical blocks hold which tokens; the
kernels (kv_write, copy_blocks, decode, extend) move the bytes. Per-sequence bookkeeping and the
block-table tensors live in `pagegen.sequences`.

Every physical block id in [0, num_blocks) is in exactly one of three states:

    free     ref == 0, no hash         on the free stack; holds nothing anyone may read
    held     ref >= 1 (hash optional)  owned by `ref` holders (sequences, forks, raw callers)
    cached   ref == 0, has a hash      on the LRU list; its KV is valid and reusable by a prefix
                                       lookup, and reclaimable (evicted) when memory is needed

Invariants (checked by `check_invariants()`, kept by every public method; a method that raises
leaves every count, list and statistic exactly as it was):
  I1  free + held + cached == num_blocks, and the three sets are disjoint;
  I2  a block is on the free stack iff ref == 0 and it has no hash;
  I3  a block is on the LRU list iff ref == 0 and it has a hash;
  I4  hash -> block and block -> hash are inverse maps (a hash names at most one block);
  I5  ref[b] equals the number of holders of b (the callers' side of the contract: each holder
      frees exactly what it got from allocate / share / match_prefix / copy_on_write).

Data structures and why:
  * free stack: a Python list used LIFO. Allocation and free are O(1) (append/pop at the end), a
    free block is never removed from the middle (it is only ever asked for as "any free block"),
    and LIFO hands back the most recently used memory first.
  * cached LRU: an `OrderedDict` block -> hash. A prefix hit must pull a cached block out of the
    *middle* of the LRU order in O(1), and eviction pops the oldest in O(1). A `deque` cannot do
    the first (remove is O(n)); a hand-written intrusive doubly linked list of Python objects can,
    but every link update is interpreted bytecode. OrderedDict *is* an intrusive doubly linked list
    threaded through a hash table, implemented in C: O(1) `move_to_end`, `pop(key)` and
    `popitem(last=False)` at a fraction of the cost.
  * ref counts and hashes: flat Python lists indexed by block id (O(1), no per-block objects).

Eviction takes the least recently released cached block, and only when the free stack is empty,
so cached prefixes survive as long as possible.

Block hashes are chained: hash(block i) = f(hash(block i-1), token ids of block i, extra key), so
equal hashes mean equal whole prefixes (up to the hash function's collisions), and the extra key
(an adapter id, a multimodal digest, ...) keeps otherwise equal prefixes apart. `chain_hash` uses
Python's built-in 64-bit tuple hash (fast; ints hash identically in every process, str keys are
salted per process); `sha256_chain_hash` is collision-resistant for caches shared between tenants
who could craft colliding prompts. The pool treats a hash as an opaque hashable value.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

BlockHash = Hashable


class AllocatorError(Exception):
    """Base class of the allocator's errors."""


class OutOfBlocksError(AllocatorError, RuntimeError):
    """Not enough free + evictable blocks for a request. Nothing was changed.

    A capacity condition, not a bug: the caller may preempt a sequence, wait, or retry smaller.
    """

    def __init__(self, asked: int, available: int, what: str = "") -> None:
        self.asked = asked  # blocks the request needed
        self.available = available  # free + evictable cached blocks at the time
        where = f" for {what}" if what else ""
        super().__init__(
            f"out of KV blocks{where}: asked for {asked}, only {available} free or evictable; "
            "free finished sequences, preempt one, or size the pool larger"
        )


class AllocatorMisuseError(AllocatorError, ValueError):
    """The caller broke the contract (double free, unknown block or sequence, append to a
    finished sequence, ...). Nothing was changed; this is a bug in the caller."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of the pool's occupancy and counters."""

    num_blocks: int  # blocks in the pool
    used: int  # held blocks (ref >= 1)
    cached: int  # ref == 0 blocks kept for prefix reuse (evictable)
    free: int  # blocks on the free stack
    prefix_queries: int  # full blocks looked up by match_prefix
    prefix_hits: int  # of those, blocks found cached
    evictions: int  # cached blocks reclaimed for new allocations
    cow_copies: int  # copy-on-write block copies handed out

    @property
    def hit_rate(self) -> float:
        """prefix_hits / prefix_queries (0 when nothing was queried)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    @property
    def usage(self) -> float:
        """Fraction of blocks held."""
        return self.used / self.num_blocks


def chain_hash(parent: BlockHash | None, tokens: Sequence[int], extra: Hashable = None) -> int:
    """Hash of a full block from its parent's hash, its token ids and an optional extra key.

    Python's built-in 64-bit hash of the tuple: fast, and the same in every process for int keys.
    """
    return hash((parent, tuple(tokens), extra))


def sha256_chain_hash(parent: BlockHash | None, tokens: Sequence[int], extra: Hashable = None) -> bytes:
    """Collision-resistant chained block hash (32-byte sha256 digest); `extra` must have a stable repr."""
    h = hashlib.sha256()
    h.update(parent if isinstance(parent, bytes) else repr(parent).encode())
    h.update(b"|")
    h.update(",".join(map(str, tokens)).encode())
    h.update(b"|")
    h.update(repr(extra).encode())
    return h.digest()


class BlockPool:
    """`num_blocks` physical KV blocks with reference counts, a prefix cache and LRU eviction.

    O(1) per block for allocate, free, share, cache and match. See the module docstring for the
    states, invariants and data structures.
    """

    __slots__ = ("num_blocks", "_ref", "_hash", "_free", "_lru", "_by_hash",
                 "_queries", "_hits", "_evictions", "_cow")

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._ref: list[int] = [0] * num_blocks  # holders of each block
        self._hash: list[BlockHash | None] = [None] * num_blocks  # content hash of full, cached blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # LIFO stack; block 0 is popped first
        self._lru: OrderedDict[int, BlockHash] = OrderedDict()  # cached ref-0 blocks, oldest first
        self._by_hash: dict[BlockHash, int] = {}  # hash -> block holding that prefix
        self._queries = 0
        self._hits = 0
        self._evictions = 0
        self._cow = 0

    # -- queries --------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks on the free stack."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """ref-0 blocks kept for prefix reuse (evictable)."""
        return len(self._lru)

    @property
    def num_used(self) -> int:
        """Held blocks (ref >= 1)."""
        return self.num_blocks - len(self._free) - len(self._lru)

    @property
    def num_allocatable(self) -> int:
        """Blocks an allocate() could hand out now: free + evictable."""
        return len(self._free) + len(self._lru)

    def can_allocate(self, n: int) -> bool:
        """Whether allocate(n) would succeed now."""
        return n <= len(self._free) + len(self._lru)

    def ref_count(self, block: int) -> int:
        """Holders of `block`."""
        self._check_id(block)
        return self._ref[block]

    def block_hash(self, block: int) -> BlockHash | None:
        """The hash `block` is cached under, or None."""
        self._check_id(block)
        return self._hash[block]

    def is_free(self, block: int) -> bool:
        self._check_id(block)
        return self._ref[block] == 0 and self._hash[block] is None

    def is_cached(self, block: int) -> bool:
        """True for a ref-0 block kept for prefix reuse."""
        self._check_id(block)
        return self._ref[block] == 0 and self._hash[block] is not None

    def stats(self) -> PoolStats:
        """Occupancy and counters now."""
        return PoolStats(self.num_blocks, self.num_used, len(self._lru), len(self._free),
                         self._queries, self._hits, self._evictions, self._cow)

    # -- allocation -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """`n` blocks with ref 1, all or nothing: free ones first, then the least recently released
        cached ones (evicting their hashes). Raises OutOfBlocksError (nothing changed)."""
        if type(n) is not int or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        free = self._free
        if n > len(free) + len(self._lru):
            raise OutOfBlocksError(n, len(free) + len(self._lru))
        ref = self._ref
        if n <= len(free):
            if n == 1:  # the decode-step fast path
                b = free.pop()
                ref[b] = 1
                return [b]
            out = free[len(free) - n:]
            del free[len(free) - n:]
            out.reverse()
        else:
            out = free[::-1]
            free.clear()
            for _ in range(n - len(out)):
                out.append(self._evict())
        for b in out:
            ref[b] = 1
        return out

    def allocate_one(self) -> int:
        """One block with ref 1 (see allocate)."""
        free = self._free
        if free:
            b = free.pop()
        elif self._lru:
            b = self._evict()
        else:
            raise OutOfBlocksError(1, 0)
        self._ref[b] = 1
        return b

    def _evict(self) -> int:
        b, h = self._lru.popitem(last=False)
        del self._by_hash[h]
        self._hash[b] = None
        self._evictions += 1
        return b

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block (a block may appear as often as the caller holds it).

        A block whose count reaches 0 goes to the cached LRU list (most recent end) if it has a
        hash, else to the free stack. Pass a sequence's blocks tail first so its tail is evicted
        before its (more shareable) head. Raises AllocatorMisuseError for an unknown block (ids are
        plain ints: not bools, floats or numpy scalars) or a double free, before changing anything.
        """
        blocks = list(blocks)
        ref = self._ref
        n = self.num_blocks
        for b in blocks:
            if not (type(b) is int and 0 <= b < n):
                raise AllocatorMisuseError(f"free: unknown block {b!r}; block ids are ints in [0, {n})")
            if ref[b] == 0:
                state = "cached" if self._hash[b] is not None else "free"
                raise AllocatorMisuseError(f"free: block {b} is not held (it is {state}): double free")
        if len(set(blocks)) != len(blocks):
            counts: dict[int, int] = {}
            for b in blocks:
                counts[b] = counts.get(b, 0) + 1
            for b, c in counts.items():
                if c > ref[b]:
                    raise AllocatorMisuseError(f"free: block {b} given {c} times but held {ref[b]} times: double free")
        hashes = self._hash
        for b in blocks:
            r = ref[b] - 1
            ref[b] = r
            if r == 0:
                h = hashes[b]
                if h is None:
                    self._free.append(b)
                else:
                    self._lru[b] = h

    def share(self, blocks: Iterable[int]) -> None:
        """Add one reference to each held block (fork). Raises AllocatorMisuseError, nothing
        changed, if a block is unknown or not held."""
        blocks = list(blocks)
        ref = self._ref
        for b in blocks:
            self._check_id(b)
            if ref[b] == 0:
                raise AllocatorMisuseError(f"share: block {b} is not held; only held blocks can be shared")
        for b in blocks:
            ref[b] += 1

    def copy_on_write(self, block: int) -> tuple[int, int] | None:
        """Prepare to write into held `block` for one of its holders.

        If the caller is its only holder: None (write in place). Otherwise a fresh block `dst` is
        allocated for the caller, the caller's reference to `block` is dropped, and (block, dst) is
        returned: the caller must copy the block's KV to dst (copy_blocks) before writing. Raises
        OutOfBlocksError / AllocatorMisuseError with nothing changed.
        """
        self._check_id(block)
        if self._ref[block] == 0:
            raise AllocatorMisuseError(f"copy_on_write: block {block} is not held")
        if self._ref[block] == 1:
            return None
        dst = self.allocate_one()
        self._ref[block] -= 1  # >= 1: the other holders keep it
        self._cow += 1
        return block, dst

    # -- prefix cache ---------------------------------------------------------------------
    def cache_block(self, block: int, block_hash: BlockHash) -> bool:
        """Register the held, full `block` as holding the prefix named `block_hash`.

        Returns True if registered (or already registered under this hash); False if another block
        already holds that prefix (this one then stays uncached and is freed normally) or this block
        already carries a different hash. Raises AllocatorMisuseError if the block is not held.
        """
        self._check_id(block)
        if self._ref[block] == 0:
            raise AllocatorMisuseError(f"cache_block: block {block} is not held")
        if block_hash is None:
            raise ValueError("cache_block: block_hash must not be None")
        current = self._hash[block]
        if current is not None:
            return current == block_hash
        if block_hash in self._by_hash:
            return False
        self._hash[block] = block_hash
        self._by_hash[block_hash] = block
        return True

    def find_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Blocks caching the longest prefix of `hashes` (a chain, first block first). No side
        effects: nothing is acquired and no statistic moves."""
        out = []
        by_hash = self._by_hash
        for h in hashes:
            b = by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def match_prefix(self, hashes: Sequence[BlockHash]) -> list[int]:
        """Acquire (ref + 1) the blocks caching the longest prefix of `hashes` and return them.

        Cached ref-0 blocks leave the LRU list. Counts len(hashes) queries and len(result) hits.
        """
        out = self.find_prefix(hashes)
        self.acquire_cached(out, queried=len(hashes))
        return out

    def acquire_cached(self, blocks: Sequence[int], queried: int | None = None) -> None:
        """Take a reference to blocks found by find_prefix (they must carry a hash), counting
        `queried` lookups (default len(blocks)) and len(blocks) hits."""
        ref = self._ref
        for b in blocks:
            self._check_id(b)
            if self._hash[b] is None:
                raise AllocatorMisuseError(f"acquire_cached: block {b} is not cached")
        lru = self._lru
        for b in blocks:
            if ref[b] == 0:
                del lru[b]
            ref[b] += 1
        self._queries += len(blocks) if queried is None else queried
        self._hits += len(blocks)

    def evictable_among(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` are cached ref-0 blocks (acquiring them shrinks num_allocatable)."""
        ref = self._ref
        return sum(1 for b in set(blocks) if ref[b] == 0)

    def reset_prefix_cache(self) -> int:
        """Drop every cached ref-0 block to the free stack and forget all hashes; returns how many
        blocks were freed. Held blocks keep their data but lose their hash."""
        n = len(self._lru)
        for b in self._lru:
            self._free.append(b)
        self._lru.clear()
        self._by_hash.clear()
        self._hash = [None] * self.num_blocks
        return n

    # -- checks ---------------------------------------------------------------------------
    def _check_id(self, b: object) -> None:
        # type(b) is int: True is an int (and would free block 1, then sit on the free stack)
        if not (type(b) is int and 0 <= b < self.num_blocks):
            raise AllocatorMisuseError(f"unknown block {b!r}; block ids are ints in [0, {self.num_blocks})")

    def check_invariants(self) -> None:
        """Assert I1-I4 of the module docstring (O(num_blocks); for tests and debugging)."""
        n = self.num_blocks
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free stack twice"
        lru = set(self._lru)
        assert not free & lru, f"blocks both free and cached: {sorted(free & lru)[:8]}"
        held = {b for b in range(n) if self._ref[b] > 0}
        assert not held & free, f"blocks both held and free: {sorted(held & free)[:8]}"
        assert not held & lru, f"blocks both held and cached: {sorted(held & lru)[:8]}"
        assert len(free) + len(lru) + len(held) == n, (
            f"free {len(free)} + cached {len(lru)} + held {len(held)} != num_blocks {n}")
        for b in range(n):
            r, h = self._ref[b], self._hash[b]
            assert r >= 0, f"block {b} has ref {r}"
            if r == 0:
                assert (b in free) == (h is None), f"block {b}: ref 0, hash {h!r}, on free stack: {b in free}"
                assert (b in lru) == (h is not None), f"block {b}: ref 0, hash {h!r}, on LRU: {b in lru}"
            if h is not None:
                assert self._by_hash.get(h) == b, f"block {b} has hash {h!r} but the map says {self._by_hash.get(h)}"
                if r == 0:
                    assert self._lru[b] == h
        for h, b in self._by_hash.items():
            assert self._hash[b] == h, f"hash map {h!r} -> {b} but block {b} has hash {self._hash[b]!r}"

    def snapshot(self) -> tuple:
        """A deep, comparable copy of the whole state (tests: 'an error changed nothing')."""
        return (tuple(self._ref), tuple(self._hash), tuple(self._free), tuple(self._lru.items()),
                tuple(sorted(self._by_hash.items(), key=lambda kv: kv[1])),
                self._queries, self._hits, self._evictions, self._cow)
