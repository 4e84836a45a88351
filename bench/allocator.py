"""Allocator benchmark: bookkeeping cost per operation, and KV memory waste on a request trace.

    .venv/bin/python bench/allocator.py [--requests 3000] [--seed 0] [--out PATH.json or FOLDER]

Prints a table and writes bench/results/allocator-cpu-<date>.json. CPU only (no kernels run).

1. Operation cost (median of repeated runs, wall clock, this CPU):
   - a decode step of B running sequences (B = 256, 1024): append_batch (one token each, prefix
     hashing of blocks that fill) + block_tables (padded int32 [B, W] and seq_lens [B] torch tensors);
   - allocate + free of 100k blocks (one call each, and 100k single-block calls);
   - prefix lookup of a 4k-token prompt (256 blocks of 16): hashes + lookup, and a whole add().
2. Memory waste on a synthetic, seeded trace: the fraction of reserved KV memory that holds no
   token, integrated over every request's decode lifetime (a request with prompt p and output o
   holds p + j tokens at its j-th decode step, j = 1..o, and reserves R_j slots):
       waste = 1 - sum_j (p + j) / sum_j R_j, summed over requests,
   for (a) a contiguous slab of the model's max length (R = 2048), (b) a slab of prompt + the
   request's max output tokens (R = p + max_out), (c) paged blocks of 16 (R = 16 ceil((p + j) / 16)).
   The same at completion (each request at its final length) is reported too.
   Trace: prompt and output lengths are log-normal, like ShareGPT conversations (mean prompt ~160,
   mean output ~340 tokens, heavy right tails): prompt ~ LogNormal(ln 100, 1.0) clipped to
   [4, 1536]; output ~ LogNormal(ln 200, 1.0) clipped to [1, max_out]; max_out = min(1024, 2048 - p)
   (what a client asks for as max_tokens).
3. The paged case replayed through the real SequenceManager with continuous batching (64 requests
   running; a finished request is replaced by the next), measuring blocks held per step; then the
   prefix-sharing saving: a share of requests start with one common 512-token system prompt, and
   blocks held are compared with prefix caching off and on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import result_path, versions, write_json  # noqa: E402
from pagegen.allocator import BlockPool  # noqa: E402
from pagegen.sequences import SequenceManager  # noqa: E402

BLOCK = 16
MAX_LEN = 2048
MAX_OUT = 1024


def timed(fn, repeat: int, warmup: int = 3) -> list[float]:
    """Wall-clock seconds of each of `repeat` calls of fn() (after `warmup`), GC paused."""
    for _ in range(warmup):
        fn()
    out = []
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return out


def summary(seconds: list[float], scale: float = 1e3) -> dict[str, float]:
    s = sorted(seconds)
    return {"median": statistics.median(s) * scale, "p90": s[int(0.9 * (len(s) - 1))] * scale,
            "min": s[0] * scale, "runs": len(s)}


# -- 1. operation cost ---------------------------------------------------------------------------
def bench_decode_step(batch: int, steps: int, rng: np.random.Generator) -> dict:
    prompts = rng.integers(100, 1500, batch)
    m = SequenceManager(int(prompts.sum() // BLOCK + batch * (steps // BLOCK + 40)), BLOCK)
    ids = list(range(batch))
    for i, p in zip(ids, prompts, strict=True):
        m.add(i, rng.integers(0, 32000, int(p)).tolist())
    toks = rng.integers(0, 32000, (steps + 10, batch)).tolist()
    it = iter(toks)
    app, tab, both = [], [], []
    gc.disable()
    try:
        for k in range(steps + 10):
            row = next(it)
            t0 = time.perf_counter()
            m.append_batch(ids, row)
            t1 = time.perf_counter()
            bt, lens = m.block_tables(ids)
            t2 = time.perf_counter()
            if k >= 10:
                app.append(t1 - t0)
                tab.append(t2 - t1)
                both.append(t2 - t0)
    finally:
        gc.enable()
    m.check_invariants()
    return {"batch": batch, "steps": steps, "table_shape": list(bt.shape),
            "step_ms": summary(both), "append_ms": summary(app), "tables_ms": summary(tab)}


def bench_alloc_free(n: int = 100_000) -> dict:
    pool = BlockPool(n)

    def bulk():
        pool.free(pool.allocate(n))

    def singles():
        got = [pool.allocate_one() for _ in range(n)]
        pool.free(got)

    def singles_list_api():
        for _ in range(n):
            pool.free(pool.allocate(1))

    res = {"blocks": n, "bulk_ms": summary(timed(bulk, 10)), "singles_ms": summary(timed(singles, 5)),
           "alloc1_free1_loop_ms": summary(timed(singles_list_api, 5))}
    pool.check_invariants()
    return res


def bench_prefix_lookup(tokens: int = 4096) -> dict:
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 32000, tokens + 1).tolist()
    m = SequenceManager(4 * tokens // BLOCK, BLOCK)
    m.add("warm", prompt)
    m.free("warm")  # all full blocks now cached (ref 0)

    def lookup():
        return m.pool.find_prefix(m.prompt_hashes(prompt))

    def add_free():
        r = m.add("x", prompt)
        assert r.num_cached_tokens == tokens
        m.free("x")

    hashes = m.prompt_hashes(prompt)
    return {"tokens": tokens, "blocks": len(hashes),
            "hash_and_lookup_us": summary(timed(lookup, 50), 1e6),
            "lookup_only_us": summary(timed(lambda: m.pool.find_prefix(hashes), 50), 1e6),
            "add_with_full_hit_and_free_us": summary(timed(add_free, 50), 1e6)}


# -- 2. memory waste ---------------------------------------------------------------------------
def make_trace(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, output, max_out) lengths of n requests (see the module docstring)."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(np.round(rng.lognormal(np.log(100), 1.0, n)), 4, 1536).astype(np.int64)
    max_out = np.minimum(MAX_OUT, MAX_LEN - prompt)
    output = np.clip(np.round(rng.lognormal(np.log(200), 1.0, n)), 1, None).astype(np.int64)
    output = np.minimum(output, max_out)
    return prompt, output, max_out


def waste_analytic(prompt: np.ndarray, output: np.ndarray, max_out: np.ndarray) -> dict:
    # every (request, decode step j) pair: tokens held = p + j
    held = np.repeat(prompt, output) + (np.arange(output.sum()) - np.repeat(np.cumsum(output) - output, output) + 1)
    used = held.sum()
    reserved = {
        "a_slab_max_len": float(MAX_LEN * output.sum()),
        "b_slab_prompt_plus_max_out": float(((prompt + max_out) * output).sum()),
        "c_paged_16": float((-(-held // BLOCK) * BLOCK).sum()),
    }
    final = prompt + output
    at_end = {
        "a_slab_max_len": float(MAX_LEN * len(final)),
        "b_slab_prompt_plus_max_out": float((prompt + max_out).sum()),
        "c_paged_16": float((-(-final // BLOCK) * BLOCK).sum()),
    }
    return {
        "lifetime_waste": {k: 1 - used / v for k, v in reserved.items()},
        "at_completion_waste": {k: 1 - final.sum() / v for k, v in at_end.items()},
    }


def replay(prompt: np.ndarray, output: np.ndarray, *, system_prompt: list[int] | None, share_mask: np.ndarray,
           caching: bool, concurrency: int, seed: int) -> dict:
    """Continuous batching through the real SequenceManager; blocks held and tokens per step."""
    rng = np.random.default_rng(seed)
    sys_len = len(system_prompt) if system_prompt else 0
    m = SequenceManager(concurrency * (MAX_LEN + sys_len) // BLOCK + 64, BLOCK, enable_prefix_caching=caching)
    queue = list(range(len(prompt)))[::-1]
    running: dict[int, int] = {}  # request -> decode tokens left
    blocks_held = tokens_held = steps = hits = 0

    def admit():
        nonlocal hits
        while queue and len(running) < concurrency:
            r = queue.pop()
            toks = rng.integers(0, 32000, int(prompt[r])).tolist()
            if system_prompt and share_mask[r]:
                toks = system_prompt + toks
            hits += m.add(r, toks).num_cached_tokens
            running[r] = int(output[r])

    admit()
    while running:
        ids = list(running)
        m.append_batch(ids, rng.integers(0, 32000, len(ids)).tolist())
        steps += 1
        blocks_held += m.pool.num_used
        tokens_held += sum(m.num_tokens(i) for i in ids)
        for i in ids:
            running[i] -= 1
            if running[i] == 0:
                del running[i]
                m.free(i)
        admit()
    m.pool.check_invariants()
    assert m.pool.num_used == 0
    return {"steps": steps, "mean_blocks_held": blocks_held / steps, "mean_tokens_held": tokens_held / steps,
            "waste": 1 - tokens_held / (blocks_held * BLOCK), "prefix_cached_tokens": hits,
            "evictions": m.pool.stats().evictions}


# -- main -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300, help="decode steps timed per batch size")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--share", type=float, default=0.5, help="share of requests with the common system prompt")
    ap.add_argument("--system-prompt", type=int, default=512, help="system prompt tokens")
    ap.add_argument("--out", default="", help="JSON path or folder (default bench/results/allocator-cpu-<date>.json)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    res: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "note": "CPU sandbox; wall-clock timings"},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "block_size": BLOCK,
    }
    res["decode_step"] = [bench_decode_step(b, args.steps, rng) for b in (256, 1024)]
    res["alloc_free"] = bench_alloc_free()
    res["prefix_lookup"] = bench_prefix_lookup()

    prompt, output, max_out = make_trace(args.requests, args.seed)
    res["trace"] = {"requests": args.requests, "seed": args.seed,
                    "prompt": {"mean": float(prompt.mean()), "median": float(np.median(prompt)),
                               "p99": float(np.percentile(prompt, 99))},
                    "output": {"mean": float(output.mean()), "median": float(np.median(output)),
                               "p99": float(np.percentile(output, 99))},
                    "distribution": "prompt ~ LogNormal(ln 100, 1) in [4, 1536]; output ~ LogNormal(ln 200, 1) "
                                    "in [1, max_out]; max_out = min(1024, 2048 - prompt); max_len 2048"}
    res["waste"] = waste_analytic(prompt, output, max_out)
    share_mask = np.random.default_rng(args.seed + 1).random(args.requests) < args.share
    sysp = np.random.default_rng(args.seed + 2).integers(0, 32000, args.system_prompt).tolist()
    common = dict(share_mask=share_mask, concurrency=args.concurrency, seed=args.seed)
    res["replay_paged"] = replay(prompt, output, system_prompt=None, caching=False, **common)
    off = replay(prompt, output, system_prompt=sysp, caching=False, **common)
    on = replay(prompt, output, system_prompt=sysp, caching=True, **common)
    res["prefix_sharing"] = {
        "share": args.share, "system_prompt_tokens": args.system_prompt, "concurrency": args.concurrency,
        "caching_off": off, "caching_on": on,
        "block_saving": 1 - on["mean_blocks_held"] / off["mean_blocks_held"],
    }
    res["versions"] = versions()
    report(res)
    path = write_json(result_path("allocator", key="cpu", out=args.out), res)
    print(f"\nwrote {path}")
    return res


def report(r: dict) -> None:
    m = r["machine"]
    print(f"pagegen allocator benchmark  ({m['processor']}, {m['cpus']} CPUs, Python {m['python']})\n")
    print(f"{'operation':<52}{'median':>12}{'p90':>12}")
    for d in r["decode_step"]:
        b = d["batch"]
        print(f"{f'decode step, {b} seqs (append + tables)':<52}{d['step_ms']['median']:>9.3f} ms"
              f"{d['step_ms']['p90']:>9.3f} ms")
        print(f"{'  append_batch':<52}{d['append_ms']['median']:>9.3f} ms{d['append_ms']['p90']:>9.3f} ms")
        print(f"{'  block_tables ' + str(tuple(d['table_shape'])):<52}{d['tables_ms']['median']:>9.3f} ms"
              f"{d['tables_ms']['p90']:>9.3f} ms")
    a = r["alloc_free"]
    print(f"{'allocate(100k) + free(100k)':<52}{a['bulk_ms']['median']:>9.3f} ms{a['bulk_ms']['p90']:>9.3f} ms")
    print(f"{'100k x allocate_one, then free(100k)':<52}{a['singles_ms']['median']:>9.3f} ms"
          f"{a['singles_ms']['p90']:>9.3f} ms")
    print(f"{'100k x (allocate(1) + free)':<52}{a['alloc1_free1_loop_ms']['median']:>9.3f} ms"
          f"{a['alloc1_free1_loop_ms']['p90']:>9.3f} ms")
    p = r["prefix_lookup"]
    for key, label in (("hash_and_lookup_us", "hash + lookup"), ("lookup_only_us", "lookup (hashes given)"),
                       ("add_with_full_hit_and_free_us", "add (full hit) + free")):
        print(f"{f'4k-token prompt prefix, {label}':<52}{p[key]['median']:>9.1f} us{p[key]['p90']:>9.1f} us")
    t = r["trace"]
    print(f"\ntrace: {t['requests']} requests, prompt mean {t['prompt']['mean']:.0f} (median "
          f"{t['prompt']['median']:.0f}), output mean {t['output']['mean']:.0f} (median {t['output']['median']:.0f})")
    print(f"{'KV memory waste (reserved slots holding no token)':<52}{'lifetime':>12}{'at end':>12}")
    names = {"a_slab_max_len": "(a) contiguous slab of max length 2048",
             "b_slab_prompt_plus_max_out": "(b) contiguous slab of prompt + max output",
             "c_paged_16": "(c) paged, blocks of 16"}
    for k, label in names.items():
        print(f"{label:<52}{100 * r['waste']['lifetime_waste'][k]:>11.1f}%"
              f"{100 * r['waste']['at_completion_waste'][k]:>11.1f}%")
    rp = r["replay_paged"]
    print(f"{'(c) replayed through SequenceManager (64 running)':<52}{100 * rp['waste']:>11.1f}%")
    s = r["prefix_sharing"]
    print(f"\nprefix sharing: {100 * s['share']:.0f}% of requests start with a {s['system_prompt_tokens']}-token "
          f"system prompt, {s['concurrency']} running")
    print(f"  mean blocks held: caching off {s['caching_off']['mean_blocks_held']:.0f}, on "
          f"{s['caching_on']['mean_blocks_held']:.0f}  -> saving {100 * s['block_saving']:.1f}%")


if __name__ == "__main__":
    main()
