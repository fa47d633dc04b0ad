"""Token for token through webui: what reaches ``model.generate`` equals the reference's input for the same
conversation, under the tokenizer configs and chat-template shapes real checkpoints ship.

References, computed here without the extension's code:

* llava-hf: the checkpoint's processor, as ``processor.apply_chat_template(..., tokenize=True)`` does it
  (render, then the processor's tokenization, special tokens off when the rendered text starts with the
  BOS text), images as image parts for a template that iterates parts and as ``"<image>\\n" + text`` for
  one that prints the content as a string;
* original formats: ``Conversation.get_prompt`` + ``tokenizer_image_token`` (tests/original_llava.py), each
  ``-200`` standing for the image's feature rows; v0: its prompt with ``<im_start>`` + ``<im_patch>`` * N +
  ``<im_end>`` tokenized whole.

Compared: every id outside the image rows, and the place and length of every image span (rows whose
embedding is not their id's plain embedding). Variations: ``legacy`` true / false, ``add_bos_token`` false
(with and without a BOS-adding post-processor in tokenizer.json), webui's "Add the bos_token" on and off,
instruct and chat modes and the API, one and several turns, images in several turns with "embed all" on,
and chat templates of both content shapes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import original_llava
from test_chat_logic import HUB_STYLE_TEMPLATE, STRING_TEMPLATE
from tiny_llava import LLAVA_15_HF_CHAT_TEMPLATE
from webui_harness import WebuiHarness, image_part, text_part
from webui_llava_support import EXTENSION_DIR, Loaded, image, last_prompt, marked


TOKENIZER_CONFIGS = {
    "legacy-false": {"legacy": False},
    "legacy-true": {"legacy": True},
    # Only the flag: transformers 5.6 keeps the BOS of tokenizer.json's post-processor (so does the reference).
    "add-bos-false-flag": {"add_bos_token": False},
    # The flag and no post-processor: the tokenizer adds no BOS at all.
    "add-bos-false": {"add_bos_token": False, "_no_post_processor": True},
}
# How a llava-hf checkpoint carries its template, and which content shape it renders.
HF_TEMPLATES = {
    "fixture": ("chat_template.jinja", LLAVA_15_HF_CHAT_TEMPLATE, "parts"),
    "hub-parts": ("chat_template.json", HUB_STYLE_TEMPLATE, "parts"),
    "string": ("chat_template.jinja", STRING_TEMPLATE, "string"),
    "tokenizer-config-string": ("tokenizer_config.json", STRING_TEMPLATE, "string"),
}
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

FIRST, SECOND, THIRD = image(70, 45, seed=1), image(45, 70, seed=2), image(60, 60, seed=3)
REPLY = "It is red."


def _variant(source: Path, target: Path, tokenizer_changes: dict, template: tuple | None = None) -> Path:
    """A copy of a checkpoint folder (weights linked) with another tokenizer config / chat template."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            (target / path.name).symlink_to(path.resolve())
        elif path.is_file():
            shutil.copy(path, target / path.name)
    config = json.loads((target / "tokenizer_config.json").read_text())
    changes = dict(tokenizer_changes)
    if changes.pop("_no_post_processor", False):
        tokenizer_json = json.loads((target / "tokenizer.json").read_text())
        tokenizer_json["post_processor"] = None
        (target / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config.update(changes)
    if template is not None:
        file_name, text, _ = template
        for name in TEMPLATE_FILES:
            (target / name).unlink(missing_ok=True)
        config.pop("chat_template", None)
        if file_name == "chat_template.jinja":
            (target / file_name).write_text(text)
        elif file_name == "chat_template.json":
            (target / file_name).write_text(json.dumps({"chat_template": text}))
        else:
            config["chat_template"] = text
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def variants(tiny_checkpoints, tmp_path_factory):
    """``variants(fmt, tokenizer_config, template=None)`` -> a loaded checkpoint variant (all in one models dir)."""
    models_dir = tmp_path_factory.mktemp("variant_models")
    cache = {}

    def get(fmt: str, tokenizer_config: str, template: str | None = None, folder_name: str | None = None) -> Loaded:
        key = (fmt, tokenizer_config, template, folder_name)
        if key not in cache:
            # Original checkpoints' conversation format follows the folder name, as in LLaVA's run_llava.py.
            name = "-".join(filter(None, (folder_name or fmt, tokenizer_config, template)))
            folder = _variant(getattr(tiny_checkpoints, fmt), models_dir / name, TOKENIZER_CONFIGS[tokenizer_config],
                              HF_TEMPLATES[template] if template else None)
            cache[key] = Loaded(folder)
        return cache[key]

    return get


@pytest.fixture
def harness_for():
    made = []

    def make(entry: Loaded, settings: dict) -> WebuiHarness:
        for harness in made:
            harness.close()
        harness = WebuiHarness(EXTENSION_DIR, entry.model, entry.tokenizer, settings,
                               args={"model_dir": str(entry.folder.parent), "cpu": True}, model_name=entry.name)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


# ---------------------------------------------------------------------------------------------- references


def _processor_ids(entry: Loaded, turns, shape: str, chat_template: str | None, system: str | None) -> list[int]:
    """llava-hf: what ``processor.apply_chat_template(messages, tokenize=True)`` feeds the model."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(entry.folder))
    messages, pictures = [], []
    if system is not None:
        messages.append({"role": "system", "content": system if shape == "string" else [{"type": "text", "text": system}]})
    for text, images, reply in turns:
        pictures += images
        if shape == "string":
            content = "".join("<image>\n" for _ in images) + text
        else:
            content = [{"type": "image"} for _ in images] + ([{"type": "text", "text": text}] if text else [])
        messages.append({"role": "user", "content": content})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply if shape == "string" else [{"type": "text", "text": reply}]})
    rendered = processor.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                             tokenize=False)
    # processing_utils.ProcessorMixin.apply_chat_template(tokenize=True): no special tokens when the
    # rendered text already starts with the BOS text.
    add_special_tokens = not (processor.tokenizer.bos_token and rendered.startswith(processor.tokenizer.bos_token))
    out = processor(text=rendered, images=pictures or None, add_special_tokens=add_special_tokens)
    return list(out["input_ids"][0])


def _masked_hf(ids: list[int], image_token_id: int) -> list:
    return [None if token == image_token_id else token for token in ids]


def _original_ids(entry: Loaded, fmt: str, prompt: str, image_rows: list[int]) -> list:
    """Original formats: ids with every image row as None (the features' place), from the prompt string."""
    tokenizer = entry.tokenizer
    if fmt == "v0":
        expanded = prompt
        for rows in image_rows:
            expanded = expanded.replace("<image>", "<im_start>" + "<im_patch>" * rows + "<im_end>", 1)
        ids = tokenizer(expanded).input_ids
        patch = tokenizer.convert_tokens_to_ids("<im_patch>")
        return [None if token == patch else token for token in ids]
    ids = original_llava.tokenizer_image_token(prompt, tokenizer)
    return original_llava.expand_images(ids, image_rows, None)


def _ours(harness: WebuiHarness, entry: Loaded) -> list:
    """The ids that reached generate, image rows (embedding != the id's own embedding) as None."""
    call = harness.generate_calls[-1]
    ids = call.input_ids[0].tolist()
    if call.inputs_embeds is None:
        return ids
    assert call.input_ids.shape[1] == call.inputs_embeds.shape[1]
    with torch.no_grad():
        plain = entry.embed(call.input_ids)[0]
    differs = (call.inputs_embeds[0] != plain).any(dim=-1).tolist()
    return [None if row_differs else token for token, row_differs in zip(ids, differs)]


# ---------------------------------------------------------------------------------------------- driving webui

# (text, images, reply) turns; the last reply is None (the turn being generated).
CONVERSATIONS = {
    "one-image": [("What is in this picture?", [FIRST], None)],
    "images-in-two-turns": [("Compare these.", [FIRST, SECOND], REPLY), ("And this one?", [THIRD], None)],
    "image-then-text": [("What is in this picture?", [FIRST], REPLY), ("Why?", [], None)],
    "text-only": [("Hello there.", [], REPLY), ("Tell me more.", [], None)],
}


def _drive_ui(harness: WebuiHarness, turns) -> None:
    for number, (text, images, reply) in enumerate(turns):
        harness.send(text, images)
        if reply is not None:  # a random model's reply may be empty, which webui leaves out of the prompt
            harness.history["internal"][number][1] = harness.history["visible"][number][1] = reply


def _drive_api(harness: WebuiHarness, turns, system: str | None) -> None:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for text, images, reply in turns:
        content = [image_part(picture) for picture in images] + [text_part(text)]
        messages.append({"role": "user", "content": content if images else text})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    harness.api_chat(messages)


def _settings(add_bos_token: bool, mode: str = "instruct", system: str | None = None) -> dict:
    settings = {"mode": mode, "add_bos_token": add_bos_token, "llava-add_all_images_to_prompt": True,
                "max_new_tokens": 4}
    if system is not None:
        settings["custom_system_message"] = system
    return settings


def _run(harness_for, entry, turns, *, via: str, add_bos_token: bool, system: str | None = None):
    harness = harness_for(entry, _settings(add_bos_token, system=None if via == "api" else system))
    if via == "api":
        _drive_api(harness, turns, system)
    else:
        _drive_ui(harness, turns)
    return harness


def _image_rows(entry: Loaded, turns) -> list[int]:
    return [entry.pipeline.prompt_positions(picture.size) - (2 if entry.pipeline.spec.format == "v0" else 0)
            for _, images, _ in turns for picture in images]


# ---------------------------------------------------------------------------------------------- tests


def _skip_redundant(tokenizer_config: str, conversation: str) -> None:
    """Every conversation under the fixture's tokenizer; the other tokenizer configs differ at the BOS and
    at word starts after special tokens, which the multi-turn image and the text-only chats both show."""
    if tokenizer_config != "legacy-false" and conversation not in ("images-in-two-turns", "text-only"):
        pytest.skip("covered by the images-in-two-turns and text-only conversations")


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("via", ["ui", "api"])
@pytest.mark.parametrize("add_bos_token", [True, False], ids=["webui-bos-on", "webui-bos-off"])
@pytest.mark.parametrize("tokenizer_config", sorted(TOKENIZER_CONFIGS))
@pytest.mark.parametrize("fmt", ["v15", "v0"])
def test_original_formats_reach_the_model_as_the_original_conversation(
        fmt, tokenizer_config, add_bos_token, via, conversation, variants, harness_for):
    _skip_redundant(tokenizer_config, conversation)
    entry = variants(fmt, tokenizer_config)
    turns = CONVERSATIONS[conversation]
    system = "Answer briefly." if conversation == "image-then-text" else None
    harness = _run(harness_for, entry, turns, via=via, add_bos_token=add_bos_token, system=system)
    name = "llava_v0" if fmt == "v0" else "llava_v1"
    prompt = original_llava.prompt_for(name, [(text, len(images), reply) for text, images, reply in turns],
                                       system=system)
    assert marked(last_prompt(harness)) == prompt
    assert _ours(harness, entry) == _original_ids(entry, fmt, prompt, _image_rows(entry, turns))


# Folder names that select the other conversation formats of original checkpoints.
FORMAT_FOLDERS = {"llava_llama_2": "llava-llama-2-13b-chat-tiny", "mistral_instruct": "llava-v1.6-mistral-7b-tiny",
                  "chatml_direct": "llava-v1.6-34b-tiny"}


@pytest.mark.parametrize("conversation", ["images-in-two-turns", "text-only", "image-then-text"])
@pytest.mark.parametrize("via", ["ui", "api"])
@pytest.mark.parametrize("tokenizer_config", ["legacy-false", "legacy-true"])
@pytest.mark.parametrize("name", sorted(FORMAT_FOLDERS))
def test_other_original_conversation_formats(name, tokenizer_config, via, conversation, variants, harness_for):
    entry = variants("v15", tokenizer_config, folder_name=FORMAT_FOLDERS[name])
    assert entry.pipeline.spec.template == name
    turns = CONVERSATIONS[conversation]
    system = "Answer briefly." if conversation == "image-then-text" else None
    harness = _run(harness_for, entry, turns, via=via, add_bos_token=True, system=system)
    prompt = original_llava.prompt_for(name, [(text, len(images), reply) for text, images, reply in turns],
                                       system=system)
    assert marked(last_prompt(harness)) == prompt
    assert _ours(harness, entry) == _original_ids(entry, "v15", prompt, _image_rows(entry, turns))


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("via", ["ui", "api"])
@pytest.mark.parametrize("add_bos_token", [True, False], ids=["webui-bos-on", "webui-bos-off"])
@pytest.mark.parametrize("tokenizer_config", sorted(TOKENIZER_CONFIGS))
@pytest.mark.parametrize("template", sorted(HF_TEMPLATES))
def test_llava_hf_reaches_the_model_as_its_processor_feeds_it(
        template, tokenizer_config, add_bos_token, via, conversation, variants, harness_for):
    if template not in ("fixture", "string") and (tokenizer_config != "legacy-false" or add_bos_token):
        pytest.skip("the other template sources are covered with one tokenizer config and webui setting")
    _skip_redundant(tokenizer_config, conversation)
    entry = variants("hf", tokenizer_config, template)
    turns = CONVERSATIONS[conversation]
    system = "Answer briefly." if conversation == "image-then-text" else None
    harness = _run(harness_for, entry, turns, via=via, add_bos_token=add_bos_token, system=system)
    _, template_text, shape = HF_TEMPLATES[template]
    chat_template = template_text if HF_TEMPLATES[template][0] == "tokenizer_config.json" else None
    expected = _processor_ids(entry, turns, shape, chat_template, system)
    assert _ours(harness, entry) == _masked_hf(expected, entry.pipeline.spec.image_token_id)


@pytest.mark.parametrize("conversation", ["images-in-two-turns", "text-only"])
@pytest.mark.parametrize("tokenizer_config", sorted(TOKENIZER_CONFIGS))
@pytest.mark.parametrize("add_bos_token", [True, False], ids=["webui-bos-on", "webui-bos-off"])
@pytest.mark.parametrize("fmt", ["hf", "v15"])
def test_chat_mode_tokenizes_webuis_prompt_as_the_reference_would(fmt, tokenizer_config, add_bos_token, conversation,
                                                                   variants, harness_for):
    """Chat mode has no reference conversation format (it is webui's "You:" / "AI:"); the prompt webui built,
    images where the extension placed them, is tokenized as the checkpoint's reference tokenizes a prompt.
    (Chat mode keeps webui's "Add the bos_token", which instruct mode turns off: a tokenizer that adds no
    BOS of its own shows whether webui's BOS leaks into a LLaVA prompt.)"""
    entry = variants(fmt, tokenizer_config)
    harness = harness_for(entry, _settings(add_bos_token, mode="chat"))
    turns = CONVERSATIONS[conversation]
    _drive_ui(harness, turns)
    prompt = marked(last_prompt(harness))
    pictures = [picture for _, images, _ in turns for picture in images]
    if fmt == "hf":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(entry.folder))
        bos = processor.tokenizer.bos_token
        ids = processor(text=prompt, images=pictures or None, add_special_tokens=not prompt.startswith(bos))["input_ids"][0]
        expected = _masked_hf(list(ids), entry.pipeline.spec.image_token_id)
    else:
        expected = _original_ids(entry, fmt, prompt, _image_rows(entry, turns))
    assert _ours(harness, entry) == expected


@pytest.mark.parametrize("fmt", ["v15", "hf"])
def test_a_menu_template_that_writes_the_bos_text(fmt, variants, harness_for):
    """An instruction template the user picks in webui's menu (here one writing {{ bos_token }} like webui's
    Vicuna template): one BOS; for an original checkpoint the first word tokenizes as the start of the
    prompt, as in the original (``legacy: false`` would otherwise drop its "▁")."""
    from modules import shared

    entry = variants(fmt, "legacy-false")
    harness = harness_for(entry, _settings(True))
    shared.settings["instruction_template_str"] = STRING_TEMPLATE  # picked in the menu after loading
    harness.send("What is in this picture?", [FIRST])
    prompt = marked(last_prompt(harness))
    assert prompt.startswith("<s>USER: <image>\nWhat is in this picture?")
    ours = _ours(harness, entry)
    bos = entry.tokenizer.bos_token_id
    assert ours[0] == bos and ours[1] != bos
    if fmt == "v15":
        expected = _original_ids(entry, fmt, prompt[len("<s>"):], _image_rows(entry, CONVERSATIONS["one-image"]))
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(entry.folder))
        expected = _masked_hf(list(processor(text=prompt, images=[FIRST], add_special_tokens=False)["input_ids"][0]),
                              entry.pipeline.spec.image_token_id)
    assert ours == expected


def test_legacy_false_first_word_keeps_its_word_start(variants, harness_for):
    """The defect this module pins: "<s>" written as text before "A chat between..." made the first word
    lose its "▁" under legacy: false ([1, 291, ...] instead of the original's [1, 377, ...])."""
    entry = variants("v15", "legacy-false")
    harness = harness_for(entry, _settings(True))
    harness.send("What is in this picture?", [FIRST])
    assert _ours(harness, entry)[:3] == entry.tokenizer("A chat").input_ids

