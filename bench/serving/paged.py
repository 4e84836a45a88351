"""The pagegen engine: continuous batching on the paged pool, prefix caching, preemption by recompute;
attention through pagegen.paged_decode / paged_extend and one kv_write per layer. The pool may be fp8
(`pool_dtype`): kv_write quantizes the rows with fixed per-layer scales and the kernels dequantize."""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

from .model import Model
from .stats import Clock, RunStats, Tracker
from .trace import Request


class PagegenEngine:
    """Continuous batching on pagegen's paged KV pool (see the module docstring).

    A step: (1) every running sequence gets the slot of its next token (append_batch); when blocks
    run out the most recently admitted sequence is preempted (blocks freed; recomputed from prompt
    + emitted tokens when readmitted) and nothing is admitted this step; (2) waiting requests are
    admitted FCFS while blocks (keeping `watermark` of the pool free for decode growth),
    max_running and max_batched_tokens allow, reusing cached prefix blocks; (3) one forward: decode
    rows through paged_decode, the admitted prompts' uncached tokens through paged_extend.

    kv_dtype: the dtype q, k, v are cast to for attention (fp16/bf16; also the outputs'). pool_dtype:
    the pool's element type, kv_dtype when None; an fp8 dtype (torch.float8_e4m3fn / float8_e5m2)
    makes an fp8 pool of the same `budget_bytes`, so twice the blocks. It needs `kv_scales` = (k_scale,
    v_scale), float32 [layers, 1] (one scale per layer's tensor) or [layers, kv_heads] (per KV head),
    fixed for the engine's life: copied into the KVCache's scale tensors, passed to kv_write (which
    quantizes with saturation) and to paged_decode / paged_extend (which dequantize).
    check_finite: count attention outputs that are not finite into RunStats.extra["nonfinite_attn"]
    (reads device values: a host sync per layer, so for smoke runs, not for timing).
    """

    name = "pagegen"

    def __init__(self, model: Model, *, kv_dtype: torch.dtype, budget_bytes: int, block_size: int = 16,
                 prefix_caching: bool = True, max_running: int = 512, max_batched_tokens: int = 8192,
                 watermark: float = 0.01, layout: str = "NHD", pool_dtype: torch.dtype | None = None,
                 kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None, check_finite: bool = False) -> None:
        import pagegen

        self.pg = pagegen
        cfg = model.cfg
        self.model, self.kv_dtype, self.layout = model, kv_dtype, layout
        self.pool_dtype = pool_dtype or kv_dtype
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.max_running, self.max_batched_tokens = max_running, max_batched_tokens
        self.budget_bytes, self.check_finite = budget_bytes, check_finite
        self.cache = pagegen.KVCache(block_size=block_size, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                                     layout=layout, dtype=self.pool_dtype, device=model.device,
                                     num_layers=cfg.layers, memory_bytes=budget_bytes)
        self.capacity = self.cache.num_blocks * block_size
        self.watermark_blocks = int(watermark * self.cache.num_blocks)
        self.name = "pagegen" if prefix_caching else "pagegen-nocache"
        # per layer: the scale keywords of kv_write / paged_decode / paged_extend ({} for a plain pool)
        self.scale_kwargs: list[dict[str, torch.Tensor]] = [{} for _ in range(cfg.layers)]
        if self.cache.is_fp8:
            self.name += "-" + pool_name(self.pool_dtype).replace("_", "")
            self.scale_kwargs = self._set_scales(kv_scales)
        elif kv_scales is not None:
            raise ValueError(f"kv_scales are for fp8 pools; this pool is {self.pool_dtype}: pass kv_scales=None")
        self.last_manager = None  # the SequenceManager of the last run (for accounting checks)

    def _set_scales(self, kv_scales: tuple[torch.Tensor, torch.Tensor] | None) -> list[dict[str, torch.Tensor]]:
        """Copy the fp8 scales into the KVCache and return each layer's scale keywords: a 1-element
        view of the layer's row (per tensor) or the row itself (per KV head)."""
        cfg, cache = self.model.cfg, self.cache
        if kv_scales is None:
            raise ValueError(f"an {self.pool_dtype} pool needs kv_scales=(k_scale, v_scale), float32 "
                             f"[{cfg.layers}, 1] or [{cfg.layers}, {cfg.kv_heads}]; see fp8.calibrate_kv_scales")
        widths = set()
        for name, given, dst in (("k_scale", kv_scales[0], cache.k_scale), ("v_scale", kv_scales[1], cache.v_scale)):
            if given.dtype != torch.float32 or given.dim() != 2 or given.shape[0] != cfg.layers \
                    or given.shape[1] not in (1, cfg.kv_heads):
                raise ValueError(f"{name}: expected float32 [{cfg.layers}, 1] or [{cfg.layers}, {cfg.kv_heads}], "
                                 f"got {given.dtype} {list(given.shape)}")
            dst.copy_(given.expand_as(dst))
            widths.add(given.shape[1])
        per_tensor = widths == {1}
        out = []
        for layer in range(cfg.layers):
            ks, vs = cache.layer_scales(layer)
            out.append({"k_scale": ks[:1], "v_scale": vs[:1]} if per_tensor else {"k_scale": ks, "v_scale": vs})
        return out

    def run(self, trace: list[Request], *, label: str = "", time_cap: float = float("inf"),
            sync: Callable[[], None] = lambda: None, log: Callable[[str], None] | None = None) -> RunStats:
        """Serve `trace`; return its statistics. All blocks are released at the end."""
        st = RunStats(self.name, label, self.budget_bytes, self.capacity)
        tr = Tracker(st, trace)
        sm = self.cache.sequence_manager(enable_prefix_caching=self.prefix_caching)
        self.last_manager = sm
        pending = collections.deque(trace)
        waiting: collections.deque[Request] = collections.deque()
        running: list[Request] = []  # admission order (the last is preempted first)
        admitted: set[int] = set()
        clock = Clock(sync)
        next_log = 5.0
        while pending or waiting or running:
            now = clock.now()
            if now > time_cap:
                st.capped = True
                break
            while pending and pending[0].arrival <= now:
                waiting.append(pending.popleft())
            if not waiting and not running:
                clock.wait_until(pending[0].arrival)
                continue
            dec, preempted = self._reserve_decode(sm, waiting, running, st)
            budget = self.max_batched_tokens - len(running)
            batch = [] if preempted else self._admit(sm, waiting, running, st, budget)
            if not running and not batch:
                req = waiting[0]
                need = len(req.prompt) + len(st.tokens[req.rid])
                raise ValueError(f"request {req.rid} needs {need} tokens of KV but the pool holds {self.capacity}; "
                                 "raise --kv-gib")
            for req, _ in batch:
                if req.rid not in admitted:
                    admitted.add(req.rid)
                    st.prompt_tokens += len(req.prompt)
            self._step(sm, dec, batch, st, tr, clock, running)
            st.peak_running = max(st.peak_running, len(running))
            if log and clock.now() > next_log:
                log(f"  {self.name} {clock.now():6.1f}s: {st.finished}/{st.requests} finished, {st.output_tokens} "
                    f"tokens, {len(running)} running, {st.preemptions} preemptions")
                next_log = clock.now() + 5.0
        sync()
        st.wall_s = clock.now()
        for req in running:  # a capped run: release what is still held
            sm.free(req.rid)
        ps = sm.pool.stats()
        st.extra.update({"num_blocks": self.cache.num_blocks, "block_size": self.block_size,
                         "block_prefix_queries": ps.prefix_queries, "block_prefix_hits": ps.prefix_hits,
                         "evictions": ps.evictions})
        return st

    def warm_kernels(self, max_len: int, log: Callable[[str], None] | None = None) -> int:
        """Call kv_write, paged_decode and paged_extend over a grid of batch / query-token / context
        sizes, so that every config the dispatcher picks (tuned buckets or heuristic split sizes)
        and Triton's integer specialisations (1, multiples of 16, others) compile before timing.
        Writes garbage into the pool (harmless: a run writes every slot before reading it).
        Returns the number of calls made."""
        pg, cache, bs, layout = self.pg, self.cache, self.block_size, self.layout
        cfg, dev, kd, skw = self.model.cfg, self.model.device, self.kv_dtype, self.scale_kwargs[0]
        kc, vc = cache.layer(0)
        kc.zero_()
        vc.zero_()
        g = torch.Generator(device=dev).manual_seed(1)
        calls = 0
        batches = sorted({b for b in (1, 2, 3, 4, 6, 8, 12, 16, 17, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
                          if b <= self.max_running})
        ctxs = sorted({c for c in (16, 100, 256, 400, 512, 700, 1024, 1500, 2048, 3000, 4096, 6000, 8192)
                       if c <= max_len} | {max_len})
        for b in batches:
            k = torch.randn(b, cfg.kv_heads, cfg.head_dim, generator=g, device=dev).to(kd)
            pg.kv_write(k, k, kc, vc, torch.arange(b, device=dev), layout=layout, **skw)
            for c in ctxs:
                w = -(-c // bs)
                q = torch.randn(b, cfg.heads, cfg.head_dim, generator=g, device=dev).to(kd)
                bt = torch.zeros(b, w, dtype=torch.int32, device=dev)
                lens = torch.full((b,), c, dtype=torch.int32, device=dev)
                pg.paged_decode(q, kc, vc, bt, lens, layout=layout, max_seq_len=c, **skw)
                calls += 2
        for t in (1, 5, 16, 17, 100, 256, 512, 1000, 2048, 4096, self.max_batched_tokens):
            if t > self.max_batched_tokens:
                continue
            k = torch.randn(t, cfg.kv_heads, cfg.head_dim, generator=g, device=dev).to(kd)
            pg.kv_write(k, k, kc, vc, torch.arange(t, device=dev), layout=layout, **skw)
            q = torch.randn(t, cfg.heads, cfg.head_dim, generator=g, device=dev).to(kd)
            cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
            for c in ctxs:
                w = -(-max(c, t) // bs)
                bt = torch.zeros(1, w, dtype=torch.int32, device=dev)
                lens = torch.full((1,), w * bs, dtype=torch.int32, device=dev)
                pg.paged_extend(q, kc, vc, bt, cu, lens, layout=layout, max_q_len=t, **skw)
                calls += 1
        if log:
            log(f" kernel warm-up: {calls} calls over {len(batches)} batches x {len(ctxs)} contexts")
        return calls

    def _tokens(self, req: Request, st: RunStats) -> list[int]:
        """Everything the sequence holds when (re)admitted: prompt + tokens emitted so far."""
        return req.prompt + st.tokens[req.rid]

    def _admit(self, sm, waiting: collections.deque, running: list, st: RunStats, token_budget: int) -> list:
        """Add waiting requests to the pool while they fit (blocks beyond the watermark, running
        sequences, `token_budget` new tokens); returns [(request, AddResult)]."""
        pool, bs = sm.pool, self.block_size
        batch: list = []
        new_tokens = 0
        while waiting and len(running) + len(batch) < self.max_running:
            req = waiting[0]
            toks = self._tokens(req, st)
            n = len(toks)
            cached = []
            if self.prefix_caching and n > bs:
                cached = pool.find_prefix(sm.prompt_hashes(toks, limit=(n - 1) // bs))
            need = -(-n // bs) - len(cached)
            avail = pool.num_allocatable - pool.evictable_among(cached)
            reserve = self.watermark_blocks if (running or batch) else 0
            todo = n - len(cached) * bs
            if need > avail - reserve or ((batch or running) and new_tokens + todo > token_budget):
                break
            res = sm.add(req.rid, toks)
            waiting.popleft()
            batch.append((req, res))
            new_tokens += n - res.num_cached_tokens
        return batch

    def _reserve_decode(self, sm, waiting: collections.deque, running: list, st: RunStats):
        """Give every running sequence the slot of its next token (the last one emitted), preempting
        the most recently admitted while blocks run out. Returns ((ids, tokens, slots, block_tables
        [B, W] int32 numpy, seq_lens [B] int32 numpy) or None when nothing runs, preempted?)."""
        preempted = False
        while running:
            ids = [r.rid for r in running]
            last = [st.tokens[i][-1] for i in ids]
            try:
                res = sm.append_batch(ids, last)
            except self.pg.OutOfBlocksError:
                if len(running) == 1:
                    raise
                victim = running.pop()
                sm.free(victim.rid)
                waiting.appendleft(victim)
                st.preemptions += 1
                preempted = True
                continue
            assert not res.cow, "no sequence is forked here, so no copy-on-write"
            bt, lens = sm.block_table_arrays(ids)
            return (ids, last, res.slot_mapping, bt, lens), preempted
        return None, preempted

    def _step(self, sm, dec, batch: list, st: RunStats, tr: Tracker, clock: Clock, running: list) -> None:
        """One forward over the decode tokens of the running sequences (rows [0, B): paged_decode)
        and the uncached prompt tokens of the admitted ones (rows [B, B + T): paged_extend); both
        write their K/V first through one kv_write. Emits a token per sequence."""
        import numpy as np

        pg, layout, cache = self.pg, self.layout, self.cache
        dev, kd, cd, bs = self.model.device, self.kv_dtype, self.model.dtype, self.block_size
        toks: list[int] = []
        pos: list[int] = []
        slots: list = []
        b = 0
        if dec is not None:
            ids, last, dslots, dbt_np, dlens_np = dec
            b = len(ids)
            toks.extend(last)
            pos.extend((dlens_np - 1).tolist())
            slots.append(dslots)
            dmax, dsum = int(dlens_np.max()), int(dlens_np.sum())
            dbt, dlens = _to_device(dbt_np, dev), _to_device(dlens_np, dev)
        cu = [0]
        for req, res in batch:
            full = self._tokens(req, st)
            c = res.num_cached_tokens
            toks.extend(full[c:])
            pos.extend(range(c, len(full)))
            slots.append(res.slot_mapping)
            cu.append(cu[-1] + len(full) - c)
            st.computed_prompt_tokens += len(full) - c
            if len(full) == len(req.prompt):  # first admission
                st.prefix_query_tokens += len(full)
                st.prefix_hit_tokens += c
            else:  # readmission after preemption: prompt + emitted tokens recomputed
                st.extra["recompute_tokens"] = st.extra.get("recompute_tokens", 0) + len(full)
                st.extra["recompute_hit_tokens"] = st.extra.get("recompute_hit_tokens", 0) + c
        if batch:
            pbt_np, plens_np = sm.block_table_arrays([req.rid for req, _ in batch])
            pbt, plens = _to_device(pbt_np, dev), _to_device(plens_np, dev)
            max_q = max(cu[i + 1] - cu[i] for i in range(len(batch)))
            cu_t = torch.tensor(cu, dtype=torch.int32, device=dev)
        slot_t = _to_device(np.concatenate(slots), dev)
        total = len(toks)

        def attn(layer: int, q, k, v):
            kc, vc = cache.layer(layer)
            skw = self.scale_kwargs[layer]
            pg.kv_write(k.to(kd), v.to(kd), kc, vc, slot_t, layout=layout, **skw)
            q = q.to(kd)
            o = torch.empty_like(q)
            if b:
                pg.paged_decode(q[:b], kc, vc, dbt, dlens, layout=layout, max_seq_len=dmax, sum_seq_lens=dsum,
                                out=o[:b], **skw)
            if batch:
                pg.paged_extend(q[b:], kc, vc, pbt, cu_t, plens, layout=layout, max_q_len=max_q, out=o[b:], **skw)
            if self.check_finite:
                st.extra["nonfinite_attn"] = st.extra.get("nonfinite_attn", 0) + int((~torch.isfinite(o)).sum())
            return o.to(cd)

        last_idx = list(range(b)) + [b + c - 1 for c in cu[1:]]
        nxt = self.model.forward(torch.tensor(toks, device=dev), torch.tensor(pos, device=dev), attn,
                                 torch.tensor(last_idx, device=dev)).tolist()
        st.steps += 1
        st.decode_steps += b > 0
        st.prefill_steps += bool(batch)
        st.extra["decode_rows"] = st.extra.get("decode_rows", 0) + b
        st.extra["step_tokens"] = st.extra.get("step_tokens", 0) + total
        if b:  # KV occupancy after this step's writes (only last blocks are partly filled, never shared)
            reserved = sm.pool.num_used * bs
            slack = int(((-dlens_np.astype(np.int64)) % bs).sum())
            if batch:
                slack += int(((-plens_np.astype(np.int64)) % bs).sum())
            st.reserved_token_steps += reserved
            st.holding_token_steps += reserved - slack
        now = clock.now()
        keep = []
        for req, tok in zip(running + [req for req, _ in batch], nxt, strict=True):
            if tr.emit(req, tok, now):
                sm.free(req.rid)
            else:
                keep.append(req)
        running[:] = keep


def pool_name(dtype: torch.dtype) -> str:
    """pagegen's name of a pool dtype: "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"."""
    from pagegen._checks import TORCH_KV_DTYPES

    return TORCH_KV_DTYPES[dtype]


def pool_dtype(name: str) -> torch.dtype:
    """The torch dtype of a pool named as pagegen names it ("bf16", "fp8_e4m3", ...); inverse of pool_name."""
    from pagegen._checks import TORCH_KV_DTYPES

    by_name = {v: k for k, v in TORCH_KV_DTYPES.items()}
    if name not in by_name:
        raise ValueError(f"KV pool dtype {name!r} is not supported; supported: {', '.join(by_name)}")
    return by_name[name]


def _to_device(a, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t
