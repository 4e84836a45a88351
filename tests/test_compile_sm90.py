"""The decode kernels compile for real (sm_90, through Triton's bundled ptxas; no GPU needed):
the interpreter accepts code the compiler rejects. They must also fit in registers (no spills)
and put the packed GQA group through the tensor cores. Runs in a subprocess, because Triton
imported with TRITON_INTERPRET=1 cannot compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CASES = [
    dict(head_dim=128, block_size=16, layout="NHD", group=4, block_n=64, warps=4, stages=3, split=0),
    dict(head_dim=128, block_size=16, layout="HND", group=8, block_n=128, warps=4, stages=3, split=512),
    dict(head_dim=96, block_size=32, layout="NHD", group=7, block_n=64, warps=4, stages=2, split=1024),
    dict(head_dim=256, block_size=16, layout="NHD", group=2, block_n=32, warps=8, stages=2, split=0),
    dict(head_dim=64, block_size=1, layout="HND", group=1, block_n=128, warps=4, stages=3, split=0),
]


def test_decode_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "pagegen.compile_check", json.dumps(CASES)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reports = json.loads(r.stdout.strip().splitlines()[-1])
    for case, rep in zip(CASES, reports, strict=True):
        assert rep["spill_bytes"] == 0, (case, rep)
        assert rep["mma"], case
