"""The autotuner, in parts, each with one job:

    pagegen.tuner.study     the study driver: tune(), collect(), winners, warm start, the summary
    pagegen.tuner.runners   per-family runners behind the Runner protocol; verify() against the reference
    pagegen.tuner.trial     one trial: verify, time every bucket, classify failures, the objective
    pagegen.tuner.space     the Optuna search space, derived from spec.TUNABLES
    pagegen.tuner.storage   Optuna storages (journal file, RDB), reaping trials of dead workers
    pagegen.tuner.held_out  the table against the heuristic on shapes between the buckets
    pagegen.tuner.procs     worker processes that die with their parent

The names below are the package's public surface (`from pagegen.tuner import tune, TuneOptions`).
"""

from pagegen.tuner.held_out import HeldOutRow, check_held_out, format_held_out, held_out_buckets
from pagegen.tuner.runners import (
    RUNNERS,
    TOL,
    DecodeRunner,
    ExtendRunner,
    Runner,
    TrialFailure,
    VerifyRunner,
    extend_layout,
    feature_kwargs,
    rate,
    register_runner,
    runner_for,
    verify,
)
from pagegen.tuner.space import config_of, interpret_space, params_of, parse_space, search_space
from pagegen.tuner.storage import default_journal_path, open_storage, optuna_major, reap_dead_trials
from pagegen.tuner.study import (
    BUDGETS,
    SpecResult,
    TuneOptions,
    collect,
    format_summary,
    make_sampler,
    study_name,
    tune,
    tune_workload,
    warm_start_configs,
    winners,
)
from pagegen.tuner.trial import FatalDeviceError, TrialTimeout, evaluate, objective_value, reason_of

__all__ = [
    "BUDGETS", "RUNNERS", "TOL", "DecodeRunner", "ExtendRunner", "FatalDeviceError", "HeldOutRow", "Runner",
    "SpecResult", "TrialFailure", "TrialTimeout", "TuneOptions", "VerifyRunner", "check_held_out", "collect",
    "config_of",
    "default_journal_path", "evaluate", "extend_layout", "feature_kwargs", "format_held_out", "format_summary",
    "held_out_buckets", "interpret_space", "make_sampler", "objective_value", "open_storage", "optuna_major",
    "params_of",
    "parse_space", "rate", "reap_dead_trials", "reason_of", "register_runner", "runner_for", "search_space",
    "study_name", "tune", "tune_workload", "verify", "warm_start_configs", "winners",
]
