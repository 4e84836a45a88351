"""pagegen's public ops registered with torch.library, so torch.compile can trace a model step
that calls them (fullgraph=True, no graph break) and capture it in CUDA graphs (mode="reduce-overhead").

Why the plain functions break a compiled graph: Dynamo traces into their Python bodies and meets
`codegen.load`'s `with threading.Lock()` ("Unsupported context manager"), the per-signature plan
dict and Triton's launcher, none of which it can trace. A custom op is opaque to Dynamo: the graph
holds one node whose shape comes from the fake implementation below, and the real implementation
(the eager op, dispatcher included) runs when the compiled graph runs, or once while a CUDA graph
is captured. Nothing in these ops reads a device tensor on the host (on CUDA), so capture is safe.

    import pagegen.torch_ops as ops
    out = ops.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, max_seq_len=4096)
    # the same ops, as the dispatcher sees them:
    torch.ops.pagegen.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, "NHD", None, 4096, None)

Contract (the op schemas): paged_decode and paged_extend are functional (they return a new output
and mutate nothing); kv_write and copy_blocks mutate k_cache and v_cache in place and return
nothing. Host-side hints (layout, scale, max_seq_len, sum_seq_lens, max_q_len) are non-tensor
arguments: torch.compile specialises on their values (a new value is a recompile), so pass bounds
that change rarely (e.g. the pool's capacity, or a bound rounded up to a power of two).

Adding an optional argument (e.g. a new attention feature): add it, type-annotated and defaulting
to None, to the op function and to its public wrapper below, and pass it through; the fake needs no
change because outputs keep q's shape. tests/test_torch_ops.py checks that every keyword argument
of the eager ops is either wired here or listed in NOT_WIRED.
"""

from __future__ import annotations

import torch

from pagegen import decode, extend, kv_ops, verify

# Keyword arguments of the eager ops that the registered ops deliberately do not take: `out`
# (the registered attention ops are functional), `config` (not a schema type; the dispatcher picks
# it inside the op), `validate` (it reads device tensors: a host sync inside a compiled region).
NOT_WIRED = frozenset({"out", "config", "validate"})


@torch.library.custom_op("pagegen::paged_decode", mutates_args=())
def _paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, layout: str, scale: float | None, max_seq_len: int | None,
                  sum_seq_lens: int | None, sliding_window: int | None = None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None,
                  alibi_slopes: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return decode.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, layout=layout, scale=scale,
                               max_seq_len=max_seq_len, sum_seq_lens=sum_seq_lens, sliding_window=sliding_window,
                               softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, k_scale=k_scale,
                               v_scale=v_scale)


@_paged_decode.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, layout, scale, max_seq_len, sum_seq_lens, *features):
    return torch.empty_like(q)


@torch.library.custom_op("pagegen::paged_extend", mutates_args=())
def _paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, layout: str, scale: float | None,
                  max_q_len: int | None, max_seq_len: int | None, sliding_window: int | None = None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None,
                  alibi_slopes: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return extend.paged_extend(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout=layout,
                               scale=scale, max_q_len=max_q_len, max_seq_len=max_seq_len,
                               sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                               k_scale=k_scale, v_scale=v_scale)


@_paged_extend.register_fake
def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout, scale, max_q_len, max_seq_len, *features):
    return torch.empty_like(q)


@torch.library.custom_op("pagegen::paged_verify", mutates_args=())
def _paged_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None, max_q_len: int | None, layout: str,
                  scale: float | None, max_seq_len: int | None, sum_seq_lens: int | None,
                  sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
                  alibi_slopes: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None) -> torch.Tensor:
    return verify.paged_verify(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q=cu_seqlens_q,
                               max_q_len=max_q_len, layout=layout, scale=scale, max_seq_len=max_seq_len,
                               sum_seq_lens=sum_seq_lens, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                               alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale)


@_paged_verify.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, layout, scale, max_seq_len, sum_seq_lens,
      *features):
    return torch.empty_like(q)


@torch.library.custom_op("pagegen::kv_write", mutates_args=("k_cache", "v_cache"))
def _kv_write(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor, layout: str, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None) -> None:
    kv_ops.kv_write(k_new, v_new, k_cache, v_cache, slot_mapping, layout=layout, k_scale=k_scale, v_scale=v_scale)


@_kv_write.register_fake
def _(k_new, v_new, k_cache, v_cache, slot_mapping, layout, k_scale=None, v_scale=None):
    return None


@torch.library.custom_op("pagegen::copy_blocks", mutates_args=("k_cache", "v_cache"))
def _copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_pairs: torch.Tensor, layout: str) -> None:
    kv_ops.copy_blocks(k_cache, v_cache, block_pairs, layout=layout)


@_copy_blocks.register_fake
def _(k_cache, v_cache, block_pairs, layout):
    return None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, layout: str = "NHD", scale: float | None = None,
                 max_seq_len: int | None = None, sum_seq_lens: int | None = None,
                 sliding_window: int | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """pagegen.paged_decode as a registered op: out [B, Hq, D] = decode attention of q [B, Hq, D]
    over the paged pools (see pagegen.decode.paged_decode for the shapes and hints; fp8 pools take
    k_scale/v_scale). Traceable by torch.compile; returns a new tensor (no `out=`); the dispatcher
    picks the config."""
    return torch.ops.pagegen.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, layout, scale, max_seq_len,
                                          sum_seq_lens, sliding_window, softcap, sinks, alibi_slopes, k_scale,
                                          v_scale)


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, layout: str = "NHD",
                 scale: float | None = None, max_q_len: int | None = None,
                 max_seq_len: int | None = None, sliding_window: int | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """pagegen.paged_extend as a registered op: out [total_q, Hq, D] = causal attention of the new
    tokens q [total_q, Hq, D] over their paged prefix and themselves (see pagegen.extend.paged_extend;
    fp8 pools take k_scale/v_scale). Traceable by torch.compile; returns a new tensor; the dispatcher
    picks the config."""
    return torch.ops.pagegen.paged_extend(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout, scale,
                                          max_q_len, max_seq_len, sliding_window, softcap, sinks, alibi_slopes,
                                          k_scale, v_scale)


def paged_verify(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, cu_seqlens_q: torch.Tensor | None = None, max_q_len: int | None = None,
                 layout: str = "NHD", scale: float | None = None, max_seq_len: int | None = None,
                 sum_seq_lens: int | None = None, sliding_window: int | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """pagegen.paged_verify as a registered op: out of q's shape ([B, q_len, Hq, D], or [total_q, Hq, D]
    with cu_seqlens_q) = causal attention of each sequence's few new tokens over its paged KV (see
    pagegen.verify.paged_verify). Traceable by torch.compile; returns a new tensor; the dispatcher
    picks the kernel (one-token decode, verify or extend) and the config."""
    return torch.ops.pagegen.paged_verify(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len, layout,
                                          scale, max_seq_len, sum_seq_lens, sliding_window, softcap, sinks,
                                          alibi_slopes, k_scale, v_scale)


def kv_write(k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, layout: str = "NHD", k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """pagegen.kv_write as a registered op: scatter k_new/v_new [T, Hkv, D] into the pools at
    slot_mapping [T] (negative slots skipped), in place; fp8 pools quantize with k_scale/v_scale
    (fp32 [1] or [Hkv], see pagegen.kv_ops.kv_write). Traceable by torch.compile."""
    torch.ops.pagegen.kv_write(k_new, v_new, k_cache, v_cache, slot_mapping, layout, k_scale, v_scale)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, block_pairs: torch.Tensor, *,
                layout: str = "NHD") -> None:
    """pagegen.copy_blocks as a registered op: pool[dst] = pool[src] for each row of block_pairs
    [P, 2], in place. Traceable by torch.compile."""
    torch.ops.pagegen.copy_blocks(k_cache, v_cache, block_pairs, layout)


__all__ = ["NOT_WIRED", "copy_blocks", "kv_write", "paged_decode", "paged_extend"]
