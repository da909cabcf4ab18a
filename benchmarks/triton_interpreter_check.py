"""The project's FP8 Triton kernels run in Triton's interpreter on the CPU, against their torch references: the rowwise
quantiser (`fp8_triton.quantize_rowwise_triton`, bit for bit against `quantize_rowwise` of the padded operand) and
the weight-only FP8 matrix-vector kernels of decode (`kernels/_moe_gemv_triton.py`, relative error against the
float64 product with the dequantised weights, next to the bf16 kernel's own error against its reference).

Needs a Python with torch and triton (a CUDA build of torch brings triton; no GPU is used) and numpy below 2.4
(triton 3.6's interpreter converts 1-element arrays to scalars, which numpy 2.4 refuses):

    TRITON_INTERPRET=1 python benchmarks/triton_interpreter_check.py [--json out.json]
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: the kernels run in Triton's interpreter, on the CPU")

from hf_deepseek import DeepSeekConfig  # noqa: E402
from hf_deepseek.kernels import _moe_gemv_triton, moe_gemv  # noqa: E402
from hf_deepseek.modeling.fp8 import FP8InferenceExperts, FP8InferenceLinear  # noqa: E402
from hf_deepseek.modeling.fp8_numerics import _ceil_to, quantize_rowwise  # noqa: E402
from hf_deepseek.modeling.fp8_triton import quantize_rowwise_triton  # noqa: E402
from hf_deepseek.modeling.moe import RoutedExperts  # noqa: E402


def varied(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols) * torch.exp(torch.randn(rows, 1) * 2) * torch.exp(torch.randn(1, cols))


def rowwise_quantiser() -> dict[str, bool]:
    """Bit-identical to the reference: activations, transposed views, long rows, batched and transposed weights."""
    torch.manual_seed(0)
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        for pow2 in (False, True):
            x, long_rows = varied(300, 1000).to(dtype), varied(40, 2600).to(dtype)
            w = varied(600, 330).view(3, 200, 330).to(dtype)
            for name, view, multiple in (("x", x, 16), ("x^T", x.t(), 16), ("x slice", x[:37, :51], 64),
                                         ("long rows", long_rows, 16), ("long rows^T", long_rows.t(), 16),
                                         ("w", w, 1), ("w^T", w.transpose(1, 2), 1)):  # fmt: skip
                rows, cols = view.shape[-2:]
                rows_out, cols_out = _ceil_to(rows, multiple), _ceil_to(cols, 16)
                q, scale = quantize_rowwise_triton(view, rows_out, cols_out, pow2)
                padded = F.pad(view, (0, cols_out - cols, 0, rows_out - rows))
                q_ref, scale_ref = quantize_rowwise(padded, pow2, check=False)
                same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
                results[f"{name} {str(dtype)[6:]} pow2={pow2}"] = same
    return results


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def weight_only_kernels() -> dict[str, float]:
    """FP8 experts and linear layers (bf16 activations) against float64, beside the bf16 experts kernel."""
    results = {}
    for inter, tokens, hidden in ((160, 3, 256), (1408, 2, 640)):
        torch.manual_seed(inter)
        config = DeepSeekConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=16)
        experts = RoutedExperts(config)
        with torch.no_grad():
            experts.gate_up_proj.normal_(0, hidden**-0.5)
            experts.down_proj.normal_(0, inter**-0.5)
        fp8 = FP8InferenceExperts.from_experts(experts, config)
        x = torch.randn(tokens, hidden).to(torch.bfloat16)
        indices = torch.stack([torch.randperm(16)[:6] for _ in range(tokens)])
        weights = torch.rand(tokens, 6).softmax(dim=-1)
        gate_up, down = fp8.dequantized_weights()
        want = moe_gemv.reference(x.double(), indices, weights.double(), gate_up.double(), down.double())
        scales = dict(gate_up_scale=fp8.gate_up_proj_scale_inv, down_scale=fp8.down_proj_scale_inv)
        got = _moe_gemv_triton.launch(x, indices, weights, fp8.gate_up_proj, fp8.down_proj, **scales)
        bf16 = _moe_gemv_triton.launch(x, indices, weights, gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
        want_bf16 = moe_gemv.reference(x, indices, weights, gate_up.to(torch.bfloat16), down.to(torch.bfloat16))
        results[f"fp8 experts, I={inter}, {tokens} tokens"] = relative_error(got, want)
        results[f"bf16 experts kernel vs its reference, I={inter}"] = relative_error(bf16, want_bf16)
    for k, n, rows in ((320, 200, 3), (2048, 576, 1), (512, 1000, 4)):
        torch.manual_seed(k)
        layer = FP8InferenceLinear.from_linear(torch.nn.Linear(k, n, bias=False))
        x = torch.randn(rows, k).to(torch.bfloat16)
        got = _moe_gemv_triton.launch_linear_fp8(x, layer.weight, layer.weight_scale_inv)
        want = x.double() @ layer.dequantized(torch.float64).weight.T
        results[f"fp8 linear [{n}, {k}], {rows} rows"] = relative_error(got, want)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    quantiser, kernels = rowwise_quantiser(), weight_only_kernels()
    print(f"rowwise quantiser: {sum(quantiser.values())}/{len(quantiser)} cases bit-identical")
    for name, same in quantiser.items():
        if not same:
            print(f"  DIFFERENT: {name}")
    for name, error in kernels.items():
        print(f"{name}: relative error {error:.2e}")
    if args.json:
        with open(args.json, "w") as out:
            record = {"command": "TRITON_INTERPRET=1 python " + " ".join(sys.argv), "torch": torch.__version__,
                      "rowwise_quantiser_bit_identical": quantiser, "relative_errors": kernels}  # fmt: skip
            json.dump(record, out, indent=1)
    sys.exit(0 if all(quantiser.values()) else 1)
