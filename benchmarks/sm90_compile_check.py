"""Compile decode, routing and optimizer kernels for Hopper (sm_90) on a machine without a GPU: Triton's front end
and ptxas run here, so a kernel that would not compile on the device machine fails here, before a device call is
spent on it. Triton's interpreter (`triton_interpreter_check.py`) checks what the kernels compute; this checks that
they build, at the launch configurations the model uses, and prints each one's shared memory.

    PYTHONPATH=. python benchmarks/sm90_compile_check.py      # a Python with triton (a CUDA build of torch brings it)
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hf_deepseek.kernels import (
    _adamw_triton,
    _head_matmul_triton,
    _mla_chain_triton,
    _mla_decode_triton,
    _mla_front_triton,
    _moe_gemv_triton,
    moe_routing,
)

TARGET = GPUTarget("cuda", 90, 32)
# pointer arguments by name (the rest of a kernel's non-constexpr arguments are int32, `eps`-like ones fp32)
POINTERS = {"len_ptr": "*i64", "sem_ptr": "*i32", "lens_ptr": "*i32", "part_ptr": "*fp32", "stat_ptr": "*fp32",
            "idx_ptr": "*i64", "wt_ptr": "*fp32", "counts_ptr": "*i64", "partial_ptr": "*i32", "logits_ptr": "*fp32",
            "bias_ptr": "*fp32", "norm_ptr": "*bf16"}  # fmt: skip
FLOATS = {
    "eps",
    "eps_q",
    "eps_kv",
    "scale",
    "scale_log2",
    "lr_decay",
    "beta1",
    "beta2",
    "step_size",
    "bias_correction2_sqrt",
}


def compile_sm90(fn, constexprs: dict, num_warps: int, pointers: dict | None = None):
    """`fn` (a triton.jit function) compiled for sm_90 with these constexpr values (the rest at their defaults);
    pointers bf16 unless named in POINTERS or `pointers`."""
    names = fn.arg_names
    # constexprs left out take their defaults, as a launch that does not name them does
    constexprs = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default} | constexprs
    kinds = {**POINTERS, **(pointers or {})}
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = kinds.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in FLOATS else "i32"
    source = ASTSource(
        fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names if signature[n].startswith("*")},
    )  # fmt: skip
    return triton.compile(source, target=TARGET, options=dict(num_warps=num_warps))


def cases():
    """(name, kernel, constexprs, warps, pointer dtypes) at the model's launch configurations."""
    for rows in (1, 4, 32):  # the MLA front at batch 1, a few rows and a FlashMLA batch (16 heads, V3's ranks)
        front = {**_mla_front_triton.block_sizes(rows, 16, 512, 128, 64), "INTERLEAVED": True, "PRECISION": None}
        yield f"mla front, {rows} rows", _mla_front_triton._front_kernel, front, 4, None
    yield "mla front with PDL", _mla_front_triton._front_kernel, {**front, "PDL": True}, 4, None
    one_row = _mla_front_triton.block_sizes(1, 16, 512, 128, 64)
    for phase in (0, 1):  # the batch-1 chain, persistent with its grid barriers, and a phase alone
        chain = dict(BLOCK_N=8, BLOCK_K=256, STAGES=3, Q_BLOCK_N=16, FRONT_N=one_row["BLOCK_N"],
                     FRONT_K=one_row["BLOCK_K"], BLOCK_R=512, BLOCK_HALF=32, INTERLEAVED=True, PHASE=phase, Q_LINES=32,
                     FRONT_LINES=1, NOPE_PAD=128)  # fmt: skip
        yield f"mla chain, phase {phase}", _mla_chain_triton._chain_kernel, chain, 4, {"sync_ptr": "*i32"}
    split = dict(SPLITS=32, SPLIT_LEN=64, BLOCK_T=64, BLOCK_H=16, LATENT=512, ROPE=64)  # the default plan at 1 / 2k
    yield "attention split", _mla_decode_triton._split_kernel, split, 4, {"len_ptr": "*i32"}
    head = dict(BLOCK_T=1, BLOCK_N=64, BLOCK_K=128, BLOCK_R=64, PRECISION=None)
    yield "W_UK per head with the roped tail", _head_matmul_triton._head_kernel, head, 4, None
    for v_program in (32, 128):  # the combine kernel with W_UV, its rows over more programs or one
        combine = dict(SPLITS=32, SPLIT_LEN=64, BLOCK_S=32, CHUNK=8, LATENT=512, V=128, BLOCK_V=32, V_PROGRAM=v_program)
        name = f"attention combine + W_UV, {v_program} values a program"
        yield name, _mla_decode_triton._combine_kernel, combine, 4, {"len_ptr": "*i32"}
    for scaled in (False, True):  # the q_a norm in q_b's launch, bf16 and FP8 weights (32-row tiles, K chunks of 256)
        norm = dict(BLOCK_N=32, BLOCK_K=256, STAGES=None, SCALED=scaled)
        weight = {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32"} if scaled else {}
        yield f"norm + linear, FP8 {scaled}", _moe_gemv_triton._norm_gemv_kernel, norm, 4, weight
    for scaled in (False, True):  # a MoE layer's two kernels in one launch, at the bf16 and FP8 defaults, shared folded
        fp8 = dict(BLOCK_N=32, BLOCK_K=256, STAGES=None, D_BLOCK_N=32, D_BLOCK_K=256, D_SPLIT_K=2, D_STAGES=None,
                   LINES=8, LINE=128)  # fmt: skip
        bf16 = dict(BLOCK_N=16, BLOCK_K=256, STAGES=3, D_BLOCK_N=16, D_BLOCK_K=256, D_SPLIT_K=1, D_STAGES=3,
                    LINES=32, LINE=64)  # fmt: skip
        experts = {**(fp8 if scaled else bf16), "SCALED": scaled, "N_SHARED": 2}
        weight = "*fp8e4nv" if scaled else "*bf16"
        types = {"weight_ptr": "*fp32", "out_ptr": "*fp32", "ready_ptr": "*i32", "done_ptr": "*i32"}
        for name in ("gate_up_ptr", "up_ptr", "down_ptr", "sg_ptr", "su_ptr", "sd_ptr"):
            types[name] = weight
        for name in ("gate_up_s_ptr", "down_s_ptr", "sgs_ptr", "sus_ptr", "sds_ptr"):
            types[name] = "*fp32"
        name = f"experts' gate/up and down in one launch, FP8 {scaled}"
        yield name, _moe_gemv_triton._experts_kernel, experts, 4, types
        gate_up = dict(SCALED=scaled, BLOCK_N=experts["BLOCK_N"], BLOCK_K=256, STAGES=experts["STAGES"], N_SHARED=2)
        types |= {"w_ptr": weight, "u_ptr": weight, "s_ptr": "*fp32"}
        yield f"experts' gate/up, FP8 {scaled}", _moe_gemv_triton._gate_up_kernel, gate_up, 4, types
        down = dict(SCALED=scaled, ROUTED=True, BLOCK_N=experts["D_BLOCK_N"], BLOCK_K=256, SPLIT_K=experts["D_SPLIT_K"],
                    STAGES=experts["D_STAGES"], N_SHARED=2)  # fmt: skip
        yield f"experts' down, FP8 {scaled}", _moe_gemv_triton._down_kernel, down, 4, types
        pair = dict(BLOCK_N=4, BLOCK_K=2048, STAGES=None, SCALED=scaled)  # q_a and kv_a of one row
        pair_types = {"w1_ptr": weight, "w2_ptr": weight, "s1_ptr": "*fp32", "s2_ptr": "*fp32"}
        yield f"two linear layers of one input, FP8 {scaled}", _moe_gemv_triton._pair_kernel, pair, 4, pair_types
    adamw = {"BLOCK": _adamw_triton.BLOCK}  # bf16 parameters with bf16 moments, as the bench trains them
    yield "AdamW", _adamw_triton._adamw_kernel, adamw, _adamw_triton.WARPS, None
    for count in (True, False):  # the router: decode's (counts) and training's given logits (none)
        router = dict(E=64, G=8, EG=8, G_PAD=8, EG_PAD=8, TOP_K=6, K_PAD=8, TOPK_GROUP=4, GROUPED=True,
                      GROUP_MAX=False, SOFTMAX=False, NORM=True, FUSED=False, ONE_BLOCK=False, SUM_ROWS=8, E_PAD=64,
                      ACCURATE=True, BLOCK_T=8, BLOCK_E=1, BLOCK_D=16, COUNT=count)  # fmt: skip
        yield f"router, counts {count}", moe_routing._router_kernel, router, 1, {"x_ptr": "*fp32", "w_ptr": "*fp32"}
    for add_norm in (False, True):  # decode at batch 1: the logits in the launch, the residual sum and norm too
        fused = {**router, "FUSED": True, "ONE_BLOCK": True, "BLOCK_T": 1, "BLOCK_D": 2048, "COUNT": True,
                 "ADD_NORM": add_norm}  # fmt: skip
        yield f"router at batch 1, sum and norm {add_norm}", moe_routing._router_kernel, fused, 1, {"w_ptr": "*fp32"}


def main() -> int:
    failed = 0
    for name, fn, constexprs, warps, pointers in cases():
        try:
            kernel = compile_sm90(fn, constexprs, warps, pointers)
            print(f"{name:55s} ok: {kernel.metadata.shared} B shared")
        except Exception as error:  # every case reported, then the exit status
            failed += 1
            print(f"{name:55s} FAILED: {type(error).__name__}: {str(error)[:300]}")
    print("all compiled" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
