"""Pure tests of llava_chat (slots, placement, webui markers) and llava_templates (webui instruction templates).

No model, no webui: strings in, strings out. Templates are rendered in a Jinja environment configured like
webui's (chat.py: ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols) and compared with
the reference conversation renderer (llava_prompt.render_conversation) where the formats correspond.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

import llava_chat
import llava_templates
from llava_chat import MEDIA_MARKER, SLOT_CLOSE, SLOT_OPEN
from llava_prompt import LLAVA_SYSTEM, TEMPLATES, ImageRef, render_conversation
from tiny_llava import LLAVA_15_HF_CHAT_TEMPLATE

S0 = f"{SLOT_OPEN}0:70x45{SLOT_CLOSE}"
S1 = f"{SLOT_OPEN}1:40x60{SLOT_CLOSE}"


# ---------------------------------------------------------------------------------------------- slots


def test_slot_format_and_detection():
    assert llava_chat.slot(0, (70, 45)) == S0
    assert llava_chat.slot(12, (1, 2)) == "\ue00012:1x2\ue001"
    assert llava_chat.has_slots(f"a {S0} b") and not llava_chat.has_slots("a <image> b <__media__>")


def test_neutralize_removes_only_the_slot_characters():
    typed = f"x {S0} <image> <__media__> \ue000\ue001 </s> é"
    assert llava_chat.neutralize(typed) == "x 0:70x45 <image> <__media__>  </s> é"
    assert not llava_chat.has_slots(llava_chat.neutralize(typed))


@pytest.mark.parametrize("text, images, placement, expected", [
    ("What?", 1, "before", f"{S0}\nWhat?"),
    ("What?", 1, "after", f"What?\n{S0}"),
    ("What?", 2, "before", f"{S0}{S1}\nWhat?"),
    ("", 1, "before", S0),
    ("  ", 1, "after", S0),
    ("Left <image> right <image>.", 2, "before", f"Left {S0} right {S1}."),
    ("Only <image> here", 2, "after", f"Only {S0} here\n{S1}"),  # leftovers go where the family expects
    ("a <image> b <image> c <image>", 2, "before", f"a {S0} b {S1} c <image>"),  # extra markers stay text
    # Fewer markers than images: the images still appear in the order sent.
    ("Only <image> here", 2, "before", f"{S0}\nOnly {S1} here"),
])
def test_place_slots(text, images, placement, expected):
    assert llava_chat.place_slots(text, [S0, S1][:images], placement) == expected


@pytest.mark.parametrize("placement", ["before", "after"])
def test_an_image_without_a_slot_keeps_its_marker_from_the_others(placement):
    """"" stands for an image that takes no positions: its typed <image> disappears, the others stay put."""
    assert llava_chat.place_slots("Left <image> right <image>.", ["", S1], placement) == f"Left  right {S1}."
    assert llava_chat.place_slots("No markers.", ["", ""], placement) == "No markers."


def test_place_slots_without_images_leaves_text_alone():
    assert llava_chat.place_slots("a <image> b", [], "before") == "a <image> b"


def test_place_slots_uses_the_checkpoint_marker():
    assert llava_chat.place_slots("x <im> y <image>", [S0], "after", marker="<im>") == f"x {S0} y <image>"


def test_place_slots_rejects_unknown_placement():
    with pytest.raises(ValueError, match="before' or 'after"):
        llava_chat.place_slots("x", [S0], "auto")


def test_parse_slots_splits_text_and_images_in_order():
    parsed = llava_chat.parse_slots(f"USER: {S1}\nWhat? {S0} ASSISTANT:")
    assert parsed.parts == ["USER: ", ImageRef(0), "\nWhat? ", ImageRef(1), " ASSISTANT:"]
    assert parsed.image_indices == [1, 0]
    assert parsed.sizes == [(40, 60), (70, 45)]


@pytest.mark.parametrize("cut", range(1, len(S0)))
def test_a_cut_slot_is_dropped_without_residue(cut):
    """webui's bisect keeps a prefix of the message; the template's text follows the cut slot."""
    prompt = f"USER: text {S0[:cut]} ASSISTANT:"
    parsed = llava_chat.parse_slots(prompt)
    assert parsed.parts == ["USER: text  ASSISTANT:"]
    assert parsed.image_indices == []
    assert llava_chat.strip_slots(prompt) == "USER: text  ASSISTANT:"


def test_a_cut_slot_next_to_a_complete_one():
    parsed = llava_chat.parse_slots(f"{S1} and {S0[:4]}")
    assert parsed.parts == [ImageRef(0), " and "]
    assert parsed.image_indices == [1]


def test_stray_slot_characters_never_make_an_image():
    for prompt in ("\ue001 text", "text \ue000", "\ue0000:1x1", "0:1x1\ue001 rest", "\ue000x\ue001"):
        parsed = llava_chat.parse_slots(prompt)
        assert parsed.image_indices == []
        assert all(isinstance(part, str) and not llava_chat.has_slots(part) for part in parsed.parts)


def test_strip_slots():
    assert llava_chat.strip_slots(f"a {S0} b {S1[:3]}") == "a  b "


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=4), placement=st.sampled_from(["before", "after"]),
       sizes=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), max_size=3))
def test_placed_slots_round_trip_and_typed_text_never_adds_one(texts, placement, sizes):
    """Whatever a user types, after neutralize + place_slots the prompt holds exactly the slots placed."""
    slots = [llava_chat.slot(i, size) for i, size in enumerate(sizes)]
    messages = [llava_chat.neutralize(text) for text in texts]
    prompt = " | ".join(messages[:-1] + [llava_chat.place_slots(messages[-1], slots, placement)])
    parsed = llava_chat.parse_slots(prompt)
    assert parsed.image_indices == list(range(len(sizes)))
    assert parsed.sizes == sizes
    text = "".join(part for part in parsed.parts if isinstance(part, str))
    assert not llava_chat.has_slots(text)


# ---------------------------------------------------------------------------------------------- webui markers


def test_strip_media_run():
    assert llava_chat.strip_media_run(f"{MEDIA_MARKER}{MEDIA_MARKER}\n\nhi", 2) == "hi"
    assert llava_chat.strip_media_run(f"{MEDIA_MARKER}\n\n", 1) == ""
    assert llava_chat.strip_media_run(f"{MEDIA_MARKER}\n\nhi", 2) is None
    assert llava_chat.strip_media_run("hi", 0) is None


@pytest.mark.parametrize("content", [
    "plain text",
    [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:x"}}, {"type": "text", "text": "b"}],
    [{"type": "image_url", "image_url": {"url": "data:x"}}],
    [{"type": "image_url", "image_url": {"url": "u1"}}, {"type": "image_url", "image_url": {"url": "u2"}}],
    [],
    42,
])
def test_api_processed_text_matches_webui(content):
    """The extension predicts what webui's API makes of a message; compare with the stand-in's function."""
    from webui_harness import api  # noqa: F401 - puts the stand-in on sys.path
    from modules.api.completions import process_multimodal_content

    assert llava_chat.api_processed_text(content) == process_multimodal_content(content)


def test_api_image_urls_in_order():
    content = [{"type": "image_url", "image_url": {"url": "u1"}}, {"type": "text", "text": "t"},
               {"type": "image_url", "image_url": "u2"}, "junk"]
    assert llava_chat.api_image_urls(content) == ["u1", "u2"]
    assert llava_chat.api_image_urls("text") == []


def test_find_marked_rows_searches_newest_first_and_ignores_typed_markers():
    rows = [("first", 1), ("no images", 0), ("second", 2)]
    typed = f"USER: {MEDIA_MARKER}\n\nfirst"  # a text-only message typing what row 0 looks like
    prompt = (f"{typed} A: x USER: {MEDIA_MARKER}\n\nfirst A: y USER: no images "
              f"USER: {MEDIA_MARKER}{MEDIA_MARKER}\n\nsecond A:")
    found = llava_chat.find_marked_rows(prompt, rows)
    assert [number for number, _, _ in found] == [0, 2]
    (_, start0, end0), (_, start2, end2) = found
    assert prompt[start0:end0] == MEDIA_MARKER and prompt[end0:end0 + 7] == "\n\nfirst"
    assert start0 > len(typed)  # the later occurrence, not the typed one earlier in the prompt
    assert prompt[start2:end2] == MEDIA_MARKER * 2


def test_find_marked_rows_skips_rows_truncated_away_or_sliced():
    rows = [("old", 1), ("new", 1)]
    assert llava_chat.find_marked_rows(f"A: ... USER: {MEDIA_MARKER}\n\nnew", rows)[0][0] == 1
    assert llava_chat.find_marked_rows(f"USER: {MEDIA_MARKER[:-1]}\n\nnew", rows) == []


def test_replace_spans():
    assert llava_chat.replace_spans("abcdef", [(4, 5, "E"), (0, 2, "AB-")]) == "AB-cdEf"


# ---------------------------------------------------------------------------------------------- templates


@pytest.fixture(scope="module")
def webui_jinja():
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def render(template, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"):
        return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        bos_token=bos_token, eos_token=eos_token)

    render.environment = environment
    return render


CHAT = [
    {"role": "user", "content": "<image>\nWhat is this?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "And its colour?"},
]


def _reference(name, system=None):
    template = TEMPLATES[name]
    if system is not None:
        template = dataclasses.replace(template, system=system)
    roles = template.roles
    turns = [(roles[0], CHAT[0]["content"]), (roles[1], CHAT[1]["content"]), (roles[0], CHAT[2]["content"]),
             (roles[1], None)]
    return render_conversation(template, turns)


def test_llava_v1_template(webui_jinja):
    rendered = webui_jinja(llava_templates.LLAVA_V1, CHAT)
    assert rendered == (f"<s>{LLAVA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                        "USER: And its colour? ASSISTANT:")
    assert rendered == "<s>" + _reference("llava_v1")
    with_system = webui_jinja(llava_templates.LLAVA_V1, [{"role": "system", "content": "Be brief."}, *CHAT])
    assert with_system == "<s>" + _reference("llava_v1", system="Be brief.")


def test_llava_v0_template_is_webuis_llava_format(webui_jinja):
    system = ("You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab. You are able "
              "to understand the visual content that the user provides, and assist the user with a variety of tasks "
              "using natural language. Follow the instructions carefully and explain your answers in detail.")
    assert webui_jinja(llava_templates.LLAVA_V0, CHAT) == (
        f"<s>{system}\n### Human: <image>\nWhat is this?\n### Assistant: A cat.\n### Human: And its colour?\n"
        "### Assistant:")
    assert webui_jinja(llava_templates.LLAVA_V0, [{"role": "system", "content": "S"}, *CHAT[:1]]) == (
        "<s>S\n### Human: <image>\nWhat is this?\n### Assistant:")


def test_mistral_instruct_template(webui_jinja):
    rendered = webui_jinja(llava_templates.MISTRAL_INSTRUCT, CHAT)
    assert rendered == "<s>[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] And its colour? [/INST]"
    assert rendered == "<s>" + _reference("mistral_instruct")


def test_chatml_direct_template(webui_jinja):
    rendered = webui_jinja(llava_templates.CHATML_DIRECT, CHAT)
    assert rendered == ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?"
                        "<|im_end|><|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nAnd its colour?<|im_end|>"
                        "<|im_start|>assistant\n")
    assert rendered == _reference("chatml_direct")


def test_every_named_template_is_a_webui_template():
    assert set(llava_templates.WEBUI_TEMPLATES) == set(TEMPLATES)


# A template in the style of the llava-hf hub files: list contents only, {% generation %} around replies.
HUB_STYLE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{%- generation -%}{{ content['text'] + ' '}}{%- endgeneration -%}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.mark.parametrize("template", [LLAVA_15_HF_CHAT_TEMPLATE, HUB_STYLE_TEMPLATE], ids=["fixture", "hub_style"])
def test_adapted_hf_template_renders_webui_messages(template, webui_jinja):
    with pytest.raises(TemplateSyntaxError, match="generation"):
        webui_jinja.environment.from_string(template)  # why the adaptation exists
    adapted = llava_templates.adapt_hf_template(template)
    expected = "USER: <image>\nWhat is this? ASSISTANT: A cat. USER: And its colour? ASSISTANT:"
    assert webui_jinja(adapted, CHAT) == expected
    assert webui_jinja(adapted, [{"role": "system", "content": "Be brief."}, *CHAT]) == "Be brief. " + expected
    assert webui_jinja(adapted, CHAT, add_generation_prompt=False).endswith("USER: And its colour? ")


def test_adapted_hf_template_agrees_with_transformers_rendering(webui_jinja):
    """transformers renders the original template (generation tag and all) on list contents; the adapted one on
    webui's string contents must give the same text."""
    from transformers import PreTrainedTokenizerFast

    from tiny_llava import train_tiny_tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer(), bos_token="<s>", eos_token="</s>")
    for template in (LLAVA_15_HF_CHAT_TEMPLATE, HUB_STYLE_TEMPLATE):
        as_parts = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
        ]
        theirs = tokenizer.apply_chat_template(as_parts, chat_template=template, tokenize=False,
                                               add_generation_prompt=True)
        assert webui_jinja(llava_templates.adapt_hf_template(template), CHAT) == theirs
