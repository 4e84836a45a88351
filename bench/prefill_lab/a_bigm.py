"""a_bigm: 256 rows a program (64 tokens x 4 heads): each gathered K/V tile serves twice the rows.

Same source as v0 (the kernel takes any BLOCK_M); only the launch config changes, beyond today's
spec.BLOCK_M_VALUES (<= 128). 16 warps keep the per-thread accumulator the size v0 has at 8 warps,
but cap a thread at 128 registers (64K per SM / 512 threads): read the spills in inspect_sass.py.
"""

from __future__ import annotations

from _rendered_extend_bs16 import extend_kernel  # noqa: F401  (the entry point, found by KERNEL)
from common import BASE_ARG_TYPES, base_constexprs, base_launch

KERNEL = "extend_kernel"
ARG_TYPES = BASE_ARG_TYPES
CONFIGS = [{"block_m": 256, "block_n": 64, "num_warps": 16, "num_stages": 4},
           {"block_m": 256, "block_n": 128, "num_warps": 16, "num_stages": 3}]
POOL_PAGE = 16
INTERPRET = True
PREDICTION = ("+10-20% if it does not spill (half the K/V gathers and block-table reads per FLOP, the "
              "FA3 tile height); a loss if 16 warps x 128 registers spill")
constexprs = base_constexprs


def launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, max_q_len, cfg):
    return base_launch(extend_kernel, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale,
                max_q_len, cfg)
