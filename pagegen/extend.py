"""The public paged-extend op (prefill / chunked prefill over a paged prefix): validate, pick the
config, launch the cached kernel.

Design decision: the new tokens' K/V are already in the pool (written by kv_write before this op
runs), so a sequence's whole history, cached prefix and new tokens alike, is reached through its
block table and nothing is passed twice. This keeps the prefix cache whole: the blocks holding the
new tokens are ordinary pool blocks that later requests may share.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

try:  # host-side tensor descriptors (Triton >= 3.4): the extend kernel's TMA K/V path
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: kv_tma configs run the gather path
    TensorDescriptor = None

from pagegen import codegen
from pagegen._checks import (
    LOG2E,
    attention_spec,
    check_capacity,
    check_config,
    check_like,
    check_max_len,
    check_out,
    check_scale,
    check_tensor,
    ctx_bound,
    kv_strides,
    signature,
    strided_metadata,
    upcast_dots,
)
from pagegen.dispatch import extend_chunk_route, select_config
from pagegen.extend_chunked import build_chunks, extend_as_verify
from pagegen.features import NO_FEATURES, Features, call_features
from pagegen.kv_ops import scale_args
from pagegen.runtime import RUNTIME
from pagegen.spec import Config, KernelSpec, default_config, illegal_reason, kv_tma_reason

__all__ = ["ExtendPlan", "check_extend_lengths", "extend_spec", "kv_tma_problem", "launch_extend", "paged_extend"]

MAX_BATCH = 65535  # sequences a call: the grid's second dim
TMA_ALIGN = 16  # bytes: a tensor descriptor's base address and row stride must be multiples of this
TMA_MAX_ROWS = 2**31 - 1  # rows of the 2D pool view: the kernel's int32 box coordinates must not overflow


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Whether kernels on `device` can use tensor descriptors as TMA: CUDA compute capability >= 9
    (Hopper), or the CPU (Triton's interpreter, which emulates descriptors)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def kv_tma_view(spec: KernelSpec, k_cache: torch.Tensor) -> tuple[list[int], list[int]]:
    """(shape, strides) of the 2D view the TMA path reads the pool through (templates/extend.py.j2):
    NHD [num_blocks * PAGE, Hk * D] with the token stride, HND [num_blocks * Hk * PAGE, D] with D."""
    nb, d = k_cache.shape[0], spec.head_dim
    if spec.layout == "NHD":
        return [nb * spec.block_size, k_cache.shape[2] * d], [k_cache.stride(1), 1]
    return [nb * k_cache.shape[1] * spec.block_size, d], [d, 1]


def kv_tma_problem(spec: KernelSpec, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """Why this pool cannot go through the extend kernel's tensor-descriptor K/V path (a config with
    kv_tma=1 then runs the gather path, same kernel, KV_TMA=False), or None when it can.

    k_cache, v_cache: the validated pools (same shape and strides) of `spec`'s layout. The 2D view
    (kv_tma_view) must describe the pool exactly: NHD needs stride(block) == PAGE * stride(token) (a
    K|V-stacked [num_blocks, 2, ...] view fails this), HND a contiguous pool; base addresses and the row
    stride 16-byte aligned; fewer than 2**31 rows; a device with TMA (CUDA capability >= 9, or the CPU
    interpreter); a Triton with host-side tensor descriptors. Host-side attributes only (no sync)."""
    why = kv_tma_reason(spec)
    if why is not None:
        return why
    if TensorDescriptor is None:
        return f"triton {triton.__version__} has no triton.tools.tensor_descriptor"
    if not _has_tma(k_cache.device):
        return f"device {k_cache.device} has no TMA (needs CUDA compute capability >= 9)"
    page, d = spec.block_size, spec.head_dim
    if spec.layout == "NHD":
        if k_cache.stride(0) != page * k_cache.stride(1):
            return (f"NHD pool strides {k_cache.stride()}: stride(0) must be block_size x stride(1) (rows of one "
                    "[num_blocks * block_size, kv_heads * head_dim] view)")
    elif k_cache.stride(1) != page * d or k_cache.stride(0) != k_cache.shape[1] * page * d:
        return (f"HND pool strides {k_cache.stride()}: the pool must be contiguous (one [num_blocks * kv_heads * "
                "block_size, head_dim] view)")
    shape, strides = kv_tma_view(spec, k_cache)
    if shape[0] > TMA_MAX_ROWS:
        return f"the pool's 2D view has {shape[0]} rows; at most {TMA_MAX_ROWS} (int32 box coordinates)"
    if strides[0] * k_cache.element_size() % TMA_ALIGN:
        return f"row stride {strides[0]} elements is not a multiple of {TMA_ALIGN} bytes"
    if (k_cache.data_ptr() | v_cache.data_ptr()) % TMA_ALIGN:
        return f"k_cache/v_cache base addresses are not {TMA_ALIGN}-byte aligned"
    return None


def extend_spec(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, layout: str,
                features: Features = NO_FEATURES) -> KernelSpec:
    """Validate the extend inputs (cheap checks, no GPU sync) and return the KernelSpec they need."""
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,))
    spec = attention_spec("extend", q, k_cache, v_cache, block_tables, seq_lens, layout,
                          extra={"cu_seqlens_q": cu_seqlens_q}, features=features)
    b = seq_lens.shape[0]
    if b > MAX_BATCH:
        raise ValueError(f"seq_lens has {b} sequences; at most {MAX_BATCH} a call (the grid's second dim)")
    if cu_seqlens_q.shape[0] != b + 1:
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries; expected batch + 1 = {b + 1} "
            "(query-token offsets, starting at 0)"
        )
    return spec


def check_extend_lengths(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, total_q: int, max_q_len: int) -> None:
    """Full check of the query offsets against q and seq_lens: cu_seqlens_q starts at 0, ends at
    total_q, never decreases, no sequence has more than max_q_len new tokens or more new tokens
    than cached ones. Reads device tensors (syncs): used with validate=True and always on the CPU."""
    cu = cu_seqlens_q.long().cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {int(cu[0])}")
    if int(cu[-1]) != total_q:
        raise ValueError(f"cu_seqlens_q must end at q.shape[0]={total_q}, got {int(cu[-1])}")
    q_lens = cu[1:] - cu[:-1]
    if q_lens.numel() == 0:
        return
    if int(q_lens.min()) < 0:
        raise ValueError("cu_seqlens_q must be non-decreasing (a sequence has a negative query count)")
    if int(q_lens.max()) > max_q_len:
        raise ValueError(f"a sequence has {int(q_lens.max())} query tokens, more than max_q_len={max_q_len}")
    short = q_lens > seq_lens.long().cpu()
    if bool(short.any()):
        i = int(short.nonzero()[0])
        raise ValueError(
            f"sequence {i} has {int(q_lens[i])} query tokens but seq_lens[{i}]={int(seq_lens[i])}: seq_lens counts "
            "all cached tokens including the new ones, whose K/V must be written to the pool first"
        )


@dataclass(frozen=True, slots=True)
class _Planned:
    """What the checks of one extend call signature decided (cached per signature by the runtime)."""

    spec: KernelSpec
    config: Config
    ctx_bound: int  # longest context (max_seq_len, else the tables' capacity): picks the tuned bucket
    max_q_len: int  # most new tokens of one sequence: sizes the grid
    copies: tuple[bool, ...]  # (cu_seqlens_q, seq_lens, block_tables) are strided: the one-shot op copies
    chunk: int = 0  # > 0: run as one verify launch over chunk rows of this many tokens (dispatch.extend_chunk_route)


def _chunk_route(q: torch.Tensor, k_cache: torch.Tensor, spec: KernelSpec, config: Config, batch: int,
                 max_q_len: int, ctx: int) -> int:
    """dispatch.extend_chunk_route for a call on a CUDA device (its cost model was measured on one): the
    chunk length when the call runs as chunked verify, else 0. Always 0 elsewhere (the CPU interpreter)."""
    if q.device.type != "cuda":
        return 0
    return extend_chunk_route(batch, q.shape[0], max_q_len, ctx, q.shape[1] // spec.group_size, spec.group_size,
                              spec.head_dim, k_cache.element_size(), config.block_m, RUNTIME.sm_count())


def _plan(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout: str, config: Config | None,
          max_q_len: int | None, max_seq_len: int | None, *, copy: bool,
          features: Features = NO_FEATURES) -> _Planned:
    """Every check that depends only on host-side metadata, and the config: done once per call
    signature (paged_extend's cache) or once per ExtendPlan. `copy`: strided metadata is copied
    (one-shot op) rather than refused (plan)."""
    spec = extend_spec(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout, features)
    total_q, hq, _ = q.shape
    check_max_len("max_q_len", max_q_len, total_q, f"q.shape[0]={total_q} (the total of all query tokens)")
    bound = ctx_bound(max_seq_len, block_tables, spec.block_size)
    metas = (("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens), ("block_tables", block_tables))
    copies = strided_metadata(metas, copy=copy)
    q_bound = total_q if max_q_len is None else max_q_len
    chunk = 0
    if config is None:
        kv_heads, ctx = hq // spec.group_size, features.effective_ctx(bound)
        config = select_config(spec, total_q, ctx, kv_heads)
        if illegal_reason(spec, config) is not None:
            config = default_config(spec)
        chunk = _chunk_route(q, k_cache, spec, config, seq_lens.shape[0], q_bound, ctx)
    else:
        check_config(spec, config)
    return _Planned(spec, config, bound, q_bound, copies, chunk)


def paged_extend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    layout: str = "NHD",
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: Config | None = None,
    max_q_len: int | None = None,
    max_seq_len: int | None = None,
    validate: bool = False,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged KV (prefix + themselves).

    q: [total_q, Hq, D] fp16/bf16, the new tokens of all sequences back to back (last dim
    contiguous, other strides free); cu_seqlens_q: [B + 1] int32 offsets into q (sequence b owns
    rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]); k_cache, v_cache: the pool in `layout` (NHD
    [num_blocks, block_size, Hkv, D] or HND [num_blocks, Hkv, block_size, D]), same dtype as q;
    block_tables: [B, max_blocks] int32 physical block ids; seq_lens: [B] int32 tokens cached per
    sequence INCLUDING the new ones: the new tokens' K/V must already be written into the pool (by
    kv_write), at positions seq_len - q_len .. seq_len - 1. New token i of sequence b is at absolute
    position p = seq_lens[b] - q_len_b + i and attends to positions 0..p (causal, lower-right
    aligned); query head h uses KV head h // (Hq / Hkv). Returns out [total_q, Hq, D] =
    softmax(q k^T * scale + causal mask) v; scale: a finite number > 0, default 1/sqrt(D).
    The pools may be views of one K|V tensor, as in paged_decode.

    Features (as in paged_decode; None = off): sliding_window W (token p sees positions p - W + 1 ..
    p; the kernel skips the keys below a tile's window), softcap c, sinks [Hq] fp32, alibi_slopes
    [Hq] fp32 (scores + slope * (key_pos - query_pos)).

    fp8 pools (float8_e4m3fn / float8_e5m2, q and out fp16/bf16): k_scale, v_scale are required, as
    in paged_decode (float32, 1 element or [Hkv], on the pool's device; read by the kernel, so new
    values need no recompile). Refused for other pools.

    Metadata may be strided views: cu_seqlens_q, seq_lens and block tables whose last dim is not
    packed are copied contiguous first (a small extra copy; pass packed tensors to avoid it).
    Short extends over long prefixes: where few extend programs would walk a long context (one
    sequence with a few dozen new tokens over 32768 cached ones), the call runs as one paged_verify
    launch over chunk rows of up to 16 new tokens with split-KV (pagegen.extend_chunked; the rule is
    dispatch.extend_chunk_route, taken on CUDA when no config is given; same function, same output).

    config: a Config to use instead of the tuned/heuristic one. max_q_len: an upper bound of the
    per-sequence query counts known on the host (sizes the grid; default q.shape[0]); a smaller bound
    launches fewer idle programs. max_seq_len: an upper bound of seq_lens known on the host (picks
    the tuned shape bucket; default block_tables' capacity).

    validate: also check the contents (reads cu_seqlens_q, seq_lens and block_tables: syncs):
    offsets from 0 to total_q, non-decreasing, no sequence with more than max_q_len new tokens or
    more new tokens than seq_len, lengths within capacity and max_seq_len, block ids of tokens in use
    within the pool. Without it, on a GPU, any of these is undefined behaviour (out-of-bounds reads
    or writes, rows left unwritten, wrong results). CPU tensors (the interpreter) are always checked.
    """
    features = call_features(q, sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    try:
        key = (
            features.plan_key(), layout, config, max_q_len, max_seq_len, q.shape, q.dtype, q.device, q.stride(),
            k_cache.shape, k_cache.dtype, k_cache.device, k_cache.stride(), v_cache.shape, v_cache.dtype,
            v_cache.device, v_cache.stride(), block_tables.shape, block_tables.dtype, block_tables.device,
            block_tables.stride(),
            cu_seqlens_q.shape, cu_seqlens_q.dtype, cu_seqlens_q.device, cu_seqlens_q.stride(),
            seq_lens.shape, seq_lens.dtype, seq_lens.device, seq_lens.stride(),
        )
        plan = RUNTIME.lookup("extend", key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable argument: the full checks say what
        key, plan = None, None
    if plan is None:
        generation = RUNTIME.generation
        plan = _plan(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout, config, max_q_len,
                     max_seq_len, copy=True, features=features)
        if key is not None:
            RUNTIME.store("extend", key, plan, generation)
    copy_cu, copy_lens, copy_tables = plan.copies
    if copy_cu:
        cu_seqlens_q = cu_seqlens_q.contiguous()
    if copy_lens:
        seq_lens = seq_lens.contiguous()
    if copy_tables:
        block_tables = block_tables.contiguous()
    scales = scale_args(plan.spec, k_scale, v_scale, q.shape[1] // plan.spec.group_size, k_cache)
    if validate or q.device.type == "cpu":
        check_extend_lengths(cu_seqlens_q, seq_lens, q.shape[0], plan.max_q_len)
        check_capacity(block_tables, seq_lens, plan.spec.block_size, k_cache.shape[0], max_seq_len)
    out = check_out(out, q)
    scale = check_scale(scale, q.shape[2])
    if plan.chunk:  # a short extend over a long prefix: one verify launch over chunk rows (split-KV)
        return extend_as_verify(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, chunk=plan.chunk,
                                max_q_len=plan.max_q_len, out=out, layout=layout, scale=scale,
                                max_seq_len=max_seq_len, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale)
    if q.shape[0] and seq_lens.shape[0] and plan.max_q_len:
        launch_extend(plan.spec, plan.config, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale,
                      plan.max_q_len, features, scales)
    return out



def launch_extend(spec: KernelSpec, config: Config, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                  scale: float, max_q_len: int, features: Features = NO_FEATURES,
                  scales: tuple[tuple, tuple] = ((), ())) -> None:
    """Launch extend_kernel with already-validated arguments. No host sync.
    scales: kv_ops.scale_args() of an fp8 pool, ((), ()) otherwise."""
    _Launcher(spec, config, q, k_cache, out, scale, seq_lens.shape[0], max_q_len, features)(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scales)


class _Launcher:
    """Everything about an extend launch that depends on metadata only (kernel, grid, strides,
    constexprs), computed once; calling it launches the kernel."""

    def __init__(self, spec: KernelSpec, config: Config, q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor,
                 scale: float, batch: int, max_q_len: int, features: Features = NO_FEATURES) -> None:
        hk = q.shape[1] // spec.group_size
        block_q = config.block_m // spec.group_size  # query tokens a program (illegal_reason() ensures >= 1)
        num_q_tiles = triton.cdiv(max_q_len, block_q)
        self.empty = not (q.shape[0] and batch and max_q_len)
        self.kernel = codegen.load(spec).extend_kernel[(num_q_tiles * hk, batch)]
        self.scalars = (scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1))
        self.kv_scalars = (*kv_strides(k_cache, spec.layout, spec.kv_packed), hk, num_q_tiles)
        self.feature_args = features.kernel_args()
        self.opts = dict(BLOCK_M=config.block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n, DOT_FP32=upcast_dots(spec),
                         num_warps=config.num_warps, num_stages=config.num_stages)
        # the TMA K/V path: the kernel has it (spec), the config asks for it and this pool can take it; a
        # pool it cannot take runs the same kernel's gather path (KV_TMA=False), never a wrong answer
        self.renders_tma = kv_tma_reason(spec) is None
        self.tma = bool(config.kv_tma) and self.renders_tma and kv_tma_problem(spec, k_cache, k_cache) is None
        if self.renders_tma:
            self.opts["KV_TMA"] = False
            self.tma_opts = {**self.opts, "KV_TMA": True}
            self.view = kv_tma_view(spec, k_cache) if self.tma else None
            self.box = [config.block_n, spec.head_dim]
            self.descs: tuple = (None, None, None)  # (k, v base addresses, (k_desc, v_desc)) of the last call

    def _desc_args(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple | None:
        """(k_desc, v_desc) for this call's pools, or None when their addresses are not 16-byte aligned
        (shape and strides were checked when the launcher was built). Host-side descriptors: encoded by
        Triton's launcher into the kernel's parameters, so nothing is allocated and CUDA graphs capture
        it; reused while the pools' addresses stay the same."""
        kp, vp = k_cache.data_ptr(), v_cache.data_ptr()
        if (kp | vp) % TMA_ALIGN:
            return None
        if self.descs[0] != kp or self.descs[1] != vp:
            shape, strides = self.view
            self.descs = (kp, vp, (TensorDescriptor(k_cache, shape, strides, self.box),
                                   TensorDescriptor(v_cache, shape, strides, self.box)))
        return self.descs[2]

    def __call__(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
                 scales: tuple[tuple, tuple] = ((), ())) -> None:
        if self.empty:
            return
        scale, sqt, sqh, sot, soh = self.scalars
        scale_ptrs, scale_strides = scales  # fp8 pools only
        opts, descs = self.opts, ()
        if self.renders_tma:
            descs = self._desc_args(k_cache, v_cache) if self.tma else None
            if descs is None:
                descs = (None, None)
            else:
                opts = self.tma_opts
        self.kernel(q, k_cache, v_cache, *descs, out, block_tables, cu_seqlens_q, seq_lens, *scale_ptrs, scale,
                    *self.feature_args, sqt, sqh, sot, soh, block_tables.stride(0), *self.kv_scalars, *scale_strides,
                    **opts)


class ExtendPlan:
    """paged_extend with its checks done once, for a serving loop or a CUDA graph.

    Built from example tensors, it validates them as paged_extend does (strided metadata is refused
    here: give it packed cu_seqlens_q, seq_lens and block_tables), picks the config (kept for the
    plan's life: build a new plan after changing the tuned table), and precomputes the launch.
    `run()` compares the layout of its arguments with the plan's (shape, strides, dtype, device of
    every tensor: host-side attributes, no sync) and raises ValueError on a mismatch, then launches.
    Contents may change freely between runs; what `run` cannot check without reading them is
    undefined unless `run(..., validate=True)`: offsets that do not run from 0 to total_q or that
    decrease, a sequence with more than `max_q_len` new tokens or more new tokens than its seq_len,
    lengths beyond the tables' capacity or above `max_seq_len`, block ids outside the pool. `out`,
    when given to run(), must be laid out like the plan's `out` (the example given here, else a
    contiguous [total_q, Hq, D] tensor, which is what run(out=None) allocates). Features (see
    paged_extend) are fixed by the plan; the sinks' and slopes' tensors are read at every run. fp8
    pools: k_scale, v_scale as in paged_extend, read at every run; `run()` may take other scale
    tensors (another layer's), checked as here.
    """

    _NAMES = ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q", "seq_lens")

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, *, layout: str = "NHD",
                 scale: float | None = None, config: Config | None = None, max_q_len: int | None = None,
                 max_seq_len: int | None = None, out: torch.Tensor | None = None,
                 sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
                 alibi_slopes: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
        features = call_features(q, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                 alibi_slopes=alibi_slopes)
        planned = _plan(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, layout, config, max_q_len,
                        max_seq_len, copy=False, features=features)
        self.spec, self.config, self.max_q_len = planned.spec, planned.config, planned.max_q_len
        self.max_seq_len = max_seq_len
        self.scale = check_scale(scale, q.shape[2])
        out = check_out(out, q)
        self._planned = tuple(signature(t) for t in (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens))
        self._flat = sum(self._planned, ())  # what run() compares in one go
        self._out = signature(out)
        self._kv_heads, self._pool = q.shape[1] // self.spec.group_size, k_cache
        self._scales = scale_args(self.spec, k_scale, v_scale, self._kv_heads, k_cache)
        self.chunk = planned.chunk  # > 0: runs as a verify plan over chunk rows (paged_extend's route)
        self._launch = self._verify = None
        if not self.chunk:
            self._launch = _Launcher(self.spec, self.config, q, k_cache, out, self.scale, seq_lens.shape[0],
                                     self.max_q_len, features)
        else:
            from pagegen.verify import VerifyPlan  # verify imports extend: resolved at plan time

            rows = build_chunks(cu_seqlens_q, seq_lens, block_tables, total_q=q.shape[0], chunk=self.chunk,
                                max_q_len=self.max_q_len)
            self._verify = VerifyPlan(q, k_cache, v_cache, rows.block_tables, rows.seq_lens,
                                      cu_seqlens_q=rows.cu_seqlens_q, max_q_len=self.chunk, layout=layout,
                                      scale=self.scale, max_seq_len=max_seq_len, out=out,
                                      sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                                      alibi_slopes=alibi_slopes, k_scale=k_scale, v_scale=v_scale)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor | None = None, *,
            validate: bool = False, k_scale: torch.Tensor | None = None,
            v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """out [total_q, Hq, D] = paged extend attention (see paged_extend) on tensors laid out like
        the plan's (checked, no sync); validate=True also checks their contents (syncs). k_scale,
        v_scale (fp8 pools): None uses the plan's tensors; given, both replace them for this run."""
        try:  # one flat tuple compare: the cheapest exact check in Python
            same = (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), k_cache.dtype,
                    k_cache.device, v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.device, block_tables.shape,
                    block_tables.stride(), block_tables.dtype, block_tables.device, cu_seqlens_q.shape,
                    cu_seqlens_q.stride(), cu_seqlens_q.dtype, cu_seqlens_q.device, seq_lens.shape, seq_lens.stride(),
                    seq_lens.dtype, seq_lens.device) == self._flat
        except AttributeError:  # not a tensor: check_like names it
            same = False
        if not same:
            check_like(self._NAMES, self._planned, (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens))
        if out is None:
            shape, strides, dtype, device = self._out
            out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        else:
            check_like(("out",), (self._out,), (out,))
        if validate:
            check_extend_lengths(cu_seqlens_q, seq_lens, q.shape[0], self.max_q_len)
            check_capacity(block_tables, seq_lens, self.spec.block_size, k_cache.shape[0], self.max_seq_len)
        if self._verify is not None:
            rows = build_chunks(cu_seqlens_q, seq_lens, block_tables, total_q=q.shape[0], chunk=self.chunk,
                                max_q_len=self.max_q_len)
            given = dict(k_scale=k_scale, v_scale=v_scale) if k_scale is not None or v_scale is not None else {}
            return self._verify.run(q, k_cache, v_cache, rows.block_tables, rows.seq_lens, rows.cu_seqlens_q, out=out,
                                    **given)
        scales = self._scales
        if k_scale is not None or v_scale is not None:
            scales = scale_args(self.spec, k_scale, v_scale, self._kv_heads, self._pool)
        self._launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scales)
        return out
