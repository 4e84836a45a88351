"""What the compiler emits for a lab variant, on a machine without a GPU (sm_90, Triton's own ptxas).

For each variant module and each of its configs: registers, spill bytes, stack frame (ptxas -v),
static shared memory (Triton's metadata), and counts of the Hopper instructions that decide the
speed of a matrix-bound kernel, read from the PTX and from the SASS (cuobjdump from Triton's wheel):
  HGMMA (wgmma.mma_async)  warpgroup matrix multiply; HMMA is the pre-Hopper path
  UTMALDG (cp.async.bulk.tensor)  TMA tile loads; LDGSTS (cp.async) per-thread async copies
  LDL/STL  local-memory (spill) traffic; WARPSYNC/BAR  barriers; MUFU.EX2  exp2

    python bench/prefill_lab/inspect_sass.py [v0_base a_bigm ...] [--json out.json] [--sass-dir dir]

Run with TRITON_INTERPRET unset. Each variant module gives `KERNEL` (name of its @triton.jit
function), `ARG_TYPES` (Triton type strings of its pointer/float args), `CONFIGS` (launch dicts) and
`constexprs(cfg)` (the constexpr values a launch passes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "0"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import triton  # noqa: E402

from pagegen.compile_check import compile_for_target, ptxas_report  # noqa: E402

SASS_OPS = ("HGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "LDGDEPBAR", "SYNCS", "LDL", "STL", "MUFU.EX2",
            "BAR.SYNC", "WARPGROUP.ARRIVE", "SETMAXNREG", "USETMAXREG")
PTX_OPS = ("wgmma.mma_async", "mma.sync", "cp.async.bulk.tensor", "cp.async.ca", "cp.async.cg", "mbarrier",
           "setmaxnreg", "ex2.approx")


def sass_of(cubin: bytes) -> str:
    """SASS text of a cubin, via the cuobjdump that Triton's wheel carries ('' if it has none)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), "--dump-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def count_sass(sass: str) -> dict[str, int]:
    """Instruction counts by opcode prefix (static, not dynamic: a loop body counts once)."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    out = {}
    for name in SASS_OPS:
        out[name] = sum(1 for o in ops if o == name or o.startswith(name + "."))
    return out


def count_ptx(ptx: str) -> dict[str, int]:
    return {name: ptx.count(name) for name in PTX_OPS}


def inspect_variant(name: str, sass_dir: Path | None = None) -> list[dict[str, Any]]:
    """Compile every config of variant module `name` for sm_90 and report what it emits."""
    mod = importlib.import_module(name)
    fn = getattr(mod, mod.KERNEL)
    rows = []
    for cfg in mod.CONFIGS:
        row: dict[str, Any] = {"variant": name, "config": cfg}
        t0 = time.time()
        try:
            kernel = compile_for_target(fn, mod.ARG_TYPES, mod.constexprs(cfg), num_warps=cfg["num_warps"],
                                        num_stages=cfg["num_stages"])
            row.update(ptxas_report(kernel))
            row["shared_bytes"] = int(kernel.metadata.shared)
            row["ptx"] = count_ptx(kernel.asm["ptx"])
            sass = sass_of(kernel.asm["cubin"])
            row["sass"] = count_sass(sass)
            if sass_dir is not None:
                sass_dir.mkdir(parents=True, exist_ok=True)
                tag = "_".join(f"{k}{v}" for k, v in cfg.items())
                (sass_dir / f"{name}_{tag}.sass").write_text(sass)
                (sass_dir / f"{name}_{tag}.ptx").write_text(kernel.asm["ptx"])
        except Exception as exc:  # a variant that does not compile is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        row["compile_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=[])
    ap.add_argument("--json", default="")
    ap.add_argument("--sass-dir", default="")
    args = ap.parse_args()
    from variants import VARIANTS

    names = args.variants or list(VARIANTS)
    rows = []
    for name in names:
        rows.extend(inspect_variant(name, Path(args.sass_dir) if args.sass_dir else None))
    print(f"\ntriton {triton.__version__}, sm_90 (ptxas of Triton's wheel)")
    print(f"{'variant':<14}{'config':<44}{'regs':>5}{'spill':>6}{'smem':>7}{'HGMMA':>6}{'HMMA':>5}"
          f"{'UTMALDG':>8}{'LDGSTS':>7}{'LDL/STL':>8}")
    for r in rows:
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        if "error" in r:
            print(f"{r['variant']:<14}{cfg:<44}  {r['error'][:100]}")
            continue
        s = r["sass"]
        print(f"{r['variant']:<14}{cfg:<44}{r['registers']:>5}{r['spill_bytes']:>6}{r['shared_bytes']:>7}"
              f"{s['HGMMA']:>6}{s['HMMA']:>5}{s['UTMALDG']:>8}{s['LDGSTS']:>7}{s['LDL'] + s['STL']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
