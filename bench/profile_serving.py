"""Profile a few seconds of each serving engine's steps on the GPU (where does a step's time go?).

    python bench/profile_serving.py [--seconds 8]   (prints the top CUDA kernels and CPU ops)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("serving", HERE / "serving.py")
serving = importlib.util.module_from_spec(spec)
sys.modules["serving"] = serving
spec.loader.exec_module(serving)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
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
