"""Loading: format detection, the text-only language model, transformers registration, vision tower lookup
and truncation, and the checks that refuse checkpoints that do not fit together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import llava_checkpoint
import llava_vision
from llava_checkpoint import CheckpointError, WeightFiles, detect_format, load_language_model, read_llava_spec
from llava_pipeline import LlavaPipeline, VisionSettings

CPU = VisionSettings(clip_device="cpu", projector_device="cpu")
TOWER_HUB_ID = "openai/clip-vit-large-patch14-336"
VISION_KEY_PARTS = ("vision", "mm_projector", "multi_modal_projector", "image_newline")
ORIGINAL_NON_TEXT_PREFIXES = ("model.vision_tower.", "model.mm_projector.")


def copy_checkpoint(source: Path, target: Path, **config_updates) -> Path:
    """A copy of a fixture checkpoint with some config.json fields replaced (None deletes a field)."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in config_updates.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def rewrite_bin_shards(folder: Path, edit) -> None:
    """Load every `.bin` shard of a sharded original checkpoint, let `edit(state) -> {shard_name: tensors}`
    regroup the tensors, and write the shards and index back."""
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(torch.load(folder / shard, weights_only=True))
        (folder / shard).unlink()
    shards = edit(state)
    index["weight_map"] = {}
    for shard, tensors in shards.items():
        torch.save(tensors, folder / shard)
        index["weight_map"].update({key: shard for key in tensors})
    index_path.write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("plain") / "llama"
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def token_ids(tiny_checkpoints) -> torch.Tensor:
    """A few ids inside every format's vocabulary (< V)."""
    generator = torch.Generator().manual_seed(3)
    return torch.cat([torch.tensor([[1]]), torch.randint(3, tiny_checkpoints.base_vocab, (1, 11), generator=generator)], 1)


@pytest.fixture(scope="module")
def v15_logits(tiny_checkpoints, token_ids) -> torch.Tensor:
    with torch.no_grad():
        return load_language_model(tiny_checkpoints.v15, dtype=torch.float32)(token_ids).logits


# ---------------------------------------------------------------------------------------------------------
# Format detection and the parsed spec


@pytest.mark.parametrize("name, expected", [
    ("v0", "v0"), ("v15", "v1"), ("hf", "hf"), ("hf5", "hf"), ("hf_linear_reference", "hf"),
    ("clip", None), ("clip_full", None),
])
def test_detect_format_of_fixture_dirs(name, expected, tiny_checkpoints):
    folder = getattr(tiny_checkpoints, name)
    assert detect_format(llava_checkpoint.read_raw_config(folder)) == expected
    spec = read_llava_spec(folder)
    assert (spec.format if spec else None) == expected


def test_plain_llama_and_empty_dirs_are_not_llava(plain_llama, tmp_path):
    assert detect_format(llava_checkpoint.read_raw_config(plain_llama)) is None
    assert read_llava_spec(plain_llama) is None
    assert read_llava_spec(tmp_path) is None  # no config.json at all


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "llava_llama", "mm_vision_tower": "x"}, "v1"),
    ({"model_type": "llava_mistral", "mm_vision_tower": "x"}, "v1"),
    ({"model_type": "llama", "mm_vision_tower": "x", "mm_projector_type": "mlp2x_gelu"}, "v1"),
    ({"model_type": "llama", "mm_hidden_size": 1024}, "v0"),
    ({"model_type": "llama"}, None),
    ({"model_type": "paligemma", "text_config": {}, "vision_config": {}}, None),
])
def test_detect_format_of_config_variants(config, expected):
    assert detect_format(config) == expected


def test_unknown_model_type_with_llava_fields_is_refused():
    with pytest.raises(CheckpointError, match=r"model_type 'qwen2'"):
        detect_format({"model_type": "qwen2", "mm_vision_tower": "x"})


def test_spec_fields_per_format(tiny_checkpoints):
    v0, v15, hf = (read_llava_spec(getattr(tiny_checkpoints, n)) for n in ("v0", "v15", "hf"))
    assert (v0.projector_type, v0.use_im_start_end, v0.default_placement, v0.template) == ("linear", True, "after", "llava_v0")
    assert v0.vision_tower_name == str(tiny_checkpoints.clip.resolve())
    assert (v15.projector_type, v15.image_aspect_ratio, v15.default_placement, v15.template) == (
        "mlp2x_gelu", "pad", "before", "llava_v1")
    assert v15.vision_feature_layers == (tiny_checkpoints.vision_feature_layer,) and not v15.keep_cls
    assert not v15.vision_in_checkpoint and v15.text_model_type == "llama"
    assert (hf.projector_type, hf.image_token_id, hf.image_token_text) == ("hf", tiny_checkpoints.image_token_id, "<image>")
    assert hf.vision_in_checkpoint and hf.vision_feature_layers == (-2,) and not hf.keep_cls


def test_keep_cls_strategies(tiny_checkpoints, tmp_path):
    full = copy_checkpoint(tiny_checkpoints.hf, tmp_path / "hf_full", vision_feature_select_strategy="full")
    cls_patch = copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15_cls", mm_vision_select_feature="cls_patch")
    assert read_llava_spec(full).keep_cls and read_llava_spec(cls_patch).keep_cls
    bad = copy_checkpoint(tiny_checkpoints.hf, tmp_path / "hf_bad", vision_feature_select_strategy="cls_only")
    with pytest.raises(CheckpointError, match="cls_only"):
        read_llava_spec(bad)


# ---------------------------------------------------------------------------------------------------------
# The language model alone


def test_text_config_for_original_v15_is_the_flat_tiny_config(tiny_checkpoints):
    config = llava_checkpoint.text_config_for(tiny_checkpoints.v15)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (64, 2, 4, 2, 128, tiny_checkpoints.base_vocab)
    assert not hasattr(config, "mm_vision_tower") and not hasattr(config, "mm_projector_type")


def test_text_config_for_hf_and_mistral_variant(tiny_checkpoints, tmp_path):
    hf = llava_checkpoint.text_config_for(tiny_checkpoints.hf)
    assert (hf.model_type, hf.hidden_size, hf.vocab_size) == ("llama", 64, tiny_checkpoints.padded_vocab)
    mistral = copy_checkpoint(tiny_checkpoints.v15, tmp_path / "llava-v15-mistral", model_type="llava_mistral")
    config = llava_checkpoint.text_config_for(mistral)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("mistral", 64, 2)


@pytest.mark.parametrize("fmt", ["v0", "v15", "hf", "hf5"])
def test_load_language_model_reads_only_language_model_tensors(fmt, tiny_checkpoints, token_ids, v15_logits):
    from transformers import LlamaForCausalLM

    folder = getattr(tiny_checkpoints, fmt)
    model = load_language_model(folder, dtype=torch.float32)
    assert type(model) is LlamaForCausalLM
    names = set(model.state_dict())
    assert not [n for n in names if any(part in n for part in VISION_KEY_PARTS)]
    with torch.device("meta"):
        bare = LlamaForCausalLM(llava_checkpoint.text_config_for(folder))
    assert names == set(bare.state_dict())
    # Every format holds the same language model (vocabularies differ only past the base V rows).
    with torch.no_grad():
        logits = model(token_ids).logits[..., : tiny_checkpoints.base_vocab]
    torch.testing.assert_close(logits, v15_logits, atol=1e-5, rtol=0)


def test_load_language_model_weights_are_the_reference_weights(tiny_checkpoints):
    from transformers import LlavaForConditionalGeneration

    reference = LlavaForConditionalGeneration.from_pretrained(str(tiny_checkpoints.hf_reference), dtype=torch.float32)
    model = load_language_model(tiny_checkpoints.v15, dtype=torch.float32)
    v = tiny_checkpoints.base_vocab
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight[:v])
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight[:v])
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight,
                       reference.model.language_model.layers[1].mlp.down_proj.weight)


def test_load_language_model_accepts_dtype_device_map_and_ignores_llava_config(tiny_checkpoints):
    from transformers import AutoConfig

    llava_config = AutoConfig.from_pretrained(str(tiny_checkpoints.hf))  # the wrong (multimodal) config
    model = load_language_model(tiny_checkpoints.hf, dtype=torch.bfloat16, device_map="cpu", config=llava_config)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert model.config.hidden_size == 64 and model.config.vocab_size == tiny_checkpoints.padded_vocab


def test_v15_without_any_vision_tensors_still_loads_the_language_model(tiny_checkpoints, tmp_path, token_ids, v15_logits):
    folder = copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15_text_only")

    def drop_vision(state):
        return {"pytorch_model-00001-of-00001.bin":
                {k: v for k, v in state.items() if not k.startswith(ORIGINAL_NON_TEXT_PREFIXES)}}

    rewrite_bin_shards(folder, drop_vision)
    with torch.no_grad():
        logits = load_language_model(folder, dtype=torch.float32)(token_ids).logits
    torch.testing.assert_close(logits, v15_logits, atol=0, rtol=0)


@pytest.mark.xfail(strict=True, raises=FileNotFoundError, reason=(
    "known gap: transformers opens every shard the index lists, so a deleted vision-only shard breaks "
    "the text-only load (reported to the lead; remove this mark when load_language_model skips such shards)"
))
def test_v15_with_its_vision_shard_deleted_still_loads_the_language_model(tiny_checkpoints, tmp_path, token_ids, v15_logits):
    folder = copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15_split")

    def split_vision_off(state):
        text = {k: v for k, v in state.items() if not k.startswith(ORIGINAL_NON_TEXT_PREFIXES)}
        return {"pytorch_model-00001-of-00002.bin": text,
                "pytorch_model-00002-of-00002.bin": {k: v for k, v in state.items() if k not in text}}

    rewrite_bin_shards(folder, split_vision_off)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with torch.no_grad():
        logits = load_language_model(folder, dtype=torch.float32)(token_ids).logits
    torch.testing.assert_close(logits, v15_logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# AutoModelForCausalLM registration (what webui's Transformers loader calls)


@pytest.fixture
def restore_transformers_registry():
    """register_with_transformers() changes process-wide auto mappings: start without its entries and
    restore the mappings as they were afterwards."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    saved_configs = dict(CONFIG_MAPPING._extra_content)
    saved_models = dict(AutoModelForCausalLM._model_mapping._extra_content)
    # Start from stock transformers even if something earlier in the session registered.
    for model_type in ("llava_llama", "llava_mistral"):
        CONFIG_MAPPING._extra_content.pop(model_type, None)
    for config_class, model_class in saved_models.items():
        if issubclass(model_class, llava_checkpoint._TextOnlyLoader):
            AutoModelForCausalLM._model_mapping._extra_content.pop(config_class)
    yield
    CONFIG_MAPPING._extra_content.clear()
    CONFIG_MAPPING._extra_content.update(saved_configs)
    AutoModelForCausalLM._model_mapping._extra_content.clear()
    AutoModelForCausalLM._model_mapping._extra_content.update(saved_models)


def test_register_with_transformers_routes_llava_dirs_to_the_text_model(
    tiny_checkpoints, tmp_path, token_ids, restore_transformers_registry
):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, MistralForCausalLM

    variants = {
        "llava_llama": copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15-llava-llama", model_type="llava_llama"),
        "llava_mistral": copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15-llava-mistral", model_type="llava_mistral"),
    }
    for model_type, folder in variants.items():
        with pytest.raises((ValueError, KeyError)):  # stock transformers does not know the original types
            AutoModelForCausalLM.from_pretrained(str(folder))
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(str(tiny_checkpoints.hf))

    llava_checkpoint.register_with_transformers()
    llava_checkpoint.register_with_transformers()  # idempotent
    cases = [(tiny_checkpoints.hf, LlamaForCausalLM), (tiny_checkpoints.v15, LlamaForCausalLM),
             (variants["llava_llama"], LlamaForCausalLM), (variants["llava_mistral"], MistralForCausalLM)]
    for folder, expected_class in cases:
        auto = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        direct = load_language_model(folder, dtype=torch.float32)
        assert type(auto) is expected_class, folder
        assert not [n for n in auto.state_dict() if any(part in n for part in VISION_KEY_PARTS)]
        with torch.no_grad():
            torch.testing.assert_close(auto(token_ids).logits, direct(token_ids).logits, atol=0, rtol=0)


def test_auto_from_config_builds_the_empty_text_model(tiny_checkpoints, restore_transformers_registry):
    """webui plans 8-bit device maps with ``AutoModelForCausalLM.from_config(config)`` under init_empty_weights;
    transformers calls ``_from_config`` on the registered class."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    llava_checkpoint.register_with_transformers()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(tiny_checkpoints.hf)), trust_remote_code=None)
    assert type(model) is LlamaForCausalLM
    assert model.config.hidden_size == 64 and not [n for n in model.state_dict() if "vision" in n]


# ---------------------------------------------------------------------------------------------------------
# Where the vision tower comes from


@pytest.fixture
def hub_style_v15(tiny_checkpoints, tmp_path):
    """A v15 copy naming its tower by hub id, and a webui-style models folder holding that tower."""
    models_dir = tmp_path / "models"
    webui_named = models_dir / TOWER_HUB_ID.replace("/", "_")
    shutil.copytree(tiny_checkpoints.clip, webui_named)
    checkpoint = copy_checkpoint(tiny_checkpoints.v15, models_dir / "llava-v1.5-tiny", mm_vision_tower=TOWER_HUB_ID)
    return read_llava_spec(checkpoint), models_dir, webui_named


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """Offline with an empty Hugging Face cache. huggingface_hub reads these variables at import time,
    so its constants are patched as well as the environment."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path / "empty_hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


def test_tower_from_the_local_path_in_mm_vision_tower(tiny_checkpoints):
    source = llava_vision.find_tower_source(read_llava_spec(tiny_checkpoints.v15))
    assert source.config_dir == tiny_checkpoints.clip.resolve() and source.weights_dir == source.config_dir
    assert source.vision_config["hidden_size"] == tiny_checkpoints.vision_hidden_size


def test_tower_from_the_webui_models_dir_naming(hub_style_v15, offline_empty_hub):
    spec, models_dir, webui_named = hub_style_v15
    source = llava_vision.find_tower_source(spec, models_dir=models_dir)
    assert source.config_dir == webui_named


def test_tower_lookup_order(hub_style_v15, tiny_checkpoints, offline_empty_hub):
    """override > path (relative to the checkpoint) > models_dir/<org>_<name>."""
    spec, models_dir, webui_named = hub_style_v15
    inside_checkpoint = spec.model_dir / TOWER_HUB_ID
    shutil.copytree(tiny_checkpoints.clip, inside_checkpoint)
    assert llava_vision.find_tower_source(spec, models_dir=models_dir).config_dir == inside_checkpoint
    override = llava_vision.find_tower_source(spec, override=str(tiny_checkpoints.clip_full), models_dir=models_dir)
    assert override.config_dir == tiny_checkpoints.clip_full


def test_override_wins_over_a_valid_mm_vision_tower(tiny_checkpoints):
    spec = read_llava_spec(tiny_checkpoints.v15)
    source = llava_vision.find_tower_source(spec, override=str(tiny_checkpoints.clip_full))
    assert source.config_dir == tiny_checkpoints.clip_full


def test_whole_clip_model_layout_gives_the_same_embeddings(tiny_checkpoints):
    spec = read_llava_spec(tiny_checkpoints.v15)
    source = llava_vision.find_tower_source(spec, override=str(tiny_checkpoints.clip_full))
    assert source.vision_config["model_type"] == "clip_vision_model"
    assert source.vision_config["hidden_size"] == tiny_checkpoints.vision_hidden_size
    from dataclasses import replace

    standalone = LlavaPipeline.load(tiny_checkpoints.v15, CPU)
    whole = LlavaPipeline.load(tiny_checkpoints.v15, replace(CPU, vision_tower=str(tiny_checkpoints.clip_full)))
    pixels = torch.rand(2, 3, tiny_checkpoints.image_size, tiny_checkpoints.image_size, generator=torch.Generator().manual_seed(5))
    assert torch.equal(standalone.encode_pixels(pixels), whole.encode_pixels(pixels))


def test_missing_tower_offline_says_what_to_download_and_where(hub_style_v15, offline_empty_hub):
    spec, models_dir, webui_named = hub_style_v15
    shutil.rmtree(webui_named)
    with pytest.raises(CheckpointError) as caught:
        llava_vision.find_tower_source(spec, models_dir=models_dir)
    message = str(caught.value)
    assert f"huggingface-cli download {TOWER_HUB_ID}" in message
    assert str(webui_named) in message
    assert not list(offline_empty_hub.rglob("*.safetensors"))  # and nothing was fetched


# ---------------------------------------------------------------------------------------------------------
# Widths that do not fit together


@pytest.fixture(scope="module")
def wider_tower(tmp_path_factory, tiny_checkpoints) -> Path:
    """A standalone CLIP tower of hidden size 48 (the tiny projector expects 32)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("towers") / "clip48"
    config = CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=tiny_checkpoints.image_size, patch_size=tiny_checkpoints.patch_size)
    CLIPVisionModel(config).save_pretrained(folder)
    shutil.copy(tiny_checkpoints.clip / "preprocessor_config.json", folder)
    return folder


def test_projector_input_width_must_match_the_tower(tiny_checkpoints, wider_tower, tmp_path):
    from dataclasses import replace

    with pytest.raises(CheckpointError, match=r"projector input width 32 .* vision tower's feature width 48"):
        LlavaPipeline.load(tiny_checkpoints.v15, replace(CPU, vision_tower=str(wider_tower)))
    pointed = copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15_wide", mm_vision_tower=str(wider_tower))
    with pytest.raises(CheckpointError, match=r"projector input width 32 .* vision tower"):
        LlavaPipeline.load(pointed, CPU)


@pytest.mark.parametrize("fmt", ["v15", "hf"])
def test_projector_output_width_must_match_the_language_model(fmt, tiny_checkpoints):
    with pytest.raises(CheckpointError, match=r"projector output width 64 .* language model's embedding width 128"):
        LlavaPipeline.load(getattr(tiny_checkpoints, fmt), CPU, lm_hidden_size=128)


def test_corrupt_projector_shape_is_refused(tiny_checkpoints, tmp_path):
    folder = copy_checkpoint(tiny_checkpoints.v15, tmp_path / "v15_bad_projector")

    def corrupt(state):
        state["model.mm_projector.0.weight"] = torch.zeros(48, tiny_checkpoints.vision_hidden_size)
        state["model.mm_projector.0.bias"] = torch.zeros(48)
        return {"pytorch_model-00001-of-00001.bin": state}

    rewrite_bin_shards(folder, corrupt)
    with pytest.raises(CheckpointError, match=r"projector tensors .* do not fit mlp2x_gelu"):
        LlavaPipeline.load(folder, CPU)


# ---------------------------------------------------------------------------------------------------------
# Pickles that are not plain tensors


def _leave_a_mark(path: str) -> int:
    Path(path).write_text("code ran")
    return 0


class _CodeOnUnpickle:
    """Unpickling this calls `_leave_a_mark`: stands for any payload in a malicious `.bin`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_a_mark, (self.marker,))


def test_bin_with_a_non_tensor_pickle_is_refused_without_running_it(tiny_checkpoints, tmp_path):
    folder = copy_checkpoint(tiny_checkpoints.v0, tmp_path / "v0_payload")
    marker = tmp_path / "marker.txt"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["model.mm_projector.bias"] = _CodeOnUnpickle(marker)
    torch.save(state, folder / "pytorch_model.bin")

    for load in (lambda: WeightFiles(folder), lambda: LlavaPipeline.load(folder, CPU),
                 lambda: load_language_model(folder)):
        with pytest.raises(CheckpointError, match=r"pickled objects other than tensors .*_leave_a_mark"):
            load()
        assert not marker.exists()
    # The payload is live: a plain unpickler runs it (so the assertion above could fail).
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "code ran"


# ---------------------------------------------------------------------------------------------------------
# Vision tower truncation


@pytest.fixture(scope="module")
def full_tower(tiny_checkpoints):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(str(tiny_checkpoints.clip), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pixels(tiny_checkpoints) -> torch.Tensor:
    size = tiny_checkpoints.image_size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(11))


def _truncated_tower(tiny, layers, keep_cls) -> llava_vision.VisionTower:
    tower = llava_vision.VisionTower(llava_checkpoint.read_raw_config(tiny.clip), layers, keep_cls)
    tower.load_weights(WeightFiles(tiny.clip).read_prefix("vision_model."), str(tiny.clip))
    return tower.eval()


def test_pipeline_tower_keeps_only_the_needed_layers(tiny_checkpoints, full_tower, pixels):
    pipeline = LlavaPipeline.load(tiny_checkpoints.v15, CPU)
    tower = pipeline.tower
    assert len(tower.encoder.layers) == 2  # layer -2 of 3
    assert not [k for k in tower.state_dict() if k.startswith("encoder.layers.2.") or "post_layernorm" in k]
    with torch.no_grad():
        expected = full_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(pixels), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layers, keep_cls, depth", [
    ((-2,), False, 2), ((-1,), False, 3), ((0,), False, 0), ((1,), True, 1),
    ((-2, -1), False, 3), ((-3, -1), True, 3), ((-2,), True, 2),
])
def test_truncated_tower_features_equal_full_tower_hidden_states(layers, keep_cls, depth, tiny_checkpoints, full_tower, pixels):
    tower = _truncated_tower(tiny_checkpoints, layers, keep_cls)
    assert len(tower.encoder.layers) == depth
    with torch.no_grad():
        hidden_states = full_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        expected = torch.cat([hidden_states[layer] for layer in layers], dim=-1)
        if not keep_cls:
            expected = expected[:, 1:]
        features = tower(pixels)
    patches = (tiny_checkpoints.image_size // tiny_checkpoints.patch_size) ** 2
    assert features.shape == (2, patches + keep_cls, tiny_checkpoints.vision_hidden_size * len(layers))
    assert tower.feature_size == features.shape[-1] and tower.tokens_per_image == features.shape[1]
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)


def test_full_strategy_pipeline_keeps_cls(tiny_checkpoints, tmp_path, full_tower, pixels):
    folder = copy_checkpoint(tiny_checkpoints.hf, tmp_path / "hf_full", vision_feature_select_strategy="full")
    pipeline = LlavaPipeline.load(folder, CPU)
    assert pipeline.tokens_per_image == tiny_checkpoints.tokens_per_image + 1
    with torch.no_grad():
        expected = full_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(pipeline.tower(pixels), expected, atol=1e-6, rtol=0)
    assert pipeline.encode_pixels(pixels).shape == (2, tiny_checkpoints.tokens_per_image + 1, 64)


def test_out_of_range_feature_layer_is_refused(tiny_checkpoints):
    with pytest.raises(CheckpointError, match=r"vision feature layer -5 is out of range for a tower with 3 layers"):
        _truncated_tower(tiny_checkpoints, (-5,), False)
