"""How fast does TPE find a good config? Replays TPE against an exhaustive grid study's measurements.

Issue 5 asks: on a spec whose space is small enough to enumerate, run the exhaustive grid once and
report how many TPE trials reach within 3% of the grid's best objective (target: <= 30% of the
grid). GPU time is scarce, so the grid is measured once on the GPU:

    pagegen tune --gpu h100 --spec decode_bf16_hd128_bs16_nhd_g4 --sampler grid --trials 10000 \\
        --space 'block_n=32,64,128;num_warps=4,8;num_stages=1,2,3;split_size=0,512,1024,2048' \\
        --study-name grid-eff --budget full

and this script (CPU only) replays TPE with many seeds on an in-memory study whose objective is a
lookup of the grid's measured values: a config that failed in the grid fails here; configs that
illegal_reason() rejects or that repeat are pruned and not counted, exactly as in pagegen.tuner. The
tuner's warm start (default config + heuristic per bucket) is enqueued first unless --no-warm-start.

    python bench/tuner_efficiency.py --storage ~/.cache/pagegen/optuna/h100.journal --study-prefix grid-eff
Writes bench/results/tuner-efficiency-<gpu>-<date>[-nowarm].json (<gpu>: the key the grid study was run on).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import result_path, versions, write_json  # noqa: E402
from pagegen import tuner  # noqa: E402
from pagegen.spec import KernelSpec, illegal_reason  # noqa: E402
from pagegen.workloads import Bucket, Workload  # noqa: E402


def load_grid(storage, prefix: str):
    import optuna

    names = [n for n in optuna.study.get_all_study_names(storage) if n.startswith(prefix)]
    if len(names) != 1:
        raise SystemExit(f"expected one study named {prefix}*, found {names}")
    study = optuna.load_study(study_name=names[0], storage=storage)
    st = optuna.trial.TrialState
    done = [t for t in study.get_trials(deepcopy=False) if t.state in (st.COMPLETE, st.FAIL)]
    table: dict[tuple, float | None] = {}
    per_bucket: dict[tuple, dict[str, float]] = {}
    space: dict[str, list[int]] = {}
    for t in done:
        if t.state == st.FAIL and str(t.user_attrs.get("reason", "")).startswith("worker died"):
            continue
        key = tuple(sorted(t.params.items()))
        table[key] = t.value if t.state == st.COMPLETE else None
        if t.state == st.COMPLETE:
            per_bucket[key] = dict(t.user_attrs.get("bucket_us", {}))
        for k, d in t.distributions.items():
            space[k] = sorted(set(space.get(k, [])) | set(d.choices))
    return study, table, per_bucket, space


def _every_bucket_within(best_b: dict[str, float], times: dict[str, float], targets: dict[str, float]) -> bool:
    """Fold one trial's per-bucket times into best_b (fastest so far); True when every bucket's
    fastest is within its target."""
    for b, us in times.items():
        best_b[b] = min(us, best_b.get(b, float("inf")))
    return all(best_b.get(b, float("inf")) <= t for b, t in targets.items())


def replay(table, space, spec: KernelSpec, warm: list, seed: int, target: float, n_trials: int,
           per_bucket: dict | None = None, bucket_targets: dict | None = None) -> tuple[int | None, int | None]:
    """Evaluated trials TPE needs until (a) its objective is within target and (b) every bucket's
    fastest trial so far is within its bucket target, i.e. the table it would write is (None: not
    within n_trials)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    opts = tuner.TuneOptions(seed=seed, trials=n_trials)
    study = optuna.create_study(sampler=tuner.make_sampler(opts, space, n_trials), direction="minimize")
    for cfg in warm:
        study.enqueue_trial(tuner.params_of(cfg, space), skip_if_exists=True)
    seen: set[tuple] = set()
    state = {"n": 0, "hit": None, "all": None}
    best_b: dict[str, float] = {}

    def objective(trial):
        params = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        key = tuple(sorted(params.items()))
        if illegal_reason(spec, tuner.config_of(params)) or key in seen or key not in table:
            raise optuna.TrialPruned()
        seen.add(key)
        state["n"] += 1
        value = table[key]
        if value is None:
            raise tuner.TrialFailure("failed in the grid")
        if value <= target and state["hit"] is None:
            state["hit"] = state["n"]
        if bucket_targets and _every_bucket_within(best_b, per_bucket.get(key, {}), bucket_targets):
            state["all"] = state["all"] or state["n"]
        if state["hit"] is not None and (state["all"] is not None or not bucket_targets):
            trial.study.stop()
        if state["n"] >= n_trials:
            trial.study.stop()
        return value

    study.optimize(objective, n_trials=n_trials * 30 + 100, catch=(tuner.TrialFailure,))
    return state["hit"], state["all"]


def random_search(table, per_bucket, target: float, bucket_targets: dict, seeds: int) -> tuple[list, list]:
    """The same two counts for uniform random search without repeats (the baseline TPE must beat)."""
    import random

    keys = [k for k, v in table.items() if v is not None]
    obj, every = [], []
    for seed in range(seeds):
        order = keys[:]
        random.Random(seed).shuffle(order)
        best_b: dict[str, float] = {}
        o = a = None
        for i, k in enumerate(order, 1):
            if o is None and table[k] <= target:
                o = i
            if _every_bucket_within(best_b, per_bucket.get(k, {}), bucket_targets):
                a = a or i
            if o is not None and a is not None:
                break
        obj.append(o)
        every.append(a)
    return obj, every


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", required=True, help="journal file or database URL holding the grid study")
    ap.add_argument("--study-prefix", required=True, help="the grid study's name (or a unique prefix)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--within", type=float, default=0.03, help="relative distance to the grid's best (0.03 = 3%%)")
    ap.add_argument("--no-warm-start", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()

    storage = tuner.open_storage(args.storage, "x")
    study, table, per_bucket, space = load_grid(storage, args.study_prefix)
    values = [v for v in table.values() if v is not None]
    if not values:
        raise SystemExit("the grid study has no completed trial")
    best = min(values)
    target = best * (1 + args.within)
    spec = KernelSpec.from_dict(study.user_attrs["spec"])
    warm = []
    if not args.no_warm_start:
        buckets = tuple(Bucket(a, c, w) for a, c, w in study.user_attrs.get("buckets", []))
        w = Workload(spec, int(study.user_attrs.get("kv_heads", 8)), buckets, **study.user_attrs.get("features", {}))
        warm = tuner.warm_start_configs(w, [], int(study.user_attrs.get("sm_count", 132)), space)
    grid = len(table)
    names = sorted({b for d in per_bucket.values() for b in d})
    bucket_best = {b: min(d[b] for d in per_bucket.values() if b in d) for b in names}
    bucket_targets = {b: v * (1 + args.within) for b, v in bucket_best.items()}
    runs = [replay(table, space, spec, warm, seed, target, grid, per_bucket, bucket_targets)
            for seed in range(args.seeds)]
    rnd_obj, rnd_all = random_search(table, per_bucket, target, bucket_targets, 2000)
    hits = [r[0] for r in runs]
    all_hits = [r[1] for r in runs]
    found = [h for h in hits if h is not None]
    found_all = [h for h in all_hits if h is not None]
    summary = {
        "study": study.study_name, "gpu": study.user_attrs.get("gpu"), "spec": spec.variant_key(),
        "grid_configs": grid, "grid_failed": sum(v is None for v in table.values()), "grid_best_us": best,
        "within": args.within, "warm_start": not args.no_warm_start, "seeds": args.seeds,
        "trials_to_within": hits,
        "median_trials": statistics.median(found) if found else None,
        "median_fraction_of_grid": statistics.median(found) / grid if found else None,
        "worst_trials": max(found) if found else None,
        "never_reached": len(hits) - len(found),
        "good_configs": sum(1 for v in values if v <= target),
        "bucket_grid_best_us": bucket_best,
        "trials_to_all_buckets_within": all_hits,
        "median_trials_all_buckets": statistics.median(found_all) if found_all else None,
        "median_fraction_of_grid_all_buckets": statistics.median(found_all) / grid if found_all else None,
        "never_reached_all_buckets": len(all_hits) - len(found_all),
        "random_search_2000_seeds": {
            "median_trials": statistics.median(x for x in rnd_obj if x is not None),
            "median_trials_all_buckets": statistics.median(x for x in rnd_all if x is not None),
        },
        "bucket_configs_within": {b: sum(1 for d in per_bucket.values() if d.get(b, float("inf")) <= t)
                                  for b, t in bucket_targets.items()},
    }
    print(f"{spec.variant_key()} on {summary['gpu']}: grid of {grid} configs ({summary['grid_failed']} failed), "
          f"best {best:.2f} us; {summary['good_configs']} configs within {100 * args.within:.0f}%")
    print(f"TPE trials to within {100 * args.within:.0f}% over {args.seeds} seeds: {hits}")
    if found:
        print(f"median {summary['median_trials']} trials = {100 * summary['median_fraction_of_grid']:.0f}% of the "
              f"grid (target <= 30%); worst {summary['worst_trials']}; never: {summary['never_reached']}")
    print(f"trials until every bucket's winner is within {100 * args.within:.0f}% of that bucket's grid best: "
          f"{all_hits}")
    if found_all:
        print(f"median {summary['median_trials_all_buckets']} trials = "
              f"{100 * summary['median_fraction_of_grid_all_buckets']:.0f}% of the grid; "
              f"never: {summary['never_reached_all_buckets']}")
    rnd = summary["random_search_2000_seeds"]
    print(f"random search (2000 seeds), medians: objective {rnd['median_trials']} trials, every bucket "
          f"{rnd['median_trials_all_buckets']} trials")
    summary["versions"] = versions()
    tag = "" if not args.no_warm_start else "nowarm"
    path = write_json(result_path("tuner-efficiency", key=str(summary["gpu"] or "unknown"), tag=tag, out=args.out),
                      summary)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
