"""Shared by the real-client suites (test_api_clients.py, test_browser.py): the server they drive and
what they read from its log. The fixture itself is in conftest.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

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
