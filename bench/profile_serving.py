"""Profile a few seconds of each serving engine's steps on the GPU (where does a step's time go?).

    python bench/profile_serving.py [--seconds 8]   (prints the top CUDA kernels and CPU ops)
The printout is also written to bench/results/serving-profile-<gpu>-<date>.log (or --out's .log).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import serving  # noqa: E402
from bench.common import meta_line, result_path, run_meta, tee_log  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--out", default="", help="path whose .log takes the printout")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/profile_serving.py needs a CUDA GPU", file=sys.stderr)
        return 2
    with tee_log(result_path("serving-profile", out=args.out)):
        print(meta_line(run_meta("serving-profile", copy=False)), flush=True)
        return profile(args)


def profile(args: argparse.Namespace) -> int:
    """Profile each engine for args.seconds on args.requests requests; print its top kernels and ops."""
    dev = torch.device("cuda")
    cfg = serving.PRESETS["1b"]
    model = serving.Model(cfg, device=dev, dtype=torch.bfloat16, seed=0, max_pos=4096 + 64)
    setup = serving.Setup(model, torch.bfloat16, 4 << 30, block_size=16, naive_reserve="request", max_model_len=4096,
                          max_batch=256, max_running=512, max_batched_tokens=8192)
    trace = serving.make_trace(serving.TraceConfig(num_requests=args.requests, seed=0, max_tokens=1024,
                                                   max_prompt=1024), cfg.vocab)
    warm = serving.make_trace(dataclasses.replace(serving.TraceConfig(num_requests=16, seed=1, max_tokens=16,
                                                                      max_prompt=200)), cfg.vocab)
    for name in ("naive", "pagegen"):
        eng = setup.naive() if name == "naive" else setup.paged(True)
        eng.run(warm, label="warm", sync=torch.cuda.synchronize)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            st = eng.run(trace, label="prof", time_cap=args.seconds, sync=torch.cuda.synchronize)
        s = st.summary()
        print(f"== {name}: {s['output_tok_per_s']:.0f} tok/s, steps {st.steps}, mean batch {s.get('mean_batch')}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))
        del eng
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
