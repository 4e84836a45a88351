"""The driver: the CPU smoke run, the GPU benchmark (both engines on the offline and the shared-prefix
trace), the fp8-pool comparison (`--kv-dtype fp8_e4m3`: pagegen on a bf16 pool and on an fp8 pool of
the same bytes, fp8.py) and the command line (`python -m bench.serving` or `python bench/serving.py`)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import accounting_errors, agreement
from .fp8 import compare_pools, fp8_table
from .model import PRESETS, Model
from .naive import NaiveEngine
from .paged import PagegenEngine, pool_dtype
from .report import table, versions
from .trace import SMOKE_TRACE, TraceConfig, make_trace, trace_summary


@dataclass
class Setup:
    """Everything a run shares: model, dtypes, budget, engine options."""

    model: Model
    kv_dtype: torch.dtype
    budget_bytes: int
    block_size: int
    naive_reserve: str
    max_model_len: int
    max_batch: int
    max_running: int
    max_batched_tokens: int

    def naive(self) -> NaiveEngine:
        return NaiveEngine(self.model, kv_dtype=self.kv_dtype, budget_bytes=self.budget_bytes,
                           max_batch=self.max_batch, reserve=self.naive_reserve, max_model_len=self.max_model_len,
                           max_batched_tokens=self.max_batched_tokens)

    def paged(self, prefix_caching: bool = True, **kwargs) -> PagegenEngine:
        """The pagegen engine; kwargs go to PagegenEngine (pool_dtype, kv_scales, check_finite)."""
        return PagegenEngine(self.model, kv_dtype=self.kv_dtype, budget_bytes=self.budget_bytes,
                             block_size=self.block_size, prefix_caching=prefix_caching, max_running=self.max_running,
                             max_batched_tokens=self.max_batched_tokens, **kwargs)


def run_smoke(seed: int = 0, verbose: bool = True, device: str = "cpu") -> dict:
    """Smoke run: tiny model, 10 requests (half with a shared system prompt), a budget small enough
    to batch few naive slabs and to force a pagegen preemption. fp32 model, fp16 KV (both engines
    round q/k/v and attention outputs to fp16 alike), so greedy tokens must agree exactly. On the
    CPU the kernels run in Triton's interpreter. Returns the summaries, the token agreement and the
    accounting errors; raises nothing itself (the test asserts)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cfg = PRESETS["smoke"]
    model = Model(cfg, device=torch.device(device), dtype=torch.float32, seed=seed, max_pos=256)
    kv_dtype = torch.float16
    budget = 144 * cfg.kv_bytes_per_token(kv_dtype)  # 144 tokens = 18 blocks of 8
    setup = Setup(model, kv_dtype, budget, block_size=8, naive_reserve="request", max_model_len=256, max_batch=8,
                  max_running=8, max_batched_tokens=96)
    trace = make_trace(SMOKE_TRACE, cfg.vocab)
    out: dict = {"trace": trace_summary(trace), "runs": {}, "errors": {}}
    stats = {}
    for eng in (setup.naive(), setup.paged(True), setup.paged(False)):
        st = eng.run(trace, label="smoke")
        stats[eng.name] = st
        out["runs"][eng.name] = st.summary()
        out["errors"][eng.name] = accounting_errors(st, trace, eng)
        if verbose:
            s = st.summary()
            print(f"{eng.name:16s} {s['wall_s']:6.2f}s  tokens {s['output_tokens']}  finished {s['finished']}  "
                  f"peak {s['peak_running']}  preempt {s['preemptions']}  waste {s['kv_waste']:.3f}  "
                  f"hit {s['prefix_hit_rate']:.3f}  errors {out['errors'][eng.name]}")
    rids = [r.rid for r in trace]
    out["agreement"] = {name: agreement(stats["naive"], stats[name], rids) for name in ("pagegen", "pagegen-nocache")}
    if verbose:
        print("agreement with naive:", out["agreement"])
    return out


def calibration_prompt(n: int, vocab: int, seed: int) -> list[int]:
    """The fp8 scales' calibration prompt: n seeded random tokens, drawn apart from every trace."""
    g = torch.Generator().manual_seed(seed + 104729)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def run_fp8_smoke(seed: int = 0, verbose: bool = True, device: str = "cpu", fp8: str = "fp8_e4m3",
                  per_head: bool = False) -> dict:
    """The fp8-pool comparison on the smoke setup (tiny fp32 model, fp16 attention, the smoke trace, a
    144-token fp16 budget so that the fp16 pool preempts) under the interpreter on the CPU: the fp16
    pool and an fp8 pool of the same bytes (288 tokens). Non-finite attention outputs are counted.
    Returns the run_meta header plus compare_pools' result; raises nothing itself (the test asserts)."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.common import run_meta

    cfg = PRESETS["smoke"]
    model = Model(cfg, device=torch.device(device), dtype=torch.float32, seed=seed, max_pos=256)
    kv_dtype = torch.float16
    budget = 144 * cfg.kv_bytes_per_token(kv_dtype)
    setup = Setup(model, kv_dtype, budget, block_size=8, naive_reserve="request", max_model_len=256, max_batch=8,
                  max_running=16, max_batched_tokens=96)
    trace = make_trace(SMOKE_TRACE, cfg.vocab)
    cmp = compare_pools(setup, trace, pool_dtype(fp8), calib_tokens=calibration_prompt(32, cfg.vocab, seed),
                        per_head=per_head, label="smoke", check_steps=8, check_requests=len(trace), check_finite=True)
    out = {**run_meta("serving-fp8", workload="smoke: tiny model, interpreter (numbers meaningless)", copy=False),
           "model": {**dataclasses.asdict(cfg), "preset": "smoke", "dtype": "fp32", "attn_dtype": "fp16"},
           "kv_budget_bytes": budget, "kv_dtype": fp8, "trace": trace_summary(trace), **cmp}
    if verbose:
        print(fp8_table(cmp))
    return out


def gpu_setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, object, Setup, TraceConfig]:
    """(device, model dtype, model config, Setup over --kv-gib bytes, the trace's TraceConfig) of a GPU run's
    arguments: the one place run_gpu and run_fp8_gpu build their model, engines' setup and trace base."""
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = dataclasses.replace(PRESETS[args.model], layers=args.layers or PRESETS[args.model].layers)
    model = Model(cfg, device=dev, dtype=dtype, seed=args.seed, max_pos=args.max_model_len + 64)
    setup = Setup(model, dtype, int(args.kv_gib * 2**30), block_size=args.block_size,
                  naive_reserve=args.naive_reserve, max_model_len=args.max_model_len, max_batch=args.max_batch,
                  max_running=args.max_running, max_batched_tokens=args.max_batched_tokens)
    base = TraceConfig(num_requests=args.requests, seed=args.seed, rate=args.rate, max_tokens=args.max_tokens,
                       max_prompt=args.max_prompt)
    return dev, dtype, cfg, setup, base


def run_fp8_gpu(args: argparse.Namespace) -> dict:
    """The fp8-pool comparison on the GPU: the model in args.dtype, pagegen on an args.dtype pool and on
    an args.kv_dtype pool of the same --kv-gib bytes, both on the offline ShareGPT-like trace, each run
    warmed first and capped at --time-cap seconds (shorter when --total-budget runs out)."""
    from bench.common import run_meta

    t_start = time.perf_counter()
    dev, dtype, cfg, setup, base = gpu_setup(args)
    budget = setup.budget_bytes
    print(f"model {args.model}: {cfg} = {cfg.num_params() / 1e9:.2f} B params, {args.dtype}; KV budget "
          f"{args.kv_gib} GiB = {budget // cfg.kv_bytes_per_token(dtype)} tokens {args.dtype}, "
          f"{budget // cfg.kv_bytes_per_token(pool_dtype(args.kv_dtype))} tokens {args.kv_dtype}", flush=True)
    trace = make_trace(base, cfg.vocab)
    print(f"trace sharegpt: {trace_summary(trace)}", flush=True)
    warm = make_trace(dataclasses.replace(base, num_requests=args.warm_requests, max_tokens=min(24, args.max_tokens),
                                          max_prompt=min(300, args.max_prompt), seed=args.seed + 1), cfg.vocab)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s]{msg}", flush=True)

    # two warm-ups and two runs share what is left of the budget (warm-up ~15 s each, 10 s kept for the report)
    cap = max(5.0, min(args.time_cap, (args.total_budget - 40.0) / 2))
    cmp = compare_pools(setup, trace, pool_dtype(args.kv_dtype),
                        calib_tokens=calibration_prompt(args.calib_len, cfg.vocab, args.seed),
                        per_head=args.kv_scales == "head", time_cap=cap, sync=sync, log=log, warm=warm,
                        warm_len=args.max_model_len, check_steps=args.check_steps, check_requests=args.check_requests)
    out = {**run_meta("serving-fp8", workload=f"serving trace, {args.requests} requests", copy=False),
           "model": {**dataclasses.asdict(cfg), "preset": args.model, "params": cfg.num_params(), "dtype": args.dtype},
           "kv_budget_gib": args.kv_gib, "kv_dtype": args.kv_dtype,
           "engine_options": {"block_size": args.block_size, "max_model_len": args.max_model_len,
                              "max_running": args.max_running, "max_batched_tokens": args.max_batched_tokens,
                              "time_cap_s": cap, "total_budget_s": args.total_budget},
           "trace": {**trace_summary(trace), "config": dataclasses.asdict(base)}, **cmp}
    print()
    print(table(cmp["rows"]))
    print()
    print(fp8_table(cmp))
    out["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"total {out['total_wall_s']} s")
    return out


def run_gpu(args: argparse.Namespace) -> dict:
    """The GPU benchmark: both engines on the offline trace, then the shared-prefix trace."""
    t_start = time.perf_counter()
    dev, dtype, cfg, setup, base = gpu_setup(args)
    print(f"model {args.model}: {cfg} = {cfg.num_params() / 1e9:.2f} B params, {args.dtype}; "
          f"KV {cfg.kv_bytes_per_token(dtype)} bytes/token", flush=True)
    trace_a = make_trace(base, cfg.vocab)
    trace_b = make_trace(dataclasses.replace(base, shared_frac=args.shared_frac, system_len=args.system_len),
                         cfg.vocab)
    traces = {"sharegpt": trace_a, f"shared{int(args.shared_frac * 100)}": trace_b}
    for name, tr in traces.items():
        print(f"trace {name}: {trace_summary(tr)}", flush=True)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    empty_cache = torch.cuda.empty_cache if dev.type == "cuda" else (lambda: None)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s]{msg}", flush=True)

    # warm-up (compiles the Triton kernels, warms cuBLAS): short requests, not timed
    warm = make_trace(dataclasses.replace(base, num_requests=args.warm_requests, max_tokens=min(24, args.max_tokens),
                                          max_prompt=min(300, args.max_prompt), shared_frac=0.5,
                                          system_len=min(64, args.system_len), seed=args.seed + 1), cfg.vocab)
    for eng in (setup.naive(), setup.paged(True)):
        if isinstance(eng, PagegenEngine):
            eng.warm_kernels(args.max_model_len, log=log)
        eng.run(warm, label="warmup", sync=sync)
        del eng
    sync()
    empty_cache()
    log(" warm-up done")
    results, stats = [], {}
    plan = [("naive", "sharegpt", None), ("pagegen", "sharegpt", True)]
    bname = list(traces)[1]
    if not args.skip_shared:
        if args.naive_shared:
            plan.append(("naive", bname, None))
        plan += [("pagegen-nocache", bname, False), ("pagegen", bname, True)]
    deadline = t_start + args.total_budget - 10.0  # keep 10 s for the report
    for i, (kind, tname, caching) in enumerate(plan):
        eng = setup.naive() if kind == "naive" else setup.paged(caching)
        cap = max(5.0, min(args.time_cap, (deadline - time.perf_counter()) / (len(plan) - i)))
        log(f" {eng.name} on {tname} (time cap {cap:.0f} s) ...")
        st = eng.run(traces[tname], label=tname, time_cap=cap, sync=sync, log=log)
        s = st.summary()
        s["accounting_errors"] = [] if st.capped else accounting_errors(st, traces[tname], eng)
        results.append(s)
        stats[(eng.name, tname)] = st
        log(f" {eng.name} on {tname}: {s['output_tok_per_s']:.0f} tok/s, {s['finished']} finished in "
            f"{s['wall_s']:.1f}s, waste {s['kv_waste']:.1%}, peak {s['peak_running']}, capped {s['capped']}")
        del eng
        empty_cache()
    # greedy agreement on the first requests both engines finished
    na, pa = stats[("naive", "sharegpt")], stats[("pagegen", "sharegpt")]
    both = [r.rid for r in trace_a if len(na.tokens[r.rid]) == r.output_len and len(pa.tokens[r.rid]) == r.output_len]
    agree = agreement(na, pa, both[: args.check_requests])
    checked = both[: args.check_requests]
    agree["identical_first_token"] = sum(na.tokens[i][:1] == pa.tokens[i][:1] for i in checked)
    agree["identical_first16"] = sum(na.tokens[i][:16] == pa.tokens[i][:16] for i in checked)
    agree["note"] = ("bf16: the engines' attention kernels and GEMM batch shapes differ, so rounding can flip a "
                     "near-tie argmax and the sequences then diverge; exact agreement is checked by --smoke (fp32 "
                     "model, fp16 KV)") if args.dtype == "bf16" else ""
    ratio = pa.summary()["output_tok_per_s"] / max(1e-9, na.summary()["output_tok_per_s"])
    out = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": {**dataclasses.asdict(cfg), "preset": args.model, "params": cfg.num_params(), "dtype": args.dtype},
        "kv_budget_gib": args.kv_gib,
        "engine_options": {"block_size": args.block_size, "naive_reserve": args.naive_reserve,
                           "max_model_len": args.max_model_len, "max_batch": args.max_batch,
                           "max_running": args.max_running, "max_batched_tokens": args.max_batched_tokens,
                           "time_cap_s": args.time_cap, "total_budget_s": args.total_budget},
        "traces": {name: {**trace_summary(tr), "config": dataclasses.asdict(
            base if name == "sharegpt" else dataclasses.replace(base, shared_frac=args.shared_frac,
                                                                system_len=args.system_len))}
                   for name, tr in traces.items()},
        "results": results,
        "pagegen_over_naive_tok_per_s": round(ratio, 3),
        "agreement_naive_vs_pagegen": agree,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    if not args.skip_shared:
        on, off = stats[("pagegen", bname)].summary(), stats[("pagegen-nocache", bname)].summary()
        out["prefix_caching_gain"] = round(on["output_tok_per_s"] / max(1e-9, off["output_tok_per_s"]), 3)
        out["prefix_hit_rate"] = on["prefix_hit_rate"]
    print()
    print(table(results))
    print(f"\npagegen / naive output tok/s on sharegpt: {ratio:.2f}x   (target >= 2x; pagegen KV waste "
          f"{pa.summary()['kv_waste']:.1%}, target < 4%)")
    if "prefix_caching_gain" in out:
        print(f"prefix caching on {bname}: {out['prefix_caching_gain']:.2f}x tok/s, "
              f"hit rate {out['prefix_hit_rate']:.1%}")
    print(f"greedy agreement naive vs pagegen: {agree}")
    print(f"total {out['total_wall_s']} s")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(sys.modules[__package__].__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter (checks only)")
    p.add_argument("--smoke-device", default="cpu", choices=("cpu", "cuda"), help="where --smoke runs")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: dry run of the GPU driver under the interpreter (use --model smoke)")
    p.add_argument("--model", default="1b", choices=sorted(PRESETS), help="model preset (default 1b)")
    p.add_argument("--layers", type=int, default=0, help="override the preset's layer count")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--kv-gib", type=float, default=4.0, help="KV memory budget of each engine, GiB (default 4)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--requests", type=int, default=2000, help="requests per trace (default 2000)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrival rate, req/s (default: offline, t=0)")
    p.add_argument("--max-tokens", type=int, default=1024, help="output cap every request asks for")
    p.add_argument("--max-prompt", type=int, default=1024, help="clip of a request's own prompt")
    p.add_argument("--shared-frac", type=float, default=0.5, help="share with the system prompt (shared trace)")
    p.add_argument("--system-len", type=int, default=1024, help="system prompt tokens (shared trace)")
    p.add_argument("--naive-reserve", default="request", choices=("request", "max-len"))
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=256, help="naive: most rows in a static batch")
    p.add_argument("--max-running", type=int, default=512, help="pagegen: most running sequences")
    p.add_argument("--max-batched-tokens", type=int, default=8192, help="prefill tokens a step")
    p.add_argument("--time-cap", type=float, default=45.0, help="most seconds a run may take (default 45)")
    p.add_argument("--total-budget", type=float, default=200.0,
                   help="seconds for the whole GPU script: later runs get shorter caps (default 200)")
    p.add_argument("--warm-requests", type=int, default=24, help="requests of the untimed warm-up trace")
    p.add_argument("--check-requests", type=int, default=16, help="requests compared token by token")
    p.add_argument("--skip-shared", action="store_true", help="skip the shared-system-prompt trace")
    p.add_argument("--naive-shared", action="store_true", help="also run naive on the shared trace")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-dtype", default="", choices=("", "fp8_e4m3", "fp8_e5m2"),
                   help="fp8 comparison: pagegen on a --dtype pool and on a pool of this dtype of the same bytes "
                        "(no naive run; default: the naive vs pagegen benchmark, KV in --dtype)")
    p.add_argument("--kv-scales", default="tensor", choices=("tensor", "head"),
                   help="fp8 scales per layer tensor or per KV head (absmax of a calibration prompt / fmax)")
    p.add_argument("--calib-len", type=int, default=256, help="tokens of the fp8 calibration prompt")
    p.add_argument("--check-steps", type=int, default=32, help="fp8: greedy steps compared with the base pool")
    p.add_argument("--out", default="", help="JSON path (default bench/results/serving[-fp8]-<gpu>-<date>.json)")
    args = p.parse_args(argv)
    if args.smoke and args.kv_dtype:
        out = run_fp8_smoke(args.seed, device=args.smoke_device, fp8=args.kv_dtype, per_head=args.kv_scales == "head")
        if args.out:
            from bench.common import write_json

            print(f"wrote {write_json(Path(args.out), out)}")
        bad = {r["kv_pool"]: r["accounting_errors"] for r in out["rows"] if r["accounting_errors"]}
        ok = not bad and out["capacity_ratio"] == 2.0 and out["attention_check"]["nonfinite"] == 0 \
            and not any(r.get("nonfinite_attn") for r in out["rows"])
        print("fp8 smoke", "OK" if ok else f"FAILED {bad}")
        return 0 if ok else 1
    if args.smoke:
        out = run_smoke(args.seed, device=args.smoke_device)
        bad = {k: v for k, v in out["errors"].items() if v}
        ok = not bad and all(a["identical"] == a["checked"] for a in out["agreement"].values())
        print("smoke", "OK" if ok else f"FAILED {bad}")
        return 0 if ok else 1
    if args.device == "cpu":  # a dry run of the GPU driver with a tiny model (checks the script, not speed)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("GPU mode needs CUDA; use --smoke on the CPU", file=sys.stderr)
        return 2
    if args.kv_dtype:
        from bench.common import device_key, result_path, tee_log, write_json

        path = result_path("serving-fp8", device_key(), out=args.out)
        with tee_log(path):  # the printed log goes beside the JSON
            out = run_fp8_gpu(args)
            print(f"wrote {write_json(path, out)}")
        return 0
    out = run_gpu(args)
    from pagegen.gpu import gpu_key

    key = gpu_key(out["gpu"]) if args.device == "cuda" else "cpu"
    from bench.common import result_path

    path = result_path("serving", key, out=args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return 0
