"""Prompt logic as pure functions: markers, spans, truncation, templates (no torch, no tokenizer)."""

import pytest

from llava_prompt import (
    TEMPLATES,
    ImageRef,
    ImageSpan,
    TokenizedPrompt,
    place_images,
    render_conversation,
    split_on_marker,
    truncate_left,
)


@pytest.mark.parametrize(
    "text, images, expected",
    [
        ("<image>\nWhat?", 1, [ImageRef(0), "\nWhat?"]),
        ("a<image>b<image>c", 2, ["a", ImageRef(0), "b", ImageRef(1), "c"]),
        ("end <image>", 1, ["end ", ImageRef(0)]),
        ("<image><image>", 2, [ImageRef(0), ImageRef(1)]),
        ("no images", 0, ["no images"]),
    ],
)
def test_split_on_marker(text, images, expected):
    assert split_on_marker(text, images) == expected


@pytest.mark.parametrize("text, images", [("<image> and <image>", 1), ("none", 1), ("<image>", 0)])
def test_split_on_marker_count_mismatch_names_both_numbers(text, images):
    markers = text.count("<image>")
    with pytest.raises(ValueError, match=rf"{markers} <image> marker\(s\) but {images} image\(s\)"):
        split_on_marker(text, images)


def _prompt(length, spans):
    return TokenizedPrompt(list(range(length)), [ImageSpan(s, n, i) for i, (s, n) in enumerate(spans)])


def test_truncate_left_keeps_short_prompts():
    prompt = _prompt(10, [(2, 4)])
    assert truncate_left(prompt, 10) is prompt


def test_truncate_left_drops_an_image_cut_in_half():
    # ids 0..19, image 0 at [2, 8), image 1 at [12, 16); keep 15 -> cut at 5 (inside image 0) -> move to 8.
    result = truncate_left(_prompt(20, [(2, 6), (12, 4)]), 15)
    assert result.ids == list(range(8, 20))
    assert result.image_spans == [ImageSpan(4, 4, 1)]
    assert result.dropped_images == [0]


def test_truncate_left_cut_exactly_at_image_start_keeps_it():
    result = truncate_left(_prompt(20, [(5, 6)]), 15)
    assert result.ids == list(range(5, 20))
    assert result.image_spans == [ImageSpan(0, 6, 0)]
    assert result.dropped_images == []


def test_truncate_left_drops_every_image_before_the_cut():
    result = truncate_left(_prompt(30, [(1, 3), (5, 3), (20, 3)]), 12)
    assert [s.image_index for s in result.image_spans] == [2]
    assert result.dropped_images == [0, 1]
    assert len(result.ids) == 12


def test_truncate_left_rejects_nonpositive_budget():
    with pytest.raises(ValueError):
        truncate_left(_prompt(3, []), 0)


def test_llava_v1_template_renders_like_the_reference():
    template = TEMPLATES["llava_v1"]
    text = render_conversation(template, [("USER", "<image>\nQ1"), ("ASSISTANT", "A1"), ("USER", "Q2"), ("ASSISTANT", None)])
    assert text == f"{template.system} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert template.stop_string == "</s>"


def test_llava_v0_template_renders_like_the_reference():
    template = TEMPLATES["llava_v0"]
    text = render_conversation(template, [("Human", "Q\n<image>"), ("Assistant", None)])
    assert text == (
        f"{template.system}###Human: Hi!###Assistant: Hi there!  How can I help you today?\n"
        "###Human: Q\n<image>###Assistant:"
    )
    assert template.system.startswith("You are LLaVA") and ".You are able" in template.system
    assert template.stop_string == "###"


def test_mistral_instruct_template():
    template = TEMPLATES["mistral_instruct"]
    text = render_conversation(template, [("USER", "<image>\nQ1"), ("ASSISTANT", "A1"), ("USER", "Q2"), ("ASSISTANT", None)])
    assert text == "[INST] <image>\nQ1 [/INST] A1 </s>[INST] Q2 [/INST]"
    assert template.stop_string == "</s>"


def test_chatml_direct_template():
    template = TEMPLATES["chatml_direct"]
    text = render_conversation(template, [(template.roles[0], "<image>\nQ1"), (template.roles[1], None)])
    assert text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|>"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "placement, expected",
    [("before", "<image>\n<image>\nWhat?"), ("after", "What?\n<image>\n<image>")],
)
def test_place_images(placement, expected):
    assert place_images("What?", ["<image>"] * 2, placement) == expected


def test_place_images_respects_typed_marker_and_no_images():
    assert place_images("Look <image> here", ["<image>"], "before") == "Look <image> here"
    assert place_images("text only", [], "after") == "text only"
    assert place_images("", ["<image>"], "before") == "<image>\n"
    assert place_images("What?", ["[IMG]"], "before", marker="[IMG]", newline="|") == "[IMG]|What?"
    with pytest.raises(ValueError):
        place_images("x", ["<image>"], "sideways")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("system", [None, "Be brief.", ""])
def test_render_conversation_is_get_prompt(name, system):
    """render_conversation (the CLI's prompt) == original LLaVA's Conversation.get_prompt
    (tests/original_llava.py) for one and several turns, with and without images and a system text."""
    import original_llava

    template = TEMPLATES[name]
    for turns in ([("Q1", 1, None)], [("Q1", 1, "A1"), ("Q2", 0, "A2"), ("Q3", 0, None)], [("", 1, None)]):
        messages = []
        for user, images, reply in turns:
            placed = place_images(user, ["<image>"] * images, "after" if name == "llava_v0" else "before")
            messages += [(template.roles[0], placed), (template.roles[1], reply)]
        assert render_conversation(template, messages, system=system) == \
            original_llava.prompt_for(name, turns, system=system), turns
