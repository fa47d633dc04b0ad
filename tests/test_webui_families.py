"""VipLLaVA, Pixtral (llava-hf form) and Mistral 3 through webui's entry points (the stand-in, tests/webui_stub).

The language model is loaded by webui's own Transformers loader (``models.load_model`` -> ``load_model_HF``,
routed by the extension's ``setup()``), the prompt is built by webui with the instruction template the
extension installed from the checkpoint's own chat template, and what reaches ``model.generate`` is compared
with the family's transformers class fed by its processor for the prompt that chat template renders from
OpenAI-style parts (``[{"type": "image"}, {"type": "text", ...}]``): equal ids, logits within 1e-5 (fp32,
``--cpu``), equal greedy tokens. Also: webui's truncation counts every image position exactly, the panel
shows each image's token cost, an image the family cannot lay out is refused by name, and webui's own 4-bit
load (bitsandbytes) gets the same spliced inputs as the full-precision one.
"""

from __future__ import annotations

import json

import pytest
import torch

from parity_support import report_max_logit_delta
from test_families import MARKERS, Reference, _images
from webui_harness import WebuiHarness, image_part, text_part
from webui_llava_support import EXTENSION_DIR, NOTICE_PREFIX, hook_calls, last_call, last_prompt

from modules import models, shared  # noqa: E402

FAMILIES = ("vipllava", "pixtral", "mistral3")
QUESTION = "What is in this picture?"
NEW_TOKENS = 6
ATOL = 1e-5

max_abs_logit_delta: dict[str, float] = {}


@pytest.fixture(scope="module")
def references(tiny_family_checkpoints):
    return {kind: Reference(kind, getattr(tiny_family_checkpoints, kind)) for kind in FAMILIES}


@pytest.fixture
def family_harness(tiny_family_checkpoints):
    """``family_harness(kind, settings=None)``: webui (--cpu) with the extension, the model loaded by webui's
    Transformers loader from the folder of the tiny checkpoint ``kind``."""
    made = []

    def make(kind: str, settings: dict | None = None, args: dict | None = None) -> WebuiHarness:
        from transformers import AutoTokenizer

        for harness in made:
            harness.close()
        folder = getattr(tiny_family_checkpoints, kind)
        # The harness starts with a stand-in model; webui then loads the real one as the Model tab does.
        harness = WebuiHarness(
            EXTENSION_DIR, _Stand(), AutoTokenizer.from_pretrained(str(folder)),
            {"mode": "instruct", "max_new_tokens": NEW_TOKENS, "custom_stopping_strings": "", **(settings or {})},
            args={"model_dir": str(folder.parent), "cpu": True, **(args or {})}, model_name=kind)
        made.append(harness)
        shared.model, shared.tokenizer = models.load_model(kind)
        shared.model_name = kind
        harness.model = shared.model
        harness._install_generate_recorder(shared.model)
        harness.new_chat()
        return harness

    yield make
    for harness in made:
        harness.close()


class _Stand(torch.nn.Module):
    """What the harness holds until webui's loader has loaded the real model (no vision is built for it:
    ``shared.model_name`` then names a folder, but the stand has no input embeddings)."""

    def generate(self, *args, **kwargs):  # pragma: no cover - never called
        raise AssertionError("the stand-in model must not generate")


def _chat_template_prompt(reference: Reference, images: int, question: str = QUESTION) -> str:
    """What the checkpoint's own chat template renders for one user message of image parts and a text part."""
    folder = reference.folder
    path = folder / "chat_template.json"
    template = json.loads(path.read_text())["chat_template"] if path.is_file() else (folder / "chat_template.jinja").read_text()
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return reference.tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                                   add_generation_prompt=True, tokenize=False)


def _check_against_reference(kind, harness, reference, pictures):
    call = last_call(harness)
    assert call.error is None and call.inputs_embeds is not None
    prompt = _chat_template_prompt(reference, len(pictures))
    inputs = reference.inputs(prompt, pictures)
    bos = reference.tokenizer.bos_token
    if bos and prompt.startswith(bos):  # the template writes the BOS text; the processor adds no second one
        inputs["input_ids"] = inputs["input_ids"][:, 1:]
    assert call.input_ids.tolist() == inputs["input_ids"].tolist(), (last_prompt(harness), prompt)
    with torch.no_grad():
        ours = shared.model(inputs_embeds=call.inputs_embeds).logits[0]
        theirs = reference.model(**inputs).logits[0]
    # Inside webui the ids past the tokenizer (a padded vocabulary) are masked (issue 13, item 4); every real
    # id's logit is the reference's.
    real = len(reference.tokenizer)
    assert torch.isneginf(ours[:, real:]).all()
    ours, theirs = ours[:, :real], theirs[:, :real]
    max_abs_logit_delta[kind] = max(max_abs_logit_delta.get(kind, 0.0), (ours - theirs).abs().max().item())
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    _, expected_tokens = reference.run(inputs, NEW_TOKENS)
    assert call.output[0, call.input_ids.shape[1]:].tolist() == expected_tokens
    # webui's truncation counted the prompt exactly: its last count is the length that reached generate.
    counts = [c.result for c in hook_calls(harness, "custom_tokenized_length") if c.result is not None]
    assert counts and counts[-1] == call.input_ids.shape[1]


@pytest.mark.parametrize("entry_point", ["ui", "api"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_webui_matches_the_transformers_class(kind, entry_point, family_harness, references):
    harness = family_harness(kind)
    assert type(shared.model).__name__ in ("LlamaForCausalLM", "MistralForCausalLM")
    pictures = _images([(70, 45)])
    if entry_point == "ui":
        harness.send(QUESTION, pictures)
    else:
        harness.api_chat([{"role": "user", "content": [image_part(pictures[0]), text_part(QUESTION)]}],
                         max_tokens=NEW_TOKENS)
    _check_against_reference(kind, harness, references[kind], pictures)


@pytest.mark.parametrize("kind", ("pixtral", "mistral3"))
def test_two_images_of_different_sizes(kind, family_harness, references):
    harness = family_harness(kind, {"llava-add_all_images_to_prompt": True})
    pictures = _images([(45, 90), (200, 150)])
    harness.send(QUESTION, pictures)
    _check_against_reference(kind, harness, references[kind], pictures)


@pytest.mark.parametrize("kind", FAMILIES)
def test_webuis_4bit_load_beside_the_vision_part_on_the_cpu(kind, family_harness, monkeypatch):
    """webui's --load-in-4bit as it runs with a GPU (device_map auto, its nf4 / double-quant settings; here
    bitsandbytes' CPU backend under a pretended GPU), the vision part on the CPU: the same ids and spliced
    embeddings as the full-precision load, and a reply."""
    bnb = pytest.importorskip("bitsandbytes")
    pictures = _images([(70, 45)])
    vision_on_cpu = {"llava-clip_device": "cpu", "llava-projector_device": "cpu"}
    full = family_harness(kind, vision_on_cpu)
    full.send(QUESTION, pictures)
    expected = last_call(full)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # webui quantizes only with a GPU
    harness = family_harness(kind, vision_on_cpu, args={"cpu": False, "load_in_4bit": True})
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in shared.model.modules())
    harness.send(QUESTION, pictures)
    call = last_call(harness)
    assert call.error is None
    assert call.input_ids.tolist() == expected.input_ids.tolist()
    assert torch.equal(call.inputs_embeds, expected.inputs_embeds)
    assert call.output.shape[1] > call.input_ids.shape[1]


def test_report_max_logit_delta(record_property):
    report_max_logit_delta(record_property, max_abs_logit_delta, ATOL)


@pytest.mark.parametrize("kind, size, positions", [
    ("vipllava", (70, 45), 16),
    ("pixtral", (70, 45), 6 * 9),  # scaled to 64x41: 6 rows of 8 [IMG] + a break/end each
    ("pixtral", (20, 33), 5 * 4),  # not scaled: 24x40 px
    ("mistral3", (200, 150), 3 * 5),  # scaled to 64x48, 16 px per token: 3 rows of 4
])
def test_panel_shows_the_token_cost_of_each_image(kind, size, positions, family_harness, tmp_path):
    harness = family_harness(kind)
    path = tmp_path / "upload.png"
    _images([size])[0].save(path)
    info = harness.extension._image_info(str(path))
    assert info == f"upload.png: {size[0]}×{size[1]}, {positions} tokens of context"


@pytest.mark.parametrize("kind", ("pixtral", "mistral3"))
def test_an_image_too_thin_to_lay_out_is_refused_by_name(kind, family_harness):
    harness = family_harness(kind)
    harness.send(QUESTION, [("thin.png", _png(_images([(300, 4)])[0]))])
    reply = harness.history["visible"][-1][1]
    assert f"{NOTICE_PREFIX} thin.png: a 300x4 image is too thin" in reply
    call = last_call(harness)
    assert call.error is None  # the text was still answered


def test_setup_installs_each_checkpoint_template(family_harness, tiny_family_checkpoints):
    family_harness("vipllava")
    from modules.models_settings import CUSTOM_TEMPLATE_NAME, get_model_metadata

    for kind in FAMILIES:
        metadata = get_model_metadata(kind)
        assert metadata["instruction_template"] == CUSTOM_TEMPLATE_NAME, kind
        assert metadata["instruction_template_str"], kind


def _png(picture) -> bytes:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def test_markers_are_the_families_own():
    assert MARKERS == {"vipllava": "<image>", "pixtral": "[IMG]", "mistral3": "[IMG]"}
