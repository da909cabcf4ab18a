"""The chat app: reply splitting and history conversion, then the served app through `gradio_client` (streamed
reply with reasoning and answer, Stop ending generation, sixteen concurrent clients, the input-length cap).

Served tests run a scripted tiny DeepSeek model (tests/app_helpers.py) through the real generation path.
"""

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from app_helpers import ENDLESS_SCRIPT, FINITE_SCRIPT, ForwardCounter, free_port, scripted_chat_model, serve

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from hf_deepseek.app import ChatLimits, ChatResponder  # noqa: E402
from hf_deepseek.app.messages import (  # noqa: E402
    NOTICE_PREFIX,
    ReplyParts,
    history_to_messages,
    reply_messages,
    split_reply,
)
from hf_deepseek.app.streaming import GENERATE_THREAD_NAME  # noqa: E402
from hf_deepseek.data import INSTRUCTION, build_tokenizer  # noqa: E402

pytestmark = [
    pytest.mark.timeout(120),
    # Gradio's queue uses pandas options that pandas 3 deprecates; nothing this project can change
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning", "ignore:The copy keyword:Warning"),
]
MAX_INPUT_CHARS = 200
# message, system prompt, temperature, top-p, max new tokens, MTP
CHAT_ARGS = ("", 0.6, 0.95, 64, False)


def texts(messages: list) -> list[tuple[str, str]]:
    """(title, content) of each message in a reply, as the API or the chat function returns it."""
    out = []
    for m in messages:
        m = m if isinstance(m, dict) else {"metadata": m.metadata, "content": m.content}
        out.append(((m.get("metadata") or {}).get("title", ""), m["content"]))
    return out


# ---- pure functions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, final, expected",
    [
        ("<think>let me see", False, ReplyParts("let me see", "", True)),
        ("<think>let me see</thi", False, ReplyParts("let me see", "", True)),
        ("<think>a</think><answer>42</answer>", True, ReplyParts("a", "42", False)),
        ("<think>a</think>\n<answer>4", False, ReplyParts("a", "4", False)),
        ("a plan</think>the answer", True, ReplyParts("a plan", "the answer", False)),
        ("no tags at all", True, ReplyParts("", "no tags at all", False)),
        ("<think>ran out of tokens", True, ReplyParts("ran out of tokens", "", False)),
        ("<think>a</think><answer>42</answer></think>", True, ReplyParts("a", "42", False)),  # no tag leaks
        ("<think>a</think>4</think>2<think>", True, ReplyParts("a", "42", False)),
    ],
)
def test_split_reply(text, final, expected):
    assert split_reply(text, final=final) == expected


def test_reasoning_block_is_open_while_thinking_and_closed_with_duration_after():
    thinking = reply_messages(ReplyParts("hmm", "", True), 0.5)
    assert len(thinking) == 1 and thinking[0].metadata["status"] == "pending"
    done = reply_messages(ReplyParts("hmm", "42", False), 1.26)
    assert [m.content for m in done] == ["hmm", "42"]
    assert done[0].metadata == {"title": "Reasoning", "status": "done", "duration": 1.3}
    assert not done[1].metadata


def test_stop_keeps_the_partial_reply_closes_the_reasoning_and_says_so():
    from hf_deepseek.app.messages import STOPPED_NOTICE, mark_stopped

    history = [
        {"role": "user", "content": "Calculate 1 + 2."},
        {"role": "assistant", "content": "3", "metadata": None},
        {"role": "user", "content": "Calculate 345 + 278."},
        {"role": "assistant", "content": "ones: 5 + 8", "metadata": {"title": "Thinking…", "status": "pending"}},
    ]
    stopped = mark_stopped(history)
    assert stopped[:3] == history[:3]
    assert stopped[3]["content"] == "ones: 5 + 8"
    assert stopped[3]["metadata"] == {"title": "Reasoning (stopped)", "status": "done"}
    assert stopped[4] == {"role": "assistant", "content": STOPPED_NOTICE}
    assert mark_stopped(stopped) == stopped  # a second Stop adds nothing
    # a turn stopped while thinking leaves no trace in the next prompt
    assert history_to_messages(stopped) == [
        {"role": "user", "content": "Calculate 1 + 2."},
        {"role": "assistant", "content": "3"},
    ]
    assert mark_stopped([]) == []


def test_history_drops_reasoning_and_notices():
    history = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "add them", "metadata": {"title": "Reasoning", "status": "done"}},
        {"role": "assistant", "content": "4", "metadata": {}},
        {"role": "user", "content": "x" * 999},
        {"role": "assistant", "content": NOTICE_PREFIX + "Your message is too long", "metadata": None},
        {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}, {"type": "file", "path": "/etc/passwd"}]},
        {"role": "assistant", "content": "6"},
    ]
    assert history_to_messages(history, "Be brief.", answer_tags=True) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<answer>4</answer>"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "<answer>6</answer>"},
    ]
    assert history_to_messages(history[:3])[-1] == {"role": "assistant", "content": "4"}


class FakeTokenizerStream:
    """Stands in for generation: replays fixed token chunks, one per step."""

    def __init__(self, chunks: list[list[int]]):
        self.chunks, self.closed = chunks, False

    def __iter__(self):
        try:
            yield from self.chunks
        finally:
            self.closed = True


def test_streamed_turn_moves_from_thinking_to_answer(monkeypatch):
    tokenizer = build_tokenizer()
    pieces = ["<think>", *"abc", "</think>", "<answer>", *"42", "</answer>"]
    stream = FakeTokenizerStream([[i] for i in tokenizer.convert_tokens_to_ids(pieces)])
    monkeypatch.setattr("hf_deepseek.app.chat.STREAM_INTERVAL_S", 0.0)
    monkeypatch.setattr("hf_deepseek.app.chat.generate_stream", lambda *a, **k: iter(stream))
    responder = ChatResponder(scripted_chat_model(FINITE_SCRIPT), tokenizer)
    turns = [texts(reply) for reply, _ in responder.respond("hi", [], *CHAT_ARGS)]
    assert ("Thinking…", "ab") in [t[0] for t in turns if t]
    assert turns[-1] == [("Reasoning", "abc"), ("", "42")]
    assert stream.closed


def test_prompt_leaves_out_oldest_turns_to_fit_the_context():
    tokenizer = build_tokenizer()
    responder = ChatResponder(scripted_chat_model(FINITE_SCRIPT, max_positions=64), tokenizer)
    history = [{"role": "user", "content": "x" * 20}, {"role": "assistant", "content": "y" * 20}]
    ids = responder._prompt_ids("z" * 20, history, "", max_new_tokens=8)
    assert ids is not None and ids.shape[1] <= 56
    prompt = tokenizer.decode(ids[0])
    assert "x" not in prompt and "y" not in prompt and prompt.endswith("<|user|>" + "z" * 20 + "<|eos|><|assistant|>")
    assert responder._prompt_ids("z" * 60, [], "", max_new_tokens=8) is None


def test_prompt_asks_for_the_r1_format_and_drops_past_reasoning():
    tokenizer = build_tokenizer()
    responder = ChatResponder(scripted_chat_model(FINITE_SCRIPT), tokenizer)
    history = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "add", "metadata": {"title": "Reasoning"}},
        {"role": "assistant", "content": "4"},
    ]
    ids = responder._prompt_ids("3+3?", history, "Be brief.", max_new_tokens=64, r1_instruction=True)
    assert tokenizer.decode(ids[0]) == (
        f"<|bos|><|system|>Be brief.<|eos|><|user|>2+2?\n{INSTRUCTION}\n<|eos|>"
        f"<|assistant|><answer>4</answer><|eos|><|user|>3+3?\n{INSTRUCTION}\n<|eos|><|assistant|>"
    )


# ---- the served app ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finite_app():
    torch.set_num_threads(1)
    model = scripted_chat_model(FINITE_SCRIPT)
    counter = ForwardCounter(model)
    with serve(model, max_input_chars=MAX_INPUT_CHARS, concurrency=4) as url:
        yield url, counter


def test_streamed_reply_with_reasoning_and_answer(finite_app):
    url, _ = finite_app
    client = gradio_client.Client(url, verbose=False)
    job = client.submit("What is 40+2?", *CHAT_ARGS, api_name="/chat")
    updates = [texts(reply) for reply, _ in job]
    reply, stats = job.result(timeout=60)
    assert texts(reply) == [("Reasoning", "plan"), ("", "42")]
    assert reply[0]["metadata"]["status"] == "done" and "duration" in reply[0]["metadata"]
    assert len(updates) >= 2 and updates[0] != updates[-1]  # streamed: a placeholder first, then the reply
    assert "tokens/s" in stats and stats.startswith("11 tokens")  # <think>plan</think><answer>42</answer><eos>


def test_mtp_switch_gives_the_same_reply_and_reports_acceptance(finite_app):
    url, _ = finite_app
    client = gradio_client.Client(url, verbose=False)
    reply, stats = client.predict("What is 40+2?", "", 0.0, 1.0, 64, True, api_name="/chat")
    assert texts(reply) == [("Reasoning", "plan"), ("", "42")]
    assert "MTP draft acceptance **100%**" in stats  # the scripted MTP module always drafts right


def test_sixteen_concurrent_clients_each_get_a_complete_answer(finite_app):
    url, _ = finite_app

    def talk(i: int):
        client = gradio_client.Client(url, verbose=False)
        return client.submit(f"question {i}", *CHAT_ARGS, api_name="/chat").result(timeout=90)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(talk, range(16)))
    assert [texts(reply) for reply, _ in results] == [[("Reasoning", "plan"), ("", "42")]] * 16
    assert all(stats.startswith("11 tokens") for _, stats in results)


def test_over_long_input_gets_a_clear_message_and_the_server_keeps_working(finite_app):
    url, counter = finite_app
    client = gradio_client.Client(url, verbose=False)
    before = counter.count
    reply, stats = client.predict("x" * (MAX_INPUT_CHARS + 1), *CHAT_ARGS, api_name="/chat")
    assert texts(reply) == [
        (
            "",
            f"{NOTICE_PREFIX}Your message is 201 characters long; this demo accepts at most "
            f"{MAX_INPUT_CHARS}. Please shorten it and send it again.",
        )
    ]
    assert stats == "" and counter.count == before  # rejected before any generation
    reply, _ = client.predict("and now a short one", *CHAT_ARGS, api_name="/chat")
    assert texts(reply)[-1] == ("", "42")


def test_cancelling_a_job_stops_generation():
    model = scripted_chat_model(ENDLESS_SCRIPT, loop=True)
    counter = ForwardCounter(model)
    with serve(model) as url:
        client = gradio_client.Client(url, verbose=False)
        job = client.submit("talk forever", "", 0.6, 0.95, 4096, False, api_name="/chat")
        deadline = time.monotonic() + 30
        while counter.count < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counter.count >= 50, "generation did not start"
        job.cancel()
        cancelled_at = counter.count
        assert counter.settles(quiet_s=0.5, timeout_s=5.0), "generation kept running after the job was cancelled"
        assert counter.count - cancelled_at < 1000  # promptly: far fewer than the 4096 tokens asked for
        assert not any(t.name == GENERATE_THREAD_NAME and t.is_alive() for t in threading.enumerate())
        reply, _ = client.predict("still there?", "", 0.6, 0.95, 6, False, api_name="/chat")
        assert texts(reply)[0] == ("Reasoning", "plan")  # six tokens: <think>plan</think>
        assert "without an answer" in texts(reply)[1][1]  # and a notice that no answer came

        # MTP speculative decoding runs in the request's own thread; cancelling closes it the same way
        job = client.submit("talk forever", "", 0.0, 1.0, 4096, True, api_name="/chat")
        started = counter.count
        while counter.count < started + 50 and time.monotonic() < deadline + 30:
            time.sleep(0.05)
        assert counter.count >= started + 50, "MTP generation did not start"
        job.cancel()
        cancelled_at = counter.count
        assert counter.settles(quiet_s=0.5, timeout_s=5.0), "MTP generation kept running after the job was cancelled"
        assert counter.count - cancelled_at < 1000


@pytest.mark.parametrize("missing", ["MTP module", "drafting code"])
def test_mtp_switch_is_unavailable_without_an_mtp_module_or_drafting_code(missing, monkeypatch):
    from conftest import tiny_config

    from hf_deepseek import DeepSeekForCausalLM
    from hf_deepseek.app import build_chat_app

    tokenizer = build_tokenizer()
    mtp_layers = 0 if missing == "MTP module" else 1
    model = DeepSeekForCausalLM(tiny_config(vocab_size=len(tokenizer), num_nextn_predict_layers=mtp_layers)).eval()
    if missing == "drafting code":
        monkeypatch.setattr("hf_deepseek.app.streaming.mtp_speculative_stream", None)
    app = build_chat_app(model, tokenizer)
    (switch,) = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "use-mtp"]
    assert switch.interactive is False and switch.info.startswith("Unavailable")
    responder = ChatResponder(model, tokenizer)
    _, stats = list(responder.respond("hi", [], "", 0.0, 1.0, 4, True))[-1]  # the switch is ignored
    assert stats.startswith("4 tokens") and "MTP" not in stats


def test_app_binds_localhost_by_default(finite_app):
    url, _ = finite_app
    assert url.startswith("http://127.0.0.1:")
    assert ChatLimits().concurrency >= 1 and ChatLimits().queue_size >= 16


def test_cli_chat_serves_a_saved_checkpoint(tmp_path):
    """`hf-deepseek chat --model DIR` loads a saved checkpoint and its tokenizer and serves on 127.0.0.1."""
    scripted_chat_model(FINITE_SCRIPT).save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    port = free_port()
    command = [sys.executable, "-m", "hf_deepseek.cli", "chat", "--model", str(tmp_path), "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline, client = time.monotonic() + 90, None
        while client is None:
            assert server.poll() is None, f"the chat command exited: {server.stdout.read()}"
            assert time.monotonic() < deadline, "the chat command did not start serving within 90 s"
            try:
                client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:
                time.sleep(0.5)
        reply, _ = client.predict("What is 40+2?", *CHAT_ARGS, api_name="/chat")
        assert texts(reply) == [("Reasoning", "plan"), ("", "42")]
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
