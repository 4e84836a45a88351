"""Extend (prefill / chunked prefill over a paged prefix) benchmark: pagegen against the fastest torch SDPA.

Workload: bf16, head_dim 128 (--head-dim 64 or 256), 32 query heads / 8 KV heads (group 4), block_size 16
(--block-size), one sequence
whose pages sit at shuffled physical blocks. A shape `Q@C` extends Q new tokens over C cached
prefix tokens (the new tokens' K/V already in the pool, as kv_write leaves them); new token i sees
the prefix and new tokens 0..i: causal aligned to the lower right.
A batch shape `Bx[q0,q1]@[c0,c1]` (alias `batch16` = 16x[64,1024]@[0,8192], the issue's chunked-prefill
step) is B sequences whose new-token counts are uniform in [q0, q1] and prefixes uniform in [c0, c1]
(integers, drawn from torch.Generator seed BATCH_SEED: the same lengths in every run; printed with their
sums), every sequence's pages shuffled in one pool, extended by ONE paged_extend launch over the varlen
batch (cu_seqlens_q, seq_lens). Its baselines: SDPA has no varlen form, so sdpa-<backend> is one call per
sequence (each timed alone with the single-sequence sweep below) summed over the sequences, and
sdpa-best the sum of each sequence's fastest backend and form; flex is FlexAttention over the packed
tokens made contiguous with a document + lower-right causal block mask; baseline-best names the faster.
Implementations (--impls):
  sdpa     torch SDPA on the same tokens made contiguous ([1, H, n, D]) with torch's own backend
           choice and with each backend alone (cudnn, flash, efficient; math where its score
           matrix is small), rows sdpa-<backend> and sdpa-best naming the fastest. The lower-right
           mask is spelled three ways, each tried on every backend and the fastest kept: Q == C + Q
           (no prefix): is_causal=True (upper-left = lower-right when square); otherwise
           torch.nn.attention.bias.causal_lower_right (torch routes it to flash or efficient, else
           materialises it) and an explicit bool [Q, C + Q] mask. Native GQA (enable_gqa); K/V
           heads repeated only for a backend that takes no GQA form. A backend that refuses every
           form is "n/a (reason)".
  flex     FlexAttention over torch's experimental PagedAttention page table (compiled; its pool
           is [1, Hkv, pages * 16, D] holding the same pages; page 16 forces its BLOCK_N to 16);
           on a batch shape (always run there), the packed contiguous tokens with a document mask
  pagegen  pagegen.paged_extend with the dispatcher's config (tuned table, else heuristic)
  default  pagegen.paged_extend with the heuristic config (what runs without a tuned table)
  default-tma  the heuristic config with kv_tma=1 (K/V through tensor descriptors; needs --block-size >= 64)
  best     (--tune) pagegen with the fastest config of a small grid, per shape (kv_tma 0 and 1 where legal)
  pagegen-bf16  with --kv-dtype: pagegen on the bf16 pool with its own config (the fp8 rows' ratio base)
--kv-dtype fp8_e4m3 / fp8_e5m2: the pagegen rows (pagegen, default, default-tma, best) read an fp8 copy of
the pool (per-tensor absmax scales, pagegen.reference.quantize_fp8_ref) and are checked against the
emulating reference (paged_extend_fp8_ref: the kernel's own error); SDPA, flex and pagegen-bf16 run on the
bf16 K/V the fp8 pool was quantized from.
FLOPs count only unmasked work: pairs = Q*C + Q*(Q+1)/2 (query, key) pairs, summed over a batch's
sequences, 4 * pairs * D * Hq (QK^T and PV), for every implementation alike (a backend that computes
masked tiles gets no credit for them). Limit: the bf16 matrix rate measured in the same run (8192^3
matmul on random data).
Every implementation is checked against the float64 reference (the last 64 rows of each sequence) and
pagegen also against SDPA on all rows before it is timed. Timing: bench.common.timeit (pagegen.timing:
CUDA-graph replay, L2 flushed before every run; CUDA events where a graph cannot be captured).
Prefix caching: 512@4096 (a cached 4096-token system prompt plus 512 new tokens) vs 4608@0 (full
causal prefill of all 4608) through the same op; target ratio <= 0.25. Targets checked in the summary
(issue 18): a batch shape's pagegen >= 400 TFLOP/s; at head_dim 64/256, pagegen >= 0.9x the fastest
SDPA on a shape with no prefix.

    python bench/extend.py [--shapes 2048@0,2048@4096,2048@16384,512@4096,4608@0] [--impls sdpa,flex,pagegen]
    python bench/extend.py --tune          # + a small config grid per shape (about a minute more)
    python bench/extend.py --cpu-smoke     # tiny shapes (a batch among them), then one at head_dim 64 (unless
                                           # --head-dim), in Triton's CPU interpreter (dry run; 2nd JSON: -hd64)
    python bench/extend.py --block-size 64 --impls sdpa,default,default-tma   # gather vs TMA K/V at pages of 64
    python bench/extend.py --shapes batch16 --impls sdpa,flex,pagegen,default   # the chunked-prefill batch
    python bench/extend.py --head-dim 64 --shapes 2048@0,4608@0 --impls sdpa,pagegen,default
    python bench/extend.py --kv-dtype fp8_e4m3 --impls sdpa,pagegen,pagegen-bf16,default   # an fp8 pool
Writes bench/results/extend-<gpu>-<date>.json and a .log beside it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv  # before torch/triton are imported: the interpreter must be on first
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pagegen  # noqa: E402
from bench import baselines  # noqa: E402
from bench.common import meta_line, result_path, run_meta, tee_log, timeit, write_json  # noqa: E402
from bench.extend_flex import run_flex, run_flex_varlen  # noqa: E402
from bench.extend_shapes import (  # noqa: E402  (BATCHES, parse_shape: re-exported for callers)
    BATCH_SEED,
    BATCHES,  # noqa: F401
    causal_pairs,
    describe_batch,
    parse_batch,
    parse_shape,  # noqa: F401
    seq_lengths,
    split_shapes,
    summarize,
    with_fastest_baseline,
)
from pagegen.reference import absmax_scale_ref, paged_extend_fp8_ref, paged_extend_ref, quantize_fp8_ref  # noqa: E402
from pagegen.spec import KV_TMA_VALUES, Config, KernelSpec, illegal_reason  # noqa: E402

SHAPES = ["2048@0", "2048@4096", "2048@16384", "512@4096", "4608@0"]
SMOKE_SHAPES = ["24@0", "24@40", "8@40", "48@0", "3x[4,40]@[0,40]"]
SMOKE_HEAD_DIM = 64  # --cpu-smoke's second pass runs SMOKE_HEAD_DIM_SHAPES at this head_dim
SMOKE_HEAD_DIM_SHAPES = ["16@0"]
FLEX_SHAPES = ("2048@0", "2048@4096", "2048@16384")
HEAD_DIMS = (64, 128, 256)  # --head-dim choices: issue 18's targets
HQ, HK, D, BS = 32, 8, 128, 16  # BS, D: --block-size, --head-dim set them (and SPEC) before anything runs
KV_DTYPE = ""  # --kv-dtype: "" (the bf16 pool) or an fp8 format the pagegen rows read (configure sets it)
FP8_TORCH = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
DTYPE = torch.bfloat16
SPEC = KernelSpec("extend", head_dim=D, block_size=BS, dtype="bf16", group_size=HQ // HK)
BF16_SPEC = SPEC  # the bf16 pool's spec (pagegen-bf16)
WARMUP = 5  # untimed runs before each timing (--cpu-smoke: 1, the interpreter's times mean nothing)
# stages 2 vs 5: Triton's pipeliner double-buffers the gathered K/V tiles only from num_stages=5
# (compiled for sm_90 with triton 3.6 and 3.9: 2-4 issue the next tile's loads after this tile's dots);
# stage 3 for the TMA path (it prefetches the next tile's boxes from 3 stages on: bench/NOTES.md).
# kv_tma=1 configs are legal only at pages >= 64 (illegal_reason drops them at block 16).
TUNE_GRID = [
    Config(block_m=m, block_n=n, num_warps=w, num_stages=s, kv_tma=t)
    for m, n, w, s, t in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 5), KV_TMA_VALUES)
    if (w == 8 or (m == 64 and n <= 64))  # 4 warps spill with a 128-row tile or 128-key tiles
    and (s != 3 or t)  # 3 stages only for the TMA path (the gather's 3 is its 2)
]


def configure(block_size: int = 16, head_dim: int = 128, kv_dtype: str = "") -> None:
    """Run the benchmark at pages of `block_size` tokens and `head_dim`, the pagegen rows on a `kv_dtype` pool
    ("" bf16, or fp8_e4m3 / fp8_e5m2) (BS, D, KV_DTYPE, SPEC; the shapes' tokens and head counts stay)."""
    global BS, D, KV_DTYPE, SPEC, BF16_SPEC
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} is not benchmarked; expected one of {HEAD_DIMS}")
    if kv_dtype and kv_dtype not in FP8_TORCH:
        raise ValueError(f"kv_dtype={kv_dtype!r}: expected '' or one of {sorted(FP8_TORCH)}")
    BS, D, KV_DTYPE = block_size, head_dim, kv_dtype
    BF16_SPEC = KernelSpec("extend", head_dim=D, block_size=BS, dtype="bf16", group_size=HQ // HK)
    SPEC = replace(BF16_SPEC, kv_dtype=kv_dtype)


def with_tma(cfg: Config) -> Config:
    """`cfg` with K/V through tensor descriptors (kv_tma=1), its key tile cut to one page if larger."""
    return replace(cfg, kv_tma=1, block_n=min(cfg.block_n, BS))
TOL = baselines.TOL  # bf16 relative error vs SDPA / the float64 reference
REF_ROWS = 64  # the last rows of each sequence checked against the float64 reference
MATH_MAX_SCORES = 1 << 29  # the math backend materialises Hq x Q x (C + Q) fp32 scores: 2 GiB at most
DEV = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"  # cpu: --cpu-smoke, or imported by CPU tests


def make_inputs(shape: str, seed: int = 0) -> dict:
    """The sequences of a shape in one shuffled NHD pool, their queries, and each one's K/V contiguous.

    q [total_q, HQ, D] (sequence b owns rows cu[b]..cu[b+1]), k/v [blocks + 8, BS, HK, D], bt [B, max
    blocks] (each sequence's pages at random physical blocks; unused entries name a block no sequence
    uses), sl [B] tokens cached including the new ones; for one sequence also qc [1, HQ, Q, D], kc/vc
    [1, HK, C + Q, D] (SDPA's contiguous copies), q_len, ctx; for a batch "seqs", one such dict a
    sequence (views of the batch's tensors). tail_idx: the rows checked against the float64 reference
    (each sequence's last 64), tail_cu its offsets per sequence.
    """
    q_lens, ctxs = seq_lengths(shape)
    ns = [q + c for q, c in zip(q_lens, ctxs, strict=True)]
    nbs = [-(-n // BS) for n in ns]
    total = sum(nbs)
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(total + 8, BS, HK, D, device=DEV, dtype=DTYPE)
    v = torch.randn(total + 8, BS, HK, D, device=DEV, dtype=DTYPE)
    perm = torch.randperm(total + 8, generator=g)
    bt = torch.full((len(ns), max(nbs)), int(perm[total]), dtype=torch.int32)
    starts = [sum(nbs[:i]) for i in range(len(nbs))]
    for i, (s, nb) in enumerate(zip(starts, nbs, strict=True)):
        bt[i, :nb] = perm[s:s + nb]
    bt = bt.to(DEV)
    q = torch.randn(sum(q_lens), HQ, D, device=DEV, dtype=DTYPE)
    cu = [sum(q_lens[:i]) for i in range(len(q_lens) + 1)]
    pool8: dict = {}  # --kv-dtype: the fp8 pool of the same values and its scales (the pagegen rows read it)
    if KV_DTYPE:
        fp8 = FP8_TORCH[KV_DTYPE]
        ks, vs = absmax_scale_ref(k, fp8), absmax_scale_ref(v, fp8)
        pool8 = dict(k8=quantize_fp8_ref(k, ks, fp8), v8=quantize_fp8_ref(v, vs, fp8),
                     scales={"k_scale": ks, "v_scale": vs})
    seqs, tail_idx, tail_cu = [], [], [0]
    for i, (q_len, ctx, n, nb) in enumerate(zip(q_lens, ctxs, ns, nbs, strict=True)):
        r = min(REF_ROWS, q_len)
        tail_idx += range(cu[i + 1] - r, cu[i + 1])
        tail_cu.append(tail_cu[-1] + r)
        qi = q[cu[i]:cu[i + 1]]
        # contiguous copies for SDPA (not timed): [1, H, tokens, D]
        kc = k[bt[i, :nb].long()].reshape(-1, HK, D)[:n].transpose(0, 1)[None].contiguous()
        vc = v[bt[i, :nb].long()].reshape(-1, HK, D)[:n].transpose(0, 1)[None].contiguous()
        seqs.append(dict(q=qi, k=k, v=v, **pool8, bt=bt[i:i + 1],
                         cu=torch.tensor([0, q_len], dtype=torch.int32, device=DEV),
                         sl=torch.tensor([n], dtype=torch.int32, device=DEV), qc=qi.transpose(0, 1)[None].contiguous(),
                         kc=kc, vc=vc, q_len=q_len, ctx=ctx, total_q=q_len, max_q=q_len, max_n=n,
                         tail_idx=torch.arange(q_len - min(REF_ROWS, q_len), q_len, device=DEV),
                         tail_cu=[0, min(REF_ROWS, q_len)]))
    if parse_batch(shape) is None:
        return seqs[0]
    return dict(q=q, k=k, v=v, **pool8, bt=bt, cu=torch.tensor(cu, dtype=torch.int32, device=DEV),
                sl=torch.tensor(ns, dtype=torch.int32, device=DEV), seqs=seqs, q_lens=q_lens, ctxs=ctxs,
                total_q=cu[-1], max_q=max(q_lens), max_n=max(ns), tail_idx=torch.tensor(tail_idx, device=DEV),
                tail_cu=tail_cu)


def causal_flops(q_len: int | list[int], ctx: int | list[int]) -> float:
    """FLOPs of the unmasked (query, key) pairs only: 4 * pairs * D * Hq; one sequence or lists of them."""
    qs, cs = (q_len, ctx) if isinstance(q_len, list) else ([q_len], [ctx])
    return 4.0 * causal_pairs(qs, cs) * D * HQ


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def ref_tail(x: dict, fp8: bool = False) -> torch.Tensor:
    """float64 reference of each sequence's last REF_ROWS query tokens (x["tail_idx"]): [rows, HQ, D]; fp8:
    of the fp8 pool (quantize, dequantize, float64 attention: what the pagegen rows of --kv-dtype compute)."""
    cu = torch.tensor(x["tail_cu"], dtype=torch.int32)
    if fp8:
        return paged_extend_fp8_ref(x["q"][x["tail_idx"]], x["k8"], x["v8"], x["bt"], cu, x["sl"], **x["scales"])
    return paged_extend_ref(x["q"][x["tail_idx"]], x["k"], x["v"], x["bt"], cu, x["sl"])


def tail_of(out: torch.Tensor, x: dict) -> torch.Tensor:
    """The rows of a packed output [total_q, HQ, D] that ref_tail(x) holds."""
    return out[x["tail_idx"]]


# ----------------------------------------------------------------- implementations


def sdpa_forms(x: dict) -> tuple[dict, dict]:
    """(forms, fallbacks) spelling this extend for SDPA: {name: fn() -> out [q_len, HQ, D]}."""
    from torch.nn.attention.bias import causal_lower_right

    f = torch.nn.functional.scaled_dot_product_attention
    qc, kc, vc = x["qc"], x["kc"], x["vc"]
    q_len, n = qc.shape[2], kc.shape[2]

    def spell(kk, vv, gqa):
        if q_len == n:
            return {"causal": lambda: f(qc, kk, vv, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1)}
        bias = causal_lower_right(q_len, n)
        mask = baselines.lower_right_mask(q_len, n, qc.device)
        return {"bias": lambda: f(qc, kk, vv, attn_mask=bias, enable_gqa=gqa)[0].transpose(0, 1),
                "mask": lambda: f(qc, kk, vv, attn_mask=mask, enable_gqa=gqa)[0].transpose(0, 1)}

    rep = HQ // HK
    kr, vr = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
    return spell(kc, vc, True), {f"{k}-repeat-kv": fn for k, fn in spell(kr, vr, False).items()}


def run_pagegen(x: dict, config: Config | None, bf16: bool = False):
    """pagegen.paged_extend with a given config, or (None) the dispatcher's; on the fp8 pool under --kv-dtype
    unless bf16."""
    out = torch.full_like(x["q"], float("nan"))  # poisoned: a row the kernel leaves unwritten fails the check
    fp8 = bool(KV_DTYPE) and not bf16
    k, v, scales = (x["k8"], x["v8"], x["scales"]) if fp8 else (x["k"], x["v"], {})

    def fn():
        return pagegen.paged_extend(x["q"], k, v, x["bt"], x["cu"], x["sl"], out=out, config=config,
                                    max_q_len=x["max_q"], max_seq_len=x["max_n"], **scales)

    return fn


def chosen_config(x: dict, spec: KernelSpec | None = None) -> Config:
    from pagegen.dispatch import select_config

    return select_config(spec or SPEC, x["total_q"], x["max_n"], HK)


def heuristic(x: dict) -> Config:
    from pagegen.dispatch import heuristic_config
    from pagegen.gpu import sm_count

    return heuristic_config(SPEC, x["total_q"], x["max_n"], HK, sm_count())


def tune(x: dict, tail: torch.Tensor, reps: int) -> tuple[Config | None, float, list]:
    """Fastest legal, correct config of TUNE_GRID for this shape: (config, us, per-config log)."""
    best: tuple[float, Config] | None = None
    log = []
    for cfg in TUNE_GRID:
        if illegal_reason(SPEC, cfg):
            continue
        try:
            fn = run_pagegen(x, cfg)
            err = rel(tail_of(fn(), x), tail)
            if not err < TOL:
                log.append((cfg.to_dict(), f"wrong: {err:.2e}"))
                continue
            us = timeit(lambda i, fn=fn: fn(), reps=reps, warmup=WARMUP).median_us
        except Exception as exc:  # out of shared memory etc.: recorded, not fatal
            log.append((cfg.to_dict(), f"{type(exc).__name__}: {str(exc)[:80]}"))
            continue
        log.append((cfg.to_dict(), us))
        if best is None or us < best[0]:
            best = (us, cfg)
    return (best[1], best[0], log) if best else (None, math.inf, log)


# ----------------------------------------------------------------- driver


def sdpa_sweep(x: dict, tail: torch.Tensor, args: argparse.Namespace,
               graph: bool) -> tuple[list[dict], dict | None, torch.Tensor | None]:
    """SDPA on one sequence: (a row per backend, the fastest as sdpa-best or None, torch's own choice's
    output [q_len, HQ, D] over all rows when it is right, else None: it checks pagegen beyond the tail)."""
    forms, fallbacks = sdpa_forms(x)
    scores = HQ * x["q_len"] * (x["q_len"] + x["ctx"])
    skip = {"math": f"n/a (math skipped: {scores * 4 / 2**30:.1f} GiB of fp32 scores)"} \
        if scores > MATH_MAX_SCORES else {}
    backends = tuple(b for b in args.backends.split(",") if b)
    srows, best = baselines.sweep(forms, lambda o: rel(tail_of(o, x), tail), backends=backends,
                                  skip=skip, reps=args.reps, graph=graph, fallbacks=fallbacks)
    base = None
    for form in ("causal", "bias"):
        if form in forms:
            out, _ = baselines.call(forms[form], "default")
            base = out if out is not None and rel(tail_of(out, x), tail) < TOL else None
    return srows, best, base


def sdpa_batch(x: dict, tail: torch.Tensor, args: argparse.Namespace,
               graph: bool) -> tuple[list[dict], torch.Tensor | None]:
    """SDPA on a batch, which it has no varlen form for: one call per sequence, each swept alone
    (sdpa_sweep). Rows: sdpa-<backend>, the sum over the sequences of that backend's fastest form (n/a
    when it ran on none or refused one); sdpa-best, the sum of each sequence's fastest backend and form
    (a user choosing per call). Also the packed output of torch's own choice [total_q, HQ, D], or None."""
    per_backend: dict[str, list[tuple[str, dict]]] = {}
    bests, bases = [], []
    for i, s in enumerate(x["seqs"]):
        srows, best, base = sdpa_sweep(s, tail[x["tail_cu"][i]:x["tail_cu"][i + 1]], args, graph)
        for r in srows:
            per_backend.setdefault(r["impl"], []).append((f"{s['q_len']}@{s['ctx']}", r))
        bests.append(best)
        bases.append(base)
    rows = []
    for impl, parts in per_backend.items():
        row = {"impl": impl, "backend": parts[0][1]["backend"], "calls": len(parts)}
        missing = [(seq, r) for seq, r in parts if "us" not in r]
        if missing:
            seq, r = missing[0]
            row["na"] = f"n/a on {len(missing)} of {len(parts)} sequences ({seq}: {r.get('na', '')})"
        else:
            row.update(us=sum(r["us"] for _, r in parts), method=parts[0][1]["method"],
                       form=", ".join(f"{f} x{c}" for f, c in Counter(r["form"] for _, r in parts).most_common()))
        rows.append(row)
    if bests and all(b is not None for b in bests):
        wins = Counter(b["winner"] for b in bests)
        rows.append({"impl": "sdpa-best", "us": sum(b["us"] for b in bests), "calls": len(bests),
                     "winner": "per sequence: " + ", ".join(f"{w} x{c}" for w, c in wins.most_common()),
                     "per_seq": [{"seq": f"{s['q_len']}@{s['ctx']}", "winner": b["winner"], "us": b["us"]}
                                 for s, b in zip(x["seqs"], bests, strict=True)]})
    base = torch.cat(bases) if all(b is not None for b in bases) else None
    return rows, base


def bench_shape(shape: str, impls: list[str], args: argparse.Namespace, matmul: float | None) -> list[dict]:
    """Every implementation on one shape; one row each (errors and n/a reported, not raised). On a batch
    shape, also baseline-best: the faster of sdpa-best and flex, and each pagegen row's speed against it."""
    x = make_inputs(shape)
    batch = "seqs" in x
    flops = causal_flops(*seq_lengths(shape))
    tail = ref_tail(x)
    tail8 = ref_tail(x, fp8=True) if KV_DTYPE else tail  # what the pagegen rows are checked against
    graph = not args.events
    rows: list[dict] = []

    def finish(row: dict, us: float) -> None:
        row.update(us=us, tflops=flops / us / 1e6)
        if matmul:
            row["pct_matmul"] = 100 * row["tflops"] / matmul

    base = None  # an SDPA output over all rows, to check pagegen beyond the fp64 tail
    if "sdpa" in impls:
        if batch:
            srows, base = sdpa_batch(x, tail, args, graph)
        else:
            srows, best, base = sdpa_sweep(x, tail, args, graph)
            srows += [best] if best else []
        for r in srows:
            row = {"shape": shape, "flops": flops, **r}
            if "us" in r:
                finish(row, r["us"])
            rows.append(row)
    for impl in impls:
        if impl == "sdpa" or (impl == "flex" and shape not in args.flex_shapes.split(",") and not args.flex_all
                              and not batch):
            continue  # flex: each shape is a fresh inductor compile, so only the target shapes
        row = {"shape": shape, "impl": impl, "flops": flops}
        try:
            if impl == "flex":
                fn, row["note"] = run_flex_varlen(x) if batch else run_flex(x)
            elif impl == "pagegen":
                fn, row["config"] = run_pagegen(x, None), chosen_config(x).to_dict()
            elif impl == "pagegen-bf16":
                if not KV_DTYPE:
                    raise ValueError("pagegen-bf16 is the bf16 base of an fp8 run: add --kv-dtype")
                fn, row["config"] = run_pagegen(x, None, bf16=True), chosen_config(x, BF16_SPEC).to_dict()
            elif impl == "default":
                cfg = heuristic(x)
                fn, row["config"] = run_pagegen(x, cfg), cfg.to_dict()
            elif impl == "default-tma":
                cfg = with_tma(heuristic(x))
                if illegal_reason(SPEC, cfg):
                    raise ValueError(f"{cfg}: {illegal_reason(SPEC, cfg)} (run with --block-size 64 or more)")
                fn, row["config"] = run_pagegen(x, cfg), cfg.to_dict()
            elif impl == "best":
                cfg, _, log = tune(x, tail8, max(10, args.reps // 3))
                if cfg is None:
                    raise RuntimeError(f"no config of the grid ran correctly: {log[:3]}")
                fn, row["config"], row["tune_log"] = run_pagegen(x, cfg), cfg.to_dict(), log
            else:
                raise ValueError(f"unknown impl {impl!r}; expected sdpa, flex, pagegen, pagegen-bf16, default, "
                                 "default-tma or best")
            out = fn()
            on_fp8 = bool(KV_DTYPE) and impl not in ("flex", "pagegen-bf16")
            row["err_vs_fp64_tail"] = rel(tail_of(out, x), tail8 if on_fp8 else tail)
            if base is not None:  # SDPA ran on the bf16 K/V: for an fp8 row this is fp8's cost, not checked
                row["err_vs_sdpa_bf16_kv" if on_fp8 else "err_vs_sdpa"] = rel(out, base)
            if not (row["err_vs_fp64_tail"] < TOL and row.get("err_vs_sdpa", 0.0) < TOL):
                raise RuntimeError(f"wrong result: rel err {row.get('err_vs_sdpa', float('nan')):.2e} vs sdpa, "
                                   f"{row['err_vs_fp64_tail']:.2e} vs fp64")
            finish(row, timeit(lambda i, fn=fn: fn(), reps=args.reps, graph=graph, warmup=WARMUP).median_us)
        except Exception as exc:  # a failing implementation is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    best = next((r for r in rows if r["impl"] == "sdpa-best" and "us" in r), None)
    for r in rows:
        if best and "us" in r and not r["impl"].startswith("sdpa"):
            r["speed_vs_sdpa_best"] = best["us"] / r["us"]
    if batch:
        rows = with_fastest_baseline(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="", help="comma-separated Q@C or Bx[q0,q1]@[c0,c1] or batch16 "
                    "(default: the five reference shapes)")
    ap.add_argument("--impls", default="sdpa,flex,pagegen,default")
    ap.add_argument("--backends", default=",".join(baselines.BACKENDS), help="SDPA backends to time")
    ap.add_argument("--tune", action="store_true", help="also try a small config grid per shape")
    ap.add_argument("--flex-all", action="store_true", help="run flex on every shape (default: 2048@*)")
    ap.add_argument("--flex-shapes", default=",".join(FLEX_SHAPES),
                    help="shapes flex runs on (each compiles anew); batch shapes always")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per implementation (median)")
    ap.add_argument("--events", action="store_true", help="time with CUDA events instead of CUDA-graph replay")
    ap.add_argument("--out", default="", help="JSON path (default bench/results/extend-<gpu>-<date>.json)")
    ap.add_argument("--tag", default="", help="suffix of the default file name")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton CPU interpreter (dry run), "
                    f"then {','.join(SMOKE_HEAD_DIM_SHAPES)} at head_dim {SMOKE_HEAD_DIM} unless --head-dim is given")
    ap.add_argument("--block-size", type=int, default=BS, choices=(16, 32, 64, 128, 256),
                    help="tokens a KV page (default 16; kv_tma=1 needs >= 64)")
    ap.add_argument("--head-dim", type=int, default=None, choices=HEAD_DIMS,
                    help=f"head_dim (default {D}; the {HQ} query / {HK} KV heads stay)")
    ap.add_argument("--kv-dtype", default="", choices=("", *FP8_TORCH),
                    help="the pagegen rows read an fp8 copy of the pool (default: bf16)")
    args = ap.parse_args(argv)
    configure(args.block_size, args.head_dim or D, args.kv_dtype)
    head_dim = D  # the first pass's (restored after the smoke's second pass)
    if args.cpu_smoke:
        args.impls = ",".join(i for i in args.impls.split(",") if i != "flex")
        global TUNE_GRID, WARMUP
        TUNE_GRID, WARMUP = TUNE_GRID[:3], 1
    elif not torch.cuda.is_available():
        print("bench/extend.py needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    bad = [b for b in args.backends.split(",") if b and b not in baselines.BACKENDS]
    if bad:
        ap.error(f"--backends {','.join(bad)} unknown; expected some of {','.join(baselines.BACKENDS)}")
    shapes = split_shapes(args.shapes) if args.shapes else (SMOKE_SHAPES if args.cpu_smoke else SHAPES)
    try:
        for shape in shapes:
            seq_lengths(shape)
    except ValueError as exc:
        ap.error(f"--shapes: {exc}")
    impls = [("sdpa" if i == "naive" else i) for i in args.impls.split(",") if i] + (["best"] if args.tune else [])
    tag = args.tag or (args.kv_dtype.replace("_", "") if args.kv_dtype else "")
    path = result_path("extend", tag=tag, out=args.out)
    run(args, shapes, impls, path)
    if args.cpu_smoke and args.head_dim is None:  # the smoke's second pass: another head_dim renders anew
        configure(args.block_size, SMOKE_HEAD_DIM, args.kv_dtype)
        run(args, SMOKE_HEAD_DIM_SHAPES, impls, path.with_name(f"{path.stem}-hd{SMOKE_HEAD_DIM}{path.suffix}"))
        configure(args.block_size, head_dim, args.kv_dtype)
    return 0


def run(args: argparse.Namespace, shapes: list[str], impls: list[str], path: Path) -> None:
    """Benchmark `shapes` at the configured head_dim and block size; write `path` (JSON) and its .log."""
    t0 = time.time()
    batches = {shape: describe_batch(shape) for shape in shapes if parse_batch(shape) is not None}
    workload = (f"bf16 hd{D} {HQ}q/{HK}kv block{BS} shuffled pages, one sequence; shape = new@prefix; "
                "lower-right causal; FLOPs of unmasked pairs only")
    if KV_DTYPE:
        workload += (f"; pagegen rows on a {KV_DTYPE} pool (per-tensor absmax scales), SDPA / flex / pagegen-bf16 "
                     "on its bf16 source")
    if batches:
        workload += (f"; Bx[q0,q1]@[c0,c1] = B sequences, lengths uniform (seed {BATCH_SEED}), one launch, "
                     "SDPA one call a sequence")
    with tee_log(path):
        meta = run_meta("extend", workload=workload, matmul=True)
        meta.update(head_dim=D, block_size=BS, q_heads=HQ, kv_heads=HK, kv_dtype=KV_DTYPE or "bf16")
        if batches:
            meta["batches"] = batches
        meta["timing"] = "cuda-events" if args.events else "cuda-graph replay, L2 flushed before each run"
        print(meta_line(meta), flush=True)
        rows: list[dict] = []
        for shape in shapes:
            print(f"-- {shape}", flush=True)
            if shape in batches:
                b = batches[shape]
                print(f"   {b['spelling']} seed {b['seed']}: {b['sequences']} sequences, new tokens {b['new_tokens']} "
                      f"(max {b['max_new']}), prefix tokens {b['prefix_tokens']}, KV tokens {b['kv_tokens']} "
                      f"(longest {b['max_seq']}), {b['pairs']} causal pairs; new {b['q_lens']}, "
                      f"prefixes {b['prefixes']}", flush=True)
            got = bench_shape(shape, impls, args, meta["matmul_tflops"])
            for r in got:
                print("  " + " ".join(f"{k}={v}" for k, v in r.items()
                                      if k not in ("shape", "tune_log", "per_seq"))[:300], flush=True)
            rows += got
            if not SMOKE:
                torch.cuda.empty_cache()
            partial = summarize(shapes, rows, D, BS)
            write_json(path, {"meta": meta, "rows": rows, "summary": partial, "partial": True})
        summary = summarize(shapes, rows, D, BS)
        meta["wall_s"] = round(time.time() - t0, 1)
        write_json(path, {"meta": meta, "rows": rows, "summary": summary})

        print(f"\n{meta_line(meta)}  ({meta['wall_s']:.0f}s)")
        w = max([12] + [len(r["shape"]) + 1 for r in rows])  # a spelled-out batch shape is longer
        print(f"{'shape':<{w}}{'impl':<16}{'us':>10}{'TFLOP/s':>9}{'%mm':>6}{'vs sdpa':>8}  note")
        for r in rows:
            lead = f"{r['shape']:<{w}}{r['impl']:<16}"
            if "us" not in r:
                print(f"{lead}{'-':>10}{'-':>9}{'-':>6}{'-':>8}  {r.get('error') or r.get('na', '')}"[:200])
                continue
            note = r.get("winner") or r.get("form") or r.get("note") or str(r.get("config", ""))
            if "speed_vs_fastest_baseline" in r:
                note = f"{r['speed_vs_fastest_baseline']:.2f}x baseline-best; {note}"
            pct = f"{r['pct_matmul']:>6.1f}" if "pct_matmul" in r else f"{'-':>6}"
            vs = f"{r['speed_vs_sdpa_best']:>8.2f}" if "speed_vs_sdpa_best" in r else f"{'':>8}"
            print(f"{lead}{r['us']:>10.1f}{r['tflops']:>9.1f}{pct}{vs}  {note}"[:200])
        for k, v in summary.items():
            print(f"{k}: {v}")
        print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
