"""The model both engines serve: a random-weight Llama-shaped decoder whose attention is plugged in per
call (ModelConfig, PRESETS, Model)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-shaped decoder. The default is Llama-3.2-1B's shape with a 32k vocabulary."""

    layers: int = 16
    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64
    intermediate: int = 8192
    vocab: int = 32000
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    def num_params(self) -> int:
        """Weights, embedding and LM head counted separately (not tied)."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V bytes of one token across all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


PRESETS = {
    "1b": ModelConfig(),
    "smoke": ModelConfig(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=64, intermediate=256, vocab=512,
                         rope_theta=10000.0),
}

# attention plug: (layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> out [T, Hq, D]
AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * w / rms(x) over the last dim, computed in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form). x: [T, H, D]; cos, sin: [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Model:
    """Random-weight Llama-shaped decoder over packed token rows; attention is plugged per call.

    dtype: weights and activations; the engines cast q/k/v to their KV dtype for attention.
    Weights: normal with std 1/sqrt(fan_in) (residual projections scaled by 1/sqrt(2 layers)),
    drawn from a generator seeded with `seed` on `device`: the same model for every engine.
    """

    def __init__(self, cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 max_pos: int = 8192) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        g = torch.Generator(device=device).manual_seed(seed)

        def w(*shape: int, std: float) -> torch.Tensor:
            return (torch.randn(shape, generator=g, device=device) * std).to(dtype)

        h, d = cfg.hidden, cfg.head_dim
        res = 1.0 / math.sqrt(2 * cfg.layers)
        self.embed = w(cfg.vocab, h, std=1.0)
        self.layers = []
        for _ in range(cfg.layers):
            self.layers.append({
                "attn_norm": torch.ones(h, device=device, dtype=dtype),
                "wqkv": w(h, (cfg.heads + 2 * cfg.kv_heads) * d, std=h ** -0.5),
                "wo": w(cfg.heads * d, h, std=(cfg.heads * d) ** -0.5 * res),
                "mlp_norm": torch.ones(h, device=device, dtype=dtype),
                "w_gate_up": w(h, 2 * cfg.intermediate, std=h ** -0.5),
                "w_down": w(cfg.intermediate, h, std=cfg.intermediate ** -0.5 * res),
            })
        self.final_norm = torch.ones(h, device=device, dtype=dtype)
        self.lm_head = w(h, cfg.vocab, std=h ** -0.5)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        ang = torch.arange(max_pos, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)  # [max_pos, D/2]
        self.max_pos = max_pos

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn: AttnFn,
                last_idx: torch.Tensor) -> torch.Tensor:
        """Greedy next tokens. tokens, positions: [T] int64 (packed rows of all sequences);
        last_idx: [B] int64 rows whose logits are taken. Returns [B] int64 argmax token ids."""
        cfg = self.cfg
        t = tokens.shape[0]
        hq, hk, d = cfg.heads, cfg.kv_heads, cfg.head_dim
        x = self.embed[tokens]  # [T, hidden]
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # [T, 1, D/2]
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw["attn_norm"], cfg.norm_eps)
            q, k, v = (h @ lw["wqkv"]).split([hq * d, hk * d, hk * d], dim=-1)
            q = rope(q.view(t, hq, d), cos, sin)
            k = rope(k.view(t, hk, d), cos, sin)
            o = attn(i, q, k, v.reshape(t, hk, d))  # [T, Hq, D]
            x = x + o.reshape(t, hq * d) @ lw["wo"]
            h = rms_norm(x, lw["mlp_norm"], cfg.norm_eps)
            gate, up = (h @ lw["w_gate_up"]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ lw["w_down"]
        x = rms_norm(x[last_idx], self.final_norm, cfg.norm_eps)
        return (x @ self.lm_head).float().argmax(-1)
