"""Shapes of bench/extend.py: their spelling, the batch lengths they draw, the unmasked (query, key) pairs
they count, and the summary lines (targets included) of a run's rows. No GPU state: pure functions of
the shapes and rows.

Shapes: "Q@C" (one sequence, Q new tokens over C cached), "Bx[q0,q1]@[c0,c1]" (B sequences with new and
prefix lengths drawn uniformly, seeded), or a name in BATCHES.
"""

from __future__ import annotations

import re

import torch

BATCHES = {"batch16": "16x[64,1024]@[0,8192]"}  # named batch shapes: issue 18's chunked-prefill step
BATCH_SEED = 0  # the batch lengths' generator seed: every run draws the same lengths
BATCH_RE = re.compile(r"(\d+)x\[(\d+),(\d+)\]@\[(\d+),(\d+)\]")
BATCH_TARGET_TFLOPS = 400.0  # issue 18: a chunked-prefill batch at >= 400 TFLOP/s of causal work
HEAD_DIM_TARGET = 0.9  # issue 18: head_dim 64 / 256 at >= 0.9x the fastest SDPA with no prefix


def split_shapes(text: str) -> list[str]:
    """Comma-separated shapes, commas inside [...] kept: "8@0,2x[4,8]@[0,16]" -> ["8@0", "2x[4,8]@[0,16]"]."""
    return [s for s in re.findall(r"(?:\[[^\]]*\]|[^,\[])+", text) if s]


def parse_shape(shape: str) -> tuple[int, int]:
    """"Q@C" -> (Q new tokens, C prefix tokens)."""
    q, c = shape.split("@")
    return int(q), int(c)


def parse_batch(shape: str) -> tuple[int, tuple[int, int], tuple[int, int]] | None:
    """A batch shape "Bx[q0,q1]@[c0,c1]" or a BATCHES name -> (B, (q0, q1), (c0, c1)); None for "Q@C"."""
    m = BATCH_RE.fullmatch(BATCHES.get(shape, shape).replace(" ", ""))
    if m is None:
        if "x" in shape or "[" in shape:
            raise ValueError(f"shape {shape!r} is not Q@C, Bx[q0,q1]@[c0,c1] or one of {sorted(BATCHES)}")
        return None
    b, q0, q1, c0, c1 = map(int, m.groups())
    if not (b >= 1 and 1 <= q0 <= q1 and 0 <= c0 <= c1):
        raise ValueError(f"batch shape {shape!r}: expected B >= 1, 1 <= q0 <= q1 and 0 <= c0 <= c1")
    return b, (q0, q1), (c0, c1)


def seq_lengths(shape: str, seed: int = BATCH_SEED) -> tuple[list[int], list[int]]:
    """(new tokens, prefix tokens) of each sequence of a shape: one pair for "Q@C"; for a batch shape,
    B pairs drawn uniformly (integers, both ends included) from torch.Generator(seed)."""
    batch = parse_batch(shape)
    if batch is None:
        q, c = parse_shape(shape)
        return [q], [c]
    b, (q0, q1), (c0, c1) = batch
    g = torch.Generator().manual_seed(seed)
    qs = torch.randint(q0, q1 + 1, (b,), generator=g).tolist()
    cs = torch.randint(c0, c1 + 1, (b,), generator=g).tolist()
    return qs, cs


def causal_pairs(q_lens: list[int], ctxs: list[int]) -> int:
    """Unmasked (query, key) pairs of a batch: sum over sequences of Q*C + Q*(Q+1)/2 (each new token sees
    the C prefix tokens and the new tokens up to itself)."""
    return sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, ctxs, strict=True))


def describe_batch(shape: str) -> dict:
    """A batch shape's drawn lengths and their sums (the JSON's meta["batches"] and the printed line)."""
    q_lens, ctxs = seq_lengths(shape)
    return {"spelling": BATCHES.get(shape, shape), "seed": BATCH_SEED, "sequences": len(q_lens),
            "new_tokens": sum(q_lens), "prefix_tokens": sum(ctxs), "kv_tokens": sum(q_lens) + sum(ctxs),
            "max_new": max(q_lens), "max_seq": max(q + c for q, c in zip(q_lens, ctxs, strict=True)),
            "pairs": causal_pairs(q_lens, ctxs), "q_lens": q_lens, "prefixes": ctxs}


def summarize(shapes: list[str], rows: list[dict], head_dim: int, block_size: int) -> dict:
    """pagegen / fastest SDPA TFLOP/s per shape (and which backend won), the prefix-caching ratio, and
    issue 18's targets this run can check: a batch shape's pagegen TFLOP/s (>= BATCH_TARGET_TFLOPS) and
    its speed against the fastest baseline; at head_dim != 128, pagegen / fastest SDPA with no prefix.
    head_dim, block_size: the run's geometry (named in the target lines)."""
    by = {(r["shape"], r["impl"]): r for r in rows if "us" in r}
    summary: dict = {}
    for shape in shapes:
        s = by.get((shape, "sdpa-best"))
        if s:
            summary[f"{shape} fastest SDPA"] = f"{s['winner']}: {s['us']:.1f} us, {s['tflops']:.0f} TFLOP/s"
        for impl in ("pagegen", "default", "default-tma", "best", "flex"):
            p = by.get((shape, impl))
            if s and p:
                summary[f"{shape} {impl} / fastest SDPA (TFLOP/s)"] = round(p["tflops"] / s["tflops"], 3)
        if parse_batch(shape) is not None:
            summary.update(batch_summary(shape, by, head_dim, block_size))
        elif head_dim != 128 and parse_shape(shape)[1] == 0 and s and (shape, "pagegen") in by:
            ratio = by[(shape, "pagegen")]["tflops"] / s["tflops"]
            key = (f"{shape} target (issue 18, hd{head_dim} block{block_size}): "
                   f"pagegen >= {HEAD_DIM_TARGET}x fastest SDPA")
            summary[key] = f"{ratio:.3f}x: {'met' if ratio >= HEAD_DIM_TARGET else 'NOT met'}"
        p8, p16 = by.get((shape, "pagegen")), by.get((shape, "pagegen-bf16"))
        if p8 and p16:  # --kv-dtype: the fp8 pool's time against the bf16 pool's
            summary[f"{shape} pagegen-bf16 / pagegen (time: the fp8 pool's speed-up)"] = round(p16["us"] / p8["us"], 3)
    for impl in ("pagegen", "default", "best", "sdpa-best"):
        a, b = by.get(("512@4096", impl)), by.get(("4608@0", impl))
        if a and b:
            summary[f"prefix caching {impl}: 512@4096 / 4608@0 time"] = round(a["us"] / b["us"], 3)
    return summary


def batch_summary(shape: str, by: dict, head_dim: int, block_size: int) -> dict:
    """A batch shape's summary lines: the fastest baseline, each pagegen row against it, the target check."""
    out: dict = {}
    base = by.get((shape, "baseline-best"))
    if base:
        out[f"{shape} fastest baseline"] = f"{base['winner']}: {base['us']:.1f} us, {base['tflops']:.0f} TFLOP/s"
    mine = {impl: by[(shape, impl)] for impl in ("pagegen", "default", "default-tma", "best") if (shape, impl) in by}
    for impl, p in mine.items():
        if base:
            out[f"{shape} {impl} / fastest baseline (TFLOP/s)"] = round(p["tflops"] / base["tflops"], 3)
    key = f"{shape} target (issue 18, hd{head_dim} block{block_size}): pagegen >= {BATCH_TARGET_TFLOPS:.0f} TFLOP/s"
    if "pagegen" in mine:
        t = mine["pagegen"]["tflops"]
        fastest = max(mine, key=lambda i: mine[i]["tflops"])
        out[key] = (f"{t:.0f} TFLOP/s: {'met' if t >= BATCH_TARGET_TFLOPS else 'NOT met'}"
                    f" (fastest pagegen row: {fastest} {mine[fastest]['tflops']:.0f})")
    return out


def with_fastest_baseline(rows: list[dict]) -> list[dict]:
    """A batch's rows with baseline-best (the faster of sdpa-best and flex, after them) and every
    pagegen row's speed_vs_fastest_baseline (that time / the pagegen row's)."""
    timed = [r for r in rows if r["impl"] in ("sdpa-best", "flex") and "us" in r]
    if not timed:
        return rows
    win = min(timed, key=lambda r: r["us"])
    what = f"SDPA one call a sequence, {win['winner']}" if win["impl"] == "sdpa-best" else f"flex ({win['note']})"
    row = {**{k: win[k] for k in ("shape", "flops", "us", "tflops", "pct_matmul") if k in win},
           "impl": "baseline-best", "winner": f"{win['impl']}: {what}"}
    at = max(i for i, r in enumerate(rows) if r["impl"].startswith("sdpa") or r["impl"] == "flex") + 1
    rows = rows[:at] + [row] + rows[at:]
    for r in rows[at + 1:]:
        if "us" in r:
            r["speed_vs_fastest_baseline"] = win["us"] / r["us"]
    return rows
