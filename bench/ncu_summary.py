"""One table from bench/ncu_profile.sh's reports: a row per profiled kernel of each case.

    python bench/ncu_summary.py DIR [--json OUT.json]

DIR holds <case>.txt files (ncu --csv --page details, mixed with the case's own stdout). Per kernel:
duration, DRAM throughput (% of peak and GB/s), SM throughput, L2 hit rate, registers a thread, achieved
occupancy, cycles between a warp's issued instructions, the share of them stalled on L1TEX (global
memory) scoreboards, and the busiest pipeline ncu names (tensor pipes for the matmul-bound extend).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

METRICS = {  # column -> (section, metric name)
    "us": ("GPU Speed Of Light Throughput", "Duration"),
    "dram_pct": ("GPU Speed Of Light Throughput", "DRAM Throughput"),
    "sm_pct": ("GPU Speed Of Light Throughput", "Compute (SM) Throughput"),
    "mem_Bps": ("Memory Workload Analysis", "Memory Throughput"),
    "l2_hit_pct": ("Memory Workload Analysis", "L2 Hit Rate"),
    "regs": ("Launch Statistics", "Registers Per Thread"),
    "smem_B": ("Launch Statistics", "Dynamic Shared Memory Per Block"),
    "occ_pct": ("Occupancy", "Achieved Occupancy"),
    "cpi": ("Warp State Statistics", "Warp Cycles Per Issued Instruction"),
    "spills": ("Memory Workload Analysis", "Local Memory Spilling Requests"),
}
STALL = re.compile(r"spends ([\d.]+) cycles being stalled (.*?)\. .*?represents about ([\d.]+)% of the total")
PIPE = re.compile(r"(\S+(?: \S+)?) is the highest-utilized pipeline \(([\d.]+)%\)")


def number(text: str) -> float | str:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text


def parse(path: Path) -> list[dict]:
    """The kernels of one report, in launch order: {case, kernel, grid, block, metric columns, stall, pipe}."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith('"')]
    kernels: dict[str, dict] = {}
    header = None
    for row in csv.reader(lines):
        if row[0] == "ID":
            header = row
            continue
        if header is None:
            continue
        r = dict(zip(header, row, strict=False))
        k = kernels.setdefault(r["ID"], {"case": path.stem, "kernel": r["Kernel Name"][:48], "grid": r["Grid Size"],
                                         "block": r["Block Size"]})
        for col, (section, metric) in METRICS.items():
            if r["Section Name"] == section and r["Metric Name"] == metric:
                k[col] = number(r["Metric Value"])
        desc = r.get("Rule Description", "")
        if (m := STALL.search(desc)) and "stall" not in k:
            k["stall"] = f"{m.group(3)}% {m.group(2)[:40]}"
        if (m := PIPE.search(desc)) and "pipe" not in k:
            k["pipe"] = f"{m.group(1)} {m.group(2)}%"
    for k in kernels.values():
        if isinstance(k.get("us"), float):
            k["us"] /= 1000.0  # ncu reports ns
        if isinstance(k.get("mem_Bps"), float):
            k["mem_GBps"] = round(k.pop("mem_Bps") / 1e9, 1)
    return list(kernels.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = [k for p in sorted(args.dir.glob("*.txt")) for k in parse(p)]
    if not rows:
        print(f"no ncu reports in {args.dir}", file=sys.stderr)
        return 1
    cols = ("us", "dram_pct", "mem_GBps", "sm_pct", "l2_hit_pct", "regs", "occ_pct", "cpi")
    print(f"{'case':42} {'kernel':24} {'grid':>14} " + " ".join(f"{c:>9}" for c in cols) + "  stall / pipe")
    for k in rows:
        vals = " ".join(f"{k.get(c, ''):>9.1f}" if isinstance(k.get(c), float) else f"{k.get(c, ''):>9}" for c in cols)
        print(f"{k['case'][:42]:42} {k['kernel'][:24]:24} {k['grid']:>14} {vals}  {k.get('stall', '')}; "
              f"{k.get('pipe', '')}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
