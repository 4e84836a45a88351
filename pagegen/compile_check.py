"""Compile a @triton.jit kernel for a GPU target on a machine without a GPU.

Triton's wheel carries ptxas, so the whole pipeline (AST -> TTIR -> TTGIR -> LLIR -> PTX -> cubin)
runs on the CPU. Tests use this to prove that every template compiles for real (the interpreter
accepts code the compiler rejects), and `ptxas_report` reads registers and spills with no device.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


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
