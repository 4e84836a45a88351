"""Compile a @triton.jit kernel for a GPU target on a machine without a GPU.

Triton's wheel carries ptxas, so the whole pipeline (AST -> TTIR -> TTGIR -> LLIR -> PTX -> cubin)
runs on the CPU. Tests use this to prove that every template compiles for real (the interpreter
accepts code the compiler rejects), and `ptxas_report` reads registers and spills with no device.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def load_jit_module(spec: Any) -> Any:
    """Import the spec's rendered kernels as real @triton.jit functions, even when
    TRITON_INTERPRET=1 is set (the interpreter's functions cannot be compiled)."""
    from pagegen import codegen

    source = codegen.render(spec)
    path = codegen.write_source(spec, source)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        mod = codegen.exec_source(f"pagegen_kernels_jit.{path.stem}", path, source)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


def compile_for_target(fn: Any, arg_types: dict[str, str], constexprs: dict[str, Any], arch: int = 90,
                       num_warps: int = 4, num_stages: int = 2, no_divisibility: tuple[str, ...] = ()) -> Any:
    """Compile jit function `fn` for CUDA sm_`arch`.

    arg_types: Triton type strings of the non-constexpr arguments ("*bf16", "*i32", "fp32", "i32");
    arguments not named default to "i32". constexprs: values of the constexpr arguments. Pointers
    and ints are assumed divisible by 16 (as Triton specialises them at launch) except those in
    `no_divisibility`.
    Returns the CompiledKernel (its .asm has "ttir", "ptx", "cubin"); raises on compile errors.
    """
    names = fn.arg_names
    sig = {n: ("constexpr" if n in constexprs else arg_types.get(n, "i32")) for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    # what a real launch specialises: pointers and ints divisible by 16 (strides of real pools are)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and n not in no_divisibility and sig[n] != "fp32"}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(kernel: Any, arch: int = 90) -> dict[str, int]:
    """Registers, spill bytes and stack frame of a compiled kernel, read from `ptxas -v`."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        found = get_ptxas(arch)
    except TypeError:  # older triton: no arch argument
        found = get_ptxas()
    ptxas = getattr(found, "path", found)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return {
        "registers": int(regs.group(1)) if regs else -1,
        "spill_bytes": int(spill.group(1)) if spill else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


DECODE_TYPES = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
    "part_lse_ptr": "*fp32", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "qk_scale": "fp32",
}


def check_decode_cases(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compile decode (and merge when split) for each case; return the ptxas report of each.
    A case: head_dim, block_size, layout, group, block_n, warps, stages, split; optional q_len (the
    multi-token decode of issue 17, compiled for uniform q unless varlen=True)."""
    from pagegen.spec import KernelSpec

    reports = []
    for c in cases:
        q_len = c.get("q_len", 1)
        spec = KernelSpec("decode", head_dim=c["head_dim"], block_size=c["block_size"], layout=c["layout"],
                          group_size=c["group"], q_len=q_len)
        mod = load_jit_module(spec)
        split = c["split"]
        consts = {"BLOCK_N": c["block_n"], "SPLIT_SIZE": split, "DOT_FP32": False}
        types = dict(DECODE_TYPES)
        if q_len > 1:
            consts["VARLEN"] = bool(c.get("varlen", False))
            types["cu_seqlens_q_ptr"] = "*i32"
        kernel = compile_for_target(mod.decode_kernel, types, consts, num_warps=c["warps"], num_stages=c["stages"])
        report = ptxas_report(kernel)
        report["mma"] = "mma" in kernel.asm["ptx"]
        if split:
            merge_types = {k: types[k] for k in ("out_ptr", "part_out_ptr", "part_lse_ptr", "seq_lens_ptr")}
            merge_consts = {"SPLIT_SIZE": split, "SPLITS_PAD": 8}
            if q_len > 1:
                merge_types["cu_seqlens_q_ptr"] = "*i32"
                merge_consts["VARLEN"] = consts["VARLEN"]
            compile_for_target(mod.merge_kernel, merge_types, merge_consts)
        reports.append(report)
    return reports


if __name__ == "__main__":  # python -m pagegen.compile_check '<json list of decode cases>'
    import json
    import sys

    from pagegen._checks import interpreting

    if interpreting():
        sys.exit("run with TRITON_INTERPRET unset: the interpreter's functions cannot be compiled")
    print(json.dumps(check_decode_cases(json.loads(sys.argv[1]))))
