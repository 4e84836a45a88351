"""examples/serve_tiny.py: the serving loop's logits match a plain-torch recomputation of the same
tiny model, prefix reuse happens, and no kernel reads a pool slot nobody wrote."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "serve_tiny.py"


def load_example():
    spec = importlib.util.spec_from_file_location("serve_tiny", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["serve_tiny"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_serving_loop_matches_reference(device):
    ex = load_example()
    model = ex.TinyModel(ex.TinyConfig(), device, torch.float32, seed=1)
    engine = ex.Engine(model, device)
    engine.kv.fill_(float("nan"))  # poison: a read of an unwritten slot would make logits NaN
    reqs = engine.run(ex.demo_requests(model.cfg.vocab, seed=1))
    assert [len(r.output) for r in reqs] == [r.max_new_tokens for r in reqs]
    assert [r.cached_prompt_tokens for r in reqs] == [0, 0, 32, 32]  # the later two reuse the shared prefix
    assert all(torch.isfinite(torch.stack(r.logits)).all() for r in reqs)
    assert ex.max_logit_error(model, reqs) < 2e-2
    assert len(engine.seqs) == 0 and engine.seqs.pool.num_used == 0  # every request freed its blocks
    engine.seqs.check_invariants()


def test_script_runs_on_cpu():
    """The documented command: `python examples/serve_tiny.py --device cpu` exits 0 and says ok."""
    from pagegen._checks import interpreter_problem

    if problem := interpreter_problem():  # e.g. the GPU image: Triton 3.6 with NumPy 2.5
        pytest.skip(f"the CPU run needs Triton's interpreter: {problem}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it itself
    res = subprocess.run([sys.executable, str(EXAMPLE), "--device", "cpu"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "32 from the prefix cache" in res.stdout and ": ok" in res.stdout
