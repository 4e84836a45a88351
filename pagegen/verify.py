"""The public multi-token decode op (speculative verify, issue 17): validate, route, launch.

A verify step scores 2..16 new tokens per sequence (draft tokens, MTP heads, n-gram guesses) against
the sequence's whole cached context. It reads the same KV as a one-token decode step, so it runs on
the decode kernel rendered with a q_len axis (KernelSpec.q_len, templates/decode.py.j2): the q_len x
group query rows of a KV head share one program (the M dim of tl.dot), each K/V page is read once per
KV head and split, and split-KV partitions long contexts as in decode. It computes the same function
as paged_extend (one set of math: pagegen.reference.paged_extend_ref is the ground truth of both);
`dispatch.attention_path` decides by shape which kernel runs: one-token decode, this one, or extend.

Design decision: a sibling op of paged_decode rather than a 4-dim form of it, so paged_decode's
signature, plan cache and checks stay as they are; for q_len == 1 it hands over to paged_decode
(and DecodePlan), for queries too long for one program to paged_extend (and ExtendPlan).
"""

from __future__ import annotations

import dataclasses
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
from pagegen.decode import DecodePlan, paged_decode
from pagegen.dispatch import attention_path, is_ragged, select_config
from pagegen.extend import ExtendPlan, check_extend_lengths, paged_extend
from pagegen.features import NO_FEATURES, Features, call_features
from pagegen.kv_ops import scale_args
from pagegen.runtime import RUNTIME
from pagegen.spec import Q_LENS, Config, KernelSpec, next_pow2

__all__ = ["VerifyPlan", "paged_verify", "verify_route"]


def _shape(q: object, cu_seqlens_q: object, max_q_len: int | None) -> tuple[int, int, bool]:
    """(batch, most new tokens of a sequence, varlen) of a verify call, from q's form:
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
    check_max_len("max_q_len", max_q_len, total_q, f"q.shape[0]={total_q} (the total of all query tokens)")
    return cu_seqlens_q.shape[0] - 1, total_q if max_q_len is None else max_q_len, True


def verify_route(q: torch.Tensor, k_cache: torch.Tensor, layout: str, batch: int, max_q_len: int,
                 varlen: bool) -> int:
    """The kernel of a call (dispatch.attention_path on its shapes): 1 one-token decode, 2..16 the
    decode spec's q_len, 0 extend. Varlen calls with at most one token a sequence take one-token decode
    only when every sequence has one (q rows == batch); otherwise the q_len-2 kernel, which skips
    sequences without new tokens. Bad arguments route to the verify kernel, whose checks name them."""
    try:
        hk = k_cache.shape[2 if layout == "NHD" else 1]
        path = attention_path(max_q_len, q.shape[-2] // max(1, hk), q.shape[-1])
    except (AttributeError, IndexError, TypeError):
        return max(2, next_pow2(min(max_q_len, Q_LENS[-1])))
    if path == 1 and varlen and q.shape[0] != batch:
        return 2
    return path


@dataclass(frozen=True, slots=True)
class _Planned:
    """What the checks of one verify call signature decided (cached per signature by the runtime)."""

    spec: KernelSpec
    config: Config
    ctx_bound: int  # keys the new tokens of a sequence see together at most: sizes the split grid
    copies: tuple[bool, ...]  # (seq_lens, block_tables[, cu_seqlens_q]) are strided: the one-shot op copies


def _ragged(b: int, max_seq_len: int | None, sum_seq_lens: int | None) -> bool:
    """Check the host-side length hints; whether the batch is ragged (dispatch.is_ragged)."""
    check_length_hints(b, max_seq_len, sum_seq_lens)
    return is_ragged(b, max_seq_len, sum_seq_lens) if sum_seq_lens is not None else False


def _plan(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, layout: str, config: Config | None,
          q_len: int, spec_q: int, max_seq_len: int | None, ragged: bool, *, copy: bool,
          features: Features = NO_FEATURES) -> _Planned:
    """Every check that depends only on host-side metadata, and the config of the q_len-`spec_q`
    decode kernel: once per call signature (paged_verify's cache) or once per VerifyPlan."""
    extra = None if cu_seqlens_q is None else {"cu_seqlens_q": cu_seqlens_q}
    spec = attention_spec("decode", q[:, 0] if q.dim() == 4 else q, k_cache, v_cache, block_tables, seq_lens, layout,
                          extra=extra, features=features)
    spec = dataclasses.replace(spec, q_len=spec_q)
    b = seq_lens.shape[0]
    if q.dim() == 4 and q.shape[0] != b:
        raise ValueError(f"q has batch {q.shape[0]} but seq_lens has {b} sequences")
    if cu_seqlens_q is not None and cu_seqlens_q.shape[0] != b + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries; expected batch + 1 = {b + 1} "
                         "(query-token offsets, starting at 0)")
    bound = features.effective_ctx(ctx_bound(max_seq_len, block_tables, spec.block_size), q_len)
    metas = (("seq_lens", seq_lens), ("block_tables", block_tables))
    copies = strided_metadata(metas + ((("cu_seqlens_q", cu_seqlens_q),) if extra else ()), copy=copy)
    if config is None:
        config = select_config(spec, b, bound, q.shape[-2] // spec.group_size, ragged)
    else:
        check_config(spec, config)
    return _Planned(spec, config, bound, copies)



def _uniform_cu(b: int, q_len: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens_q of b sequences of q_len new tokens each: [b + 1] int32."""
    return torch.arange(0, (b + 1) * q_len, q_len, dtype=torch.int32, device=device)


def _check_lengths(q: torch.Tensor, cu_seqlens_q: torch.Tensor | None, seq_lens: torch.Tensor, b: int,
                   q_len: int) -> None:
    """Full check of the query counts against q and seq_lens (reads them: syncs)."""
    cu = cu_seqlens_q if cu_seqlens_q is not None else _uniform_cu(b, q_len, seq_lens.device)
    total = q.shape[0] if cu_seqlens_q is not None else b * q_len
    check_extend_lengths(cu, seq_lens, total, q_len)


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
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's few new tokens (a speculative verify step) over its paged KV.

    q: [B, q_len, Hq, D] (every sequence q_len new tokens) or [total_q, Hq, D] with cu_seqlens_q
    [B + 1] int32 (sequence b owns rows cu_seqlens_q[b] .. cu_seqlens_q[b+1], 0 rows allowed;
    max_q_len: a host-side bound of the per-sequence counts, default total_q); fp16/bf16, last dim
    contiguous. k_cache, v_cache: the pool in `layout` (as paged_decode, views of one K|V tensor
    included); block_tables: [B, max_blocks] int32; seq_lens: [B] int32 tokens cached per sequence
    INCLUDING the new ones, whose K/V must be in the pool already (kv_write). New token i of a
    sequence with n new tokens sits at position p = seq_len - n + i and attends to positions 0..p
    (causal, lower-right aligned: paged_extend's function). Returns out shaped like q =
    softmax(q k^T * scale + causal mask) v; query head h uses KV head h // (Hq / Hkv); scale: a
    finite number > 0, default 1/sqrt(D).

    Features as in paged_decode (sliding_window W: token p sees positions p - W + 1 .. p); fp8 pools
    take k_scale/v_scale as paged_decode does (required there, refused otherwise). The kernel
    is chosen by shape (verify_route, dispatch.attention_path): one token a sequence -> paged_decode;
    up to 16 (rows permitting) -> the decode kernel with q_len rows a sequence and split-KV; longer
    -> paged_extend. config: a Config for the chosen kernel (decode's or verify's; ignored when
    routed to extend). max_seq_len / sum_seq_lens: host-side length hints as in paged_decode.
    Strided metadata views are copied packed first. validate: also check the contents (reads them:
    syncs): offsets, counts against seq_lens, lengths and block ids against the tables and pool; on
    a GPU without it these are undefined behaviour, as in paged_extend. CPU tensors are always checked.
    """
    b, ql, varlen = _shape(q, cu_seqlens_q, max_q_len)
    path = verify_route(q, k_cache, layout, b, ql, varlen)
    feats = dict(sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    given_scales = dict(k_scale=k_scale, v_scale=v_scale) if k_scale is not None or v_scale is not None else {}
    out = check_out(out, q)
    if path == 1:  # one token a sequence: the one-token decode kernel (q [B, 1, Hq, D] or [B, Hq, D])
        q3, o3 = (q[:, 0], out[:, 0]) if q.dim() == 4 else (q, out)
        if varlen and (validate or q.device.type == "cpu"):  # every sequence must have exactly its one row
            _check_lengths(q, cu_seqlens_q, seq_lens, b, ql)
        paged_decode(q3, k_cache, v_cache, block_tables, seq_lens, layout=layout, scale=scale, out=o3, config=config,
                     max_seq_len=max_seq_len, sum_seq_lens=sum_seq_lens, validate=validate, **feats, **given_scales)
        return out
    if path == 0:  # long queries: extend, on the packed form
        hq, d = q.shape[-2:]
        cu = cu_seqlens_q if varlen else _uniform_cu(b, ql, q.device)
        q3 = q if varlen else q.reshape(b * ql, hq, d)
        o3 = out if varlen or not out.is_contiguous() else out.view(b * ql, hq, d)
        res = paged_extend(q3, k_cache, v_cache, block_tables, cu, seq_lens, layout=layout, scale=scale,
                           out=o3 if o3.dim() == 3 else None, max_q_len=ql, max_seq_len=max_seq_len,
                           validate=validate, **feats, **given_scales)
        if o3.dim() == 4:
            out.copy_(res.view(out.shape))
        return out
    features = call_features(q, **feats)
    ragged = _ragged(b, max_seq_len, sum_seq_lens)
    try:
        key = (
            features.plan_key(), layout, config, max_seq_len, ragged, ql, path, q.shape, q.dtype, q.device, q.stride(),
            k_cache.shape, k_cache.dtype, k_cache.device, k_cache.stride(), v_cache.shape, v_cache.dtype,
            v_cache.device, v_cache.stride(), block_tables.shape, block_tables.dtype, block_tables.device,
            block_tables.stride(), seq_lens.shape, seq_lens.dtype, seq_lens.device, seq_lens.stride(),
            None if cu_seqlens_q is None else signature(cu_seqlens_q),
        )
        plan = RUNTIME.lookup("verify", key)
    except (AttributeError, TypeError):  # not tensors, or an unhashable config: the full checks say what is wrong
        key, plan = None, None
    if plan is None:
        generation = RUNTIME.generation
        plan = _plan(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, layout, config, ql, path, max_seq_len,
                     ragged, copy=True, features=features)
        if key is not None:
            RUNTIME.store("verify", key, plan, generation)
    scales = scale_args(plan.spec, k_scale, v_scale, q.shape[-2] // plan.spec.group_size, k_cache)
    if plan.copies[0]:
        seq_lens = seq_lens.contiguous()
    if plan.copies[1]:
        block_tables = block_tables.contiguous()
    if varlen and plan.copies[2]:
        cu_seqlens_q = cu_seqlens_q.contiguous()
    if validate or q.device.type == "cpu":
        _check_lengths(q, cu_seqlens_q, seq_lens, b, ql)
        check_capacity(block_tables, seq_lens, plan.spec.block_size, k_cache.shape[0], max_seq_len)
    scale = check_scale(scale, q.shape[-1])
    if b and q.numel():
        _Launcher(plan.spec, plan.config, q, varlen, k_cache, out, scale, plan.ctx_bound, features, batch=b)(
            q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, scales)
    return out


class _Launcher:
    """A verify launch's metadata-only parts (kernels, grids, strides, constexprs, split scratch),
    computed once; calling it launches decode_kernel (+ merge_kernel when split). No host sync."""

    def __init__(self, spec: KernelSpec, config: Config, q: torch.Tensor, varlen: bool, k_cache: torch.Tensor,
                 out: torch.Tensor, scale: float, ctx_bound: int, features: Features = NO_FEATURES,
                 own_scratch: bool = False, *, batch: int) -> None:
        mod = codegen.load(spec)
        hq = q.shape[-2]
        num_splits = triton.cdiv(ctx_bound, config.split_size) if config.split_size else 1
        self.split_size = config.split_size if num_splits > 1 else 0
        self.num_splits = num_splits
        self.shape = (batch, spec.q_len, hq, num_splits, spec.head_dim_padded)  # split-KV partial outputs
        self.decode = mod.decode_kernel[(batch, hq // spec.group_size, num_splits)]
        self.merge = mod.merge_kernel[(batch, hq, spec.q_len)]
        if varlen:  # q/out rows are tokens: (batch stride 0, token stride, head stride)
            self.q_s, self.o_s = (0, q.stride(0), q.stride(1)), (0, out.stride(0), out.stride(1))
        else:
            self.q_s, self.o_s = (q.stride(0), q.stride(1), q.stride(2)), (out.stride(0), out.stride(1), out.stride(2))
        self.uniform_q_len = 0 if varlen else q.shape[1]
        self.varlen = varlen
        self.scale = scale * LOG2E
        self.p_s = (spec.q_len * hq * num_splits, num_splits, hq * num_splits)  # partials: batch, head, token
        self.kv = kv_strides(k_cache, spec.layout, spec.kv_packed)
        self.feature_args, self.merge_args = features.kernel_args(), features.merge_args()
        self.opts = dict(BLOCK_N=config.block_n, SPLIT_SIZE=self.split_size, DOT_FP32=upcast_dots(spec),
                         VARLEN=varlen, num_warps=config.num_warps, num_stages=config.num_stages)
        self.merge_opts = dict(SPLIT_SIZE=self.split_size, SPLITS_PAD=next_pow2(num_splits), VARLEN=varlen,
                               num_warps=4)
        self.scratch = self._scratch(q.device) if own_scratch and self.split_size else None

    def _scratch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        part_out = torch.empty(self.shape, dtype=torch.float32, device=device)
        return part_out, torch.empty(self.shape[:4], dtype=torch.float32, device=device)

    def __call__(self, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out,
                 scales: tuple[tuple, tuple] = ((), ())) -> None:
        if self.split_size:
            part_out, part_lse = self.scratch or self._scratch(q.device)
        else:
            part_out = part_lse = out  # unused by the kernel when SPLIT_SIZE == 0
        cu = cu_seqlens_q if self.varlen else seq_lens  # (not read unless VARLEN)
        (sqb, sqt, sqh), (sob, sot, soh), (spb, sph, spt) = self.q_s, self.o_s, self.p_s
        scale_ptrs, scale_strides = scales  # fp8 pools only
        self.decode(q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens, *scale_ptrs, self.scale,
                    *self.feature_args, sqb, sqh, sob, soh, cu, self.uniform_q_len, sqt, sot, spt,
                    block_tables.stride(0), *self.kv, spb, sph, *scale_strides, **self.opts)
        if self.split_size:
            self.merge(out, part_out, part_lse, seq_lens, *self.merge_args, sob, soh, spb, sph,
                       cu, self.uniform_q_len, sot, spt, **self.merge_opts)


class VerifyPlan:
    """paged_verify with its checks done once, for a serving loop or a CUDA graph (fixed q_len).

    Built from example tensors (q [B, q_len, Hq, D], or [total_q, Hq, D] with cu_seqlens_q and
    max_q_len), it validates them as paged_verify does (strided metadata is refused: give it packed
    tensors), picks the kernel (verify_route) and its config (kept for the plan's life), and
    precomputes the launch; a one-token shape plans a DecodePlan, a long-query shape an ExtendPlan
    (uniform q must then be viewable as [B * q_len, Hq, D]). `run()` compares the layout of its
    arguments with the plan's (shape, strides, dtype, device: host-side, no sync), raises ValueError
    on a mismatch, then launches. Contents (block tables, lengths, cu_seqlens_q, cached K/V) may
    change freely between runs; what run cannot check without reading them is undefined unless
    `run(..., validate=True)`: offsets not running from 0 to total_q or decreasing, a sequence with
    more than max_q_len new tokens or more than its seq_len, lengths beyond the tables' capacity or
    above max_seq_len, block ids outside the pool. `out` given to run() must be laid out like the
    plan's `out` (the example given here, else a contiguous tensor of q's shape). The split-KV scratch
    belongs to the plan: one plan must not run on two streams at once. Features are fixed by the
    plan (the sinks' and slopes' contents may change). fp8 pools: k_scale/v_scale as in paged_verify,
    read at every run; run() may take other scale tensors (another layer's).
    """

    _NAMES = ("q", "k_cache", "v_cache", "block_tables", "seq_lens", "cu_seqlens_q")

    def __init__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, *, cu_seqlens_q: torch.Tensor | None = None, max_q_len: int | None = None,
                 layout: str = "NHD", scale: float | None = None, config: Config | None = None,
                 max_seq_len: int | None = None, sum_seq_lens: int | None = None, out: torch.Tensor | None = None,
                 sliding_window: int | None = None, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None,
                 k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        b, ql, varlen = _shape(q, cu_seqlens_q, max_q_len)
        self.path = verify_route(q, k_cache, layout, b, ql, varlen)
        feats = dict(sliding_window=sliding_window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
        given_scales = dict(k_scale=k_scale, v_scale=v_scale) if k_scale is not None or v_scale is not None else {}
        out = check_out(out, q)
        self._out = signature(out)
        self._b, self._ql, self._varlen, self._dim = b, ql, varlen, q.dim()
        self.max_seq_len = max_seq_len
        self._inner: DecodePlan | ExtendPlan | None = None
        if self.path == 1:
            q3, o3 = (q[:, 0], out[:, 0]) if q.dim() == 4 else (q, out)
            self._inner = DecodePlan(q3, k_cache, v_cache, block_tables, seq_lens, layout=layout, scale=scale,
                                     config=config, max_seq_len=max_seq_len, sum_seq_lens=sum_seq_lens, out=o3, **feats,
                                     **given_scales)
        elif self.path == 0:
            self._cu = cu_seqlens_q if varlen else _uniform_cu(b, ql, q.device)
            q3, o3 = (q, out) if varlen else (self._flat(q, "q"), self._flat(out, "out"))
            self._inner = ExtendPlan(q3, k_cache, v_cache, block_tables, self._cu, seq_lens, layout=layout,
                                     scale=scale, max_q_len=ql, max_seq_len=max_seq_len, out=o3, **feats,
                                     **given_scales)
        if self._inner is not None:
            self.spec, self.config = self._inner.spec, self._inner.config
            return
        features = call_features(q, **feats)
        planned = _plan(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, layout, config, ql, self.path,
                        max_seq_len, _ragged(b, max_seq_len, sum_seq_lens), copy=False, features=features)
        self.spec, self.config = planned.spec, planned.config
        self._kv_heads, self._pool = q.shape[-2] // self.spec.group_size, k_cache
        self._scales = scale_args(self.spec, k_scale, v_scale, self._kv_heads, k_cache)
        tensors = (q, k_cache, v_cache, block_tables, seq_lens) + ((cu_seqlens_q,) if varlen else ())
        self._planned = tuple(signature(t) for t in tensors)
        self._launch = _Launcher(self.spec, self.config, q, varlen, k_cache, out, check_scale(scale, q.shape[-1]),
                                 planned.ctx_bound, features, own_scratch=True, batch=b)

    def _flat(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """[B, q_len, Hq, D] as a view [B * q_len, Hq, D] (extend's packed form)."""
        try:
            return t.view(self._b * self._ql, t.shape[2], t.shape[3])
        except RuntimeError as exc:
            raise ValueError(f"{name} (strides {t.stride()}) cannot be viewed as [B * q_len, Hq, D], which the "
                             "extend path of a long-query plan needs: give it a tensor whose first two dims merge "
                             "(e.g. .contiguous())") from exc

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
            validate: bool = False, k_scale: torch.Tensor | None = None,
            v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """out shaped like q = the verify attention (see paged_verify) on tensors laid out like the
        plan's (checked, no sync); validate=True also checks their contents (syncs)."""
        if out is None:
            shape, strides, dtype, device = self._out
            out = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        else:
            check_like(("out",), (self._out,), (out,))
        if (cu_seqlens_q is None) == self._varlen:
            raise ValueError("cu_seqlens_q must be given to run() exactly when the plan was built with it")
        if validate and self._varlen:
            _check_lengths(q, cu_seqlens_q, seq_lens, self._b, self._ql)
        given_scales = dict(k_scale=k_scale, v_scale=v_scale) if k_scale is not None or v_scale is not None else {}
        if isinstance(self._inner, DecodePlan):
            q3, o3 = (q[:, 0], out[:, 0]) if self._dim == 4 else (q, out)
            self._inner.run(q3, k_cache, v_cache, block_tables, seq_lens, out=o3, validate=validate, **given_scales)
            return out
        if isinstance(self._inner, ExtendPlan):
            q3, o3, cu = (q, out, cu_seqlens_q) if self._varlen else (self._flat(q, "q"), self._flat(out, "out"),
                                                                        self._cu)
            self._inner.run(q3, k_cache, v_cache, block_tables, cu, seq_lens, out=o3, validate=validate,
                            **given_scales)
            return out
        given = (q, k_cache, v_cache, block_tables, seq_lens) + ((cu_seqlens_q,) if self._varlen else ())
        check_like(self._NAMES[:len(given)], self._planned, given)
        if validate:
            if not self._varlen:
                _check_lengths(q, cu_seqlens_q, seq_lens, self._b, self._ql)
            check_capacity(block_tables, seq_lens, self.spec.block_size, k_cache.shape[0], self.max_seq_len)
        scales = self._scales
        if given_scales:
            scales = scale_args(self.spec, k_scale, v_scale, self._kv_heads, self._pool)
        self._launch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, out, scales)
        return out
