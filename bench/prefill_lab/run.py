"""The prefill lab's one GPU run: every variant checked and timed against today's extend and torch SDPA.

Workload (issue 18): bf16, head_dim 128, 32 q / 8 KV heads (group 4), one sequence per shape; a shape
`Q@C` extends Q new tokens over C cached ones (their K/V already in the pool). Pools are NHD with
shuffled physical pages, page 16 (page 64 for the variants that need it); unwritten slots hold NaN.
Rows timed (median of triton.testing.do_bench, L2 flushed before every run):
  sdpa:<backend>   torch SDPA on the same tokens made contiguous ([1, H, n, D]), lower-right causal
                   mask (torch.nn.attention.bias.causal_lower_right), for the default choice and each
                   of cudnn / flash / efficient (a backend that refuses says so); native GQA when the
                   backend takes it, else KV heads repeated
  pagegen:p16/p64  pagegen.paged_extend with its heuristic config, pages of 16 / 64
  <variant>:<cfg>  each variant of variants.py, each of its configs, in its own process with a time
                   budget: a variant that fails to compile or verify is reported and skipped
Before anything is timed, every variant (and pagegen) is compiled in parallel processes (--warm-s).
Every row is checked before it is timed: rel err (L2) against SDPA's default output over all rows and
against the float64 reference (pagegen.reference.paged_extend_ref) on the first and last 64 rows.
TFLOP/s count only unmasked work: 4 * (Q*C + Q*(Q+1)/2) * D * Hq. The bf16 matmul rate of the same run
(8192^3, random) is the ceiling. Prints a table; writes JSON (card, date, versions, rows) to
$OUT/prefill_lab.json, or --out.

    python bench/prefill_lab/run.py                    # the GPU run (about 3-4 minutes on an H200)
    python bench/prefill_lab/run.py --dry-run          # CPU interpreter, fp16, tiny shapes: the logic only
    python bench/prefill_lab/run.py --variants a_diag,b_tma_kv --shapes 2048@0
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from common import GROUP, HEAD_DIM  # noqa: E402
from inputs import (  # noqa: E402
    DRY_SHAPES,
    SHAPES,
    TOL,
    check,
    device,
    dtype,
    heads,
    make_inputs,
    pool,
    references,
)
from variants import VARIANTS  # noqa: E402


def bench_us(fn) -> float:
    """Median microseconds of fn() (do_bench: L2 flushed before every run); one wall-clock call when dry."""
    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def matmul_tflops() -> float:
    n = 256 if DRY else 8192
    a = torch.randn(n, n, device=device(), dtype=dtype())
    b = torch.randn(n, n, device=device(), dtype=dtype())
    return 2 * n**3 / bench_us(lambda: a @ b) / 1e6


# ----------------------------------------------------------------------------- baselines


def sdpa_default(x: dict[str, Any]) -> torch.Tensor | None:
    """torch SDPA's default choice on x's one sequence, lower-right causal: [q_len, Hq, D] (None for a batch)."""
    from torch.nn.attention.bias import causal_lower_right

    if len(x["seqs"]) != 1:
        return None
    q_len, ctx = x["seqs"][0]
    qc = x["q"].transpose(0, 1)[None].contiguous()
    kc = x["ks"][0].transpose(0, 1)[None].contiguous()
    vc = x["vs"][0].transpose(0, 1)[None].contiguous()
    mask = causal_lower_right(q_len, q_len + ctx)
    f = torch.nn.functional.scaled_dot_product_attention
    try:
        o = f(qc, kc, vc, attn_mask=mask, enable_gqa=True)
    except Exception:  # no native GQA with this mask here: repeat the KV heads (same result)
        try:
            rep = qc.shape[1] // kc.shape[1]
            o = f(qc, kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1), attn_mask=mask)
        except Exception:  # then the float64 rows alone check the variants
            return None
    return o[0].transpose(0, 1)


def sdpa_rows(x: dict[str, Any], refs: dict[str, torch.Tensor]) -> tuple[list[dict], torch.Tensor | None]:
    """Time torch SDPA per backend on the contiguous tokens; returns (rows, default backend's output)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    f = torch.nn.functional.scaled_dot_product_attention
    if len(x["seqs"]) != 1:
        return [{"impl": "sdpa", "error": "skipped: SDPA rows need one sequence a shape"}], None
    q_len, ctx = x["seqs"][0]
    qc = x["q"].transpose(0, 1)[None].contiguous()  # [1, Hq, q_len, D]
    kc = x["ks"][0].transpose(0, 1)[None].contiguous()  # [1, Hk, n, D]
    vc = x["vs"][0].transpose(0, 1)[None].contiguous()
    mask = causal_lower_right(q_len, q_len + ctx)
    rep = heads()[0] // heads()[1]
    kr, vr = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
    backends = [("default", None)]
    if DRY:  # exercise the pinned-backend path on the CPU too
        backends += [("math", SDPBackend.MATH)]
    else:
        backends += [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    rows, base = [], None
    for name, backend in backends:
        row: dict[str, Any] = {"impl": f"sdpa:{name}"}
        notes = []
        fn = None
        for kk, vv, gqa in ((kc, vc, True), (kr, vr, False)):
            def call(kk=kk, vv=vv, gqa=gqa, backend=backend):
                if backend is None:
                    o = f(qc, kk, vv, attn_mask=mask, enable_gqa=gqa)
                else:
                    with sdpa_kernel(backend):
                        o = f(qc, kk, vv, attn_mask=mask, enable_gqa=gqa)
                return o[0].transpose(0, 1)  # [q_len, Hq, D]
            try:
                out = call()
                errs = check(out, x, None, refs)
                if errs["err_ref"] < TOL:
                    fn = call
                    row.update(errs, note="native GQA" if gqa else "KV heads repeated")
                    break
                notes.append(f"{'gqa' if gqa else 'repeated'}: wrong (rel err {errs['err_ref']:.1e})")
            except Exception as exc:  # a backend refusing the lower-right mask or GQA is a result
                notes.append(f"{'gqa' if gqa else 'repeated'}: {type(exc).__name__}: {str(exc)[:160]}")
        if fn is None:
            row["error"] = "refused: " + " | ".join(notes)
        else:
            row["us"] = bench_us(fn)
            if name == "default":
                base = fn()
        rows.append(row)
    return rows, base


def pagegen_rows(x: dict[str, Any], base: torch.Tensor | None, refs: dict[str, torch.Tensor]) -> list[dict]:
    """Today's pagegen.paged_extend with the heuristic config, pages of 16 and 64."""
    import pagegen
    from pagegen.dispatch import heuristic_config
    from pagegen.spec import KernelSpec

    rows = []
    for page in (16, 64):
        row: dict[str, Any] = {"impl": f"pagegen:p{page}"}
        try:
            kc, vc, bt = pool(x, page)
            spec = KernelSpec("extend", head_dim=HEAD_DIM, block_size=page, dtype="fp16" if DRY else "bf16",
                              group_size=GROUP)
            sms = 1 if DRY else torch.cuda.get_device_properties(0).multi_processor_count
            cfg = heuristic_config(spec, x["q"].shape[0], int(x["sl"].max()), heads()[1], sms)
            row["config"] = cfg.to_dict()
            out = torch.empty_like(x["q"])

            def fn(kc=kc, vc=vc, bt=bt, cfg=cfg, out=out):
                return pagegen.paged_extend(x["q"], kc, vc, bt, x["cu"], x["sl"], out=out, config=cfg,
                                            max_q_len=x["max_q"], max_seq_len=int(x["sl"].max()))
            row.update(check(fn(), x, base, refs))
            row["us"] = bench_us(fn)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- variants (worker side)


def compiled_facts(kernel: Any) -> dict[str, Any]:
    """Registers, spills, shared memory and the Hopper instructions of a compiled kernel (GPU only)."""
    facts: dict[str, Any] = {}
    for key, attr in (("registers", "n_regs"), ("spills", "n_spills")):
        facts[key] = getattr(kernel, attr, None)
    meta = getattr(kernel, "metadata", None)
    facts["shared_bytes"] = getattr(meta, "shared", None)
    facts["num_warps_total"] = getattr(meta, "num_warps", None)
    asm = getattr(kernel, "asm", {}) or {}
    ptx, ttgir = asm.get("ptx", ""), asm.get("ttgir", "")
    facts["wgmma"] = ptx.count("wgmma.mma_async")
    facts["tma"] = ptx.count("cp.async.bulk.tensor")
    facts["cp_async"] = ptx.count("cp.async.cg") + ptx.count("cp.async.ca")
    # the loop attribute {tt.warp_specialize} stays even when the pass declines; the op means it applied
    facts["warp_specialized"] = "ttg.warp_specialize" in ttgir
    facts["setmaxnreg"] = ptx.count("setmaxnreg")
    return facts


def warm(name: str, shapes: list[str]) -> None:
    """Worker, warm-up phase: launch every config of `name` once on every shape (no checks, no timing),
    so that Triton's on-disk cache holds each kernel with the very specialisation the timed run uses.
    `name` "pagegen" warms today's paged_extend at pages 16 and 64."""
    import pagegen
    from pagegen.dispatch import heuristic_config
    from pagegen.spec import KernelSpec

    mod = None if name == "pagegen" else importlib.import_module(name)
    for shape in shapes:
        x = make_inputs(shape)
        calls = []
        if mod is None:
            for page in (16, 64):
                kc, vc, bt = pool(x, page)
                spec = KernelSpec("extend", head_dim=HEAD_DIM, block_size=page, dtype="fp16" if DRY else "bf16",
                                  group_size=GROUP)
                cfg = heuristic_config(spec, x["q"].shape[0], int(x["sl"].max()), heads()[1], 132)
                calls.append(lambda x=x, kc=kc, vc=vc, bt=bt, cfg=cfg: pagegen.paged_extend(
                    x["q"], kc, vc, bt, x["cu"], x["sl"], config=cfg, max_q_len=x["max_q"],
                    max_seq_len=int(x["sl"].max())))
        else:
            kc, vc, bt = pool(x, mod.POOL_PAGE)
            out = torch.empty_like(x["q"])
            for cfg in mod.CONFIGS:
                calls.append(lambda x=x, cfg=cfg, kc=kc, vc=vc, bt=bt, out=out: mod.launch(
                    x["q"], kc, vc, bt, x["cu"], x["sl"], out, 1.0 / math.sqrt(HEAD_DIM), x["max_q"], cfg))
        for call in calls:
            t0 = time.time()
            try:
                call()
                if not DRY:
                    torch.cuda.synchronize()
                print(f"warm {name} {shape}: {time.time() - t0:.1f}s", flush=True)
            except Exception as exc:  # the timed run reports it
                print(f"warm {name} {shape}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def warm_all(names: list[str], shapes: list[str], limit_s: float) -> dict[str, str]:
    """Compile every variant (and pagegen) in parallel processes before anything is timed; the GPU
    sees only their one-off launches. Returns name -> 'ok <s>' / 'exit <rc>' / 'killed'."""
    procs = {}
    for name in ["pagegen", *names]:
        cmd = [sys.executable, __file__, "--warm", name, "--shapes", ",".join(shapes)] + (["--dry-run"] if DRY else [])
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True), time.time())
    status = {}
    end = time.time() + limit_s
    for name, (proc, t0) in procs.items():
        try:
            rc = proc.wait(timeout=max(0.1, end - time.time()))
            status[name] = f"ok {time.time() - t0:.0f}s" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # that warm-up's own process group only
            proc.wait()
            status[name] = f"killed after {limit_s:.0f}s"
    return status


def run_variant(name: str, shapes: list[str], result: Path, deadline: float) -> None:
    """Worker: check and time every config of variant `name` on every shape; append rows to `result`
    (a JSON list rewritten after every row, so a killed worker leaves what it finished)."""
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        result.write_text(json.dumps(rows))
        print(json.dumps(row), flush=True)

    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        emit({"impl": name, "error": f"import: {type(exc).__name__}: {str(exc)[:300]}"})
        return
    if DRY and not mod.INTERPRET:
        emit({"impl": name, "error": "skipped in the dry run: not interpretable (see inspect_sass.py)"})
        return
    bad: dict[int, str] = {}  # config index -> why it is skipped from now on
    for shape in shapes:
        x = make_inputs(shape)
        refs = references(x)
        base = sdpa_default(x)
        kc, vc, bt = pool(x, mod.POOL_PAGE)
        for ci, cfg in enumerate(mod.CONFIGS):
            row: dict[str, Any] = {"impl": f"{name}:{ci}", "variant": name, "config": cfg, "shape": shape,
                                   "flops": x["flops"]}
            if ci in bad:
                row["error"] = f"skipped: {bad[ci]}"
                emit(row)
                continue
            if time.time() > deadline:
                row["error"] = "skipped: variant time budget spent"
                emit(row)
                continue
            try:
                out = torch.full_like(x["q"], float("nan"))
                t0 = time.time()
                kernel = mod.launch(x["q"], kc, vc, bt, x["cu"], x["sl"], out, 1.0 / math.sqrt(HEAD_DIM),
                                    x["max_q"], cfg)
                if not DRY:
                    torch.cuda.synchronize()
                    row["first_call_s"] = round(time.time() - t0, 2)
                    try:
                        row["compiled"] = compiled_facts(kernel)
                    except Exception as exc:  # facts are a bonus: never lose the timing for them
                        row["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                row.update(check(out, x, base, refs))
                errs = [row["err_ref"]] + ([row["err_sdpa"]] if "err_sdpa" in row else [])
                if not max(errs) < TOL:
                    bad[ci] = f"wrong on {shape} (rel err {max(errs):.1e})"
                    row["error"] = bad[ci]
                else:
                    args = (x["q"], kc, vc, bt, x["cu"], x["sl"], out, 1.0 / math.sqrt(HEAD_DIM), x["max_q"], cfg)
                    row["us"] = bench_us(lambda args=args: mod.launch(*args))
            except Exception as exc:  # compile error, out of shared memory, launch failure: recorded
                bad[ci] = f"{type(exc).__name__}: {str(exc)[:300]}"
                row["error"] = bad[ci]
            emit(row)
        x = refs = base = None  # free this shape's tensors before the next one's
        if not DRY:
            torch.cuda.empty_cache()


def spawn(name: str, shapes: list[str], budget_s: float, tmp: Path) -> list[dict]:
    """Run variant `name` in a child process for at most budget_s; return its rows (error rows on a crash)."""
    result = tmp / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--worker", name, "--shapes", ",".join(shapes), "--result", str(result),
           "--budget-s", str(max(1.0, budget_s - 5))] + (["--dry-run"] if DRY else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    note = ""
    try:
        log, _ = proc.communicate(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and only its own process group
        log, _ = proc.communicate()
        note = f"killed after {budget_s:.0f}s"
    rows = json.loads(result.read_text()) if result.exists() else []
    if proc.returncode != 0 or note:
        tail = " ".join((log or "").strip().splitlines()[-3:])[-300:]
        rows.append({"impl": name, "variant": name, "error": note or f"worker exit {proc.returncode}: {tail}"})
    return rows


# ----------------------------------------------------------------------------- main


def fmt_table(meta: dict, rows: list[dict]) -> str:
    lines = [f"{meta['gpu']}  {meta['date']}  torch {meta['torch']}  triton {meta['triton']}  "
             f"bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s  ({meta.get('wall_s', 0):.0f}s)",
             f"{'shape':<16}{'impl':<16}{'us':>9}{'TFLOP/s':>9}{'%mm':>6}{'x best':>7}{'err':>9}  note"]
    best: dict[str, float] = {}
    for r in rows:
        if r.get("impl", "").startswith("sdpa:") and "tflops" in r:
            best[r["shape"]] = max(best.get(r["shape"], 0.0), r["tflops"])
    for r in rows:
        shape = r.get("shape", "-")
        if "error" in r:
            lines.append(f"{shape:<16}{r['impl']:<16}{'-':>9}{'-':>9}{'-':>6}{'-':>7}{'-':>9}  {r['error'][:90]}")
            continue
        ratio = r["tflops"] / best[shape] if best.get(shape) else float("nan")
        note = r.get("note") or json.dumps(r.get("config", ""))
        c = r.get("compiled")
        if c and "registers" in c:
            note += f" regs={c['registers']} spill={c['spills']} smem={c['shared_bytes']} tma={c['tma']}" \
                    f" ws={c['warp_specialized']}"
        lines.append(f"{shape:<16}{r['impl']:<16}{r['us']:>9.1f}{r['tflops']:>9.1f}{r['pct_matmul']:>6.1f}"
                     f"{ratio:>7.2f}{r.get('err_sdpa', r['err_ref']):>9.1e}  {note}")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per shape: the fastest SDPA backend, today's pagegen (pages of 16) and the fastest variant row,
    with their TFLOP/s and the ratio to that SDPA backend."""
    out: dict[str, dict] = {}
    for shape in dict.fromkeys(r.get("shape") for r in rows if r.get("shape")):
        timed = [r for r in rows if r.get("shape") == shape and "tflops" in r]
        sdpa = [r for r in timed if r["impl"].startswith("sdpa:")]
        var = [r for r in timed if "variant" in r]
        best_sdpa = max(sdpa, key=lambda r: r["tflops"], default=None)
        entry: dict[str, Any] = {}
        for key, r in (("sdpa", best_sdpa), ("pagegen", next((r for r in timed if r["impl"] == "pagegen:p16"), None)),
                       ("variant", max(var, key=lambda r: r["tflops"], default=None))):
            if r is not None:
                entry[key] = {"impl": r["impl"], "config": r.get("config"), "tflops": round(r["tflops"], 1),
                              "x_sdpa": round(r["tflops"] / best_sdpa["tflops"], 3) if best_sdpa else None}
        out[shape] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU interpreter, fp16, tiny shapes (checks the logic)")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="", help="JSON path (default $OUT/prefill_lab.json, else /tmp)")
    ap.add_argument("--total-s", type=float, default=0.0,
                    help="wall budget of the whole run (default 225 on the GPU, none in the dry run)")
    ap.add_argument("--variant-s", type=float, default=32.0, help="wall budget of one variant (all shapes)")
    ap.add_argument("--warm-s", type=float, default=80.0,
                    help="wall limit of the parallel compile phase (0: none; each worker then compiles its own)")
    ap.add_argument("--warm", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = args.shapes.split(",") if args.shapes else (DRY_SHAPES if DRY else SHAPES)
    if not args.total_s:
        args.total_s = 1e9 if DRY else 225.0
    if args.warm:
        warm(args.warm, shapes)
        return 0
    if args.worker:
        run_variant(args.worker, shapes, Path(args.result), time.time() + args.budget_s)
        return 0
    if not DRY and not torch.cuda.is_available():
        print("run.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    t_start = time.time()
    out_dir = Path(os.environ.get("OUT") or "/tmp")
    path = Path(args.out) if args.out else out_dir / ("prefill_lab_dry.json" if DRY else "prefill_lab.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "gpu": "CPU interpreter dry run" if DRY else torch.cuda.get_device_name(0),
        "sm_count": 0 if DRY else torch.cuda.get_device_properties(0).multi_processor_count,
        "capability": None if DRY else list(torch.cuda.get_device_capability(0)),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "workload": f"{'fp16' if DRY else 'bf16'} hd{HEAD_DIM} {heads()[0]}q/{heads()[1]}kv, NHD pools, shuffled "
                    "pages; shape = new@prefix",
    }
    try:
        import pagegen
        meta["pagegen"] = pagegen.__version__
    except Exception as exc:
        meta["pagegen"] = f"import failed: {exc}"
    names = [n for n in args.variants.split(",") if n]
    if args.warm_s > 0:
        meta["warm"] = warm_all(names, shapes, args.warm_s)
        meta["warm_s"] = round(time.time() - t_start, 1)
        print(f"compiled in parallel in {meta['warm_s']:.0f}s: {meta['warm']}", flush=True)
    meta["matmul_tflops"] = matmul_tflops()
    print(f"{meta['gpu']}: matmul {meta['matmul_tflops']:.0f} TFLOP/s", flush=True)
    rows: list[dict] = []

    def save() -> None:
        for r in rows:
            if "us" in r and "flops" in r:
                r["tflops"] = r["flops"] / r["us"] / 1e6
                r["pct_matmul"] = 100 * r["tflops"] / meta["matmul_tflops"]
        meta["wall_s"] = round(time.time() - t_start, 1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        tmp.replace(path)

    # baselines, in this process
    for shape in shapes:
        x = make_inputs(shape)
        try:
            refs = references(x)
            srows, base = sdpa_rows(x, refs)
            prows = pagegen_rows(x, base, refs)
        except Exception as exc:
            srows, prows = [{"impl": "baselines", "error": f"{type(exc).__name__}: {str(exc)[:300]}"}], []
        for r in srows + prows:
            r.update(shape=shape, flops=x["flops"])
            rows.append(r)
            print(json.dumps(r), flush=True)
        save()
        del x
        if not DRY:
            torch.cuda.empty_cache()
    # variants, each in its own process, within the budgets
    tmp = path.parent / "prefill_lab_workers"
    tmp.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        left = args.total_s - (time.time() - t_start)
        fair = left / (len(names) - i)  # what is left, shared by the variants not yet run
        budget = min(args.variant_s if not DRY else 600.0, max(fair, 0.0))
        if budget < 8:
            rows.append({"impl": name, "variant": name, "error": f"skipped: {left:.0f}s of the run's budget left"})
            continue
        t0 = time.time()
        got = spawn(name, shapes, budget, tmp)
        rows.extend(got)
        ok = sum(1 for r in got if "us" in r)
        print(f"{name}: {ok} rows timed, {len(got) - ok} failed or skipped, {time.time() - t0:.0f}s "
              f"(budget {budget:.0f}s)", flush=True)
        save()
    save()
    print()
    print(fmt_table(meta, rows))
    preds = {}
    for name in names:
        try:
            preds[name] = importlib.import_module(name).PREDICTION
        except Exception as exc:
            preds[name] = f"(import failed: {exc})"
    meta["predictions"] = preds
    meta["summary"] = summarize(rows)
    for shape, e in meta["summary"].items():
        print(f"{shape}: " + "; ".join(f"{k} {v['impl']} {v['tflops']} TFLOP/s ({v['x_sdpa']}x best SDPA)"
                                       for k, v in e.items()))
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
