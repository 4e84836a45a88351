"""pagegen.gpu: device name -> key, the interpreter pseudo-device, SM count."""

from __future__ import annotations

import pytest
import torch

from pagegen import gpu as G


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H100 NVL", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "gh200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100-PCIE-40GB", "a100"),
        ("NVIDIA A10G", "a10g"),
        ("NVIDIA A10", "a10"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L40", "l40"),
        ("NVIDIA L4", "l4"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 3080 Ti", "rtx3080ti"),
        ("NVIDIA RTX A6000", "rtxa6000"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx6000ada"),
        ("AMD Instinct MI300X", "mi300x"),
        ("Some New Accelerator 9", "some_new_accelerator_9"),
    ],
)
def test_gpu_key(name: str, key: str) -> None:
    assert G.gpu_key(name) == key
    assert G.valid_key(G.gpu_key(name))


def test_gpu_key_rejects_empty() -> None:
    with pytest.raises(ValueError, match="gpu name"):
        G.gpu_key("  ")


def test_valid_key() -> None:
    assert G.valid_key("h100") and G.valid_key("rtx_pro_6000")
    assert not G.valid_key("H100") and not G.valid_key("../x") and not G.valid_key("")


def test_interpreter_is_the_live_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    info = G.detect()
    assert info is G.INTERPRETER and info.interpret
    assert G.live_gpu().key == G.INTERPRET_KEY
    assert G.sm_count() == G.INTERPRET_SMS == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_gives_none() -> None:
    assert G.cuda_gpu() is None


@pytest.mark.gpu
def test_cuda_gpu_identity() -> None:
    info = G.cuda_gpu()
    assert info is not None and info.sm_count > 0 and G.valid_key(info.key)
    assert info.key == G.gpu_key(torch.cuda.get_device_name())


def test_one_interpreting_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    """pagegen._checks.interpreting is gpu.interpreting (the one definition), and it follows the env."""
    from pagegen import _checks

    assert _checks.interpreting is G.interpreting
    for value, expected in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert G.interpreting() is expected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not G.interpreting()


@pytest.mark.parametrize(
    ("triton", "numpy", "broken"),
    [
        ("3.6.0", "2.4.1", True),
        ("3.6.0", "2.5.2", True),  # the GPU image of 2026-12 (no interpreter in use there)
        ("3.5.1", "2.4.0", True),
        ("3.6.0", "2.3.5", False),
        ("3.9.0+git1234", "2.4.6", False),
        ("3.9.0", "2.5.2", False),
    ],
)
def test_interpreter_problem_names_the_broken_combination(triton: str, numpy: str, broken: bool) -> None:
    """Judged on the versions given, not the installed ones: meaningful on every image."""
    from pagegen._checks import interpreter_problem

    msg = interpreter_problem(triton, numpy)
    if broken:
        assert msg and "numpy<2.4" in msg and triton in msg and numpy in msg
    else:
        assert msg is None
