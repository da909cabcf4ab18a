"""Chat messages for the app: split streamed text into reasoning and answer, render them as Gradio messages,
and turn the chat history back into chat-template messages (reasoning dropped, as DeepSeek-R1 does).
"""

from dataclasses import dataclass
from typing import Any

import gradio as gr

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
# Notices from the app (not from the model) start with this, so the history conversion can leave them out.
NOTICE_PREFIX = "⚠️ "


@dataclass
class ReplyParts:
    """A reply so far: its reasoning (the `<think>` part), its answer, and whether the model is still thinking."""

    reasoning: str
    answer: str
    thinking: bool


def _hide_partial_tag(text: str) -> str:
    """Drop a trailing prefix of a tag (`</thi`), which a tokenizer without tag tokens streams piece by piece."""
    for tag in TAGS:
        for size in range(len(tag) - 1, 0, -1):
            if text.endswith(tag[:size]):
                return text[:-size]
    return text


def split_reply(text: str, final: bool = False) -> ReplyParts:
    """Split generated text into reasoning and answer.

    `<think>R</think>A` -> (R, A); text that opens `<think>` and has not closed it yet is all reasoning;
    `R</think>A` (a template that opens the tag itself) is read the same way; text without tags is all answer.
    `<answer>` tags are removed. While streaming (`final=False`) a half-streamed tag at the end is hidden.
    """
    clean = text if final else _hide_partial_tag(text)
    head = clean.lstrip()
    if THINK_CLOSE in clean:
        reasoning, answer = clean.split(THINK_CLOSE, 1)
        reasoning, thinking = reasoning.lstrip().removeprefix(THINK_OPEN), False
    elif head.startswith(THINK_OPEN):
        reasoning, answer, thinking = head.removeprefix(THINK_OPEN), "", not final
    else:
        reasoning, answer, thinking = "", clean, False
    for tag in TAGS:  # a model that repeats a tag must not show it in the answer
        answer = answer.replace(tag, "")
    return ReplyParts(reasoning.strip(), answer.strip(), thinking)


def reply_messages(parts: ReplyParts, thought_seconds: float) -> list[gr.ChatMessage]:
    """The assistant's turn: a collapsible reasoning block (open while thinking), then the answer."""
    messages = []
    if parts.reasoning or parts.thinking:
        if parts.thinking:
            metadata = {"title": "Thinking…", "status": "pending"}
        else:
            metadata = {"title": "Reasoning", "status": "done", "duration": round(thought_seconds, 1)}
        messages.append(gr.ChatMessage(role="assistant", content=parts.reasoning or "…", metadata=metadata))
    if parts.answer:
        messages.append(gr.ChatMessage(role="assistant", content=parts.answer))
    return messages


STOPPED_NOTICE = NOTICE_PREFIX + "Stopped: the reply above is partial."


def mark_stopped(history: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The chat after Stop: the partial reply kept, a reasoning block still open closed as "stopped", and a notice
    saying the reply was stopped (left out of later prompts, like every notice)."""
    history = [dict(item) for item in history or []]
    turn_start = max((i for i, item in enumerate(history) if item.get("role") == "user"), default=-1) + 1
    for item in history[turn_start:]:
        metadata = dict(item.get("metadata") or {})
        if metadata.get("status") == "pending":
            item["metadata"] = {**metadata, "status": "done", "title": "Reasoning (stopped)"}
    if turn_start > 0 and not (history and _text_of(history[-1].get("content")) == STOPPED_NOTICE):
        history.append({"role": "assistant", "content": STOPPED_NOTICE})
    return history


def notice(text: str) -> list[gr.ChatMessage]:
    """A message from the app itself (not the model), shown in the chat and left out of later prompts."""
    return [gr.ChatMessage(role="assistant", content=NOTICE_PREFIX + text)]


def _text_of(content: Any) -> str:
    """The text of a history message's content; files and components are ignored (the app reads no files)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, list | tuple):
        return "".join(_text_of(part) for part in content)
    return ""


def history_to_messages(
    history: list[dict[str, Any]], system_prompt: str = "", answer_tags: bool = False
) -> list[dict[str, str]]:
    """Gradio chat history -> chat-template messages.

    Reasoning blocks (messages with a metadata title) are dropped, as DeepSeek-R1 does in multi-turn chat, and
    so are the app's notices together with the user message they answered. Consecutive assistant messages
    join into one turn; with `answer_tags` each past answer is wrapped in `<answer>...</answer>`, the format the
    R1 recipes train.
    """
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for item in history:
        role, metadata = item.get("role"), item.get("metadata") or {}
        text = _text_of(item.get("content"))
        if role == "user":
            messages.append({"role": "user", "content": text})
        elif role == "assistant" and not metadata.get("title"):
            if text.startswith(NOTICE_PREFIX):
                if messages and messages[-1]["role"] == "user":
                    messages.pop()
            elif messages and messages[-1]["role"] == "assistant":
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": "assistant", "content": text})
    if answer_tags:
        for message in messages:
            if message["role"] == "assistant":
                message["content"] = f"{ANSWER_OPEN}{message['content']}{ANSWER_CLOSE}"
    return messages
