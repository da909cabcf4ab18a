"""GPU time per call of a small function, as a compiled decode step runs it: warmed up on a side stream, `calls`
calls captured in one CUDA graph and replayed, so launch overhead stays out of the figure. Shared by the kernel
benchmarks (`benchmarks/moe_gemv_tune.py`, `benchmarks/decode_attention_bench.py`) and the GPU timing tests."""

from collections.abc import Callable

import torch


def graph_time_us(fn: Callable[[], object], calls: int = 20, replays: int = 10, warmup: int = 3) -> float:
    """Microseconds per call of `fn` (CUDA), over `replays` replays of a graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
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


__all__ = ["graph_time_us"]
