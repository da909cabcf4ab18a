"""Token streams for the chat app: `model.generate` on a worker thread (sampling, any batch-1 prompt) or MTP
self-speculative decoding (greedy). Both yield lists of new token ids; closing the stream stops generation.
"""

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.generation import BaseStreamer, StoppingCriteria, StoppingCriteriaList

try:  # MTP drafting; without it the app shows the MTP switch as unavailable
    from hf_deepseek.modeling.speculative import DraftStats, mtp_speculative_stream
except ImportError:  # pragma: no cover - depends on the installed model package
    DraftStats = mtp_speculative_stream = None

GENERATE_THREAD_NAME = "hf-deepseek-generate"


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0


def mtp_available(model: PreTrainedModel) -> bool:
    """Whether MTP speculative decoding can run: the drafting code exists and the model has an MTP module."""
    return mtp_speculative_stream is not None and getattr(model.config, "num_nextn_predict_layers", 0) > 0


class StopOnEvent(StoppingCriteria):
    """Ends `generate` at the next step once `event` is set (the app sets it when the user presses Stop)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives new token ids from `generate` (the first `put` is the prompt, skipped); `None` marks the end."""

    def __init__(self):
        self.queue: queue.Queue[list[int] | BaseException | None] = queue.Queue()
        self.prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_skipped:
            self.prompt_skipped = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


def generate_stream(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    settings: SamplingSettings,
    eos_token_id: int | None,
    pad_token_id: int | None,
    stop: threading.Event,
) -> Iterator[list[int]]:
    """Run `model.generate` on a worker thread and yield its new tokens as they come.

    Closing the iterator (Gradio does when the user presses Stop) sets `stop`, which ends `generate` at its
    next step through a stopping criterion.
    """
    streamer = _TokenQueue()
    sample = settings.temperature > 0
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
    )

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as error:  # reported on the consumer's side
            streamer.queue.put(error)
        finally:
            streamer.end()

    thread = threading.Thread(target=run, name=GENERATE_THREAD_NAME, daemon=True)
    thread.start()
    try:
        while (item := streamer.queue.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()  # it has ended generation; joining it now keeps a finished thread from outliving the stream
    finally:
        stop.set()  # on Stop (the stream closed early) `generate` ends at its next step


def mtp_stream(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    settings: SamplingSettings,
    eos_token_id: int | None,
    stats: "DraftStats",
) -> Iterator[list[int]]:
    """Greedy MTP self-speculative decoding in the caller's thread; `stats` counts drafts and acceptances."""
    if not mtp_available(model):
        raise RuntimeError("MTP speculative decoding is not available for this model")
    yield from mtp_speculative_stream(model, input_ids, settings.max_new_tokens, eos_token_id, stats)
