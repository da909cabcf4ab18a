"""A whole training step (forward, backward, optimizer step) captured once in a CUDA graph and replayed: the
training bench's `-cuda-graph` variants.

Replayed, a step is one launch from the host: no kernel waits for the host to launch it (on an H100 the bf16 step's
kernels took 205.2 ms of its 213.8, the FP8 step's 196.0 of 201.4, docs/PERF.md 2026-12-08). What the capture
needs: a step that reads nothing from the device on the host (the model's training forward does not; see
`DeepSeekModel.attention_inputs`), an optimizer that keeps its step counts on the device (`TritonAdamW(capturable=
True)`; the learning rate is captured as it is), batches of one shape, copied into the graph's input before each
replay. The gradients live in the graph's memory: the capture starts from none and writes them, every replay
rewrites them in place, so nothing may set them to None afterwards (`optimizer.zero_grad()` would lose them).
The steps before the capture (the bench's warm-up: compiling, the optimizer's state) run on a side stream, as
torch's CUDA graph notes ask for a capture's warm-up (`generation.step_graphs.warm_up`). A model keeping FP8
weight copies (`FP8Recipe.cache_weights`) is refused: host code refreshes them, which a replay would skip."""

import torch

from hf_deepseek.generation.step_graphs import release_generators


class GraphedTrainStep:
    """`step(input_ids) -> loss` (the next-token loss on `input_ids` as labels, then backward and the optimizer's
    step), replaying one CUDA graph captured at construction. The returned loss tensor is the graph's own: the next
    replay overwrites it, so callers keep a clone."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, example_ids: torch.Tensor):
        if any(getattr(module, "fp8_weight_copies", None) for module in model.modules()):
            # FP8Recipe.cache_weights: the copies are refreshed by host code (a forward pre-hook) a replay skips
            raise ValueError("a captured training step cannot keep FP8 weight copies (FP8Recipe.cache_weights)")
        self.input_ids = example_ids.clone()
        optimizer.zero_grad(set_to_none=True)  # the capture allocates the gradients in the graph's pool
        # the capture allocates a whole step's memory in the graph's own pool; what the warm-up steps left cached
        # in the default pool goes back first: freeing it during the capture (to make room) would end it
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        # a host read of the device inside the capture raises where it is made (torch's sync debug mode), rather
        # than as CUDA's "operation failed due to a previous error during capture" at some later call
        debug_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            # with the regions' graphs compiled in the warm-up taken without their guards evaluated again (only
            # those that tell one cached graph from another): the capture must not compile (Dynamo recompiled the
            # decoder layers inside it on the GPU, 2026-12-08, when transformers 5.17 made a causal mask under
            # capture; see `DeepSeekModel.attention_inputs`). The replayed step's losses are checked against the
            # plain step's (tests/test_graphed_train_step.py, the bench's rows)
            with (
                torch.compiler.set_stance(skip_guard_eval_unsafe=True),
                # thread_local: the backward's thread enqueues onto the capture stream; only this thread's
                # forbidden calls end the capture (as the decode loop's graphs, `generation/step_graphs.py`)
                torch.cuda.graph(self.graph, capture_error_mode="thread_local"),
            ):
                self.loss = model(input_ids=self.input_ids, labels=self.input_ids).loss
                self.loss.backward()
                optimizer.step()
        except Exception:
            release_generators()  # or every later random draw of the process raises
            raise
        finally:
            torch.cuda.set_sync_debug_mode(debug_mode)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape != self.input_ids.shape:
            raise ValueError(
                f"a captured training step takes batches of shape {tuple(self.input_ids.shape)}, "
                f"got {tuple(input_ids.shape)}"
            )
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.loss


def eager_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The plain step as a `step(input_ids) -> loss` function: forward, backward, the optimizer, gradients dropped."""

    def step(input_ids: torch.Tensor) -> torch.Tensor:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


@torch.no_grad()
def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Every state tensor (AdamW's step counts and moments) zeroed in place: what a fresh optimizer starts from,
    in the tensors a captured step reads and writes."""
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()
