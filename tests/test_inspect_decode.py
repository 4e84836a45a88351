"""bench/inspect_decode.py: the occupancy arithmetic, and the compiled facts bench/NOTES.md's H200-gap
section rests on (sm_90 through Triton's bundled ptxas, no GPU): at 3 stages the gathered K/V are not
prefetched (the loop waits for everything), at 5 stages one tile is; head_dim 96 keeps 16-byte copies.
The compile runs in a subprocess, because Triton imported with TRITON_INTERPRET=1 cannot compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.inspect_decode import loop_body, occupancy  # noqa: E402


def test_occupancy_takes_the_tightest_limit():
    # 168 registers x 128 threads: 3 programs by registers (65536 / 21504); 175 rounds to 176: only 2
    assert occupancy(168, 4, 74240) == {"by_regs": 3, "by_shared": 3, "by_warps": 16, "programs": 3}
    assert occupancy(175, 4, 74240)["programs"] == 2
    # 1-warp programs at 255 registers: 8 by registers although shared memory would allow 10
    assert occupancy(255, 1, 20736) == {"by_regs": 8, "by_shared": 10, "by_warps": 64, "programs": 8}
    assert occupancy(64, 2, 140288)["programs"] == 1  # shared memory binds


def test_loop_body_takes_the_longest_backward_loop_with_the_marker():
    lines = ["a", "L1:", "mma x", "bra L1;", "L2:", "add", "bra L2;", "bra L3;", "L3:"]
    assert loop_body(lines, r"^(L\d):", r"bra (L\d);", "mma") == ["L1:", "mma x", "bra L1;"]
    assert loop_body(lines, r"^(L\d):", r"bra (L\d);", "nothing") == []


def test_compiled_prefetch_and_vector_width():
    cases = [dict(label="hd96 3 stages", head_dim=96, group=1, block_n=128, warps=4, stages=3, split=0,
                  grid=[4, 32, 2048]),
             dict(label="hd64 5 stages", head_dim=64, group=4, block_n=64, warps=2, stages=5, split=1024)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, str(ROOT / "bench" / "inspect_decode.py")]
    for c in cases:
        args += ["--case", json.dumps(c)]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    hd96, hd64 = (json.loads(line) for line in r.stdout.strip().splitlines())
    for rep in (hd96, hd64):
        assert rep["spill_bytes"] == 0 and rep["ptx_loop"]["mma.sync"] > 0, rep
        assert rep["ptx_loop"]["commit_group"] == 3, rep  # K, V, the next block-table entries
    # 3 stages: wait for every group at the top of a trip, so nothing is in flight while computing
    assert hd96["ptx_loop"]["wait_group_n"] == [0] and hd96["prefetch_tiles"] == 0, hd96
    # hd 96 padded to 128: 32 16-byte copies a thread a 128-key tile (K and V), none narrower for K/V
    # (the one 4-byte copy is the block-table entry)
    assert hd96["ptx_loop"]["cp.async 16B"] == 32 and hd96["ptx_loop"]["cp.async 8B"] == 0, hd96
    assert hd96["tile_bytes"] == 128 * 96 * 2 * 2 and hd96["piece_bytes"] == 192, hd96
    # 5 stages: 3 groups (one tile) stay in flight while a tile is computed
    assert hd64["ptx_loop"]["wait_group_n"] == [3] and hd64["prefetch_tiles"] == 1, hd64
