"""What the compiler makes of a decode config on sm_90, with no GPU: registers, spills, shared memory,
the K/V load instructions, tensor-core instructions, fp8 conversions and exp2s of one key tile, and
the bytes a config keeps in flight per SM (occupancy x pipelined tiles x tile bytes).

Compiles `decode_kernel` of a spec (pagegen.compile_check, Triton's bundled ptxas) and reads:
- ptxas -v: registers, spill bytes; the CompiledKernel's metadata: shared memory;
- the PTX and the SASS (`cuobjdump -sass` bundled with Triton) of the key loop: the body of the
  longest backward branch that holds the tensor-core instructions (one BLOCK_N tile a trip; with
  Q_LEN == 1 the decode kernel has one key loop), counted per instruction kind (per thread in PTX,
  per warp in SASS: a warp executes each static SASS instruction once a trip);
- occupancy from the H100/H200 SM limits (65536 registers, 228 KB shared memory with 1 KB reserved
  a block, 64 warps, 32 blocks), and bytes in flight = resident programs x K/V tiles in flight x
  BLOCK_N x HEAD_DIM x 2 x elem bytes, where tiles in flight come from the loop's
  `cp.async.wait_group N` over the loop's `commit_group`s a trip (K, V, next block-table entries):
  N / commits tiles stay in flight while a tile is computed (0 at 3 stages for the gathered loads:
  the next tile is issued at the end of a trip and waited for at the top of the next), one more
  at the wait.

Usage (TRITON_INTERPRET must be unset; one JSON object a case on stdout, a table on stderr):
    PYTHONPATH=$PWD python bench/inspect_decode.py --cases gaps|what-if|all [--dump DIR]
    PYTHONPATH=$PWD python bench/inspect_decode.py --case \
        '{"head_dim": 96, "group": 1, "block_n": 128, "warps": 4, "stages": 3, "split": 0}'
A case: head_dim, group, block_n, warps, stages, split; optional block_size (16), layout (NHD),
kv_dtype (bf16), dtype (bf16), label, and grid = [batch, kv_heads, ctx] to count resident programs
(min of occupancy and programs the grid gives an SM). --dump DIR writes each case's PTX and SASS.
Another Triton (e.g. the GPU image's 3.6): unpack its wheel into DIR and put DIR first on PYTHONPATH;
its own ptxas and cuobjdump are then used. Stages past Config's NUM_STAGES_VALUES compile here too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SM_COUNT = 132  # H200 (and H100 SXM)
SM_REGS = 65536
SM_SHARED = 233472  # 228 KB a SM
BLOCK_RESERVED_SHARED = 1024  # the driver reserves 1 KB of shared memory a block (cc 9.0)
SM_WARPS = 64
SM_BLOCKS = 32
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}
TRITON_POOL = {"bf16": "*bf16", "fp16": "*fp16", "fp8_e4m3": "*fp8e4nv", "fp8_e5m2": "*fp8e5"}

# the named cases of the H200 gaps (issue 13: named models; issue 16: fp8); grid = [batch, kv_heads, ctx]
GAPS: list[dict[str, Any]] = [
    # Phi-3-mini: hd 96 (padded to 128), 32 KV heads, group 1
    dict(label="phi3 32x8192 tuned", head_dim=96, group=1, block_n=128, warps=4, stages=3, split=4096,
         grid=[32, 32, 8192]),
    dict(label="phi3 128x2048 bench", head_dim=96, group=1, block_n=128, warps=4, stages=3, split=0,
         grid=[128, 32, 2048]),
    dict(label="phi3 128x2048 table", head_dim=96, group=1, block_n=64, warps=4, stages=2, split=2048,
         grid=[128, 32, 2048]),
    # Llama-3.2-1B: hd 64, 8 KV heads, group 4
    dict(label="l1b 32x8192 tuned", head_dim=64, group=4, block_n=128, warps=4, stages=3, split=4096,
         grid=[32, 8, 8192]),
    dict(label="l1b 128x2048 tuned", head_dim=64, group=4, block_n=16, warps=2, stages=5, split=8192,
         grid=[128, 8, 2048]),
    # Llama-3-70B on 8-way TP: hd 128, 1 KV head, group 8
    dict(label="l70b 128x2048 tuned", head_dim=128, group=8, block_n=128, warps=4, stages=3, split=1024,
         grid=[128, 1, 2048]),
    dict(label="l70b 32x8192 table", head_dim=128, group=8, block_n=64, warps=2, stages=3, split=512,
         grid=[32, 1, 8192]),
    # reference: Llama-3-8B (hd 128, group 4) at 96-98% of copy, for contrast
    dict(label="l8b 32x8192 tuned", head_dim=128, group=4, block_n=128, warps=4, stages=3, split=0,
         grid=[32, 8, 8192]),
    dict(label="l8b 128x4096 tuned", head_dim=128, group=4, block_n=128, warps=4, stages=3, split=2048,
         grid=[128, 8, 4096]),
    # fp8 e4m3 reference spec (hd 128, group 4): heuristic, tuned winner, and the bf16 winner beside it
    dict(label="fp8 128x4096 heuristic", kv_dtype="fp8_e4m3", head_dim=128, group=4, block_n=128, warps=4,
         stages=3, split=0, grid=[128, 8, 4096]),
    dict(label="fp8 128x4096 tuned", kv_dtype="fp8_e4m3", head_dim=128, group=4, block_n=32, warps=1, stages=5,
         split=4096, grid=[128, 8, 4096]),
    dict(label="fp8 32x8192 tuned", kv_dtype="fp8_e4m3", head_dim=128, group=4, block_n=32, warps=1, stages=5,
         split=1024, grid=[32, 8, 8192]),
    dict(label="bf16 128x4096 tuned", head_dim=128, group=4, block_n=128, warps=4, stages=3, split=2048,
         grid=[128, 8, 4096]),
]
# what-ifs: configs outside today's winners (stages 6-8 are outside NUM_STAGES_VALUES; compiled directly)
WHAT_IF: list[dict[str, Any]] = [
    dict(label="phi3 128/4/5", head_dim=96, group=1, block_n=128, warps=4, stages=5, split=0, grid=[128, 32, 2048]),
    dict(label="phi3 64/4/5", head_dim=96, group=1, block_n=64, warps=4, stages=5, split=0, grid=[128, 32, 2048]),
    dict(label="phi3 64/2/5", head_dim=96, group=1, block_n=64, warps=2, stages=5, split=0, grid=[128, 32, 2048]),
    dict(label="phi3 HND 128/4/3", head_dim=96, group=1, block_n=128, warps=4, stages=3, split=0, layout="HND",
         grid=[128, 32, 2048]),
    dict(label="l1b HND 128/4/3 s4096", head_dim=64, group=4, block_n=128, warps=4, stages=3, split=4096,
         layout="HND", grid=[32, 8, 8192]),
    dict(label="l1b 64/2/5 s2048", head_dim=64, group=4, block_n=64, warps=2, stages=5, split=2048,
         grid=[32, 8, 8192]),
    dict(label="l1b 64/2/5 s1024", head_dim=64, group=4, block_n=64, warps=2, stages=5, split=1024,
         grid=[128, 8, 2048]),
    dict(label="l1b 128/4/5", head_dim=64, group=4, block_n=128, warps=4, stages=5, split=0, grid=[128, 8, 2048]),
    dict(label="l1b 64/2/5", head_dim=64, group=4, block_n=64, warps=2, stages=5, split=0, grid=[128, 8, 2048]),
    dict(label="l70b 128/4/5 s512", head_dim=128, group=8, block_n=128, warps=4, stages=5, split=512,
         grid=[128, 1, 2048]),
    dict(label="l70b 64/2/5 s256", head_dim=128, group=8, block_n=64, warps=2, stages=5, split=256,
         grid=[128, 1, 2048]),
] + [
    dict(label=f"fp8 {bn}/{w}/{st}", kv_dtype="fp8_e4m3", head_dim=128, group=4, block_n=bn, warps=w, stages=st,
         split=4096, grid=[128, 8, 4096])
    for bn, w, st in [(32, 1, 6), (32, 1, 8), (64, 1, 5), (64, 2, 5), (64, 2, 8), (128, 2, 5), (128, 4, 5),
                      (16, 1, 8)]
]


def _ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        found = get_ptxas(90)
    except TypeError:  # older triton: no arch argument
        found = get_ptxas()
    return str(getattr(found, "path", found))


def sass_of(cubin: bytes) -> str:
    """SASS text of a cubin, from the cuobjdump bundled with Triton ('' when there is none)."""
    tool = Path(_ptxas_path()).with_name("cuobjdump")
    if not tool.exists():
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), "-sass", str(path)], capture_output=True, text=True, check=True).stdout


def loop_body(lines: list[str], label_re: str, branch_re: str, marker: str, hex_labels: bool = False) -> list[str]:
    """Lines of the longest backward-branch loop (label .. branch back to it) that contains `marker`.
    hex_labels: labels are SASS addresses (compared as numbers: /*7880*/ is the target of BRA 0x7880)."""
    def key(label: str) -> str | int:
        return int(label, 16) if hex_labels else label

    where = {}
    for i, line in enumerate(lines):
        m = re.match(label_re, line)
        if m:
            where[key(m.group(1))] = i
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(branch_re, line)
        if m and key(m.group(1)) in where and where[key(m.group(1))] < i:
            body = lines[where[key(m.group(1))]:i + 1]
            if any(marker in x for x in body) and len(body) > len(best):
                best = body
    return best


PTX_KINDS = {  # name -> regex on a PTX instruction line (per thread)
    "cp.async 16B": r"cp\.async\.c[ag]\.shared\.global.*\], 0x10",
    "cp.async 8B": r"cp\.async\.c[ag]\.shared\.global.*\], 0x8",
    "cp.async 4B": r"cp\.async\.c[ag]\.shared\.global.*\], 0x4",
    "commit_group": r"cp\.async\.commit_group",
    "ld.global.v4": r"ld\.global\S*\.v4\.",
    "ld.global.v2": r"ld\.global\S*\.v2\.",
    "ld.global scalar": r"ld\.global(?!\S*\.v[24]\.)",
    "ldmatrix": r"ldmatrix",
    "ld.shared": r"ld\.shared",
    "mma.sync": r"mma\.sync",
    "wgmma": r"wgmma\.mma_async",
    "cvt fp8->f16x2": r"cvt\.rn\.f16x2\.e[45]m[23]x2",
    "cvt f16->bf16/f32": r"cvt\.(rn\.bf16\.f16|f32\.f16)",
    "cvt other": r"cvt\.(?!rn\.f16x2\.e[45]m[23]x2)(?!rn\.bf16\.f16)(?!f32\.f16)",
    "ex2": r"ex2\.approx",
    "wait_group": r"cp\.async\.wait_group",
}
SASS_KINDS = {  # name -> regex on a SASS instruction line (per warp)
    "LDGSTS.128": r"LDGSTS\.E\.BYPASS\.LTC128B\.128|LDGSTS\S*\.128",
    "LDGSTS.64": r"LDGSTS\S*\.64",
    "LDGSTS.32": r"LDGSTS(?!\S*\.(128|64))",
    "LDG.128": r"\bLDG\.\S*128",
    "LDG.64": r"\bLDG\.\S*64",
    "LDG other": r"\bLDG\.(?!\S*(128|64))",
    "LDSM": r"LDSM",
    "LDS": r"\bLDS(?!M)",
    "HMMA": r"HMMA",
    "HGMMA": r"HGMMA",
    "F2FP": r"F2FP",
    "F2F": r"\bF2F\.",
    "PRMT": r"PRMT",
    "MUFU.EX2": r"MUFU\.EX2",
    "BAR": r"\bBAR\.",
}


def count(lines: list[str], kinds: dict[str, str]) -> dict[str, int]:
    """How many lines match each kind's regex."""
    return {name: sum(1 for x in lines if re.search(rx, x)) for name, rx in kinds.items()}


def occupancy(regs: int, warps: int, shared: int) -> dict[str, int]:
    """Resident programs an SM by registers, shared memory, warps and blocks (cc 9.0 limits).
    Registers are allocated per warp in units of 256 (a thread's count rounded up to 8)."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = SM_REGS // (per_warp * warps)
    by_shared = SM_SHARED // (shared + BLOCK_RESERVED_SHARED)
    by_warps = SM_WARPS // warps
    return {"by_regs": by_regs, "by_shared": by_shared, "by_warps": by_warps,
            "programs": min(by_regs, by_shared, by_warps, SM_BLOCKS)}


def inspect(case: dict[str, Any], dump: Path | None = None) -> dict[str, Any]:
    """Compile one case for sm_90 and return its report (see the module docstring)."""
    from pagegen.compile_check import compile_for_target, load_jit_module, ptxas_report
    from pagegen.spec import KernelSpec

    kv = case.get("kv_dtype", "bf16")
    dtype = case.get("dtype", "bf16")
    spec = KernelSpec("decode", head_dim=case["head_dim"], block_size=case.get("block_size", 16),
                      layout=case.get("layout", "NHD"), dtype=dtype, kv_dtype=kv, group_size=case["group"])
    types = {"q_ptr": "*" + dtype, "k_ptr": TRITON_POOL[kv], "v_ptr": TRITON_POOL[kv], "out_ptr": "*" + dtype,
             "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
             "qk_scale": "fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32"}
    consts = {"BLOCK_N": case["block_n"], "SPLIT_SIZE": case["split"], "DOT_FP32": False}
    kernel = compile_for_target(load_jit_module(spec).decode_kernel, types, consts, num_warps=case["warps"],
                                num_stages=case["stages"], no_divisibility=("stride_ks", "stride_vs"))
    ptx = kernel.asm["ptx"]
    sass = sass_of(kernel.asm["cubin"])
    rep: dict[str, Any] = {"label": case.get("label", spec.variant_key()), "spec": spec.variant_key(),
                           "config": {k: case[k] for k in ("block_n", "warps", "stages", "split")}}
    rep.update(ptxas_report(kernel))
    rep["shared"] = int(kernel.metadata.shared)
    ptx_lines = [x.strip() for x in ptx.splitlines()]
    body = loop_body(ptx_lines, r"^(\$L__BB\d+_\d+):", r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", "mma")
    rep["ptx_loop"] = count(body, PTX_KINDS)
    rep["ptx_loop"]["lines"] = len(body)
    waits = [int(m) for x in body for m in re.findall(r"cp\.async\.wait_group\s+(\d+)", x)]
    rep["ptx_loop"]["wait_group_n"] = waits
    rep["ptx_total"] = count(ptx_lines, PTX_KINDS)
    if sass:
        sass_lines = [x for x in sass.splitlines() if re.search(r"^\s*/\*[0-9a-f]{4,6}\*/", x)]
        sbody = loop_body(sass_lines, r"^\s*/\*([0-9a-f]{4,6})\*/", r"BRA\s+0x([0-9a-f]+)", "MMA", hex_labels=True)
        rep["sass_loop"] = count(sbody, SASS_KINDS)
        rep["sass_loop"]["instructions"] = len(sbody)
    # -- bytes in flight: the loop waits with `cp.async.wait_group N` for the oldest tile; N groups stay
    # outstanding (K, V and the next block-table entries are one group each, `commit_group`s a trip) --
    elem = ELEM_BYTES[kv]
    tile_bytes = case["block_n"] * case["head_dim"] * 2 * elem  # K + V of one tile, real head_dim only
    commits = max(rep["ptx_loop"]["commit_group"], 1)
    prefetch = (min(waits) // commits) if waits else 0  # tiles in flight while tile i is computed
    occ = occupancy(rep["registers"], case["warps"], rep["shared"])
    rep["occupancy"] = occ
    rep["tile_bytes"] = tile_bytes
    rep["prefetch_tiles"] = prefetch
    programs = occ["programs"]
    if "grid" in case:
        batch, kv_heads, ctx = case["grid"]
        splits = math.ceil(ctx / case["split"]) if case["split"] else 1
        total = batch * kv_heads * splits
        rep["grid_programs"] = total
        rep["grid_per_sm"] = round(total / SM_COUNT, 2)
        rep["waves"] = round(total / (SM_COUNT * programs), 2)
        rep["tiles_per_program"] = math.ceil(min(ctx, case["split"] or ctx) / case["block_n"])
        programs = min(programs, math.ceil(total / SM_COUNT))
        # what DRAM sees: contiguous bytes a program reads per piece, and the stride between its pieces
        page = case.get("block_size", 16)
        if case.get("layout", "NHD") == "NHD":  # one token of one KV head; next token kv_heads rows on
            rep["piece_bytes"], rep["piece_stride"] = case["head_dim"] * elem, kv_heads * case["head_dim"] * elem
        else:  # one page of one KV head is contiguous
            rep["piece_bytes"] = page * case["head_dim"] * elem
            rep["piece_stride"] = kv_heads * page * case["head_dim"] * elem
    rep["resident_programs"] = programs
    # while computing tile i a program has `prefetch` tiles in flight; at its wait, prefetch + 1
    rep["bytes_in_flight_per_sm_compute"] = programs * prefetch * tile_bytes
    rep["bytes_in_flight_per_sm_peak"] = programs * (prefetch + 1) * tile_bytes
    loop_instr = rep.get("sass_loop", {}).get("instructions", 0)
    # SASS instructions a warp issues per KV byte, times warps: issue cost of a byte for the SM
    rep["sass_instr_per_kv_byte"] = round(loop_instr * case["warps"] / tile_bytes, 4)
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", rep["label"])
        (dump / f"{name}.ptx").write_text(ptx)
        (dump / f"{name}.sass").write_text(sass)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", choices=["gaps", "what-if", "all"], help="a named case list")
    ap.add_argument("--case", action="append", default=[], help="one case as JSON (repeatable)")
    ap.add_argument("--dump", type=Path, help="write each case's PTX and SASS here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET unset: the interpreter's functions cannot be compiled")
    named = {"gaps": GAPS, "what-if": WHAT_IF, "all": GAPS + WHAT_IF}.get(args.cases or "", [])
    cases = named + [json.loads(c) for c in args.case]
    if not cases:
        sys.exit("give --cases gaps or --case '<json>'")
    import triton

    print(f"triton {triton.__version__}, sm_90", file=sys.stderr)
    for case in cases:
        rep = inspect(case, args.dump)
        print(json.dumps(rep))
        p, s = rep["ptx_loop"], rep.get("sass_loop", {})
        print(f"{rep['label']:<24} regs {rep['registers']:>3} spill {rep['spill_bytes']} shared {rep['shared']:>6} "
              f"occ {rep['occupancy']['programs']} (grid/SM {rep.get('grid_per_sm', '-')}) "
              f"prefetch {rep['prefetch_tiles']} x {rep['tile_bytes']} B x {rep['resident_programs']} -> "
              f"{rep['bytes_in_flight_per_sm_compute']}/{rep['bytes_in_flight_per_sm_peak']} B/SM "
              f"instr/B {rep['sass_instr_per_kv_byte']} | "
              f"ptx cp16 {p['cp.async 16B']} cp8 {p['cp.async 8B']} cp4 {p['cp.async 4B']} mma {p['mma.sync']} "
              f"wgmma {p['wgmma']} cvt8 {p['cvt fp8->f16x2']} ex2 {p['ex2']} | sass {s}", file=sys.stderr)


if __name__ == "__main__":
    main()
