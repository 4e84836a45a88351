"""Speculative-verify benchmark (issue 17): a step of q_len new tokens per sequence against pagegen's
one-token decode, pagegen's extend on the same inputs, and the fastest torch SDPA, in one run.

Workload: bf16, head_dim 128, 32 query heads / 8 KV heads (group 4), block_size 16, NHD pools with
shuffled block tables. A shape BxCTX has B sequences of CTX cached tokens each, the q_len new tokens
included (their K/V already in the pool, as kv_write leaves them); `mixed` is 64 sequences of
U[64, 8192] tokens. New token i of a sequence sees the context and new tokens 0..i (causal, lower
right). Cases (shape, q_len): 8x32768 with q_len 1, 2, 4, 8, 16; 64x4096, 1x32768 and mixed with 4.
Implementations, per case:
  decode1  pagegen.paged_decode of ONE token a sequence (the last new token) on the same pool: the
           cost a verify step should match (it reads the same KV); timed once per shape
  verify   pagegen.paged_verify (dispatcher's config: tuned entry of the q_len spec, else heuristic)
  extend   pagegen.paged_extend on the same inputs packed ([B * q_len, Hq, D] + cu_seqlens_q)
  sdpa-*   torch SDPA on a contiguous [B, H, CTX, D] slab holding the same K/V, q [B, Hq, q_len, D],
           native GQA: the lower-right causal mask as torch.nn.attention.bias.causal_lower_right and as
           an explicit bool mask (q_len 1: no mask; mixed: a [B, 1, q_len, max] bool mask that also
           hides each sequence's padding), torch's own backend choice and each backend alone, the
           fastest named (bench/baselines.py); K/V heads repeated only where no GQA form runs
  best     (--tune) verify with the fastest config of a small grid (what tuning could reach)
Checks before timing: verify and extend against the float64 reference on 3 sampled sequences, SDPA
likewise; decode1 against verify's last token. Targets (verify / decode1): 8x32768 q_len 2 and 4
<= 1.1, 8 <= 1.25, 16 <= 1.5; 64x4096 q_len 4 <= 1.1; 1x32768 q_len 4 <= 1.2; mixed q_len 4 <= 1.2;
and extend / verify >= 2 at 32768 context. Bytes = KV read once (sum of contexts x Hkv x D x 2 x 2)
+ q + out; GB/s and % of the copy bandwidth measured in the same run. Timing: bench.common.timeit
(CUDA-graph replay, L2 flushed before every run). About 2 minutes on an H200 (without --tune).

    python bench/verify.py [--cases 8x32768:4,mixed:4] [--tune] [--out PATH]
    python bench/verify.py --cpu-smoke     # tiny shapes in Triton's CPU interpreter (numbers meaningless)
Writes bench/results/verify-<gpu>-<date>.json (rewritten after every case) and a .log beside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
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
from pagegen.dispatch import attention_path  # noqa: E402
from pagegen.reference import paged_verify_ref  # noqa: E402
from pagegen.spec import Config, KernelSpec, illegal_reason  # noqa: E402

HQ, HK, D, BS = 32, 8, 128, 16
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # the interpreter's bf16 dot is garbage
DEV = "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"
CASES = ["8x32768:1", "8x32768:2", "8x32768:4", "8x32768:8", "8x32768:16", "64x4096:4", "1x32768:4", "mixed:4"]
SMOKE_SHAPES = {"8x32768": "2x48", "64x4096": "3x24", "1x32768": "1x80", "mixed": "mixed"}
MIXED = (64, 64, 8192)  # sequences, shortest, longest
SMOKE_MIXED = (3, 20, 60)
TARGETS = {"8x32768:2": 1.1, "8x32768:4": 1.1, "8x32768:8": 1.25, "8x32768:16": 1.5, "64x4096:4": 1.1,
           "1x32768:4": 1.2, "mixed:4": 1.2}
EXTEND_SPEEDUP = 2.0  # extend / verify at least this at 32768 context
TOL = baselines.TOL
MATH_MAX_SCORES = 1 << 29  # the math backend materialises B x Hq x q_len x CTX fp32 scores
TUNE_GRID = [Config(block_n=n, num_warps=w, num_stages=s, split_size=sp)
             for n, w, s, sp in itertools.product((32, 64, 128), (4, 8), (2, 3), (0, 1024, 4096, 8192))]


def lens_of(shape: str, g: torch.Generator) -> list[int]:
    if shape == "mixed":
        n, lo, hi = SMOKE_MIXED if SMOKE else MIXED
        return torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    shape = SMOKE_SHAPES.get(shape, shape) if SMOKE else shape
    b, n = (int(x) for x in shape.split("x"))
    return [n] * b


def make_inputs(shape: str, q_len: int, seed: int = 0) -> dict:
    """The slab K/V [B, HK, L, D] (L = longest, padded to pages) and the same tokens in a paged pool with
    shuffled blocks; q [B, q_len, HQ, D]; the lengths; the sampled sequences the reference checks."""
    g = torch.Generator().manual_seed(seed)
    lens = lens_of(shape, g)
    b, longest = len(lens), max(lens)
    nblk = [-(-n // BS) for n in lens]
    width = max(nblk)
    slab_k = torch.randn(b, HK, width * BS, D, device=DEV, dtype=DTYPE)
    slab_v = torch.randn(b, HK, width * BS, D, device=DEV, dtype=DTYPE)
    total = sum(nblk)
    perm = torch.randperm(total, generator=g).int()
    bt = torch.zeros(b, width, dtype=torch.int32)
    k = torch.empty(total, BS, HK, D, device=DEV, dtype=DTYPE)
    v = torch.empty_like(k)
    pos = 0
    for i, nb in enumerate(nblk):
        ids = perm[pos:pos + nb].long().to(DEV)
        bt[i, :nb] = perm[pos:pos + nb]
        pos += nb
        k[ids] = slab_k[i, :, :nb * BS].reshape(HK, nb, BS, D).permute(1, 2, 0, 3)
        v[ids] = slab_v[i, :, :nb * BS].reshape(HK, nb, BS, D).permute(1, 2, 0, 3)
    q = torch.randn(b, q_len, HQ, D, device=DEV, dtype=DTYPE)
    idx = torch.linspace(0, b - 1, min(3, b)).long().unique()
    return dict(shape=shape, q_len=q_len, lens=lens, k=k, v=v, bt=bt.to(DEV),
                sl=torch.tensor(lens, dtype=torch.int32, device=DEV), q=q,
                slab_k=slab_k[:, :, :longest].contiguous(), slab_v=slab_v[:, :, :longest].contiguous(), idx=idx.to(DEV),
                cu=torch.arange(0, (b + 1) * q_len, q_len, dtype=torch.int32, device=DEV))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def reference(x: dict) -> torch.Tensor:
    """float64 verify output of the sampled sequences: [len(idx), q_len, HQ, D]."""
    i = x["idx"]
    return paged_verify_ref(x["q"][i], x["k"], x["v"], x["bt"][i], x["sl"][i])


def kv_bytes(x: dict) -> int:
    return sum(x["lens"]) * HK * D * 2 * x["k"].element_size() + 2 * x["q"].numel() * x["q"].element_size()


# ----------------------------------------------------------------- implementations


def run_verify(x: dict, config: Config | None):
    out = torch.empty_like(x["q"])
    hint = dict(max_seq_len=max(x["lens"]), sum_seq_lens=sum(x["lens"]))

    def fn():
        return pagegen.paged_verify(x["q"], x["k"], x["v"], x["bt"], x["sl"], out=out, config=config, **hint)

    return fn


def run_decode1(x: dict):
    q1 = x["q"][:, -1].contiguous()  # the last new token: it sees the whole context
    out = torch.empty_like(q1)
    hint = dict(max_seq_len=max(x["lens"]), sum_seq_lens=sum(x["lens"]))

    def fn():
        return pagegen.paged_decode(q1, x["k"], x["v"], x["bt"], x["sl"], out=out, **hint)

    return fn


def run_extend(x: dict):
    """The extend kernel on the verify step (its dispatcher config, given explicitly: paged_extend would
    otherwise route a short extend over a long prefix to chunked verify, dispatch.extend_chunk_route)."""
    from pagegen.dispatch import select_config
    from pagegen.extend import extend_spec

    b, ql = x["q"].shape[:2]
    q3 = x["q"].reshape(b * ql, HQ, D)
    out = torch.empty_like(q3)
    spec = extend_spec(q3, x["k"], x["v"], x["bt"], x["cu"], x["sl"], "NHD")
    cfg = select_config(spec, b * ql, max(x["lens"]), HK)

    def fn():
        return pagegen.paged_extend(q3, x["k"], x["v"], x["bt"], x["cu"], x["sl"], out=out, max_q_len=ql,
                                    max_seq_len=max(x["lens"]), config=cfg).view(b, ql, HQ, D)

    return fn


def sdpa_forms(x: dict) -> tuple[dict, dict]:
    """(forms, fallbacks): SDPA spellings of this verify step, {name: fn() -> out [B, q_len, HQ, D]}."""
    from torch.nn.attention.bias import causal_lower_right

    f = torch.nn.functional.scaled_dot_product_attention
    qc = x["q"].transpose(1, 2).contiguous()  # [B, HQ, q_len, D]
    kc, vc = x["slab_k"], x["slab_v"]  # [B, HK, L, D]
    ql, n = qc.shape[2], kc.shape[2]
    lens = torch.tensor(x["lens"], device=qc.device)
    uniform = len(set(x["lens"])) == 1

    def spell(kk, vv, gqa):
        def run(**kw):
            return lambda: f(qc, kk, vv, enable_gqa=gqa, **kw).transpose(1, 2)

        if uniform and ql == 1:
            return {"plain": run()}
        if uniform:
            return {"bias": run(attn_mask=causal_lower_right(ql, n)),
                    "mask": run(attn_mask=baselines.lower_right_mask(ql, n, qc.device))}
        i = torch.arange(ql, device=qc.device)[None, :, None]
        j = torch.arange(n, device=qc.device)[None, None, :]
        mask = (j <= i + (lens[:, None, None] - ql)) & (j < lens[:, None, None])  # [B, q_len, L]
        return {"mask": run(attn_mask=mask[:, None])}

    rep = HQ // HK
    kr, vr = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
    return spell(kc, vc, True), {f"{name}-repeat-kv": fn for name, fn in spell(kr, vr, False).items()}


def tune(x: dict, ref: torch.Tensor, reps: int) -> tuple[Config | None, float, list]:
    """Fastest legal, correct verify config of TUNE_GRID for this case: (config, us, log)."""
    spec = KernelSpec("decode", head_dim=D, block_size=BS, dtype="fp16" if SMOKE else "bf16", group_size=HQ // HK,
                      q_len=attention_path(x["q_len"], HQ // HK, D))
    best: tuple[float, Config] | None = None
    log: list = []
    for cfg in TUNE_GRID:
        if illegal_reason(spec, cfg) or (cfg.split_size and cfg.split_size >= max(x["lens"])):
            continue
        try:
            fn = run_verify(x, cfg)
            err = rel(fn()[x["idx"]], ref)
            if not err < TOL:
                log.append((cfg.to_dict(), f"wrong: {err:.2e}"))
                continue
            us = timeit(lambda i, fn=fn: fn(), reps=reps).median_us
        except Exception as exc:  # out of resources etc.: recorded, not fatal
            log.append((cfg.to_dict(), f"{type(exc).__name__}: {str(exc)[:80]}"))
            continue
        log.append((cfg.to_dict(), round(us, 2)))
        if best is None or us < best[0]:
            best = (us, cfg)
    return (best[1], best[0], log) if best else (None, float("inf"), log)


# ----------------------------------------------------------------- driver


def bench_case(case: str, args: argparse.Namespace, decode1: dict, copy: float | None) -> list[dict]:
    """Every implementation on one (shape, q_len) case; one row each (errors reported, not raised)."""
    shape, ql = case.split(":")
    x = make_inputs(shape, int(ql))
    ref = reference(x)
    nbytes = kv_bytes(x)
    rows: list[dict] = []

    def finish(row: dict, us: float) -> None:
        row.update(us=us, gbps=nbytes / us / 1e3)
        if copy:
            row["pct_copy"] = 100 * row["gbps"] / copy

    def attempt(impl: str, make, check) -> dict:
        row: dict = {"case": case, "impl": impl}
        try:
            fn, extra = make()
            row.update(extra)
            out = fn()
            row["rel_err"] = check(out)
            if not row["rel_err"] < TOL:
                raise RuntimeError(f"wrong result: rel err {row['rel_err']:.2e}")
            finish(row, timeit(lambda i, fn=fn: fn(), reps=args.reps).median_us)
        except Exception as exc:  # a failing implementation is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        return row

    def vs_ref(out: torch.Tensor) -> float:
        return rel(out[x["idx"]], ref)

    verify_out: list[torch.Tensor] = []

    def make_verify():
        fn = run_verify(x, None)
        verify_out.append(fn().clone())
        from pagegen.verify import VerifyPlan

        cfg = VerifyPlan(x["q"], x["k"], x["v"], x["bt"], x["sl"], max_seq_len=max(x["lens"]),
                         sum_seq_lens=sum(x["lens"])).config
        return fn, {"config": cfg.to_dict()}

    verify = attempt("verify", make_verify, vs_ref)
    if shape not in decode1:  # one-token decode once per shape, checked against verify's last token
        last = verify_out[0][:, -1] if verify_out else None
        def make_decode1():
            q1 = x["q"][:, -1].contiguous()
            cfg = pagegen.DecodePlan(q1, x["k"], x["v"], x["bt"], x["sl"], max_seq_len=max(x["lens"]),
                                     sum_seq_lens=sum(x["lens"])).config
            return run_decode1(x), {"config": cfg.to_dict()}

        decode1[shape] = attempt("decode1", make_decode1,
                                 lambda o: rel(o, last) if last is not None else rel(o[x["idx"]], ref[:, -1]))
    else:
        rows.append({**decode1[shape], "case": case, "note": "timed with the shape's first case"})
    attempt("extend", lambda: (run_extend(x), {}), vs_ref)
    if args.tune:
        def make_best():
            cfg, _, log = tune(x, ref, max(10, args.reps // 3))
            if cfg is None:
                raise RuntimeError(f"no config of the grid ran correctly: {log[:3]}")
            return run_verify(x, cfg), {"config": cfg.to_dict(), "tune_log": log}

        attempt("best", make_best, vs_ref)
    if "sdpa" not in args.skip:
        forms, fallbacks = sdpa_forms(x)
        scores = len(x["lens"]) * HQ * x["q_len"] * x["slab_k"].shape[2]
        skip = {"math": f"n/a (math skipped: {scores * 4 / 2**30:.1f} GiB of fp32 scores)"} \
            if scores > MATH_MAX_SCORES else {}
        srows, best = baselines.sweep(forms, vs_ref, skip=skip, reps=args.reps, fallbacks=fallbacks)
        for r in srows + ([best] if best else []):
            row = {"case": case, **r}
            if "us" in r:
                finish(row, r["us"])
            rows.append(row)
    by = {r["impl"]: r for r in rows if "us" in r}
    if "verify" in by:
        v = by["verify"]["us"]
        if "decode1" in by:
            verify["ratio_vs_decode1"] = v / by["decode1"]["us"]
            verify["target"] = TARGETS.get(case)
        if "extend" in by:
            verify["extend_speedup"] = by["extend"]["us"] / v
        if "sdpa-best" in by:
            verify["sdpa_best_speedup"] = by["sdpa-best"]["us"] / v
        if "best" in by and "decode1" in by:
            by["best"]["ratio_vs_decode1"] = by["best"]["us"] / by["decode1"]["us"]
    return rows


def summary(cases: list[str], rows: list[dict]) -> list[str]:
    """One line per case: verify / decode1 against its target, extend / verify, SDPA-best / verify."""
    lines = []
    for case in cases:
        by = {r["impl"]: r for r in rows if r.get("case") == case}
        v = by.get("verify", {})
        if "us" not in v:
            lines.append(f"{case:12} verify: {v.get('error', 'not run')}")
            continue
        parts = [f"{case:12} verify {v['us']:9.1f} us {v['gbps']:7.0f} GB/s"]
        if "ratio_vs_decode1" in v:
            tgt = v.get("target")
            ok = "" if tgt is None else (" ok" if v["ratio_vs_decode1"] <= tgt else " MISSED")
            parts.append(f"x decode1 {v['ratio_vs_decode1']:.3f}" + (f" (target <= {tgt}{ok})" if tgt else ""))
        if "extend_speedup" in v:
            at32k = case.split(":")[0].endswith("x32768")
            ok = "" if not at32k else (" ok" if v["extend_speedup"] >= EXTEND_SPEEDUP else " MISSED")
            parts.append(f"extend/verify {v['extend_speedup']:.2f}" + (f" (target >= {EXTEND_SPEEDUP}{ok})"
                                                                       if at32k else ""))
        if "sdpa_best_speedup" in v:
            parts.append(f"sdpa-best/verify {v['sdpa_best_speedup']:.2f} ({by['sdpa-best'].get('winner', '')})")
        if "us" in by.get("best", {}):
            parts.append(f"tuned x decode1 {by['best'].get('ratio_vs_decode1', float('nan')):.3f}")
        lines.append("  ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated SHAPE:Q_LEN (SHAPE = BxCTX or mixed)")
    ap.add_argument("--reps", type=int, default=50, help="timed runs per measurement")
    ap.add_argument("--tune", action="store_true", help="also time verify's fastest config of a small grid")
    ap.add_argument("--skip", default="", help="comma-separated: sdpa")
    ap.add_argument("--out", default="", help="JSON path or folder (default bench/results/verify-<gpu>-<date>.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes in the interpreter (numbers meaningless)")
    args = ap.parse_args(argv)
    if SMOKE:
        args.reps = 2
    cases = [c for c in args.cases.split(",") if c]
    path = result_path("verify", tag="smoke" if SMOKE else "", out=args.out or None)
    with tee_log(path):
        meta = run_meta("verify", workload=f"{str(DTYPE).replace('torch.', '')} hd{D} {HQ}q/{HK}kv block{BS} NHD "
                                           "shuffled tables; cases " + ",".join(cases))
        print(meta_line(meta), flush=True)
        rows: list[dict] = []
        decode1: dict = {}
        for case in cases:
            rows += bench_case(case, args, decode1, meta.get("copy_gbps"))
            if DEV == "cuda":
                torch.cuda.empty_cache()  # the case's pools and slabs are gone
            for r in rows:
                if r.get("case") == case:
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                           if k not in ("tune_log", "forms")}, flush=True)
            write_json(path, {"meta": meta, "rows": rows})
        lines = summary(cases, rows)
        write_json(path, {"meta": meta, "rows": rows, "summary": lines})
        print("\n" + meta_line(meta))
        print("\n".join(lines))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
