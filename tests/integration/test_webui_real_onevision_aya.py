"""Opt-in: LLaVA-OneVision and Aya Vision inside the real text-generation-webui.

Skipped unless ``$WEBUI_DIR`` and ``$WEBUI_PYTHON`` name a webui host (see test_webui_real.py). For each
family the tiny random checkpoint in the hub layout (transformers 4.x key names; ``tests/tiny_onevision.py``,
``tests/tiny_aya_vision.py``) is linked into a private ``user_data/models``; webui starts with
``--loader Transformers --cpu --api --extensions llava`` and no model (``llava_onevision`` / ``aya_vision``
make its startup load raise before any extension is imported), and the model is loaded through
``/v1/internal/model/load`` as the Model tab does: webui's own loader then loads the language model alone
(Qwen2 / Cohere2). Over the API:

* an image chat with a non-square image (OneVision: tiled, unpadded and downscaled; Aya: 3 tiles plus the
  thumbnail) is spliced, and the prompt that reached the model is exactly as long as the family's
  transformers processor makes the prompt the checkpoint's own chat template renders for that message (the
  extension's log line "N image(s) spliced into P positions");
* the first token's distribution follows the image (same image, same distribution; another, another);
* a follow-up turn without a new image still sees the first image; a text-only chat splices nothing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import sys
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
FAMILIES = {"onevision": ("tiny_onevision", "write_tiny_onevision", (300, 200)),
            "aya": ("tiny_aya_vision", "write_tiny_aya", (300, 90))}


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


def reference_prompt_length(family: str, folder: Path, image) -> int:
    """Input length the family's processor gives for the message [image, text] rendered by the checkpoint's
    own chat template (BOS as the processor's ``apply_chat_template`` adds it: once)."""
    module = _tests_module(FAMILIES[family][0])
    processor = module.reference_processor(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    inputs = processor(images=[image], text=prompt, add_special_tokens=not (bos and prompt.startswith(bos)))
    return len(inputs["input_ids"][0])


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_server(request, tmp_path_factory):
    family = request.param
    module_name, writer, size = FAMILIES[family]
    root = tmp_path_factory.mktemp(f"webui-{family}")
    checkpoints = getattr(_tests_module(module_name), writer)(root / "checkpoints")
    tiny_llava = _tests_module("tiny_llava")
    first, second = (tiny_llava.make_test_image(*size, seed=seed) for seed in (1, 2))
    user_data = real_webui.make_user_data_dir(HOST, root / "user_data")
    model_name = f"tiny-{family}"
    (user_data / "models" / model_name).symlink_to(checkpoints.hub.resolve(), target_is_directory=True)
    real_webui.link_user_extension(user_data, EXTENSION_NAME, EXTENSION_DIR)
    server = real_webui.WebuiServer(HOST, user_data, root / "webui.log", model=None, extensions=(EXTENSION_NAME,),
                                    nowebui=True)
    with contextlib.ExitStack() as stack:
        server.start_and_wait()
        stack.callback(server.stop)
        server.load_model(model_name)
        assert f'Loading the extension "{EXTENSION_NAME}"' in server.log_text()
        from test_webui_real import ids_beyond_tokenizer

        banned = ids_beyond_tokenizer(checkpoints.hub)
        yield {"family": family, "server": server, "folder": checkpoints.hub, "model_name": model_name,
               "images": {"first": (first, png_data_url(first)), "second": (second, png_data_url(second))},
               "logit_bias": {str(token_id): -1e4 for token_id in banned}}
    assert server.process.returncode == 0, server.log_tail()


def chat(context, messages):
    server = context["server"]
    start = len(server.log_text())
    extra = {"logit_bias": context["logit_bias"]} if context["logit_bias"] else {}
    reply = server.chat(messages, max_tokens=MAX_TOKENS, **extra)
    log_slice = server.log_text()[start:]
    for marker in FAILURE_MARKERS:
        assert marker not in log_slice, log_slice[-6000:]
    assert len(real_webui.generated_logprobs(reply)) == MAX_TOKENS, reply
    return reply, log_slice


def test_image_chat_is_spliced_at_the_reference_length(family_server):
    picture, url = family_server["images"]["first"]
    _, log_slice = chat(family_server, [image_message(url)])
    found = SPLICED.findall(log_slice)
    assert [int(n) for n, _ in found] == [1], log_slice[-3000:]
    active = VISION_ACTIVE.findall(family_server["server"].log_text())
    assert active and active[-1] == family_server["model_name"]
    expected = reference_prompt_length(family_server["family"], family_server["folder"], picture)
    assert int(found[0][1]) == expected, log_slice[-3000:]


def test_image_chat_follows_the_image(family_server):
    images = family_server["images"]
    first, _ = chat(family_server, [image_message(images["first"][1])])
    second, _ = chat(family_server, [image_message(images["second"][1])])
    again, _ = chat(family_server, [image_message(images["first"][1])])
    first_dist = real_webui.first_token_distribution(first)
    again_dist = real_webui.first_token_distribution(again)
    second_dist = real_webui.first_token_distribution(second)
    assert set(first_dist) == set(again_dist)
    assert max(abs(first_dist[t] - again_dist[t]) for t in first_dist) <= SAME_IMAGE_TOLERANCE
    assert set(first_dist) != set(second_dist) or max(abs(first_dist[t] - second_dist[t]) for t in first_dist) \
        > SAME_IMAGE_TOLERANCE, "two different images gave the same first-token distribution"


def test_follow_up_and_text_only(family_server):
    opening = image_message(family_server["images"]["first"][1])
    chat(family_server, [opening])
    # A fixed assistant turn: a random model's reply can be blank, which webui drops from the history.
    history = [opening, {"role": "assistant", "content": "It is a small picture."}]
    _, log_slice = chat(family_server, history + [{"role": "user", "content": "What colour is it?"}])
    assert [int(n) for n, _ in SPLICED.findall(log_slice)] == [1], log_slice[-3000:]
    _, log_slice = chat(family_server, [{"role": "user", "content": "Hello, who are you?"}])
    assert SPLICED.findall(log_slice) == [], log_slice[-3000:]
