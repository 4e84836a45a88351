"""What must hold after a run: greedy-token agreement of two engines and accounting that adds up."""

from __future__ import annotations

from .paged import PagegenEngine
from .stats import RunStats
from .trace import Request


def agreement(a: RunStats, b: RunStats, rids: list[int]) -> dict:
    """Greedy-token agreement of two runs on the given requests: how many match exactly and the
    mean fraction of each request's tokens before the first difference."""
    same, frac = 0, []
    for rid in rids:
        x, y = a.tokens[rid], b.tokens[rid]
        n = min(len(x), len(y))
        k = next((i for i in range(n) if x[i] != y[i]), n)
        same += x == y
        frac.append(k / max(1, max(len(x), len(y))))
    return {"checked": len(rids), "identical": same, "mean_common_prefix": round(sum(frac) / max(1, len(frac)), 4)}


def accounting_errors(st: RunStats, trace: list[Request], engine) -> list[str]:
    """What does not add up after an uncapped run (empty list when all is well)."""
    errs = []
    if st.finished != len(trace):
        errs.append(f"{st.finished} of {len(trace)} requests finished")
    for r in trace:
        if len(st.tokens[r.rid]) != r.output_len:
            errs.append(f"request {r.rid} emitted {len(st.tokens[r.rid])} tokens, expected {r.output_len}")
    if st.output_tokens != sum(r.output_len for r in trace):
        errs.append(f"output_tokens {st.output_tokens} != {sum(r.output_len for r in trace)}")
    if st.prompt_tokens != sum(len(r.prompt) for r in trace):
        errs.append(f"prompt_tokens {st.prompt_tokens} != {sum(len(r.prompt) for r in trace)}")
    if st.holding_token_steps > st.reserved_token_steps:
        errs.append("more KV tokens held than reserved")
    if st.prefix_hit_tokens > st.prefix_query_tokens:
        errs.append("more prefix hits than queries")
    if isinstance(engine, PagegenEngine):
        offered = st.prefix_query_tokens + st.extra.get("recompute_tokens", 0)
        cached = st.prefix_hit_tokens + st.extra.get("recompute_hit_tokens", 0)
        if st.computed_prompt_tokens + cached != offered:
            errs.append(f"computed {st.computed_prompt_tokens} + cached {cached} prompt tokens != offered {offered}")
        if st.prefix_query_tokens != st.prompt_tokens:
            errs.append("prompt tokens offered to the cache at first admission != prompt tokens admitted")
        if st.preemptions and not st.extra.get("recompute_tokens"):
            errs.append("preempted sequences were never recomputed")
    sm = getattr(engine, "last_manager", None)
    if sm is not None:
        pool = sm.pool
        if len(sm):
            errs.append(f"{len(sm)} sequences still in the manager")
        if pool.num_used:
            errs.append(f"{pool.num_used} blocks still held (leak)")
        if pool.num_used + pool.num_cached + pool.num_free != pool.num_blocks:
            errs.append("used + cached + free != num_blocks")
        try:
            sm.check_invariants()
        except AssertionError as exc:
            errs.append(f"allocator invariant: {exc}")
    return errs
