"""The chat page in a real browser (Debian's chromium through Playwright): a question streams its answer and
shows its sources, a follow-up in the same session is answered from the rewritten query, the hand-off button
switches the page to the hand-off state. Saves the screenshot docs/helpdesk.md shows."""

from __future__ import annotations

import os
from pathlib import Path

DOCS_IMAGE = Path(__file__).resolve().parents[3] / "docs" / "images" / "helpdesk_chat.png"


def test_chat_page_streams_answers_sources_and_follow_ups(helpdesk_url, browser_page, tmp_path):
    url, service = helpdesk_url
    page = browser_page
    page.goto(url + "/")
    page.fill("#question", "why does my default list argument keep growing between calls?")
    page.click("#send")
    first = page.locator(".msg.bot").nth(0)
    page.wait_for_selector(".msg.bot[data-mode='generated'] .sources li")  # sources arrive before the text
    page.wait_for_function("document.querySelector('.msg.bot .answer').textContent.length > 0")  # streaming
    page.wait_for_selector(".msg.bot[data-done='1']", timeout=60_000)
    assert first.locator(".sources li").first.inner_text().startswith("programming-010")
    assert first.locator(".answer").inner_text().strip()

    page.fill("#question", "why are python strings immutable?")
    page.click("#send")
    page.wait_for_selector(".msg.bot:nth-of-type(4)[data-done='1']", timeout=60_000)
    page.fill("#question", "and dictionary keys?")
    page.click("#send")
    page.wait_for_selector(".msg.bot:nth-of-type(6)[data-done='1']", timeout=60_000)
    follow_up = page.locator(".msg.bot").nth(2)
    assert follow_up.locator(".sources li").first.inner_text().startswith("design-020")
    session_id = page.evaluate("sessionStorage.getItem('helpdesk-session')")
    assert [t["role"] for t in service.store.turns(session_id)] == ["user", "assistant"] * 3

    follow_up.locator(".feedback button").first.click()
    page.wait_for_selector(".feedback button.chosen")
    page.click("#handoff")
    page.wait_for_selector("main[data-state='handoff'] #handoff-banner:not([hidden])")
    assert service.store.turns(session_id)[-1]["role"] == "handoff"
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("PAGELLM_DOCS_SCREENSHOTS"):
        DOCS_IMAGE.write_bytes(shot.read_bytes())
