"""f_occupancy: two programs on each SM (64 rows, one warpgroup of 4 warps each) instead of one.

Same source as v0; only the launch config changes. v0's 128 x 128 tile at 8 warps uses 255 registers
x 256 threads and 230 KB of shared memory: one program an SM, whose two warpgroups run the softmax
(MUFU exp2) at the same time, so the tensor cores wait. Two independent programs on one SM let the
warp schedulers overlap one program's softmax with the other's wgmma: the ping-pong FlashAttention-3
arranges by hand, here by occupancy. Costs: each K/V tile now serves 64 rows (twice the gathers a FLOP).
Shared memory must stay under ~113 KB a program (inspect_sass.py shows it).
"""

from __future__ import annotations

from _rendered_extend_bs16 import extend_kernel  # noqa: F401  (the entry point, found by KERNEL)
from common import BASE_ARG_TYPES, base_constexprs, base_launch

KERNEL = "extend_kernel"
ARG_TYPES = BASE_ARG_TYPES
CONFIGS = [{"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 5},
           {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 4}]
POOL_PAGE = 16
INTERPRET = True
PREDICTION = ("+10-25% at 2048@0 and 4608@0 if two programs fit an SM and the L2->SM gathers keep up "
              "(softmax overlapped with the other program's wgmma); a loss if the doubled gathers bind first")
constexprs = base_constexprs


def launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, max_q_len, cfg):
    return base_launch(extend_kernel, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale,
                       max_q_len, cfg)
