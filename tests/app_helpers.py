"""Helpers for the chat app tests: a tiny DeepSeek model that follows a script, and a server launcher.

The scripted model is a real `DeepSeekForCausalLM` run through the real generation path, with weights set so
that it acts as a lookup table from the last token to the next: attention and MLP outputs are zeroed, each
scripted token's embedding is a basis vector, and `lm_head` maps it to its successor by a wide margin (so
sampling at the app's default temperature is as deterministic as greedy). The MTP module is set the same way
one token further on, so its drafts are always right.
"""

import socket
import time
from contextlib import contextmanager

import torch
from conftest import tiny_config

from hf_deepseek import DeepSeekForCausalLM
from hf_deepseek.data import build_tokenizer

# after the chat template's `<|assistant|>`: reasoning "plan", answer "42"
FINITE_SCRIPT = ["<|assistant|>", "<think>", *"plan", "</think>", "<answer>", *"42", "</answer>", "<|eos|>"]
# the same reasoning, then an answer "okokok..." that never ends (for Stop)
ENDLESS_SCRIPT = ["<|assistant|>", "<think>", *"plan", "</think>", "<answer>", *"ok"]
LOGIT_MARGIN = 40.0


def scripted_chat_model(script: list[str], loop: bool = False, max_positions: int = 8192) -> DeepSeekForCausalLM:
    """A tiny model that, after `<|assistant|>`, emits `script[1:]`; with `loop` it then repeats the last two
    tokens forever. Every token of the script must be distinct."""
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(script)
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids, script
    successor = dict(zip(ids, ids[1:], strict=False))
    if loop:
        successor[ids[-1]] = ids[-2]
    config = tiny_config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = DeepSeekForCausalLM(config).eval()
    hidden = config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                param.zero_()  # no attention or MLP contribution: the residual stream is the token embedding
        column = {token: i for i, token in enumerate(ids)}
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[ids] = 0.0
        head.zero_()
        for token, i in column.items():
            embed[token, i] = 1.0  # RMSNorm turns this into sqrt(hidden) * e_i
        for token, nxt in successor.items():
            head[nxt, column[token]] = LOGIT_MARGIN / hidden**0.5
        for mtp in model.model.mtp_layers:  # MTP: keep only the embedding of token t+1, so it predicts t+2
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :hidden] = torch.eye(hidden)
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ForwardCounter:
    """Counts forward passes of a model's backbone, which both `generate` and MTP decoding run (to see
    generation run and stop)."""

    def __init__(self, model: DeepSeekForCausalLM):
        self.count = 0
        self.handle = model.model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1

    def settles(self, quiet_s: float = 0.5, timeout_s: float = 5.0) -> bool:
        """True once no forward pass has run for `quiet_s` seconds (within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            before = self.count
            time.sleep(quiet_s)
            if self.count == before:
                return True
        return False


@contextmanager
def serve(model: DeepSeekForCausalLM, tokenizer=None, note: str = "", **limits):
    """Launch the chat app on a free local port in this process; yields its URL."""
    from hf_deepseek.app import ChatLimits, build_chat_app, launch_chat

    blocks = build_chat_app(model, tokenizer or build_tokenizer(), ChatLimits(**limits), note=note)
    url = launch_chat(blocks, port=free_port(), block=False, quiet=True, show_error=True)
    try:
        yield url
    finally:
        blocks.close()
