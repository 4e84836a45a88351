"""One attention step per run, for Nsight Compute to profile (GPU only; driven by bench/ncu_profile.sh).

A case is built with the benchmarks' own input builders, run 3 times to compile and warm up, then run once
inside the NVTX range "profile", which the profile script selects with `ncu --nvtx --nvtx-include profile/`
(so only that step's kernels are profiled: no random fills, copies or compiles).

    python bench/ncu_cases.py decode:Llama-3-8B:128x4096:NHD     # pagegen decode (table or heuristic)
    python bench/ncu_cases.py sdpa-decode:Phi-3-mini:32x8192:cudnn  # SDPA on the contiguous slab
    python bench/ncu_cases.py fp8:128x4096:fp8_e4m3[:HND]         # bench/fp8.py's pool (NHD), per-tensor scales
    python bench/ncu_cases.py fp8lab:vt:128x4096:32,1,5,4096      # bench/fp8_lab's kernel (base or vt), a config
    python bench/ncu_cases.py extend:128:2048@0                   # pagegen extend (bench/extend.py's input)
    python bench/ncu_cases.py sdpa-extend:128:2048@0:cudnn        # SDPA on the same tokens made contiguous
    python bench/ncu_cases.py --list                              # the named models
Each run prints the case and the config pagegen chose.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 3


def geometry(model: str, layout: str):
    """bench/kernels.py's Geometry of a named model (pagegen.workloads.DEFAULT_MODELS) in `layout`."""
    from bench import kernels as K
    from pagegen.workloads import DEFAULT_MODELS

    for name, hd, group, hk in DEFAULT_MODELS:
        if name == model:
            return K.Geometry(name, hk * group, hk, hd, layout=layout)
    raise SystemExit(f"unknown model {model!r}; --list names them")


def decode_case(model: str, shape: str, layout: str = "NHD") -> Callable[[], object]:
    from bench import kernels as K

    x = K.make_inputs(shape, geo=geometry(model, layout))
    fn, extra = K.run_pagegen(x, None)
    print(f"pagegen decode {model} {shape} {layout}: {extra}")
    return fn


def sdpa_decode_case(model: str, shape: str, backend: str = "default") -> Callable[[], object]:
    from bench import kernels as K

    fn, extra = K.run_naive(K.make_inputs(shape, geo=geometry(model, "NHD")), backend)
    print(f"SDPA decode {model} {shape}: {extra}")
    return fn


def fp8_case(shape: str, kv: str = "fp8_e4m3", layout: str = "NHD") -> Callable[[], object]:
    import pagegen
    from bench import fp8 as F
    from pagegen.dispatch import explain

    fp8 = None if kv == "bf16" else kv  # bench/fp8.py's name for a bf16 pool
    F.use_layout(layout)
    lens, x, q, ragged = F.setup(shape, torch.Generator().manual_seed(0))
    pool = F.pool_of(x, fp8, False)
    out = torch.empty_like(q)
    cfg, source = explain(F.spec_of(fp8), len(lens), max(lens), F.HK, ragged)
    print(f"pagegen decode {kv} {layout} pool {shape}: {cfg.to_dict()} ({source})")

    def fn():
        return pagegen.paged_decode(q, pool["k"], pool["v"], x["bt"], x["sl"], layout=layout, out=out,
                                    max_seq_len=max(lens), sum_seq_lens=sum(lens), **pool["scales"])

    return fn


def fp8lab_case(variant: str, shape: str, config: str = "32,1,5,4096") -> Callable[[], object]:
    """bench/fp8_lab's frozen base or its V-transposed variant on lab.make_case's pool (uniform BxCTX),
    at config block_n,num_warps,num_stages,split_size."""
    sys.path.insert(0, str(ROOT / "bench" / "fp8_lab"))
    import lab

    if variant not in lab.KERNELS:
        raise SystemExit(f"unknown fp8 lab variant {variant!r}; expected one of {sorted(lab.KERNELS)}")
    batch, ctx = (int(x) for x in shape.split("x"))
    cfg = lab.Config(*(int(x) for x in config.split(",")))
    x = lab.make_case([ctx] * batch, lab.HK, "cuda", seed=0)
    out = torch.empty_like(x["q"])
    print(f"fp8 lab {variant} {shape}: {cfg.label()}")
    return lab.launch_of(variant, cfg, x, out, ctx)


def extend_case(head_dim: str, shape: str, block_size: str = "16") -> Callable[[], object]:
    from bench import extend as E

    E.configure(block_size=int(block_size), head_dim=int(head_dim))
    x = E.make_inputs(shape)
    print(f"pagegen extend hd{head_dim} bs{block_size} {shape}: {E.chosen_config(x).to_dict()}")
    return E.run_pagegen(x, None)


def sdpa_extend_case(head_dim: str, shape: str, backend: str = "default") -> Callable[[], object]:
    from bench import baselines
    from bench import extend as E

    E.configure(head_dim=int(head_dim))
    forms, _ = E.sdpa_forms(E.make_inputs(shape))
    form = forms.get("causal") or forms["bias"]
    print(f"SDPA extend hd{head_dim} {shape} backend {backend}")

    def fn():
        with baselines.backend_ctx(backend):
            return form()

    return fn


CASES = {"decode": decode_case, "sdpa-decode": sdpa_decode_case, "fp8": fp8_case, "fp8lab": fp8lab_case,
         "extend": extend_case, "sdpa-extend": sdpa_extend_case}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", nargs="?", help="kind:args (see the module docstring)")
    ap.add_argument("--list", action="store_true", help="print the named models and exit")
    args = ap.parse_args(argv)
    if args.list or not args.case:
        from pagegen.workloads import DEFAULT_MODELS

        print("\n".join(f"{n}: head_dim {d}, group {g}, {k} KV heads" for n, d, g, k in DEFAULT_MODELS))
        return 0
    kind, *rest = args.case.split(":")
    if kind not in CASES:
        raise SystemExit(f"unknown case kind {kind!r}; expected one of {sorted(CASES)}")
    if not torch.cuda.is_available():
        raise SystemExit("ncu_cases runs on a GPU")
    fn = CASES[kind](*rest)
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    fn()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
