"""The public multi-token decode op (speculative verify, issue 17): validate, route, launch.

A verify step scores 2..16 new tokens per sequence (draft tokens, MTP heads, n-gram guesses) against
the sequence's whole cached context. It reads the same KV as a one-token decode step, so it runs on
the decode kernel rendered with a q_len axis (KernelSpec.q_len, templates/decode.py.j2): the q_len x
group query rows of a KV head share one program (the M dim of tl.dot), each K/V page is read once per
KV head and split, and split-KV partitions long contexts as in decode. It computes the same function
as paged_extend (one set of math: pagegen.reference.paged_extend_ref is the ground truth of both);
`dispatch.attention_path` decides by shape which kernel runs: one-token decode, this one, or extend.

Design decision: a sibling op of paged_decode rather than a 4-dim form of it, so paged_decode's
signature, plan cache and checks stay as they are; for q_len == 1 it hands over to paged_decode.
"""

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
from pagegen.decode import DecodePlan, check_capacity, paged_decode
from pagegen.dispatch import attention_path, is_ragged, select_config
from pagegen.extend import check_extend_lengths, paged_extend
from pagegen.features import NO_FEATURES, Features, check_features
from pagegen.spec import Q_LENS, Config, KernelSpec, keep, next_pow2

LOG2E = 1.4426950408889634


def _as_rows(q: torch.Tensor, cu_seqlens_q: torch.Tensor | None, max_q_len: int | None) -> tuple[int, int, bool]:
    """(batch, max q_len, varlen) of a verify call, from q's form:
    [B, q_len, Hq, D] (uniform; no cu_seqlens_q) or [total_q, Hq, D] with cu_seqlens_q [B + 1]."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if cu_seqlens_q is None:
        if q.dim() != 4:
            raise ValueError(f"q must be [B, q_len, Hq, D] (or [total_q, Hq, D] with cu_seqlens_q), got shape "
                             f"{tuple(q.shape)}")
        if max_q_len is not None and max_q_len != q.shape[1]:
            raise ValueError(f"max_q_len={max_q_len} contradicts q's uniform q_len {q.shape[1]}; leave it out")
        if q.shape[1] < 1:
            raise ValueError("q has q_len 0: a verify step needs at least one new token per sequence")
        return q.shape[0], q.shape[1], False
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,))
    if q.dim() != 3:
        raise ValueError(f"with cu_seqlens_q, q must be [total_q, Hq, D], got shape {tuple(q.shape)}")
    total_q = q.shape[0]
    if max_q_len is None:
        max_q_len = total_q
    elif isinstance(max_q_len, bool) or not isinstance(max_q_len, int) or max_q_len < 0:
        raise ValueError(f"max_q_len must be a non-negative int, got {max_q_len!r}")
    elif max_q_len > total_q:
        raise ValueError(f"max_q_len={max_q_len} exceeds q.shape[0]={total_q} (the total of all query tokens)")
    return cu_seqlens_q.shape[0] - 1, max_q_len, True


def verify_spec(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None, q_len: int, layout: str,
                features: Features = NO_FEATURES) -> KernelSpec:
    """Validate the verify inputs (cheap checks, no GPU sync) and return the decode KernelSpec of
    `q_len` (one of spec.Q_LENS, > 1) they need. q: [B, q_len, Hq, D] or [total_q, Hq, D]."""
    q3 = q[:, 0] if q.dim() == 4 else q
    bs, hk, d, hq = check_q_and_pool(q3, k_cache, v_cache, layout)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    b = seq_lens.shape[0]
    if q.dim() == 4 and q.shape[0] != b:
        raise ValueError(f"q has batch {q.shape[0]} but seq_lens has {b} sequences")
    if cu_seqlens_q is not None and cu_seqlens_q.shape[0] != b + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries; expected batch + 1 = {b + 1} "
                         "(query-token offsets, starting at 0)")
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but seq_lens has {b} sequences")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous in its last dim")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables, "seq_lens": seq_lens}
    if cu_seqlens_q is not None:
        tensors["cu_seqlens_q"] = cu_seqlens_q
    check_device(tensors)
    return KernelSpec("decode", head_dim=d, block_size=bs, layout=layout, dtype=TORCH_DTYPES[q.dtype],
                      group_size=hq // hk, kv_packed=is_packed_pool(k_cache), q_len=q_len, **features.spec_flags())


def _features(q: torch.Tensor, **values) -> Features:
    if all(v is None for v in values.values()):
        return NO_FEATURES
    return check_features(q.shape[-2], q.device, **values)


def _ragged(b: int, max_seq_len: int | None, sum_seq_lens: int | None) -> bool:
    """Check the host-side length hints; whether the batch is ragged (dispatch.is_ragged)."""
    if sum_seq_lens is None:
        return False
    if max_seq_len is None:
        raise ValueError("sum_seq_lens needs max_seq_len (the longest sequence) beside it")
    if isinstance(sum_seq_lens, bool) or not isinstance(sum_seq_lens, int):
        raise TypeError(f"sum_seq_lens must be an int, got {type(sum_seq_lens).__name__}")
    if not 0 <= sum_seq_lens <= b * max_seq_len:
        raise ValueError(f"sum_seq_lens={sum_seq_lens} is impossible for {b} sequences of at most "
                         f"max_seq_len={max_seq_len} tokens each")
    return is_ragged(b, max_seq_len, sum_seq_lens)


def _uniform_cu(b: int, q_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (b + 1) * q_len, q_len, dtype=torch.int32, device=device)


def paged_verify(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_q_len: int | None = None,
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
    """Attention of each sequence's few new tokens (a speculative verify step) over its paged KV.

    q: [B, q_len, Hq, D] (every sequence q_len new tokens) or [total_q, Hq, D] with cu_seqlens_q
    [B + 1] int32 (sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1]; max_q_len: a host-side
    bound of the per-sequence counts, default total_q); fp16/bf16. k_cache, v_cache: the pool in
    `layout` (as paged_decode, views of one K|V tensor included); block_tables: [B, max_blocks]
    int32; seq_lens: [B] int32 tokens cached per sequence INCLUDING the new ones, whose K/V must be in
    the pool already (kv_write). New token i of a sequence with n new tokens sits at position
    p = seq_len - n + i and attends to positions 0..p (causal, lower-right aligned: paged_extend's
    function). Returns out shaped like q = softmax(q k^T * scale + causal mask) v; query head h uses
    KV head h // (Hq / Hkv); scale defaults to 1/sqrt(D).

    Features as in paged_decode (sliding_window: token p sees positions p - W + 1 .. p). The kernel is
    chosen by dispatch.attention_path: q_len 1 -> paged_decode; up to 16 (rows permitting) -> decode
    with q_len rows a sequence and split-KV; longer -> paged_extend. config: a Config for the decode
    kernel of this q_len (ignored when routed to extend). max_seq_len / sum_seq_lens: host-side length
    hints as in paged_decode. validate: also check offsets, lengths and block ids (syncs).
    """
    b, ql, varlen = _as_rows(q, cu_seqlens_q, max_q_len)
    feats = dict(sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    hq, d = q.shape[-2], q.shape[-1]
    hk = k_cache.shape[2] if layout == "NHD" else k_cache.shape[1]
    spec_q = attention_path(ql, hq // max(1, hk), d)
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, contiguous in its last dim")
    common = dict(layout=layout, scale=scale, max_seq_len=max_seq_len, validate=validate, **feats)
    if spec_q == 1 and (not varlen or q.shape[0] == b):
        # one token a sequence: the one-token decode kernel (q [B, 1, Hq, D] or [B, Hq, D])
        q3, o3 = (q[:, 0], out[:, 0]) if q.dim() == 4 else (q, out)
        paged_decode(q3, k_cache, v_cache, block_tables, seq_lens, out=o3, config=config,
                     sum_seq_lens=sum_seq_lens, **common)
        return out
    if spec_q == 0:
        # long queries: extend, on the packed form
        cu = cu_seqlens_q if varlen else _uniform_cu(b, ql, q.device)
        q3 = q if varlen else q.reshape(b * ql, hq, d)
        o3 = out if varlen else out.view(b * ql, hq, d) if out.is_contiguous() else None
        res = paged_extend(q3, k_cache, v_cache, block_tables, cu, seq_lens, out=o3, max_q_len=ql, **common)
        if o3 is None:
            out.copy_(res.view(b, ql, hq, d))
        return out
    features = _features(q, **feats)
    spec = verify_spec(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max(2, spec_q), layout, features)
    config, ctx_bound = _config(spec, b, block_tables, max_seq_len, _ragged(b, max_seq_len, sum_seq_lens), ql,
                                features, config, hq)
    if validate or q.device.type == "cpu":
        cu = cu_seqlens_q if varlen else _uniform_cu(b, ql, q.device)
        check_extend_lengths(cu, seq_lens, b * ql if not varlen else q.shape[0], ql)
        check_capacity(block_tables, seq_lens, spec.block_size, k_cache.shape[0])
    scale = _scale(scale, d)
    if b and q.numel():
        _Launcher(spec, config, q, varlen, k_cache, out, scale, ctx_bound, features, batch=b)(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out)
    return out


def _scale(scale: float | None, d: int) -> float:
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not scale > 0 or math.isinf(scale):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def _config(spec: KernelSpec, b: int, block_tables: torch.Tensor, max_seq_len: int | None, ragged: bool,
            q_len: int, features: Features, config: Config | None, hq: int) -> tuple[Config, int]:
    """(config, context bound) of a verify launch: the bound (max_seq_len, else block_tables' capacity;
    with a window, the keys the new tokens see together) picks the config and sizes the split grid."""
    ctx_bound = block_tables.shape[1] * spec.block_size
    if max_seq_len is not None:
        if max_seq_len > ctx_bound:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds block_tables capacity ({block_tables.shape[1]} "
                             f"blocks x {spec.block_size} tokens = {ctx_bound})")
        ctx_bound = max(1, max_seq_len)
    ctx_bound = features.effective_ctx(ctx_bound, q_len)
    if config is None:
        config = select_config(spec, b, ctx_bound, hq // spec.group_size, ragged)
    else:
        reason = keep(spec, config)
        if reason:
            raise ValueError(f"config {config} is not legal for {spec.variant_key()}: {reason}")
    return config, ctx_bound


class _Launcher:
    """A verify launch's metadata-only parts (kernels, grids, strides, constexprs, split scratch),
    computed once; calling it launches decode_kernel (+ merge_kernel when split). No host sync."""

    def __init__(self, spec: KernelSpec, config: Config, q: torch.Tensor, varlen: bool, k_cache: torch.Tensor,
                 out: torch.Tensor, scale: float, ctx_bound: int, features: Features = NO_FEATURES,
                 own_scratch: bool = False, *, batch: int) -> None:
        mod = codegen.load(spec)
        hq = q.shape[-2]
        b = batch
        num_splits = triton.cdiv(ctx_bound, config.split_size) if config.split_size else 1
        self.split_size = config.split_size if num_splits > 1 else 0
        self.num_splits = num_splits
        self.shape = (b, spec.q_len, hq, num_splits, spec.head_dim_padded)  # split-KV partial outputs
        self.decode = mod.decode_kernel[(b, hq // spec.group_size, num_splits)]
        self.merge = mod.merge_kernel[(b, hq, spec.q_len)]
        if varlen:  # rows (token) stride, no batch stride
            q_s, o_s = (0, q.stride(0), q.stride(1)), (0, out.stride(0), out.stride(1))
        else:
            q_s, o_s = (q.stride(0), q.stride(1), q.stride(2)), (out.stride(0), out.stride(1), out.stride(2))
        self.q_s, self.o_s = q_s, o_s
        self.uniform_q_len = 0 if varlen else q.shape[1]
        self.varlen = varlen
        self.scale = scale * LOG2E
        s = num_splits
        self.p_s = (spec.q_len * hq * s, s, hq * s)  # partial strides: batch, head, token
        self.kv = kv_strides(k_cache, spec.layout, spec.kv_packed)
        self.feature_args, self.merge_args = features.kernel_args(), features.merge_args()
        self.opts = dict(BLOCK_N=config.block_n, SPLIT_SIZE=self.split_size, DOT_FP32=interpreting(),
                         VARLEN=varlen, num_warps=config.num_warps, num_stages=config.num_stages)
        self.merge_opts = dict(SPLIT_SIZE=self.split_size, SPLITS_PAD=next_pow2(num_splits), VARLEN=varlen,
                               num_warps=4)
        self.scratch = self._scratch(q.device) if own_scratch and self.split_size else None

    def _scratch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        part_out = torch.empty(self.shape, dtype=torch.float32, device=device)
        return part_out, torch.empty(self.shape[:4], dtype=torch.float32, device=device)

    def __call__(self, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out) -> None:
        if self.split_size:
            part_out, part_lse = self.scratch or self._scratch(q.device)
        else:
            part_out = part_lse = out  # unused by the kernel when SPLIT_SIZE == 0
        cu = cu_seqlens_q if self.varlen else seq_lens  # (not read unless VARLEN)
        (sqb, sqt, sqh), (sob, sot, soh), (spb, sph, spt) = self.q_s, self.o_s, self.p_s
        self.decode(q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens, self.scale,
                    *self.feature_args, sqb, sqh, sob, soh, block_tables.stride(0), *self.kv, spb, sph,
                    cu, self.uniform_q_len, sqt, sot, spt, **self.opts)
        if self.split_size:
            self.merge(out, part_out, part_lse, seq_lens, *self.merge_args, sob, soh, spb, sph,
                       cu, self.uniform_q_len, sot, spt, **self.merge_opts)


class VerifyPlan:
    """paged_verify with its checks done once, for a serving loop or a CUDA graph (fixed q_len).

    Built from example tensors (q [B, q_len, Hq, D], or [total_q, Hq, D] with cu_seqlens_q and
    max_q_len), it validates them as paged_verify does, picks the kernel (dispatch.attention_path)
    and config, and precomputes the launch. `run()` then launches with no checks and no host sync:
    the tensors given to it must match the planned ones in shape, dtype, strides and device (their
    contents: block tables, lengths, cu_seqlens_q, cached K/V, may change freely; with cu_seqlens_q
    every sequence must keep at most max_q_len new tokens and the total must stay q.shape[0]). The
    split-KV scratch belongs to the plan: one plan must not run on two streams at once. Features
    are fixed by the plan (tensor contents may change). Shapes that attention_path sends to extend
    are refused: plan paged_extend for those.
    """

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, cu_seqlens_q: torch.Tensor | None = None, max_q_len: int | None = None,
                 layout: str = "NHD", scale: float | None = None, config: Config | None = None,
                 max_seq_len: int | None = None, sum_seq_lens: int | None = None,
                 sliding_window: int | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None) -> None:
        b, ql, varlen = _as_rows(q, cu_seqlens_q, max_q_len)
        feats = dict(sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
        hk = k_cache.shape[2] if layout == "NHD" else k_cache.shape[1]
        spec_q = attention_path(ql, q.shape[-2] // max(1, hk), q.shape[-1])
        if spec_q == 0:
            raise ValueError(f"max q_len {ql} with {q.shape[-2]} query heads over {hk} KV heads is past the verify "
                             f"path (at most q_len {Q_LENS[-1]}, rows permitting): plan paged_extend instead")
        self._decode: DecodePlan | None = None
        self._launch: _Launcher | None = None
        self.varlen, self.q_dim = varlen, q.dim()
        if spec_q == 1 and (not varlen or q.shape[0] == b):
            q3 = q[:, 0] if q.dim() == 4 else q
            self._decode = DecodePlan(q3, k_cache, v_cache, block_tables, seq_lens, layout=layout, scale=scale,
                                      config=config, max_seq_len=max_seq_len, sum_seq_lens=sum_seq_lens, **feats)
            self.spec, self.config = self._decode.spec, self._decode.config
            return
        features = _features(q, **feats)
        self.spec = verify_spec(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max(2, spec_q), layout,
                                features)
        self.config, ctx_bound = _config(self.spec, b, block_tables, max_seq_len,
                                         _ragged(b, max_seq_len, sum_seq_lens), ql, features, config, q.shape[-2])
        self._launch = _Launcher(self.spec, self.config, q, varlen, k_cache, q, _scale(scale, q.shape[-1]),
                                 ctx_bound, features, own_scratch=True, batch=b)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """out shaped like q = the verify attention (see paged_verify); unchecked. `out`, when given,
        must have q's shape, dtype and strides (the plan baked in q's strides for it)."""
        if out is None:
            out = torch.empty_like(q)
        if self._decode is not None:
            q3, o3 = (q[:, 0], out[:, 0]) if self.q_dim == 4 else (q, out)
            self._decode.run(q3, k_cache, v_cache, block_tables, seq_lens, out=o3)
        else:
            assert self._launch is not None
            self._launch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out)
        return out
