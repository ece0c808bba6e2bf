"""Compile every Triton kernel variant for an H100 (sm_90) without a GPU and print a JSON summary of
the PTX: run by tests/merging/backends/test_gpu_compile.py in a child process (Triton's interpreter must be off here).

The interpreter runs the kernels' semantics on CPU; this checks what it cannot: that they type-check,
lower and pass ptxas for the real target, and that the float32 operations stay as written (no FMA
contraction, correctly rounded divisions), which the bit-exactness with the CPU kernels relies on.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default a user gets today: fusion allowed

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from magmax.merging.backends.gpu import kernels as k, triton as _gpu  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TABLES = {"block_segment": "*i32", "block_start": "*i64", "segment_numel": "*i64", "segment_offset": "*i64",
          "table": "*i64"}
ARGS = {
    "fold_segments": dict(TABLES, state_ptr="*fp32", finite="*i64", S="i32", G="i32", divisor="fp32"),
    "ties_sample": dict(TABLES, sample="*fp32", S="i32", G="i32", chunk_offset="i64", stride="i64", cap="i64"),
    "ties_count": dict(TABLES, low="*fp32", high="*fp32", below="*i64", gathered="*fp32", filled="*i64", S="i32",
                       G="i32", cap="i64"),
    "ties_merge": dict(TABLES, state_ptr="*fp32", kappas="*fp32", counts="*i64", S="i32", G="i32",
                       zero_positive="i32"),
}


def compile_ptx(name: str, constexprs: dict) -> str:
    fn = getattr(k, name)
    signature = {arg: ("constexpr" if arg in constexprs else ARGS[name][arg]) for arg in fn.arg_names}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                              options={"num_warps": 4})
    return compiled.asm["ptx"]


def main() -> None:
    report = []
    for dtype in (tl.float32, tl.bfloat16, tl.float16):
        for op in (k.OP_MAGMAX, k.OP_SUM, k.OP_RANDOM):
            for first in (True, False):
                for has_base in (True, False):
                    consts = {"FIRST": first, "DIVIDE": op == k.OP_SUM, "OP": op, "HAS_BASE": has_base,
                              "DTYPE": dtype, "BLOCK": _gpu.BLOCK}
                    report.append(("fold_segments", str(dtype), op, compile_ptx("fold_segments", consts)))
        for name in ("ties_sample", "ties_count", "ties_merge"):
            consts = {"HAS_BASE": True, "DTYPE": dtype, "BLOCK": _gpu.BLOCK}
            report.append((name, str(dtype), -1, compile_ptx(name, consts)))
    json.dump([{"kernel": n, "dtype": d, "op": op, "fma": ptx.count("fma."), "div_rn": ptx.count("div.rn.f32"),
                "div_other": ptx.count("div.full.f32") + ptx.count("div.approx.f32")} for n, d, op, ptx in report],
              sys.stdout)


if __name__ == "__main__":
    main()
