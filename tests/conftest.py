"""Shared fixtures. Tests run kernels on the CPU in Triton's interpreter unless
PAGEGEN_TEST_DEVICE=cuda, which runs the same checks compiled on the GPU."""

from __future__ import annotations

import os

TEST_DEVICE = os.environ.get("PAGEGEN_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere
os.environ.setdefault("PAGEGEN_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "pagegen"))

import pytest  # noqa: E402
import torch  # noqa: E402

from pagegen.spec import next_pow2  # noqa: E402


def pytest_configure(config):
    from pagegen._checks import interpreter_problem

    problem = interpreter_problem()
    if TEST_DEVICE == "cpu" and problem:  # every kernel test would fail with an obscure error
        pytest.exit(f"pagegen tests: {problem}", returncode=4)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA (run with PAGEGEN_TEST_DEVICE=cuda on a GPU)")
    if TEST_DEVICE != "cuda" or not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: cpu (interpreter) or cuda (compiled)."""
    return TEST_DEVICE


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_paged_kv(
    seq_lens: list[int],
    kv_heads: int,
    head_dim: int,
    block_size: int,
    layout: str,
    dtype: torch.dtype,
    device: str,
    extra_blocks: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V pools with each sequence's pages at shuffled physical blocks.

    Returns (k_cache, v_cache, block_tables [B, max_blocks] int32, seq_lens [B] int32); unused
    table entries point at random blocks, so a kernel reading past seq_len would see garbage.
    """
    n_blocks = [-(-n // block_size) for n in seq_lens]
    width = max(1, max(n_blocks))
    total = sum(n_blocks) + extra_blocks
    shape = (total, block_size, kv_heads, head_dim) if layout == "NHD" else (total, kv_heads, block_size, head_dim)
    k = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    perm = torch.randperm(total, generator=generator)
    tables = torch.randint(0, total, (len(seq_lens), width), generator=generator, dtype=torch.int32)
    pos = 0
    for i, nb in enumerate(n_blocks):
        tables[i, :nb] = perm[pos : pos + nb].int()
        pos += nb
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return k.to(device), v.to(device), tables.to(device), lens.to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives inf)."""
    out = out.double().cpu()
    ref = ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

__all__ = ["DTYPES", "TOL", "make_paged_kv", "next_pow2", "rel_err"]
