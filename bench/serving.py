"""End-to-end serving benchmark: a naive contiguous-slab server vs pagegen on one model, one trace
and one KV memory budget (bytes).

Both engines serve the same requests with the same Llama-shaped model (random weights, real torch
matmuls: RMSNorm, rotary, GQA attention, SwiGLU MLP) under greedy decoding; only the KV memory
management, the batching policy and the attention path differ:

  naive    Static batching over contiguous KV slabs. When no batch is running, the waiting requests
           (FCFS) that fit the budget form one batch; each row reserves a slab of prompt + max_tokens
           (`--naive-reserve request`) or max_model_len (`max-len`) tokens, and the batch is one
           rectangle padded to its longest row (what a server without paging does with SDPA).
           The batch runs until its longest request finishes; then the next batch is formed.
           Attention: torch SDPA (causal for prompts; a length mask for decode).
  pagegen  Continuous batching on the paged pool (pagegen.KVCache + SequenceManager, blocks of 16,
           prefix caching on). Every step is one forward over (a) the next token of every running
           sequence, attended through pagegen.paged_decode, and (b) the uncached prompt tokens of
           the waiting requests admitted this step while blocks allow (FCFS, up to
           max_batched_tokens), attended through pagegen.paged_extend; all new K/V go into the pool
           through one pagegen.kv_write. When the running sequences need a block and none is free,
           the most recently admitted is preempted (its blocks freed) and later recomputed.

The trace (`make_trace`): a fixed seed; all requests at t=0 (offline) or Poisson arrivals at
`--rate` req/s; prompt and output lengths log-normal with the means of ShareGPT as reported by
Kwon et al., "Efficient Memory Management for LLM Serving with PagedAttention" (SOSP 2023, Fig. 11:
mean input 161.31, mean output 337.99 tokens). The shapes (sigma of log length) are assumptions,
not fits: 1.0 for prompts, 0.8 for outputs (both long-tailed, as the paper's histograms show).
mu = ln(mean) - sigma^2 / 2 keeps the published mean before clipping. Prompts are clipped to
[4, max_prompt], outputs to [1, max_tokens]; every request asks for max_tokens (what the naive
engine reserves) and stops after its drawn output length (as at an EOS). A share of the requests
(`--shared-frac`) starts with one common system prompt of `--system-len` tokens.

Metrics per run: output tokens/s, finished requests, peak concurrent sequences, KV reserved vs
holding tokens (sums over decode steps; waste = 1 - holding / reserved), prefix-cache hit rate
(prompt tokens served from cached blocks / prompt tokens, at first admission; readmissions after
preemption are counted apart as recompute_*), preemptions, p50/p99 time to first token and
per-output-token latency (TPOT = (finish - first token) / (output tokens - 1)).

Run:
  CPU smoke (tiny model, interpreter, seconds):  .venv/bin/python bench/serving.py --smoke
  GPU (~1B bf16 model, 4 GiB of KV, bounded to a few minutes on an H100):  python bench/serving.py
GPU mode writes bench/results/serving-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing pagegen (imported lazily below)

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-shaped decoder. The default is Llama-3.2-1B's shape with a 32k vocabulary."""

    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    intermediate: int = 8192
    vocab: int = 32000
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def num_params(self) -> int:
        """Weights, embedding and LM head counted separately (not tied)."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V bytes of one token across all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


PRESETS = {
    "1b": ModelConfig(),
    "smoke": ModelConfig(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, intermediate=256, vocab=512,
                         rope_theta=10000.0),
}

# attention plug: (layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> out [T, Hq, D]
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * w / rms(x) over the last dim, computed in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form). x: [T, H, D]; cos, sin: [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Model:
    """Random-weight Llama-shaped decoder over packed token rows; attention is plugged per call.

    dtype: weights and activations; the engines cast q/k/v to their KV dtype for attention.
    Weights: normal with std 1/sqrt(fan_in) (residual projections scaled by 1/sqrt(2 layers)),
    drawn from a generator seeded with `seed` on `device`: the same model for every engine.
    """

    def __init__(self, cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 max_pos: int = 8192) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        g = torch.Generator(device=device).manual_seed(seed)

        def w(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=g, device=device) * std).to(dtype)

        h, d = cfg.hidden, cfg.head_dim
        res = 1.0 / math.sqrt(2 * cfg.layers)
        self.embed = w(cfg.vocab, h, std=1.0)
        self.layers = []
        for _ in range(cfg.layers):
            self.layers.append({
                "attn_norm": torch.ones(h, device=device, dtype=dtype),
                "wqkv": w(h, (cfg.heads + 2 * cfg.kv_heads) * d, std=h ** -0.5),
                "wo": w(cfg.heads * d, h, std=(cfg.heads * d) ** -0.5 * res),
                "mlp_norm": torch.ones(h, device=device, dtype=dtype),
                "w_gate_up": w(h, 2 * cfg.intermediate, std=h ** -0.5),
                "w_down": w(cfg.intermediate, h, std=cfg.intermediate ** -0.5 * res),
            })
        self.final_norm = torch.ones(h, device=device, dtype=dtype)
        self.lm_head = w(h, cfg.vocab, std=h ** -0.5)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.arange(max_pos, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)  # [max_pos, D/2]
        self.max_pos = max_pos

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn: AttnFn,
                last_idx: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens. tokens, positions: [T] int64 (packed rows of all sequences);
        last_idx: [B] int64 rows whose logits are taken. Returns [B] int64 argmax token ids."""
        cfg = self.cfg
        t = tokens.shape[0]
        hq, hk, d = cfg.heads, cfg.kv_heads, cfg.head_dim
        x = self.embed[tokens]  # [T, hidden]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # [T, 1, D/2]
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw["attn_norm"], cfg.norm_eps)
            q, k, v = (h @ lw["wqkv"]).split([hq * d, hk * d, hk * d], dim=-1)
            q = rope(q.view(t, hq, d), cos, sin)
            k = rope(k.view(t, hk, d), cos, sin)
            o = attn(i, q, k, v.reshape(t, hk, d))  # [T, Hq, D]
            x = x + o.reshape(t, hq * d) @ lw["wo"]
            h = rms_norm(x, lw["mlp_norm"], cfg.norm_eps)
            gate, up = (h @ lw["w_gate_up"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ lw["w_down"]
        x = rms_norm(x[last_idx], self.final_norm, cfg.norm_eps)
        return (x @ self.lm_head).float().argmax(-1)


# ---------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Naive engine: static batches of contiguous slabs, SDPA
# ---------------------------------------------------------------------------------------------


# The naive engine's attention backends. cuDNN is left out on purpose: measured on an H100
# (bench/results/serving-profile-h100-2026-11-25.log), cuDNN SDPA builds a new plan whenever the
# slab length changes, i.e. every decode step: 3.1 ms of host time per call against 0.11 ms on the
# GPU, which made the naive baseline 6x slower than it needs to be.
NAIVE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class NaiveEngine:
    """Static batching over contiguous, padded KV slabs in one preallocated buffer of the budget.

    Slab of a batch: [2, layers, B, Hkv, W, D] in kv_dtype, W = max over rows of prompt + max_tokens
    (reserve="request") or max_model_len (reserve="max-len"). Admission: FCFS while B * W tokens fit
    the budget and B <= max_batch. Prompts are prefilled in row groups of at most max_batched_tokens
    (padded) tokens; decode steps run every row of the batch until the longest is done.
    """

    name = "naive"

    def __init__(self, model: Model, *, kv_dtype: torch.dtype, budget_bytes: int, max_batch: int = 256,
                 reserve: str = "request", max_model_len: int = 4096, max_batched_tokens: int = 8192) -> None:
        if reserve not in ("request", "max-len"):
            raise ValueError(f"reserve={reserve!r}; expected 'request' or 'max-len'")
        cfg = model.cfg
        self.model, self.kv_dtype, self.reserve = model, kv_dtype, reserve
        self.max_batch, self.max_model_len, self.max_batched_tokens = max_batch, max_model_len, max_batched_tokens
        self.budget_bytes = budget_bytes
        self.capacity = budget_bytes // cfg.kv_bytes_per_token(kv_dtype)
        per_token = 2 * cfg.layers * cfg.kv_heads * cfg.head_dim
        # zeros, not empty: SDPA multiplies masked-out (probability 0) keys' V rows too, and 0 * NaN of
        # uninitialised memory is NaN. Later batches reuse finite values only.
        self.buffer = torch.zeros(self.capacity * per_token, dtype=kv_dtype, device=model.device)

    def width(self, req: Request) -> int:
        """Slab tokens one request asks for."""
        return self.max_model_len if self.reserve == "max-len" else len(req.prompt) + req.max_tokens

    def run(self, trace: list[Request], *, label: str = "", time_cap: float = float("inf"),
            sync: Callable[[], None] = lambda: None, log: Callable[[str], None] | None = None) -> RunStats:
        """Serve `trace`; return its statistics."""
        st = RunStats(self.name, label, self.budget_bytes, self.capacity)
        tr = Tracker(st, trace)
        pending = collections.deque(trace)  # by arrival
        waiting: collections.deque[Request] = collections.deque()
        clock = Clock(sync)
        next_log = 5.0
        while pending or waiting:
            now = clock.now()
            if now > time_cap:
                st.capped = True
                break
            while pending and pending[0].arrival <= now:
                waiting.append(pending.popleft())
            if not waiting:
                clock.wait_until(pending[0].arrival)
                continue
            batch: list[Request] = []
            w = 0
            while waiting and len(batch) < self.max_batch:
                w2 = max(w, self.width(waiting[0]))
                if (len(batch) + 1) * w2 > self.capacity:
                    break
                batch.append(waiting.popleft())
                w = w2
            if not batch:
                raise ValueError(f"request {waiting[0].rid} needs a slab of {self.width(waiting[0])} tokens but the "
                                 f"KV budget holds {self.capacity}; raise --kv-gib")
            st.prompt_tokens += sum(len(r.prompt) for r in batch)
            st.computed_prompt_tokens += sum(len(r.prompt) for r in batch)
            st.peak_running = max(st.peak_running, len(batch))
            self._serve_batch(batch, w, st, tr, clock, time_cap)
            if log and clock.now() > next_log:
                log(f"  naive {clock.now():6.1f}s: {st.finished}/{st.requests} finished, {st.output_tokens} tokens")
                next_log = clock.now() + 5.0
        sync()
        st.wall_s = clock.now()
        return st

    def _serve_batch(self, batch: list[Request], w: int, st: RunStats, tr: Tracker, clock: Clock,
                     time_cap: float) -> None:
        cfg, dev = self.model.cfg, self.model.device
        b, hk, d, g = len(batch), cfg.kv_heads, cfg.head_dim, cfg.heads // cfg.kv_heads
        slab = self.buffer[: 2 * cfg.layers * b * hk * w * d].view(2, cfg.layers, b, hk, w, d)
        kd = self.kv_dtype
        cd = self.model.dtype
        plens = [len(r.prompt) for r in batch]
        done = [False] * b
        # -- prefill, in row groups of at most max_batched_tokens padded tokens --
        r0 = 0
        while r0 < b:
            p = plens[r0]
            r1 = r0 + 1
            while r1 < b and (r1 + 1 - r0) * max(p, plens[r1]) <= self.max_batched_tokens:
                p = max(p, plens[r1])
                r1 += 1
            rows = r1 - r0
            toks = torch.zeros(rows, p, dtype=torch.long)
            for j in range(rows):
                toks[j, : plens[r0 + j]] = torch.tensor(batch[r0 + j].prompt)
            pos = torch.arange(p).repeat(rows)
            last = torch.tensor([j * p + plens[r0 + j] - 1 for j in range(rows)])

            def prefill_attn(layer: int, q, k, v, r0=r0, r1=r1, rows=rows, p=p):
                kc, vc = slab[0, layer, r0:r1], slab[1, layer, r0:r1]  # [rows, Hkv, W, D]
                kc[:, :, :p] = k.view(rows, p, hk, d).transpose(1, 2)
                vc[:, :, :p] = v.view(rows, p, hk, d).transpose(1, 2)
                qq = q.to(kd).to(cd).view(rows, p, hk * g, d).transpose(1, 2)  # [rows, Hq, P, D]
                kk = kc[:, :, :p].to(cd).repeat_interleave(g, dim=1)
                vv = vc[:, :, :p].to(cd).repeat_interleave(g, dim=1)
                with sdpa_kernel(NAIVE_SDPA_BACKENDS):
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                return o.to(kd).to(cd).transpose(1, 2).reshape(rows * p, hk * g, d)

            nxt = self.model.forward(toks.view(-1).to(dev), pos.to(dev), prefill_attn, last.to(dev)).tolist()
            st.steps += 1
            st.prefill_steps += 1
            now = clock.now()
            for j in range(rows):
                done[r0 + j] = tr.emit(batch[r0 + j], nxt[j], now)
            r0 = r1
        # -- decode: every row steps together until the longest request is done --
        step = 1  # tokens emitted per row so far
        arange_b = torch.arange(b, device=dev)
        while not all(done):
            if clock.now() > time_cap:
                st.capped = True
                return
            toks = torch.tensor([st.tokens[r.rid][-1] for r in batch], device=dev)
            pos_list = [plens[i] + step - 1 for i in range(b)]
            pos = torch.tensor(pos_list, device=dev)
            lmax = max(pos_list) + 1
            mask = (torch.arange(lmax, device=dev)[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, L]

            def decode_attn(layer: int, q, k, v, pos=pos, lmax=lmax, mask=mask):
                kc, vc = slab[0, layer], slab[1, layer]  # [B, Hkv, W, D]
                kc[arange_b, :, pos] = k.to(kd)
                vc[arange_b, :, pos] = v.to(kd)
                qq = q.to(kd).to(cd).view(b, hk, g, d)  # the G heads of a KV head as G query rows
                with sdpa_kernel(NAIVE_SDPA_BACKENDS):
                    o = F.scaled_dot_product_attention(qq, kc[:, :, :lmax].to(cd), vc[:, :, :lmax].to(cd),
                                                       attn_mask=mask)
                return o.to(kd).to(cd).reshape(b, hk * g, d)

            nxt = self.model.forward(toks, pos, decode_attn, arange_b).tolist()
            st.steps += 1
            st.decode_steps += 1
            live = [i for i in range(b) if not done[i]]
            st.extra["decode_rows"] = st.extra.get("decode_rows", 0) + len(live)
            st.reserved_token_steps += b * w
            st.holding_token_steps += sum(pos_list[i] + 1 for i in live)
            now = clock.now()
            for i in live:
                done[i] = tr.emit(batch[i], nxt[i], now)
            step += 1


# ---------------------------------------------------------------------------------------------
# pagegen engine: paged pool, prefix caching, continuous batching, preemption by recompute
# ---------------------------------------------------------------------------------------------


class PagegenEngine:
    """Continuous batching on pagegen's paged KV pool (see the module docstring).

    A step: (1) every running sequence gets the slot of its next token (append_batch); when blocks
    run out the most recently admitted sequence is preempted (blocks freed; recomputed from prompt
    + emitted tokens when readmitted) and nothing is admitted this step; (2) waiting requests are
    admitted FCFS while blocks (keeping `watermark` of the pool free for decode growth),
    max_running and max_batched_tokens allow, reusing cached prefix blocks; (3) one forward: decode
    rows through paged_decode, the admitted prompts' uncached tokens through paged_extend.
    """

    name = "pagegen"

    def __init__(self, model: Model, *, kv_dtype: torch.dtype, budget_bytes: int, block_size: int = 16,
                 prefix_caching: bool = True, max_running: int = 512, max_batched_tokens: int = 8192,
                 watermark: float = 0.01, layout: str = "NHD") -> None:
        import pagegen

        self.pg = pagegen
        cfg = model.cfg
        self.model, self.kv_dtype, self.layout = model, kv_dtype, layout
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.max_running, self.max_batched_tokens = max_running, max_batched_tokens
        self.budget_bytes = budget_bytes
        self.cache = pagegen.KVCache(block_size=block_size, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                                     layout=layout, dtype=kv_dtype, device=model.device, num_layers=cfg.layers,
                                     memory_bytes=budget_bytes)
        self.capacity = self.cache.num_blocks * block_size
        self.watermark_blocks = int(watermark * self.cache.num_blocks)
        self.name = "pagegen" if prefix_caching else "pagegen-nocache"
        self.last_manager = None  # the SequenceManager of the last run (for accounting checks)

    def run(self, trace: list[Request], *, label: str = "", time_cap: float = float("inf"),
            sync: Callable[[], None] = lambda: None, log: Callable[[str], None] | None = None) -> RunStats:
        """Serve `trace`; return its statistics. All blocks are released at the end."""
        st = RunStats(self.name, label, self.budget_bytes, self.capacity)
        tr = Tracker(st, trace)
        sm = self.cache.sequence_manager(enable_prefix_caching=self.prefix_caching)
        self.last_manager = sm
        pending = collections.deque(trace)
        waiting: collections.deque[Request] = collections.deque()
        running: list[Request] = []  # admission order (the last is preempted first)
        admitted: set[int] = set()
        clock = Clock(sync)
        next_log = 5.0
        while pending or waiting or running:
            now = clock.now()
            if now > time_cap:
                st.capped = True
                break
            while pending and pending[0].arrival <= now:
                waiting.append(pending.popleft())
            if not waiting and not running:
                clock.wait_until(pending[0].arrival)
                continue
            dec, preempted = self._reserve_decode(sm, waiting, running, st)
            budget = self.max_batched_tokens - len(running)
            batch = [] if preempted else self._admit(sm, waiting, running, st, budget)
            if not running and not batch:
                req = waiting[0]
                need = len(req.prompt) + len(st.tokens[req.rid])
                raise ValueError(f"request {req.rid} needs {need} tokens of KV but the pool holds {self.capacity}; "
                                 "raise --kv-gib")
            for req, _ in batch:
                if req.rid not in admitted:
                    admitted.add(req.rid)
                    st.prompt_tokens += len(req.prompt)
            self._step(sm, dec, batch, st, tr, clock, running)
            st.peak_running = max(st.peak_running, len(running))
            if log and clock.now() > next_log:
                log(f"  {self.name} {clock.now():6.1f}s: {st.finished}/{st.requests} finished, {st.output_tokens} "
                    f"tokens, {len(running)} running, {st.preemptions} preemptions")
                next_log = clock.now() + 5.0
        sync()
        st.wall_s = clock.now()
        for req in running:  # a capped run: release what is still held
            sm.free(req.rid)
        ps = sm.pool.stats()
        st.extra.update({"num_blocks": self.cache.num_blocks, "block_size": self.block_size,
                         "block_prefix_queries": ps.prefix_queries, "block_prefix_hits": ps.prefix_hits,
                         "evictions": ps.evictions})
        return st

    def warm_kernels(self, max_len: int, log: Callable[[str], None] | None = None) -> int:
        """Call kv_write, paged_decode and paged_extend over a grid of batch / query-token / context
        sizes, so that every config the dispatcher picks (tuned buckets or heuristic split sizes)
        and Triton's integer specialisations (1, multiples of 16, others) compile before timing.
        Writes garbage into the pool (harmless: a run writes every slot before reading it).
        Returns the number of calls made."""
        pg, cache, bs, layout = self.pg, self.cache, self.block_size, self.layout
        cfg, dev, kd = self.model.cfg, self.model.device, self.kv_dtype
        kc, vc = cache.layer(0)
        kc.zero_()
        vc.zero_()
        g = torch.Generator(device=dev).manual_seed(1)
        calls = 0
        batches = sorted({b for b in (1, 2, 3, 4, 6, 8, 12, 16, 17, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
                          if b <= self.max_running})
        ctxs = sorted({c for c in (16, 100, 256, 400, 512, 700, 1024, 1500, 2048, 3000, 4096, 6000, 8192)
                       if c <= max_len} | {max_len})
        for b in batches:
            k = torch.randn(b, cfg.kv_heads, cfg.head_dim, generator=g, device=dev).to(kd)
            pg.kv_write(k, k, kc, vc, torch.arange(b, device=dev), layout=layout)
            for c in ctxs:
                w = -(-c // bs)
                q = torch.randn(b, cfg.heads, cfg.head_dim, generator=g, device=dev).to(kd)
                bt = torch.zeros(b, w, dtype=torch.int32, device=dev)
                lens = torch.full((b,), c, dtype=torch.int32, device=dev)
                pg.paged_decode(q, kc, vc, bt, lens, layout=layout, max_seq_len=c)
                calls += 2
        for t in (1, 5, 16, 17, 100, 256, 512, 1000, 2048, 4096, self.max_batched_tokens):
            if t > self.max_batched_tokens:
                continue
            k = torch.randn(t, cfg.kv_heads, cfg.head_dim, generator=g, device=dev).to(kd)
            pg.kv_write(k, k, kc, vc, torch.arange(t, device=dev), layout=layout)
            q = torch.randn(t, cfg.heads, cfg.head_dim, generator=g, device=dev).to(kd)
            cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
            for c in ctxs:
                w = -(-max(c, t) // bs)
                bt = torch.zeros(1, w, dtype=torch.int32, device=dev)
                lens = torch.full((1,), w * bs, dtype=torch.int32, device=dev)
                pg.paged_extend(q, kc, vc, bt, cu, lens, layout=layout, max_q_len=t)
                calls += 1
        if log:
            log(f" kernel warm-up: {calls} calls over {len(batches)} batches x {len(ctxs)} contexts")
        return calls

    def _tokens(self, req: Request, st: RunStats) -> list[int]:
        """Everything the sequence holds when (re)admitted: prompt + tokens emitted so far."""
        return req.prompt + st.tokens[req.rid]

    def _admit(self, sm, waiting: collections.deque, running: list, st: RunStats, token_budget: int) -> list:
        """Add waiting requests to the pool while they fit (blocks beyond the watermark, running
        sequences, `token_budget` new tokens); returns [(request, AddResult)]."""
        pool, bs = sm.pool, self.block_size
        batch: list = []
        new_tokens = 0
        while waiting and len(running) + len(batch) < self.max_running:
            req = waiting[0]
            toks = self._tokens(req, st)
            n = len(toks)
            cached = []
            if self.prefix_caching and n > bs:
                cached = pool.find_prefix(sm.prompt_hashes(toks, limit=(n - 1) // bs))
            need = -(-n // bs) - len(cached)
            avail = pool.num_allocatable - pool.evictable_among(cached)
            reserve = self.watermark_blocks if (running or batch) else 0
            todo = n - len(cached) * bs
            if need > avail - reserve or ((batch or running) and new_tokens + todo > token_budget):
                break
            res = sm.add(req.rid, toks)
            waiting.popleft()
            batch.append((req, res))
            new_tokens += n - res.num_cached_tokens
        return batch

    def _reserve_decode(self, sm, waiting: collections.deque, running: list, st: RunStats):
        """Give every running sequence the slot of its next token (the last one emitted), preempting
        the most recently admitted while blocks run out. Returns ((ids, tokens, slots, block_tables
        [B, W] int32 numpy, seq_lens [B] int32 numpy) or None when nothing runs, preempted?)."""
        preempted = False
        while running:
            ids = [r.rid for r in running]
            last = [st.tokens[i][-1] for i in ids]
            try:
                res = sm.append_batch(ids, last)
            except self.pg.OutOfBlocksError:
                if len(running) == 1:
                    raise
                victim = running.pop()
                sm.free(victim.rid)
                waiting.appendleft(victim)
                st.preemptions += 1
                preempted = True
                continue
            assert not res.cow, "no sequence is forked here, so no copy-on-write"
            bt, lens = sm.block_table_arrays(ids)
            return (ids, last, res.slot_mapping, bt, lens), preempted
        return None, preempted

    def _step(self, sm, dec, batch: list, st: RunStats, tr: Tracker, clock: Clock, running: list) -> None:
        """One forward over the decode tokens of the running sequences (rows [0, B): paged_decode)
        and the uncached prompt tokens of the admitted ones (rows [B, B + T): paged_extend); both
        write their K/V first through one kv_write. Emits a token per sequence."""
        import numpy as np

        pg, layout, cache = self.pg, self.layout, self.cache
        dev, kd, cd, bs = self.model.device, self.kv_dtype, self.model.dtype, self.block_size
        toks: list[int] = []
        pos: list[int] = []
        slots: list = []
        b = 0
        if dec is not None:
            ids, last, dslots, dbt_np, dlens_np = dec
            b = len(ids)
            toks.extend(last)
            pos.extend((dlens_np - 1).tolist())
            slots.append(dslots)
            dmax, dsum = int(dlens_np.max()), int(dlens_np.sum())
            dbt, dlens = _to_device(dbt_np, dev), _to_device(dlens_np, dev)
        cu = [0]
        for req, res in batch:
            full = self._tokens(req, st)
            c = res.num_cached_tokens
            toks.extend(full[c:])
            pos.extend(range(c, len(full)))
            slots.append(res.slot_mapping)
            cu.append(cu[-1] + len(full) - c)
            st.computed_prompt_tokens += len(full) - c
            if len(full) == len(req.prompt):  # first admission
                st.prefix_query_tokens += len(full)
                st.prefix_hit_tokens += c
            else:  # readmission after preemption: prompt + emitted tokens recomputed
                st.extra["recompute_tokens"] = st.extra.get("recompute_tokens", 0) + len(full)
                st.extra["recompute_hit_tokens"] = st.extra.get("recompute_hit_tokens", 0) + c
        if batch:
            pbt_np, plens_np = sm.block_table_arrays([req.rid for req, _ in batch])
            pbt, plens = _to_device(pbt_np, dev), _to_device(plens_np, dev)
            max_q = max(cu[i + 1] - cu[i] for i in range(len(batch)))
            cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
        slot_t = _to_device(np.concatenate(slots), dev)
        total = len(toks)

        def attn(layer: int, q, k, v):
            kc, vc = cache.layer(layer)
            pg.kv_write(k.to(kd), v.to(kd), kc, vc, slot_t, layout=layout)
            q = q.to(kd)
            o = torch.empty_like(q)
            if b:
                pg.paged_decode(q[:b], kc, vc, dbt, dlens, layout=layout, max_seq_len=dmax, sum_seq_lens=dsum,
                                out=o[:b])
            if batch:
                pg.paged_extend(q[b:], kc, vc, pbt, cu_t, plens, layout=layout, max_q_len=max_q, out=o[b:])
            return o.to(cd)

        last_idx = list(range(b)) + [b + c - 1 for c in cu[1:]]
        nxt = self.model.forward(torch.tensor(toks, device=dev), torch.tensor(pos, device=dev), attn,
                                 torch.tensor(last_idx, device=dev)).tolist()
        st.steps += 1
        st.decode_steps += b > 0
        st.prefill_steps += bool(batch)
        st.extra["decode_rows"] = st.extra.get("decode_rows", 0) + b
        st.extra["step_tokens"] = st.extra.get("step_tokens", 0) + total
        if b:  # KV occupancy after this step's writes (only last blocks are partly filled, never shared)
            reserved = sm.pool.num_used * bs
            slack = int(((-dlens_np.astype(np.int64)) % bs).sum())
            if batch:
                slack += int(((-plens_np.astype(np.int64)) % bs).sum())
            st.reserved_token_steps += reserved
            st.holding_token_steps += reserved - slack
        now = clock.now()
        keep = []
        for req, tok in zip(running + [req for req, _ in batch], nxt, strict=True):
            if tr.emit(req, tok, now):
                sm.free(req.rid)
            else:
                keep.append(req)
        running[:] = keep


def _to_device(a, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def agreement(a: RunStats, b: RunStats, rids: list[int]) -> dict:
    """Greedy-token agreement of two runs on the given requests: how many match exactly and the
    mean fraction of each request's tokens before the first difference."""
    same, frac = 0, []
    for rid in rids:
        x, y = a.tokens[rid], b.tokens[rid]
        n = min(len(x), len(y))
        k = next((i for i in range(n) if x[i] != y[i]), n)
        same += x == y
        frac.append(k / max(1, max(len(x), len(y))))
    return {"checked": len(rids), "identical": same, "mean_common_prefix": round(sum(frac) / max(1, len(frac)), 4)}


def accounting_errors(st: RunStats, trace: list[Request], engine) -> list[str]:
    """What does not add up after an uncapped run (empty list when all is well)."""
    errs = []
    if st.finished != len(trace):
        errs.append(f"{st.finished} of {len(trace)} requests finished")
    for r in trace:
        if len(st.tokens[r.rid]) != r.output_len:
            errs.append(f"request {r.rid} emitted {len(st.tokens[r.rid])} tokens, expected {r.output_len}")
    if st.output_tokens != sum(r.output_len for r in trace):
        errs.append(f"output_tokens {st.output_tokens} != {sum(r.output_len for r in trace)}")
    if st.prompt_tokens != sum(len(r.prompt) for r in trace):
        errs.append(f"prompt_tokens {st.prompt_tokens} != {sum(len(r.prompt) for r in trace)}")
    if st.holding_token_steps > st.reserved_token_steps:
        errs.append("more KV tokens held than reserved")
    if st.prefix_hit_tokens > st.prefix_query_tokens:
        errs.append("more prefix hits than queries")
    if isinstance(engine, PagegenEngine):
        offered = st.prefix_query_tokens + st.extra.get("recompute_tokens", 0)
        cached = st.prefix_hit_tokens + st.extra.get("recompute_hit_tokens", 0)
        if st.computed_prompt_tokens + cached != offered:
            errs.append(f"computed {st.computed_prompt_tokens} + cached {cached} prompt tokens != offered {offered}")
        if st.prefix_query_tokens != st.prompt_tokens:
            errs.append("prompt tokens offered to the cache at first admission != prompt tokens admitted")
        if st.preemptions and not st.extra.get("recompute_tokens"):
            errs.append("preempted sequences were never recomputed")
    sm = getattr(engine, "last_manager", None)
    if sm is not None:
        pool = sm.pool
        if len(sm):
            errs.append(f"{len(sm)} sequences still in the manager")
        if pool.num_used:
            errs.append(f"{pool.num_used} blocks still held (leak)")
        if pool.num_used + pool.num_cached + pool.num_free != pool.num_blocks:
            errs.append("used + cached + free != num_blocks")
        try:
            sm.check_invariants()
        except AssertionError as exc:
            errs.append(f"allocator invariant: {exc}")
    return errs


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

SMOKE_TRACE = TraceConfig(num_requests=10, seed=1, prompt_mean=24, prompt_sigma=0.6, output_mean=12, output_sigma=0.5,
                          max_prompt=48, max_tokens=16, shared_frac=0.5, system_len=40)


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

    def paged(self, prefix_caching: bool = True) -> PagegenEngine:
        return PagegenEngine(self.model, kv_dtype=self.kv_dtype, budget_bytes=self.budget_bytes,
                             block_size=self.block_size, prefix_caching=prefix_caching, max_running=self.max_running,
                             max_batched_tokens=self.max_batched_tokens)


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


def table(rows: list[dict]) -> str:
    """A plain-text results table."""
    cols = [("engine", "engine", "{}"), ("trace", "trace", "{}"), ("tok/s", "output_tok_per_s", "{:.0f}"),
            ("fin", "finished", "{}"), ("wall s", "wall_s", "{:.1f}"), ("peak seqs", "peak_running", "{}"),
            ("mean batch", "mean_decode_batch", "{}"), ("ms/step", "ms_per_step", "{:.2f}"),
            ("KV waste", "kv_waste", "{:.1%}"),
            ("KV used", "kv_use_of_budget", "{:.1%}"), ("hit", "prefix_hit_rate", "{:.1%}"),
            ("preempt", "preemptions", "{}"), ("TTFT p50/p99 s", None, ""), ("TPOT p50/p99 ms", None, ""),
            ("capped", "capped", "{}")]
    lines = []
    head = [c[0] for c in cols]
    body = []
    for r in rows:
        line = []
        for name, key, fmt in cols:
            if name.startswith("TTFT"):
                line.append(f"{r['ttft_p50_s']:.2f}/{r['ttft_p99_s']:.2f}")
            elif name.startswith("TPOT"):
                line.append(f"{r['tpot_p50_ms']:.1f}/{r['tpot_p99_ms']:.1f}")
            else:
                line.append(fmt.format(r[key]))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for b in body:
        lines.append("  ".join(x.ljust(w) for x, w in zip(b, widths, strict=True)))
    return "\n".join(lines)


def versions() -> dict:
    import triton

    import pagegen

    return {"torch": torch.__version__, "triton": triton.__version__, "pagegen": pagegen.__version__,
            "python": platform.python_version()}


def run_gpu(args: argparse.Namespace) -> dict:
    """The GPU benchmark: both engines on the offline trace, then the shared-prefix trace."""
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = dataclasses.replace(PRESETS[args.model], layers=args.layers or PRESETS[args.model].layers)
    print(f"model {args.model}: {cfg} = {cfg.num_params() / 1e9:.2f} B params, {args.dtype}; "
          f"KV {cfg.kv_bytes_per_token(dtype)} bytes/token", flush=True)
    model = Model(cfg, device=dev, dtype=dtype, seed=args.seed, max_pos=args.max_model_len + 64)
    budget = int(args.kv_gib * 2**30)
    setup = Setup(model, dtype, budget, block_size=args.block_size, naive_reserve=args.naive_reserve,
                  max_model_len=args.max_model_len, max_batch=args.max_batch, max_running=args.max_running,
                  max_batched_tokens=args.max_batched_tokens)
    base = TraceConfig(num_requests=args.requests, seed=args.seed, rate=args.rate, max_tokens=args.max_tokens,
                       max_prompt=args.max_prompt)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
    p.add_argument("--out", default="", help="JSON path (default bench/results/serving-<gpu>-<date>.json)")
    args = p.parse_args(argv)
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
    out = run_gpu(args)
    from pagegen.gpu import gpu_key

    key = gpu_key(out["gpu"]) if args.device == "cuda" else "cpu"
    path = Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"serving-{key}-{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
