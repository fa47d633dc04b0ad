"""Opt-in: VipLLaVA, Pixtral (llava-hf form) and Mistral 3 inside the real text-generation-webui.

Skipped unless ``$WEBUI_DIR`` and ``$WEBUI_PYTHON`` name a webui host (see test_webui_real.py). For each
family a tiny random checkpoint (``tests/tiny_families.py``, written with ``save_pretrained``) is linked into
a private ``user_data/models``; webui starts with ``--loader Transformers --cpu --api --extensions llava``
and no model (their ``model_type`` makes webui's startup load raise before any extension is imported), and
the model is loaded through ``/v1/internal/model/load`` as the Model tab does. Then, over the API:

* an image chat (a non-square image, scaled and cut into Pixtral rows) is spliced, and the prompt that
  reached the model is exactly as long as the family's transformers processor makes the prompt the
  checkpoint's own chat template renders for that message (image part + text part): the count comes
  from the extension's log line "N image(s) spliced into P positions";
* the first token's distribution follows the image (same image, same distribution; another image, another);
* a follow-up turn without a new image still sees the first image, and a text-only chat splices nothing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import sys
from pathlib import Path

import pytest

import real_webui

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_DIR = REPO_ROOT / "extensions" / "llava"
TESTS_DIR = REPO_ROOT / "tests"
EXTENSION_NAME = "llava"

HOST, SKIP_REASON = real_webui.host_from_env()
pytestmark = pytest.mark.skipif(HOST is None, reason=SKIP_REASON)

VISION_ACTIVE = re.compile(r"llava: Vision active: (\S+) \(hf\)")
SPLICED = re.compile(r"llava: (\d+) image\(s\) spliced into (\d+) positions")
FAILURE_MARKERS = ("Traceback (most recent call last)", "Failed to generate reply",
                   "Failed to load the extension", "Could not import the requirements")
QUESTION = "Describe the picture."
MAX_TOKENS = 6
SAME_IMAGE_TOLERANCE = 1e-4
FAMILIES = ("vipllava", "pixtral", "mistral3")
IMAGE_SIZE = (70, 45)


def _tests_module(name: str):
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    return __import__(name)


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_message(url: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


def reference_prompt_length(folder: Path, kind: str, image) -> int:
    """Input length the family's processor gives for the message [image, text] rendered by the
    checkpoint's own chat template (what webui's prompt must come to)."""
    from transformers import AutoTokenizer

    test_families = _tests_module("test_families")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    path = folder / "chat_template.json"
    template = json.loads(path.read_text())["chat_template"] if path.is_file() else (folder / "chat_template.jinja").read_text()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        chat_template=template, add_generation_prompt=True, tokenize=False)
    inputs = test_families.Reference(kind, folder).inputs(prompt, [image])
    length = inputs["input_ids"].shape[1]
    bos = tokenizer.bos_token
    return length - 1 if bos and prompt.startswith(bos) else length


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _tests_module("tiny_families").write_tiny_family_checkpoints(tmp_path_factory.mktemp("tiny-families"))


@pytest.fixture(scope="module")
def images():
    tiny_llava = _tests_module("tiny_llava")
    first, second = (tiny_llava.make_test_image(*IMAGE_SIZE, seed=seed) for seed in (1, 2))
    return {"first": (first, png_data_url(first)), "second": (second, png_data_url(second))}


class Server:
    def __init__(self, server: real_webui.WebuiServer, banned_ids: range):
        self.server = server
        # Padded vocabulary rows (VipLLaVA) have no token text; webui cannot report them in the top-5
        # log-probabilities (see test_webui_real.ids_beyond_tokenizer), so they are kept out.
        self.logit_bias = {str(token_id): -1e4 for token_id in banned_ids}

    def chat(self, messages):
        start = len(self.server.log_text())
        extra = {"logit_bias": self.logit_bias} if self.logit_bias else {}
        reply = self.server.chat(messages, max_tokens=MAX_TOKENS, **extra)
        log_slice = self.server.log_text()[start:]
        for marker in FAILURE_MARKERS:
            assert marker not in log_slice, log_slice[-6000:]
        assert len(real_webui.generated_logprobs(reply)) == MAX_TOKENS, reply
        return reply, log_slice


@pytest.fixture(scope="module", params=FAMILIES)
def family_server(request, checkpoints, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"webui-{kind}")
    user_data = real_webui.make_user_data_dir(HOST, root / "user_data")
    model_name = f"tiny-{kind}"
    (user_data / "models" / model_name).symlink_to(getattr(checkpoints, kind).resolve(), target_is_directory=True)
    real_webui.link_user_extension(user_data, EXTENSION_NAME, EXTENSION_DIR)
    server = real_webui.WebuiServer(HOST, user_data, root / "webui.log", model=None, extensions=(EXTENSION_NAME,),
                                    nowebui=True)
    with contextlib.ExitStack() as stack:
        server.start_and_wait()
        stack.callback(server.stop)
        server.load_model(model_name)
        assert f'Loading the extension "{EXTENSION_NAME}"' in server.log_text()
        from test_webui_real import ids_beyond_tokenizer

        yield kind, Server(server, ids_beyond_tokenizer(getattr(checkpoints, kind)))
    assert server.process.returncode == 0, server.log_tail()


def test_image_chat_is_spliced_at_the_reference_length(family_server, checkpoints, images):
    kind, server = family_server
    picture, url = images["first"]
    reply, log_slice = server.chat([image_message(url)])
    found = SPLICED.findall(log_slice)
    assert [int(n) for n, _ in found] == [1], log_slice[-3000:]
    active = VISION_ACTIVE.findall(server.server.log_text())
    assert active and active[-1] == f"tiny-{kind}"
    assert int(found[0][1]) == reference_prompt_length(getattr(checkpoints, kind), kind, picture), log_slice[-3000:]


def test_image_chat_follows_the_image(family_server, images):
    _, server = family_server
    first, _ = server.chat([image_message(images["first"][1])])
    second, _ = server.chat([image_message(images["second"][1])])
    again, _ = server.chat([image_message(images["first"][1])])
    first_dist = real_webui.first_token_distribution(first)
    again_dist = real_webui.first_token_distribution(again)
    second_dist = real_webui.first_token_distribution(second)
    assert set(first_dist) == set(again_dist)
    assert max(abs(first_dist[t] - again_dist[t]) for t in first_dist) <= SAME_IMAGE_TOLERANCE
    assert set(first_dist) != set(second_dist) or max(abs(first_dist[t] - second_dist[t]) for t in first_dist) \
        > SAME_IMAGE_TOLERANCE, "two different images gave the same first-token distribution"


def test_follow_up_and_text_only(family_server, images):
    _, server = family_server
    opening = image_message(images["first"][1])
    server.chat([opening])
    # A fixed assistant turn: a random model's reply can be blank, which webui drops from the history, and
    # Pixtral's template then refuses two user turns in a row (its alternation check).
    history = [opening, {"role": "assistant", "content": "It is a small picture."}]
    _, log_slice = server.chat(history + [{"role": "user", "content": "What colour is it?"}])
    assert [int(n) for n, _ in SPLICED.findall(log_slice)] == [1], log_slice[-3000:]
    _, log_slice = server.chat([{"role": "user", "content": "Hello, who are you?"}])
    assert SPLICED.findall(log_slice) == [], log_slice[-3000:]
