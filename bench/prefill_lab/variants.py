"""The lab's variants, in the order run.py tries them: baselines first, the riskiest (TMA, warp
specialization) last. run.py runs each in its own process, so a fault costs only that variant."""

VARIANTS = ["v0_base", "v0_base64", "f_occupancy", "a_diag", "e_exp2fold", "d_headmajor", "a_bigm", "b_tma_qo",
            "b_tma_kv", "c_ws_tma", "d_persistent", "c_ws"]
