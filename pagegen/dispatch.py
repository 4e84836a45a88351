"""Config selection for the public ops: the live GPU's tuned table, else the heuristic default.

The hot path reads only host-side values (shapes, never device tensors), so it never syncs.
"""

from __future__ import annotations

from pagegen.spec import Config, KernelSpec, default_config


def select_config(spec: KernelSpec, batch: int, max_ctx: int, kv_heads: int = 1) -> Config:
    """Config for `spec` at a workload of `batch` sequences of up to `max_ctx` tokens."""
    return default_config(spec)
