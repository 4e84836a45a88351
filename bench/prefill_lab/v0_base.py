"""v0: today's extend kernel, unchanged (rendered into _rendered_extend_bs16.py): the baseline every
variant is one change away from."""

from __future__ import annotations

from _rendered_extend_bs16 import extend_kernel  # noqa: F401  (the entry point, found by KERNEL)
from common import BASE_ARG_TYPES, DEFAULT_CFG, TUNED_CFG, base_constexprs, base_launch

KERNEL = "extend_kernel"
ARG_TYPES = BASE_ARG_TYPES
CONFIGS = [DEFAULT_CFG, TUNED_CFG]
POOL_PAGE = 16
INTERPRET = True
PREDICTION = "baseline: ~300 TFLOP/s at 2048@0 and ~360 at 4608@0 on the H200 (issue 13's numbers)"
constexprs = base_constexprs


def launch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale, max_q_len, cfg):
    return base_launch(extend_kernel, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale,
                max_q_len, cfg)
