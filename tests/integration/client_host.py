"""Shared by the real-client suites (test_api_clients.py, test_browser.py): the webui they drive (a
fixture each module imports) and what they read from its log. Test support, not a test."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import real_webui

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_DIR = REPO_ROOT / "extensions" / "llava"
MODEL_NAME = "tiny-llava-hf"
# The image limit the suites run under (an in-stream error needs more images than this in one request).
MAX_IMAGES = 3
TRACEBACK = "Traceback (most recent call last)"
SPLICED = re.compile(r"llava: (\d+) image\(s\) spliced into \d+ positions")


def tiny_llava():
    tests_dir = str(REPO_ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    import tiny_llava as module

    return module


def spliced_counts(log_slice: str) -> list[int]:
    """Images spliced per generation that had any, in order."""
    return [int(count) for count in SPLICED.findall(log_slice)]


class LogSlice:
    """The part of the server log written from now on."""

    def __init__(self, server):
        self.server, self.start = server, len(server.log_text())

    def text(self) -> str:
        return self.server.log_text()[self.start:]


def ui_host() -> real_webui.WebuiHost:
    """The webui host of ``$WEBUI_DIR`` / ``$WEBUI_PYTHON`` with its gradio fork; skips the test otherwise."""
    host, why = real_webui.host_from_env()
    if host is None:
        pytest.skip(why)
    if real_webui.gradio_version(host) is None:
        pytest.skip("gradio is not importable in $WEBUI_PYTHON (an API-only host)")
    return host


@pytest.fixture(scope="module")
def llava_ui_server(tmp_path_factory):
    """A webui with its UI, the API (with a key) and the extension, the tiny llava-hf model loaded through
    the API as a user would from the Model tab. The log must hold no traceback when the module ends.
    (One per test module: a conftest.py here would shadow the suite's ``from conftest import``.)"""
    host = ui_host()
    root = tmp_path_factory.mktemp("webui-clients")
    checkpoints = tiny_llava().write_tiny_checkpoints(root / "checkpoints", seed=0)
    user_data = real_webui.make_user_data_dir(host, root / "user_data", settings={
        # Short replies from the random model; greedy, so that replies can be compared.
        "max_new_tokens": 12, "auto_max_new_tokens": False, "do_sample": False, "temperature": 0,
        "llava-max_images_per_request": MAX_IMAGES,
    })
    (user_data / "models" / MODEL_NAME).symlink_to(checkpoints.hf.resolve(), target_is_directory=True)
    real_webui.link_user_extension(user_data, "llava", EXTENSION_DIR)
    server = real_webui.WebuiServer(host, user_data, root / "webui.log", extensions=("llava",), nowebui=False)
    server.start_and_wait()
    try:
        server.load_model(MODEL_NAME)
        yield server
    finally:
        server.stop()
    log = server.log_text()
    assert TRACEBACK not in log and "Exception in ASGI application" not in log, log[-8000:]
