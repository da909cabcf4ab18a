"""The device loop's decode step in CUDA graphs captured by hand: one graph of a single step and one of several steps
in a row, over the loop's fixed buffers, so the host does nothing per token but call `replay()`, and that only once
every few tokens.

Inductor's own CUDA graphs (torch.compile's "reduce-overhead") replay one step per call behind Dynamo's guards and
the CUDA-graph tree's bookkeeping; at batch 1 that host work outlasted the step's kernels on an H100 (1.55 ms a
step, the host busy 1.54 of them, against 1.16 ms replayed from a graph captured by hand, docs/PERF.md). Here the
step is compiled without them and captured as it is.
The graphs hold the addresses of everything the step touches (buffers, cache, weights, the token choice's
tensors), so they are kept with the loop's buffers and captured again when any of those may have moved.
"""

from collections.abc import Callable, Hashable

import torch


class StepGraphs:
    """For each n in `sizes`, a CUDA graph of `n` consecutive calls of `step` (which must read and write only
    tensors at fixed addresses), all in one memory pool. Capture launches nothing: the step must have run once
    before (compilation, lazy allocations), outside any capture. `key` says what the capture assumed (see
    `graph_key`); `keep` holds objects the graphs read from, alive as long as they are."""

    def __init__(self, step: Callable[[], object], sizes: tuple[int, ...], key: Hashable, keep: tuple = ()):
        self.key, self.keep, self.graphs = key, keep, {}
        pool = torch.cuda.graph_pool_handle()
        try:
            for n in sorted(set(sizes), reverse=True):  # the largest first: the pool is sized by it
                graph = torch.cuda.CUDAGraph()
                # thread_local: another thread's CUDA work (a chat server's) does not invalidate this capture
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    for _ in range(n):
                        step()
                self.graphs[n] = graph
        except Exception:
            self.graphs.clear()
            release_generators()
            raise

    @property
    def sizes(self) -> list[int]:
        return sorted(self.graphs, reverse=True)

    def replay(self, n: int) -> None:
        self.graphs[n].replay()


def release_generators() -> None:
    """After a capture that failed: capture an empty graph. A capture whose end fails (invalidated by an operation
    CUDA graphs forbid) never runs the CUDA generators' capture epilogue, so every later random draw of the process
    raises "Offset increment outside graph capture encountered unexpectedly"; a capture that ends runs it."""
    try:
        with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
            pass
    except Exception:  # nothing more to do here: the caller reports the first failure
        pass


def tensors_key(module: torch.nn.Module) -> tuple:
    """Where `module`'s parameters and buffers live: a captured graph reads them at these addresses, so a model whose
    weights were replaced (not updated in place) needs new graphs."""
    return tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))


def chunks(remaining: int, sizes: list[int]) -> int:
    """The largest graph (in steps) that fits in `remaining` steps; `sizes` in decreasing order, ending with 1."""
    return next(n for n in sizes if n <= remaining)


def warm_up(step: Callable[[], object]):
    """One call of `step` on a side stream, as capture asks of a first run (compilation, lazy allocations); returns
    what it returns."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = step()
    torch.cuda.current_stream().wait_stream(stream)
    return result


__all__ = ["StepGraphs", "release_generators", "tensors_key", "chunks", "warm_up"]
