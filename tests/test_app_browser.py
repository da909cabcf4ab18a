"""The chat app in a real browser (Debian's headless Chromium through Playwright): type a message, wait for the
streamed answer, check the collapsible reasoning block, press Stop during a long generation, save screenshots.

The page talks to a scripted tiny DeepSeek model (tests/app_helpers.py) through the real generation path.
"""

from pathlib import Path

import pytest
from app_helpers import ENDLESS_SCRIPT, ForwardCounter, scripted_chat_model, serve

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
            page.screenshot(path=tmp_path / "chat_stopped.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "chat_answer.png").stat().st_size > 10_000
    assert (tmp_path / "chat_stopped.png").stat().st_size > 10_000
