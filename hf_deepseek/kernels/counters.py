"""Zeroed int32 counters for kernels whose last program to finish does the launch's closing work (the router kernel
routes its token block and sums the expert counts, the MLA front moves the cache's length on): one buffer per
(kernel, device), which each last program sets back to zero, so that one buffer serves every launch on a stream,
CUDA-graph replays included."""

import threading

import torch

_BUFFERS: dict[tuple[str, torch.device], torch.Tensor] = {}


def counters(name: str, size: int, device: torch.device) -> torch.Tensor:
    """Kernel `name`'s [size] int32 counters on `device`, zero between launches. A call captured into a CUDA graph
    before any other gets a fresh zeroed buffer (a memset in the graph)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = _BUFFERS.get((name, device))
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(size, dtype=torch.int32, device=device)
        buffer = _BUFFERS[(name, device)] = zeros_outside_graph_pools(size, device)
    return buffer


def zeros_outside_graph_pools(size: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 [size] from the ordinary allocator. While Inductor's CUDA-graph trees warm a function up, every
    allocation of the warming thread goes to the graph pool, and a tensor kept there beyond the call fails their
    check ("tensor(s) in the cudagraph pool not tracked as outputs"): generate()'s device loop fell back to
    transformers' loop. So a CUDA buffer is made on a thread of its own, outside any pool."""
    if device.type != "cuda":
        return torch.zeros(size, dtype=torch.int32, device=device)
    made = []

    def make():
        made.append(torch.zeros(size, dtype=torch.int32, device=device))
        torch.cuda.synchronize(device)  # the memset done before any stream of the caller reads it

    thread = threading.Thread(target=make, name="hf_deepseek-kernel-counters")
    thread.start()
    thread.join()
    if not made:
        raise RuntimeError(f"could not allocate kernel counters on {device}")
    return made[0]


__all__ = ["counters", "zeros_outside_graph_pools"]
