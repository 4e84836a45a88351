"""End-to-end serving benchmark, naive contiguous-slab server vs pagegen: the command-line entry.

The code lives in the package bench/serving/ (model, trace, stats, naive and paged engines, checks,
report, run; its __init__ says what each holds). This file keeps `python bench/serving.py ...` and
loaders that import bench/serving.py by path working; it re-exports the package's public names.

  CPU smoke (tiny model, interpreter, seconds):  python bench/serving.py --smoke
  GPU (~1B bf16 model, 4 GiB of KV, a few minutes):  python bench/serving.py   (= python -m bench.serving)
  fp8 KV pool against bf16 of the same bytes:  python bench/serving.py [--smoke] --kv-dtype fp8_e4m3
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)  # run from a checkout without installing pagegen

from bench.serving import *  # noqa: E402, F403
from bench.serving import __all__, main  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
