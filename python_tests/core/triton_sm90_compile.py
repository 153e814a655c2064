"""Compiles the Triton kernels for an sm_90 GPU (H100/H200) on a machine without one: Triton
lowers a kernel to PTX and assembles it with its own ptxas, no driver needed. Run without
TRITON_INTERPRET (the interpreter replaces the kernels by Python functions). Prints one JSON
object: per kernel variant, the number of fused multiply-adds on float32 (``fma.rn.f32``) in
its PTX and the size of its cubin. The launch options are the backend's own, so a variant
compiles here exactly as the backend would compile it on the GPU."""

import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from zofo_kernels.core.backends.base import DISTRIBUTION_CODES
from zofo_kernels.core.backends.triton import kernels as K
from zofo_kernels.core.backends.triton.launcher import TritonBackend

# the launch ABI's runtime arguments and their types (the launcher passes these in order)
TYPES = {"out_ptr": "*fp32", "tensor_table": "*i64", "program_table": "*i64",
         "mask_table": "*i64", "thresholds_ptr": "*fp32", "grads_ptr": "*fp32",
         "seed": "i64", "start": "i64", "numel": "i64", "direction": "u32", "scale": "fp32",
         "restore_scale": "fp32", "restore_direction": "u32", "rank": "i32",
         "lowrank_scale": "fp32", "lr": "fp32", "q": "i32", "weight_decay": "fp32"}
GAUSS, RADE = DISTRIBUTION_CODES["gaussian"], DISTRIBUTION_CODES["rademacher"]
FP32, FP16, BF16 = K.STORAGE_FLOAT32, K.STORAGE_FLOAT16, K.STORAGE_BFLOAT16
SWEEP = dict(BLOCK=1024, PRECISE=True, ALIGNED=True, HAS_RESTORE=True, HAS_MASK=False,
             HAS_FACTORS=False)
# each launch-time switch on and off at least once, every storage dtype and distribution
VARIANTS = {
    "noise gaussian": (K._noise_kernel, dict(BLOCK=1024, ALIGN=4, DIST=GAUSS, PRECISE=True)),
    "noise rademacher": (K._noise_kernel, dict(BLOCK=1024, ALIGN=4, DIST=RADE, PRECISE=True)),
    "perturb fp32 gaussian": (K._perturb_kernel, dict(SWEEP, STORAGE=FP32, DIST=GAUSS)),
    "perturb bf16 rademacher unaligned, no restore": (K._perturb_kernel, dict(
        SWEEP, STORAGE=BF16, DIST=RADE, ALIGNED=False, HAS_RESTORE=False)),
    "perturb fp16 masked": (K._perturb_kernel, dict(SWEEP, STORAGE=FP16, DIST=GAUSS,
                                                    HAS_MASK=True)),
    "perturb fp32 low-rank": (K._perturb_kernel, dict(SWEEP, STORAGE=FP32, DIST=RADE,
                                                      HAS_FACTORS=True)),
    "update fp32 gaussian": (K._update_kernel, dict(SWEEP, STORAGE=FP32, DIST=GAUSS,
                                                    STOCHASTIC=False)),
    "update bf16 stochastic masked": (K._update_kernel, dict(
        SWEEP, STORAGE=BF16, DIST=RADE, STOCHASTIC=True, HAS_MASK=True)),
    "update fp32 low-rank": (K._update_kernel, dict(SWEEP, STORAGE=FP32, DIST=GAUSS,
                                                    STOCHASTIC=False, HAS_FACTORS=True)),
    "magnitude mask bf16": (K._magnitude_mask_kernel, dict(STORAGE=BF16, WORDS=32)),
}


def compile_variant(kernel, constexprs: dict, options: dict):
    runtime = [a for a in kernel.arg_names if a not in constexprs]
    signature = {a: TYPES[a] for a in runtime}
    signature.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def main():
    backend = TritonBackend()
    options = backend._launch_options()
    out = {"options": options}
    for name, (kernel, constexprs) in VARIANTS.items():
        compiled = compile_variant(kernel, constexprs, options)
        out[name] = {"fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", compiled.asm["ptx"])),
                     "cubin_bytes": len(compiled.asm["cubin"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
