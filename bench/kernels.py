"""Decode kernel benchmark: pagegen against torch SDPA (every backend), FlexAttention and the copy ceiling.

Reference workload: bf16, head_dim 128, 32 query heads / 8 KV heads (group 4, Llama-3-8B), block 16,
shuffled block tables, one query token per sequence. Implementations (--impls):
  sdpa     torch SDPA on a contiguous KV slab padded to the longest sequence (what a server without
           paging runs), once with torch's own backend choice and once per backend (cudnn, flash,
           efficient, math), each in two spellings: native GQA (enable_gqa) and the group folded
           into query rows (q as [B, Hkv, G, D]); a ragged batch adds a length mask. A backend that
           refuses is "n/a (reason)". Rows sdpa-<backend>, and sdpa-best naming the fastest.
           ("naive" is accepted for "sdpa".)
  flex     FlexAttention over torch's experimental paged-attention page table (compiled)
  default  pagegen with the heuristic config (no tuned table)
  tuned    pagegen through the dispatcher and the shipped tuned table of this card
  tuned-nhd  (--layout HND) pagegen on the HND pool with the config the dispatcher picks for the NHD
           spec of the same shape: the NHD tuned row's kernel, only its addresses changed
  sweep    pagegen over a grid of configs; the best per shape (exploration, not tuning)
Every implementation is checked against the float64 reference (sampled sequences) before timing.

--layout NHD|HND: the layout of the pool pagegen reads (NHD [blocks, bs, Hkv, D], the default;
HND [blocks, Hkv, bs, D]: a page of one KV head contiguous). Both hold the same data under the same
shuffled block tables (the HND pool is the NHD one transposed); the dispatcher sees the spec of that
layout (its tuned entry, or the heuristic). SDPA's slab and FlexAttention's pool are contiguous
copies built from it, the same in both layouts. HND results go to a file tagged -hnd.
Timing: bench.common.timeit (pagegen.timing: CUDA-graph replay, L2 flushed before every run; CUDA
events where a graph cannot be captured). Bytes = KV read + q + out; % of the copy bandwidth
measured in the same run. pagegen rows report speed against the fastest SDPA row (>1: faster).

--models: every named model (pagegen.workloads.DEFAULT_MODELS) at 32 x 8192 and 128 x 2048, and the
reference spec also at 64 x 4096: pagegen tuned (shipped table) and heuristic against the fastest
SDPA backend on a contiguous slab; flags pagegen more than 5% slower than it.

    python bench/kernels.py [--shapes 1x2048,32x8192,mixed] [--impls sdpa,default,tuned,flex]
    python bench/kernels.py --models [--layout HND]
    python bench/kernels.py --cpu-smoke [--models] [--layout HND]   # tiny shapes in Triton's CPU interpreter
Writes bench/results/decode-<gpu>-<date>[-<tag>][-hnd].json (--models: decode-models-...) and a .log beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv  # before torch/triton are imported: the interpreter must be on first
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pagegen  # noqa: E402
from bench import baselines  # noqa: E402
from bench.common import copy_gbps, meta_line, result_path, run_meta, tee_log, timeit, write_json  # noqa: E402
from pagegen.reference import paged_decode_ref  # noqa: E402
from pagegen.spec import LAYOUTS, Config, KernelSpec, illegal_reason  # noqa: E402

SHAPES = ["1x2048", "1x32768", "8x4096", "32x2048", "32x8192", "128x1024", "128x4096", "256x2048", "mixed"]
SMOKE_SHAPES = ["2x40", "mixed"]
MODEL_SHAPES = ["32x8192", "128x2048"]
REFERENCE_EXTRA_SHAPES = ["64x4096"]  # the reference spec only (a shape between its buckets)
SLOWER_FLAG = 1.05  # --models flags pagegen slower than this x the fastest SDPA
TOL = 2e-2
DEV = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"  # cpu: --cpu-smoke, or imported by CPU tests


@dataclass(frozen=True)
class Geometry:
    """A model's attention shape on one GPU: query heads, KV heads, head_dim, block size, dtype, and
    the layout of the pool pagegen reads (NHD or HND)."""

    model: str
    hq: int
    hk: int
    d: int
    bs: int = 16
    dtype: str = "bf16"
    layout: str = "NHD"

    @property
    def spec(self) -> KernelSpec:
        return KernelSpec("decode", head_dim=self.d, block_size=self.bs, layout=self.layout, dtype=self.dtype,
                          group_size=self.hq // self.hk)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


REFERENCE = Geometry("Llama-3-8B", 32, 8, 128)
SMOKE_GEOMETRY = Geometry("smoke", 4, 2, 64)
# kept for scripts that import the reference constants (profile_decode.py)
HQ, HK, D, BS = REFERENCE.hq, REFERENCE.hk, REFERENCE.d, REFERENCE.bs
SPEC = REFERENCE.spec


def copy_bandwidth() -> float | None:
    """Device-to-device copy GB/s: bench.common.copy_gbps(), under the name other scripts import from here
    (bench/features.py); new code should call bench.common.copy_gbps."""
    return copy_gbps()


@dataclass
class Inputs:
    """One decode step: q [B, Hq, D], pools in geo.layout (NHD [blocks, bs, Hkv, D] or HND [blocks, Hkv, bs, D]),
    tables [B, W], lengths [B]."""

    geo: Geometry
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bt: torch.Tensor
    sl: torch.Tensor
    lens: list[int]


def parse_lens(shape: str, seed: int) -> list[int]:
    """"BxN" -> B lengths of N; "mixed" -> 64 lengths uniform in [64, 8192] (seeded; tiny in smoke)."""
    g = torch.Generator().manual_seed(seed)
    if shape == "mixed":
        lo, hi, n = (3, 70, 5) if SMOKE else (64, 8192, 64)
        return torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    b, n = (int(x) for x in shape.split("x"))
    return [n] * b


def make_inputs(shape: str, seed: int = 0, geo: Geometry = REFERENCE) -> Inputs:
    """Random q and pools of one shape in geo.layout, each sequence's pages at shuffled physical blocks.
    The random draws do not depend on the layout: an HND pool is the NHD pool of the same draws made
    [blocks, Hkv, bs, D] contiguous (the same data under the same block tables)."""
    lens = parse_lens(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bs, dt = geo.bs, geo.torch_dtype
    nblk = [-(-n // bs) for n in lens]
    total = sum(nblk)
    k = torch.randn(total, bs, geo.hk, geo.d, device=DEV, dtype=dt)
    v = torch.randn(total, bs, geo.hk, geo.d, device=DEV, dtype=dt)
    perm = torch.randperm(total, generator=g).int()
    bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    pos = 0
    for i, nb in enumerate(nblk):
        bt[i, :nb] = perm[pos: pos + nb]
        pos += nb
    q = torch.randn(len(lens), geo.hq, geo.d, device=DEV, dtype=dt)
    if geo.layout == "HND":
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    return Inputs(geo, q, k, v, bt.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV), lens)


def nhd_pools(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """x's K and V pools as NHD [blocks, bs, Hkv, D] (a transposed view of an HND pool, no copy)."""
    if x.geo.layout == "HND":
        return x.k.transpose(1, 2), x.v.transpose(1, 2)
    return x.k, x.v


def bytes_moved(x: Inputs) -> int:
    """KV bytes read (K and V of every cached token) + q read + out written."""
    e = torch.empty((), dtype=x.geo.torch_dtype).element_size()
    return sum(x.lens) * x.geo.hk * x.geo.d * 2 * e + 2 * len(x.lens) * x.geo.hq * x.geo.d * e


def check(out: torch.Tensor, x: Inputs, n_check: int = 4) -> float:
    """Relative error against the float64 reference on a sample of sequences (inf if not finite)."""
    idx = torch.linspace(0, len(x.lens) - 1, min(n_check, len(x.lens))).long().unique().to(x.q.device)
    ref = paged_decode_ref(x.q[idx], x.k, x.v, x.bt[idx], x.sl[idx], layout=x.geo.layout)
    o = out[idx].double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - ref).norm() / ref.norm())


# ----------------------------------------------------------------- implementations


def slab(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The same K/V made contiguous and padded to the longest sequence: [B, Hkv, Lmax, D] each."""
    b, lmax, geo = len(x.lens), max(x.lens), x.geo
    k, v = nhd_pools(x)
    kc = torch.zeros(b, geo.hk, lmax, geo.d, device=DEV, dtype=x.q.dtype)
    vc = torch.zeros_like(kc)
    for i, n in enumerate(x.lens):
        blocks = x.bt[i, : -(-n // geo.bs)].long()
        kc[i, :, :n] = k[blocks].reshape(-1, geo.hk, geo.d)[:n].transpose(0, 1)
        vc[i, :, :n] = v[blocks].reshape(-1, geo.hk, geo.d)[:n].transpose(0, 1)
    return kc, vc


def sdpa_forms(x: Inputs, kc: torch.Tensor, vc: torch.Tensor) -> dict:
    """The ways to spell this decode step for SDPA: {form: fn() -> out [B, Hq, D]}."""
    b, lmax, geo = len(x.lens), max(x.lens), x.geo
    g = geo.hq // geo.hk
    mask = None
    if min(x.lens) != lmax:  # [B, 1, 1, Lmax]: key j of row i is real iff j < len_i
        mask = (torch.arange(lmax, device=DEV)[None, :] < x.sl[:, None])[:, None, None, :]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q4 = x.q[:, :, None, :]  # [B, Hq, 1, D]
    qf = x.q.view(b, geo.hk, g, geo.d)  # [B, Hkv, G, D]: a KV head's G query heads as G query rows
    forms = {"gqa": lambda: sdpa(q4, kc, vc, attn_mask=mask, enable_gqa=g > 1)[:, :, 0]}
    if g > 1:
        forms["fold"] = lambda: sdpa(qf, kc, vc, attn_mask=mask).reshape(b, geo.hq, geo.d)
    return forms


def run_naive(x: Inputs, backend: str = "default"):
    """SDPA on the padded slab with one backend (default: torch's choice), native GQA form; for
    scripts that profile one step (profile_decode.py). Returns (fn, extra)."""
    kc, vc = slab(x)
    fn = sdpa_forms(x, kc, vc)["gqa"]

    def run():
        with baselines.backend_ctx(backend):
            return fn()

    return run, {"slab_bytes": 2 * kc.numel() * kc.element_size(), "backend": backend}


def run_flex(x: Inputs):
    """FlexAttention decode over torch's experimental PagedAttention page table (compiled), on its own
    contiguous pool [1, Hkv, blocks * bs, D] copied from x's (the same copy from either layout)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    geo = x.geo
    b, lmax, bs = len(x.lens), max(x.lens), geo.bs
    n_pages = x.k.shape[0]
    pa = PagedAttention(n_pages, bs, b, device=DEV)
    # flex's pool: [1, Hkv, n_pages * page, D]; the same physical pages as ours
    k, v = nhd_pools(x)
    kf = k.permute(2, 0, 1, 3).reshape(1, geo.hk, n_pages * bs, geo.d).contiguous()
    vf = v.permute(2, 0, 1, 3).reshape(1, geo.hk, n_pages * bs, geo.d).contiguous()
    width = x.bt.shape[1]
    pa.page_table[:, :width] = x.bt.long()
    pa.capacity[:] = width * bs
    pa.physical_to_logical[:] = -1
    for i, n in enumerate(x.lens):
        nb = -(-n // bs)
        pa.physical_to_logical[i, x.bt[i, :nb].long()] = torch.arange(nb, device=DEV)
    seq_lens = x.sl

    def mask_mod(bi, h, qi, kv):
        return kv < seq_lens[bi]

    lmax_pad = -(-lmax // 128) * 128
    logical = create_block_mask(mask_mod, b, None, 1, lmax_pad, device=DEV, BLOCK_SIZE=(128, bs))
    physical = pa.convert_logical_block_mask(logical)
    compiled = torch.compile(flex_attention)
    q4 = x.q[:, :, None, :]
    errors = []
    # flex needs its KV tile to divide the page: try the option spellings torch accepts
    for opts in ({}, {"BLOCK_N": bs}, {"FWD_BLOCK_N": bs}, {"BLOCK_N": bs, "BLOCK_M": 16}):
        def fn(opts=opts):
            return compiled(q4, kf, vf, block_mask=physical, enable_gqa=True, kernel_options=opts)[:, :, 0]

        try:
            fn()
            return fn, {"kernel_options": opts}
        except Exception as exc:  # try the next spelling
            errors.append(f"{opts}: {type(exc).__name__}: {str(exc)[:120]}")
            torch._dynamo.reset()
    raise RuntimeError(" | ".join(errors))


def run_pagegen(x: Inputs, config: Config | None):
    """pagegen.paged_decode on x's pool (in x.geo.layout) with a given config, or (None) the dispatcher's;
    returns (fn, extra)."""
    out = torch.empty_like(x.q)
    max_len, sum_len = max(x.lens), sum(x.lens)  # host-side length hints, as a serving engine has them

    def fn():
        return pagegen.paged_decode(x.q, x.k, x.v, x.bt, x.sl, layout=x.geo.layout, out=out, config=config,
                                    max_seq_len=max_len, sum_seq_lens=sum_len)

    if config is not None:
        return fn, {"config": config.to_dict()}
    from pagegen.dispatch import explain, is_ragged  # which bucket (or the heuristic) chose the config

    cfg, source = explain(x.geo.spec, len(x.lens), max_len, x.geo.hk, is_ragged(len(x.lens), max_len, sum_len))
    return fn, {"config": cfg.to_dict(), "source": source}


def heuristic(x: Inputs) -> Config:
    """The dispatcher's no-table config for this step."""
    from pagegen.dispatch import heuristic_config, is_ragged
    from pagegen.gpu import sm_count

    ragged = is_ragged(len(x.lens), max(x.lens), sum(x.lens))
    return heuristic_config(x.geo.spec, len(x.lens), max(x.lens), x.geo.hk, sm_count(), ragged)


def run_tuned_nhd(x: Inputs):
    """pagegen on x's HND pool with the config the dispatcher picks for the NHD spec of this step (its
    tuned entry or the heuristic): the NHD tuned row's kernel reading the other layout. (fn, extra)."""
    from pagegen.dispatch import explain, is_ragged

    if x.geo.layout != "HND":
        raise ValueError(f"impl tuned-nhd runs on an HND pool; this step's pool is {x.geo.layout}: pass --layout HND")
    max_len, sum_len = max(x.lens), sum(x.lens)
    cfg, source = explain(replace(x.geo, layout="NHD").spec, len(x.lens), max_len, x.geo.hk,
                          is_ragged(len(x.lens), max_len, sum_len))
    fn, extra = run_pagegen(x, cfg)
    return fn, {**extra, "source": f"NHD spec's {source}"}


SWEEP = [
    Config(block_n=bn, num_warps=w, num_stages=s, split_size=sp)
    for bn in (32, 64, 128)
    for w in (4, 8)
    for s in (2, 3)
    for sp in (0, 512, 1024, 2048)
]


def best_of_sweep(x: Inputs, reps: int) -> Config:
    """The fastest correct config of SWEEP for this step."""
    best: tuple[float, Config] | None = None
    for cfg in SWEEP[:3] if SMOKE else SWEEP:
        if illegal_reason(x.geo.spec, cfg):
            continue
        f, _ = run_pagegen(x, cfg)
        if not check(f(), x, 2) < TOL:
            continue
        us = timeit(lambda i, f=f: f(), reps=reps).median_us
        if best is None or us < best[0]:
            best = (us, cfg)
    if best is None:
        raise RuntimeError("no config of the sweep ran correctly")
    return best[1]


# ----------------------------------------------------------------- driver


def bench_shape(x: Inputs, shape: str, impls: list[str], *, reps: int, copy: float | None,
                backends: tuple[str, ...], graph: bool, flex: bool) -> list[dict]:
    """Every implementation on one step; one row each (errors and n/a reported, not raised)."""
    nbytes = bytes_moved(x)
    base = {"model": x.geo.model, "shape": shape, "bytes": nbytes}
    rows: list[dict] = []

    def finish(row: dict, us: float, method: str) -> None:
        row.update(us=us, method=method, gbps=nbytes / us / 1e3)
        if copy:
            row["pct_copy"] = 100 * row["gbps"] / copy

    if "sdpa" in impls:
        try:
            kc, vc = slab(x)
            srows, best = baselines.sweep(sdpa_forms(x, kc, vc), lambda o: check(o, x), backends=backends,
                                          reps=reps, graph=graph)
            for r in srows + ([best] if best else []):
                row = {**base, **r, "slab_bytes": 2 * kc.numel() * kc.element_size()}
                if "us" in r:
                    finish(row, r["us"], r["method"])
                rows.append(row)
            del kc, vc
        except Exception as exc:  # the slab itself did not fit, say
            rows.append({**base, "impl": "sdpa-best", "error": f"{type(exc).__name__}: {exc}"[:300]})
    for impl in impls:
        if impl == "sdpa" or (impl == "flex" and not flex):
            continue
        row = {**base, "impl": impl}
        try:
            if impl == "flex":
                fn, extra = run_flex(x)
            elif impl == "default":
                fn, extra = run_pagegen(x, heuristic(x))
            elif impl == "tuned":
                fn, extra = run_pagegen(x, None)
            elif impl == "tuned-nhd":
                fn, extra = run_tuned_nhd(x)
            elif impl == "sweep":
                fn, extra = run_pagegen(x, best_of_sweep(x, max(10, reps // 3)))
            else:
                raise ValueError(f"unknown impl {impl!r}; expected sdpa, flex, default, tuned, tuned-nhd or sweep")
            row.update(extra)
            row["rel_err"] = check(fn(), x)
            if not row["rel_err"] < TOL:
                raise RuntimeError(f"wrong result: rel err {row['rel_err']:.3e}")
            t = timeit(lambda i, fn=fn: fn(), reps=reps, graph=graph)
            finish(row, t.median_us, t.method)
        except Exception as exc:  # a failing implementation is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    best = next((r for r in rows if r["impl"] == "sdpa-best" and "us" in r), None)
    for r in rows:
        if best and "us" in r and not r["impl"].startswith("sdpa"):
            r["speed_vs_sdpa_best"] = best["us"] / r["us"]
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, shape): the fastest SDPA (and which), pagegen tuned and heuristic (and tuned-nhd where it
    ran, as tuned_nhd_*), their speed against it (>1: pagegen faster) and a flag where pagegen tuned or
    heuristic is more than 5% slower."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["shape"]) for r in rows))
    for model, shape in keys:
        by = {r["impl"]: r for r in rows if (r["model"], r["shape"]) == (model, shape)}
        best = by.get("sdpa-best", {})
        s = {"model": model, "shape": shape, "sdpa_best_us": best.get("us"), "sdpa_winner": best.get("winner")}
        for impl in ("tuned", "default", "flex", "tuned-nhd"):
            r, k = by.get(impl, {}), impl.replace("-", "_")
            if "us" in r:
                s[f"{k}_us"] = r["us"]
                if best.get("us"):
                    s[f"{k}_speed"] = best["us"] / r["us"]
            if impl == "tuned" and "source" in r:
                s["tuned_source"] = r["source"]
        slow = [impl for impl in ("tuned", "default") if s.get(f"{impl}_speed", 2.0) < 1 / SLOWER_FLAG]
        s["flag"] = f"pagegen {'+'.join(slow)} > {100 * (SLOWER_FLAG - 1):.0f}% slower than SDPA" if slow else ""
        out.append(s)
    return out


def print_tables(meta: dict, rows: list[dict], summary: list[dict]) -> None:
    print(f"\n{meta_line(meta)}")
    print(f"{'model':<16}{'shape':<10}{'impl':<15}{'us':>9}{'GB/s':>8}{'%copy':>7}{'vs sdpa':>8}  note")
    for r in rows:
        lead = f"{r['model'][:15]:<16}{r['shape']:<10}{r['impl']:<15}"
        if "us" not in r:
            print(f"{lead}{'-':>9}{'-':>8}{'-':>7}{'-':>8}  {r.get('error') or r.get('na', '')}"[:200])
            continue
        note = r.get("winner") or r.get("form") or r.get("source") or ""
        if "config" in r and "source" not in r:
            note = str(r["config"])
        pct = f"{r['pct_copy']:>7.1f}" if "pct_copy" in r else f"{'-':>7}"
        vs = f"{r['speed_vs_sdpa_best']:>8.2f}" if "speed_vs_sdpa_best" in r else f"{'':>8}"
        print(f"{lead}{r['us']:>9.1f}{r['gbps']:>8.0f}{pct}{vs}  {note}"[:200])
    nhd_cfg = any("tuned_nhd_us" in s for s in summary)  # a column of its own only where tuned-nhd ran
    print(f"\n{'model':<16}{'shape':<10}{'SDPA best us':>13}  {'winner':<18}{'tuned us':>9}{'x':>6}"
          f"{'heur us':>9}{'x':>6}" + (f"{'NHDcfg us':>10}{'x':>6}" if nhd_cfg else "") + "  flag")
    for s in summary:
        def f(k, w=9, p=1, s=s):
            return f"{s[k]:>{w}.{p}f}" if s.get(k) is not None else f"{'-':>{w}}"
        print(f"{s['model'][:15]:<16}{s['shape']:<10}{f('sdpa_best_us', 13)}  {str(s['sdpa_winner'] or '-'):<18}"
              f"{f('tuned_us')}{f('tuned_speed', 6, 2)}{f('default_us')}{f('default_speed', 6, 2)}"
              + (f"{f('tuned_nhd_us', 10)}{f('tuned_nhd_speed', 6, 2)}" if nhd_cfg else "") + f"  {s['flag']}")


def plan_runs(args: argparse.Namespace) -> list[tuple[Geometry, str]]:
    """(geometry, shape) pairs to run: the reference shapes, or (--models) every named model; every
    geometry's pool in args.layout."""
    layout = args.layout
    ref = replace(REFERENCE, layout=layout)
    if SMOKE:
        geos = [replace(SMOKE_GEOMETRY, layout=layout)]
        if args.models:
            geos.append(Geometry("smoke-g1", 2, 2, 96, layout=layout))
        shapes = args.shapes.split(",") if args.shapes else SMOKE_SHAPES
        return [(g, s) for g in geos for s in shapes]
    if not args.models:
        return [(ref, s) for s in (args.shapes.split(",") if args.shapes else SHAPES)]
    from pagegen.workloads import DEFAULT_MODELS

    runs = []
    for name, hd, group, hk in DEFAULT_MODELS:
        geo = Geometry(name, hk * group, hk, hd, layout=layout)
        extra = REFERENCE_EXTRA_SHAPES if geo.spec == ref.spec and hk == ref.hk else []
        runs += [(geo, s) for s in (args.shapes.split(",") if args.shapes else MODEL_SHAPES + extra)]
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="", help="comma-separated BxN or 'mixed' (default: the mode's set)")
    ap.add_argument("--impls", default="", help="default: sdpa,default,tuned,flex (--models: sdpa,default,tuned); "
                    "--layout HND adds tuned-nhd to either default")
    ap.add_argument("--models", action="store_true", help="every named model at 32x8192 and 128x2048")
    ap.add_argument("--layout", default="NHD", choices=LAYOUTS, help="layout of the pool pagegen reads: NHD "
                    "[blocks, bs, Hkv, D] or HND [blocks, Hkv, bs, D] (same data, same block tables; default NHD)")
    ap.add_argument("--backends", default=",".join(baselines.BACKENDS), help="SDPA backends to time")
    ap.add_argument("--flex-shapes", default="", help="shapes flex runs on (default all; each compiles anew)")
    ap.add_argument("--reps", type=int, default=50, help="timed runs per implementation (median)")
    ap.add_argument("--events", action="store_true", help="time with CUDA events (host launch cost included) "
                    "instead of CUDA-graph replay")
    ap.add_argument("--graphs", action="store_true", help=argparse.SUPPRESS)  # graph replay is now the default
    ap.add_argument("--out", default="", help="JSON path (default bench/results/decode[-models]-<gpu>-<date>.json)")
    ap.add_argument("--tag", default="", help="suffix of the default file name (--layout HND appends -hnd)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the Triton CPU interpreter (dry run)")
    args = ap.parse_args(argv)
    if not SMOKE and not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    impls = (args.impls or ("sdpa,default,tuned" if args.models else "sdpa,default,tuned,flex")
             + (",tuned-nhd" if args.layout == "HND" else "")).split(",")
    impls = ["sdpa" if i == "naive" else i for i in impls]
    if SMOKE:
        impls = [i for i in impls if i != "flex"]  # inductor under the interpreter: not a dry run of anything
    backends = tuple(b for b in args.backends.split(",") if b)
    bad = [b for b in backends if b not in baselines.BACKENDS]
    if bad:
        ap.error(f"--backends {','.join(bad)} unknown; expected some of {','.join(baselines.BACKENDS)}")
    name = "decode-models" if args.models else "decode"
    hnd = args.layout == "HND"  # NHD keeps today's file names, workload line and printout
    path = result_path(name, tag="-".join(t for t in (args.tag, "hnd" if hnd else "") if t), out=args.out)
    flex_shapes = set(args.flex_shapes.split(",")) if args.flex_shapes else None
    t0 = time.time()
    with tee_log(path):
        meta = run_meta(name, workload=f"bf16 block 16 {args.layout}, shuffled block tables, one query token per "
                        "sequence; " + ("named models" if args.models else "head_dim 128, 32 q / 8 KV heads"),
                        matmul=True)
        meta["layout"] = args.layout
        meta["timing"] = "cuda-events" if args.events else "cuda-graph replay, L2 flushed before each run"
        print(meta_line(meta), flush=True)
        if hnd:
            print("pagegen reads HND pools [blocks, Hkv, bs, D] (the NHD data transposed, same block tables); "
                  "SDPA and flex read their own contiguous copies, as with NHD", flush=True)
        rows: list[dict] = []
        for geo, shape in plan_runs(args):
            x = make_inputs(shape, geo=geo)
            print(f"-- {geo.model} {shape} (hd {geo.d}, {geo.hq}q/{geo.hk}kv{', HND' if hnd else ''})", flush=True)
            got = bench_shape(x, shape, impls, reps=args.reps, copy=meta["copy_gbps"], backends=backends,
                              graph=not args.events, flex=flex_shapes is None or shape in flex_shapes)
            for r in got:
                print("  " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("model", "shape"))[:300],
                      flush=True)
            rows += got
            del x
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            write_json(path, {"meta": meta, "rows": rows, "summary": summarize(rows), "partial": True})
        summary = summarize(rows)
        meta["wall_s"] = round(time.time() - t0, 1)
        write_json(path, {"meta": meta, "rows": rows, "summary": summary})
        print_tables(meta, rows, summary)
        flagged = [s for s in summary if s["flag"]]
        if args.models:
            print(f"\n{len(flagged)} of {len(summary)} model shapes flagged (pagegen > 5% slower than SDPA's best)")
        print(f"wrote {path} ({meta['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
