"""The Triton split-KV decode attention over the latent cache (`kernels/_mla_decode_triton.py`) run in Triton's
interpreter on the CPU, against a float64 recomputation of absorbed attention: the only way to execute it without a
GPU. Small latent dims and the V3 ones (512 + 64), 2 to 128 heads (one to four head blocks), batch 1 and 3 with
different row lengths (1, partial tiles, the full buffer) over a strided view of a longer buffer (as the cache's
storage), one and several tiles per split, and the fused form (the roped query read from a tensor of its own, W_UV
applied in the combine kernel); fp32 and bf16 (the interpreter's bf16 `tl.dot` patched as in
`triton_interpreter_check.py`, whose docstring tells what Python it needs).

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/mla_decode_interpreter_check.py [--json out.json]
"""

import argparse
import contextlib
import json
import os
import sys

import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1: the kernels run in Triton's interpreter, on the CPU")

from hf_deepseek.kernels import _mla_decode_triton  # noqa: E402
from hf_deepseek.kernels.mla_decode_triton import reference  # noqa: E402


def float64_attention(query, storage, lengths, scale, latent):
    out = []
    for b in range(storage.shape[0]):
        keys = storage[b, : int(lengths[b])].double()
        probs = torch.softmax(query[b].double() @ keys.T * scale, dim=-1)
        out.append(probs @ keys[:, :latent])
    return torch.stack(out)


def relative_error(got, want) -> float:
    return float((got.double() - want).norm() / want.norm())


CASES = [  # (batch, heads, latent, rope, max_len, lengths, block_t, target programs)
    (1, 2, 32, 16, 100, [100], 32, 128),
    (1, 2, 32, 16, 100, [37], 16, 2),
    (3, 16, 32, 16, 100, [1, 50, 100], 32, 128),
    (3, 20, 64, 16, 96, [96, 5, 33], 16, 4),
    (1, 16, 512, 64, 80, [80], 32, 128),
    (3, 16, 512, 64, 64, [64, 1, 40], 32, 2),
    (1, 128, 512, 64, 48, [45], 16, 128),
    (2, 2, 32, 16, 320, [320, 150], 16, 128),  # 20 splits: the combine in chunks of 8
]


def run(dtype: torch.dtype) -> dict[str, float]:
    results = {}
    torch.manual_seed(0)
    for batch, heads, latent, rope, max_len, lengths, block_t, target in CASES:
        storage = torch.randn(batch, max_len + 7, latent + rope).to(dtype)[:, :max_len]  # a view, as the cache's
        query = (torch.randn(batch, heads, latent + rope) * 2).to(dtype)
        lens = torch.tensor(lengths, dtype=torch.int32)
        scale = (latent + rope) ** -0.5
        _mla_decode_triton.TARGET_PROGRAMS = target
        got = _mla_decode_triton.launch(query, storage, lens, scale, latent, block_t)
        want = float64_attention(query, storage, lens, scale, latent)
        name = f"{str(dtype)[6:]} B{batch} H{heads} {latent}+{rope} L{max_len} {lengths} T{block_t} P{target}"
        results[name] = relative_error(got, want)
        results[name + " (torch reference)"] = relative_error(reference(query, storage, lens, scale, latent), want)
        # the fused form: the roped query a strided tensor of its own, W_UV [H, v, latent] a view of kv_b's weight
        v = 128 if latent == 512 else 48  # 48: the last of two BLOCK_V chunks masked
        w_uv = (torch.randn(heads, 64 + v, latent) * latent**-0.5).to(dtype)[:, 64:]
        q_rope = query[..., latent:].transpose(0, 1).contiguous().transpose(0, 1)  # strides (H*rope... apart)
        fused = _mla_decode_triton.launch(query[..., :latent], storage, lens, scale, latent, block_t,
                                          query_rope=q_rope, w_uv=w_uv)  # fmt: skip
        latent_out = want.to(dtype).double()  # rounded to the storage dtype, as the kernel and the model round it
        results[name + " fused W_UV"] = relative_error(fused, torch.einsum("bhr,hvr->bhv", latent_out, w_uv.double()))
    _mla_decode_triton.TARGET_PROGRAMS = 128
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the errors here")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from triton_interpreter_check import bf16_dot

    results = run(torch.float32)
    with contextlib.ExitStack() as stack:
        stack.enter_context(bf16_dot())
        results.update(run(torch.bfloat16))
    ok = True
    for name, err in results.items():
        bound = 1e-5 if name.startswith("float32") else 2e-2
        ok &= err < bound
        print(f"{name:82s} rel err {err:.2e} {'ok' if err < bound else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("all ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
