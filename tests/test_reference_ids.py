"""Token for token through webui: what reaches ``model.generate`` equals the reference's input for the same
conversation, under the tokenizer configs and chat-template shapes real checkpoints ship.

References and checkpoint variants: tests/reference_support.py (the checkpoint's processor for llava-hf;
original LLaVA's get_prompt + tokenizer_image_token for the original formats). Compared: every id outside
the image rows, and the place and length of every image span (rows whose embedding is not their id's
plain embedding). Variations: ``legacy`` true / false, ``add_bos_token`` false (with and without a
BOS-adding post-processor in tokenizer.json), webui's "Add the bos_token" on and off, instruct and chat
modes and the API, one and several turns, images in several turns with "embed all" on, templates
picked in webui's menu (in the shapes webui ships: "+"-joined, rstripped), and chat templates of both
content shapes.
"""

from __future__ import annotations

import pytest
import torch

import original_llava
from reference_support import (FORMAT_FOLDERS, HF_TEMPLATES, STRING_TEMPLATE, TOKENIZER_CONFIGS, make_variant,
                               original_ids, processor_ids, processor_prompt_ids)
from webui_harness import WebuiHarness, image_part, text_part
from webui_llava_support import Loaded, harness_for, image, last_prompt, marked  # noqa: F401 - fixture

FIRST, SECOND, THIRD = image(70, 45, seed=1), image(45, 70, seed=2), image(60, 60, seed=3)
REPLY = "It is red."


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
            cache[key] = Loaded(make_variant(getattr(tiny_checkpoints, fmt), models_dir / name, tokenizer_config,
                                             template))
        return cache[key]

    return get


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


def _cases(*, templates=(None,)):
    """(template, tokenizer config, webui add_bos_token, entry point, conversation) combinations: every
    conversation under the fixture's tokenizer; under the other tokenizer configs (they differ at the BOS and
    at word starts after special tokens) the multi-turn image chat and the text-only chat, which show both.
    Template sources other than the two content shapes' main ones: one tokenizer config and webui setting."""
    cases = []
    for template in templates:
        for tokenizer_config in sorted(TOKENIZER_CONFIGS):
            for add_bos_token in (True, False):
                if template not in (None, "fixture", "string") and (tokenizer_config != "legacy-false" or add_bos_token):
                    continue
                for via in ("ui", "api"):
                    for conversation in sorted(CONVERSATIONS):
                        if tokenizer_config != "legacy-false" and conversation not in ("images-in-two-turns", "text-only"):
                            continue
                        bos = "webui-bos-on" if add_bos_token else "webui-bos-off"
                        cases.append(pytest.param(template, tokenizer_config, add_bos_token, via, conversation,
                                                  id="-".join(filter(None, (template, tokenizer_config, bos, via,
                                                                            conversation)))))
    return cases


@pytest.mark.parametrize("fmt", ["v15", "v0"])
@pytest.mark.parametrize("template, tokenizer_config, add_bos_token, via, conversation", _cases())
def test_original_formats_reach_the_model_as_the_original_conversation(
        fmt, template, tokenizer_config, add_bos_token, via, conversation, variants, harness_for):
    entry = variants(fmt, tokenizer_config)
    turns = CONVERSATIONS[conversation]
    system = "Answer briefly." if conversation == "image-then-text" else None
    harness = _run(harness_for, entry, turns, via=via, add_bos_token=add_bos_token, system=system)
    name = "llava_v0" if fmt == "v0" else "llava_v1"
    prompt = original_llava.prompt_for(name, [(text, len(images), reply) for text, images, reply in turns],
                                       system=system)
    assert marked(last_prompt(harness)) == prompt
    assert _ours(harness, entry) == original_ids(entry.tokenizer, fmt, prompt, _image_rows(entry, turns))


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
    assert _ours(harness, entry) == original_ids(entry.tokenizer, "v15", prompt, _image_rows(entry, turns))


@pytest.mark.parametrize("template, tokenizer_config, add_bos_token, via, conversation",
                         _cases(templates=sorted(HF_TEMPLATES)))
def test_llava_hf_reaches_the_model_as_its_processor_feeds_it(
        template, tokenizer_config, add_bos_token, via, conversation, variants, harness_for):
    entry = variants("hf", tokenizer_config, template)
    turns = CONVERSATIONS[conversation]
    system = "Answer briefly." if conversation == "image-then-text" else None
    harness = _run(harness_for, entry, turns, via=via, add_bos_token=add_bos_token, system=system)
    shape = HF_TEMPLATES[template][2]
    assert _ours(harness, entry) == processor_ids(entry.folder, turns, shape, system=system)


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
        expected = processor_prompt_ids(entry.folder, prompt, pictures)
    else:
        expected = original_ids(entry.tokenizer, fmt, prompt, _image_rows(entry, turns))
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
        expected = original_ids(entry.tokenizer, fmt, prompt[len("<s>"):], _image_rows(entry, CONVERSATIONS["one-image"]))
    else:
        expected = processor_prompt_ids(entry.folder, prompt, [FIRST])
    assert ours == expected


# Templates in the shapes of those webui's menu ships (written here, not copied): content joined with "+" and
# cut with .rstrip(), a string method a list of parts lacks; an empty generation prompt.
MENU_SHAPED_TEMPLATES = {
    "inst-rstrip": ("{%- for message in messages %}{%- if message['role'] == 'user' -%}"
                    "{{- '[INST] ' + message['content'].rstrip() + ' [/INST]' -}}"
                    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + '</s>' -}}{%- endif -%}"
                    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '' -}}{%- endif -%}"),
    "headers-rstrip": ("{%- for message in messages -%}"
                       "{{- '<|head|>' + message['role'] + '<|/head|>\n\n' + message['content'].rstrip() + '<|eot|>' -}}"
                       "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|head|>assistant<|/head|>\n\n' -}}{%- endif -%}"),
    "plus-joined": ("{%- for message in messages %}{%- if message['role'] == 'user' -%}"
                    "{{- '### Instruction:\n' + message['content'] + '\n\n' -}}{%- else -%}"
                    "{{- '### Response:\n' + message['content'] + '\n\n' -}}{%- endif -%}{%- endfor -%}"
                    "{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"),
}


@pytest.mark.parametrize("template", sorted(MENU_SHAPED_TEMPLATES))
@pytest.mark.parametrize("fmt", ["v15", "v0", "hf"])
def test_menu_shaped_templates_keep_every_image(fmt, template, variants, harness_for):
    """A template picked in webui's menu that concatenates or rstrips the content renders each user message
    with its images placed, and the prompt is tokenized as the reference tokenizes it, every image spliced."""
    from modules import shared

    entry = variants(fmt, "legacy-false")
    harness = harness_for(entry, _settings(True))
    shared.settings["instruction_template_str"] = MENU_SHAPED_TEMPLATES[template]
    turns = CONVERSATIONS["images-in-two-turns"]
    _drive_ui(harness, turns)
    prompt = marked(last_prompt(harness))
    placed = (("Compare these.\n<image>\n<image>", "And this one?\n<image>") if fmt == "v0"
              else ("<image>\n<image>\nCompare these.", "<image>\nAnd this one?"))
    assert all(text in prompt for text in placed), prompt
    pictures = [picture for _, images, _ in turns for picture in images]
    if fmt == "hf":
        expected = processor_prompt_ids(entry.folder, prompt, pictures)
    else:
        expected = original_ids(entry.tokenizer, fmt, prompt, _image_rows(entry, turns))
    ours = _ours(harness, entry)
    assert ours == expected
    assert ours.count(None) == sum(_image_rows(entry, turns))


def test_legacy_false_first_word_keeps_its_word_start(variants, harness_for):
    """The defect this module pins: "<s>" written as text before "A chat between..." made the first word
    lose its "▁" under legacy: false ([1, 291, ...] instead of the original's [1, 377, ...])."""
    entry = variants("v15", "legacy-false")
    harness = harness_for(entry, _settings(True))
    harness.send("What is in this picture?", [FIRST])
    assert _ours(harness, entry)[:3] == entry.tokenizer("A chat").input_ids

