"""Several decode steps of `generate()`'s device loop captured in one CUDA graph, replayed without Python.

Inductor's own CUDA graphs (mode "reduce-overhead", cudagraph trees) replay one graph per step, and every replay
still costs host time: Dynamo's guards over the model, the tree's checks of its inputs, the launch. At batch 1 that
host time is about as long as the step itself (H200, 2026-12-04: generate() 1.32 ms a token against 1.15 ms of
kernels a step), so the GPU waits between steps. Here the step is compiled without Inductor's graphs and `STEPS`
consecutive steps are captured in one `torch.cuda.CUDAGraph` over the loop's fixed buffers; the host replays it
once every `STEPS` tokens and checks for end-of-sequence between replays. The graph stays with the buffers and
later calls reuse it while the token choice is the same and the model's weights stay where they were (in-place
updates, as an optimizer step or `load_state_dict` makes them, keep their addresses). On with
HF_DEEPSEEK_STEP_GRAPHS=1 (`bench decode` row `ours-generate-step-graphs`); a capture that fails is remembered on
the model, which then steps through Inductor's per-step graphs.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENABLED = os.environ.get("HF_DEEPSEEK_STEP_GRAPHS", "0") == "1"  # opt-in until measured on the GPU
STEPS = 8  # decode steps one replay runs: the device loop's check interval (fast_generate.CHECK_EVERY)
WARMUP_STEPS = 2  # steps run one by one before the first capture (compilation, lazily allocated kernel state)


def weights_key(model: torch.nn.Module) -> tuple[int, ...]:
    """Where the model's weights live: a captured graph reads these addresses."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


@dataclass
class StepGraph:
    """`STEPS` decode steps in one CUDA graph, with what it was captured for."""

    graph: torch.cuda.CUDAGraph
    key: tuple  # the token choice's settings, the compiled step, the weights' addresses
    keep_alive: object  # tensors the graph reads that belong to the capturing call (its TokenChoice's eos ids)

    def replay(self) -> None:
        self.graph.replay()


def capture(run_step: Callable[[], None], key: tuple, keep_alive: object) -> StepGraph:
    """Capture `STEPS` calls of `run_step` (recorded, not run: the loop's buffers do not move) in one graph.
    The step must have run before on this stream, so that compilation and one-time set-up happen outside."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(STEPS):
            run_step()
    return StepGraph(graph, key, keep_alive)


__all__ = ["ENABLED", "STEPS", "WARMUP_STEPS", "StepGraph", "capture", "weights_key"]
