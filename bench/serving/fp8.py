"""The fp8 KV pool in the serving benchmark: calibrated scales, the bf16-vs-fp8 pool comparison on one
trace and one byte budget, and the checks of the fp8 run.

Scales (calibrate_kv_scales): the model has random weights, so there are no published scales; they are
derived once, before any timed run, from a calibration forward of one seeded random prompt
(`calib_len` tokens, drawn apart from the trace) with exact (fp32 SDPA) attention: per layer,
absmax(K) / fmax and absmax(V) / fmax of that prompt's post-rotary K and V (fmax = 448 for e4m3,
57344 for e5m2; pagegen.reference.absmax_scale_ref), over the whole tensor ([layers, 1], the default)
or per KV head ([layers, kv_heads]). They stay fixed for the engine's life (float32 device tensors in
the KVCache). A trace value beyond the calibration's absmax saturates to +-fmax in kv_write (the
attention check reports the saturated share).

The comparison (compare_pools): the same paged engine (prefix caching on, same options) serves the
same trace twice, once on a pool of the model's dtype and once on an fp8 pool of the same bytes (twice
the blocks). Per run: sequences at once (peak_running; mean_decode_batch = mean sequences per decode
step), output tokens/s, preemptions; then fp8 / base tokens/s. Checks of the fp8 run, reported, never
failed on fp8 drift: (1) greedy agreement with the base run over each request's first `check_steps`
tokens; (2) the attention of one prefill + one decode step on a private pool (attention_check): the
fp8 kernels against pagegen.reference's fp8-emulating float64 reference (the kernel's own error), the
fp8 output against float64 attention of the unquantized K/V (the quantization's error), and the base
dtype's kernel against the same float64 attention (for scale).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .checks import accounting_errors
from .model import Model
from .paged import PagegenEngine, pool_name
from .stats import RunStats
from .trace import Request

if TYPE_CHECKING:
    from .run import Setup


@torch.inference_mode()
def calibrate_kv_scales(model: Model, tokens: list[int], fp8_dtype: torch.dtype, attn_dtype: torch.dtype, *,
                        per_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 scales from one calibration forward of `tokens` (a single causal sequence, fp32 SDPA
    attention of q/k/v rounded to attn_dtype, as the engines round them). Per layer the scale maps the
    absmax of that layer's K (V) to fmax of fp8_dtype. Returns (k_scale, v_scale), float32 on the
    model's device, [layers, 1] (per tensor) or [layers, kv_heads] (per_head)."""
    from pagegen.reference import absmax_scale_ref

    cfg, dev = model.cfg, model.device
    group = cfg.heads // cfg.kv_heads
    ks: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []

    def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (x.to(attn_dtype) for x in (q, k, v))  # q [T, Hq, D]; k, v [T, Hkv, D]
        ks.append(absmax_scale_ref(k, fp8_dtype, head_axis=1 if per_head else None))
        vs.append(absmax_scale_ref(v, fp8_dtype, head_axis=1 if per_head else None))
        qq, kk, vv = (x.float().repeat_interleave(r, 1).transpose(0, 1) for x, r in ((q, 1), (k, group), (v, group)))
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)  # [Hq, T, D]
        return o.transpose(0, 1).to(attn_dtype).to(model.dtype)

    n = len(tokens)
    model.forward(torch.tensor(tokens, device=dev), torch.arange(n, device=dev), attn,
                  torch.tensor([n - 1], device=dev))
    return torch.stack(ks).contiguous(), torch.stack(vs).contiguous()


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| over max |ref| (float64)."""
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@torch.inference_mode()
def attention_check(engine: PagegenEngine, tokens: list[int]) -> dict:
    """The attention error of the fp8 engine on one sequence: a prefill of `tokens` (kv_write +
    paged_extend) then one decode step (kv_write + paged_decode) through its model, on a private fp8
    pool with the engine's scales and beside it a pool of the attention dtype holding the same K/V
    unquantized. Errors are max |out - ref| / max |ref| per layer (the layer's own q/k/v, so errors do
    not compound across layers in what is compared):
      extend_kernel_vs_emulation, decode_kernel_vs_emulation: fp8 kernels against
          paged_extend_fp8_ref / paged_decode_fp8_ref (exact dequantization, float64 attention);
      extend_fp8_vs_exact, decode_fp8_vs_exact: fp8 kernels against float64 attention of the
          unquantized K/V (what fp8 storage costs);
      decode_base_vs_exact: the attention dtype's kernel on the unquantized pool, same reference;
    saturated: share of K and V elements the calibrated scales clip (|x| / scale > fmax).
    Returns {name: [per layer]} plus "max_<name>" over layers and "nonfinite" (count of non-finite outputs)."""
    import pagegen as pg
    from pagegen.reference import (
        paged_decode_fp8_ref,
        paged_decode_ref,
        paged_extend_fp8_ref,
        paged_extend_ref,
    )

    model, cfg, dev = engine.model, engine.model.cfg, engine.model.device
    ad, bs, layout = engine.kv_dtype, engine.block_size, engine.layout
    if not engine.cache.is_fp8:
        raise ValueError(f"attention_check needs an engine with an fp8 pool; this one's pool is {engine.pool_dtype}")
    fmax = torch.finfo(engine.pool_dtype).max
    n = len(tokens)
    blocks = -(-(n + 1) // bs)
    kw = {"block_size": bs, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "layout": layout, "device": dev,
          "num_layers": cfg.layers, "num_blocks": blocks}
    c8, cx = pg.KVCache(dtype=engine.pool_dtype, **kw), pg.KVCache(dtype=ad, **kw)
    bt = torch.arange(blocks, dtype=torch.int32, device=dev)[None]
    names = ("extend_kernel_vs_emulation", "extend_fp8_vs_exact", "decode_kernel_vs_emulation", "decode_fp8_vs_exact",
             "decode_base_vs_exact", "saturated")
    res: dict = {k: [] for k in names}
    nonfinite = 0

    def write(layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> dict:
        skw = engine.scale_kwargs[layer]
        k, v = k.to(ad), v.to(ad)
        pg.kv_write(k, v, *c8.layer(layer), slots, layout=layout, **skw)
        pg.kv_write(k, v, *cx.layer(layer), slots, layout=layout)
        clipped = sum(int((x.float().abs() / skw[s].view(1, -1, 1) > fmax).sum()) for x, s in
                      ((k, "k_scale"), (v, "v_scale")))
        if slots.numel() > 1:  # the prefill writes all but one of the sequence's K/V rows
            res["saturated"].append(clipped / (2 * k.numel()))
        return skw

    def prefill(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        nonlocal nonfinite
        skw = write(layer, k, v, torch.arange(n, device=dev))
        q = q.to(ad)
        cu, lens = torch.tensor([0, n], dtype=torch.int32, device=dev), torch.tensor([n], dtype=torch.int32,
                                                                                       device=dev)
        o = pg.paged_extend(q, *c8.layer(layer), bt, cu, lens, layout=layout, max_q_len=n, **skw)
        emu = paged_extend_fp8_ref(q, *c8.layer(layer), bt, cu, lens, layout=layout, **skw)
        exact = paged_extend_ref(q, *cx.layer(layer), bt, cu, lens, layout=layout)
        res["extend_kernel_vs_emulation"].append(_err(o, emu))
        res["extend_fp8_vs_exact"].append(_err(o, exact))
        nonfinite += int((~torch.isfinite(o)).sum())
        return o.to(model.dtype)

    nxt = model.forward(torch.tensor(tokens, device=dev), torch.arange(n, device=dev), prefill,
                        torch.tensor([n - 1], device=dev))

    def decode(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        nonlocal nonfinite
        skw = write(layer, k, v, torch.tensor([n], device=dev))
        q = q.to(ad)
        lens = torch.tensor([n + 1], dtype=torch.int32, device=dev)
        o = pg.paged_decode(q, *c8.layer(layer), bt, lens, layout=layout, **skw)
        base = pg.paged_decode(q, *cx.layer(layer), bt, lens, layout=layout)
        emu = paged_decode_fp8_ref(q, *c8.layer(layer), bt, lens, layout=layout, **skw)
        exact = paged_decode_ref(q, *cx.layer(layer), bt, lens, layout=layout)
        res["decode_kernel_vs_emulation"].append(_err(o, emu))
        res["decode_fp8_vs_exact"].append(_err(o, exact))
        res["decode_base_vs_exact"].append(_err(base, exact))
        nonfinite += int((~torch.isfinite(o)).sum())
        return o.to(model.dtype)

    model.forward(nxt.to(torch.long), torch.tensor([n], device=dev), decode, torch.tensor([0], device=dev))
    out: dict = {"tokens": n, "pool": pool_name(engine.pool_dtype), "attn_dtype": pool_name(ad)}
    for k in names:
        out[k] = [round(x, 6) for x in res[k]]
        out[f"max_{k}"] = round(max(res[k]), 6)
    out["nonfinite"] = nonfinite
    return out


def prefix_agreement(a: RunStats, b: RunStats, trace: list[Request], steps: int, limit: int) -> dict:
    """Greedy agreement of two runs over the first `steps` tokens of the first `limit` requests that
    both emitted that many tokens (or all theirs): checked, identical_first_token, identical (all
    `steps` equal), mean_common_prefix (the mean share of those steps before the first difference)."""
    rids = []
    for r in trace:
        need = min(steps, r.output_len)
        if len(a.tokens[r.rid]) >= need and len(b.tokens[r.rid]) >= need:
            rids.append(r.rid)
        if len(rids) == limit:
            break
    same = first = 0
    frac = []
    for rid in rids:
        x, y = a.tokens[rid][:steps], b.tokens[rid][:steps]
        k = next((i for i in range(len(x)) if x[i] != y[i]), len(x))
        same += k == len(x)
        first += k > 0
        frac.append(k / max(1, len(x)))
    return {"steps": steps, "checked": len(rids), "identical_first_token": first, "identical": same,
            "mean_common_prefix": round(sum(frac) / max(1, len(frac)), 4)}


def compare_pools(setup: Setup, trace: list[Request], fp8_dtype: torch.dtype, *, calib_tokens: list[int],
                  per_head: bool = False, label: str = "sharegpt", time_cap: float = float("inf"),
                  sync: Callable[[], None] = lambda: None, log: Callable[[str], None] | None = None,
                  warm: list[Request] | None = None, warm_len: int = 0, check_steps: int = 16,
                  check_requests: int = 64, check_finite: bool = False) -> dict:
    """Serve `trace` with the paged engine on a pool of setup.kv_dtype and on an fp8_dtype pool of the
    same setup.budget_bytes (see the module docstring). Engines run one after the other (each warmed
    first when `warm` is given: warm_kernels(warm_len) then the warm trace, untimed) so only one pool
    is allocated at a time. Returns {"scales", "rows" (two RunStats summaries with kv_pool,
    kv_pool_bytes, accounting_errors), "fp8_over_base_tok_per_s", "capacity_ratio", "peak_ratio",
    "agreement", "attention_check"}."""
    say = log or (lambda msg: None)
    k_scale, v_scale = calibrate_kv_scales(setup.model, calib_tokens, fp8_dtype, setup.kv_dtype, per_head=per_head)
    scales = {"source": f"absmax / fmax of a {len(calib_tokens)}-token calibration prompt",
              "granularity": "per KV head" if per_head else "per tensor",
              "k_scale": [[round(float(x), 8) for x in row] for row in k_scale.cpu()],
              "v_scale": [[round(float(x), 8) for x in row] for row in v_scale.cpu()]}
    rows, stats = [], []
    check: dict = {}
    for pool in (None, fp8_dtype):
        extra = {"pool_dtype": pool, "kv_scales": (k_scale, v_scale)} if pool is not None else {}
        eng = setup.paged(True, check_finite=check_finite, **extra)
        if warm is not None:
            eng.warm_kernels(warm_len, log=log)
            eng.run(warm, label="warmup", sync=sync)
            sync()
        say(f" {eng.name} ({pool_name(eng.pool_dtype)} pool, {eng.capacity} tokens) on {label} (time cap "
            f"{time_cap:.0f} s) ...")
        st = eng.run(trace, label=label, time_cap=time_cap, sync=sync, log=log)
        s = st.summary()
        s["kv_pool"] = pool_name(eng.pool_dtype)
        s["kv_pool_bytes"] = eng.cache.nbytes
        s["accounting_errors"] = [] if st.capped else accounting_errors(st, trace, eng)
        rows.append(s)
        stats.append(st)
        say(f" {eng.name}: {s['output_tok_per_s']:.0f} tok/s, {s['finished']} finished in {s['wall_s']:.1f}s, "
            f"peak {s['peak_running']}, mean {s['mean_decode_batch']} seqs, preempt {s['preemptions']}, "
            f"capped {s['capped']}")
        if pool is not None:
            check = attention_check(eng, trace[0].prompt)
        del eng
    base, fp8 = rows
    return {
        "scales": scales,
        "rows": rows,
        "fp8_over_base_tok_per_s": round(fp8["output_tok_per_s"] / max(1e-9, base["output_tok_per_s"]), 3),
        "capacity_ratio": round(fp8["kv_capacity_tokens"] / max(1, base["kv_capacity_tokens"]), 3),
        "peak_ratio": round(fp8["peak_running"] / max(1, base["peak_running"]), 3),
        "agreement": prefix_agreement(stats[0], stats[1], trace, check_steps, check_requests),
        "attention_check": check,
    }


def fp8_table(cmp: dict) -> str:
    """The comparison as a plain-text table plus the ratio and the checks."""
    head = ("pool", "KV GiB", "pool tokens", "peak seqs", "mean seqs", "tok/s", "fin", "preempt", "wall s", "capped")
    body = [(r["kv_pool"], f"{r['kv_pool_bytes'] / 2**30:.3f}", str(r["kv_capacity_tokens"]), str(r["peak_running"]),
             str(r["mean_decode_batch"]), f"{r['output_tok_per_s']:.0f}", f"{r['finished']}/{r['requests']}",
             str(r["preemptions"]), f"{r['wall_s']:.1f}", str(r["capped"])) for r in cmp["rows"]]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in (head, *body)]
    a, c = cmp["agreement"], cmp["attention_check"]
    lines += [
        f"fp8 / {cmp['rows'][0]['kv_pool']} tokens/s: {cmp['fp8_over_base_tok_per_s']:.2f}x (issue 16 expects >= 1.3x "
        f"on the H200); pool tokens {cmp['capacity_ratio']:.2f}x, peak sequences {cmp['peak_ratio']:.2f}x",
        f"greedy agreement over the first {a['steps']} steps of {a['checked']} requests: first token "
        f"{a['identical_first_token']}, all {a['steps']} {a['identical']}, "
        f"mean common prefix {a['mean_common_prefix']}",
        f"attention, max over layers (max |err| / max |ref|): kernel vs fp8 emulation decode "
        f"{c['max_decode_kernel_vs_emulation']:.2e} extend {c['max_extend_kernel_vs_emulation']:.2e}; fp8 vs exact "
        f"decode {c['max_decode_fp8_vs_exact']:.2e} extend {c['max_extend_fp8_vs_exact']:.2e}; "
        f"{c['attn_dtype']} kernel vs exact decode {c['max_decode_base_vs_exact']:.2e}; "
        f"saturated {c['max_saturated']:.2e}; non-finite {c['nonfinite']}",
    ]
    return "\n".join(lines)
