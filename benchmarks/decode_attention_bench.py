"""Time one layer's decode attention over the latent cache, through the model's own paths
(`modeling/mla_decode.py`): FlashMLA's split-KV kernel (`flash_cache_attention`, its schedule computed per call as
the first layer does, and shared as the later layers take it) and the Triton split-KV kernel (`triton_cache_attention`,
HF_DEEPSEEK_DECODE_ATTENTION=triton; its error and torch's against float64) against the absorbed torch attention the
model takes without them (`absorbed_cache_attention`, compiled), W_UK and W_UV included in all. Each call's cache
bytes over its time give the bandwidth it reaches. On an SM90 GPU with `sgl-flash-mla`:

    python benchmarks/decode_attention_bench.py [--heads 16 128] [--cells 1x2048,8x2048] [--sweep] [--json out.json]

Which path a step should take at each (batch, context) is what this decides: at batch 1 and short contexts the
kernel's fixed costs (a schedule, a split-KV pass and a combine pass) may exceed the torch path's. Also: both kernels'
paths with W_UK and W_UV through the per-head kernel (`*_head_matmul_us`, HF_DEEPSEEK_HEAD_MATMUL=1), and the Triton
kernels alone (`triton_core_us`) with the fastest of a sweep of their plans (`triton_core_best_plan`, the
HF_DEEPSEEK_MLA_TRITON_PLAN to set).
"""

import argparse
import json
import time
from types import SimpleNamespace

import torch

from hf_deepseek import DeepSeekConfig
from hf_deepseek.evals.bench_decode import patched_attributes
from hf_deepseek.evals.cuda_graph_timing import graph_time_us
from hf_deepseek.kernels import head_matmul, mla_decode_triton
from hf_deepseek.modeling.attention import MultiHeadLatentAttention
from hf_deepseek.modeling.mla_decode import absorbed_cache_attention, flash_cache_attention, triton_cache_attention

LATENT, ROPE, NOPE, V = 512, 64, 128, 128  # DeepSeek-V3's latent attention dimensions
CELLS = [(1, 2048), (8, 2048), (32, 2048), (1, 32768), (32, 32768)]


def attention_layers(heads: int) -> tuple[MultiHeadLatentAttention, MultiHeadLatentAttention]:
    """Layer 0 (computes FlashMLA's schedule) and layer 1 (takes it from the cache), same weights."""
    config = DeepSeekConfig(hidden_size=512, num_attention_heads=heads, kv_lora_rank=LATENT, qk_rope_head_dim=ROPE,
                            qk_nope_head_dim=NOPE, v_head_dim=V, q_lora_rank=256)  # fmt: skip
    first = MultiHeadLatentAttention(config, 0).to("cuda", torch.bfloat16).eval()
    later = MultiHeadLatentAttention(config, 1).to("cuda", torch.bfloat16).eval()
    later.load_state_dict(first.state_dict())
    return first, later


def float64_attention(attn, q_nope, q_rope, buffer, context: int) -> torch.Tensor:
    """The layer's absorbed attention over the first `context` cached tokens in float64: [B, 1, H, v]."""
    w_uk, w_uv = (w.double() for w in attn.absorbed_weights())
    query = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_nope.double(), w_uk), q_rope.double()], dim=-1)
    keys = buffer[:, :context].double()
    probs = (torch.einsum("bhtd,bsd->bhts", query, keys) * attn.scaling).softmax(dim=-1)
    return torch.einsum("bhts,bsr,hvr->bthv", probs, keys[..., :LATENT], w_uv)


def measure(heads: int, batch: int, context: int, have_flash: bool, have_triton: bool, sweep: bool = False) -> dict:
    from hf_deepseek.kernels import flash_mla_decode as fmd

    torch.manual_seed(0)
    torch._dynamo.reset()  # one compiled graph per cell
    first, later = attention_layers(heads)
    compiled = torch.compile(absorbed_cache_attention, dynamic=False)
    slots = -(-(context + 1) // 64) * 64  # a static cache a little longer than what is written
    storage = torch.randn(batch, slots, LATENT + ROPE, device="cuda", dtype=torch.bfloat16)
    buffer = storage[:, : context + 1]
    q_nope = torch.randn(batch, heads, 1, NOPE, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, heads, 1, ROPE, device="cuda", dtype=torch.bfloat16)
    length = torch.tensor([context], device="cuda")
    cache = SimpleNamespace(flash_schedule=None)  # what flash_cache_attention reads and writes of the cache
    row = dict(heads=heads, batch=batch, context=context, cache_mb=batch * context * (LATENT + ROPE) * 2 / 1e6)
    with torch.no_grad():
        want = absorbed_cache_attention(first, q_nope, q_rope, buffer, length, None).float()
        row["torch_us"] = graph_time_us(lambda: compiled(first, q_nope, q_rope, buffer, length, None))
        if have_flash:
            out = flash_cache_attention(first, q_nope, q_rope, storage, length, cache).float()
            row["flash_error"] = ((out - want).norm() / want.norm()).item()
            row["flash_us"] = graph_time_us(
                lambda: flash_cache_attention(first, q_nope, q_rope, storage, length, cache)
            )
            row["flash_shared_schedule_us"] = graph_time_us(
                lambda: flash_cache_attention(later, q_nope, q_rope, storage, length, cache)
            )
            lengths = fmd.row_lengths(length, batch)
            row["schedule_us"] = graph_time_us(lambda: fmd.flash_mla_schedule(lengths, heads))
        if have_triton:
            exact = float64_attention(first, q_nope, q_rope, buffer, context)
            out = triton_cache_attention(first, q_nope, q_rope, buffer, length).double()
            row["triton_error"] = ((out - exact).norm() / exact.norm()).item()
            row["torch_error"] = ((want.double() - exact).norm() / exact.norm()).item()
            row["triton_us"] = graph_time_us(lambda: triton_cache_attention(first, q_nope, q_rope, buffer, length))
            with patched_attributes([(head_matmul, "ENABLED", True)]):  # as HF_DEEPSEEK_HEAD_MATMUL=1
                row["triton_head_matmul_us"] = graph_time_us(
                    lambda: triton_cache_attention(first, q_nope, q_rope, buffer, length)
                )
                if have_flash:
                    row["flash_head_matmul_us"] = graph_time_us(
                        lambda: flash_cache_attention(later, q_nope, q_rope, storage, length, cache)
                    )
            if sweep:
                row.update(triton_core_sweep(heads, buffer, length))
    for key in ("torch_us", "flash_shared_schedule_us", "triton_us"):
        if key in row:
            row[key.replace("_us", "_gb_s")] = row["cache_mb"] / row[key] * 1e3  # MB per us x 1000: GB/s
    return row


PLANS = [(block_t, target) for block_t in (16, 32, 64) for target in (64, 128, 256)]  # each a compile per cell


def triton_core_sweep(heads: int, buffer: torch.Tensor, length: torch.Tensor) -> dict:
    """The Triton kernels alone (a prepared query, no W_UK / W_UV) at each (BLOCK_T, TARGET_PROGRAMS) of `PLANS`:
    triton_core_us at the default plan, and the fastest plan (HF_DEEPSEEK_MLA_TRITON_PLAN takes it)."""
    from hf_deepseek.kernels._mla_decode_triton import launch

    batch = buffer.shape[0]
    query = torch.randn(batch, heads, LATENT + ROPE, device="cuda", dtype=torch.bfloat16)
    lengths = length.to(torch.int32).expand(batch).contiguous()
    scale = (NOPE + ROPE) ** -0.5
    plans = PLANS + [mla_decode_triton.PLAN] * (mla_decode_triton.PLAN not in PLANS)
    times = {plan: graph_time_us(lambda p=plan: launch(query, buffer, lengths, scale, LATENT, *p)) for plan in plans}
    best = min(times, key=times.get)
    return {"triton_core_us": times[mla_decode_triton.PLAN], "triton_core_best_us": times[best],
            "triton_core_best_plan": ",".join(map(str, best))}  # fmt: skip


def main() -> None:
    from hf_deepseek.kernels import flash_mla_decode as fmd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="*", default=[16, 128])
    parser.add_argument("--json")
    parser.add_argument("--sweep", action="store_true", help="also time the Triton kernels' plans (a compile each)")
    default_cells = ",".join(f"{b}x{c}" for b, c in CELLS)
    parser.add_argument("--cells", default=default_cells, help=f"comma-separated BATCHxCONTEXT ({default_cells})")
    args = parser.parse_args()
    cells = [tuple(int(v) for v in cell.split("x")) for cell in args.cells.split(",")]
    started, rows = time.time(), []
    have_flash = fmd.available()
    have_triton = mla_decode_triton.usable(LATENT, ROPE, torch.bfloat16, torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; FlashMLA: {have_flash}; Triton: {have_triton}")
    for heads in args.heads:
        for batch, context in cells:
            row = measure(heads, batch, context, have_flash, have_triton, args.sweep)
            rows.append(row)
            print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    print(f"{time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
