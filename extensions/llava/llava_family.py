"""Checkpoint families: what differs between the LLaVA-architecture checkpoints, in one registry.

Design
------
Every checkpoint this extension reads is the LLaVA architecture: an image becomes pixels, a vision tower
turns them into patch features, the selected layer(s) go through a projector into the language model's
embedding width, and those rows replace the image's positions in the prompt's input embeddings (plain
causal mask, ordinary positions). A *family* is one way of filling in these steps. Each family is one
frozen :class:`Family` registered in :data:`FAMILIES` (bottom of this file); the pipeline
(``llava_pipeline``), the loader (``llava_checkpoint``) and webui's hooks (``script.py``) never ask which
family they run, they ask the descriptor.

A family says:

=================  ==========================================================================================
configs            ``model_type`` of ``config.json`` plus the ``model_type`` of its ``vision_config``
                   (``("llava", "pixtral")`` is Pixtral in llava-hf form, ``("llava", "clip_vision_model")``
                   LLaVA-1.5). Original LLaVA configs (flat, ``mm_*`` fields) are ``llava`` / ``llava_next``.
tower              chosen by the vision ``model_type`` from :data:`TOWERS` (CLIP, SigLIP, Pixtral); every tower
                   runs only up to the deepest selected layer.
feature selection  the config key listing the layer(s) and its default; what happens to the CLS row.
projector          a module class: ``Class.load(spec, weights, tower=..., lm_hidden_size=...)`` builds it
                   (CPU, float32, strict, widths checked); ``module(features [B, n, C], grid) -> [B, n', H_lm]``.
image plan         ``plan(PlanContext) -> ImagePlan`` (``llava_plan``): per checkpoint, the pixels of an image,
                   the packing of its projected features, and the token layout of its slot in the prompt.
text side          the transformers config class that webui's loader must route to the text-only language
                   model, the default text ``model_type``, the separator between an image and the text after it,
                   and text-config fields that make that model's logits the reference's (``text_overrides``).
=================  ==========================================================================================

Token layout. As the transformers processors do, one image expands to a replacement text:
``SlotLayout`` runs of single tokens (``llava_prompt``): LLaVA ``<image>`` x 576; Pixtral rows of
``[IMG]`` x cols + ``[IMG_BREAK]``, the last row ending ``[IMG_END]``; Aya Vision's tile labels are runs of
ordinary text (``TokenRun.ids``). An image's layout may depend on how many images its prompt holds
(LLaVA-OneVision tiles an image only when it is alone: ``ImagePlan.for_prompt``). The prompt is tokenized once with
each run spelled once and the ids expanded (``LlavaPipeline._tokenize_inline``), and the image's feature
rows fill the positions of its ``image`` runs in order; the other tokens of the slot are ordinary
embedded tokens. The count of feature rows must equal the count of image positions: the splice checks it
and names both numbers. webui's truncation (``custom_tokenized_length``) and the panel's per-image cost
use the same layouts, from the image size alone.

Adding a family is local: one ``register(Family(...))`` below, plus, only where the family is new in that
respect, a tower class (``TOWERS``), a projector class and an image-plan class in a module of its own.
Worked examples of each hook, with shapes, are in the docstrings of :class:`Family`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import llava_aya
import llava_next
import llava_onevision
import llava_pixtral
import llava_plan
import llava_vision
from llava_checkpoint import CheckpointError, LlavaSpec


@dataclass(frozen=True)
class Family:
    """One checkpoint family. Worked examples (tiny shapes: tower width C, LM width H):

    ``config_fields(config) -> dict``: extra :class:`LlavaSpec` fields read from ``config.json``, raising
    :class:`CheckpointError` for values the family cannot run. LLaVA-NeXT:
    ``{"anyres": True, "grid_pinpoints": ((336, 672), ...), "patch_merge_type": "spatial_unpad"}``.

    ``projector``: VipLLaVA's ``VipLlavaProjector.load(spec, weights, tower=tower, lm_hidden_size=4096)``
    reads ``multi_modal_projector.{projector_layernorm,linear_1,linear_2}.*``; then
    ``projector(features [1, 576, 5 * 1024], grid=(24, 24)) -> [1, 576, 4096]``. Mistral 3's projector
    uses ``grid``: ``projector([2, 32 * 44, 1024], grid=(32, 44)) -> [2, 16 * 22, 5120]`` (2x2 patch merge).

    ``plan(PlanContext) -> ImagePlan``: LLaVA-1.5's ``SquarePlan``: ``preprocess([640x480 image])`` ->
    ``[[1, 3, 336, 336]]``; ``pack([1, 576, H], (640, 480)) -> [576, H]``; ``layout((640, 480))`` ->
    ``SlotLayout((TokenRun("<image>", 576, image=True),))``. Pixtral's ``PixtralPlan`` for a 640x480 image
    at 16 px patches and a 1024 px longest edge: pixels ``[1, 3, 480, 640]``, 30 rows x 40 columns,
    ``pack([1, 1200, H]) -> [1200, H]``, layout ``[IMG] x 40, [IMG_BREAK], ... , [IMG] x 40, [IMG_END]``
    (1230 positions, 1200 of them feature rows).
    """

    name: str
    #: ``config.json`` ``model_type`` this family claims (several families may share one, told apart by
    #: their vision types).
    model_type: str
    #: Vision-config ``model_type`` values it accepts; the first is assumed when a config omits it (as the
    #: transformers config class does).
    vision_types: tuple[str, ...]
    #: The transformers class whose outputs ours must equal (tests, docs).
    reference_class: str
    #: The transformers config class of ``model_type``; webui's ``AutoModelForCausalLM`` is taught to
    #: return the text-only language model for it (``llava_checkpoint.register_with_transformers``).
    config_class: str
    plan: Callable[[llava_plan.PlanContext], llava_plan.ImagePlan]
    projector: type = llava_vision.Projector
    #: Name of the projector in logs and errors; ``"hf"`` is the llava-hf MLP (``linear_1, act, linear_2``).
    projector_kind: str = "hf"
    #: ``text_config.model_type`` when the config omits it (the transformers config class default).
    text_model_type: str = "llama"
    #: Config key holding the feature layer(s) (an int or a list), and its default.
    feature_layer_key: str = "vision_feature_layer"
    default_feature_layer: int | tuple[int, ...] = -2
    #: The CLS row: ``"strategy"`` (``vision_feature_select_strategy``: "default" drops it, "full" keeps
    #: it), ``"drop"`` (always dropped, VipLLaVA), ``"none"`` (the tower has none; everything is kept).
    cls_rule: str = "strategy"
    #: The image token's text when ``processor_config.json`` does not name it.
    image_token_text: str = "<image>"
    #: What the checkpoint's chat template writes between an image and the text that follows it in the
    #: same message; webui's chat path joins a message's image slots to its text with it
    #: (``llava_chat.place_slots``): ``"\n"`` for llava-hf templates (``<image>\n``), nothing after
    #: Pixtral's ``[IMG]`` or Aya Vision's ``<image>``.
    image_text_separator: str = "\n"
    config_fields: Callable[[dict], dict] = field(default=lambda config: {})
    #: Text-config fields the language model loaded alone must take so that its logits are the reference's
    #: (Aya Vision: ``Cohere2ForCausalLM`` multiplies by ``logit_scale``, the reference's ``lm_head`` does not).
    text_overrides: dict = field(default_factory=dict)

    def tower_class(self, vision_type: str | None) -> type:
        """The tower class for a vision ``model_type`` (unknown types get :class:`llava_vision.VisionTower`,
        which refuses them with the list of supported towers)."""
        return TOWERS.get(vision_type or self.vision_types[0], llava_vision.VisionTower)


#: Vision-config ``model_type`` -> tower class. A tower is built as ``Class(vision_config: dict, layers:
#: tuple[int, ...], keep_cls: bool)`` on the meta device, keeps only the layers up to the deepest selected
#: one, and provides: ``weight_probe`` (a key that locates its tensors in a checkpoint), ``reset_position_ids()``,
#: ``load_weights(tensors, source)`` (strict), ``image_size``, ``patch_size``, ``hidden_size``,
#: ``feature_size`` (= hidden_size x number of selected layers), ``positions``, ``tokens_per_image`` and
#: ``config.num_hidden_layers``. forward: ``pixels [B, 3, H, W] -> features [B, n, feature_size]``
#: (CLIP-L/336, layer -2, CLS dropped: ``[B, 3, 336, 336] -> [B, 576, 1024]``).
TOWERS: dict[str, type] = {
    "clip_vision_model": llava_vision.VisionTower,
    "siglip_vision_model": llava_vision.VisionTower,
    "pixtral": llava_pixtral.PixtralTower,
}

FAMILIES: dict[str, Family] = {}
_BY_TYPES: dict[tuple[str, str], Family] = {}


def register(family: Family) -> Family:
    """Add a family; its (model_type, vision type) pairs must not be claimed by another family."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice")
    if family.cls_rule not in ("strategy", "drop", "none"):
        raise ValueError(f"family {family.name!r}: cls_rule must be strategy, drop or none, got {family.cls_rule!r}")
    for vision_type in family.vision_types:
        claimed = _BY_TYPES.get((family.model_type, vision_type))
        if claimed is not None:
            raise ValueError(f"({family.model_type}, {vision_type}) is claimed by {claimed.name} and {family.name}")
    FAMILIES[family.name] = family
    for vision_type in family.vision_types:
        _BY_TYPES[(family.model_type, vision_type)] = family
    return family


def family_for_config(config: dict) -> Family | None:
    """The family of a transformers-layout ``config.json`` (one with ``text_config`` / ``vision_config``),
    or None when no family claims its ``model_type``. A known ``model_type`` with an unknown vision type
    gets that model type's first family, whose tower then refuses the vision type by name."""
    model_type = config.get("model_type")
    candidates = [family for family in FAMILIES.values() if family.model_type == model_type]
    if not candidates:
        return None
    vision_type = (config.get("vision_config") or {}).get("model_type") or candidates[0].vision_types[0]
    return _BY_TYPES.get((model_type, vision_type), candidates[0])


def family_of(spec: LlavaSpec) -> Family:
    return FAMILIES[spec.family]


def known_model_types() -> list[str]:
    return sorted({family.model_type for family in FAMILIES.values()})


# ----------------------------------------------------------------------------------------------------------
# The families


def _pixtral_llava_fields(config: dict) -> dict[str, Any]:
    # LlavaModel cuts the first row of "default" features whatever the tower; Pixtral has no CLS row, so
    # the reference itself would find one feature row fewer than [IMG] tokens.
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise CheckpointError(f"a Pixtral tower in llava form needs vision_feature_select_strategy 'full' "
                              f"(it has no CLS row), got {strategy!r}")
    return {}


def _llava_next_fields(config: dict) -> dict[str, Any]:
    if not config.get("use_image_newline_parameter", True):
        raise CheckpointError("llava_next checkpoints without image_newline (use_image_newline_parameter false) "
                              "are not supported")
    from llava_checkpoint import DEFAULT_GRID_PINPOINTS, _pinpoints

    return {"anyres": True, "patch_merge_type": "spatial_unpad",
            "grid_pinpoints": _pinpoints(config.get("image_grid_pinpoints", DEFAULT_GRID_PINPOINTS))}


register(Family(
    name="llava", model_type="llava", vision_types=("clip_vision_model", "siglip_vision_model"),
    reference_class="LlavaForConditionalGeneration", config_class="LlavaConfig",
    plan=llava_plan.SquarePlan.from_checkpoint,
))
register(Family(
    name="llava_next", model_type="llava_next", vision_types=("clip_vision_model", "siglip_vision_model"),
    reference_class="LlavaNextForConditionalGeneration", config_class="LlavaNextConfig",
    plan=llava_next.AnyresPlan.from_checkpoint, config_fields=_llava_next_fields,
))
register(Family(
    name="vipllava", model_type="vipllava", vision_types=("clip_vision_model",),
    reference_class="VipLlavaForConditionalGeneration", config_class="VipLlavaConfig",
    plan=llava_plan.SquarePlan.from_checkpoint, projector=llava_vision.VipLlavaProjector, projector_kind="vipllava",
    # VipLlavaConfig's default; the model always cuts the CLS row of every selected layer.
    feature_layer_key="vision_feature_layers", default_feature_layer=(-2, -5, -8, -11, 6), cls_rule="drop",
))
register(Family(
    name="pixtral", model_type="llava", vision_types=("pixtral",),
    reference_class="LlavaForConditionalGeneration", config_class="LlavaConfig",
    plan=llava_pixtral.PixtralPlan.from_checkpoint, text_model_type="mistral", default_feature_layer=-1,
    cls_rule="none", image_token_text=llava_pixtral.IMAGE_TOKEN, image_text_separator="",
    config_fields=_pixtral_llava_fields,
))
register(Family(
    name="mistral3", model_type="mistral3", vision_types=("pixtral",),
    reference_class="Mistral3ForConditionalGeneration", config_class="Mistral3Config",
    plan=llava_pixtral.PixtralPlan.from_checkpoint, projector=llava_pixtral.Mistral3Projector,
    projector_kind="mistral3", text_model_type="mistral", default_feature_layer=-1, cls_rule="none",
    image_token_text=llava_pixtral.IMAGE_TOKEN, image_text_separator="",
))
register(Family(
    name="llava_onevision", model_type="llava_onevision", vision_types=("siglip_vision_model", "clip_vision_model"),
    reference_class="LlavaOnevisionForConditionalGeneration", config_class="LlavaOnevisionConfig",
    plan=llava_onevision.OnevisionPlan.from_checkpoint, text_model_type="qwen2", default_feature_layer=-1,
    config_fields=llava_onevision.config_fields,
))
register(Family(
    name="aya_vision", model_type="aya_vision", vision_types=("siglip_vision_model",),
    reference_class="AyaVisionForConditionalGeneration", config_class="AyaVisionConfig",
    plan=llava_aya.AyaPlan.from_checkpoint, projector=llava_aya.AyaProjector, projector_kind="aya",
    text_model_type="cohere2", default_feature_layer=-1,
    # The chat template writes "<image>" straight before the text of the message.
    image_text_separator="",
    # 1.0 makes Cohere2ForCausalLM's `logits * logit_scale` the reference head's logits, bit for bit.
    text_overrides={"logit_scale": 1.0},
))
