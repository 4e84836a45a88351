"""Per-family tuning glue behind one small protocol: build inputs, launch a config, say what the
family measures; and the one verification of a config against the float64 reference.

    runner = runner_for(workload, device, interpret)   # DecodeRunner, VerifyRunner, ExtendRunner, or registered
    verify(runner, cfg, rng)                            # raises TrialFailure on a wrong result
    rate(runner, bucket, us)                            # (GB/s, None) or (None, TFLOP/s) by runner.metric

A workload with attention features gets its values (feature_kwargs: window, softcap, drawn sinks,
standard ALiBi slopes) passed to the op at every launch and to the float64 reference in
verification; verification adds a length just past the window so that the window binds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, Protocol

import torch

from pagegen.spec import Config, KernelSpec
from pagegen.workloads import (
    MAX_BUCKET_BYTES,
    SINK_SEED,
    SINK_STD,
    Bucket,
    Workload,
    bucket_kv_bytes,
    decode_bytes,
    visible_pairs,
)

TOL = {"fp16": 2e-3, "bf16": 1.5e-2}  # relative error vs the fp64 reference


class TrialFailure(Exception):
    """A trial that must be recorded as failed (its message is the reason)."""


class Runner(Protocol):
    """What the tuner needs of a family.

    metric: "gbps" for a memory-bound family (work() is bytes moved), "tflops" for a compute-bound
    one (work() is matrix FLOPs). inputs(bucket) is cached per bucket; launch() returns the output
    tensor; verify_case() builds fresh random inputs and reference() computes their float64 result.
    """

    family: ClassVar[str]
    metric: ClassVar[Literal["gbps", "tflops"]]
    w: Workload
    interpret: bool

    def inputs(self, bucket: Bucket) -> dict[str, Any]: ...

    def launch(self, cfg: Config, x: dict[str, Any]) -> torch.Tensor: ...

    def verify_case(self, rng: random.Random) -> tuple[dict[str, Any], str]: ...

    def reference(self, x: dict[str, Any]) -> torch.Tensor: ...

    def work(self, bucket: Bucket) -> int: ...

    def fits(self, bucket: Bucket) -> bool: ...


RunnerFactory = Callable[[Workload, str, bool], Runner]


def verify(runner: Runner, cfg: Config, rng: random.Random) -> None:
    """Raise TrialFailure unless `cfg` matches the float64 reference on fresh random inputs
    (outputs are poisoned with NaN before the launch; relative error of the whole output)."""
    x, case = runner.verify_case(rng)
    out = runner.launch(cfg, x).double()
    ref = runner.reference(x)
    if not torch.isfinite(out).all():
        raise TrialFailure(f"wrong result: non-finite output ({case})")
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    tol = TOL[runner.w.spec.dtype]
    if not err <= tol:
        raise TrialFailure(f"wrong result: relative error {err:.3g} > {tol} ({case})")


def rate(runner: Runner, bucket: Bucket, us: float) -> tuple[float | None, float | None]:
    """(GB/s, TFLOP/s) of a bucket run in `us` microseconds: the one the runner's metric names."""
    per_s = runner.work(bucket) / (us * 1e-6)
    return (per_s / 1e9, None) if runner.metric == "gbps" else (None, per_s / 1e12)


def paged_inputs(spec: KernelSpec, kv_heads: int, lens: Sequence[int], device: str,
                 gen: torch.Generator) -> dict[str, Any]:
    """Random q and paged K/V pools (pages at shuffled physical blocks) for sequences of `lens`.

    q: [B, kv_heads*G, D]; k, v: pools in spec.layout; block_tables: [B, max_blocks] int32;
    seq_lens: [B] int32; out: [B, Hq, D] poisoned with NaN; scales: {} or, for an fp8 spec, the
    k_scale/v_scale keywords of the ops (the pools then hold quantized randn).
    """
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[spec.dtype]
    bs, d, hq = spec.block_size, spec.head_dim, kv_heads * spec.group_size
    nblk = [-(-n // bs) for n in lens]
    width, total = max(1, max(nblk)), sum(nblk) + 1
    shape = (total, bs, kv_heads, d) if spec.layout == "NHD" else (total, kv_heads, bs, d)
    k = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device == "cpu" else dt).to(dt)
    v = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if device == "cpu" else dt).to(dt)
    perm = torch.randperm(total, generator=gen, device=device).to(torch.int32)
    tables = torch.zeros(len(lens), width, dtype=torch.int32, device=device)
    pos = 0
    for i, nb in enumerate(nblk):
        tables[i, :nb] = perm[pos:pos + nb]
        tables[i, nb:] = perm[-1]
        pos += nb
    q = torch.randn(len(lens), hq, d, generator=gen, device=device, dtype=torch.float32).to(dt)
    scales: dict[str, torch.Tensor] = {}
    if spec.is_fp8:  # quantize K/V as kv_write does, per-tensor scales from the data's absmax
        from pagegen._checks import TORCH_KV_DTYPES
        from pagegen.reference import absmax_scale_ref, quantize_fp8_ref

        fp8 = next(t for t, name in TORCH_KV_DTYPES.items() if name == spec.kv_dtype)
        scales = {"k_scale": absmax_scale_ref(k, fp8), "v_scale": absmax_scale_ref(v, fp8)}
        k, v = quantize_fp8_ref(k, scales["k_scale"], fp8), quantize_fp8_ref(v, scales["v_scale"], fp8)
    return {"q": q, "k": k, "v": v, "block_tables": tables,
            "seq_lens": torch.tensor(list(lens), dtype=torch.int32, device=device),
            "out": torch.full_like(q, float("nan")), "max_seq_len": max(lens), "scales": scales}


def dequantized(x: dict[str, Any], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K/V pools of paged_inputs as the reference reads them (fp8: code * scale, exactly)."""
    if not x["scales"]:
        return x["k"], x["v"]
    from pagegen.reference import dequantize_pool_ref

    return (dequantize_pool_ref(x["k"], x["scales"]["k_scale"], layout=layout),
            dequantize_pool_ref(x["v"], x["scales"]["v_scale"], layout=layout))


def feature_kwargs(w: Workload, q_heads: int, device: str, gen: torch.Generator | None = None) -> dict[str, Any]:
    """The feature keyword arguments of paged_decode / paged_extend (and of their float64
    references) for workload `w` with `q_heads` query heads: sliding_window and softcap from the
    workload; sinks [q_heads] fp32 = randn * SINK_STD (from `gen`, a CPU generator; default: seed
    SINK_SEED, so every bucket times the same sinks); alibi_slopes [q_heads] fp32 = the standard
    slopes. {} for plain attention."""
    from pagegen.features import standard_alibi_slopes

    spec, kw = w.spec, {}
    if w.window is not None:
        kw["sliding_window"] = w.window
    if w.softcap is not None:
        kw["softcap"] = w.softcap
    if spec.sinks:
        gen = gen or torch.Generator().manual_seed(SINK_SEED)
        kw["sinks"] = (torch.randn(q_heads, generator=gen, dtype=torch.float32) * SINK_STD).to(device)
    if spec.alibi:
        kw["alibi_slopes"] = standard_alibi_slopes(q_heads).to(device)
    return kw


def _past_window(w: Workload, rng: random.Random, longest: int) -> list[int]:
    """A length just past the workload's window (ending mid-page), when one fits under `longest` (the
    verification's size limit): verification must see the window bind."""
    if w.window is None:
        return []
    n = w.window + rng.randint(1, 2 * w.spec.block_size - 1)
    return [n] if n <= longest else []


class DecodeRunner:
    """Tuning glue of the decode family (pagegen.decode.paged_decode with an explicit config);
    memory-bound: the rate is GB/s of KV (and q, out) moved."""

    family: ClassVar[str] = "decode"
    metric: ClassVar[Literal["gbps", "tflops"]] = "gbps"

    def __init__(self, workload: Workload, device: str, interpret: bool) -> None:
        self.w, self.device, self.interpret = workload, device, interpret
        self._inputs: dict[tuple[int, int, bool], dict[str, Any]] = {}

    def inputs(self, bucket: Bucket) -> dict[str, Any]:
        key = (*bucket.shape, bucket.ragged)  # ints and a bool: the same seed in every worker
        if key not in self._inputs:
            gen = torch.Generator(device=self.device).manual_seed(hash(key) & 0xFFFF)
            x = paged_inputs(self.w.spec, self.w.kv_heads, bucket.lengths(), self.device, gen)
            x["features"] = feature_kwargs(self.w, self.w.q_heads, self.device)
            self._inputs[key] = x
        return self._inputs[key]

    def launch(self, cfg: Config, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.decode import paged_decode

        return paged_decode(x["q"], x["k"], x["v"], x["block_tables"], x["seq_lens"], layout=self.w.spec.layout,
                            out=x["out"], config=cfg, max_seq_len=x["max_seq_len"], **x["features"], **x["scales"])

    def verify_case(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        """Fresh inputs whose lengths cross page, tile and split boundaries (and the window, when one
        fits), with the workload's feature values (fresh sinks)."""
        if self.interpret:
            lens, hk = [rng.randint(1, 20), rng.randint(21, 90), rng.randint(257, 300)], min(self.w.kv_heads, 2)
        else:
            lens = [rng.randint(1, 64), rng.randint(65, 1500), rng.randint(1500, 6000), rng.randint(6000, 20000)]
            hk = self.w.kv_heads
        lens += _past_window(self.w, rng, 300 if self.interpret else 20000)
        gen = torch.Generator(device=self.device).manual_seed(rng.randrange(1 << 31))
        x = paged_inputs(self.w.spec, hk, lens, self.device, gen)
        x["features"] = feature_kwargs(self.w, hk * self.w.spec.group_size, self.device,
                                       torch.Generator().manual_seed(rng.randrange(1 << 31)))
        return x, f"lens {lens}" + "".join(f", {k} {v}" for k, v in self.w.feature_values().items())

    def reference(self, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.reference import paged_decode_ref

        layout = self.w.spec.layout
        return paged_decode_ref(x["q"], *dequantized(x, layout), x["block_tables"], x["seq_lens"], layout=layout,
                                **x["features"])

    def work(self, bucket: Bucket) -> int:
        """Bytes a step of `bucket` moves (with a window: only the window's tokens)."""
        return decode_bytes(self.w.spec, self.w.kv_heads, bucket.lengths(), window=self.w.window)

    def fits(self, bucket: Bucket) -> bool:
        return bucket_kv_bytes(self.w.spec, self.w.kv_heads, bucket) <= MAX_BUCKET_BYTES


def extend_layout(bucket: Bucket) -> tuple[int, int, int]:
    """(sequences, new tokens each, context each) of an extend bucket (q_tokens, ctx): every
    sequence appends q_len = min(q_tokens, ctx) tokens at the end of a ctx-token context."""
    q_len = min(bucket.a, bucket.ctx)
    return -(-bucket.a // q_len), q_len, bucket.ctx


class ExtendRunner(DecodeRunner):
    """Tuning glue of the extend family (pagegen.extend.paged_extend with an explicit config).
    Buckets are (q_tokens, ctx), laid out by extend_layout(); compute-bound: the rate is TFLOP/s."""

    family: ClassVar[str] = "extend"
    metric: ClassVar[Literal["gbps", "tflops"]] = "tflops"

    def _make(self, kv_heads: int, seqs: Sequence[tuple[int, int]], gen,
              feature_gen: torch.Generator | None = None) -> dict[str, Any]:
        spec = self.w.spec
        x = paged_inputs(spec, kv_heads, [n for _, n in seqs], self.device, gen)
        total = sum(q for q, _ in seqs)
        cu = [0]
        for q, _ in seqs:
            cu.append(cu[-1] + q)
        x["q"] = torch.randn(total, kv_heads * spec.group_size, spec.head_dim, generator=gen, device=self.device,
                             dtype=torch.float32).to(x["q"].dtype)
        x["out"] = torch.full_like(x["q"], float("nan"))
        x["cu"] = torch.tensor(cu, dtype=torch.int32, device=self.device)
        x["max_q_len"] = max(q for q, _ in seqs)
        x["features"] = feature_kwargs(self.w, kv_heads * spec.group_size, self.device, feature_gen)
        return x

    def inputs(self, bucket: Bucket) -> dict[str, Any]:
        key = bucket.shape
        if key not in self._inputs:
            n_seq, q_len, ctx = extend_layout(bucket)
            gen = torch.Generator(device=self.device).manual_seed(hash(key) & 0xFFFF)
            self._inputs[key] = self._make(self.w.kv_heads, [(q_len, ctx)] * n_seq, gen)
        return self._inputs[key]

    def launch(self, cfg: Config, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.extend import paged_extend

        return paged_extend(x["q"], x["k"], x["v"], x["block_tables"], x["cu"], x["seq_lens"],
                            layout=self.w.spec.layout, out=x["out"], config=cfg, max_q_len=x["max_q_len"],
                            max_seq_len=x["max_seq_len"], **x["features"], **x["scales"])

    def verify_case(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        if self.interpret:
            qs = [rng.randint(1, 8), rng.randint(9, 40)]
            seqs, hk = [(q, q + rng.randint(0, 30)) for q in qs], min(self.w.kv_heads, 2)
        else:
            qs = [rng.randint(1, 16), rng.randint(17, 300), rng.randint(300, 1200)]
            seqs, hk = [(q, q + rng.randint(0, 3000)) for q in qs], self.w.kv_heads
        seqs += [(rng.randint(1, 16 if self.interpret else 64), n)
                 for n in _past_window(self.w, rng, 80 if self.interpret else 20000)]
        gen = torch.Generator(device=self.device).manual_seed(rng.randrange(1 << 31))
        x = self._make(hk, seqs, gen, torch.Generator().manual_seed(rng.randrange(1 << 31)))
        return x, f"q_len, seq_len {seqs}" + "".join(f", {k} {v}" for k, v in self.w.feature_values().items())

    def reference(self, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.reference import paged_extend_ref

        layout = self.w.spec.layout
        return paged_extend_ref(x["q"], *dequantized(x, layout), x["block_tables"], x["cu"], x["seq_lens"],
                                layout=layout, **x["features"])

    def work(self, bucket: Bucket) -> int:
        """Matrix FLOPs of a bucket: 4 x Hq x D per (query, visible key) pair (QK^T and PV; with a
        window only the pairs inside it)."""
        n_seq, q_len, ctx = extend_layout(bucket)
        return 4 * self.w.q_heads * self.w.spec.head_dim * visible_pairs(q_len, ctx, self.w.window) * n_seq

    def fits(self, bucket: Bucket) -> bool:
        n_seq, _, ctx = extend_layout(bucket)
        return n_seq * ctx * self.w.kv_heads * self.w.spec.head_dim * 4 <= MAX_BUCKET_BYTES


class VerifyRunner(DecodeRunner):
    """Tuning glue of a verify spec (decode with q_len > 1, `..._q4`): pagegen.verify.paged_verify with
    an explicit config, so the config timed is the one its dispatcher looks up for the spec. Buckets are
    decode's (batch, ctx); every sequence has spec.q_len new tokens, counted in seq_lens
    (Workload.seq_lens); q and out are [B, q_len, Hq, D]. Memory-bound: KV read once per sequence."""

    family: ClassVar[str] = "verify"

    def _make(self, kv_heads: int, lens: Sequence[int], gen: torch.Generator,
              feature_gen: torch.Generator | None = None) -> dict[str, Any]:
        spec = self.w.spec
        x = paged_inputs(spec, kv_heads, lens, self.device, gen)
        x["q"] = torch.randn(len(lens), spec.q_len, kv_heads * spec.group_size, spec.head_dim, generator=gen,
                             device=self.device, dtype=torch.float32).to(x["q"].dtype)
        x["out"] = torch.full_like(x["q"], float("nan"))
        x["features"] = feature_kwargs(self.w, kv_heads * spec.group_size, self.device, feature_gen)
        return x

    def inputs(self, bucket: Bucket) -> dict[str, Any]:
        key = (*bucket.shape, bucket.ragged)
        if key not in self._inputs:
            gen = torch.Generator(device=self.device).manual_seed(hash(key) & 0xFFFF)
            self._inputs[key] = self._make(self.w.kv_heads, self.w.seq_lens(bucket), gen)
        return self._inputs[key]

    def launch(self, cfg: Config, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.verify import paged_verify

        return paged_verify(x["q"], x["k"], x["v"], x["block_tables"], x["seq_lens"], layout=self.w.spec.layout,
                            out=x["out"], config=cfg, max_seq_len=x["max_seq_len"], **x["features"], **x["scales"])

    def verify_case(self, rng: random.Random) -> tuple[dict[str, Any], str]:
        """Fresh inputs whose new tokens cross page boundaries and whose lengths cross tile and split
        boundaries (and the window, when one fits), one sequence of exactly q_len tokens (no cached
        context), with the workload's feature values (fresh sinks)."""
        ql, bs = self.w.spec.q_len, self.w.spec.block_size
        cross = bs * rng.randint(1, 3) + rng.randint(1, ql - 1)  # the new tokens straddle a page boundary
        if self.interpret:
            lens, hk = [ql, cross, rng.randint(21, 90), rng.randint(257, 300)], min(self.w.kv_heads, 2)
        else:
            lens = [ql, cross, rng.randint(65, 1500), rng.randint(1500, 6000), rng.randint(6000, 20000)]
            hk = self.w.kv_heads
        lens += _past_window(self.w, rng, 300 if self.interpret else 20000)
        gen = torch.Generator(device=self.device).manual_seed(rng.randrange(1 << 31))
        x = self._make(hk, lens, gen, torch.Generator().manual_seed(rng.randrange(1 << 31)))
        return x, f"q_len {ql}, lens {lens}" + "".join(f", {k} {v}" for k, v in self.w.feature_values().items())

    def reference(self, x: dict[str, Any]) -> torch.Tensor:
        from pagegen.reference import paged_verify_ref

        layout = self.w.spec.layout
        return paged_verify_ref(x["q"], *dequantized(x, layout), x["block_tables"], x["seq_lens"], layout=layout,
                                **x["features"])

    def work(self, bucket: Bucket) -> int:
        """Bytes a verify step of `bucket` moves: KV once per sequence (with a window: the tokens the
        new ones see together), q and out (q_len rows each)."""
        return decode_bytes(self.w.spec, self.w.kv_heads, self.w.seq_lens(bucket), window=self.w.window)


RUNNERS: dict[str, RunnerFactory] = {"decode": DecodeRunner, "verify": VerifyRunner, "extend": ExtendRunner}


def register_runner(family: str, runner: RunnerFactory) -> None:
    """Plug another family's Runner (see the protocol) into the tuner."""
    RUNNERS[family] = runner


def runner_for(workload: Workload, device: str, interpret: bool,
               overrides: dict[str, RunnerFactory] | None = None) -> Runner:
    """The runner of workload's family (`overrides` first: tests inject faulty runners there); a
    decode spec with q_len > 1 is the "verify" family's."""
    family = "verify" if workload.spec.family == "decode" and workload.spec.q_len > 1 else workload.spec.family
    factory = (overrides or {}).get(family) or RUNNERS.get(family)
    if factory is None:
        raise ValueError(f"tuning family {family!r} is not supported yet (supported: {', '.join(RUNNERS)}); "
                         "a family registers its runner with pagegen.tuner.register_runner")
    return factory(workload, device, interpret)
