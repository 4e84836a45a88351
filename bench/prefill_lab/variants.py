"""The lab's variants, in the order run.py tries them: the baselines, then the most informative first
(when the run's time budget runs out, the tail is skipped). run.py runs each in its own process with
a time budget, so a variant that faults or hangs costs only its own budget."""

VARIANTS = ["v0_base", "v0_base64", "f_occupancy", "a_diag", "b_tma_kv", "c_ws_tma", "b_tma_qo", "d_headmajor",
            "d_persistent", "e_exp2fold", "a_bigm", "c_ws"]
