"""LLaVA-OneVision and Aya Vision checkpoints that cannot be run are refused at load with a message that
says what is wrong (never a traceback deep in the encode), and odd images go through like any other."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llava_checkpoint import CheckpointError, read_llava_spec
from llava_pipeline import LlavaPipeline
from llava_prompt import split_on_marker
from parity_support import CPU
from tiny_llava import make_test_image


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _load(folder):
    return LlavaPipeline.load(folder, CPU, lm_hidden_size=64)


@pytest.mark.parametrize("value", ["anyres", "anyres_max_0", "pad"])
def test_onevision_refuses_an_unknown_aspect_ratio_rule(tiny_onevision_checkpoints, tmp_path, value):
    folder = _copy(tiny_onevision_checkpoints.hub, tmp_path)
    _edit_json(folder / "config.json", vision_aspect_ratio=value)
    with pytest.raises(CheckpointError, match=f"vision_aspect_ratio must be 'anyres_max_<N>'.*got '{value}'"):
        read_llava_spec(folder)


def test_onevision_refuses_default_strategy_on_siglip(tiny_onevision_checkpoints, tmp_path):
    folder = _copy(tiny_onevision_checkpoints.hub, tmp_path)
    _edit_json(folder / "config.json", vision_feature_select_strategy="default")
    with pytest.raises(CheckpointError, match="'default' drops a CLS row, which a SigLIP tower does not have"):
        read_llava_spec(folder)


def test_onevision_refuses_processor_and_config_that_disagree(tiny_onevision_checkpoints, tmp_path):
    folder = _copy(tiny_onevision_checkpoints.hub, tmp_path)
    _edit_json(folder / "preprocessor_config.json", image_grid_pinpoints=[[60, 60], [60, 120]])
    with pytest.raises(CheckpointError, match="image_grid_pinpoints differ from config.json's"):
        _load(folder)
    folder = _copy(tiny_onevision_checkpoints.hub, tmp_path, "tokens")
    _edit_json(folder / "processor_config.json", num_image_tokens=729)
    with pytest.raises(CheckpointError, match="counts 729 tokens per tile, the vision tower gives 16"):
        _load(folder)


def test_onevision_refuses_a_checkpoint_without_image_newline(tiny_onevision_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_onevision_checkpoints.hub, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["image_newline"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="stores no image_newline tensor"):
        _load(folder)


def test_aya_refuses_a_tile_layout_the_tower_does_not_make(tiny_aya_checkpoints, tmp_path):
    folder = _copy(tiny_aya_checkpoints.hub, tmp_path)
    _edit_json(folder / "processor_config.json", downsample_factor=3)
    with pytest.raises(CheckpointError, match="lays out 4 tokens per 84 px tile.*give \\(6 // 2\\)² per 84 px tile"):
        _load(folder)


def test_aya_refuses_a_projector_of_another_tower(tiny_aya_checkpoints, tmp_path):
    folder = _copy(tiny_aya_checkpoints.hub, tmp_path)
    _edit_json(folder / "config.json", downsample_factor=1)
    with pytest.raises(CheckpointError, match="downsample_factor or the vision config does not match"):
        _load(folder)


def test_aya_needs_its_tokenizer_to_spell_tile_labels(tiny_aya_checkpoints, tmp_path):
    folder = _copy(tiny_aya_checkpoints.hub, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    # transformers 5 then builds an empty CohereTokenizer from the model type, which has no tokens at all.
    with pytest.raises(CheckpointError, match="into no tokens; are the checkpoint's tokenizer files"):
        _load(folder)


@pytest.mark.parametrize("size", [(1, 1), (1, 3000), (3000, 1), (7, 5)])
def test_degenerate_images_go_through(tiny_onevision_checkpoints, tiny_aya_checkpoints, size):
    from transformers import AutoTokenizer

    for folder in (tiny_onevision_checkpoints.hub, tiny_aya_checkpoints.hub):
        pipeline = _load(folder)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        embed = torch.nn.Embedding(len(tokenizer) + 64, 64)
        picture = make_test_image(*size, seed=1)
        prepared = pipeline.prepare(split_on_marker("<image> what?", 1), [picture], tokenizer, embed, add_bos=True)
        assert prepared.images_used == 1
        assert prepared.prompt.image_spans[0].feature_rows == pipeline.image_tokens(size)


@pytest.mark.parametrize("family", ["onevision", "aya"])
def test_vision_in_bfloat16_and_the_cache(family, tiny_onevision_checkpoints, tiny_aya_checkpoints, monkeypatch):
    """The extension's precision settings apply to both modules (bf16 stays near fp32), and an image seen
    before comes from the embedding cache without running the tower."""
    from llava_pipeline import VisionSettings

    folder = (tiny_onevision_checkpoints if family == "onevision" else tiny_aya_checkpoints).hub
    picture = make_test_image(300, 200, seed=9)
    exact = _load(folder).encode_images([picture])[0]
    bf16 = LlavaPipeline.load(folder, VisionSettings(clip_device="cpu", projector_device="cpu", clip_bits="bf16",
                                                     projector_bits="bf16"), lm_hidden_size=64)
    assert next(bf16.tower.parameters()).dtype == next(bf16.projector.parameters()).dtype == torch.bfloat16
    rows = bf16.encode_images([picture], keys=["picture"])[0]
    assert rows.dtype == torch.bfloat16 and rows.shape == exact.shape
    assert (rows.float() - exact).abs().max() <= 0.05 * exact.abs().max()
    monkeypatch.setattr(bf16, "encode_pixels", lambda pixels: pytest.fail("the tower ran for a cached image"))
    assert torch.equal(bf16.encode_images([lambda: pytest.fail("decoded again")], keys=["picture"])[0], rows)
