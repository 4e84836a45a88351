"""The naive engine: static batches over contiguous, padded KV slabs, attention through torch SDPA."""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model import Model
from .stats import Clock, RunStats, Tracker
from .trace import Request

# The naive engine's attention backends. cuDNN is left out on purpose: measured on an H100
# (bench/results/serving-profile-h100-2026-11-25.log), cuDNN SDPA builds a new plan whenever the
# slab length changes, i.e. every decode step: 3.1 ms of host time per call against 0.11 ms on the
# GPU, which made the naive baseline 6x slower than it needs to be.
NAIVE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class NaiveEngine:
    """Static batching over contiguous, padded KV slabs in one preallocated buffer of the budget.

    Slab of a batch: [2, layers, B, Hkv, W, D] in kv_dtype, W = max over rows of prompt + max_tokens
    (reserve="request") or max_model_len (reserve="max-len"). Admission: FCFS while B * W tokens fit
    the budget and B <= max_batch. Prompts are prefilled in row groups of at most max_batched_tokens
    (padded) tokens; decode steps run every row of the batch until the longest is done.
    """

    name = "naive"

    def __init__(self, model: Model, *, kv_dtype: torch.dtype, budget_bytes: int, max_batch: int = 256,
                 reserve: str = "request", max_model_len: int = 4096, max_batched_tokens: int = 8192) -> None:
        if reserve not in ("request", "max-len"):
            raise ValueError(f"reserve={reserve!r}; expected 'request' or 'max-len'")
        cfg = model.cfg
        self.model, self.kv_dtype, self.reserve = model, kv_dtype, reserve
        self.max_batch, self.max_model_len, self.max_batched_tokens = max_batch, max_model_len, max_batched_tokens
        self.budget_bytes = budget_bytes
        self.capacity = budget_bytes // cfg.kv_bytes_per_token(kv_dtype)
        per_token = 2 * cfg.layers * cfg.kv_heads * cfg.head_dim
        # zeros, not empty: SDPA multiplies masked-out (probability 0) keys' V rows too, and 0 * NaN of
        # uninitialised memory is NaN. Later batches reuse finite values only.
        self.buffer = torch.zeros(self.capacity * per_token, dtype=kv_dtype, device=model.device)

    def width(self, req: Request) -> int:
        """Slab tokens one request asks for."""
        return self.max_model_len if self.reserve == "max-len" else len(req.prompt) + req.max_tokens

    def run(self, trace: list[Request], *, label: str = "", time_cap: float = float("inf"),
            sync: Callable[[], None] = lambda: None, log: Callable[[str], None] | None = None) -> RunStats:
        """Serve `trace`; return its statistics."""
        st = RunStats(self.name, label, self.budget_bytes, self.capacity)
        tr = Tracker(st, trace)
        pending = collections.deque(trace)  # by arrival
        waiting: collections.deque[Request] = collections.deque()
        clock = Clock(sync)
        next_log = 5.0
        while pending or waiting:
            now = clock.now()
            if now > time_cap:
                st.capped = True
                break
            while pending and pending[0].arrival <= now:
                waiting.append(pending.popleft())
            if not waiting:
                clock.wait_until(pending[0].arrival)
                continue
            batch: list[Request] = []
            w = 0
            while waiting and len(batch) < self.max_batch:
                w2 = max(w, self.width(waiting[0]))
                if (len(batch) + 1) * w2 > self.capacity:
                    break
                batch.append(waiting.popleft())
                w = w2
            if not batch:
                raise ValueError(f"request {waiting[0].rid} needs a slab of {self.width(waiting[0])} tokens but the "
                                 f"KV budget holds {self.capacity}; raise --kv-gib")
            st.prompt_tokens += sum(len(r.prompt) for r in batch)
            st.computed_prompt_tokens += sum(len(r.prompt) for r in batch)
            st.peak_running = max(st.peak_running, len(batch))
            self._serve_batch(batch, w, st, tr, clock, time_cap)
            if log and clock.now() > next_log:
                log(f"  naive {clock.now():6.1f}s: {st.finished}/{st.requests} finished, {st.output_tokens} tokens")
                next_log = clock.now() + 5.0
        sync()
        st.wall_s = clock.now()
        return st

    def _serve_batch(self, batch: list[Request], w: int, st: RunStats, tr: Tracker, clock: Clock,
                     time_cap: float) -> None:
        cfg, dev = self.model.cfg, self.model.device
        b, hk, d, g = len(batch), cfg.kv_heads, cfg.head_dim, cfg.heads // cfg.kv_heads
        slab = self.buffer[: 2 * cfg.layers * b * hk * w * d].view(2, cfg.layers, b, hk, w, d)
        kd = self.kv_dtype
        cd = self.model.dtype
        plens = [len(r.prompt) for r in batch]
        done = [False] * b
        # -- prefill, in row groups of at most max_batched_tokens padded tokens --
        r0 = 0
        while r0 < b:
            p = plens[r0]
            r1 = r0 + 1
            while r1 < b and (r1 + 1 - r0) * max(p, plens[r1]) <= self.max_batched_tokens:
                p = max(p, plens[r1])
                r1 += 1
            rows = r1 - r0
            toks = torch.zeros(rows, p, dtype=torch.long)
            for j in range(rows):
                toks[j, : plens[r0 + j]] = torch.tensor(batch[r0 + j].prompt)
            pos = torch.arange(p).repeat(rows)
            last = torch.tensor([j * p + plens[r0 + j] - 1 for j in range(rows)])

            def prefill_attn(layer: int, q, k, v, r0=r0, r1=r1, rows=rows, p=p):
                kc, vc = slab[0, layer, r0:r1], slab[1, layer, r0:r1]  # [rows, Hkv, W, D]
                kc[:, :, :p] = k.view(rows, p, hk, d).transpose(1, 2)
                vc[:, :, :p] = v.view(rows, p, hk, d).transpose(1, 2)
                qq = q.to(kd).to(cd).view(rows, p, hk * g, d).transpose(1, 2)  # [rows, Hq, P, D]
                kk = kc[:, :, :p].to(cd).repeat_interleave(g, dim=1)
                vv = vc[:, :, :p].to(cd).repeat_interleave(g, dim=1)
                with sdpa_kernel(NAIVE_SDPA_BACKENDS):
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                return o.to(kd).to(cd).transpose(1, 2).reshape(rows * p, hk * g, d)

            nxt = self.model.forward(toks.view(-1).to(dev), pos.to(dev), prefill_attn, last.to(dev)).tolist()
            st.steps += 1
            st.prefill_steps += 1
            now = clock.now()
            for j in range(rows):
                done[r0 + j] = tr.emit(batch[r0 + j], nxt[j], now)
            r0 = r1
        # -- decode: every row steps together until the longest request is done --
        step = 1  # tokens emitted per row so far
        arange_b = torch.arange(b, device=dev)
        while not all(done):
            if clock.now() > time_cap:
                st.capped = True
                return
            toks = torch.tensor([st.tokens[r.rid][-1] for r in batch], device=dev)
            pos_list = [plens[i] + step - 1 for i in range(b)]
            pos = torch.tensor(pos_list, device=dev)
            lmax = max(pos_list) + 1
            mask = (torch.arange(lmax, device=dev)[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, L]

            def decode_attn(layer: int, q, k, v, pos=pos, lmax=lmax, mask=mask):
                kc, vc = slab[0, layer], slab[1, layer]  # [B, Hkv, W, D]
                kc[arange_b, :, pos] = k.to(kd)
                vc[arange_b, :, pos] = v.to(kd)
                qq = q.to(kd).to(cd).view(b, hk, g, d)  # the G heads of a KV head as G query rows
                with sdpa_kernel(NAIVE_SDPA_BACKENDS):
                    o = F.scaled_dot_product_attention(qq, kc[:, :, :lmax].to(cd), vc[:, :, :lmax].to(cd),
                                                       attn_mask=mask)
                return o.to(kd).to(cd).reshape(b, hk * g, d)

            nxt = self.model.forward(toks, pos, decode_attn, arange_b).tolist()
            st.steps += 1
            st.decode_steps += 1
            live = [i for i in range(b) if not done[i]]
            st.extra["decode_rows"] = st.extra.get("decode_rows", 0) + len(live)
            st.reserved_token_steps += b * w
            st.holding_token_steps += sum(pos_list[i] + 1 for i in live)
            now = clock.now()
            for i in live:
                done[i] = tr.emit(batch[i], nxt[i], now)
            step += 1
