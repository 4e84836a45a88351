"""The public paged-decode op: validate, pick the config, launch the cached kernel."""

from __future__ import annotations

import math

import torch
import triton

from pagegen import codegen
from pagegen._checks import (
    TORCH_DTYPES,
    check_device,
    check_q_and_pool,
    check_tensor,
    interpreting,
    is_packed_pool,
    kv_strides,
)
from pagegen.dispatch import is_ragged, select_config
from pagegen.features import NO_FEATURES, Features, check_features
from pagegen.spec import Config, KernelSpec, keep, next_pow2

LOG2E = 1.4426950408889634


def decode_spec(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, layout: str, features: Features = NO_FEATURES) -> KernelSpec:
    """Validate the decode inputs (cheap checks, no GPU sync) and return the KernelSpec they need."""
    bs, hk, d, hq = check_q_and_pool(q, k_cache, v_cache, layout)
    b = q.shape[0]
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but q has batch {b}")
    if seq_lens.shape[0] != b:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries but q has batch {b}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    check_device({"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables, "seq_lens": seq_lens})
    return KernelSpec("decode", head_dim=d, block_size=bs, layout=layout, dtype=TORCH_DTYPES[q.dtype],
                      group_size=hq // hk, kv_packed=is_packed_pool(k_cache), **features.spec_flags())


def check_capacity(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int, num_blocks: int) -> None:
    """Full check of seq_lens against the block-table width and of block ids against the pool.
    Reads device tensors (syncs): used with validate=True and always for CPU tensors."""
    capacity = block_tables.shape[1] * block_size
    if seq_lens.numel():
        longest = int(seq_lens.max())
        if longest > capacity:
            raise ValueError(
                f"block_tables is too narrow: {block_tables.shape[1]} blocks x {block_size} tokens = {capacity} "
                f"tokens, but seq_lens has a sequence of {longest} tokens"
            )
        if int(seq_lens.min()) < 0:
            raise ValueError("seq_lens has a negative length")
        used = torch.arange(block_tables.shape[1], device=block_tables.device)[None, :] * block_size < seq_lens[:, None]
        ids = block_tables[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            raise ValueError(f"block_tables holds block ids outside [0, {num_blocks}) for tokens in use")


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
) -> torch.Tensor:
    """Attention of one new query token per sequence over that sequence's paged KV cache.

    q: [B, Hq, D] fp16/bf16; k_cache, v_cache: the pool in `layout` (NHD [num_blocks, block_size,
    Hkv, D] or HND [num_blocks, Hkv, block_size, D]), same dtype as q; block_tables: [B, max_blocks]
    int32 physical block ids; seq_lens: [B] int32 tokens cached per sequence (the new token's K/V
    included). Returns out [B, Hq, D] = softmax(q k^T * scale) v per sequence, query head h using
    KV head h // (Hq / Hkv). scale defaults to 1/sqrt(D). The pools may be views of one tensor
    holding K and V (pool[:, 0] / pool[:, 1] of [num_blocks, 2, ...], pool[0] / pool[1] of
    [2, num_blocks, ...], or pool[..., :D] / pool[..., D:] of a pool packed in the last dim).

    Features (pagegen.features; None = off; each on adds its code to the kernel, its value is a
    runtime argument): sliding_window W (the query sees its last W keys, itself included; the
    kernel reads only those), softcap c (scores -> c * tanh(scores / c)), sinks [Hq] fp32 (a logit
    per query head in the softmax denominator), alibi_slopes [Hq] fp32 (scores + slope * (key_pos -
    query_pos)).

    config: a Config to use instead of the tuned/heuristic one. max_seq_len: an upper bound of
    seq_lens known on the host (sizes the split-KV grid; default block_tables' capacity).
    validate: also check seq_lens and block ids against capacity (reads them: syncs with the GPU).
    """
    # Fast path: the checks below depend only on host-side metadata, so their outcome is cached
    # per metadata signature; a serving loop pays one tuple build and one dict lookup a step.
    ragged = _ragged(q, max_seq_len, sum_seq_lens)
    features = NO_FEATURES
    if sliding_window is not None or softcap is not None or sinks is not None or alibi_slopes is not None:
        check_tensor("q", q, ndim=3)
        features = check_features(q.shape[1], q.device, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                  alibi_slopes=alibi_slopes)
    try:
        key = (
            features.plan_key(),
            layout, config, max_seq_len, ragged, q.shape, q.dtype, q.device, q.stride(), k_cache.shape, k_cache.dtype,
            k_cache.device, k_cache.stride(), v_cache.shape, v_cache.dtype, v_cache.device, v_cache.stride(),
            block_tables.shape, block_tables.dtype, block_tables.device, block_tables.stride(),
            seq_lens.shape, seq_lens.dtype, seq_lens.device,
        )
        plan = _plans.get(key) if q.device.type != "cpu" else None  # CPU (interpreter): always check
    except AttributeError:  # not tensors: the full checks below say which argument is wrong
        key, plan = None, None
    if plan is None:
        plan = _plan(q, k_cache, v_cache, block_tables, seq_lens, layout, config, max_seq_len, ragged, features)
        if key is not None:
            if len(_plans) > 4096:
                _plans.clear()
            _plans[key] = plan
    spec, config, ctx_bound = plan
    if validate or q.device.type == "cpu":
        check_capacity(block_tables, seq_lens, spec.block_size, k_cache.shape[0])
    d = q.shape[2]
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(2) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, contiguous in its last dim")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    launch_decode(spec, config, q, k_cache, v_cache, block_tables, seq_lens, out, scale, ctx_bound, features)
    return out


_plans: dict[tuple, tuple[KernelSpec, Config, int]] = {}


def reset_plans() -> None:
    """Forget cached launch plans (call after loading another tuned table)."""
    _plans.clear()


def _ragged(q, max_seq_len: int | None, sum_seq_lens: int | None) -> bool:
    """Check the host-side length hints and say whether the batch is ragged (dispatch.is_ragged)."""
    if sum_seq_lens is None:
        return False
    if max_seq_len is None:
        raise ValueError("sum_seq_lens needs max_seq_len (the longest sequence) beside it")
    if isinstance(sum_seq_lens, bool) or not isinstance(sum_seq_lens, int):
        raise TypeError(f"sum_seq_lens must be an int, got {type(sum_seq_lens).__name__}")
    b = q.shape[0] if isinstance(q, torch.Tensor) and q.ndim else 0
    if not 0 <= sum_seq_lens <= b * max_seq_len:
        raise ValueError(f"sum_seq_lens={sum_seq_lens} is impossible for {b} sequences of at most "
                         f"max_seq_len={max_seq_len} tokens each")
    return is_ragged(b, max_seq_len, sum_seq_lens)


def _plan(q, k_cache, v_cache, block_tables, seq_lens, layout, config, max_seq_len,
          ragged: bool = False, features: Features = NO_FEATURES) -> tuple[KernelSpec, Config, int]:
    """Validate once per metadata signature: (spec, config, context bound) for the launch.
    With a sliding window the context bound is the window's (min(window, ctx)): it picks the
    config and sizes the split-KV grid."""
    spec = decode_spec(q, k_cache, v_cache, block_tables, seq_lens, layout, features)
    b, hq, _ = q.shape
    ctx_bound = block_tables.shape[1] * spec.block_size
    if max_seq_len is not None:
        if max_seq_len > ctx_bound:
            raise ValueError(
                f"max_seq_len={max_seq_len} exceeds block_tables capacity ({block_tables.shape[1]} blocks x "
                f"{spec.block_size} tokens = {ctx_bound})"
            )
        ctx_bound = max(1, max_seq_len)
    ctx_bound = features.effective_ctx(ctx_bound)
    if config is None:
        config = select_config(spec, b, ctx_bound, hq // spec.group_size, ragged)
    else:
        reason = keep(spec, config)
        if reason:
            raise ValueError(f"config {config} is not legal for {spec.variant_key()}: {reason}")
    return spec, config, ctx_bound


def launch_decode(spec: KernelSpec, config: Config, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, scale: float,
                  ctx_bound: int, features: Features = NO_FEATURES) -> None:
    """Launch decode (and merge, when split) with already-validated arguments. No host sync."""
    _Launcher(spec, config, q, k_cache, out, scale, ctx_bound, features=features)(q, k_cache, v_cache, block_tables,
                                                                                 seq_lens, out)


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
        self.opts = dict(BLOCK_N=config.block_n, SPLIT_SIZE=self.split_size, DOT_FP32=interpreting(),
                         num_warps=config.num_warps, num_stages=config.num_stages)
        self.merge_opts = dict(SPLIT_SIZE=self.split_size, SPLITS_PAD=next_pow2(num_splits), num_warps=4)
        self.scratch = self._scratch(q.device) if own_scratch and self.split_size else None

    def _scratch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        part_out = torch.empty(self.shape, dtype=torch.float32, device=device)
        return part_out, torch.empty(self.shape[:3], dtype=torch.float32, device=device)

    def __call__(self, q, k_cache, v_cache, block_tables, seq_lens, out) -> None:
        if self.split_size:
            part_out, part_lse = self.scratch or self._scratch(q.device)
        else:
            part_out = part_lse = out  # unused by the kernel when SPLIT_SIZE == 0
        scale, sqb, sqh, sob, soh = self.scalars
        self.decode(q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens, scale, *self.feature_args,
                    sqb, sqh, sob, soh, block_tables.stride(0), *self.kv_scalars, **self.opts)
        if self.split_size:
            self.merge(out, part_out, part_lse, seq_lens, *self.merge_args, sob, soh, self.kv_scalars[-2],
                       self.num_splits, **self.merge_opts)


class DecodePlan:
    """paged_decode with its checks done once, for a serving loop or a CUDA graph.

    Built from example tensors, it validates them as paged_decode does, picks the config, and
    precomputes the launch. `run()` then launches with no checks at all: the tensors given to it
    must match the planned ones in shape, dtype, strides and device (their contents, i.e. the
    block tables, lengths and cached K/V, may change freely). The split-KV scratch buffers belong
    to the plan, so one plan must not run on two streams at once. Features (sliding_window, softcap,
    sinks, alibi_slopes: see paged_decode) are fixed by the plan; the sinks' and slopes' tensors
    are read at every run, so their contents may change too.
    """

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, layout: str = "NHD", scale: float | None = None,
                 config: Config | None = None, max_seq_len: int | None = None,
                 sum_seq_lens: int | None = None, sliding_window: int | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None) -> None:
        ragged = _ragged(q, max_seq_len, sum_seq_lens)
        check_tensor("q", q, ndim=3)
        features = check_features(q.shape[1], q.device, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                  alibi_slopes=alibi_slopes)
        self.spec, self.config, ctx_bound = _plan(q, k_cache, v_cache, block_tables, seq_lens, layout, config,
                                                  max_seq_len, ragged, features)
        scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
        self._launch = _Launcher(self.spec, self.config, q, k_cache, q, scale, ctx_bound, own_scratch=True,
                                 features=features)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out [B, Hq, D] = paged decode attention (see paged_decode); unchecked. `out`, when given,
        must have q's shape, dtype and strides (the plan baked in q's strides for it)."""
        if out is None:
            out = torch.empty_like(q)
        self._launch(q, k_cache, v_cache, block_tables, seq_lens, out)
        return out
