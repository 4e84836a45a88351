"""Hugging Face transformers' continuous batching with its own paged attention vs pagegen's.

The same engine (transformers' ContinuousBatchingManager: its scheduler, paged cache, prefix
sharing and per-step metadata) serves the same trace twice with the same random-weight model; only
the attention implementation differs:
  paged|sdpa     transformers' own: gathers every sequence's K/V from the pool by slot index into a
                 contiguous copy, then torch SDPA with a dense [tokens, all KV] mask;
  paged|pagegen  pagegen.integrations.transformers: K/V written by pagegen.kv_write, attention read
                 from the pool in place by paged_decode / paged_extend (dispatcher-chosen configs).

Model: Llama-shaped like bench/serving.py's "1b" preset (16 layers, hidden 2048, 32 query / 8 KV
heads of 64, MLP 8192, vocab 32000; 1.2 B parameters), random weights, bf16. KV: --kv-gib of pool
(default 4 GiB). Trace: ShareGPT-like, all requests at t=0, prompt/output lengths log-normal with
ShareGPT's means (161 / 338 tokens, Kwon et al. 2023) clipped to 1024, each request stopping after
its drawn output length (no EOS). Each implementation first serves a few small untimed requests
(kernel compilation, allocator warm-up); then the trace is timed from the first add_request to the
last finished request, or to --time-cap seconds.

Reported per implementation: output tokens/s (generated tokens of finished requests / wall time),
steps (batches the manager computed), ms per step, finished requests, and, between the two,
how many requests produced identical greedy tokens (bf16: near-ties may flip a few).

    python bench/hf_serving.py                     # ~3 minutes on an H200 with the defaults
    python bench/hf_serving.py --requests 2000 --time-cap 600
    python bench/hf_serving.py --smoke             # CPU check of the script (tiny model, interpreter)
Writes bench/results/hf_serving-<gpu>-<date>.json (card, date, versions, settings, results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's pagegen

IMPLEMENTATIONS = ("paged|sdpa", "paged|pagegen")
PROMPT_MEAN, OUTPUT_MEAN = 161.31, 337.99  # ShareGPT means (Kwon et al., SOSP 2023, Fig. 11)



def _results_dir() -> Path:
    """Where results go: bench.common.results_dir ($PAGEGEN_BENCH_RESULTS, else bench/results/)."""
    from bench.common import results_dir

    return results_dir()

def lognormal_len(rng: random.Random, mean: float, sigma: float, lo: int, hi: int) -> int:
    """A log-normal length with the given mean (before clipping) and log-space sigma, clipped to [lo, hi]."""
    mu = math.log(mean) - sigma * sigma / 2
    return max(lo, min(hi, round(rng.lognormvariate(mu, sigma))))


def make_trace(n: int, vocab: int, seed: int = 0, max_len: int = 1024) -> list[tuple[list[int], int]]:
    """n requests as (prompt token ids, output length): the same distributions as bench/serving.py's."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_prompt = lognormal_len(rng, PROMPT_MEAN, 1.0, 4, max_len)
        n_out = lognormal_len(rng, OUTPUT_MEAN, 0.8, 1, max_len)
        out.append(([rng.randrange(vocab) for _ in range(n_prompt)], n_out))
    return out


# (hidden, heads, kv_heads, head_dim, intermediate, vocab) of the GPU model and of the CPU smoke model
SHAPES = {"1b": (2048, 32, 8, 64, 8192, 32000), "smoke": (256, 4, 2, 64, 512, 256)}


def build_model(args: argparse.Namespace, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, heads, kv_heads, head_dim, inter, vocab = SHAPES[args.shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(args.dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cb_config(args: argparse.Namespace, num_blocks: int):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig(block_size=args.block_size, num_blocks=num_blocks,
                                    max_batch_tokens=args.max_batch_tokens,
                                    max_requests_per_batch=args.max_requests,
                                    use_cuda_graph={"on": True, "off": False, "auto": None}[args.cuda_graphs],
                                    max_memory_percent=0.9)


def serve(model, impl: str, trace: list[tuple[list[int], int]], args: argparse.Namespace, num_blocks: int,
          time_cap: float) -> dict:
    """Serve `trace` through one ContinuousBatchingManager with attention `impl`; returns the metrics."""
    from transformers import GenerationConfig

    model.set_attn_implementation(impl)
    gen = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=args.max_len)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(
        args, num_blocks))
    from transformers.generation.continuous_batching.model_runner import ModelRunner

    steps = [0]
    lock = threading.Lock()
    compute_batch = ModelRunner.compute_batch

    def counted(self, *a, **kw):  # one call a step, eager or CUDA-graph replay
        with lock:
            steps[0] += 1
        return compute_batch(self, *a, **kw)

    ModelRunner.compute_batch = counted
    outputs: dict[str, list[int]] = {}
    try:
        manager.start()
        warm = [(list(range(1, 1 + n)), 8) for n in args.warm_prompts]  # compile / warm the kernels, untimed
        for i, (p, n) in enumerate(warm):
            manager.add_request(p, request_id=f"warm{i}", max_new_tokens=n)
        while sum(k.startswith("warm") for k in outputs) < len(warm):
            res = manager.get_result(timeout=300)
            if res is None:
                raise RuntimeError(f"{impl}: warm-up produced no result within 300 s")
            if res.is_finished():
                outputs[res.request_id] = list(res.generated_tokens)
        outputs.clear()
        sync()
        steps[0] = 0
        t0 = time.perf_counter()
        for i, (p, n) in enumerate(trace):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
        capped = False
        while len(outputs) < len(trace):
            if time.perf_counter() - t0 > time_cap:
                capped = True
                break
            res = manager.get_result(timeout=1.0)
            if res is not None and res.is_finished():
                outputs[res.request_id] = list(res.generated_tokens)
        wall = time.perf_counter() - t0
        n_steps = steps[0]
    finally:
        ModelRunner.compute_batch = compute_batch
        manager.stop(block=True, timeout=60)
    tokens = sum(len(t) for t in outputs.values())
    return {"implementation": impl, "finished": len(outputs), "requests": len(trace), "output_tokens": tokens,
            "wall_s": wall, "output_tok_per_s": tokens / wall, "steps": n_steps,
            "ms_per_step": 1e3 * wall / max(1, n_steps), "capped": capped, "_outputs": outputs}


def table(rows: list[dict]) -> str:
    cols = [("attention", "implementation", "{}"), ("tok/s", "output_tok_per_s", "{:.0f}"),
            ("finished", "finished", "{}"), ("out tokens", "output_tokens", "{}"), ("wall s", "wall_s", "{:.1f}"),
            ("steps", "steps", "{}"), ("ms/step", "ms_per_step", "{:.2f}"), ("capped", "capped", "{}")]
    body = [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(c[0]), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c[0].ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def versions() -> dict:
    import transformers
    import triton

    import pagegen

    return {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "pagegen": pagegen.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="transformers continuous batching: paged|sdpa vs paged|pagegen")
    ap.add_argument("--requests", type=int, default=400, help="requests in the trace (the issue's full run: 2000)")
    ap.add_argument("--time-cap", type=float, default=70.0, help="seconds per implementation before stopping")
    ap.add_argument("--kv-gib", type=float, default=4.0, help="KV pool size (all layers, K and V)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-batch-tokens", type=int, default=2048, help="tokens a step (prefill chunks + decodes)")
    ap.add_argument("--max-requests", type=int, default=256, help="sequences a step")
    ap.add_argument("--max-len", type=int, default=1024, help="prompt and output length cap")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--cuda-graphs", choices=["off", "on", "auto"], default="off",
                    help="transformers' CUDA graphs for both runs; auto: its default (on for implementations "
                         "without a dense mask, i.e. paged|pagegen; off for paged|sdpa)")
    ap.add_argument("--only", choices=IMPLEMENTATIONS, action="append", help="run only these implementations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: a tiny model, a few requests, kernels in Triton's interpreter")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/hf_serving-...)")
    args = ap.parse_args(argv)
    if args.smoke:  # must precede the first import of triton (via pagegen)
        os.environ["TRITON_INTERPRET"] = "1"
        args.shape, args.dtype, args.layers, args.requests, args.max_len = "smoke", torch.float16, 2, 6, 24
        args.kv_gib, args.max_batch_tokens, args.max_requests, args.warm_prompts = 1 / 1024, 64, 8, (5, 20)
        device = "cpu"
    elif torch.cuda.is_available():
        args.shape, args.dtype, args.warm_prompts = "1b", torch.bfloat16, (17, 300, 5, 64)
        device = "cuda"
    else:
        print("hf_serving: needs a CUDA GPU (or --smoke for a CPU check of the script)")
        return 2

    import pagegen.integrations.transformers as pg_hf
    from pagegen.gpu import gpu_key

    pg_hf.register()
    model = build_model(args, device)
    _hidden, _heads, kv_heads, head_dim, _inter, vocab = SHAPES[args.shape]
    per_block = 2 * args.layers * args.block_size * kv_heads * head_dim * 2  # K and V, all layers, 2-byte dtype
    num_blocks = int(args.kv_gib * 2**30) // per_block
    trace = make_trace(args.requests, vocab, args.seed, args.max_len)
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"{card}; transformers continuous batching; {args.requests} requests "
          f"({sum(len(p) for p, _ in trace)} prompt / {sum(n for _, n in trace)} output tokens); "
          f"{num_blocks} blocks of {args.block_size} ({args.kv_gib} GiB KV)", flush=True)
    rows = []
    for impl in args.only or IMPLEMENTATIONS:
        torch.cuda.empty_cache()
        row = serve(model, impl, trace, args, num_blocks, args.time_cap)
        print(f"  {impl}: {row['output_tok_per_s']:.0f} tok/s, {row['finished']}/{row['requests']} finished, "
              f"{row['steps']} steps, {row['ms_per_step']:.2f} ms/step", flush=True)
        rows.append(row)
    print(table(rows))
    key = gpu_key(card) if device == "cuda" else "cpu"
    result = {"card": card, "gpu_key": key, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "versions": versions(), "settings": {k: (v if isinstance(v, int | float | bool | None) else str(v))
                                                   for k, v in vars(args).items()},
              "num_blocks": num_blocks, "results": [{k: v for k, v in r.items() if k != "_outputs"} for r in rows]}
    if len(rows) == 2:
        a, b = rows[0]["_outputs"], rows[1]["_outputs"]
        both = sorted(set(a) & set(b))
        same = sum(a[r] == b[r] for r in both)
        result["identical_outputs"] = {"compared": len(both), "identical": same}
        result["speedup"] = rows[1]["output_tok_per_s"] / rows[0]["output_tok_per_s"]
        print(f"pagegen / sdpa throughput: {result['speedup']:.2f}x; identical greedy outputs: {same}/{len(both)}")
    if args.smoke and args.out is None:
        return 0
    out = args.out or _results_dir() / f"hf_serving-{key}-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
