"""Attention features of a call: sliding window, logit softcap, attention sinks, ALiBi.

A call states its features as keyword arguments of the ops (`paged_decode`, `DecodePlan`,
`paged_extend`). This module validates those values (cheap: no GPU sync) and turns them into
  - the spec flags (KernelSpec.sliding_window / softcap / sinks / alibi): which code is rendered,
  - the kernels' runtime arguments, in the order of templates/_attention.py.j2's feature_params:
    window (int), softcap * log2(e) (float), sinks ([Hq] fp32), ALiBi slopes ([Hq] fp32).
Values are runtime arguments, so changing a window, a softcap or the tensors' contents never
recompiles. Semantics (pagegen/reference.py is the ground truth):
  sliding_window W: a query at absolute position p sees keys p - W + 1 .. p (itself included).
  softcap c: scores s = q.k * scale become c * tanh(s / c) before the softmax (Gemma-2).
  sinks: a learned logit per query head that joins the softmax denominator only (gpt-oss).
  alibi_slopes: the score of query position i and key position j gains slope[h] * (j - i).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

MAX_WINDOW = 2**31 - 1  # the kernels hold positions in int32


@dataclass(frozen=True, slots=True)
class Features:
    """The validated feature values of one call (None = off)."""

    sliding_window: int | None = None  # tokens a query sees, itself included
    softcap: float | None = None  # c of c * tanh(s / c)
    sinks: torch.Tensor | None = None  # [Hq] fp32 sink logits
    alibi_slopes: torch.Tensor | None = None  # [Hq] fp32 slopes

    def spec_flags(self) -> dict[str, bool]:
        """KernelSpec feature flags: which features the kernel must contain."""
        return {"sliding_window": self.sliding_window is not None, "softcap": self.softcap is not None,
                "sinks": self.sinks is not None, "alibi": self.alibi_slopes is not None}

    def plan_key(self) -> tuple:
        """What a cached launch plan depends on: the window (it bounds the context) and which are on."""
        return self.sliding_window, self.softcap is not None, self.sinks is not None, self.alibi_slopes is not None

    def kernel_args(self) -> tuple:
        """Runtime arguments of the attention kernels, in feature_params order (only those that are on)."""
        args: list = []
        if self.sliding_window is not None:
            args.append(self.sliding_window)
        if self.softcap is not None:
            from pagegen._checks import LOG2E  # (_checks imports this module)

            args.append(self.softcap * LOG2E)  # scores are in log2 units inside the kernels
        if self.sinks is not None:
            args.append(self.sinks)
        if self.alibi_slopes is not None:
            args.append(self.alibi_slopes)
        return tuple(args)

    def merge_args(self) -> tuple:
        """Runtime arguments of decode's merge_kernel (the window, when on)."""
        return () if self.sliding_window is None else (self.sliding_window,)

    def effective_ctx(self, ctx: int, q_len: int = 1) -> int:
        """Keys the `q_len` new tokens of a sequence can see at most, together, given `ctx` cached tokens
        (theirs included): min(window + q_len - 1, ctx)."""
        return ctx if self.sliding_window is None else max(1, min(ctx, self.sliding_window + q_len - 1))


NO_FEATURES = Features()


def call_features(q: object, *, sliding_window: int | None = None, softcap: float | None = None,
                  sinks: torch.Tensor | None = None, alibi_slopes: torch.Tensor | None = None) -> Features:
    """The checked feature values of one op call (NO_FEATURES when none is given): q [..., Hq, D]
    gives the query heads and the device (decode [B, Hq, D], extend [T, Hq, D], verify [B, q_len, Hq, D])."""
    if sliding_window is None and softcap is None and sinks is None and alibi_slopes is None:
        return NO_FEATURES
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() < 3:
        raise ValueError(f"q must have 3 dims ([.., Hq, D]), got shape {tuple(q.shape)}")
    return check_features(q.shape[-2], q.device, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
                          alibi_slopes=alibi_slopes)


def _head_tensor(name: str, t: object, q_heads: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [{q_heads}] float32, got {type(t).__name__}")
    if t.shape != (q_heads,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{q_heads}] (one value per query head)")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected float32 (use .float())")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; put it on q's device")
    if q_heads > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous (got stride {t.stride(0)}); use .contiguous()")
    return t


def check_features(q_heads: int, device: torch.device, *, sliding_window: int | None = None,
                   softcap: float | None = None, sinks: torch.Tensor | None = None,
                   alibi_slopes: torch.Tensor | None = None) -> Features:
    """Validate a call's feature arguments against its q_heads and device; return them as Features.

    sliding_window: a positive int (<= 2^31 - 1); softcap: a finite positive number; sinks and
    alibi_slopes: [q_heads] float32 tensors on q's device. No GPU sync (tensor contents are not read).
    """
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral):
            raise TypeError(f"sliding_window must be an int (tokens) or None, got {sliding_window!r}")
        sliding_window = int(sliding_window)
        if not 1 <= sliding_window <= MAX_WINDOW:
            raise ValueError(f"sliding_window={sliding_window} must be in 1..{MAX_WINDOW} (tokens a query sees)")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a number or None, got {softcap!r}")
        softcap = float(softcap)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap={softcap} must be a finite positive number (Gemma-2 uses 50.0)")
    if sinks is not None:
        _head_tensor("sinks", sinks, q_heads, device)
    if alibi_slopes is not None:
        _head_tensor("alibi_slopes", alibi_slopes, q_heads, device)
    return Features(sliding_window, softcap, sinks, alibi_slopes)


def standard_alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi slopes of Press et al. (BLOOM, MPT) for `num_heads` heads: [num_heads] float32.

    For a power of two n: slope_h = 2^(-8 (h + 1) / n); otherwise the slopes of the nearest lower
    power of two, followed by every other slope of twice that power.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} must be >= 1")

    def pow2_slopes(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    base = 1 << (num_heads.bit_length() - 1)
    slopes = pow2_slopes(base)
    if base < num_heads:
        slopes += pow2_slopes(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)
