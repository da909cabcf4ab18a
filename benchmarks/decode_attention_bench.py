"""Time one layer's decode attention over the latent cache: FlashMLA's split-KV kernel (`kernels/flash_mla_decode.py`,
with its schedule computed per call and, as the decode step shares it across layers, computed once) against the
torch path the model takes without it (absorbed attention: scores against the cached latent and rope key, an fp32
softmax under the static cache's padding mask, the probabilities against the latent), compiled with CUDA graphs.
Each call's cache bytes over its time give the bandwidth it reaches. On an SM90 GPU with `sgl-flash-mla`:

    python benchmarks/decode_attention_bench.py [--heads 16 128] [--json out.json]

Which path a step should take at each (batch, context) is what this decides: at batch 1 and short contexts the
kernel's fixed costs (a schedule, a split-KV pass and a combine pass) may exceed the torch path's.
"""

import argparse
import json
import time

import torch

LATENT, ROPE = 512, 64
CELLS = [(1, 2048), (8, 2048), (32, 2048), (1, 32768), (32, 32768)]


def time_us(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time per call, `calls` calls captured in one CUDA graph and replayed (as a decode step runs them)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


def torch_attention(q_latent, q_rope, storage, keep, scale):
    """The model's absorbed decode attention (`attention._absorbed_attention` after its projections)."""
    bsz, heads = q_latent.shape[:2]
    latent, k_rope = storage[..., :LATENT], storage[..., LATENT:]
    scores = torch.bmm(q_latent.reshape(bsz, heads, -1), latent.transpose(1, 2))
    scores = scores + torch.bmm(q_rope.reshape(bsz, heads, -1), k_rope.transpose(1, 2))
    scores = (scores.float() * scale).masked_fill(~keep[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(storage.dtype)
    return torch.bmm(probs, latent).view(bsz, heads, 1, LATENT)


def measure(heads: int, batch: int, context: int, have_flash: bool) -> dict:
    from hf_deepseek.kernels import flash_mla_decode as fmd

    torch.manual_seed(0)
    torch._dynamo.reset()  # one compiled graph per cell
    compiled = torch.compile(torch_attention, dynamic=False)
    slots = -(-(context + 1) // 64) * 64  # a static cache a little longer than what is written
    storage = torch.randn(batch, slots, LATENT + ROPE, device="cuda", dtype=torch.bfloat16)
    q_latent = torch.randn(batch, heads, 1, LATENT, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, heads, 1, ROPE, device="cuda", dtype=torch.bfloat16)
    keep = torch.zeros(batch, slots, dtype=torch.bool, device="cuda")
    keep[:, :context] = True
    length, scale = torch.tensor([context], device="cuda"), (128 + ROPE) ** -0.5
    row = dict(heads=heads, batch=batch, context=context, cache_mb=batch * context * (LATENT + ROPE) * 2 / 1e6)
    with torch.no_grad():
        want = torch_attention(q_latent, q_rope, storage, keep, scale).float()
        row["torch_us"] = time_us(lambda: compiled(q_latent, q_rope, storage, keep, scale))
        if have_flash:
            out = fmd.flash_latent_attention(q_latent, q_rope, storage, length, scale).float()
            row["flash_error"] = ((out - want).norm() / want.norm()).item()
            row["flash_us"] = time_us(lambda: fmd.flash_latent_attention(q_latent, q_rope, storage, length, scale))
            lengths = fmd.row_lengths(length, batch)
            schedule = fmd.flash_mla_schedule(lengths, heads)
            row["flash_shared_schedule_us"] = time_us(
                lambda: fmd.flash_latent_attention(q_latent, q_rope, storage, length, scale, schedule)
            )
            row["schedule_us"] = time_us(lambda: fmd.flash_mla_schedule(lengths, heads))
    for key in ("torch_us", "flash_shared_schedule_us"):
        if key in row:
            row[key.replace("_us", "_gb_s")] = row["cache_mb"] / row[key] * 1e3  # MB per us x 1000: GB/s
    return row


def main() -> None:
    from hf_deepseek.kernels import flash_mla_decode as fmd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="*", default=[16, 128])
    parser.add_argument("--json")
    args = parser.parse_args()
    started, rows = time.time(), []
    have_flash = fmd.available()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; FlashMLA: {have_flash}", flush=True)
    for heads in args.heads:
        for batch, context in CELLS:
            row = measure(heads, batch, context, have_flash)
            rows.append(row)
            print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    print(f"{time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
