"""What a run measures and the per-request bookkeeping both engines share (RunStats, Tracker, Clock,
percentile)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .trace import Request


def percentile(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p in [0, 100]); NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


@dataclass
class RunStats:
    """What one engine did on one trace."""

    engine: str
    trace: str
    kv_budget_bytes: int
    kv_capacity_tokens: int  # tokens the budget holds
    requests: int = 0
    finished: int = 0
    capped: bool = False  # stopped by the time cap before the trace was done
    wall_s: float = 0.0
    output_tokens: int = 0  # tokens emitted (finished and unfinished requests)
    prompt_tokens: int = 0  # prompt tokens of admitted requests (recomputes not counted)
    computed_prompt_tokens: int = 0  # prefill tokens actually computed (recomputes counted, cache hits not)
    prefix_query_tokens: int = 0  # prompt tokens offered to the prefix cache at first admission
    prefix_hit_tokens: int = 0  # of those, served from cached blocks (readmissions: extra["recompute_*"])
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    peak_running: int = 0  # most sequences holding KV at once
    preemptions: int = 0
    reserved_token_steps: int = 0  # sum over decode steps of KV tokens reserved
    holding_token_steps: int = 0  # sum over decode steps of KV tokens holding a token
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    tokens: dict[int, list[int]] = field(default_factory=dict)  # rid -> emitted tokens
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The figures a serving engineer reads, JSON-ready."""
        res = self.reserved_token_steps
        return {
            "engine": self.engine,
            "trace": self.trace,
            "requests": self.requests,
            "finished": self.finished,
            "capped": self.capped,
            "wall_s": round(self.wall_s, 3),
            "output_tokens": self.output_tokens,
            "output_tok_per_s": round(self.output_tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "requests_per_s": round(self.finished / self.wall_s, 2) if self.wall_s else 0.0,
            "prompt_tokens": self.prompt_tokens,
            "computed_prompt_tokens": self.computed_prompt_tokens,
            "peak_running": self.peak_running,
            "steps": self.steps,
            "prefill_steps": self.prefill_steps,
            "decode_steps": self.decode_steps,
            "mean_decode_batch": round(self.extra.get("decode_rows", 0) / max(1, self.decode_steps), 1),
            "ms_per_step": round(1e3 * self.wall_s / max(1, self.steps), 3),
            "preemptions": self.preemptions,
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_reserved_tokens_avg": round(res / max(1, self.decode_steps), 1),
            "kv_holding_tokens_avg": round(self.holding_token_steps / max(1, self.decode_steps), 1),
            "kv_waste": round(1 - self.holding_token_steps / res, 4) if res else 0.0,
            "kv_use_of_budget": round(self.holding_token_steps / max(1, self.decode_steps)
                                      / max(1, self.kv_capacity_tokens), 4),
            "prefix_hit_rate": round(self.prefix_hit_tokens / self.prefix_query_tokens, 4)
            if self.prefix_query_tokens else 0.0,
            "ttft_p50_s": round(percentile(self.ttft, 50), 4),
            "ttft_p99_s": round(percentile(self.ttft, 99), 4),
            "tpot_p50_ms": round(1e3 * percentile(self.tpot, 50), 3),
            "tpot_p99_ms": round(1e3 * percentile(self.tpot, 99), 3),
            **{k: v for k, v in self.extra.items() if k != "decode_rows"},
        }


class Clock:
    """Run time in seconds since start; sleeps until a future arrival when idle."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def wait_until(self, t: float) -> None:
        dt = t - self.now()
        if dt > 0:
            time.sleep(dt)


class Tracker:
    """Per-request emission bookkeeping shared by both engines."""

    def __init__(self, stats: RunStats, trace: list[Request]) -> None:
        self.stats = stats
        self.first: dict[int, float] = {}
        stats.requests = len(trace)
        for r in trace:
            stats.tokens[r.rid] = []

    def emit(self, req: Request, token: int, now: float) -> bool:
        """Record one output token of `req` at time `now`; True when the request is done."""
        out = self.stats.tokens[req.rid]
        out.append(token)
        self.stats.output_tokens += 1
        if len(out) == 1:
            self.first[req.rid] = now
            self.stats.ttft.append(now - req.arrival)
        if len(out) >= req.output_len:
            self.stats.finished += 1
            if len(out) > 1:
                self.stats.tpot.append((now - self.first[req.rid]) / (len(out) - 1))
            return True
        return False
