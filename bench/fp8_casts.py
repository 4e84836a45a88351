"""Does Triton convert fp8 exactly? Plain `.to()` casts against torch's, over every code and many values.

    TRITON_INTERPRET=1 python bench/fp8_casts.py     # Triton's CPU interpreter
    python bench/fp8_casts.py                        # compiled, on a CUDA GPU

Loads: every one of the 256 codes of float8_e4m3fn / float8_e5m2 loaded and cast to fp32, fp16 and
bf16, compared bit for bit with torch's cast (codes torch decodes as NaN must come out NaN).
Stores: fp32 / fp16 / bf16 values in range (randn at several spreads, every grid value, every
midpoint between neighbours, i.e. the ties) cast to fp8, against torch's cast (round to nearest
even; tests/test_fp8.py checks torch's cast against a brute-force search); and values past the
largest finite one, against saturation (+-max). Prints mismatch counts; bench/NOTES.md ("fp8 in
the interpreter") records the results.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
WIDE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@triton.jit
def upcast_kernel(src, d32, d16, dbf, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(src + offs, mask=m)
    tl.store(d32 + offs, x.to(tl.float32), mask=m)
    tl.store(d16 + offs, x.to(tl.float16), mask=m)
    tl.store(dbf + offs, x.to(tl.bfloat16), mask=m)


@triton.jit
def downcast_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m).to(dst.dtype.element_ty), mask=m)


def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal bits, or both NaN."""
    a, b = a.cpu(), b.cpu()
    return (a == b) & (torch.signbit(a) == torch.signbit(b)) | (torch.isnan(a) & torch.isnan(b))


def probe_values(fp8: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8).double()
    grid = codes[torch.isfinite(codes)].unique()
    fmax = torch.finfo(fp8).max
    mids = (grid[1:] + grid[:-1]) / 2
    spread = torch.cat([torch.randn(4096, generator=gen).double() * s for s in (1e-3, 0.03, 1, 30, 1e3)])
    return torch.cat([spread, grid, mids]).clamp(-fmax, fmax)


def main() -> None:
    dev = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
    print(f"triton {triton.__version__}, torch {torch.__version__}, device {dev}")
    for name, fp8 in FP8.items():
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8)
        outs = {k: torch.empty(256, dtype=dt, device=dev) for k, dt in WIDE.items()}
        upcast_kernel[(1,)](codes.to(dev), outs["fp32"], outs["fp16"], outs["bf16"], 256, BLOCK=256)
        for k, o in outs.items():
            bad = (~same(o, codes.to(WIDE[k]))).nonzero().flatten().tolist()
            shown = ", ".join(f"0x{c:02x}: {float(o[c])} vs {float(codes[c].to(WIDE[k]))}" for c in bad[:4])
            print(f"load  {name} -> {k}: {len(bad)} of 256 codes differ{'  (' + shown + ')' if bad else ''}")
        fmax = torch.finfo(fp8).max
        over = torch.tensor([fmax * 1.01, -fmax * 1.3, fmax * 2, -fmax * 5, 1e30, float("inf")]).double()
        for what, vals in (("in range", probe_values(fp8)), ("past max", over)):
            for k, dt in WIDE.items():
                x = vals.to(dt)
                out = torch.empty(x.numel(), dtype=torch.uint8, device=dev).view(fp8)
                downcast_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(dev), out, x.numel(), BLOCK=1024)
                want = x.float().clamp(-fmax, fmax).to(fp8)
                bad = (out.cpu().view(torch.uint8) != want.view(torch.uint8)).nonzero().flatten().tolist()
                shown = ", ".join(f"{float(x[i]):.4g} -> {float(out[i].float())} (want {float(want[i].float())})"
                                  for i in bad[:3])
                print(f"store {k} -> {name} {what}: {len(bad)} of {x.numel()} differ"
                      f"{'  (' + shown + ')' if bad else ''}")


if __name__ == "__main__":
    main()
