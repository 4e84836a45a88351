"""fp8 decode with V stored transposed: check, compile and time today's kernel (base) against the variant.

Spec decode_bf16_kvfp8e4m3_hd128_bs16_nhd_g4 (bf16 q/out, e4m3 K/V, head_dim 128, group 4, pages of 16).
base = _rendered_decode_fp8.py (today's render, frozen); vt = v_transposed.py (V pool [blocks, Hkv, D, PAGE]).

    TRITON_INTERPRET=1 python bench/fp8_lab/lab.py --check     # interpreter: both against the float64 reference
    python bench/fp8_lab/lab.py --inspect [--config BN/W/ST/SPLIT] [--json F] [--dump DIR]  # sm_90, CPU
    python bench/fp8_lab/lab.py --gpu [--out PATH]              # H200: time base vs vt (pagegen.timing)
    python bench/fp8_lab/lab.py --gpu --smoke                   # the --gpu logic on tiny shapes, interpreter
    python bench/fp8_lab/lab.py --stale                         # does today's render still equal the base?

--inspect compiles with whatever Triton is first on PYTHONPATH (the GPU image has 3.6: unpack its wheel from
/opt/pypi/files into a scratch dir and put that first, as bench/NOTES.md "Compiled-kernel evidence" says).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "--smoke" in sys.argv or "--check" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

SPEC_KEY = "decode_bf16_kvfp8e4m3_hd128_bs16_nhd_g4"
HEAD_DIM, PAGE, GROUP = 128, 16, 4  # the constexprs baked into both kernel files
LOG2E = 1.4426950408889634
KERNELS = {"base": "_rendered_decode_fp8", "vt": "v_transposed"}  # variant -> file stem in this folder
FP8 = torch.float8_e4m3fn
NAN_CODE = 0x7F  # e4m3fn NaN: poisons every slot a kernel must not read

# the tuned H200 config (tuned/h200.yaml, 2026-12-01) and its neighbours: (block_n, num_warps, num_stages)
TUNED = (32, 1, 5)
NEIGHBOURS = ((32, 1, 4), (64, 2, 5), (16, 1, 5))
# the H200 workload (issue 16): shape -> the tuned table's split_size for it
H200_SHAPES = {"128x4096": 4096, "256x2048": 1024, "32x8192": 1024}
HK = 8  # KV heads (32 query heads at group 4)

# the base's measured time at 128x4096 (us; H200, triton 3.6, the tuner's trials in
# bench/results/studies/h200.journal, `bucket_us`; splits 4096, 8192, 4096, 0: each one split at ctx 4096)
MEASURED_BASE_US = {(32, 1, 5): 309.3, (32, 1, 4): 388.9, (64, 2, 5): 351.6, (16, 1, 5): 392.8}

# the issue-rate model of bench/NOTES.md "Compiled-kernel evidence for the H200 gaps", section 2
SM_COUNT, CLOCK_HZ = 132, 1.98e9
COPY_GBPS = 4300.0  # measured copy bandwidth of the H200 runs (GB/s): 16.45 B/clk a SM
CLK_PER_INSTR = 4.0  # measured for the tuned fp8 kernel: 2.42 us a tile / 1193 instructions at 8 warps an SM
BEST_PCT_COPY = 0.955  # the best decode measured (bf16 at 128x4096): the memory floor of the model


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_loaded: dict[tuple[str, bool], Any] = {}


def load(variant: str, jit: bool | None = None) -> Any:
    """The kernel module of `variant` ("base" or "vt"), imported from its file. jit: real @triton.jit
    functions (compilable) even when TRITON_INTERPRET=1 is set; default: follow the environment."""
    if variant not in KERNELS:
        raise ValueError(f"variant {variant!r} is unknown; expected one of {sorted(KERNELS)}")
    jit = (not interpreting()) if jit is None else jit
    key = (variant, jit)
    if key not in _loaded:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "0" if jit else "1"
        try:
            name = f"fp8_lab_{KERNELS[variant]}_{'jit' if jit else 'interp'}"
            spec = importlib.util.spec_from_file_location(name, HERE / f"{KERNELS[variant]}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
        _loaded[key] = mod
    return _loaded[key]


def transpose_v_pool(v_cache: torch.Tensor) -> torch.Tensor:
    """The variant's V pool from an NHD pool: [num_blocks, PAGE, Hkv, D] -> [num_blocks, Hkv, D, PAGE] (contiguous:
    per page and KV head the D x PAGE matrix V^T, tokens contiguous)."""
    if v_cache.dim() != 4 or v_cache.shape[1] != PAGE or v_cache.shape[3] != HEAD_DIM:
        raise ValueError(f"v_cache must be an NHD pool [num_blocks, {PAGE}, kv_heads, {HEAD_DIM}]; "
                         f"got {tuple(v_cache.shape)}")
    return v_cache.permute(0, 2, 3, 1).contiguous()


@dataclass(frozen=True, slots=True)
class Config:
    """A launch of the lab kernels: tile keys, warps, pipeline stages, split-KV size (0: no split)."""

    block_n: int
    num_warps: int
    num_stages: int
    split_size: int = 0

    def label(self) -> str:
        return f"{self.block_n}/{self.num_warps}/{self.num_stages}/{self.split_size}"


class Launch:
    """One decode step of a lab kernel over fixed tensors, ready to call (and to capture in a CUDA graph).

    q [B, Hq, HEAD_DIM] bf16/fp16; k_cache NHD [num_blocks, PAGE, Hkv, HEAD_DIM] fp8; v_cache the same pool
    (base) or its transpose_v_pool (vt); block_tables [B, max_blocks] int32; seq_lens [B] int32; out like q;
    k_scale/v_scale float32 [1] or [Hkv]; ctx_bound >= max(seq_lens) (sizes the split grid).
    """

    def __init__(self, variant: str, cfg: Config, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor, k_scale: torch.Tensor,
                 v_scale: torch.Tensor, ctx_bound: int, scale: float | None = None) -> None:
        mod = load(variant)
        b, hq, d = q.shape
        hk = k_cache.shape[2]
        if d != HEAD_DIM or hq != hk * GROUP or q.stride(2) != 1:
            raise ValueError(f"q must be [B, {hk * GROUP}, {HEAD_DIM}] with a contiguous last dim for this pool "
                             f"({hk} KV heads, group {GROUP}); got {tuple(q.shape)}, strides {q.stride()}")
        want_v = (k_cache.shape[0], hk, HEAD_DIM, PAGE) if variant == "vt" else tuple(k_cache.shape)
        if tuple(v_cache.shape) != want_v or (variant == "vt" and v_cache.stride()[2:] != (PAGE, 1)):
            what = "the transposed pool (transpose_v_pool of the NHD V pool)" if variant == "vt" else "k_cache's shape"
            raise ValueError(f"v_cache of variant {variant!r} must be {what}: {want_v}"
                             + (f" with last two strides ({PAGE}, 1)" if variant == "vt" else "")
                             + f"; got {tuple(v_cache.shape)}, strides {v_cache.stride()}")
        splits = math.ceil(ctx_bound / cfg.split_size) if cfg.split_size else 1
        split = cfg.split_size if splits > 1 else 0
        self.args = (q, k_cache, v_cache, out)
        self.part_out = torch.empty(b, hq, splits, HEAD_DIM, dtype=torch.float32, device=q.device) if split else out
        self.part_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device) if split else out
        self.meta = (block_tables, seq_lens, k_scale, v_scale)
        self.kw = dict(
            qk_scale=(scale if scale is not None else HEAD_DIM ** -0.5) * LOG2E,
            stride_qb=q.stride(0), stride_qh=q.stride(1), stride_ob=out.stride(0), stride_oh=out.stride(1),
            stride_btb=block_tables.stride(0), stride_kv_blk=k_cache.stride(0), stride_kv_tok=k_cache.stride(1),
            stride_pb=hq * splits, stride_ph=splits,
            stride_ks=0 if k_scale.numel() == 1 else k_scale.stride(0),
            stride_vs=0 if v_scale.numel() == 1 else v_scale.stride(0),
            BLOCK_N=cfg.block_n, SPLIT_SIZE=split, DOT_FP32=False, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        if variant == "vt":
            self.kw.update(stride_vt_blk=v_cache.stride(0), stride_vt_head=v_cache.stride(1))
        self.decode = mod.decode_kernel[(b, hk, splits)]
        self.merge = mod.merge_kernel[(b, hq)] if split else None
        self.merge_kw = dict(stride_ob=out.stride(0), stride_oh=out.stride(1), stride_pb=hq * splits,
                             stride_ph=splits, SPLIT_SIZE=split, SPLITS_PAD=1 << max(splits - 1, 0).bit_length(),
                             num_warps=4)

    def __call__(self, i: int = 0) -> torch.Tensor:
        q, k, v, out = self.args
        bt, sl, ks, vs = self.meta
        self.decode(q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, part_out_ptr=self.part_out, part_lse_ptr=self.part_lse,
                    block_tables_ptr=bt, seq_lens_ptr=sl, k_scale_ptr=ks, v_scale_ptr=vs, **self.kw)
        if self.merge is not None:
            self.merge(out_ptr=out, part_out_ptr=self.part_out, part_lse_ptr=self.part_lse, seq_lens_ptr=sl,
                       **self.merge_kw)
        return out


def make_case(lens: list[int], kv_heads: int, device: str, seed: int, per_head: bool = False,
              q_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random fp8 pools (shuffled pages, absmax scales; K heads at different spreads) for `lens`, made on `device`.
    Every slot no sequence owns (slots past seq_len in last pages, two spare blocks) holds a NaN code, and unused
    block-table entries point at a spare block. Returns q [B, Hkv * GROUP, D] randn, k and v (NHD fp8 pools),
    vt (transpose_v_pool of v), bt, sl, k_scale, v_scale (float32 [1], or [Hkv] with per_head)."""
    from pagegen.reference import absmax_scale_ref, quantize_fp8_ref

    g = torch.Generator(device=device).manual_seed(seed)
    nblk = torch.tensor([-(-n // PAGE) for n in lens])
    total = int(nblk.sum()) + 2  # two spare blocks
    shape = (total, PAGE, kv_heads, HEAD_DIM)
    spread = torch.tensor([0.5, 4.0, 0.05] * kv_heads, device=device)[:kv_heads].reshape(1, 1, kv_heads, 1)
    k = torch.randn(shape, generator=g, device=device) * spread
    axis = 2 if per_head else None
    ks = absmax_scale_ref(k, FP8, head_axis=axis)
    k8 = quantize_fp8_ref(k, ks, FP8, head_axis=2).view(torch.uint8)
    del k
    v = torch.randn(shape, generator=g, device=device)
    vs = absmax_scale_ref(v, FP8, head_axis=axis)
    v8 = quantize_fp8_ref(v, vs, FP8, head_axis=2).view(torch.uint8)
    del v
    perm = torch.randperm(total, generator=g, device=device).int()
    width = int(nblk.max())
    bt = torch.full((len(lens), width), 0, dtype=torch.int32, device=device)
    bt[:] = perm[-1]  # unused entries: a spare block
    j = torch.arange(width)
    live = j[None, :] < nblk[:, None]  # [B, width]
    bt[live.to(device)] = perm[:int(nblk.sum())]  # row-major: sequence i's pages are consecutive in perm
    # owned slots: page j of sequence i holds min(PAGE, len - j * PAGE) tokens
    held = (torch.tensor(lens)[:, None] - j[None, :] * PAGE).clamp(0, PAGE)[live].to(device)
    owned = torch.zeros(total, PAGE, dtype=torch.bool, device=device)
    owned[bt[live.to(device)].long()] = torch.arange(PAGE, device=device)[None, :] < held[:, None]
    for t in (k8, v8):
        t[~owned] = NAN_CODE
    k8, v8 = k8.view(FP8), v8.view(FP8)
    q = torch.randn(len(lens), kv_heads * GROUP, HEAD_DIM, generator=g, device=device).to(q_dtype)
    return {"q": q, "k": k8, "v": v8, "vt": transpose_v_pool(v8), "bt": bt,
            "sl": torch.tensor(lens, dtype=torch.int32, device=device), "k_scale": ks, "v_scale": vs}


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or inf."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float("inf") if not torch.isfinite(out).all() else float((out - ref).norm() / ref.norm())


def launch_of(variant: str, cfg: Config, x: dict[str, torch.Tensor], out: torch.Tensor, ctx_bound: int) -> Launch:
    """The Launch of `variant` on a make_case dict x (its V pool in the variant's layout), writing `out`."""
    v = x["vt"] if variant == "vt" else x["v"]
    return Launch(variant, cfg, x["q"], x["k"], v, x["bt"], x["sl"], out, x["k_scale"], x["v_scale"],
                  ctx_bound=ctx_bound)


def run_variant(variant: str, x: dict[str, torch.Tensor], cfg: Config, idx: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of `variant` on case x (NaN-poisoned out); rows idx (default all). Returns [B', Hq, D]."""
    out = torch.full_like(x["q"], float("nan"))
    launch_of(variant, cfg, x, out, int(x["sl"].max()))()
    return out if idx is None else out[idx]


def reference(x: dict[str, torch.Tensor], idx: torch.Tensor | None = None) -> torch.Tensor:
    """paged_decode_fp8_ref of case x (rows idx, default all), float64 on the CPU. Only the blocks those rows'
    block tables name are copied and dequantized (a 128x4096 pool is 1 GB of codes, 8 GB in float64)."""
    from pagegen.reference import paged_decode_fp8_ref

    rows = idx.cpu() if idx is not None else torch.arange(x["q"].shape[0])
    bt = x["bt"].cpu()[rows]
    used = torch.unique(bt)
    remap = torch.full((x["k"].shape[0],), -1, dtype=torch.int32)
    remap[used] = torch.arange(used.numel(), dtype=torch.int32)
    k, v = (x[t][used.to(x[t].device)].cpu() for t in ("k", "v"))
    return paged_decode_fp8_ref(x["q"].cpu()[rows], k, v, remap[bt.long()], x["sl"].cpu()[rows],
                                k_scale=x["k_scale"].cpu(), v_scale=x["v_scale"].cpu())


# the interpreter check: ragged lengths with page edges (1, 16, 17) and a partial last tile (45, 70), split
# sizes that cut sequences into 1-3 splits; block_n 16 (tile = page) and 32 (2 pages)
CHECK_LENS = [1, 16, 17, 45, 70]
CHECK_CASES = [Config(32, 1, 5, 0), Config(32, 1, 5, 32), Config(16, 1, 4, 48), Config(64, 2, 5, 0)]


def check(lens: list[int] = CHECK_LENS, cases: list[Config] = CHECK_CASES, kv_heads: int = 2,
          device: str = "cpu") -> list[dict[str, Any]]:
    """Both variants against the float64 reference on one ragged batch per config (scales per tensor and per
    head alternate). Returns one row per config: rel errors of base and vt, and max |vt - base|."""
    rows = []
    for i, cfg in enumerate(cases):
        x = make_case(lens, kv_heads, device, seed=zlib.crc32(repr((lens, cfg)).encode()), per_head=i % 2 == 1)
        ref = reference(x)
        base, vt = run_variant("base", x, cfg), run_variant("vt", x, cfg)
        rows.append({"config": cfg.label(), "per_head": i % 2 == 1, "rel_base": rel(base, ref),
                     "rel_vt": rel(vt, ref), "max_abs_vt_minus_base": float((vt.float() - base.float()).abs().max())})
    return rows


# ---------------------------------------------------------------- compile for sm_90 (no GPU) --
ARG_TYPES = {"q_ptr": "*bf16", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
             "part_lse_ptr": "*fp32", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": "fp32",
             "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
SASS_EXTRA = {  # per-warp SASS kinds beyond inspect_decode.SASS_KINDS
    "LDS.U8": r"\bLDS\.U8\b", "LDS.32": r"(?<!@!PT )\bLDS\s", "nop (@!PT LDS)": r"@!PT LDS",
    "LDS.64": r"\bLDS\.64\b", "LDS.128": r"\bLDS\.128\b",
    "STS": r"\bSTS\b|\bSTS\.", "IMAD": r"\bIMAD\b|\bIMAD\.", "IMAD.MOV": r"\bIMAD\.MOV", "SEL": r"\bSEL\b",
    "F2FP.E4M3 (cvt fp8x2)": r"F2FP\.F16\.E4M3", "F2FP.PACK (P->f16)": r"F2FP\.F16\.F32\.PACK",
}


def loops(lines: list[str], label_re: str, branch_re: str, hex_labels: bool = False) -> list[list[str]]:
    """Every backward-branch loop (label .. branch back to it) in `lines`, as its lines."""
    def key(label: str) -> str | int:
        return int(label, 16) if hex_labels else label

    where = {key(m.group(1)): i for i, line in enumerate(lines) if (m := re.match(label_re, line))}
    out = []
    for i, line in enumerate(lines):
        m = re.search(branch_re, line)
        if m and key(m.group(1)) in where and where[key(m.group(1))] < i:
            out.append(lines[where[key(m.group(1))]:i + 1])
    return out


def main_loop(bodies: list[list[str]], markers: tuple[str, ...]) -> list[str]:
    """The longest loop holding every marker: the pipelined key loop (its cp.async copies and its MMAs); the
    variant's 0-or-1-trip tail loop has no cp.async and is left out."""
    hits = [b for b in bodies if all(any(m in x for x in b) for m in markers)]
    return max(hits, key=len) if hits else []


def inspect(variant: str, cfg: Config, grid: tuple[int, int, int] = (128, HK, 4096),
            dump: Path | None = None) -> dict[str, Any]:
    """Compile `variant` at cfg for sm_90 and read what the compiler made of its key loop (see bench/inspect_decode.py
    for the method; the numbers are per warp for SASS, per thread for PTX). grid = (batch, kv_heads, ctx) gives the
    resident programs an SM and the issue-rate prediction of a step at that shape."""
    from bench.inspect_decode import PTX_KINDS, SASS_KINDS, count, occupancy, sass_of
    from pagegen.compile_check import compile_for_target, ptxas_report

    mod = load(variant, jit=True)
    consts = {"BLOCK_N": cfg.block_n, "SPLIT_SIZE": cfg.split_size, "DOT_FP32": False}
    kernel = compile_for_target(mod.decode_kernel, ARG_TYPES, consts, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages, no_divisibility=("stride_ks", "stride_vs"))
    rep: dict[str, Any] = {"variant": variant, "config": cfg.label(), **ptxas_report(kernel),
                           "shared": int(kernel.metadata.shared)}
    ptx = [x.strip() for x in kernel.asm["ptx"].splitlines()]
    pbody = main_loop(loops(ptx, r"^(\$L__BB\d+_\d+):", r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);"),
                      ("cp.async", "mma"))
    rep["ptx_loop"] = count(pbody, PTX_KINDS)
    waits = [int(n) for x in pbody for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", x)]
    sass = sass_of(kernel.asm["cubin"])
    slines = [x for x in sass.splitlines() if re.search(r"^\s*/\*[0-9a-f]{4,6}\*/", x)]
    sbody = main_loop(loops(slines, r"^\s*/\*([0-9a-f]{4,6})\*/", r"BRA\s+0x([0-9a-f]+)", hex_labels=True),
                      ("LDGSTS", "MMA"))
    rep["sass_loop"] = {**count(sbody, SASS_KINDS), **count(sbody, SASS_EXTRA), "instructions": len(sbody)}
    # -- occupancy, bytes in flight (inspect_decode's rules) and the issue-rate prediction at `grid` --
    tile_bytes = cfg.block_n * HEAD_DIM * 2  # K + V of a tile, 1 byte an element
    commits = max(rep["ptx_loop"]["commit_group"], 1)
    prefetch = min(waits) // commits if waits else 0
    occ = occupancy(rep["registers"], cfg.num_warps, rep["shared"])
    batch, kv_heads, ctx = grid
    programs_total = batch * kv_heads * (math.ceil(ctx / cfg.split_size) if cfg.split_size else 1)
    resident = min(occ["programs"], programs_total / SM_COUNT)
    instr_per_byte = len(sbody) * cfg.num_warps / tile_bytes
    rep.update(occupancy=occ, resident_programs=round(resident, 2), prefetch_tiles=prefetch,
               bytes_in_flight_compute=round(resident * prefetch * tile_bytes),
               bytes_in_flight_peak=round(resident * (prefetch + 1) * tile_bytes),
               sass_instr_per_kv_byte=round(instr_per_byte, 4),
               prediction=predict(instr_per_byte, resident * cfg.num_warps, batch, kv_heads, ctx))
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        stem = f"{variant}_{cfg.label().replace('/', '_')}"
        (dump / f"{stem}.ptx").write_text(kernel.asm["ptx"])
        (dump / f"{stem}.sass").write_text(sass)
        (dump / f"{stem}.loop.sass").write_text("\n".join(sbody) + "\n")
    return rep


def step_bytes(batch: int, kv_heads: int, ctx: int) -> int:
    """Bytes of one decode step as pagegen.workloads.decode_bytes counts them: fp8 K and V, bf16 q and out."""
    return batch * ctx * kv_heads * HEAD_DIM * 2 + batch * kv_heads * GROUP * HEAD_DIM * 2 * 2


def predict(instr_per_byte: float, warps_per_sm: float, batch: int, kv_heads: int, ctx: int,
            clk_per_instr: float = CLK_PER_INSTR) -> dict[str, Any]:
    """The issue-rate model of bench/NOTES.md (fp8 decode section): an SM streams warps / (instr a KV byte x
    clk_per_instr) bytes a clock, capped by memory at BEST_PCT_COPY of copy. Returns the time of one step at
    batch x ctx (step_bytes), its % of copy, and which side binds."""
    issue_bpc = warps_per_sm / (instr_per_byte * clk_per_instr)
    copy_bpc = COPY_GBPS * 1e9 / (SM_COUNT * CLOCK_HZ)
    bpc = min(issue_bpc, BEST_PCT_COPY * copy_bpc)
    us = step_bytes(batch, kv_heads, ctx) / (bpc * SM_COUNT * CLOCK_HZ) * 1e6
    issue_us = step_bytes(batch, kv_heads, ctx) / (issue_bpc * SM_COUNT * CLOCK_HZ) * 1e6
    return {"clk_per_instr": round(clk_per_instr, 2), "issue_bytes_per_clk_sm": round(issue_bpc, 2),
            "issue_us": round(issue_us, 1), "issue_pct_copy": round(100 * issue_bpc / copy_bpc, 1),
            "copy_bytes_per_clk_sm": round(copy_bpc, 2),
            "bound": "issue" if issue_bpc < BEST_PCT_COPY * copy_bpc else "memory", "us": round(us, 1),
            "pct_copy": round(100 * bpc / copy_bpc, 1)}


def clk_per_instr_of(us: float, instr_per_byte: float, warps_per_sm: float, batch: int, kv_heads: int,
                     ctx: int) -> float:
    """The clocks a warp takes per loop instruction that make predict() give `us` (a measured time): the model
    calibrated on one kernel, to carry to another kernel at the same config."""
    return us * 1e-6 * SM_COUNT * CLOCK_HZ * warps_per_sm / (step_bytes(batch, kv_heads, ctx) * instr_per_byte)


def inspect_all(configs: list[Config], dump: Path | None = None) -> list[dict[str, Any]]:
    """inspect() of base and vt at each config (at 128x4096), with two predictions for each: the model at
    CLK_PER_INSTR, and the model calibrated on the base's measured time at that config (MEASURED_BASE_US:
    clocks an instruction of the base, carried to vt); prints a table to stderr as it goes."""
    import triton

    grid = (128, HK, 4096)
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}), sm_90; model at 128x4096: "
          f"{CLK_PER_INSTR} clk an instruction a warp (or calibrated on the base's measured time), memory floor "
          f"{BEST_PCT_COPY:.1%} of {COPY_GBPS:.0f} GB/s", file=sys.stderr)
    print("variant cfg bn/w/st/split | regs spill shared | SASS/tile instr/B | LDS.U8 LDS(32/64/128) nop LDSM STS | "
          "cvt fp8x2 PTX/SASS | progs/SM (occ) | prefetch, B in flight compute/peak | model us %copy (issue alone) | "
          "calibrated clk us %copy (issue alone)", file=sys.stderr)
    rows = []
    for cfg in configs:
        pair = {v: inspect(v, cfg, grid=grid, dump=dump) for v in KERNELS}
        measured = MEASURED_BASE_US.get((cfg.block_n, cfg.num_warps, cfg.num_stages))
        if measured is not None:
            b = pair["base"]
            clk = clk_per_instr_of(measured, b["sass_instr_per_kv_byte"], b["resident_programs"] * cfg.num_warps, *grid)
            for r in pair.values():
                r["base_measured_us"] = measured
                r["prediction_calibrated"] = predict(r["sass_instr_per_kv_byte"],
                                                     r["resident_programs"] * cfg.num_warps, *grid, clk_per_instr=clk)
        for variant, r in pair.items():
            s, p, pr = r["sass_loop"], r["ptx_loop"], r["prediction"]
            cal = r.get("prediction_calibrated")
            cal_s = (f"{cal['clk_per_instr']:.2f} {cal['us']:>6} {cal['pct_copy']:>5} ({cal['issue_pct_copy']})"
                     if cal else "-")
            print(f"{variant:<4} {r['config']:<13} | {r['registers']:>3} {r['spill_bytes']:>3} {r['shared']:>6} | "
                  f"{s['instructions']:>5} {r['sass_instr_per_kv_byte']:.3f} | {s['LDS.U8']:>3} "
                  f"{s['LDS.32']}/{s['LDS.64']}/{s['LDS.128']} {s['nop (@!PT LDS)']:>2} {s['LDSM']:>2} {s['STS']:>2} | "
                  f"{p['cvt fp8->f16x2']}/{s['F2FP.E4M3 (cvt fp8x2)']} | {r['resident_programs']:>5} "
                  f"({r['occupancy']['programs']}) | {r['prefetch_tiles']}, {r['bytes_in_flight_compute']}/"
                  f"{r['bytes_in_flight_peak']} | {pr['us']:>6} {pr['pct_copy']:>5} ({pr['issue_pct_copy']}) | {cal_s}",
                  file=sys.stderr)
            rows.append(r)
    return rows


# ---------------------------------------------------------------------------- GPU timing --
TOL = 2e-2  # rel err against the float64 reference: bf16 output and fp16 P rounding (measured ~3e-3)


def gpu(out: str | None, smoke: bool) -> int:
    """Time base and vt (the tuned config and its neighbours at the table's split of each shape), with pagegen's
    own fp8 and bf16 ops beside them, at H200_SHAPES; every row is checked against the reference first (NaN-
    poisoned pools and outputs). Writes bench/results/fp8-vt-lab-<gpu>-<date>.json (+ .log)."""
    from bench.common import meta_line, result_path, run_meta, tee_log, write_json

    if not smoke and not torch.cuda.is_available():
        sys.exit("--gpu needs CUDA (or add --smoke to run the logic in the interpreter)")
    shapes = {"2x40": 32, "1x70": 48} if smoke else H200_SHAPES
    hk = 2 if smoke else HK
    path = result_path("fp8-vt-lab", tag="smoke" if smoke else "", out=out)
    with tee_log(path):
        meta = run_meta("fp8-vt-lab", workload=f"{SPEC_KEY}: {hk} KV heads x group {GROUP}, shapes {list(shapes)}")
        print(meta_line(meta), flush=True)
        # ragged correctness first: partial tiles over NaN-coded slots (a real NaN on the GPU, 480 in the interpreter)
        checked = check(device="cpu" if smoke else "cuda")
        for r in checked:
            print("check", json.dumps(r), flush=True)
        rows: list[dict[str, Any]] = []
        for shape, split in shapes.items():
            rows += gpu_shape(shape, split, hk, smoke, meta.get("copy_gbps"))
            if not smoke:
                torch.cuda.empty_cache()
        write_json(path, {"meta": meta, "check": checked, "rows": rows})
    failed = [r for r in rows if "error" in r] + [r for r in checked if not max(r["rel_base"], r["rel_vt"]) < TOL]
    print(f"wrote {path}" + (f"; {len(failed)} rows failed" if failed else ""))
    return 1 if failed else 0


def gpu_shape(shape: str, split: int, hk: int, smoke: bool, copy: float | None) -> list[dict[str, Any]]:
    """The rows of one shape "BxCTX" (see gpu)."""
    import pagegen
    from bench.common import timeit
    from pagegen.dispatch import explain, is_ragged
    from pagegen.spec import KernelSpec

    b, n = (int(v) for v in shape.split("x"))
    x = make_case([n] * b, hk, "cpu" if smoke else "cuda", seed=zlib.crc32(shape.encode()))
    idx = torch.linspace(0, b - 1, min(3, b)).long().unique().to(x["q"].device)
    ref = reference(x, idx)
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], fn: Any, nbytes: int) -> dict[str, Any]:
        row["shape"] = shape
        try:
            row["rel_err"] = rel(fn(0)[idx], ref)
            if not row["rel_err"] < TOL:
                raise RuntimeError(f"wrong result: rel err {row['rel_err']:.3e} vs the reference (tol {TOL})")
            row["us"] = timeit(fn, graph=not smoke, reps=3 if smoke else 50).median_us
            row["gbps"] = nbytes / row["us"] / 1e3
            row["pct_copy"] = 100 * row["gbps"] / copy if copy else None
        except Exception as exc:  # a failing row is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(fmt_row(row), flush=True)
        return row

    bytes8 = step_bytes(b, hk, n)  # fp8 K/V + bf16 q/out
    hints = {"max_seq_len": n, "sum_seq_lens": b * n}
    ragged = is_ragged(b, n, b * n)
    # pagegen's own ops: fp8 with its table's config; bf16 over the dequantized pool (2x the KV bytes)
    spec8 = KernelSpec.from_key(SPEC_KEY)
    cfg8, src8 = explain(spec8, b, n, hk, ragged)
    out8 = torch.full_like(x["q"], float("nan"))
    record({"case": "pagegen fp8", "config": cfg8.to_dict(), "config_source": src8},
           lambda i: pagegen.paged_decode(x["q"], x["k"], x["v"], x["bt"], x["sl"], out=out8, k_scale=x["k_scale"],
                                          v_scale=x["v_scale"], **hints), bytes8)
    pool16 = [torch.nan_to_num(x[t].float() * x[sc].reshape(1, 1, -1, 1)).to(torch.bfloat16)
              for t, sc in (("k", "k_scale"), ("v", "v_scale"))]
    spec16 = KernelSpec("decode", head_dim=HEAD_DIM, block_size=PAGE, dtype="bf16", group_size=GROUP)
    cfg16, src16 = explain(spec16, b, n, hk, ragged)
    out16 = torch.full_like(x["q"], float("nan"))
    record({"case": "pagegen bf16", "config": cfg16.to_dict(), "config_source": src16},
           lambda i: pagegen.paged_decode(x["q"], *pool16, x["bt"], x["sl"], out=out16, **hints),
           bytes8 + b * n * hk * HEAD_DIM * 2)
    pool16.clear()
    # the lab kernels, base and vt at each config
    for bn, w, st in (TUNED, *NEIGHBOURS):
        cfg = Config(bn, w, st, split)
        outs = {}
        for variant in KERNELS:
            o = torch.full_like(x["q"], float("nan"))
            try:
                launch = launch_of(variant, cfg, x, o, n)
            except Exception as exc:
                launch = exc
            row = record({"case": variant, "config": cfg.label()},
                         launch if callable(launch) else _raiser(launch), bytes8)
            if "us" in row:
                outs[variant] = o.float()
        if len(outs) == 2:
            row["max_abs_vs_base"] = float((outs["vt"] - outs["base"]).abs().max())
    summarize(rows)
    return rows


def _raiser(exc: BaseException) -> Any:
    def fn(i: int) -> None:
        raise exc

    return fn


def fmt_row(r: dict[str, Any]) -> str:
    head = f"{r['shape']:<9} {r['case']:<13} {str(r.get('config')):<13}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    pct = f"{r['pct_copy']:.1f}%" if r.get("pct_copy") else "-"
    err = f"rel {r['rel_err']:.2e}" if "rel_err" in r else ""
    return f"{head} {r['us']:9.1f} us {r['gbps']:8.1f} GB/s {pct:>6} {err}"


def summarize(rows: list[dict[str, Any]]) -> None:
    """One shape's rows: vt / base at each config (speedup_vs_base), base/vt/pagegen fp8 against pagegen bf16
    (speedup_vs_bf16, the tokens/s ratio); prints the best of base and of vt."""
    mine = [r for r in rows if "us" in r]
    by = {(r["case"], str(r["config"])): r["us"] for r in mine}
    bf16 = next((r["us"] for r in mine if r["case"] == "pagegen bf16"), None)
    for r in mine:
        if r["case"] == "vt" and ("base", r["config"]) in by:
            r["speedup_vs_base"] = by[("base", r["config"])] / r["us"]
        if bf16 and r["case"] in ("base", "vt", "pagegen fp8"):
            r["speedup_vs_bf16"] = bf16 / r["us"]
    best = {c: min((r for r in mine if r["case"] == c), key=lambda r: r["us"], default=None) for c in KERNELS}
    line = [f"{c} best {r['config']} {r['us']:.1f} us ({r.get('pct_copy') or 0:.1f}% copy, "
            f"{r.get('speedup_vs_bf16', 0):.2f}x bf16)" for c, r in best.items() if r]
    print(f"== {rows[0]['shape'] if rows else '?'}: " + "; ".join(line), flush=True)


def stale() -> bool:
    """Whether today's render of SPEC_KEY differs from the frozen base (its lab header aside)."""
    from pagegen.codegen import render
    from pagegen.spec import KernelSpec

    frozen = (HERE / f"{KERNELS['base']}.py").read_text()
    frozen = frozen[frozen.index("# Generated by pagegen"):]
    return render(KernelSpec.from_key(SPEC_KEY)) != frozen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="interpreter: base and vt against the reference")
    mode.add_argument("--inspect", action="store_true", help="compile base and vt for sm_90 (CPU)")
    mode.add_argument("--gpu", action="store_true", help="time base vs vt on the GPU")
    mode.add_argument("--stale", action="store_true", help="does today's render still equal the frozen base?")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: tiny shapes in the interpreter")
    ap.add_argument("--config", action="append", default=[], metavar="BN/W/ST/SPLIT",
                    help="--inspect: only these configs (repeatable; default the tuned one and its neighbours)")
    ap.add_argument("--json", type=Path, help="--inspect: write the reports here")
    ap.add_argument("--dump", type=Path, help="--inspect: write PTX, SASS and the loop's SASS here")
    ap.add_argument("--out", help="--gpu: the JSON path or folder (default bench/results/)")
    args = ap.parse_args()
    if args.check:
        rows = check()
        for r in rows:
            print(json.dumps(r))
        return 0 if all(r["rel_base"] < TOL and r["rel_vt"] < TOL for r in rows) else 1
    if args.inspect:
        if interpreting():
            sys.exit("run --inspect with TRITON_INTERPRET unset: the interpreter's functions cannot be compiled")
        configs = [Config(*(int(v) for v in c.split("/"))) for c in args.config] or \
            [Config(*TUNED, 4096)] + [Config(*c, 4096) for c in NEIGHBOURS]
        rows = inspect_all(configs, args.dump)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    if args.gpu:
        return gpu(args.out, args.smoke)
    is_stale = stale()
    print("stale: today's render differs from the frozen base" if is_stale else "fresh: the base is today's render")
    return int(is_stale)


if __name__ == "__main__":
    sys.exit(main())
