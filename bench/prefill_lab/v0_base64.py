"""v0_base64: today's extend kernel rendered for pages of 64 tokens (_rendered_extend_bs64.py): the
baseline of the K/V-TMA variants, which need a tile to sit inside one page."""

from __future__ import annotations

from _rendered_extend_bs64 import extend_kernel  # noqa: F401  (the entry point, found by KERNEL)
from common import BASE_ARG_TYPES, base_constexprs, base_launch

KERNEL = "extend_kernel"
ARG_TYPES = BASE_ARG_TYPES
CONFIGS = [{"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 5},
           {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 5}]
POOL_PAGE = 64
INTERPRET = True
PREDICTION = "within 5% of v0_base (page 16): the gather costs the same per 16-byte cp.async"
constexprs = base_constexprs


def launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, max_q_len, cfg):
    return base_launch(extend_kernel, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale,
                max_q_len, cfg)
