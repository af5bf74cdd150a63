"""The chat page in a real headless browser (Debian's chromium driven by Playwright): type a
message, press send, and see an assistant answer stream in."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or importlib.util.find_spec("playwright") is None,
    reason="needs Debian's chromium (apt-get install chromium) and playwright (pip install "
           "playwright); see tests/e2e/REQUIREMENTS.md")


def test_chat_page_streams_an_answer(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.fill("#input", "What is the capital of France?")
            page.click("#send")
            page.wait_for_selector(".message.user")
            answer = page.locator(".message.assistant").first
            # text appears while streaming, before the answer is complete
            page.wait_for_function(
                "() => document.querySelector('.message.assistant')?.textContent.length > 0",
                timeout=60_000)
            page.wait_for_selector(".message.assistant[data-done='true']", timeout=120_000)
            text = answer.text_content()
            assert text and not text.startswith("error:"), text
            assert "error" not in (answer.get_attribute("class") or "")
            assert not errors, errors
        finally:
            browser.close()
