"""VipLLaVA, Pixtral (llava-hf form) and Mistral 3 against their transformers classes, in fp32 on the CPU.

References: ``VipLlavaForConditionalGeneration`` with ``LlavaProcessor`` (CLIP image processor, PIL backend);
``LlavaForConditionalGeneration`` (Pixtral tower) and ``Mistral3ForConditionalGeneration`` with
``PixtralImageProcessorPil``. ``PixtralProcessor`` itself cannot be built without torchvision, so its prompt
expansion is restated below from its documented rule (each ``[IMG]`` -> rows of ``[IMG]`` x columns +
``[IMG_BREAK]``, the last one ``[IMG_END]``, at ``patch_size x spatial_merge_size`` pixels per token); the
opt-in test at the end compares with the real processor where torchvision is installed.

Checked: same input ids, logits within 1e-5 and equal greedy tokens through our pipeline and text-only
language model; pixels ``torch.equal`` to the processors' on many geometries; token counts from the image
size alone equal to what the processors produce; the CLI (templated and ``--raw`` with ``<image>`` or
``[IMG]``) equal to the reference's greedy reply.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_checkpoint import read_llava_spec
from parity_support import CPU, load_ours, report_max_logit_delta, run_ours
from tiny_llava import make_test_image

FAMILIES = ("vipllava", "pixtral", "mistral3")
NEW_TOKENS = 10
ATOL = 1e-5
CELL = {"pixtral": 8, "mistral3": 16}  # pixels per image token: patch 8 x spatial_merge_size (1, 2)

# Image sizes (W, H): tiny images at 64 px max edge and 8 px patches. 70x45 and 200x150 are scaled down
# (floor) to fit 64 px; 20x33 is padded up to whole cells (no scaling); 45x90 is tall; Mistral 3 merges
# 2x2 patches, so its grids are a quarter as large.
CASES = {
    "one": ("{m}What is in this picture?", [(70, 45)]),
    "two": ("Look at {m} and then {m}: which is brighter?", [(45, 90), (20, 33)]),
    "big": ("Describe it. {m}", [(200, 150)]),
}
MARKERS = {"vipllava": "<image>", "pixtral": "[IMG]", "mistral3": "[IMG]"}

max_abs_logit_delta: dict[str, float] = {}


def _images(sizes, salt=0):
    return [make_test_image(w, h, seed=w * 1000 + h + salt) for w, h in sizes]


def expand_like_pixtral_processor(text: str, image_sizes, cell: int) -> str:
    """PixtralProcessor's expansion: the k-th ``[IMG]`` of ``text`` stands for image k of (height, width)
    ``image_sizes[k]`` (as the image processor returns them)."""
    pieces = text.split("[IMG]")
    assert len(pieces) - 1 == len(image_sizes)
    out = pieces[0]
    for (height, width), piece in zip(image_sizes, pieces[1:]):
        rows = [["[IMG]"] * (width // cell) + ["[IMG_BREAK]"] for _ in range(height // cell)]
        tokens = [token for row in rows for token in row]
        tokens[-1] = "[IMG_END]"
        out += "".join(tokens) + piece
    return out


class Reference:
    """One family's transformers model and processing, fp32 on the CPU."""

    def __init__(self, kind: str, folder: Path):
        import transformers
        from transformers import AutoTokenizer

        self.kind, self.folder = kind, folder
        spec = read_llava_spec(folder)
        model_class = getattr(transformers, {"vipllava": "VipLlavaForConditionalGeneration",
                                             "pixtral": "LlavaForConditionalGeneration",
                                             "mistral3": "Mistral3ForConditionalGeneration"}[kind])
        self.model = model_class.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if kind == "vipllava":
            from transformers import CLIPImageProcessorPil, LlavaProcessor

            settings = json.loads((folder / "processor_config.json").read_text())
            self.processor = LlavaProcessor(
                image_processor=CLIPImageProcessorPil(**{k: v for k, v in settings["image_processor"].items()
                                                         if k != "image_processor_type"}),
                tokenizer=self.tokenizer,
                patch_size=settings["patch_size"], vision_feature_select_strategy="default",
                num_additional_image_tokens=settings["num_additional_image_tokens"], image_token="<image>")
        else:
            from transformers import PixtralImageProcessorPil

            self.image_processor = PixtralImageProcessorPil.from_pretrained(str(folder))
        self.spec = spec

    def inputs(self, prompt: str, images) -> dict:
        """What the family's processor gives for ``prompt`` (image marker as the family writes it)."""
        if self.kind == "vipllava":
            inputs = dict(self.processor(images=images, text=prompt, return_tensors="pt"))
            inputs.pop("attention_mask", None)
            return inputs
        pixels = self.image_processor(images, patch_size=CELL[self.kind], return_tensors="pt")
        text = expand_like_pixtral_processor(prompt, pixels["image_sizes"].tolist(), CELL[self.kind])
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}

    @torch.no_grad()
    def run(self, inputs: dict, new_tokens: int = NEW_TOKENS):
        logits = self.model(**inputs).logits[0]
        out = self.model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                  max_new_tokens=new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        return logits, out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def references(tiny_family_checkpoints):
    return {kind: Reference(kind, getattr(tiny_family_checkpoints, kind)) for kind in FAMILIES}


@pytest.fixture(scope="module")
def ours(tiny_family_checkpoints):
    return load_ours(tiny_family_checkpoints, FAMILIES)


# ---------------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", FAMILIES)
def test_matches_the_transformers_class(kind, case, references, ours):
    template, sizes = CASES[case]
    prompt = template.format(m=MARKERS[kind])
    images = _images(sizes)
    reference = references[kind]
    inputs = reference.inputs(prompt, images)
    ref_logits, ref_tokens = reference.run(inputs)
    prepared, logits, tokens = run_ours(ours[kind], prompt, images, new_tokens=NEW_TOKENS,
                                        marker=ours[kind][0].spec.image_markers,
                                        pad_token_id=reference.tokenizer.pad_token_id)
    assert prepared.input_ids.tolist() == inputs["input_ids"].tolist()
    max_abs_logit_delta[kind] = max(max_abs_logit_delta.get(kind, 0.0), (logits - ref_logits).abs().max().item())
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert tokens == ref_tokens
    assert len(set(tokens)) > 1


@pytest.mark.parametrize("kind", ("pixtral", "mistral3"))
def test_generic_image_marker_equals_the_image_token(kind, ours):
    """``<image>`` and ``[IMG]`` both mark an image in a Pixtral-family prompt, with the same result."""
    images = _images([(70, 45)])
    with_token, *_ = run_ours(ours[kind], "[INST][IMG]Hi[/INST]", images, new_tokens=1,
                              marker=ours[kind][0].spec.image_markers)
    with_generic, *_ = run_ours(ours[kind], "[INST]<image>Hi[/INST]", images, new_tokens=1,
                                marker=ours[kind][0].spec.image_markers)
    assert with_token.input_ids.tolist() == with_generic.input_ids.tolist()
    torch.testing.assert_close(with_token.inputs_embeds, with_generic.inputs_embeds, atol=0, rtol=0)


def test_image_changes_the_answer_for_each_family(ours):
    """Guards the parity tests against a pipeline that ignores images (both sides would still agree)."""
    for kind in FAMILIES:
        prompt = CASES["one"][0].format(m=MARKERS[kind])
        _, logits_a, _ = run_ours(ours[kind], prompt, _images([(70, 45)]), new_tokens=1, marker=MARKERS[kind])
        _, logits_b, _ = run_ours(ours[kind], prompt, _images([(70, 45)], salt=77), new_tokens=1, marker=MARKERS[kind])
        assert (logits_a - logits_b).abs().max() > 1e-2, kind


def test_family_specs(ours, tiny_family_checkpoints):
    vip, pixtral, mistral3 = (ours[kind][0] for kind in FAMILIES)
    assert (vip.spec.family, vip.spec.vision_feature_layers, vip.spec.keep_cls) == ("vipllava", (-2, -5, 1, 4), False)
    # Four layers concatenated, CLS cut: 16 rows of 4 x 32; the tower stops after layer 5 of 6.
    assert vip.tower.feature_size == 4 * 32 and vip.tower.config.num_hidden_layers == 5
    assert vip.tokens_per_image == 16 and type(vip.projector).__name__ == "VipLlavaProjector"
    assert (pixtral.spec.family, pixtral.spec.image_token_id, pixtral.spec.image_token_text) == ("pixtral", 10, "[IMG]")
    assert pixtral.tower.config.num_hidden_layers == 2  # layer -2 of 3
    assert (mistral3.spec.family, type(mistral3.projector).__name__) == ("mistral3", "Mistral3Projector")
    for kind in ("pixtral", "mistral3"):
        assert type(ours[kind][1]).__name__ == "MistralForCausalLM"
    # Mistral3Config ties lm_head to the embeddings by default, and the file relies on that default.
    model = ours["mistral3"][1]
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not ours["pixtral"][1].config.tie_word_embeddings


def test_cache_serves_variable_size_images_without_the_tower(ours, monkeypatch):
    """Pixtral images of different sizes are cached per content like CLIP ones; a cached image never
    reaches the tower again."""
    pipeline = ours["pixtral"][0]
    pipeline.cache.clear()
    images = _images([(70, 45), (20, 33)])
    first = pipeline.encode_images(images, keys=["a", "b"])
    calls = []
    monkeypatch.setattr(pipeline, "encode_pixels", lambda pixels: calls.append(pixels.shape))
    again = pipeline.encode_images(images, keys=["a", "b"])
    assert calls == []
    assert [tuple(t.shape) for t in first] == [(48, 64), (15, 64)]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", FAMILIES)
def test_vision_in_bfloat16_stays_close(kind, tiny_family_checkpoints, ours):
    """The vision part at the extension's precision setting (bf16 here) runs for every family and stays near
    fp32 (the projector in fp32 too: only the tower's precision changes)."""
    from llava_pipeline import LlavaPipeline, VisionSettings

    folder = getattr(tiny_family_checkpoints, kind)
    bf16 = LlavaPipeline.load(folder, VisionSettings(clip_device="cpu", projector_device="cpu", clip_bits="bf16"),
                              lm_hidden_size=64)
    assert next(bf16.tower.parameters()).dtype == torch.bfloat16
    image = _images([(70, 45)])
    fp32_rows = ours[kind][0]._encode_fresh(image)[0]
    bf16_rows = bf16._encode_fresh(image)[0]
    assert bf16_rows.dtype == torch.float32 and bf16_rows.shape == fp32_rows.shape
    assert (bf16_rows - fp32_rows).norm() / fp32_rows.norm() < 0.05


def test_report_max_logit_delta(record_property):
    report_max_logit_delta(record_property, max_abs_logit_delta, ATOL)


# ---------------------------------------------------------------------------------------------------------
# webui's loader: AutoModelForCausalLM routed to the language model alone


def test_auto_model_for_causal_lm_loads_the_language_model_alone(tiny_family_checkpoints, references):
    """What webui's Transformers loader calls (``from_pretrained``; ``from_config`` under init_empty_weights to
    plan 8-bit device maps) gives the text model, with the reference's weights and tying."""
    import llava_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 30, 31, 32, 40, 2]])
    for kind in FAMILIES:
        folder = getattr(tiny_family_checkpoints, kind)
        with pytest.raises(ValueError):  # stock transformers refuses these configs for a causal LM
            AutoModelForCausalLM.from_pretrained(str(folder))
    llava_checkpoint.register_with_transformers()
    for kind in FAMILIES:
        folder = getattr(tiny_family_checkpoints, kind)
        reference = references[kind].model
        auto = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        assert not [name for name in auto.state_dict() if "vision" in name or "projector" in name]
        with torch.no_grad():
            theirs = reference(input_ids=ids).logits
            torch.testing.assert_close(auto(ids).logits, theirs, atol=0, rtol=0)
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
        assert type(empty) is type(auto)
        tied = empty.lm_head.weight.data_ptr() == empty.get_input_embeddings().weight.data_ptr()
        assert tied == bool(reference.config.tie_word_embeddings), kind


# ---------------------------------------------------------------------------------------------------------
# Preprocessing and token counts against the family's processor

GEOMETRIES = [(1, 1), (64, 64), (65, 64), (64, 65), (63, 1), (1, 63), (70, 45), (45, 70), (20, 33), (7, 130),
              (130, 7), (333, 1000), (1000, 333), (1024, 768), (641, 479), (17, 17), (128, 9), (3000, 2000),
              (2000, 3001), (31, 97)]


@pytest.mark.parametrize("kind", ("pixtral", "mistral3"))
def test_pixels_and_token_counts_equal_the_pixtral_processor(kind, ours, references):
    pipeline = ours[kind][0]
    image_processor = references[kind].image_processor
    for index, size in enumerate(GEOMETRIES):
        picture = make_test_image(*size, seed=index)
        expected = image_processor(picture, patch_size=CELL[kind], return_tensors="pt")
        pixels = pipeline.plan.preprocess([picture])[0]
        assert torch.equal(pixels, expected["pixel_values"]), size
        height, width = expected["image_sizes"][0].tolist()
        rows, columns = height // CELL[kind], width // CELL[kind]
        layout = pipeline.layout(size)
        assert (layout.feature_rows, layout.positions) == (rows * columns, rows * (columns + 1)), size
        text = expand_like_pixtral_processor("[IMG]", [(height, width)], CELL[kind])
        assert layout.text() == text, size


def test_vipllava_pixels_equal_its_clip_processor(ours, references):
    pipeline, processor = ours["vipllava"][0], references["vipllava"].processor
    for index, size in enumerate(GEOMETRIES):
        picture = make_test_image(*size, seed=index)
        expected = processor.image_processor(picture, return_tensors="pt")["pixel_values"]
        assert torch.equal(pipeline.plan.preprocess([picture])[0], expected), size
        assert pipeline.layout(size).feature_rows == 16


@pytest.mark.parametrize("kind", ("pixtral", "mistral3"))
def test_too_thin_an_image_is_refused_by_name(kind, ours):
    pipeline = ours[kind][0]
    with pytest.raises(ValueError, match="300x4 image is too thin"):
        pipeline.layout((300, 4))


def test_processor_settings_that_do_not_fit_the_model_are_refused(tiny_family_checkpoints, ours, tmp_path):
    import shutil

    from llava_checkpoint import CheckpointError
    from llava_pipeline import LlavaPipeline

    folder = tmp_path / "mistral3"
    shutil.copytree(tiny_family_checkpoints.mistral3, folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**settings, "spatial_merge_size": 1}))
    with pytest.raises(CheckpointError, match="spatial_merge_size 1, the model 8 and 2"):
        LlavaPipeline.load(folder, CPU, lm_hidden_size=64)
    # Without processor_config.json the model's own patch and merge sizes apply.
    (folder / "processor_config.json").unlink()
    pipeline = LlavaPipeline.load(folder, CPU, lm_hidden_size=64)
    assert pipeline.layout((70, 45)).feature_rows == ours["mistral3"][0].layout((70, 45)).feature_rows == 12


def test_mistral3_projector_matches_the_reference_projector(ours, references):
    """The projector alone (RMS norm, 2x2 patch merge, MLP) on two images of one size in one batch."""
    pipeline, model = ours["mistral3"][0], references["mistral3"].model
    features = torch.randn(2, 6 * 8, 32, generator=torch.Generator().manual_seed(3))
    ours_out = pipeline.projector(features, (6, 8))
    theirs = model.model.multi_modal_projector(features.reshape(-1, 32), [(48, 64), (48, 64)])
    assert ours_out.shape == (2, 12, 64)
    assert torch.equal(ours_out.reshape(-1, 64), theirs)


# ---------------------------------------------------------------------------------------------------------
# The CLI

CLI_NEW_TOKENS = 8
QUESTION = "What is in this picture?"
CLI_IMAGES = {"a": (70, 45), "b": (20, 33), "c": (200, 150)}
# kind -> (raw prompt or None for the checkpoint's chat template, image keys)
CLI_CASES = {
    "vipllava": (None, ["a"]),
    "pixtral": (None, ["c"]),
    "mistral3": (None, ["a", "b"]),
    "pixtral-raw-img": ("[INST][IMG]What is this?[/INST]", ["a"]),
    "mistral3-raw-image": ("[INST]<image>first, then [IMG] second[/INST]", ["b", "c"]),
    "vipllava-raw": ("###Human: <image>\nWhat is this?###Assistant:", ["b"]),
}

from test_cli import cli_args, cli_runs_started, write_image_files  # noqa: E402


@pytest.fixture(scope="module")
def cli_image_files(tmp_path_factory):
    return write_image_files(tmp_path_factory.mktemp("family_cli_images"),
                             {key: _images([size])[0] for key, size in CLI_IMAGES.items()})


@pytest.fixture(scope="module")
def cli_runs(tiny_family_checkpoints, cli_image_files, tmp_path_factory):
    runs = {case: cli_args(getattr(tiny_family_checkpoints, case.split("-")[0]), keys, cli_image_files, raw_prompt,
                           question=QUESTION, new_tokens=CLI_NEW_TOKENS)
            for case, (raw_prompt, keys) in CLI_CASES.items()}
    with cli_runs_started(runs, tmp_path_factory.mktemp("empty_hf_home")) as futures:
        yield futures


def _cli_reference_reply(reference: Reference, case: str, images) -> str:
    raw_prompt, _ = CLI_CASES[case]
    tokenizer = reference.tokenizer
    if raw_prompt:
        prompt = raw_prompt.replace("<image>", MARKERS[reference.kind])
    else:
        template_file = reference.folder / "chat_template.json"
        template = (json.loads(template_file.read_text())["chat_template"] if template_file.is_file()
                    else (reference.folder / "chat_template.jinja").read_text())
        content = [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                               add_generation_prompt=True, tokenize=False)
    inputs = reference.inputs(prompt, images)
    if prompt.startswith(tokenizer.bos_token or "\0"):
        # The rendered template holds the BOS text; the processor then tokenizes without adding another.
        ids = inputs["input_ids"][0].tolist()
        assert ids[:2] == [tokenizer.bos_token_id] * 2
        inputs["input_ids"] = inputs["input_ids"][:, 1:]
    _, tokens = reference.run(inputs, CLI_NEW_TOKENS)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_reply_equals_transformers_reference(case, references, cli_runs):
    kind = case.split("-")[0]
    images = _images([CLI_IMAGES[key] for key in CLI_CASES[case][1]])
    expected = _cli_reference_reply(references[kind], case, images)
    run = cli_runs[case].result()
    assert run.returncode == 0, run.describe()
    assert expected, "the reference produced an empty reply; the comparison would prove nothing"
    assert run.stdout == expected + "\n", run.describe()
    assert "Traceback" not in run.stderr, run.describe()


def test_cli_help_names_the_image_token():
    import cli

    help_text = cli.build_parser().format_help()
    assert "<image>" in help_text and "[IMG]" in help_text


# ---------------------------------------------------------------------------------------------------------
# Opt-in: the real PixtralProcessor (needs torchvision, which the project does not require)


@pytest.mark.parametrize("kind", ("pixtral", "mistral3"))
def test_real_pixtral_processor_expands_like_ours(kind, ours, tiny_family_checkpoints):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    folder = getattr(tiny_family_checkpoints, kind)
    processor = AutoProcessor.from_pretrained(str(folder))
    images = _images([(70, 45), (20, 33)])
    prompt = "[INST][IMG] and [IMG]?[/INST]"
    expected = processor(images=images, text=prompt, return_tensors="pt")
    prepared, *_ = run_ours(ours[kind], prompt, images, new_tokens=1, marker="[IMG]")
    assert prepared.input_ids.tolist() == expected["input_ids"].tolist()
