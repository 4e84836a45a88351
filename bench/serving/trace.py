"""The request trace: seeded prompt and output lengths with ShareGPT's means, offline or Poisson arrivals,
an optional shared system prompt (TraceConfig, Request, make_trace, trace_summary)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SHAREGPT_PROMPT_MEAN = 161.31  # Kwon et al. 2023, Fig. 11 (ShareGPT, mean input tokens)
SHAREGPT_OUTPUT_MEAN = 337.99  # ibid. (mean output tokens)


@dataclass(frozen=True)
class TraceConfig:
    """What `make_trace` draws. rate=None: every request arrives at t=0 (offline)."""

    num_requests: int = 1000
    seed: int = 0
    rate: float | None = None  # requests per second (Poisson), None = offline
    prompt_mean: float = SHAREGPT_PROMPT_MEAN
    prompt_sigma: float = 1.0
    output_mean: float = SHAREGPT_OUTPUT_MEAN
    output_sigma: float = 0.8
    max_prompt: int = 1024  # own prompt tokens (the system prompt comes on top)
    max_tokens: int = 1024  # every request's output cap (the naive slab reserves it)
    shared_frac: float = 0.0  # share of requests that start with the common system prompt
    system_len: int = 1024  # tokens of that system prompt


@dataclass
class Request:
    """One request of a trace."""

    rid: int
    arrival: float  # seconds after the run starts
    prompt: list[int]  # token ids (system prompt included when shared)
    output_len: int  # tokens it generates before stopping (1..max_tokens)
    max_tokens: int  # the output cap it asked for
    shared: bool  # starts with the common system prompt


def lognormal_len(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal length with the given mean (before clipping) and log-space sigma, clipped."""
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def make_trace(tc: TraceConfig, vocab: int) -> list[Request]:
    """A seeded list of requests, sorted by arrival (see the module docstring for the model)."""
    rng = random.Random(tc.seed)
    sys_rng = random.Random(tc.seed + 7919)
    system = [sys_rng.randrange(vocab) for _ in range(tc.system_len)]
    t = 0.0
    out = []
    for rid in range(tc.num_requests):
        if tc.rate:
            t += rng.expovariate(tc.rate)
        n_prompt = lognormal_len(rng, tc.prompt_mean, tc.prompt_sigma, 4, tc.max_prompt)
        n_out = lognormal_len(rng, tc.output_mean, tc.output_sigma, 1, tc.max_tokens)
        shared = rng.random() < tc.shared_frac
        prompt = [rng.randrange(vocab) for _ in range(n_prompt)]
        if shared:
            prompt = system + prompt
        out.append(Request(rid, t, prompt, n_out, tc.max_tokens, shared))
    return out


def trace_summary(trace: list[Request]) -> dict:
    """Counts and mean lengths of a trace."""
    n = len(trace)
    return {
        "requests": n,
        "prompt_tokens": sum(len(r.prompt) for r in trace),
        "output_tokens": sum(r.output_len for r in trace),
        "mean_prompt": sum(len(r.prompt) for r in trace) / max(1, n),
        "mean_output": sum(r.output_len for r in trace) / max(1, n),
        "max_prompt": max((len(r.prompt) for r in trace), default=0),
        "shared": sum(r.shared for r in trace),
        "last_arrival_s": trace[-1].arrival if trace else 0.0,
    }


SMOKE_TRACE = TraceConfig(num_requests=10, seed=1, prompt_mean=24, prompt_sigma=0.6, output_mean=12, output_sigma=0.5,
                          max_prompt=48, max_tokens=16, shared_frac=0.5, system_len=40)
