"""GPU time per call of a small function, as a compiled decode step runs it: warmed up on a side stream, `calls`
calls captured in one CUDA graph and replayed, so launch overhead stays out of the figure. Shared by the kernel
benchmarks (`benchmarks/moe_gemv_tune.py`, `benchmarks/decode_attention_bench.py`) and the GPU timing tests."""

from collections.abc import Callable

import torch

from hf_deepseek.generation.step_graphs import StepGraphs, warm_up


def graph_time_us(fn: Callable[[], object], calls: int = 20, replays: int = 10, warmup: int = 3) -> float:
    """Microseconds per call of `fn` (CUDA), over `replays` replays of a graph of `calls` calls."""
    warm_up(lambda: [fn() for _ in range(warmup)])
    graphs = StepGraphs(fn, (calls,), key=None)
    graphs.replay(calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graphs.replay(calls)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


class ReplayedStep:
    """A compiled decode step (compiled without Inductor's CUDA graphs) captured into one CUDA graph at its first
    call and replayed at every later one, the host only copying the new token and position into the graph's input
    buffers: what a step costs once Dynamo's guards and the CUDA-graph tree's bookkeeping leave the per-step path.
    The other arguments (the cache) must be the same objects on every call; `rewind` (called after the capture's
    warm-up call) undoes what that call wrote, such as a cache's length."""

    def __init__(self, step: Callable, rewind: Callable[[], object] | None = None):
        self.step, self.rewind, self.graphs = step, rewind, None

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs):
        if self.graphs is None:
            self.ids, self.positions = input_ids.clone(), position_ids.clone()

            def run():  # the capture's output stays in `out`, rewritten by every replay
                self.out = self.step(input_ids=self.ids, position_ids=self.positions, **kwargs)

            warm_up(run)
            if self.rewind is not None:
                self.rewind()
            self.graphs = StepGraphs(run, (1,), key=None)
        self.ids.copy_(input_ids)
        self.positions.copy_(position_ids)
        self.graphs.replay(1)
        return self.out


__all__ = ["ReplayedStep", "graph_time_us"]
