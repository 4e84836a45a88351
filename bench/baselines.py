"""torch SDPA as a user would pick it: its own backend choice and each backend alone, the fastest named.

A backend is forced with `torch.nn.attention.sdpa_kernel(<one backend>)`; "default" is no context
(torch's own choice). Each backend is tried in every *form* the caller offers (how the same
attention is spelled: native GQA, the group folded into query rows, a causal-bias object, an
explicit mask, K/V heads repeated); a form that raises or gives a wrong result is recorded with its
reason, every form that runs is timed, and the backend's row is its fastest form. A backend with no
form that runs is "n/a (reason)", the reason being torch's own warning where it gave one.

    sweep(forms, check, backends=BACKENDS, skip={}) -> (rows, best)
      forms: {form name: fn()} returning the output; check(out) -> relative error vs a reference
      rows:  one dict per backend: impl "sdpa-<backend>", form, us, method, forms {form: us | reason}
      best:  the fastest row, as impl "sdpa-best" with "winner": "<backend> (<form>)"
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from bench.common import timeit

BACKENDS = ("default", "cudnn", "flash", "efficient", "math")
TOL = 2e-2  # bf16 relative error against the float64 reference


def backend_ctx(backend: str) -> contextlib.AbstractContextManager:
    """A context forcing one SDPA backend ("default": none, torch chooses)."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}
    return sdpa_kernel([getattr(SDPBackend, names[backend])])


def _short(text: str, n: int = 160) -> str:
    return " ".join(str(text).split())[:n]


def call(fn: Callable[[], torch.Tensor], backend: str) -> tuple[torch.Tensor | None, str]:
    """Run fn under the backend; (output, "") or (None, reason). The reason prefers torch's warning
    that says why the backend refused (e.g. "Flash attention does not support ... attn_mask")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with backend_ctx(backend):
                out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return out, ""
        except Exception as exc:  # refused shape/dtype/mask: a reported n/a, not a crash
            why = list(dict.fromkeys(_short(w.message) for w in caught))
            useful = [w for w in why if "not used because" not in w]
            return None, _short("; ".join(useful) if useful else f"{type(exc).__name__}: {exc}")


def sweep(forms: Mapping[str, Callable[[], torch.Tensor]], check: Callable[[torch.Tensor], float], *,
          backends: tuple[str, ...] = BACKENDS, skip: Mapping[str, str] | None = None, reps: int = 50,
          graph: bool = True, fallbacks: Mapping[str, Callable[[], torch.Tensor]] | None = None,
          ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Time every (backend, form) that runs and is right; rows per backend and the fastest overall.

    skip: {backend: reason} not even tried (e.g. math on a shape whose score matrix is too large).
    fallbacks: forms tried for a backend only when none of `forms` ran on it (e.g. K/V heads
    repeated where the backend has no native GQA: the same FLOPs, more bytes).
    """
    rows: list[dict[str, Any]] = []
    for backend in backends:
        row: dict[str, Any] = {"impl": f"sdpa-{backend}", "backend": backend, "forms": {}}
        if skip and backend in skip:
            row["na"] = skip[backend]
            rows.append(row)
            continue
        best: tuple[float, str, str] | None = None
        for form, fn in _forms_for(row, forms, fallbacks):
            out, why = call(fn, backend)
            if out is None:
                row["forms"][form] = f"n/a ({why})"
                continue
            err = check(out)
            if not err < TOL:
                row["forms"][form] = f"wrong (rel err {err:.2e})"
                continue

            def timed(i: int, fn: Callable[[], torch.Tensor] = fn, backend: str = backend) -> object:
                with backend_ctx(backend):
                    return fn()

            try:
                t = timeit(timed, reps=reps, graph=graph)
            except Exception as exc:  # timing failed after a good call: report it
                row["forms"][form] = f"n/a (timing: {_short(exc)})"
                continue
            row["forms"][form] = round(t.median_us, 2)
            if best is None or t.median_us < best[0]:
                best = (t.median_us, form, t.method)
                row["rel_err"] = err
        if best is None:
            reasons = [v for v in row["forms"].values() if isinstance(v, str)]
            row["na"] = reasons[0] if reasons else "n/a"
        else:
            row.update(us=best[0], form=best[1], method=best[2])
        rows.append(row)
    timed_rows = [r for r in rows if "us" in r]
    if not timed_rows:
        return rows, None
    win = min(timed_rows, key=lambda r: r["us"])
    best_row = {**{k: v for k, v in win.items() if k not in ("impl", "forms")}, "impl": "sdpa-best",
                "winner": f"{win['backend']} ({win['form']})"}
    return rows, best_row


def _forms_for(row: dict[str, Any], forms: Mapping[str, Callable[[], torch.Tensor]],
               fallbacks: Mapping[str, Callable[[], torch.Tensor]] | None):
    """Yield (form, fn): the primary forms, then the fallbacks if no primary form was timed."""
    yield from forms.items()
    if fallbacks and not any(isinstance(v, float) for v in row["forms"].values()):
        yield from fallbacks.items()


def lower_right_mask(q_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """[q_len, kv_len] bool, True where query i (the i-th of the last q_len positions) may see key j:
    j <= i + kv_len - q_len (causal, aligned to the lower right)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return j <= i + (kv_len - q_len)
