"""The family registry (llava_family) and the token layout of one image (llava_prompt.SlotLayout)."""

from __future__ import annotations

import pytest

import llava_family
from llava_checkpoint import read_llava_spec
from llava_prompt import ImageSpan, SlotLayout, TokenizedPrompt, TokenRun, truncate_left


# ---------------------------------------------------------------------------------------------------------
# SlotLayout: pure logic


def pixtral_like(rows: int, columns: int) -> SlotLayout:
    runs = []
    for row in range(rows):
        runs.append(TokenRun("[IMG]", columns, image=True))
        runs.append(TokenRun("[IMG_END]" if row == rows - 1 else "[IMG_BREAK]", 1))
    return SlotLayout(tuple(runs))


def test_llava_layout_is_one_image_run():
    layout = SlotLayout.image_tokens("<image>", 576)
    assert (layout.positions, layout.feature_rows) == (576, 576)
    assert layout.feature_span() == (0, 576, ((0, 576),))
    assert layout.text() == "<image>" * 576


def test_rows_with_breaks():
    layout = pixtral_like(2, 3)
    assert layout.text() == "[IMG][IMG][IMG][IMG_BREAK][IMG][IMG][IMG][IMG_END]"
    assert (layout.positions, layout.feature_rows) == (8, 6)
    # The span runs from the first [IMG] to the last one; [IMG_END] is outside it, [IMG_BREAK] inside.
    assert layout.feature_span() == (0, 7, ((0, 3), (4, 3)))


def test_framed_layout_starts_its_span_after_the_frame():
    layout = SlotLayout((TokenRun("<im_start>", 1), TokenRun("<im_patch>", 4, True), TokenRun("<im_end>", 1)))
    assert layout.feature_span() == (1, 4, ((0, 4),))
    assert layout.positions == 6


def test_layout_without_image_positions():
    assert SlotLayout((TokenRun("<x>", 2),)).feature_span() == (0, 0, ())
    with pytest.raises(ValueError):
        TokenRun("<image>", -1, True)


def test_span_feature_rows_and_truncation_keep_runs():
    span = ImageSpan(5, 7, 0, ((0, 3), (4, 3)))
    assert span.feature_rows == 6 and span.runs == ((0, 3), (4, 3))
    assert ImageSpan(5, 7, 0).feature_rows == 7
    prompt = TokenizedPrompt(list(range(20)), [span])
    kept = truncate_left(prompt, 16)
    assert kept.image_spans == [ImageSpan(1, 7, 0, ((0, 3), (4, 3)))]
    # A cut inside the rows drops the image whole, breaks included.
    assert truncate_left(prompt, 12).image_spans == [] and truncate_left(prompt, 12).dropped_images == [0]


# ---------------------------------------------------------------------------------------------------------
# The registry


@pytest.mark.parametrize("name, family", [
    ("hf", "llava"), ("hf5", "llava"), ("v15", "llava"), ("v0", "llava"),
])
def test_fixture_families(name, family, tiny_checkpoints):
    assert read_llava_spec(getattr(tiny_checkpoints, name)).family == family


@pytest.mark.parametrize("name, family", [
    ("next_hf", "llava_next"), ("next_hf5", "llava_next"), ("next_orig", "llava_next"),
    ("next_orig_mistral", "llava_next"), ("bakllava", "llava"), ("qwen_siglip", "llava"), ("multilayer", "llava"),
])
def test_next_and_variant_fixture_families(name, family, tiny_next_checkpoints):
    assert read_llava_spec(getattr(tiny_next_checkpoints, name)).family == family


def test_family_for_config_by_model_type_and_vision_type():
    find = llava_family.family_for_config
    assert find({"model_type": "llava", "text_config": {}, "vision_config": {}}).name == "llava"
    assert find({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}}).name == "llava"
    assert find({"model_type": "llava_next", "text_config": {}}).name == "llava_next"
    assert find({"model_type": "llama", "text_config": {}}) is None
    # An unknown tower type keeps the model type's first family; its tower then refuses the type by name.
    unknown = find({"model_type": "llava", "vision_config": {"model_type": "dinov2"}})
    assert unknown.name == "llava"
    with pytest.raises(ValueError, match="unsupported vision tower type 'dinov2'"):
        unknown.tower_class("dinov2")({"model_type": "dinov2", "num_hidden_layers": 2}, (-1,), False)


def test_register_refuses_a_second_claim_on_the_same_types():
    existing = llava_family.FAMILIES["llava"]
    clash = llava_family.Family(
        name="clash", model_type="llava", vision_types=("clip_vision_model",), reference_class="X",
        config_class="LlavaConfig", plan=existing.plan)
    with pytest.raises(ValueError, match="claimed by llava and clash"):
        llava_family.register(clash)
    assert "clash" not in llava_family.FAMILIES
    with pytest.raises(ValueError, match="registered twice"):
        llava_family.register(existing)


@pytest.mark.parametrize("name, family", [("vipllava", "vipllava"), ("pixtral", "pixtral"), ("mistral3", "mistral3")])
def test_new_family_fixture_families(name, family, tiny_family_checkpoints):
    spec = read_llava_spec(getattr(tiny_family_checkpoints, name))
    assert spec.family == family and spec.format == "hf"


def test_every_family_names_real_transformers_classes():
    import transformers

    for family in llava_family.FAMILIES.values():
        assert hasattr(transformers, family.reference_class), family.name
        config_class = getattr(transformers, family.config_class)
        assert config_class.model_type == family.model_type, family.name


def test_every_module_that_logs_is_routed_to_webuis_log():
    """script.py hands the records of each pipeline module's logger to webui's handlers; a new module (such
    as a family's) must be on that list, or its log lines vanish inside webui."""
    import ast

    from conftest import EXTENSION_DIR

    tree = ast.parse((EXTENSION_DIR / "script.py").read_text(encoding="utf-8"))
    routed = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", None) == "PIPELINE_LOGGERS")
    logging_modules = {path.stem for path in EXTENSION_DIR.glob("llava_*.py")
                       if "logging.getLogger(__name__)" in path.read_text(encoding="utf-8")}
    assert logging_modules and logging_modules <= set(routed), sorted(logging_modules - set(routed))
