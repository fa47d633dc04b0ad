"""Pure tests of llava_chat (slots, placement, webui markers) and llava_templates (webui instruction templates).

No model, no webui: strings in, strings out. Templates are rendered in a Jinja environment configured like
webui's (chat.py: ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols) and compared with
an independent statement of original LLaVA's get_prompt (tests/original_llava.py) and with transformers'
rendering of the processor's messages.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

import llava_chat
import llava_templates
import original_llava
from llava_chat import MEDIA_MARKER, SLOT_CLOSE, SLOT_OPEN
from llava_prompt import LLAVA_SYSTEM, TEMPLATES, ImageRef
from reference_support import HUB_STYLE_TEMPLATE, STRING_TEMPLATE
from tiny_llava import LLAVA_15_HF_CHAT_TEMPLATE
from webui_llava_support import marked, slots_in

S0 = f"{SLOT_OPEN}0:70x45{SLOT_CLOSE}"
S1 = f"{SLOT_OPEN}1:40x60{SLOT_CLOSE}"


# ---------------------------------------------------------------------------------------------- slots


def test_slot_format_and_detection():
    assert llava_chat.slot(0, (70, 45)) == S0
    assert llava_chat.slot(12, (1, 2)) == "\ue00012:1x2\ue001"
    assert llava_chat.has_slots(f"a {S0} b") and not llava_chat.has_slots("a <image> b <__media__>")


def test_neutralize_removes_only_the_slot_characters():
    typed = f"x {S0} <image> <__media__> \ue000\ue001\ue002\ue003 </s> é\ue004"
    assert llava_chat.neutralize(typed) == "x 0:70x45 <image> <__media__>  </s> é\ue004"
    assert not llava_chat.has_slots(llava_chat.neutralize(typed))


NL = "\ue002"  # llava_chat.IMAGE_NEWLINE, written out: the tests pin the format


@pytest.mark.parametrize("text, images, placement, expected", [
    ("What?", 1, "before", f"{S0}{NL}What?"),
    ("What?", 1, "after", f"What?{NL}{S0}"),
    ("What?", 2, "before", f"{S0}{NL}{S1}{NL}What?"),  # "<image>\n" per image, as the llava-1.5 template
    ("What?", 2, "after", f"What?{NL}{S0}{NL}{S1}"),
    ("", 1, "before", f"{S0}{NL}"),  # "<image>\n" + "" as get_prompt renders an image-only message
    ("", 1, "after", f"{NL}{S0}"),
    ("Left <image> right <image>.", 2, "before", f"Left {S0} right {S1}."),
    ("Only <image> here", 2, "after", f"Only {S0} here{NL}{S1}"),  # leftovers go where the family expects
    ("a <image> b <image> c <image>", 2, "before", f"a {S0} b {S1} c <image>"),  # extra markers stay text
    # Fewer markers than images: the images still appear in the order sent.
    ("Only <image> here", 2, "before", f"{S0}{NL}Only {S1} here"),
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
    assert llava_chat.strip_slots(f"{S0}{NL}{S1}{NL}What?") == "\n\nWhat?"


def test_image_newlines_become_newlines_when_parsed():
    """webui strips message texts; the image newline survives that and is a plain "\\n" in the prompt."""
    parsed = llava_chat.parse_slots(f"USER: {S0}{NL}{S1}{NL} ASSISTANT:")
    assert parsed.parts == ["USER: ", ImageRef(0), "\n", ImageRef(1), "\n ASSISTANT:"]
    assert f"{S0}{NL}".strip() == f"{S0}{NL}"


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

# Conversations as webui hands them to an instruction template (string contents, images as slots with the
# image newline), with the same conversation as original_llava turns (user text, images, reply).
CONVERSATIONS = {
    "one image": ([(f"{S0}{NL}What is this?", None)], [("What is this?", 1, None)]),
    "two turns": ([(f"{S0}{NL}What is this?", "A cat."), ("And its colour?", None)],
                  [("What is this?", 1, "A cat."), ("And its colour?", 0, None)]),
    "images in two turns": ([(f"{S0}{NL}{S1}{NL}Compare.", "Both red."), (f"{S1}{NL}And this?", None)],
                            [("Compare.", 2, "Both red."), ("And this?", 1, None)]),
    "image only": ([(f"{S0}{NL}", None)], [("", 1, None)]),
    "text only": ([("Hello there.", "Hi."), ("Bye.", None)], [("Hello there.", 0, "Hi."), ("Bye.", 0, None)]),
}


def _webui_messages(turns, system=None):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, reply in turns:
        messages.append({"role": "user", "content": user})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return messages


def _v0_turns(reference_turns):
    return [(f"{user}{NL}{S0}" if images == 1 else user, reply) for user, images, reply in reference_turns]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_original_templates_render_get_prompt_exactly(name, case, system, webui_jinja):
    """webui's render of the template == original LLaVA's Conversation.get_prompt (tests/original_llava.py)
    for the same conversation, images as "<image>"; no BOS text (the tokenizer adds the BOS)."""
    webui_turns, reference_turns = CONVERSATIONS[case]
    if name == "llava_v0":
        if any(images > 1 for _, images, _ in reference_turns):
            pytest.skip("v0 places one image after the text; several are covered by the placement tests")
        webui_turns = _v0_turns(reference_turns)
    rendered = webui_jinja(llava_templates.WEBUI_TEMPLATES[name], _webui_messages(webui_turns, system))
    expected = original_llava.prompt_for(name, reference_turns, system=system)
    assert marked(rendered) == expected
    assert not rendered.startswith("<s>")


def test_original_templates_in_full():
    """The formats written out once, for readers (the parametrized test above covers the combinations)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def render(name, messages):
        return marked(environment.from_string(llava_templates.WEBUI_TEMPLATES[name]).render(
            messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"))

    chat = _webui_messages([(f"{S0}{NL}What is this?", "A cat."), ("And its colour?", None)])
    assert render("llava_v1", chat) == (f"{LLAVA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                                        "USER: And its colour? ASSISTANT:")
    assert render("mistral_instruct", chat) == "[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] And its colour? [/INST]"
    assert render("llava_llama_2", chat).startswith("[INST] <<SYS>>\nYou are a helpful language and vision assistant.")
    assert render("llava_llama_2", chat).endswith("<image>\nWhat is this? [/INST] A cat. </s><s>[INST] And its colour? [/INST]")
    assert render("chatml_direct", chat) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nAnd its colour?<|im_end|><|im_start|>assistant\n")
    v0 = render("llava_v0", _webui_messages([(f"What is this?{NL}{S0}", None)]))
    assert v0.endswith("###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"
                       "###Human: What is this?\n<image>###Assistant:")


def test_every_named_template_is_a_webui_template():
    assert set(llava_templates.WEBUI_TEMPLATES) == set(TEMPLATES)


# Iterates parts but prints only the text parts (images never appear).
TEXT_PARTS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}\n{% endfor %}"
)
# Images where the template wants them: after the text, inside markup of its own.
IMAGES_AFTER_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'image' %}[{{ '<image>' }}]{% endfor %}"
    "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("template, shapes", [
    (LLAVA_15_HF_CHAT_TEMPLATE, {"user": "images", "system": "parts", "assistant": "parts"}),
    (HUB_STYLE_TEMPLATE, {"user": "images", "system": "parts", "assistant": "parts"}),
    (STRING_TEMPLATE, {"user": "string", "system": "string", "assistant": "string"}),
    (TEXT_PARTS_TEMPLATE, {"user": "parts", "system": "parts", "assistant": "parts"}),
    (IMAGES_AFTER_TEMPLATE, {"user": "images", "system": "parts", "assistant": "parts"}),
], ids=["fixture", "hub_style", "string", "text_parts", "images_after"])
def test_content_shape_is_found_by_rendering(template, shapes):
    assert llava_templates.content_shapes(template, "<image>") == shapes


def test_a_template_that_renders_no_user_text_is_not_used():
    assert llava_templates.content_shapes("{{ 'fixed' }}", "<image>") is None
    assert llava_templates.adapt_chat_template("{{ 'fixed' }}", "<image>") is None


def _parts_messages(system=None):
    """CONVERSATIONS["images in two turns"] as a processor gets it (images as parts, before the text)."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return messages + [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Both red."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
    ]


@pytest.mark.parametrize("template", [LLAVA_15_HF_CHAT_TEMPLATE, HUB_STYLE_TEMPLATE, IMAGES_AFTER_TEMPLATE],
                         ids=["fixture", "hub_style", "images_after"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_parts_templates_render_as_transformers_renders_the_processor_messages(template, system, webui_jinja):
    """transformers renders the template (generation tags and all) on list contents with image parts; the
    adapted one on webui's string contents gives the same text, with each image's slot where the template
    put that image."""
    from transformers import PreTrainedTokenizerFast

    from tiny_llava import train_tiny_tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_tiny_tokenizer(), bos_token="<s>", eos_token="</s>")
    theirs = tokenizer.apply_chat_template(_parts_messages(system), chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
    webui_turns = CONVERSATIONS["images in two turns"][0]
    ours = webui_jinja(llava_templates.adapt_chat_template(template, "<image>"), _webui_messages(webui_turns, system))
    assert marked(ours) == theirs
    assert [index for index, _ in slots_in(ours)] == [0, 1, 1]  # each slot where its image is


def test_string_template_gets_strings_and_keeps_the_images(webui_jinja):
    """The defect of a list-wrapping adaptation: the template printed the repr of a list and the slot was
    lost. Now it gets the string, slot included."""
    adapted = llava_templates.adapt_chat_template(STRING_TEMPLATE, "<image>")
    rendered = webui_jinja(adapted, _webui_messages([(f"{S0}{NL}What is shown?", None)]))
    assert rendered == f"<s>USER: {S0}{NL}What is shown?\nASSISTANT:"
    assert "'type'" not in rendered


def test_typed_image_text_stays_text_in_a_parts_template(webui_jinja):
    adapted = llava_templates.adapt_chat_template(LLAVA_15_HF_CHAT_TEMPLATE, "<image>")
    messages = _webui_messages([(f"{S0}{NL}Is <image> a tag?", None)], system="Say <image>.")
    rendered = webui_jinja(adapted, messages)
    assert rendered == f"Say <image>. USER: {S0}\nIs <image> a tag? ASSISTANT:"


def test_text_parts_template_keeps_slots_in_the_text(webui_jinja):
    adapted = llava_templates.adapt_chat_template(TEXT_PARTS_TEMPLATE, "<image>")
    rendered = webui_jinja(adapted, _webui_messages([(f"{S0}{NL}What?", None)]))
    assert rendered == f"user: {S0}{NL}What?"  # trim_blocks eats the newline after the block tag


def test_generation_tags_are_removed(webui_jinja):
    with pytest.raises(TemplateSyntaxError, match="generation"):
        webui_jinja.environment.from_string(HUB_STYLE_TEMPLATE)  # why the adaptation removes them
    adapted = llava_templates.adapt_chat_template(HUB_STYLE_TEMPLATE, "<image>")
    assert "{% generation" not in adapted and "endgeneration" not in adapted
    assert webui_jinja(adapted, _webui_messages([("Hi", "Hello."), ("Again", None)])) == \
        "USER: Hi ASSISTANT: Hello. USER: Again ASSISTANT:"


def test_checkpoint_chat_template_sources(tmp_path):
    """chat_template.jinja, then chat_template.json, then tokenizer_config.json (string or named list)."""
    import json

    assert llava_templates.checkpoint_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert llava_templates.checkpoint_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert llava_templates.checkpoint_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").write_text("K")
    assert llava_templates.checkpoint_chat_template(tmp_path) == "K"
