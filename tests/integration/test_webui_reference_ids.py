"""Opt-in: inside a real text-generation-webui, the ids that reach the model equal the reference's, token for token.

Skipped unless ``$WEBUI_DIR`` and ``$WEBUI_PYTHON`` name a webui host (``tools/setup_webui_host.sh``).

A small test-only extension loaded after ``llava`` (``--extensions llava llava_idcapture``) records, for every
generation, the ``input_ids`` the ``tokenizer_modifier`` chain hands to ``model.generate`` and the rows whose
``inputs_embeds`` differ from their id's plain embedding (the image rows). Tiny checkpoints in the tokenizer
configs and chat-template shapes real checkpoints ship (tests/reference_support.py) are loaded one after the
other through ``/v1/internal/model/load`` into one webui, and chats are sent over ``/v1/chat/completions``:
instruct mode (the checkpoint's template) with webui's ``add_bos_token`` on and off, several turns with images
in several of them ("embed all" on in ``settings.yaml``), a system message, a text-only chat, chat mode, and
every template of webui's own menu (``instruction_template: Alpaca``, ``ChatML``, ... ``Vicuna-v1.1``). The
references are computed here: the checkpoint's processor for llava-hf, original LLaVA's ``get_prompt`` +
``tokenizer_image_token`` for the original formats.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest

import real_webui

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_DIR = REPO_ROOT / "extensions" / "llava"
TESTS_DIR = REPO_ROOT / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

HOST, SKIP_REASON = real_webui.host_from_env()
pytestmark = pytest.mark.skipif(HOST is None, reason=SKIP_REASON)

CAPTURE_EXTENSION = textwrap.dedent('''
    """Test-only: record what the tokenizer_modifier chain hands to model.generate."""
    import json
    from pathlib import Path

    import torch

    from modules import shared

    params = {"display_name": "ids capture"}
    RECORDS = Path(__file__).resolve().parent / "captured.jsonl"


    def tokenizer_modifier(state, prompt, input_ids, input_embeds):
        image_rows = []
        if input_embeds is not None:
            with torch.no_grad():
                plain = shared.model.get_input_embeddings()(input_ids.to(input_embeds.device))
            image_rows = (input_embeds[0] != plain[0]).any(dim=-1).nonzero().flatten().tolist()
        record = {"model": shared.model_name, "prompt": prompt, "ids": input_ids[0].tolist(),
                  "image_rows": image_rows, "embeds": input_embeds is not None}
        with open(RECORDS, "a", encoding="utf-8") as records:
            records.write(json.dumps(record) + "\\n")
        return prompt, input_ids, input_embeds
''')

REPLY = "It is red."
QUESTION = "What is in this picture?"


def _images():
    from tiny_llava import make_test_image

    return [make_test_image(70, 45, seed=1), make_test_image(45, 70, seed=2), make_test_image(60, 60, seed=3)]


def _data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _conversations():
    first, second, third = _images()
    return {
        "one-image": [(QUESTION, [first], None)],
        "images-in-two-turns": [("Compare these.", [first, second], REPLY), ("And this one?", [third], None)],
        "image-then-text": [(QUESTION, [first], REPLY), ("Why?", [], None)],
        "text-only": [("Hello there.", [], REPLY), ("Tell me more.", [], None)],
    }


# (checkpoint, tokenizer config, llava-hf template, folder name selecting an original conversation format)
VARIANTS = [
    ("v15", "legacy-false", None, None),
    ("v15", "legacy-true", None, None),
    ("v15", "add-bos-false", None, None),
    ("v0", "legacy-false", None, None),
    ("v15", "legacy-false", None, "llava_llama_2"),
    ("v15", "legacy-false", None, "chatml_direct"),
    ("hf", "legacy-false", "fixture", None),
    ("hf", "legacy-true", "fixture", None),
    ("hf", "add-bos-false", "fixture", None),
    ("hf", "legacy-false", "string", None),
    ("hf", "legacy-true", "string", None),
    ("hf", "legacy-false", "hub-parts", None),
    ("hf", "legacy-false", "tokenizer-config-string", None),
]


def _variant_name(variant) -> str:
    import reference_support

    fmt, tokenizer_config, template, conversation_format = variant
    base = reference_support.FORMAT_FOLDERS[conversation_format] if conversation_format else f"tiny-{fmt}"
    return "-".join(filter(None, (base, tokenizer_config, template)))


class IdsServer:
    """One webui with llava + the capture extension; models are swapped through the API."""

    def __init__(self, server: real_webui.WebuiServer, records: Path, models_dir: Path):
        self.server = server
        self.records = records
        self.models_dir = models_dir
        self.loaded = None

    def load(self, name: str) -> None:
        if self.loaded != name:
            self.server.load_model(name)
            self.loaded = name

    def chat(self, turns, *, system=None, **body) -> dict:
        messages = [{"role": "system", "content": system}] if system is not None else []
        for text, images, reply in turns:
            if images:
                content = [{"type": "image_url", "image_url": {"url": _data_url(p)}} for p in images]
                messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
            else:
                messages.append({"role": "user", "content": text})
            if reply is not None:
                messages.append({"role": "assistant", "content": reply})
        before = self.records.read_text().count("\n") if self.records.exists() else 0
        # No logprobs: this suite is about the prompt (webui's logprobs code is exercised elsewhere).
        self.server.chat(messages, max_tokens=2, logprobs=False, top_logprobs=None, **body)
        lines = self.records.read_text().splitlines()
        assert len(lines) == before + 1, f"expected one generation, got {len(lines) - before}"
        record = json.loads(lines[-1])
        assert record["model"] == self.loaded
        return record


def link_llava_and_capture(user_data: Path, root: Path) -> Path:
    """Link the extension and the capture extension (written to ``root``) as user extensions; returns the
    file the capture extension appends its records to."""
    real_webui.link_user_extension(user_data, "llava", EXTENSION_DIR)
    capture_dir = root / "llava_idcapture"
    capture_dir.mkdir()
    (capture_dir / "script.py").write_text(CAPTURE_EXTENSION, encoding="utf-8")
    real_webui.link_user_extension(user_data, "llava_idcapture", capture_dir)
    return capture_dir / "captured.jsonl"


@pytest.fixture(scope="module")
def ids_server(tiny_checkpoints, tmp_path_factory):
    import reference_support

    root = tmp_path_factory.mktemp("webui-ids")
    user_data = real_webui.make_user_data_dir(HOST, root / "user_data",
                                              settings={"llava-add_all_images_to_prompt": True})
    for variant in VARIANTS:
        fmt, tokenizer_config, template, _ = variant
        reference_support.make_variant(getattr(tiny_checkpoints, fmt), user_data / "models" / _variant_name(variant),
                                       tokenizer_config, template)
    records = link_llava_and_capture(user_data, root)
    server = real_webui.WebuiServer(HOST, user_data, root / "webui.log", model=None,
                                    extensions=("llava", "llava_idcapture"), nowebui=True)
    ready_s = server.start_and_wait()
    logger.info("webui (llava + ids capture) ready after %.1f s", ready_s)
    try:
        yield IdsServer(server, records, user_data / "models")
    finally:
        server.stop()
    log = server.log_text()
    assert "Traceback (most recent call last)" not in log, log[-6000:]
    assert server.process.returncode == 0, server.log_tail()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _ours(record: dict) -> list:
    image_rows = set(record["image_rows"])
    return [None if index in image_rows else token for index, token in enumerate(record["ids"])]


def _marked(prompt: str) -> str:
    """The extension's image slots (U+E000 index:WxH U+E001, written out here) as <image>, image newlines
    (U+E002) as newlines."""
    import re

    return re.sub("\ue000\\d+:\\d+x\\d+\ue001", "<image>", prompt).replace("\ue002", "\n")


def _rows(folder: Path, turns) -> list[int]:
    import reference_support

    return [reference_support.tokens_per_image(folder) for _, images, _ in turns for _ in images]


def _cases():
    cases = []
    for variant in VARIANTS:
        for conversation in ("one-image", "images-in-two-turns", "image-then-text", "text-only"):
            for add_bos_token in (True, False):
                if variant[1] != "legacy-false" and conversation not in ("images-in-two-turns", "text-only"):
                    continue
                bos = "webui-bos-on" if add_bos_token else "webui-bos-off"
                cases.append(pytest.param(variant, conversation, add_bos_token,
                                          id=f"{_variant_name(variant)}-{conversation}-{bos}"))
    return cases


@pytest.mark.parametrize("variant, conversation, add_bos_token", _cases())
def test_instruct_chat_reaches_the_model_as_the_reference(ids_server, variant, conversation, add_bos_token):
    import original_llava
    import reference_support

    fmt, _, template, conversation_format = variant
    name = _variant_name(variant)
    folder = ids_server.models_dir / name
    ids_server.load(name)
    turns = _conversations()[conversation]
    system = "Answer briefly." if conversation == "image-then-text" else None
    record = ids_server.chat(turns, system=system, add_bos_token=add_bos_token)
    if fmt == "hf":
        expected = reference_support.processor_ids(folder, turns, reference_support.HF_TEMPLATES[template][2],
                                                   system=system)
    else:
        conversation_name = conversation_format or ("llava_v0" if fmt == "v0" else "llava_v1")
        prompt = original_llava.prompt_for(conversation_name, [(t, len(i), r) for t, i, r in turns], system=system)
        assert _marked(record["prompt"]) == prompt
        expected = reference_support.original_ids(_tokenizer(folder), fmt, prompt, _rows(folder, turns))
    assert _ours(record) == expected


# The templates webui's instruction-template menu ships (user_data/instruction-templates at 1dcde41d). They
# concatenate and rstrip message['content'], so they need it as a string.
MENU_TEMPLATES = ["Alpaca", "ChatML", "Llama-v3", "Mistral", "Open Assistant", "Vicuna-v1.1"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[3] is None and v[1] == "legacy-false"],
                         ids=_variant_name)
@pytest.mark.parametrize("mode", ["chat", "chat-instruct"] + MENU_TEMPLATES)
def test_chat_mode_and_the_menu_templates(ids_server, variant, mode):
    """Chat and chat-instruct modes (webui's "You:" / "AI:" prompt, bare or inside the checkpoint's template)
    and every template of webui's menu: the prompt webui built holds each user message with its images
    placed, and is tokenized as the checkpoint's reference tokenizes a prompt, every image spliced where its
    slot is."""
    import reference_support

    fmt = variant[0]
    name = _variant_name(variant)
    folder = ids_server.models_dir / name
    ids_server.load(name)
    turns = _conversations()["images-in-two-turns"]
    body = {"mode": mode} if mode.startswith("chat") else {"instruction_template": mode}
    record = ids_server.chat(turns, add_bos_token=True, **body)
    prompt = _marked(record["prompt"])
    placed = (("Compare these.\n<image>\n<image>", "And this one?\n<image>") if fmt == "v0"
              else ("<image>\n<image>\nCompare these.", "<image>\nAnd this one?"))
    assert all(text in prompt for text in placed), prompt
    if mode == "Vicuna-v1.1":
        assert prompt.startswith("A chat between a curious user and an artificial intelligence assistant.")
        assert f"USER: {placed[0]}\nASSISTANT: It is red.</s>\nUSER: {placed[1]}\nASSISTANT:" in prompt
    pictures = [picture for _, images, _ in turns for picture in images]
    if fmt == "hf":
        expected = reference_support.processor_prompt_ids(folder, prompt, pictures)
    else:
        expected = reference_support.original_ids(_tokenizer(folder), fmt, prompt, _rows(folder, turns))
    assert _ours(record) == expected
    assert len(record["image_rows"]) == sum(_rows(folder, turns))
