"""The smallest complete serving loop on pagegen's public API, with a tiny random Llama-shaped model.

    python examples/serve_tiny.py --device cpu     # Triton's interpreter: seconds
    python examples/serve_tiny.py --device cuda

What an engine does each step, and which pagegen call does it:
  1. admit a request: SequenceManager.add(prompt) reuses the longest cached prefix (whole blocks
     that an earlier request computed) and hands out slots for the rest of the prompt;
  2. prefill the new prompt tokens of every admitted request in one packed batch: per layer,
     kv_write their K/V into the pool at those slots, then paged_extend (causal attention over
     each sequence's cached prefix and its new tokens, through its block table);
  3. decode one token for every running request: SequenceManager.append_batch gives each new
     token a slot (and copy-on-write pairs for copy_blocks), then per layer kv_write + a
     DecodePlan's run() (paged_decode with its checks and config choice done once per batch shape);
  4. finish a request: SequenceManager.free returns its blocks; full prompt blocks stay cached
     for later requests until the pool needs them.
The model is plain torch; only attention and the KV pool are pagegen's. `main` checks every
generated token's logits against a plain-torch recomputation (no cache, causal SDPA).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field


def _device_from_argv(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--device="):
            return a.split("=", 1)[1]
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return "cuda"


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # this checkout's pagegen
    if _device_from_argv(sys.argv[1:]) == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton (via pagegen)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pagegen import DecodePlan, KVCache, copy_blocks, kv_write, paged_extend  # noqa: E402

# -- a tiny Llama-shaped model in plain torch ---------------------------------------------------


@dataclass(frozen=True)
class TinyConfig:
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2  # GQA: 2 query heads per KV head
    head_dim: int = 64
    intermediate: int = 256
    vocab: int = 128


class TinyModel:
    """Random weights (seeded); forward over packed token rows with attention plugged in per call:
    attn(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]."""

    def __init__(self, cfg: TinyConfig, device: str, dtype: torch.dtype, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        w = lambda *shape: (torch.randn(shape, generator=g) / math.sqrt(shape[0])).to(device, dtype)  # noqa: E731
        h, d = cfg.hidden, cfg.head_dim
        self.cfg = cfg
        self.embed = (torch.randn(cfg.vocab, h, generator=g)).to(device, dtype)
        self.layers = [(w(h, (cfg.heads + 2 * cfg.kv_heads) * d), w(cfg.heads * d, h), w(h, 2 * cfg.intermediate),
                        w(cfg.intermediate, h)) for _ in range(cfg.layers)]
        self.lm_head = w(h, cfg.vocab)
        inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        ang = torch.arange(1024, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """tokens, positions: [T] int64 -> logits [T, vocab] fp32."""
        c, t = self.cfg, tokens.shape[0]
        norm = lambda x: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)  # noqa: E731
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [T, 1, D/2]

        def rope(x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        x = self.embed[tokens]
        for i, (wqkv, wo, wgu, wd) in enumerate(self.layers):
            q, k, v = (norm(x) @ wqkv).split([c.heads * c.head_dim, c.kv_heads * c.head_dim,
                                              c.kv_heads * c.head_dim], dim=-1)
            q = rope(q.reshape(t, c.heads, c.head_dim)).contiguous()
            k = rope(k.reshape(t, c.kv_heads, c.head_dim))
            x = x + attn(i, q, k, v.reshape(t, c.kv_heads, c.head_dim)).reshape(t, -1) @ wo
            gate, up = (norm(x) @ wgu).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ wd
        return (norm(x) @ self.lm_head).float()


# -- the engine ---------------------------------------------------------------------------------


@dataclass
class Request:
    rid: int
    prompt: list[int]
    max_new_tokens: int
    arrival_step: int = 0  # the step it arrives at (continuous batching: requests join a running batch)
    output: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] per generated token (for checking)
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Engine:
    """Continuous batching over one KV pool: admit (prefill with prefix reuse), decode, free."""

    def __init__(self, model: TinyModel, device: str, num_blocks: int = 64, block_size: int = 16,
                 max_blocks_per_seq: int = 8) -> None:
        c = model.cfg
        self.model, self.device = model, device
        self.kv = KVCache(block_size=block_size, kv_heads=c.kv_heads, head_dim=c.head_dim, dtype=torch.float16,
                          device=device, num_layers=c.layers, num_blocks=num_blocks)
        self.seqs = self.kv.sequence_manager(enable_prefix_caching=True)
        self.width = max_blocks_per_seq  # fixed block-table width: one DecodePlan per batch size
        self.plans: dict[int, DecodePlan] = {}

    def _tensor(self, xs, dtype=torch.int64) -> torch.Tensor:
        return torch.as_tensor(xs, dtype=dtype).to(self.device)

    def prefill(self, reqs: list[Request]) -> None:
        """Add the requests and compute their uncached prompt tokens in one packed extend batch."""
        tokens, positions, slots, cu, last = [], [], [], [0], []
        for r in reqs:
            res = self.seqs.add(r.rid, r.prompt)
            r.cached_prompt_tokens = res.num_cached_tokens
            new = r.prompt[res.num_cached_tokens:]
            tokens += new
            positions += range(res.num_cached_tokens, len(r.prompt))
            slots += res.slot_mapping.tolist()
            cu.append(cu[-1] + len(new))
            last.append(cu[-1] - 1)
        tables, lens = self.seqs.block_tables([r.rid for r in reqs], device=self.device, width=self.width)
        slot_t, cu_t = self._tensor(slots), self._tensor(cu, torch.int32)
        max_q = max(b - a for a, b in zip(cu, cu[1:], strict=False))

        def attn(layer, q, k, v):
            k_pool, v_pool = self.kv.layer(layer)
            kv_write(k.half(), v.half(), k_pool, v_pool, slot_t)
            return paged_extend(q.half(), k_pool, v_pool, tables, cu_t, lens, max_q_len=max_q).to(q.dtype)

        logits = self.model.logits(self._tensor(tokens), self._tensor(positions), attn)[last]
        for r, row in zip(reqs, logits, strict=True):
            r.logits.append(row)
            r.output.append(int(row.argmax()))

    def decode(self, reqs: list[Request]) -> None:
        """Feed each request's last generated token; one new token each."""
        ids = [r.rid for r in reqs]
        fed = [r.output[-1] for r in reqs]
        res = self.seqs.append_batch(ids, fed)
        if res.cow:  # a shared, partly filled last block: copy it before writing into it
            pairs = self._tensor(res.cow, torch.int32)
            for layer in range(self.kv.num_layers):
                copy_blocks(*self.kv.layer(layer), pairs)
        tables, lens = self.seqs.block_tables(ids, device=self.device, width=self.width)
        slot_t = self._tensor(res.slot_mapping)
        positions = [self.seqs.num_tokens(i) - 1 for i in ids]

        def attn(layer, q, k, v):
            k_pool, v_pool = self.kv.layer(layer)
            kv_write(k.half(), v.half(), k_pool, v_pool, slot_t)
            q16 = q.half()
            plan = self.plans.get(len(reqs))
            if plan is None:  # validates and picks the config once for this batch shape
                plan = self.plans[len(reqs)] = DecodePlan(q16, k_pool, v_pool, tables, lens)
            return plan.run(q16, k_pool, v_pool, tables, lens).to(q.dtype)

        logits = self.model.logits(self._tensor(fed), self._tensor(positions), attn)
        for r, row in zip(reqs, logits, strict=True):
            r.logits.append(row)
            r.output.append(int(row.argmax()))

    def run(self, requests: list[Request]) -> list[Request]:
        """Serve every request to completion; returns them with outputs and per-token logits."""
        waiting = sorted(requests, key=lambda r: r.arrival_step)
        running: list[Request] = []
        step = 0
        while waiting or running:
            if running:
                self.decode(running)
            arrived = [r for r in waiting if r.arrival_step <= step]
            waiting = [r for r in waiting if r.arrival_step > step]
            if arrived:
                self.prefill(arrived)
                running += arrived
            for r in [r for r in running if len(r.output) >= r.max_new_tokens]:
                self.seqs.free(r.rid)
                running.remove(r)
            step += 1
        return requests


def demo_requests(vocab: int, seed: int = 0) -> list[Request]:
    """Four requests; the later two start with the first one's 32-token prefix (two full blocks)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    system = rand(32)
    return [Request(0, system + rand(5), 5, arrival_step=0), Request(1, rand(19), 4, arrival_step=0),
            Request(2, system + rand(9), 4, arrival_step=2), Request(3, system + rand(17), 3, arrival_step=3)]


def reference_logits(model: TinyModel, req: Request) -> torch.Tensor:
    """Plain torch, no cache: logits [n_generated, vocab] of the prompt plus the generated tokens
    (teacher-forced on the engine's own tokens), causal SDPA over the whole sequence in fp32."""
    seq = req.prompt + req.output[:-1]
    c = model.cfg

    def attn(layer, q, k, v):  # [T, H, D]: repeat KV heads for GQA, causal attention in fp32
        g = c.heads // c.kv_heads
        q, k, v = q.half().float(), k.half().float(), v.half().float()  # the pool's fp16 rounding
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(g, 1).transpose(0, 1),
                                           v.repeat_interleave(g, 1).transpose(0, 1), is_causal=True)
        return o.transpose(0, 1).to(q.dtype)

    dev = model.embed.device
    logits = model.logits(torch.tensor(seq, device=dev), torch.arange(len(seq), device=dev), attn)
    return logits[len(req.prompt) - 1:]


def max_logit_error(model: TinyModel, reqs: list[Request]) -> float:
    """Largest |engine - reference| logit over every generated token of every request."""
    return max(float((torch.stack(r.logits) - reference_logits(model, r)).abs().max()) for r in reqs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"],
                    help="cpu runs the kernels in Triton's interpreter (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    model = TinyModel(TinyConfig(), args.device, torch.float32)
    engine = Engine(model, args.device)
    reqs = engine.run(demo_requests(model.cfg.vocab))
    for r in reqs:
        print(f"request {r.rid}: prompt {len(r.prompt)} tokens ({r.cached_prompt_tokens} from the prefix cache) "
              f"-> {r.output}")
    err = max_logit_error(model, reqs)
    ok = err < 2e-2
    print(f"max |logit - plain-torch reference| = {err:.2e}: {'ok' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
