"""Opt-in: the newer LLaVA-architecture families inside the real text-generation-webui.

Skipped unless ``$WEBUI_DIR`` and ``$WEBUI_PYTHON`` name a webui host (see test_webui_real.py). For each
family (VipLLaVA, Pixtral in the llava-hf form, Mistral 3: ``tests/tiny_families.py``; LLaVA-OneVision:
``tests/tiny_onevision.py``; Aya Vision: ``tests/tiny_aya_vision.py``) a tiny random checkpoint written with
``save_pretrained`` in the hub layout is linked into a private ``user_data/models``; webui starts with
``--loader Transformers --cpu --api --extensions llava`` and no model (their ``model_type`` makes webui's
startup load raise before any extension is imported), and the model is loaded through
``/v1/internal/model/load`` as the Model tab does: webui's own loader then loads the language model alone.
Over the API:

* an image chat with a non-square image (scaled and cut into Pixtral rows; OneVision: tiled, unpadded and
  downscaled; Aya: tiles plus the thumbnail) is spliced, and the prompt that reached the model is exactly as
  long as the family's transformers processor makes the prompt the checkpoint's own chat template renders
  for that message (image part + text part): the count comes from the extension's log line
  "N image(s) spliced into P positions";
* the first token's distribution follows the image (same image, same distribution; another image, another);
* a follow-up turn without a new image still sees the first image, and a text-only chat splices nothing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import real_webui

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
QUESTION_CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _tests_module(name: str):
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    return __import__(name)


def _without_processor_bos(length: int, prompt: str, bos: str | None) -> int:
    """The processor tokenizes with special tokens; a template that prints BOS itself then gets two."""
    return length - 1 if bos and prompt.startswith(bos) else length


def _llava_family_length(kind: str, folder: Path, image) -> int:
    """VipLLaVA / Pixtral / Mistral 3: the checkpoint's template, then test_families.Reference's processing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    path = folder / "chat_template.json"
    template = json.loads(path.read_text())["chat_template"] if path.is_file() else (folder / "chat_template.jinja").read_text()
    prompt = tokenizer.apply_chat_template(QUESTION_CONVERSATION, chat_template=template,
                                           add_generation_prompt=True, tokenize=False)
    length = _tests_module("test_families").Reference(kind, folder).inputs(prompt, [image])["input_ids"].shape[1]
    return _without_processor_bos(length, prompt, tokenizer.bos_token)


def _processor_length(module_name: str, folder: Path, image) -> int:
    """OneVision / Aya Vision: the family's own processor, template and tokenization alike."""
    processor = _tests_module(module_name).reference_processor(folder)
    prompt = processor.apply_chat_template(QUESTION_CONVERSATION, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    inputs = processor(images=[image], text=prompt, add_special_tokens=not (bos and prompt.startswith(bos)))
    return len(inputs["input_ids"][0])


@dataclass(frozen=True)
class Family:
    write_checkpoint: Callable[[Path], Path]  # root -> the checkpoint folder
    reference_length: Callable[[Path, object], int]  # (folder, image) -> the reference prompt length
    image_size: tuple[int, int]


def _family_checkpoint(kind: str):
    return lambda root: getattr(_tests_module("tiny_families").write_tiny_family_checkpoints(root), kind)


def _hub_checkpoint(module_name: str, writer: str):
    return lambda root: getattr(_tests_module(module_name), writer)(root).hub


FAMILIES = {
    **{kind: Family(_family_checkpoint(kind), lambda folder, image, kind=kind: _llava_family_length(kind, folder, image),
                    (70, 45))
       for kind in ("vipllava", "pixtral", "mistral3")},
    "onevision": Family(_hub_checkpoint("tiny_onevision", "write_tiny_onevision"),
                        lambda folder, image: _processor_length("tiny_onevision", folder, image), (300, 200)),
    "aya": Family(_hub_checkpoint("tiny_aya_vision", "write_tiny_aya"),
                  lambda folder, image: _processor_length("tiny_aya_vision", folder, image), (300, 90)),
}


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_message(url: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


class FamilyServer:
    """A real webui serving one family's tiny checkpoint, with two test images."""

    def __init__(self, kind: str, server: real_webui.WebuiServer, folder: Path, banned_ids: range):
        self.kind, self.server, self.folder = kind, server, folder
        self.model_name = f"tiny-{kind}"
        tiny_llava = _tests_module("tiny_llava")
        size = FAMILIES[kind].image_size
        self.images = {name: (picture, png_data_url(picture))
                       for name, picture in (("first", tiny_llava.make_test_image(*size, seed=1)),
                                             ("second", tiny_llava.make_test_image(*size, seed=2)))}
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


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_server(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"webui-{kind}")
    folder = FAMILIES[kind].write_checkpoint(root / "checkpoints")
    user_data = real_webui.make_user_data_dir(HOST, root / "user_data")
    (user_data / "models" / f"tiny-{kind}").symlink_to(folder.resolve(), target_is_directory=True)
    real_webui.link_user_extension(user_data, EXTENSION_NAME, EXTENSION_DIR)
    server = real_webui.WebuiServer(HOST, user_data, root / "webui.log", model=None, extensions=(EXTENSION_NAME,),
                                    nowebui=True)
    with contextlib.ExitStack() as stack:
        server.start_and_wait()
        stack.callback(server.stop)
        server.load_model(f"tiny-{kind}")
        assert f'Loading the extension "{EXTENSION_NAME}"' in server.log_text()
        from test_webui_real import ids_beyond_tokenizer

        yield FamilyServer(kind, server, folder, ids_beyond_tokenizer(folder))
    assert server.process.returncode == 0, server.log_tail()


def test_image_chat_is_spliced_at_the_reference_length(family_server):
    picture, url = family_server.images["first"]
    _, log_slice = family_server.chat([image_message(url)])
    found = SPLICED.findall(log_slice)
    assert [int(n) for n, _ in found] == [1], log_slice[-3000:]
    active = VISION_ACTIVE.findall(family_server.server.log_text())
    assert active and active[-1] == family_server.model_name
    expected = FAMILIES[family_server.kind].reference_length(family_server.folder, picture)
    assert int(found[0][1]) == expected, log_slice[-3000:]


def test_image_chat_follows_the_image(family_server):
    images = family_server.images
    first, _ = family_server.chat([image_message(images["first"][1])])
    second, _ = family_server.chat([image_message(images["second"][1])])
    again, _ = family_server.chat([image_message(images["first"][1])])
    first_dist = real_webui.first_token_distribution(first)
    again_dist = real_webui.first_token_distribution(again)
    second_dist = real_webui.first_token_distribution(second)
    assert set(first_dist) == set(again_dist)
    assert max(abs(first_dist[t] - again_dist[t]) for t in first_dist) <= SAME_IMAGE_TOLERANCE
    assert set(first_dist) != set(second_dist) or max(abs(first_dist[t] - second_dist[t]) for t in first_dist) \
        > SAME_IMAGE_TOLERANCE, "two different images gave the same first-token distribution"


def test_follow_up_and_text_only(family_server):
    opening = image_message(family_server.images["first"][1])
    family_server.chat([opening])
    # A fixed assistant turn: a random model's reply can be blank, which webui drops from the history, and
    # Pixtral's template then refuses two user turns in a row (its alternation check).
    history = [opening, {"role": "assistant", "content": "It is a small picture."}]
    _, log_slice = family_server.chat(history + [{"role": "user", "content": "What colour is it?"}])
    assert [int(n) for n, _ in SPLICED.findall(log_slice)] == [1], log_slice[-3000:]
    _, log_slice = family_server.chat([{"role": "user", "content": "Hello, who are you?"}])
    assert SPLICED.findall(log_slice) == [], log_slice[-3000:]
