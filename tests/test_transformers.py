"""pagegen inside Hugging Face transformers' continuous batching: greedy generate_batch on a tiny random
Llama gives the same tokens with pagegen's attention as with transformers' own paged sdpa, through
prefill, chunked prefill, prefix reuse and decode-only steps."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402
from transformers.generation.continuous_batching.cache import PagedAttentionCache  # noqa: E402

import pagegen.integrations.transformers as pg_hf  # noqa: E402


def tiny_llama(dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> LlamaForCausalLM:
    """2 layers, hidden 256, 4 query heads of 64 over 2 KV heads (GQA), vocab 256: random weights, no download."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval().to(dtype).to(device)


def prompts(seed: int = 0) -> list[list[int]]:
    """Ragged prompts; the last two share a 32-token (two-block) prefix with the first long one."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, 256, (40,), generator=g).tolist()
    rest = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 23, 17)]
    return [shared, *rest, shared[:32] + [7, 8, 9], shared[:33]]


def generate(model, implementation: str, inputs: list[list[int]], new_tokens: int = 6,
             cuda_graphs: bool = False) -> dict[str, list[int]]:
    model.set_attn_implementation(implementation)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    # 64 batch tokens: the prompts do not fit in one step, so later steps mix chunked prefill and decode
    cb = ContinuousBatchingConfig(block_size=16, num_blocks=48, max_batch_tokens=64, max_requests_per_batch=6,
                                  use_cuda_graph=cuda_graphs)
    out = model.generate_batch(inputs, generation_config=gen, continuous_batching_config=cb)
    return {rid: list(o.generated_tokens) for rid, o in out.items()}


@pytest.fixture
def calls(monkeypatch):
    """Count the adapter's kernel calls and transformers' prefix-cache hits."""
    seen = {"decode": 0, "extend": 0, "prefix_tokens": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(pg_hf, "paged_decode", counting("decode", pg_hf.paged_decode))
    monkeypatch.setattr(pg_hf, "paged_extend", counting("extend", pg_hf.paged_extend))
    match = PagedAttentionCache.search_prefix_match

    def search(self, request_id, prompt_ids):
        n = match(self, request_id, prompt_ids)
        seen["prefix_tokens"] += n
        return n

    monkeypatch.setattr(PagedAttentionCache, "search_prefix_match", search)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_generate_batch_tokens_match_paged_sdpa(device, dtype, calls):
    """fp32 (attended through pagegen's fp16 pool copy) and fp16 (transformers' pool read in place):
    greedy tokens identical to paged|sdpa for every request."""
    model = tiny_llama(dtype, device=device)
    inputs = prompts()
    expect = generate(model, "paged|sdpa", inputs)
    assert calls["decode"] == calls["extend"] == 0
    prefix_with_sdpa = calls["prefix_tokens"]
    got = generate(model, pg_hf.register(), inputs)
    assert got == expect
    assert all(len(t) == 6 for t in got.values())
    assert calls["decode"] > 0 and calls["extend"] > 0  # decode-only and prefill/mixed steps both ran
    assert calls["prefix_tokens"] - prefix_with_sdpa > 0  # a request reused cached prefix blocks


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graphs(dtype):
    """transformers captures each step in a CUDA graph (its default for implementations without a mask)
    and replays it on new batches: tokens still identical to paged|sdpa without graphs."""
    model = tiny_llama(dtype, device="cuda")
    inputs = prompts()
    expect = generate(model, "paged|sdpa", inputs)
    assert generate(model, pg_hf.register(), inputs, cuda_graphs=True) == expect


def test_block_tables_from_slots():
    """Slot lists in position order -> block tables and lengths, including an empty sequence."""
    bs = 4
    tables = [[5, 2, 9], [7], [], [3, 1]]
    lens = [10, 4, 0, 5]
    slots = [tables[b][p // bs] * bs + p % bs for b in range(4) for p in range(lens[b])]
    cu = torch.tensor([0, 10, 14, 14, 19], dtype=torch.int32)
    got, seq_lens = pg_hf.block_tables_from_slots(torch.tensor(slots), cu, bs, max_blocks=3)
    assert seq_lens.tolist() == lens
    assert got.dtype == torch.int32
    assert got.tolist() == [[5, 2, 9], [7, 0, 0], [0, 0, 0], [3, 1, 0]]


def test_register_checks_name():
    with pytest.raises(ValueError, match="paged\\|"):
        pg_hf.register("pagegen")
    assert pg_hf.register() == "paged|pagegen"
    assert "paged|pagegen" in transformers.AttentionInterface._global_mapping


def test_register_checks_version(monkeypatch):
    """Versions whose continuous batching has no `paged|<x>` route are refused; untested ones warned about."""
    live = sys.modules["transformers"]  # not always the object importorskip returned: its lazy module swaps itself
    monkeypatch.setattr(live, "__version__", "5.24.0")
    with pytest.raises(RuntimeError, match="5.24.0 is not supported"):
        pg_hf.register()
    monkeypatch.setattr(live, "__version__", "5.19.1")
    with pytest.warns(UserWarning, match="tested with transformers"):
        pg_hf.register()


def test_attention_refuses_what_it_cannot_serve():
    """Called outside continuous batching (no cache kwarg), or on a sliding-window layer: a clear
    error, not a wrong answer."""
    model = tiny_llama(torch.float16)
    q = torch.randn(1, 4, 3, 64, dtype=torch.float16)
    k = torch.randn(1, 2, 3, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="continuous batching"):
        pg_hf.pagegen_paged_attention(model.model.layers[0].self_attn, q, k, k, None, scaling=0.125)
    layer = model.model.layers[0].self_attn
    layer.sliding_window = 128  # e.g. a Mistral-style layer: refused, not silently attended in full
    with pytest.raises(NotImplementedError, match="sliding_window"):
        pg_hf.pagegen_paged_attention(layer, q, k, k, None, scaling=0.125, cache=object())


def test_pagegen_imports_without_transformers():
    """pagegen and the adapter module import with transformers unavailable; register() says what to install."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import pagegen, pagegen.integrations.transformers as m\n"
            "try:\n    m.register()\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pip install" in res.stdout
