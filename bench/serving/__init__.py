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

fp8 KV pool (`--kv-dtype fp8_e4m3` or `fp8_e5m2`; fp8.py says how the scales are chosen): the
pagegen engine alone, on a pool of the model's dtype and on an fp8 pool of the same bytes (twice the
tokens), same trace: sequences at once (peak, mean), tokens/s and their ratio, greedy agreement and
one step's attention error against pagegen.reference's fp8-emulating reference.

Run:
  CPU smoke (tiny model, interpreter, seconds):  .venv/bin/python bench/serving.py --smoke
  GPU (~1B bf16 model, 4 GiB of KV, bounded to a few minutes on an H100):  python bench/serving.py
  fp8 pool, CPU smoke:  python bench/serving.py --smoke --kv-dtype fp8_e4m3 [--out x.json]
  fp8 pool, GPU (under 3 minutes on an H200; --requests 300 for a short trace):
    python bench/serving.py --kv-dtype fp8_e4m3 --kv-gib 1 --requests 1000 --max-model-len 2048 \
        --time-cap 40 --total-budget 150
GPU mode writes bench/results/serving-<gpu>-<date>.json (fp8: serving-fp8-<gpu>-<date>.json).

The code, one job a module: model.py (the decoder), trace.py (the requests), stats.py (what a run
measures), naive.py and paged.py (the two engines), checks.py (agreement and accounting),
report.py (the table), fp8.py (fp8 scales, the pool comparison and its checks), run.py (smoke, GPU
drivers, command line). `python bench/serving.py ...`
(a shim over this package) and `python -m bench.serving ...` (from the repository root) are the
same command.
"""

from __future__ import annotations

from .checks import accounting_errors, agreement
from .fp8 import attention_check, calibrate_kv_scales, compare_pools, fp8_table, prefix_agreement
from .model import PRESETS, AttnFn, Model, ModelConfig, rms_norm, rope
from .naive import NAIVE_SDPA_BACKENDS, NaiveEngine
from .paged import PagegenEngine, pool_dtype, pool_name
from .report import table, versions
from .run import Setup, calibration_prompt, main, run_fp8_gpu, run_fp8_smoke, run_gpu, run_smoke
from .stats import Clock, RunStats, Tracker, percentile
from .trace import (
    SHAREGPT_OUTPUT_MEAN,
    SHAREGPT_PROMPT_MEAN,
    SMOKE_TRACE,
    Request,
    TraceConfig,
    lognormal_len,
    make_trace,
    trace_summary,
)

__all__ = [
    "NAIVE_SDPA_BACKENDS", "PRESETS", "SHAREGPT_OUTPUT_MEAN", "SHAREGPT_PROMPT_MEAN", "SMOKE_TRACE", "AttnFn", "Clock",
    "Model", "ModelConfig", "NaiveEngine", "PagegenEngine", "Request", "RunStats", "Setup", "TraceConfig", "Tracker",
    "accounting_errors", "agreement", "attention_check", "calibrate_kv_scales", "calibration_prompt", "compare_pools",
    "fp8_table", "lognormal_len", "main", "make_trace", "percentile", "pool_dtype", "pool_name", "prefix_agreement",
    "rms_norm", "rope", "run_fp8_gpu", "run_fp8_smoke", "run_gpu", "run_smoke", "table", "trace_summary", "versions",
]
