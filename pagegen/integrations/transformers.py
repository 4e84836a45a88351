"""pagegen as the attention of Hugging Face transformers' continuous batching (`generate_batch`).

    import pagegen.integrations.transformers as pg_hf
    pg_hf.register()                                   # adds "paged|pagegen" to transformers' AttentionInterface
    model.set_attn_implementation("paged|pagegen")     # or from_pretrained(..., attn_implementation="paged|pagegen")
    outputs = model.generate_batch(prompts, generation_config=...)

The route: transformers (5.17 tested; 5.22 and later refuse it, see register()) looks
attention functions up by name in `AttentionInterface`; its continuous-batching manager calls the
function named `paged|<x>` once per layer with packed inputs and per-step metadata as keyword
arguments: `cache` (its PagedAttentionCache), `cu_seq_lens_q`/`cu_seq_lens_k` [B + 1] int32,
`max_seqlen_q`/`max_seqlen_k` (host ints), and per layer group `write_index` [total_q] and
`read_index` [sum of seq_lens] int64 slot lists (slot = block * block_size + offset; the read list is
empty when no sequence has cached tokens yet). An implementation not named `paged|eager`/`paged|sdpa`
gets no dense attention mask, so none is built or stored.

What is read in place and what is translated:
- the pool: each layer's cache tensor [(num_blocks + 2) * block_size, Hkv, D] is, viewed as
  [num_blocks + 2, block_size, Hkv, D], exactly pagegen's NHD pool, so fp16/bf16 models write into it
  (pagegen.kv_write at `write_index`) and attend from it (paged_extend / paged_decode) in place;
- the block tables: transformers hands slot lists, not block tables. A sequence's slots come in
  position order and start each block at a block boundary, so its block table is the slot list
  sampled every block_size entries, divided by block_size: a gather on the device at the first layer
  of every forward (shared by the others), no host sync, so it is recorded when transformers
  captures the step in a CUDA graph. Its width comes from the host bound max_seqlen_k;
- fp32 models: pagegen's kernels are fp16/bf16, so for an fp32 cache the adapter keeps an fp16
  copy of each layer's pool (same block ids) and attends from it, writing every new token into
  both; the output is cast back to fp32. Forked requests (num_return_sequences > 1) copy blocks
  only in transformers' pool, so the fp32 path does not support them (fp16/bf16 models do).
Sliding-window layers, attention sinks and soft-capping are refused with a message (not wired).
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from pagegen.decode import paged_decode
from pagegen.extend import paged_extend
from pagegen.kv_ops import kv_write

NAME = "paged|pagegen"
TESTED_VERSIONS = ">=5.17,<5.18"  # the range tests/test_transformers.py passes on (pyproject's dev extra pins it)
_TESTED = (5, 17)
# Seen failing: 5.22.2 strips the `paged|` prefix from custom names (then finds no "pagegen"); 5.24.0
# accepts only eager, sdpa and flash for continuous batching and keeps the cache in one byte tensor.
_FIRST_UNSUPPORTED = (5, 22)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _version(v: str) -> tuple[int, int]:
    major, minor = (v.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def register(name: str = NAME) -> str:
    """Register pagegen's attention in transformers' AttentionInterface under `name` (it must start
    with "paged|", the prefix transformers' continuous batching looks for) and return the name.
    Idempotent. Raises ImportError without transformers, RuntimeError on a transformers version
    whose continuous batching has no `paged|` route (5.22 on); warns on versions other than 5.17."""
    try:
        import transformers
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(f"pagegen.integrations.transformers needs transformers ({TESTED_VERSIONS}): "
                          f'pip install "transformers{TESTED_VERSIONS}"') from exc
    if not name.startswith("paged|"):
        raise ValueError(f"name={name!r} must start with 'paged|' (transformers' continuous batching passes its "
                         "paged cache only to implementations named paged|<x>)")
    version = _version(transformers.__version__)
    if version >= _FIRST_UNSUPPORTED:
        raise RuntimeError(
            f"transformers {transformers.__version__} is not supported: its continuous batching no longer passes "
            f"the paged cache to custom `paged|<x>` implementations; install transformers{TESTED_VERSIONS}"
        )
    if version != _TESTED:
        warnings.warn(f"pagegen's transformers adapter was tested with transformers{TESTED_VERSIONS}, not "
                      f"{transformers.__version__}: check tokens against paged|sdpa before relying on it",
                      stacklevel=2)
    AttentionInterface.register(name, pagegen_paged_attention)
    return name


@dataclass
class _StepMeta:
    """What every layer of one forward step shares: derived once, on the device."""

    key: Any  # the step's read_index list object (a new list every step; held so its id is not reused)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, cached tokens per sequence including this step's
    max_blocks: int


@dataclass
class _CacheState:
    """pagegen's per-cache state: the step metadata and, for fp32 caches, the fp16 pool copies."""

    step: _StepMeta | None = None
    shadow: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state(cache: Any) -> _CacheState:
    st = _states.get(cache)
    if st is None:
        st = _states[cache] = _CacheState()
    return st


def block_tables_from_slots(slots: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int,
                            max_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables from per-token slot lists, on the device (no sync).

    slots: [N] int64, sequence b's tokens at slots[cu_seqlens[b]:cu_seqlens[b+1]] in position order
    (slot = block * block_size + offset, position p of the sequence in block p // block_size);
    cu_seqlens: [B + 1] int32. Returns (block_tables [B, max_blocks] int32, seq_lens [B] int32);
    entries past a sequence's last block are 0.
    """
    starts = cu_seqlens[:-1].long()
    seq_lens = (cu_seqlens[1:] - cu_seqlens[:-1]).int()
    offsets = torch.arange(max_blocks, device=slots.device, dtype=torch.long) * block_size  # [max_blocks]
    used = offsets[None, :] < seq_lens[:, None]  # [B, max_blocks]
    idx = torch.where(used, starts[:, None] + offsets[None, :], 0)
    if slots.numel() == 0:
        return torch.zeros(idx.shape, dtype=torch.int32, device=slots.device), seq_lens
    tables = torch.where(used, slots[idx] // block_size, 0).int()
    return tables, seq_lens


def _step_meta(st: _CacheState, cache: Any, layer: int, group: int, kwargs: dict) -> _StepMeta:
    """The step's block tables and lengths: computed by the model's first layer, reused by the others.
    Recomputed at the first layer of every forward even with the same kwargs: transformers runs a
    forward eagerly and then again under CUDA-graph capture with the same kwargs, and the capture must
    record the derivation (replays see new contents in the same buffers)."""
    read_list = kwargs["read_index"]
    if st.step is not None and st.step.key is read_list and layer != min(cache.layer_index_to_group_indices):
        return st.step
    cu_k = kwargs["cu_seq_lens_k"]
    if isinstance(cu_k, dict):
        cu_k = cu_k["full_attention"]
    max_k = kwargs.get("max_seqlen_k", kwargs.get("max_length_k"))
    if isinstance(max_k, dict):
        max_k = max_k["full_attention"]
    # With no cached tokens (every sequence starts here) transformers leaves read_index empty: the
    # write slots are then the whole sequences, and cu_seq_lens_k equals cu_seq_lens_q.
    slots = read_list[group] if read_list[group].numel() else kwargs["write_index"][group]
    max_blocks = max(1, math.ceil(int(max_k) / cache.block_size))
    tables, seq_lens = block_tables_from_slots(slots, cu_k, cache.block_size, max_blocks)
    st.step = _StepMeta(read_list, tables, seq_lens, max_blocks)
    return st.step


def _pools(st: _CacheState, cache: Any, layer_in_group: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k_pool, v_pool, is_shadow): NHD views of the layer's cache, or its fp16 copies for an fp32 cache."""
    shape = (-1, cache.block_size, cache.num_key_value_heads, cache.head_dim)
    k = cache.key_cache[layer_in_group].view(shape)
    v = cache.value_cache[layer_in_group].view(shape)
    if k.dtype in KERNEL_DTYPES:
        return k, v, False
    if k.dtype != torch.float32:
        raise TypeError(f"pagegen attention: the paged cache has dtype {k.dtype}; expected float16, bfloat16 "
                        "(read in place) or float32 (attended through an fp16 copy)")
    pools = st.shadow.get(layer_in_group)
    if pools is None or pools[0].shape != k.shape or pools[0].device != k.device:
        pools = st.shadow[layer_in_group] = (torch.zeros(k.shape, dtype=torch.float16, device=k.device),
                                             torch.zeros(k.shape, dtype=torch.float16, device=k.device))
    return pools[0], pools[1], True


def pagegen_paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (the `paged|<x>` contract of continuous batching).

    query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] for the T packed new tokens of the step; kwargs
    carry the paged cache and the step metadata (see the module docstring). Writes the new K/V into
    the cache at write_index, then attends: paged_decode when every sequence brings one token,
    paged_extend otherwise. Returns (out [1, T, Hq, D] in query's dtype, None).
    """
    cache = kwargs.get("cache")
    if cache is None:
        raise ValueError(f"{NAME} attention was called without a paged cache: it serves transformers' continuous "
                         "batching (generate_batch / init_continuous_batching) only; use sdpa for a plain forward")
    unwired = [name for name in ("sliding_window", "softcap", "s_aux")
               if getattr(module, name, None) is not None or kwargs.get(name) is not None]
    if unwired or hasattr(module, "sinks"):
        raise NotImplementedError(f"{NAME}: sliding-window, sink and soft-capped attention layers are not wired "
                                  f"into the transformers adapter yet (this layer has {unwired or ['sinks']}); "
                                  "use paged|sdpa for this model")
    if dropout:
        raise ValueError(f"{NAME} is an inference kernel; got dropout={dropout} (call model.eval())")
    st = _state(cache)
    group, layer_in_group = cache.layer_index_to_group_indices[module.layer_idx]
    meta = _step_meta(st, cache, module.layer_idx, group, kwargs)
    k_pool, v_pool, shadow = _pools(st, cache, layer_in_group)
    write_index = kwargs["write_index"][group]

    q = query[0].transpose(0, 1)  # [T, Hq, D] (strided view: last dim contiguous)
    k_new = key[0].transpose(0, 1)  # [T, Hkv, D]
    v_new = value[0].transpose(0, 1)
    if shadow:  # keep transformers' fp32 pool current too (its forking and offloading read it)
        cache.key_cache[layer_in_group].index_copy_(0, write_index, k_new)
        cache.value_cache[layer_in_group].index_copy_(0, write_index, v_new)
        q, k_new, v_new = q.half(), k_new.half(), v_new.half()
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv_write(k_new, v_new, k_pool, v_pool, write_index)

    cu_q = kwargs["cu_seq_lens_q"]
    max_q = int(kwargs.get("max_seqlen_q", kwargs.get("max_length_q", q.shape[0])))
    max_seq = meta.max_blocks * cache.block_size
    if max_q == 1 and q.shape[0] == meta.seq_lens.shape[0]:  # one token a sequence: the decode kernel
        out = paged_decode(q, k_pool, v_pool, meta.block_tables, meta.seq_lens, scale=scaling, max_seq_len=max_seq)
    else:
        out = paged_extend(q, k_pool, v_pool, meta.block_tables, cu_q, meta.seq_lens, scale=scaling,
                           max_q_len=min(max(max_q, 1), q.shape[0]), max_seq_len=max_seq)
    return out.to(query.dtype).unsqueeze(0), None


__all__ = ["NAME", "TESTED_VERSIONS", "block_tables_from_slots", "pagegen_paged_attention", "register"]
