"""The chat app in a real browser (Debian's headless Chromium through Playwright): type a message, wait for the
streamed answer, check the collapsible reasoning block, press Stop during a long generation, save screenshots.

The page talks to a scripted tiny DeepSeek model (tests/app_helpers.py) through the real generation path.
"""

import re
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from app_helpers import ENDLESS_SCRIPT, FINITE_SCRIPT, ForwardCounter, scripted_chat_model, serve

from hf_deepseek.app.chat import EXAMPLE_PROMPTS
from hf_deepseek.app.streaming import GENERATE_THREAD_NAME

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "checkpoints" / "hf-deepseek-r1-add-sub"

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting:Warning", "ignore:The copy keyword:Warning"),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (`make chromium` or `apt-get install -y chromium`)",
    ),
]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


def set_slider(page, selector: str, value: str, attempts: int = 5) -> None:
    """Type `value` into a slider's number box. Gradio can reset it once while the accordion's content mounts,
    so check that the value held and type it again if not."""
    number, slider = page.locator(f"{selector} input[type='number']"), page.locator(f"{selector} input[type='range']")
    for _ in range(attempts):
        number.fill(value)
        number.press("Enter")
        page.wait_for_timeout(300)
        if number.input_value() == value and slider.input_value() == value:
            return
    raise AssertionError(f"{selector} kept {slider.input_value()} instead of {value}")


@contextmanager
def browser_page(pw, **page_options):
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    try:
        page = browser.new_page(viewport={"width": 1100, "height": 1000}, **page_options)
        page.set_default_timeout(30_000)
        yield browser, page
    finally:
        browser.close()


def send(page, text: str) -> None:
    textbox = page.locator("#chat-input").get_by_test_id("textbox")
    textbox.fill(text)
    textbox.press("Enter")


def last_answer(page) -> str:
    """The text of the last assistant turn without its reasoning block."""
    return page.get_by_test_id("bot").last.evaluate(
        "e => { const c = e.cloneNode(true); c.querySelectorAll('.thought-group').forEach(t => t.remove());"
        " return c.innerText.trim(); }"
    )


def expect_no_error_badge(page) -> None:
    """No error toast and no visible "Error" status anywhere on the page."""
    expect(page.locator(".toast-body.error")).to_have_count(0)
    expect(page.get_by_text(re.compile(r"^\s*Error\s*$")).filter(visible=True)).to_have_count(0)


def test_chat_page_streams_reasoning_and_answer_and_stops(tmp_path):
    model = scripted_chat_model(ENDLESS_SCRIPT, loop=True)  # "<think>plan</think><answer>okokok..." forever
    counter = ForwardCounter(model)
    with serve(model, default_max_new_tokens=24, max_new_tokens=8192) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(url)

            # a short reply: 24 tokens = <think>plan</think><answer> and 17 tokens of answer
            textbox = page.locator("#chat-input").get_by_test_id("textbox")
            textbox.fill("What is 40+2?")
            textbox.press("Enter")
            expect(page.get_by_test_id("user")).to_contain_text("What is 40+2?")
            bot = page.get_by_test_id("bot").last
            expect(bot).to_contain_text("okokokokokokokoko")
            expect(page.get_by_test_id("stop-button")).to_be_hidden()
            expect(page.locator("#generation-stats")).to_contain_text("tokens/s")

            thought = page.locator(".thought-group").first
            expect(thought).to_contain_text("Reasoning")  # closed once the answer started, with its duration
            expect(thought.get_by_text("plan")).to_be_hidden()
            thought.get_by_text("Reasoning").click()  # unfold it
            expect(thought.get_by_text("plan")).to_be_visible()
            page.wait_for_timeout(500)  # let the unfolding animation finish before the screenshot
            page.screenshot(path=tmp_path / "chat_answer.png", full_page=True)

            # a long reply, stopped from the page
            page.get_by_text("Settings").click()
            set_slider(page, "#max-new-tokens", "8000")
            textbox.fill("Tell me a long story")
            textbox.press("Enter")
            stop = page.get_by_test_id("stop-button")
            expect(stop).to_be_visible()
            expect(page.get_by_test_id("bot").last).to_contain_text("okokokokokokokokokokokokokokokokokokok")
            stop.click()
            stopped_at = counter.count
            assert counter.settles(quiet_s=0.5, timeout_s=5.0), "generation kept running after Stop"
            assert counter.count - stopped_at < 2000  # far fewer forwards than the 8000 tokens asked for
            expect(stop).to_be_hidden()
            expect(textbox).to_be_editable()
            # the partial answer stays, marked as stopped; no error badge, no reasoning block left "Thinking…"
            reply = page.get_by_test_id("bot").last
            expect(reply).to_contain_text("Stopped")
            expect(page.get_by_test_id("bot").filter(has_text="okokokokokokokokokokokok").last).to_be_visible()
            expect_no_error_badge(page)
            expect(page.locator(".thought-group").filter(has_text="Thinking…")).to_have_count(0)
            # the conversation goes on after a Stop
            set_slider(page, "#max-new-tokens", "24")
            send(page, "And now a short one")
            expect(page.get_by_test_id("bot").last).to_contain_text("okokokokokokokoko")
            expect(stop).to_be_hidden()
            expect_no_error_badge(page)
            page.screenshot(path=tmp_path / "chat_stopped.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "chat_answer.png").stat().st_size > 10_000
    assert (tmp_path / "chat_stopped.png").stat().st_size > 10_000


def test_two_turn_conversation_with_the_embedded_default_answers_both_questions():
    """The real embedded checkpoint, greedy (the app's default), through the chat template with the whole history."""
    from hf_deepseek.app import load_chat_model

    model, tokenizer = load_chat_model(EMBEDDED, device="cpu")
    with serve(model, tokenizer) as url, sync_api.sync_playwright() as pw, browser_page(pw) as (_, page):
        page.goto(url)
        for turn, (question, answer) in enumerate([("What is 2 + 2?", "4"), ("Calculate 4021 - 7386.", "-3365")]):
            send(page, question)
            expect(page.get_by_test_id("user").nth(turn)).to_contain_text(question)
            page.wait_for_timeout(500)
            expect(page.get_by_test_id("stop-button")).to_be_hidden(timeout=60_000)
            page.wait_for_timeout(300)  # the final render follows the last streamed one
            assert last_answer(page) == answer, f"turn {turn + 1}: {question} -> {last_answer(page)!r}"
        expect(page.locator("#generation-stats")).to_contain_text("tokens/s")
        expect_no_error_badge(page)


def test_four_concurrent_sessions_each_get_their_answer_and_examples_run():
    """Four browser sessions ask at about the same moment (one through an example button); their replies are
    generated at the same time, and each session gets its own complete reply."""
    model = scripted_chat_model(ENDLESS_SCRIPT, loop=True)  # "<think>plan</think><answer>okok..."
    live, most_at_once = set(), []

    def count_generations(*_):  # generation threads alive during each forward pass
        live.update(t.name for t in threading.enumerate() if t.name == GENERATE_THREAD_NAME)
        most_at_once.append(sum(t.name == GENERATE_THREAD_NAME for t in threading.enumerate()))

    model.model.register_forward_hook(count_generations)
    note = "A scripted test model."
    limits = dict(concurrency=4, default_max_new_tokens=300)
    with serve(model, note=note, **limits) as url, sync_api.sync_playwright() as pw, browser_page(pw) as (b, _):
        pages = [b.new_page(viewport={"width": 1000, "height": 900}) for _ in range(4)]
        for page in pages:
            page.set_default_timeout(60_000)
            page.goto(url)
            expect(page.get_by_text(note)).to_be_visible()
        example = EXAMPLE_PROMPTS[0]
        expect(pages[0].get_by_text(example)).to_be_visible()  # the example prompts, in the empty chat
        # Playwright's sync API drives the pages from one thread: submit in all four, then check all four
        pages[0].get_by_text(example).click()
        for i, page in enumerate(pages[1:], start=1):
            send(page, f"Session {i}: what is {i} + {i}?")
        for i, page in enumerate(pages):
            stats = page.locator("#generation-stats")
            expect(stats).to_contain_text("300 tokens", timeout=60_000)  # the whole reply
            expect(page.get_by_test_id("stop-button")).to_be_hidden()
            expect(page.get_by_test_id("user")).to_have_count(1)
            question = example if i == 0 else f"Session {i}: what is {i} + {i}?"
            expect(page.get_by_test_id("user")).to_contain_text(question)
            expect_no_error_badge(page)
    assert max(most_at_once) >= 2, "the sessions' replies were not generated concurrently"


def test_over_long_message_gets_a_notice_and_the_chat_goes_on():
    model = scripted_chat_model(FINITE_SCRIPT)
    with serve(model, max_input_chars=200) as url, sync_api.sync_playwright() as pw, browser_page(pw) as (_, page):
        page.goto(url)
        send(page, "9" * 5000)
        expect(page.get_by_test_id("bot").last).to_contain_text("at most 200")
        expect(page.get_by_test_id("stop-button")).to_be_hidden()
        send(page, "What is 40 + 2?")
        expect(page.get_by_test_id("bot").last).to_have_text(re.compile(r"^\s*42\s*$"))
        expect_no_error_badge(page)


def test_stop_while_thinking_closes_the_reasoning_block_without_error():
    model = scripted_chat_model(["<|assistant|>", "<think>", *"hm"], loop=True)  # "<think>hmhmhm..." forever
    limits = dict(default_max_new_tokens=8000, max_new_tokens=8192)
    with serve(model, **limits) as url, sync_api.sync_playwright() as pw, browser_page(pw) as (_, page):
        page.goto(url)
        send(page, "Think about it")
        thought = page.locator(".thought-group").first
        expect(thought).to_contain_text("Thinking")
        expect(thought).to_contain_text("hmhmhmhmhm")
        page.get_by_test_id("stop-button").click()
        expect(thought).to_contain_text("Reasoning (stopped)")
        expect(page.get_by_test_id("bot").last).to_contain_text("Stopped")
        expect(page.get_by_test_id("stop-button")).to_be_hidden()
        expect(page.locator(".thought-group").filter(has_text="Thinking…")).to_have_count(0)
        expect_no_error_badge(page)
