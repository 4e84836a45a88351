"""The public paged-decode op: validate, pick the config, launch the cached kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from pagegen import codegen
from pagegen._checks import (
    LOG2E,
    attention_spec,
    check_capacity,
    check_config,
    check_length_hints,
    check_like,
    check_out,
    check_scale,
    ctx_bound,
    kv_strides,
    signature,
    strided_metadata,
    upcast_dots,
)
from pagegen.dispatch import is_ragged, select_config
from pagegen.features import NO_FEATURES, Features, call_features
from pagegen.kv_ops import scale_args
from pagegen.runtime import RUNTIME
from pagegen.spec import Config, KernelSpec, next_pow2

__all__ = ["DecodePlan", "check_capacity", "decode_spec", "launch_decode", "paged_decode"]


def decode_spec(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, layout: str, features: Features = NO_FEATURES) -> KernelSpec:
    """Validate the decode inputs (cheap checks, no GPU sync) and return the KernelSpec they need."""
    if isinstance(q, torch.Tensor) and isinstance(seq_lens, torch.Tensor) and q.dim() == 3 and seq_lens.dim() == 1:
        if seq_lens.shape[0] != q.shape[0]:
            raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries but q has batch {q.shape[0]}")
    return attention_spec("decode", q, k_cache, v_cache, block_tables, seq_lens, layout, features=features)


@dataclass(frozen=True, slots=True)
class _Planned:
    """What the checks of one decode call signature decided (cached per signature by the runtime)."""

    spec: KernelSpec
    config: Config
    ctx_bound: int  # longest context the launch is sized for (max_seq_len, else the tables' capacity)
    copies: tuple[bool, ...]  # (seq_lens, block_tables) are strided views: the one-shot op copies them


def _hints(q: object, max_seq_len: int | None, sum_seq_lens: int | None) -> bool:
    """Check the host-side length hints and say whether the batch is ragged (dispatch.is_ragged)."""
    b = q.shape[0] if isinstance(q, torch.Tensor) and q.ndim else 0
    check_length_hints(b, max_seq_len, sum_seq_lens)
    return is_ragged(b, max_seq_len, sum_seq_lens) if sum_seq_lens is not None else False


def _plan(q, k_cache, v_cache, block_tables, seq_lens, layout: str, config: Config | None, max_seq_len: int | None,
          ragged: bool, *, copy: bool, features: Features = NO_FEATURES) -> _Planned:
    """Every check that depends only on host-side metadata, and the config: done once per call
    signature (paged_decode's cache) or once per DecodePlan. `copy`: strided metadata is copied
    (one-shot op) rather than refused (plan). With a sliding window the context bound is the
    window's (min(window, ctx)): it picks the config and sizes the split-KV grid."""
    spec = decode_spec(q, k_cache, v_cache, block_tables, seq_lens, layout, features)
    bound = features.effective_ctx(ctx_bound(max_seq_len, block_tables, spec.block_size))
    copies = strided_metadata((("seq_lens", seq_lens), ("block_tables", block_tables)), copy=copy)
    if config is None:
        config = select_config(spec, q.shape[0], bound, q.shape[1] // spec.group_size, ragged)
    else:
        check_config(spec, config)
    return _Planned(spec, config, bound, copies)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    layout: str = "NHD",
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
    max_seq_len: int | None = None,
    sum_seq_lens: int | None = None,
    validate: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over that sequence's paged KV cache.

    q: [B, Hq, D] fp16/bf16 (last dim contiguous; other strides free, e.g. a slice of a fused QKV
    tensor); k_cache, v_cache: the pool in `layout` (NHD [num_blocks, block_size, Hkv, D] or HND
    [num_blocks, Hkv, block_size, D]), same dtype as q; block_tables: [B, max_blocks] int32 physical
    block ids; seq_lens: [B] int32 tokens cached per sequence (the new token's K/V included; 0 gives
    zeros). Returns out [B, Hq, D] = softmax(q k^T * scale) v per sequence, query head h using KV head
    h // (Hq / Hkv). scale: a finite number > 0, default 1/sqrt(D). The pools may be views of one
    tensor holding K and V (pool[:, 0] / pool[:, 1] of [num_blocks, 2, ...], pool[0] / pool[1] of
    [2, num_blocks, ...], or pool[..., :D] / pool[..., D:] of a pool packed in the last dim).

    Features (pagegen.features; None = off; each on adds its code to the kernel, its value is a
    runtime argument): sliding_window W (the query sees its last W keys, itself included; the
    kernel reads only those), softcap c (scores -> c * tanh(scores / c)), sinks [Hq] fp32 (a logit
    per query head in the softmax denominator), alibi_slopes [Hq] fp32 (scores + slope * (key_pos -
    query_pos)).

    fp8 pools (k_cache/v_cache float8_e4m3fn or float8_e5m2, as kv_write fills them; q and out stay
    fp16/bf16): k_scale, v_scale are required, float32 tensors on the pool's device of 1 element
    (per tensor) or [Hkv] (per KV head), the same ones kv_write quantized with (x ~= code * scale).
    They are read by the kernel: new values need no recompile and no sync. Refused for other pools.

    Metadata may be strided views (`meta[:, 0]`): seq_lens and block tables whose last dim is not
    packed are copied contiguous first (a small extra copy; pass packed tensors to avoid it).
    config: a Config to use instead of the tuned/heuristic one. max_seq_len: an upper bound of
    seq_lens known on the host (sizes the split-KV grid; default block_tables' capacity).
    sum_seq_lens (with max_seq_len): the total of seq_lens, so the dispatcher knows a ragged batch
    (it only picks the config: a wrong value costs speed, not correctness).

    validate: also check the contents (reads seq_lens and block_tables: syncs with the GPU): lengths
    in [0, max_seq_len or capacity] and the block ids of tokens in use within the pool. Without it,
    on a GPU, these are undefined behaviour: a block id outside [0, num_blocks) (reads out of
    bounds), a length beyond block_tables' capacity, a length above max_seq_len (its tokens past the
    bound are silently dropped), a negative length. CPU tensors (the interpreter) are always checked.
    """
    # Fast path: the checks depend only on host-side metadata, so their outcome is cached by the
    # runtime per metadata signature; a serving loop pays one tuple build and one dict lookup a step.
    ragged = _hints(q, max_seq_len, sum_seq_lens)
    features = call_features(q, sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    try:
        key = (
            features.plan_key(), layout, config, max_seq_len, ragged, q.shape, q.dtype, q.device, q.stride(),
            k_cache.shape, k_cache.dtype, k_cache.device, k_cache.stride(), v_cache.shape, v_cache.dtype,
            v_cache.device, v_cache.stride(),
            block_tables.shape, block_tables.dtype, block_tables.device, block_tables.stride(),
            seq_lens.shape, seq_lens.dtype, seq_lens.device, seq_lens.stride(),
        )
        plan = RUNTIME.lookup("decode", key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable config: the full checks say what is wrong
        key, plan = None, None
    if plan is None:
        generation = RUNTIME.generation
        plan = _plan(q, k_cache, v_cache, block_tables, seq_lens, layout, config, max_seq_len, ragged, copy=True,
                     features=features)
        if key is not None:
            RUNTIME.store("decode", key, plan, generation)
    copy_lens, copy_tables = plan.copies
    if copy_lens:
        seq_lens = seq_lens.contiguous()
    if copy_tables:
        block_tables = block_tables.contiguous()
    scales = scale_args(plan.spec, k_scale, v_scale, q.shape[1] // plan.spec.group_size, k_cache)
    if validate or q.device.type == "cpu":
        check_capacity(block_tables, seq_lens, plan.spec.block_size, k_cache.shape[0], max_seq_len)
    out = check_out(out, q)
    scale = check_scale(scale, q.shape[2])
    launch_decode(plan.spec, plan.config, q, k_cache, v_cache, block_tables, seq_lens, out, scale, plan.ctx_bound,
                  features, scales)
    return out



def launch_decode(spec: KernelSpec, config: Config, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
                  ctx_bound: int, features: Features = NO_FEATURES, scales: tuple[tuple, tuple] = ((), ())) -> None:
    """Launch decode (and merge, when split) with already-validated arguments. No host sync.
    scales: kv_ops.scale_args() of an fp8 pool, ((), ()) otherwise."""
    launcher = _Launcher(spec, config, q, k_cache, out, scale, ctx_bound, features=features)
    launcher(q, k_cache, v_cache, block_tables, seq_lens, out, scales)


class _Launcher:
    """Everything about a decode launch that depends on metadata only (kernels, grid, strides,
    constexprs, split-KV scratch), computed once; calling it launches decode (+ merge)."""

    def __init__(self, spec: KernelSpec, config: Config, q: torch.Tensor, k_cache: torch.Tensor,
                 out: torch.Tensor, scale: float, ctx_bound: int, own_scratch: bool = False,
                 features: Features = NO_FEATURES) -> None:
        mod = codegen.load(spec)
        b, hq, _ = q.shape
        num_splits = triton.cdiv(ctx_bound, config.split_size) if config.split_size else 1
        self.split_size = config.split_size if num_splits > 1 else 0
        self.num_splits = num_splits
        self.shape = (b, hq, num_splits, spec.head_dim_padded)
        self.decode = mod.decode_kernel[(b, hq // spec.group_size, num_splits)]
        self.merge = mod.merge_kernel[(b, hq)]
        self.scalars = (scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1))
        self.kv_scalars = (*kv_strides(k_cache, spec.layout, spec.kv_packed), hq * num_splits, num_splits)
        self.feature_args, self.merge_args = features.kernel_args(), features.merge_args()
        self.opts = dict(BLOCK_N=config.block_n, SPLIT_SIZE=self.split_size, DOT_FP32=upcast_dots(spec),
                         num_warps=config.num_warps, num_stages=config.num_stages)
        self.merge_opts = dict(SPLIT_SIZE=self.split_size, SPLITS_PAD=next_pow2(num_splits), num_warps=4)
        self.scratch = self._scratch(q.device) if own_scratch and self.split_size else None

    def _scratch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        part_out = torch.empty(self.shape, dtype=torch.float32, device=device)
        return part_out, torch.empty(self.shape[:3], dtype=torch.float32, device=device)

    def __call__(self, q, k_cache, v_cache, block_tables, seq_lens, out,
                 scales: tuple[tuple, tuple] = ((), ())) -> None:
        if self.split_size:
            part_out, part_lse = self.scratch or self._scratch(q.device)
        else:
            part_out = part_lse = out  # unused by the kernel when SPLIT_SIZE == 0
        scale, sqb, sqh, sob, soh = self.scalars
        scale_ptrs, scale_strides = scales  # fp8 pools only
        self.decode(q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens, *scale_ptrs, scale,
                    *self.feature_args, sqb, sqh, sob, soh, block_tables.stride(0), *self.kv_scalars, *scale_strides,
                    **self.opts)
        if self.split_size:
            self.merge(out, part_out, part_lse, seq_lens, *self.merge_args, sob, soh, self.kv_scalars[-2],
                       self.num_splits, **self.merge_opts)


class DecodePlan:
    """paged_decode with its checks done once, for a serving loop or a CUDA graph.

    Built from example tensors, it validates them as paged_decode does (strided metadata is refused
    here: give it packed seq_lens and block_tables), picks the config (kept for the plan's life:
    build a new plan after changing the tuned table), and precomputes the launch. `run()` compares
    the layout of its arguments with the plan's (shape, strides, dtype, device of every tensor:
    host-side attributes, no sync) and raises ValueError on a mismatch, then launches. Contents
    (the block tables, lengths and cached K/V) may change freely between runs; what `run` cannot
    check without reading them is undefined unless `run(..., validate=True)`: block ids outside the
    pool, lengths beyond the tables' capacity or above `max_seq_len`, negative lengths. `out`, when
    given to run(), must be laid out like the plan's `out` (the example given here, else a
    contiguous [B, Hq, D] tensor, which is what run(out=None) allocates). The split-KV scratch
    buffers belong to the plan, so one plan must not run on two streams at once. Features
    (sliding_window, softcap, sinks, alibi_slopes: see paged_decode) are fixed by the plan; the
    sinks' and slopes' tensors are read at every run, so their contents may change too. fp8 pools:
    k_scale, v_scale as in paged_decode, read at every run (update them in place, e.g. under a CUDA
    graph); `run()` may also take other scale tensors (one layer's of KVCache.layer_scales, say),
    checked as here.
    """

    _NAMES = ("q", "k_cache", "v_cache", "block_tables", "seq_lens")

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, layout: str = "NHD", scale: float | None = None,
                 config: Config | None = None, max_seq_len: int | None = None,
                 sum_seq_lens: int | None = None, out: torch.Tensor | None = None,
                 sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
                 alibi_slopes: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
        ragged = _hints(q, max_seq_len, sum_seq_lens)
        features = call_features(q, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                 alibi_slopes=alibi_slopes)
        planned = _plan(q, k_cache, v_cache, block_tables, seq_lens, layout, config, max_seq_len, ragged, copy=False,
                        features=features)
        self.spec, self.config = planned.spec, planned.config
        self.max_seq_len = max_seq_len
        self.scale = check_scale(scale, q.shape[2])
        out = check_out(out, q)
        self._planned = tuple(signature(t) for t in (q, k_cache, v_cache, block_tables, seq_lens))
        self._flat = sum(self._planned, ())  # what run() compares in one go
        self._out = signature(out)
        self._kv_heads, self._pool = q.shape[1] // self.spec.group_size, k_cache
        self._scales = scale_args(self.spec, k_scale, v_scale, self._kv_heads, k_cache)
        self._launch = _Launcher(self.spec, self.config, q, k_cache, out, self.scale, planned.ctx_bound,
                                 own_scratch=True, features=features)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, out: torch.Tensor | None = None, *, validate: bool = False,
            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """out [B, Hq, D] = paged decode attention (see paged_decode) on tensors laid out like the
        plan's (checked, no sync); validate=True also checks their contents (syncs). k_scale, v_scale
        (fp8 pools): None uses the plan's tensors; given, both replace them for this run (checked)."""
        try:  # one flat tuple compare: the cheapest exact check in Python
            same = (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), k_cache.dtype,
                    k_cache.device, v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.device, block_tables.shape,
                    block_tables.stride(), block_tables.dtype, block_tables.device, seq_lens.shape, seq_lens.stride(),
                    seq_lens.dtype, seq_lens.device) == self._flat
        except AttributeError:  # not a tensor: check_like names it
            same = False
        if not same:
            check_like(self._NAMES, self._planned, (q, k_cache, v_cache, block_tables, seq_lens))
        if out is None:
            shape, strides, dtype, device = self._out
            out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        else:
            check_like(("out",), (self._out,), (out,))
        if validate:
            check_capacity(block_tables, seq_lens, self.spec.block_size, k_cache.shape[0], self.max_seq_len)
        scales = self._scales
        if k_scale is not None or v_scale is not None:
            scales = scale_args(self.spec, k_scale, v_scale, self._kv_heads, self._pool)
        self._launch(q, k_cache, v_cache, block_tables, seq_lens, out, scales)
        return out
