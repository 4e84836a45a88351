"""Attention features and pool forms against pagegen's plain kernel, measured in the same run (GPU).

Workload: bf16, head_dim 128, 32 query heads / 8 KV heads (group 4), block_size 16, NHD pools with
shuffled block tables. Every case is checked against the float64 reference (sampled sequences)
before it is timed; each feature case is timed beside the plain case it is compared with.
Decode (one query token per sequence; shape BxCTX, `mixed` = 64 lengths in [64, 8192]):
  window4096@32x32768 vs plain@32x4096     target <= 1.05 (and about 8x faster than plain@32x32768)
  softcap50 / sinks / alibi @128x4096, @mixed vs plain at the same shape     target <= 1.03 each
  pools stack1 ([nb, 2, ...] views) / packed ([..., 2 * D] views) @128x4096 vs separate    <= 1.02
Extend (one sequence, Q new tokens after a C-token prefix, Q@C):
  window4096@2048@16384 vs plain@2048@3072 (the same (query, key) pairs: 2048 x 4096)   <= 1.10
  softcap50 / sinks / alibi @2048@4096 vs plain@2048@4096 (reported, no target)
Configs: the heuristic default of each spec at the call's effective context (min(window, ctx)),
so a feature and its plain baseline run the same tiles; --dispatch uses the dispatcher instead
(tuned table when it has the entry). Bytes (decode) = KV read (the window's tokens only) + q + out.
Timing: triton.testing.do_bench medians, L2 flushed before every run. Writes
bench/results/features-<gpu>-<date>.json (card, date, versions, copy bandwidth) and prints a table.

    python bench/features.py [--only decode|extend] [--dispatch] [--out PATH]
    python bench/features.py --cpu-smoke     # the script's logic on tiny shapes in the interpreter
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
import zlib
from pathlib import Path

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pagegen  # noqa: E402
from pagegen.dispatch import heuristic_config, is_ragged  # noqa: E402
from pagegen.features import standard_alibi_slopes  # noqa: E402
from pagegen.gpu import sm_count  # noqa: E402
from pagegen.reference import paged_decode_ref, paged_extend_ref  # noqa: E402
from pagegen.spec import KernelSpec, default_config  # noqa: E402

HQ, HK, D, BS = 32, 8, 128, 16
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is garbage
DEV = "cpu" if SMOKE else "cuda"
TOL = 2e-2
W = 4096

# decode cases: (name, shape, features, pool form, baseline name, target ratio to the baseline)
DECODE = [
    ("plain@32x4096", "32x4096", {}, "separate", None, None),
    ("plain@32x32768", "32x32768", {}, "separate", None, None),
    ("window4096@32x32768", "32x32768", {"sliding_window": W}, "separate", "plain@32x4096", 1.05),
    ("plain@128x4096", "128x4096", {}, "separate", None, None),
    ("softcap50@128x4096", "128x4096", {"softcap": 50.0}, "separate", "plain@128x4096", 1.03),
    ("sinks@128x4096", "128x4096", {"sinks": True}, "separate", "plain@128x4096", 1.03),
    ("alibi@128x4096", "128x4096", {"alibi_slopes": True}, "separate", "plain@128x4096", 1.03),
    ("stack1@128x4096", "128x4096", {}, "stack1", "plain@128x4096", 1.02),
    ("packed@128x4096", "128x4096", {}, "packed", "plain@128x4096", 1.02),
    ("plain@mixed", "mixed", {}, "separate", None, None),
    ("softcap50@mixed", "mixed", {"softcap": 50.0}, "separate", "plain@mixed", 1.03),
    ("sinks@mixed", "mixed", {"sinks": True}, "separate", "plain@mixed", 1.03),
    ("alibi@mixed", "mixed", {"alibi_slopes": True}, "separate", "plain@mixed", 1.03),
]
# extend cases: (name, Q@C, features, baseline name, target)
EXTEND = [
    ("plain@2048@3072", "2048@3072", {}, None, None),
    ("plain@2048@16384", "2048@16384", {}, None, None),
    ("window4096@2048@16384", "2048@16384", {"sliding_window": W}, "plain@2048@3072", 1.10),
    ("plain@2048@4096", "2048@4096", {}, None, None),
    ("softcap50@2048@4096", "2048@4096", {"softcap": 50.0}, "plain@2048@4096", None),
    ("sinks@2048@4096", "2048@4096", {"sinks": True}, "plain@2048@4096", None),
    ("alibi@2048@4096", "2048@4096", {"alibi_slopes": True}, "plain@2048@4096", None),
]
SMOKE_SHAPES = {"32x4096": "2x40", "32x32768": "2x300", "128x4096": "3x50", "mixed": "mixed",
                "2048@3072": "20@12", "2048@16384": "20@300", "2048@4096": "20@30"}
SMOKE_W = 32



def _results_dir() -> Path:
    """Where results go: bench.common.results_dir ($PAGEGEN_BENCH_RESULTS, else bench/results/)."""
    from bench.common import results_dir

    return results_dir()

def lens_of(shape: str, g: torch.Generator) -> list[int]:
    if shape == "mixed":
        return torch.randint(64, 8193 if not SMOKE else 100, (64 if not SMOKE else 3,), generator=g).tolist()
    b, n = (int(x) for x in shape.split("x"))
    return [n] * b


def paged_pool(lens: list[int], form: str, g: torch.Generator):
    """(k, v views in `form`, block_tables, seq_lens) of an NHD pool with shuffled pages."""
    nblk = [-(-n // BS) for n in lens]
    total = sum(nblk)
    pool = torch.randn(total, BS, HK, 2 * D, device=DEV, dtype=DTYPE) if form == "packed" else None
    if form == "packed":
        k, v = pool[..., :D], pool[..., D:]
    elif form == "stack1":
        pool = torch.randn(total, 2, BS, HK, D, device=DEV, dtype=DTYPE)
        k, v = pool[:, 0], pool[:, 1]
    else:
        k = torch.randn(total, BS, HK, D, device=DEV, dtype=DTYPE)
        v = torch.randn(total, BS, HK, D, device=DEV, dtype=DTYPE)
    perm = torch.randperm(total, generator=g).int()
    bt = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    pos = 0
    for i, nb in enumerate(nblk):
        bt[i, :nb] = perm[pos: pos + nb]
        pos += nb
    return k, v, bt.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


def feature_values(feats: dict, g: torch.Generator) -> dict:
    """The op's keyword arguments: sinks / slopes become [HQ] fp32 device tensors."""
    out = dict(feats)
    if out.get("sinks") is True:
        out["sinks"] = torch.randn(HQ, generator=g).to(DEV)
    if out.get("alibi_slopes") is True:
        out["alibi_slopes"] = standard_alibi_slopes(HQ).to(DEV)
    if SMOKE and "sliding_window" in out:
        out["sliding_window"] = SMOKE_W
    return out


def bench_us(fn) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    return float("inf") if not torch.isfinite(out).all() else float((out - ref).norm() / ref.norm())


def decode_case(shape: str, feats: dict, form: str, dispatch: bool, g: torch.Generator) -> dict:
    lens = lens_of(SMOKE_SHAPES[shape] if SMOKE and shape != "mixed" else shape, g)
    k, v, bt, sl = paged_pool(lens, form, g)
    q = torch.randn(len(lens), HQ, D, device=DEV, dtype=DTYPE)
    vals = feature_values(feats, g)
    window = vals.get("sliding_window")
    seen = [min(n, window) if window else n for n in lens]
    spec = KernelSpec("decode", head_dim=D, block_size=BS, dtype="fp16" if SMOKE else "bf16", group_size=HQ // HK)
    cfg = None if dispatch else heuristic_config(spec, len(lens), max(seen), HK, sm_count(),
                                                 is_ragged(len(lens), max(seen), sum(seen)))
    out = torch.empty_like(q)

    def fn():
        return pagegen.paged_decode(q, k, v, bt, sl, out=out, config=cfg, max_seq_len=max(lens),
                                    sum_seq_lens=sum(lens), **vals)

    idx = torch.linspace(0, len(lens) - 1, min(3, len(lens))).long().unique()
    ref = paged_decode_ref(q[idx], k, v, bt[idx], sl[idx], **vals)
    err = rel(fn()[idx], ref)
    if not err < TOL:
        raise RuntimeError(f"wrong result: rel err {err:.3e}")
    us = bench_us(fn)
    nbytes = sum(seen) * HK * D * 2 * 2 + 2 * len(lens) * HQ * D * 2
    return {"us": us, "bytes": nbytes, "gbps": nbytes / us / 1e3, "rel_err": err,
            "config": cfg.to_dict() if cfg else "dispatch", "kv_tokens_read": sum(seen)}


def extend_case(shape: str, feats: dict, dispatch: bool, g: torch.Generator) -> dict:
    q_len, ctx = (int(x) for x in (SMOKE_SHAPES[shape] if SMOKE else shape).split("@"))
    k, v, bt, sl = paged_pool([ctx + q_len], "separate", g)
    q = torch.randn(q_len, HQ, D, device=DEV, dtype=DTYPE)
    cu = torch.tensor([0, q_len], dtype=torch.int32, device=DEV)
    vals = feature_values(feats, g)
    spec = KernelSpec("extend", head_dim=D, block_size=BS, dtype="fp16" if SMOKE else "bf16", group_size=HQ // HK)
    cfg = None if dispatch else default_config(spec)
    out = torch.empty_like(q)

    def fn():
        return pagegen.paged_extend(q, k, v, bt, cu, sl, out=out, config=cfg, max_q_len=q_len,
                                    max_seq_len=ctx + q_len, **vals)

    rows = min(64, q_len)  # the reference of the last rows
    ref = paged_extend_ref(q[-rows:], k, v, bt, torch.tensor([0, rows], dtype=torch.int32), sl, **vals)
    err = rel(fn()[-rows:], ref)
    if not err < TOL:
        raise RuntimeError(f"wrong result: rel err {err:.3e}")
    us = bench_us(fn)
    window = vals.get("sliding_window")
    pairs = sum(min(ctx + i + 1, window) if window else ctx + i + 1 for i in range(q_len))
    flops = 4.0 * pairs * D * HQ
    return {"us": us, "pairs": pairs, "tflops": flops / us / 1e6, "rel_err": err,
            "config": cfg.to_dict() if cfg else "dispatch"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("decode", "extend"), default=None)
    ap.add_argument("--dispatch", action="store_true", help="configs from the dispatcher, not the heuristic")
    ap.add_argument("--out", default="")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the interpreter (numbers meaningless)")
    args = ap.parse_args()
    meta = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "pagegen": pagegen.__version__, "workload": f"{DTYPE} hd{D} {HQ}q/{HK}kv block{BS} NHD shuffled tables",
            "configs": "dispatch" if args.dispatch else "heuristic at the effective context"}
    if SMOKE:
        meta.update(gpu="cpu-interpreter", copy_gbps=float("nan"))
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        from kernels import copy_bandwidth  # the same copy-bandwidth measurement as the decode bench

        props = torch.cuda.get_device_properties(0)
        meta.update(gpu=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count, copy_gbps=copy_bandwidth())
        torch.cuda.empty_cache()
    print(f"{meta['gpu']}: copy bandwidth {meta['copy_gbps']:.0f} GB/s", flush=True)
    rows: list[dict] = []
    by_name: dict[str, dict] = {}
    g = torch.Generator().manual_seed(0)
    cases = [] if args.only == "extend" else [("decode", *c) for c in DECODE]
    cases += [] if args.only == "decode" else [("extend", n, s, f, "separate", b, t) for n, s, f, b, t in EXTEND]
    for family, name, shape, feats, form, base, target in cases:
        row = {"family": family, "name": name, "shape": shape, "features": sorted(feats), "pool": form}
        try:
            g.manual_seed(zlib.crc32(shape.encode()))  # one shape, the same lengths in every case
            if family == "decode":
                row.update(decode_case(shape, feats, form, args.dispatch, g))
                row["pct_copy"] = 100 * row["gbps"] / meta["copy_gbps"]
            else:
                row.update(extend_case(shape, feats, args.dispatch, g))
            if base and "us" in by_name.get(base, {}):
                row.update(baseline=base, ratio=row["us"] / by_name[base]["us"], target=target)
                row["meets_target"] = None if target is None else row["ratio"] <= target
        except Exception as exc:  # a failing case is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if not SMOKE:
            torch.cuda.empty_cache()
        rows.append(row)
        by_name[name] = row
        print(json.dumps(row), flush=True)
    full, win = by_name.get("plain@32x32768", {}), by_name.get("window4096@32x32768", {})
    if "us" in full and "us" in win:
        meta["window_speedup_vs_full"] = full["us"] / win["us"]
    key = meta["gpu"].split()[1].lower() if len(meta["gpu"].split()) > 1 else meta["gpu"]
    path = Path(args.out) if args.out else _results_dir() / f"features-{key}-{meta['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n{meta['gpu']}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"pagegen {meta['pagegen']}  copy {meta['copy_gbps']:.0f} GB/s  configs: {meta['configs']}")
    print(f"{'case':28} {'us':>10} {'GB/s|TF/s':>10} {'%copy':>6} {'ratio':>7} {'target':>7}  baseline")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:28} ERROR {r['error']}")
            continue
        rate = r.get("gbps", r.get("tflops", float("nan")))
        ratio = f"{r['ratio']:.3f}" if "ratio" in r else ""
        tgt = f"<={r['target']:.2f}" if r.get("target") else ""
        print(f"{r['name']:28} {r['us']:10.1f} {rate:10.1f} {r.get('pct_copy', float('nan')):6.1f} {ratio:>7} "
              f"{tgt:>7}  {r.get('baseline', '')}")
    if "window_speedup_vs_full" in meta:
        print(f"window 4096 over 32768 vs full attention over 32768: {meta['window_speedup_vs_full']:.2f}x faster")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
