"""Opt-in: the chat page of a real webui with this extension, in headless Chromium through Playwright.

Walks what a user does: a picture through the panel's button, a second one through webui's paperclip,
both sent in one message, that reply regenerated and continued, a text follow-up, a corrupt file, a
dummy message with a picture, Remove last and a new chat. Checks what the panel says at each step
(pending, sent, token costs), what the server spliced, the notice for the corrupt file, and fails on any
page error or console error. Uses Debian's ``chromium`` (``$CHROMIUM`` names another executable; Playwright's
own browser download is not used). ``$LLAVA_SCREENSHOTS`` keeps the screenshots in that folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest

from client_host import TRACEBACK, LogSlice, llava_ui_server, spliced_counts, tiny_llava  # noqa: F401

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPLY_TIMEOUT_S = 120.0
NOTHING_PENDING = "No image waiting for the next message."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    make = tiny_llava().make_test_image
    paths = {"first": folder / "first.png", "second": folder / "second.png", "broken": folder / "broken.png"}
    make(96, 64, seed=1).save(paths["first"])
    make(64, 96, seed=2).save(paths["second"])
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR truncated")
    return paths


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = Path(os.environ.get("LLAVA_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def open_chat_page(ui_port: int, ready_selector: str = "#llava-panel"):
    """Headless Chromium on webui's chat page: yields ``(page, problems)``, ``problems`` collecting every
    page error and console error from then on. Skips the test without Chromium."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary profile of its own.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 1500})
            tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            tab.on("console", lambda message: problems.append(f"console error: {message.text}")
                   if message.type == "error" else None)
            # Gradio keeps connections open, so "network idle" never comes: wait for the load event.
            tab.goto(f"http://127.0.0.1:{ui_port}/", wait_until="load")
            tab.wait_for_selector(ready_selector, timeout=60_000)
            yield tab, problems
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(llava_ui_server):
    with open_chat_page(llava_ui_server.ui_port, "#llava-image") as opened:
        yield opened


def wait_for_text(page, selector: str, predicate, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = page.locator(selector).inner_text()
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{selector} never matched; last text: {text!r}")


def send(page, server, text: str) -> str:
    """Type ``text``, press Send, wait for the reply to finish; returns the server log of that turn."""
    page.locator("#chat-input textarea").fill(text)
    log = _reply_to(page, server, lambda: page.locator("#Generate").click())
    wait_for_text(page, "#chat", lambda chat: text in chat)
    return log


def shortcut(page, server, keys: str) -> str:
    """``keys`` in the chat input (webui's shortcuts: Control+Enter regenerates, Alt+Enter continues the
    last reply); returns the server log of that turn."""
    return _reply_to(page, server, lambda: page.locator("#chat-input textarea").press(keys))


def _reply_to(page, server, action) -> str:
    log = LogSlice(server)
    done = server.log_text().count("Output generated in")
    action()
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while server.log_text().count("Output generated in") == done:
        assert time.monotonic() < deadline, f"no reply within {REPLY_TIMEOUT_S} s:\n{server.log_tail()}"
        time.sleep(0.2)
    time.sleep(1.0)  # the last streamed update and the panel's events
    return log.text()


def panel_upload(page, path: Path) -> None:
    page.locator("#llava-panel input[type=file]").set_input_files(str(path))


def test_a_user_walks_through_the_chat(page, llava_ui_server, files, screenshots):
    page, problems = page
    server = llava_ui_server
    assert page.locator("#llava-pending").inner_text() == NOTHING_PENDING
    assert "Vision active" in wait_for_text(page, "#llava-status", lambda status: "Vision active" in status)

    # A picture through the panel's button, a second through the paperclip: both pending.
    panel_upload(page, files["first"])
    pending = wait_for_text(page, "#llava-pending", lambda text: "first.png" in text)
    assert "Next message" in pending and "first.png: 96×64, " in pending and "tokens of context" in pending
    page.locator("#chat-input input[type=file]").set_input_files(str(files["second"]))
    pending = wait_for_text(page, "#llava-pending", lambda text: "second.png" in text)
    assert "first.png: 96×64" in pending and "second.png: 64×96" in pending

    # Both go with one message and both reach the model.
    turn = send(page, server, "Compare the two pictures.")
    assert spliced_counts(turn) == [2], turn[-3000:]
    assert wait_for_text(page, "#llava-pending", lambda text: text == NOTHING_PENDING)
    sent = wait_for_text(page, "#llava-sent", lambda text: "second.png" in text)
    assert sent.startswith("Sent with your last message") and "first.png: 96×64" in sent
    page.screenshot(path=str(screenshots / "two_images_one_message.png"), full_page=True)

    # Regenerate, then Continue: the same two pictures go with the message again; the panel still says they
    # were sent.
    for keys in ("Control+Enter", "Alt+Enter"):
        turn = shortcut(page, server, keys)
        assert spliced_counts(turn) == [2], (keys, turn[-3000:])
        assert page.locator("#llava-pending").inner_text() == NOTHING_PENDING
        assert "second.png" in page.locator("#llava-sent").inner_text()

    # A text follow-up: the model still sees the two pictures of the last message that had any.
    turn = send(page, server, "Which one is brighter?")
    assert spliced_counts(turn) == [2], turn[-3000:]
    sent = wait_for_text(page, "#llava-sent", lambda text: "no image" in text)
    assert "the model still sees the images of your most recent message" in sent

    # A corrupt file: flagged while pending, answered with a notice, the chat goes on.
    panel_upload(page, files["broken"])
    pending = wait_for_text(page, "#llava-pending", lambda text: "broken.png" in text)
    assert "⚠️ broken.png: cannot decode image" in pending and "will not be shown to the model" in pending
    turn = send(page, server, "And this one?")
    chat = wait_for_text(page, "#chat", lambda text: "llava: broken.png: cannot decode image" in text)
    assert "the rest of the message was answered" in chat
    assert "⚠️ broken.png" in wait_for_text(page, "#llava-sent", lambda text: "broken.png" in text)
    page.screenshot(path=str(screenshots / "corrupt_file.png"), full_page=True)
    assert TRACEBACK not in turn

    # A dummy message (webui's "Send dummy message": no reply) with a picture: the panel says it was sent.
    panel_upload(page, files["first"])
    wait_for_text(page, "#llava-pending", lambda text: "first.png" in text)
    page.evaluate("[...document.querySelectorAll('button')]"
                  ".find(button => button.textContent.trim() === 'Send dummy message').click()")
    assert "first.png: 96×64" in wait_for_text(page, "#llava-sent", lambda text: "first.png" in text)
    wait_for_text(page, "#llava-pending", lambda text: text == NOTHING_PENDING)
    # Remove last (Ctrl+Shift+Backspace): that message is gone, so the panel no longer describes it, not even
    # after the checkbox changes; the same after starting a new chat.
    page.locator("#chat-input textarea").press("Control+Shift+Backspace")
    wait_for_text(page, "#llava-sent", lambda text: text == "")
    page.locator("#llava-embed-all input").click()
    time.sleep(1.0)
    assert page.locator("#llava-sent").inner_text() == ""
    page.locator("#llava-embed-all input").click()
    send(page, server, "One more question.")
    assert "no image" in wait_for_text(page, "#llava-sent", lambda text: text != "")
    page.locator("#new-chat-btn").click()
    wait_for_text(page, "#llava-sent", lambda text: text == "")
    assert page.locator("#llava-pending").inner_text() == NOTHING_PENDING

    assert problems == []
