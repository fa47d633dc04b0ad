"""Sanity checks of the tiny LLaVA checkpoint factory (tests/tiny_llava.py) against the format spec.

Key conversions are re-derived here independently from llava-formats.md §5.1 (the substring rules of
the transformers conversion script), not taken from the factory, so a wrong key in any format fails.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import tiny_llava

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"

# llava-formats.md §5.1: transformers' KEYS_TO_MODIFY_MAPPING, applied in order as substring replaces.
ORIGINAL_TO_HF_RULES = (
    ("model.vision_tower.", ""),
    (".vision_resampler", ""),
    ("model.mm_projector", "multi_modal_projector"),
    ("model", "model.model"),
    ("vision_model.model", "vision_model"),
    ("lm_head", "language_model.lm_head"),
    ("model.model", "language_model.model"),
    ("multi_modal_projector.0", "multi_modal_projector.linear_1"),
    ("multi_modal_projector.2", "multi_modal_projector.linear_2"),
)

LLAMA_LAYER_KEYS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)


def original_key_to_hf(key: str) -> str:
    for old, new in ORIGINAL_TO_HF_RULES:
        key = key.replace(old, new)
    return key


def expected_original_llm_keys() -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in range(tiny_llava.TEXT_LAYERS):
        keys |= {f"model.layers.{layer}.{name}" for name in LLAMA_LAYER_KEYS}
    return keys


def load_original_state_dict(directory) -> dict[str, torch.Tensor]:
    index_path = directory / "pytorch_model.bin.index.json"
    if not index_path.exists():
        return torch.load(directory / "pytorch_model.bin", weights_only=True, map_location="cpu")
    weight_map = json.loads(index_path.read_text())["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_state = torch.load(directory / shard, weights_only=True, map_location="cpu")
        assert {key for key, name in weight_map.items() if name == shard} == set(shard_state)
        state.update(shard_state)
    return state


def load_llava(directory):
    from transformers import LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(directory, output_loading_info=True)
    return model.eval(), info


def processor_inputs(directory, image, prompt=PROMPT):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    return processor(images=image, text=prompt, return_tensors="pt")


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    return load_llava(tiny_checkpoints.hf)[0]


@pytest.mark.parametrize("name", ["hf", "hf5", "hf_linear_reference"])
def test_llava_hf_dirs_load_without_missing_or_unexpected_keys(tiny_checkpoints, name):
    model, info = load_llava(getattr(tiny_checkpoints, name))
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert model.config.text_config.vocab_size == tiny_checkpoints.padded_vocab
    assert model.config.image_token_id == tiny_checkpoints.image_token_id
    assert model.get_input_embeddings().weight.shape == (tiny_checkpoints.padded_vocab,
                                                         tiny_checkpoints.text_hidden_size)


def test_hf_hf5_and_in_memory_model_give_identical_logits(tiny_checkpoints, hf_model):
    in_memory = tiny_llava.build_tiny_llava(tiny_checkpoints.base_vocab, tiny_checkpoints.seed)
    hf5_model = load_llava(tiny_checkpoints.hf5)[0]
    inputs = processor_inputs(tiny_checkpoints.hf, tiny_llava.make_test_image(80, 50, seed=1))
    with torch.no_grad():
        expected = in_memory(**inputs).logits
        assert torch.equal(hf_model(**inputs).logits, expected)
        assert torch.equal(hf5_model(**inputs).logits, expected)
    # The hf5 files keep 5.6's fresh-model quirk (§3.2): tower keys without `vision_model.`.
    hf5_keys = json.loads((tiny_checkpoints.hf5 / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(key.startswith("vision_tower.embeddings.") for key in hf5_keys)
    assert len(set(hf5_keys.values())) > 1


def test_hf_safetensors_use_transformers_4_key_layout(tiny_checkpoints):
    keys = set(load_file(tiny_checkpoints.hf / "model.safetensors"))
    prefixes = {key.split(".")[0] + "." + key.split(".")[1] for key in keys}
    assert prefixes == {"language_model.model", "language_model.lm_head", "vision_tower.vision_model",
                        "multi_modal_projector.linear_1", "multi_modal_projector.linear_2"}
    assert not (tiny_checkpoints.hf / "model.safetensors.index.json").exists()


def test_v15_state_dict_maps_exactly_onto_hf_weights(tiny_checkpoints):
    original = load_original_state_dict(tiny_checkpoints.v15)
    tower_prefix = "model.vision_tower.vision_tower.vision_model."
    projector = {f"model.mm_projector.{index}.{kind}" for index in (0, 2) for kind in ("weight", "bias")}
    tower = {key for key in original if key.startswith(tower_prefix)}
    assert set(original) == expected_original_llm_keys() | projector | tower
    assert len(tower) == 5 + 16 * tiny_llava.VISION_LAYERS + 2

    hf = load_file(tiny_checkpoints.hf / "model.safetensors")
    converted = {original_key_to_hf(key): tensor for key, tensor in original.items()}
    assert set(converted) == set(hf)
    vocab = tiny_checkpoints.base_vocab
    for key, tensor in converted.items():
        expected = hf[key]
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert tensor.shape[0] == vocab
            expected = expected[:vocab]
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected), key

    # Like a real 4.37 save after load_model(): the whole tower sits in one shard.
    weight_map = json.loads((tiny_checkpoints.v15 / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert len({weight_map[key] for key in tower}) == 1
    assert len(set(weight_map.values())) == 2


def test_v0_state_dict_maps_onto_the_linear_reference(tiny_checkpoints):
    original = load_original_state_dict(tiny_checkpoints.v0)
    assert set(original) == expected_original_llm_keys() | {"model.mm_projector.weight", "model.mm_projector.bias"}
    reference = load_file(tiny_checkpoints.hf_linear_reference / "model.safetensors")
    vocab = tiny_checkpoints.v0_vocab
    for key, tensor in original.items():
        # §5.1 has no official name for the v0 linear projector; it is the reference's linear_1.
        hf_key = original_key_to_hf(key).replace("multi_modal_projector.", "multi_modal_projector.linear_1.")
        expected = reference[hf_key]
        if hf_key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert tensor.shape[0] == vocab
            expected = expected[:vocab]
        assert torch.equal(tensor, expected), key
    hidden = tiny_checkpoints.text_hidden_size
    assert torch.equal(reference["multi_modal_projector.linear_2.weight"], torch.eye(hidden))
    assert torch.equal(reference["multi_modal_projector.linear_2.bias"], torch.zeros(hidden))
    # Everything except the projector equals the gelu model's weights.
    hf = load_file(tiny_checkpoints.hf / "model.safetensors")
    assert set(reference) == set(hf)
    for key in hf:
        if "multi_modal_projector.linear_2" not in key:
            assert torch.equal(reference[key], hf[key]), key


@pytest.mark.parametrize("name", ["v0", "v15"])
def test_original_configs_agree_with_their_weights(tiny_checkpoints, name):
    directory = getattr(tiny_checkpoints, name)
    config = json.loads((directory / "config.json").read_text())
    state = load_original_state_dict(directory)
    assert state["model.embed_tokens.weight"].shape == (config["vocab_size"], config["hidden_size"])
    assert state["lm_head.weight"].shape == (config["vocab_size"], config["hidden_size"])
    first_projector = "model.mm_projector.weight" if name == "v0" else "model.mm_projector.0.weight"
    assert state[first_projector].shape == (config["hidden_size"], config["mm_hidden_size"])
    assert config["mm_vision_tower"] == str(tiny_checkpoints.clip.resolve())
    assert config["mm_vision_select_layer"] == -2
    assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    if name == "v0":
        assert config["model_type"] == "llama"
        assert config["vocab_size"] == tiny_checkpoints.base_vocab + 3
        assert config["mm_use_im_start_end"] is True
        assert "mm_projector_type" not in config
    else:
        assert config["model_type"] == "llava"
        assert config["vocab_size"] == tiny_checkpoints.base_vocab
        assert (config["mm_projector_type"], config["image_aspect_ratio"]) == ("mlp2x_gelu", "pad")
        assert config["mm_use_im_start_end"] is False and config["mm_use_im_patch_token"] is False


@pytest.mark.parametrize("name", ["clip", "clip_full"])
def test_clip_dirs_hold_the_llava_vision_tower(tiny_checkpoints, hf_model, name):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    tower, info = CLIPVisionModel.from_pretrained(getattr(tiny_checkpoints, name), output_loading_info=True)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    if name == "clip":
        assert info["unexpected_keys"] == set()
    image_processor = CLIPImageProcessor.from_pretrained(getattr(tiny_checkpoints, name))
    assert image_processor.size.shortest_edge == tiny_checkpoints.image_size
    assert (image_processor.crop_size.height, image_processor.crop_size.width) == (tiny_checkpoints.image_size,) * 2
    assert image_processor.do_center_crop and image_processor.resample == 3
    assert tuple(image_processor.image_mean) == tiny_checkpoints.image_mean

    pixels = image_processor(tiny_llava.make_test_image(70, 40, seed=3), return_tensors="pt").pixel_values
    with torch.no_grad():
        layer = tower.eval()(pixels, output_hidden_states=True).hidden_states[tiny_checkpoints.vision_feature_layer]
        features = hf_model.model.get_image_features(pixel_values=pixels).pooler_output[0]
        projector = hf_model.model.multi_modal_projector
        assert torch.equal(projector(layer[:, 1:])[0], features)


def test_linear_reference_projects_with_the_v0_linear_layer(tiny_checkpoints, hf_model):
    reference = load_llava(tiny_checkpoints.hf_linear_reference)[0]
    v0_state = load_original_state_dict(tiny_checkpoints.v0)
    pixels = processor_inputs(tiny_checkpoints.hf, tiny_llava.make_test_image(56, 56, seed=4)).pixel_values
    with torch.no_grad():
        hidden = hf_model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = hidden @ v0_state["model.mm_projector.weight"].T + v0_state["model.mm_projector.bias"]
        actual = reference.model.get_image_features(pixel_values=pixels).pooler_output[0]
        gelu_features = hf_model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    torch.testing.assert_close(actual, expected[0], rtol=1e-5, atol=1e-5)
    assert (actual - gelu_features).abs().max() > 0.1


def test_tokenizers_load_with_bos_and_format_specific_added_tokens(tiny_checkpoints):
    from transformers import AutoTokenizer

    vocab = tiny_checkpoints.base_vocab
    expected_added = {
        "v15": {},
        "v0": {"<im_patch>": vocab, "<im_start>": vocab + 1, "<im_end>": vocab + 2},
        "hf_linear_reference": {"<im_patch>": vocab, "<im_start>": vocab + 1, "<im_end>": vocab + 2},
        "hf": {"<image>": vocab, "<pad>": vocab + 1},
        "hf5": {"<image>": vocab, "<pad>": vocab + 1},
    }
    for name, added in expected_added.items():
        tokenizer = AutoTokenizer.from_pretrained(getattr(tiny_checkpoints, name))
        assert len(tokenizer) == vocab + len(added), name
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
        ids = tokenizer(PROMPT).input_ids
        assert ids[0] == tiny_checkpoints.bos_id and ids.count(tiny_checkpoints.bos_id) == 1, name
        for token, token_id in added.items():
            assert tokenizer.convert_tokens_to_ids(token) == token_id
            assert tokenizer.encode(token, add_special_tokens=False) == [token_id], (name, token)
        if "<image>" in added:
            assert ids.count(tiny_checkpoints.image_token_id) == 1
            assert tokenizer.pad_token_id == tiny_checkpoints.hf_pad_id
        else:
            assert max(ids) < vocab, name  # "<image>" is plain text: several ordinary pieces
        text = "Human: What is in the picture? 42 cats, 3 dogs.\nAssistant: a red bus"
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_saved_tokenizer_json_matches_what_transformers_rebuilds(tiny_checkpoints):
    """transformers' LlamaTokenizer rebuilds the pipeline from vocab+merges; both must agree."""
    from transformers import AutoTokenizer

    texts = [
        PROMPT, "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nHi",
        "  two  spaces, tabs\tand\nnew lines\n\n", "Zebra 2024: 12 + 7 = 19?!", "<im_start><im_patch><im_end>",
        "###Human: What color is the car?\n###Assistant:", "unseen ünïcödé ✓ text",
    ]
    for name in ("v0", "v15", "hf"):
        directory = getattr(tiny_checkpoints, name)
        raw = Tokenizer.from_file(str(directory / "tokenizer.json"))
        loaded = AutoTokenizer.from_pretrained(directory)
        for text in texts:
            assert loaded(text).input_ids == raw.encode(text).ids, (name, text)
    # Training split more finely than the saved pipeline; no merge may cross those boundaries.
    trained_split = Tokenizer.from_file(str(tiny_checkpoints.v15 / "tokenizer.json"))
    trained_split.pre_tokenizer = tiny_llava.training_pre_tokenizer()
    saved = Tokenizer.from_file(str(tiny_checkpoints.v15 / "tokenizer.json"))
    for text in texts:
        assert trained_split.encode(text).ids == saved.encode(text).ids, text
    # Llama-like pieces: punctuation and the lone "▁" are separate tokens, "\n" is byte token 13.
    encoding = saved.encode("USER: <image>\nWhat")
    assert encoding.tokens == ["<s>", "▁USER", ":", "▁", "<", "image", ">", "<0x0A>", "What"]
    assert encoding.ids[7] == 13


@pytest.mark.parametrize("name", ["hf", "hf5"])
def test_processor_expands_image_token_and_chat_template_matches_llava_15_hf(tiny_checkpoints, name):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(getattr(tiny_checkpoints, name))
    one_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert processor.apply_chat_template(one_turn, add_generation_prompt=True) == PROMPT
    multi_turn = [
        {"role": "system", "content": [{"type": "text", "text": "SYS."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    assert (processor.apply_chat_template(multi_turn, add_generation_prompt=True)
            == "SYS. USER: <image>\nHi ASSISTANT: Hello. USER: Again ASSISTANT:")

    inputs = processor(images=tiny_llava.make_test_image(90, 37, seed=5), text=PROMPT, return_tensors="pt")
    size = tiny_checkpoints.image_size
    assert inputs.pixel_values.shape == (1, 3, size, size)
    assert (inputs.input_ids == tiny_checkpoints.image_token_id).sum() == tiny_checkpoints.tokens_per_image
    text_only = processor.tokenizer(PROMPT).input_ids
    assert inputs.input_ids.shape[1] == len(text_only) - 1 + tiny_checkpoints.tokens_per_image


def test_tiny_model_depends_on_the_image_and_decodes_varied_tokens(tiny_checkpoints, hf_model):
    first = processor_inputs(tiny_checkpoints.hf, tiny_llava.make_test_image(80, 50, seed=1))
    second = processor_inputs(tiny_checkpoints.hf, tiny_llava.make_test_image(80, 50, seed=2))
    with torch.no_grad():
        difference = (hf_model(**first).logits - hf_model(**second).logits)[0, -1].abs().max()
        generated = hf_model.generate(**first, max_new_tokens=20, do_sample=False,
                                      suppress_tokens=list(range(tiny_checkpoints.base_vocab,
                                                                 tiny_checkpoints.padded_vocab)))
    assert difference > 1e-2
    new_tokens = generated[0, first.input_ids.shape[1]:].tolist()
    assert len(new_tokens) == 20 or new_tokens[-1] == tiny_checkpoints.eos_id
    assert len(set(new_tokens)) >= 5, new_tokens


def test_same_seed_gives_identical_files_and_another_seed_differs(tiny_checkpoints, tmp_path):
    again = tiny_llava.write_tiny_checkpoints(tmp_path / "again", seed=tiny_checkpoints.seed)
    other = tiny_llava.write_tiny_checkpoints(tmp_path / "other", seed=tiny_checkpoints.seed + 1)
    for relative in ("hf/model.safetensors", "clip/model.safetensors", "hf/tokenizer.json", "hf/config.json"):
        assert (again.root / relative).read_bytes() == (tiny_checkpoints.root / relative).read_bytes(), relative
    assert (other.root / "hf/model.safetensors").read_bytes() != (again.root / "hf/model.safetensors").read_bytes()
    first = load_original_state_dict(again.v15)
    reference = load_original_state_dict(tiny_checkpoints.v15)
    assert all(torch.equal(first[key], reference[key]) for key in reference)
