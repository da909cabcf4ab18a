"""The Gradio chat app: a `gr.ChatInterface` that streams the model's reply, shows its `<think>` part as a
collapsible reasoning block, and reports tokens/s (and, with MTP speculative decoding, the draft acceptance).

`ChatResponder` turns (message, history, controls) into streamed chat messages; `build_chat_app` wraps it in
the interface (endpoint `/chat`), `launch_chat` serves it on 127.0.0.1 by default behind a bounded queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hf_deepseek.app.messages import history_to_messages, mark_stopped, notice, reply_messages, split_reply
from hf_deepseek.app.streaming import DraftStats, SamplingSettings, generate_stream, mtp_available, mtp_stream
from hf_deepseek.data.r1 import INSTRUCTION, user_content

DEFAULT_HOST = "127.0.0.1"
STREAM_INTERVAL_S = 0.05  # at most ~20 UI updates a second, however fast the model is
MIN_NEW_TOKENS_ROOM = 8  # a prompt must leave this many positions of the context for the reply (or fewer if asked)
# What the embedded default answers well, in the phrasing of the project's arithmetic data (the model's training
# data); the chat shows them as buttons in the empty conversation.
EXAMPLE_PROMPTS = ["What is 2 + 2?", "Calculate 4821 - 1397.", "Calculate 7 + 7793.", "What is 356 - 4021?"]
_ARITHMETIC_NOTE = (
    "A tiny DeepSeek-V3-architecture model trained by {how} for whole-number arithmetic only ({scope}): it reasons "
    "step by step (the folding block), then answers."
)
EMBEDDED_NOTES = {  # the shipped checkpoints' scope, by directory name: the chat's default, then the demo's model
    "hf-deepseek-r1-add-sub": _ARITHMETIC_NOTE.format(
        how="the DeepSeek-R1 recipe (cold start, then GRPO)", scope="addition and subtraction up to 4 digits"
    ),
    "hf-deepseek-r1-tiny": _ARITHMETIC_NOTE.format(how="the DeepSeek-R1 recipe", scope="addition up to 3 digits"),
}


@dataclass
class ChatLimits:
    """Bounds that keep one user from tying up the server."""

    max_input_chars: int = 4000  # a longer message gets a notice instead of a reply
    max_history_chars: int = 64000  # older turns beyond this are left out of the prompt
    max_new_tokens: int = 4096  # upper end of the "max new tokens" control
    default_max_new_tokens: int = 512
    concurrency: int = 4  # replies generated at once; the rest wait in the queue
    queue_size: int = 64  # requests beyond this are turned away


class ChatResponder:
    """The chat function: streams an assistant turn, plus a one-line stats string, for a message and history."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limits: ChatLimits | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.limits = limits or ChatLimits()
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        # a tokenizer with the R1 tags (this project's) belongs to a model trained on the R1 template
        self.r1_format = "<answer>" in tokenizer.get_vocab()
        self.mtp_available = mtp_available(model)

    def respond(
        self,
        message: str,
        history: list[dict[str, Any]],
        system_prompt: str = "",
        temperature: float = 0.0,
        top_p: float = 0.95,
        max_new_tokens: int = 512,
        use_mtp: bool = False,
        r1_instruction: bool | None = None,
    ) -> Iterator[tuple[list[gr.ChatMessage], str]]:
        """Stream the assistant's turn for `message` after `history` (Gradio's messages), with the controls'
        values in the order of the `/chat` endpoint; each item is (the turn so far, the stats line).

        `r1_instruction` (default: whether the tokenizer has the R1 tags) ends user turns with the R1 format
        instruction. MTP decoding is greedy, so with `use_mtp` temperature and top-p are ignored.
        """
        r1_instruction = self.r1_format if r1_instruction is None else bool(r1_instruction)
        message = message if isinstance(message, str) else ""
        system_prompt = system_prompt if isinstance(system_prompt, str) else ""
        cap = self.limits.max_input_chars
        for what, text in (("message", message), ("system prompt", system_prompt)):
            if len(text) > cap:
                yield (
                    notice(
                        f"Your {what} is {len(text):,} characters long; this demo accepts at most {cap:,}. "
                        "Please shorten it and send it again."
                    ),
                    "",
                )
                return
        if not message.strip():
            yield notice("Please type a message."), ""
            return
        max_new_tokens = max(1, min(int(max_new_tokens), self.limits.max_new_tokens))
        input_ids = self._prompt_ids(message, history, system_prompt, max_new_tokens, r1_instruction)
        if input_ids is None:
            yield notice("This message does not fit in the model's context window. Please shorten it."), ""
            return
        max_new_tokens = min(max_new_tokens, self.context - input_ids.shape[1])
        settings = SamplingSettings(max_new_tokens, float(temperature), float(top_p))
        yield from self._stream_reply(input_ids, settings, bool(use_mtp) and self.mtp_available)

    def _prompt_ids(
        self,
        message: str,
        history: list[dict[str, Any]],
        system_prompt: str,
        max_new_tokens: int,
        r1_instruction: bool = False,
    ) -> torch.LongTensor | None:
        """Template the conversation; leave out the oldest turns while it is too long. None if nothing fits.

        With `r1_instruction` each user turn ends with the R1 format instruction, as in the R1 recipes' data.
        """
        turns = history_to_messages(history or [], system_prompt, self.r1_format)
        turns.append({"role": "user", "content": message})
        if r1_instruction:
            turns = [{**t, "content": user_content(t["content"])} if t["role"] == "user" else t for t in turns]
        *turns, current = turns
        system, turns = (turns[:1], turns[1:]) if turns and turns[0]["role"] == "system" else ([], turns)
        while sum(len(t["content"]) for t in turns) > self.limits.max_history_chars:
            turns = _without_oldest_exchange(turns)
        room = min(max_new_tokens, MIN_NEW_TOKENS_ROOM)
        while True:
            text = self.tokenizer.apply_chat_template(
                [*system, *turns, current], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            if ids.shape[1] + room <= self.context:
                return ids.to(self.model.device)
            if not turns:
                return None
            turns = _without_oldest_exchange(turns)

    def _stream_reply(
        self, input_ids: torch.LongTensor, settings: SamplingSettings, use_mtp: bool
    ) -> Iterator[tuple[list[gr.ChatMessage], str]]:
        """Decode the token stream as it grows and yield the rendered turn, at most every STREAM_INTERVAL_S."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        stop, draft_stats = threading.Event(), DraftStats() if use_mtp else None
        if use_mtp:
            tokens = mtp_stream(self.model, input_ids, settings, eos, draft_stats)
        else:
            tokens = generate_stream(self.model, input_ids, settings, eos, pad, stop)
        ids: list[int] = []
        start = time.perf_counter()
        answer_started: float | None = None
        last_yield = 0.0
        try:
            yield [gr.ChatMessage(role="assistant", content="…")], ""
            for new in tokens:
                ids.extend(new)
                now = time.perf_counter()
                if now - last_yield < STREAM_INTERVAL_S:
                    continue
                last_yield = now
                parts = split_reply(self.tokenizer.decode(ids, skip_special_tokens=True))
                if answer_started is None and parts.answer:
                    answer_started = now
                yield self._render(parts, start, answer_started), self._stats(len(ids), now - start, draft_stats)
        finally:
            stop.set()
            tokens.close()
        now = time.perf_counter()
        parts = split_reply(self.tokenizer.decode(ids, skip_special_tokens=True), final=True)
        messages = reply_messages(parts, (answer_started or now) - start)
        if not messages:
            messages = notice("The model ended its reply without any text.")
        elif not parts.answer:
            messages += notice("The model's reasoning ended without an answer (open the block to read it).")
        yield messages, self._stats(len(ids), now - start, draft_stats)

    @staticmethod
    def _render(parts, start: float, answer_started: float | None) -> list[gr.ChatMessage]:
        """The turn while it streams; a placeholder until there is text to show."""
        thought = (answer_started or time.perf_counter()) - start
        return reply_messages(parts, thought) or [gr.ChatMessage(role="assistant", content="…")]

    def _stats(self, tokens: int, seconds: float, draft_stats: DraftStats | None) -> str:
        line = f"{tokens} tokens in {seconds:.1f} s · **{tokens / max(seconds, 1e-9):.1f} tokens/s**"
        if draft_stats is not None:
            line += (
                f" · MTP draft acceptance **{draft_stats.acceptance_rate:.0%}** "
                f"({draft_stats.accepted}/{draft_stats.drafted}), greedy"
            )
        return line


def _without_oldest_exchange(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Drop the first message and any replies to it, so the conversation still starts with a user turn."""
    rest = turns[1:]
    while rest and rest[0]["role"] != "user":
        rest = rest[1:]
    return rest


def model_note(model: PreTrainedModel, model_dir: str | Path | None = None) -> str:
    """One line on what the model is: the embedded default's scope, or the size and architecture of another."""
    embedded = EMBEDDED_NOTES.get(Path(model_dir).resolve().name) if model_dir is not None else None
    if embedded is not None:
        return embedded
    params = sum(p.numel() for p in model.parameters())
    name = Path(model_dir).name if model_dir else type(model).__name__
    return f"{name}: {params / 1e6:,.1f}M parameters, {getattr(model.config, 'model_type', 'causal LM')} architecture."


def build_chat_app(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    limits: ChatLimits | None = None,
    title: str = "hf-deepseek chat",
    note: str = "",
    examples: list[str] | None = None,
) -> gr.Blocks:
    """The chat interface around `model`; its endpoint is `/chat` (inputs: message, then the controls).

    `note` (one line on what the model is) heads the page; `examples` are prompts shown as buttons in the empty
    conversation (default: `EXAMPLE_PROMPTS`, arithmetic the embedded default answers well)."""
    responder = ChatResponder(model, tokenizer, limits)
    limits = responder.limits
    stats = gr.Markdown("", elem_id="generation-stats", render=False)
    if responder.mtp_available:
        mtp_info = "Draft with the MTP module, verify with the model (greedy: temperature and top-p are ignored)."
    else:
        mtp_info = "Unavailable: this model has no MTP module or the drafting code is missing."
    controls = [
        gr.Textbox("", label="System prompt", lines=2, max_length=limits.max_input_chars, elem_id="system-prompt"),
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 = greedy", elem_id="temperature"),
        gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", elem_id="top-p"),
        gr.Slider(
            1,
            limits.max_new_tokens,
            value=min(limits.default_max_new_tokens, limits.max_new_tokens),
            step=1,
            label="Max new tokens",
            elem_id="max-new-tokens",
        ),
        gr.Checkbox(
            False,
            label="MTP speculative decoding",
            info=mtp_info,
            interactive=responder.mtp_available,
            elem_id="use-mtp",
        ),
        gr.Checkbox(
            responder.r1_format,
            label="Ask for the R1 format",
            info=f"Ends each message with “{INSTRUCTION}”, as the R1 recipes' training prompts do.",
            elem_id="r1-instruction",
        ),
    ]
    examples = EXAMPLE_PROMPTS if examples is None else examples
    cap = f"{limits.max_input_chars:,}"
    description = (f"{note} " if note else "") + (
        f"The reasoning folds away when the answer starts; messages are capped at {cap} characters."
    )
    with gr.Blocks(title=title, analytics_enabled=False) as blocks:
        chat = gr.ChatInterface(
            responder.respond,
            chatbot=gr.Chatbot(label="DeepSeek", height=520, elem_id="chatbot"),
            textbox=gr.Textbox(
                placeholder="Ask something…",
                max_length=None,
                submit_btn=True,
                stop_btn=True,
                show_label=False,
                elem_id="chat-input",
            ),
            additional_inputs=controls,
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            additional_outputs=[stats],
            title=title,
            description=description,
            examples=[[prompt] for prompt in examples] or None,
            cache_examples=False,
            api_name="chat",
            concurrency_limit=limits.concurrency,
            analytics_enabled=False,
            fill_height=False,
        )
        stats.render()
        # Stop cancels the reply's generator (which ends generation); this keeps the partial reply, closes an open
        # reasoning block and says that the reply was stopped
        chat.textbox.stop(mark_stopped, [chat.chatbot], [chat.chatbot], queue=False, api_visibility="private")
    blocks.queue(max_size=limits.queue_size, default_concurrency_limit=limits.concurrency)
    return blocks


def load_chat_model(
    model_dir: str | Path, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint the project can read, and its tokenizer (the project's own if the directory has none)."""
    from hf_deepseek import register_auto_classes
    from hf_deepseek.data import build_tokenizer

    register_auto_classes()

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        tokenizer = build_tokenizer()
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template; the chat app needs one")
    return model, tokenizer


# The stats line is an extra output of the streaming reply: when Stop cancels that event, Gradio can mark the line's
# status tracker "Error" (seen on a loaded 2-core machine); the line needs no progress display of its own.
APP_CSS = "#generation-stats [data-testid='status-tracker'] { display: none !important; }"


def launch_chat(
    blocks: gr.Blocks, host: str = DEFAULT_HOST, port: int | None = None, block: bool = True, **launch_kwargs
) -> str:
    """Serve the app (127.0.0.1 unless told otherwise, no share link, no file serving); returns its local URL."""
    _, url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        allowed_paths=[],
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        footer_links=["api"],
        css=APP_CSS,
        **launch_kwargs,
    )
    return url


def run_chat_from_args(args) -> None:
    """`hf-deepseek chat`: load `args.model` and serve the app until interrupted."""
    model, tokenizer = load_chat_model(args.model)
    limits = ChatLimits(max_input_chars=args.max_input_chars, concurrency=args.concurrency)
    if args.host not in (DEFAULT_HOST, "localhost", "::1"):
        print(f"Warning: binding {args.host} makes the chat reachable from other machines.")
    app = build_chat_app(model, tokenizer, limits, note=model_note(model, args.model))
    launch_chat(app, host=args.host, port=args.port)
