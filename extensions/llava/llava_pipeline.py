"""LLaVA vision pipeline: image -> pixels -> vision tower -> projector -> embeddings spliced into a prompt.

Stages (one module each):

    llava_image_io    decode bytes / paths / data URLs into RGB PIL images, with limits
    llava_family      which tower, projector and image plan a checkpoint's family uses
    llava_plan        the family's image plan: PIL image -> pixels [tiles, 3, H, W] (bit-identical to the
                      reference PIL processors), features -> rows [N, H_lm], and the image's token layout
    llava_vision      pixels [B, 3, H, W] -> features [B, n, C] (truncated tower) -> [B, n', H_lm] (projector)
    llava_prompt      parts (text and image slots) -> token ids with image spans; truncation; templates
    this module       composes them: tokenize, encode (with a content-keyed cache), splice

The language model itself is loaded by webui or by ``llava_checkpoint.load_language_model``; the pipeline
only needs its tokenizer and its input-embedding layer. Importable without webui.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

import llava_family
import llava_image_io
import llava_vision
from llava_cache import EmbeddingCache
from llava_checkpoint import IM_END_TEXT, IM_PATCH_TEXT, IM_START_TEXT, CheckpointError, LlavaSpec, read_llava_spec, text_config_for
from llava_plan import ImagePlan, PlanContext
from llava_prompt import ImageRef, ImageSpan, Part, SlotLayout, TokenizedPrompt, truncate_left

logger = logging.getLogger(__name__)


class EncodingCancelled(RuntimeError):
    """The caller asked to stop (webui's Stop button) before the images were encoded."""


class LlavaInputError(ValueError):
    """Input that does not fit the prompt (image/marker count, tokenizer) with a message for the user."""


@dataclass(frozen=True)
class VisionSettings:
    """Device and precision of the vision part and its limits; webui's ``llava-*`` settings map onto these.

    ``*_bits``: "32", "16" (float16 on CUDA, bfloat16 on the CPU) or "bf16". ``*_device``: a torch device
    string, or None for ``cuda:0`` when CUDA is available, else ``cpu``.
    """

    clip_bits: str = "32"
    clip_device: str | None = None
    projector_bits: str = "32"
    projector_device: str | None = None
    vision_tower: str | None = None  # overrides the checkpoint's mm_vision_tower
    cache_mb: float = 256.0
    max_pixels: int = llava_image_io.DEFAULT_MAX_PIXELS
    exif_transpose: bool = False  # the references ignore EXIF orientation (llava-formats.md §1.10)
    # Replay a captured CUDA graph of the tower per input shape when it runs on CUDA: the same kernels as
    # the eager forward without the per-layer launch overhead that dominates batch-1 encodes.
    cuda_graphs: bool = True

    def __post_init__(self):
        for name in ("clip_bits", "projector_bits"):
            value = str(getattr(self, name)).lower()
            if value not in llava_vision.BITS_TO_DTYPE:
                raise ValueError(f"{name} must be one of 32, 16, bf16; got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.max_pixels is not None and self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "VisionSettings":
        """Build from a dict such as webui's ``params``; unknown keys are ignored, empty strings mean None."""
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                continue
            if isinstance(value, str) and value.strip().lower() in ("", "none", "auto"):
                value = None
            if value is None and key in ("clip_bits", "projector_bits", "cache_mb", "max_pixels", "exif_transpose",
                                         "cuda_graphs"):
                continue
            kwargs[key] = value
        return cls(**kwargs)


@dataclass
class PreparedInputs:
    """What ``generate`` needs: ``input_ids [1, T]`` (placeholder ids at image rows) and
    ``inputs_embeds [1, T, H]`` on the embedding layer's device and dtype, plus bookkeeping."""

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    prompt: TokenizedPrompt
    images_used: int
    dropped_images: list[int] = field(default_factory=list)


class LlavaPipeline:
    """The vision side of one LLaVA-architecture checkpoint, on its own devices and dtypes.

    ``plan`` (from the checkpoint's family, ``llava_family``) decides the pixels, the packing and the
    token layout of every image; the tower and projector turn pixels into projected features.
    """

    def __init__(
        self,
        spec: LlavaSpec,
        settings: VisionSettings,
        tower: torch.nn.Module,
        projector: torch.nn.Module,
        plan: ImagePlan,
    ):
        self.spec = spec
        self.family = llava_family.family_of(spec)
        self.settings = settings
        self.tower = tower
        self.projector = projector
        self.plan = plan
        self.cache = EmbeddingCache(int(settings.cache_mb * 1024 * 1024))

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        settings: VisionSettings | None = None,
        *,
        models_dir: str | os.PathLike | None = None,
        lm_hidden_size: int | None = None,
    ) -> "LlavaPipeline":
        """Load tower and projector of the checkpoint in ``model_dir`` (never the language model)."""
        settings = settings or VisionSettings()
        spec = read_llava_spec(model_dir)
        if spec is None:
            raise CheckpointError(f"{model_dir} is not a LLaVA checkpoint (no LLaVA fields in config.json)")
        family = llava_family.family_of(spec)
        if lm_hidden_size is None:
            lm_hidden_size = text_config_for(spec.model_dir, spec.raw_config).hidden_size
        source = llava_vision.find_tower_source(spec, settings.vision_tower, models_dir)
        tower_device = llava_vision.resolve_device(settings.clip_device)
        projector_device = llava_vision.resolve_device(settings.projector_device)
        tower, projector = llava_vision.load_vision_modules(
            spec,
            source,
            tower_class=family.tower_class(source.vision_config.get("model_type")),
            projector_class=family.projector,
            tower_device=tower_device,
            tower_dtype=llava_vision.resolve_dtype(settings.clip_bits, tower_device),
            projector_device=projector_device,
            projector_dtype=llava_vision.resolve_dtype(settings.projector_bits, projector_device),
            lm_hidden_size=lm_hidden_size,
        )
        plan = family.plan(PlanContext(spec, source, tower, projector))
        if settings.cuda_graphs and tower_device.type == "cuda" and plan.fixed_pixels:
            tower.enable_cuda_graphs()
        return cls(spec, settings, tower, projector, plan)

    def unload(self) -> None:
        """Release the modules and the cache (frees GPU memory when they live there)."""
        self.cache.clear()
        self.tower = None
        self.projector = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def describe(self) -> str:
        """One line for logs and the UI: model, devices, precision, tokens per image."""
        tower_param = next(self.tower.parameters())
        projector_params = list(self.projector.parameters())
        projector_where = (
            f"{projector_params[0].device} {str(projector_params[0].dtype).replace('torch.', '')}"
            if projector_params else "none"
        )
        return (
            f"{self.spec.model_dir.name} ({self.spec.format}): vision tower on {tower_param.device} "
            f"{str(tower_param.dtype).replace('torch.', '')}, projector on {projector_where}, "
            + self.plan.describe()
        )

    # The plan's parts, under the names tests and benchmarks used before plans existed.
    @property
    def preprocess_config(self):
        return getattr(self.plan, "preprocess_config", None)

    @property
    def geometry(self):
        return getattr(self.plan, "geometry", None)

    @property
    def image_newline(self):
        return getattr(self.plan, "image_newline", None)

    # ------------------------------------------------------------------------------------------ geometry

    @property
    def tokens_per_image(self) -> int:
        """Feature rows of one image of the tower's size (LLaVA-1.5: (image_size / patch_size)², +1 when CLS
        is kept, +1 for the newline of a single-tile image under ``spatial_unpad``). Counts that vary with
        the image size: :meth:`image_tokens`."""
        return self.plan.layout(self.plan.nominal_size).feature_rows

    def image_tokens(self, image_size: tuple[int, int] | None) -> int:
        """Feature rows for an image of ``(width, height)`` (the size is ignored by fixed-count plans)."""
        return self.layout(image_size).feature_rows

    def prompt_positions(self, image_size: tuple[int, int] | None = None) -> int:
        """Prompt positions one image takes, including the ordinary tokens of its slot (v0's
        ``<im_start>`` / ``<im_end>``, Pixtral's ``[IMG_BREAK]`` / ``[IMG_END]``)."""
        return self.layout(image_size).positions

    def layout(self, image_size: tuple[int, int] | None) -> SlotLayout:
        """The token layout of an image of ``(width, height)``, from its size alone."""
        if image_size is None:
            if not self.plan.fixed_tokens:
                raise ValueError(f"{self.family.name} token counts depend on the image size")
            image_size = self.plan.nominal_size
        return self.plan.layout(image_size)

    # ------------------------------------------------------------------------------------------ images

    def load_image(self, source, *, name: str):
        """Decode one image with this pipeline's limits and check that its family can lay it out (a
        Pixtral-family image cannot be thinner than one pixel once scaled to fit); raises
        ``llava_image_io.ImageError`` naming the image."""
        image = llava_image_io.load_image(
            source, name=name, max_pixels=self.settings.max_pixels, exif_transpose=self.settings.exif_transpose
        )
        try:
            self.layout(image.size)
        except ValueError as exc:
            raise llava_image_io.ImageError(name, str(exc)) from exc
        return image

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any], should_stop=None, keys: Sequence[Any] | None = None) -> list[torch.Tensor]:
        """RGB PIL images -> one ``[image_tokens(size), H_lm]`` tensor each, in the projector's dtype: on
        the CPU when cached, on the projector's device when encoded by this call.

        Images seen before come from the cache; the tower runs once, batched, for the rest. ``keys``, if
        given, are the cache keys (e.g. a hash of the encoded file), and ``images`` may then be zero-arg
        callables that decode the image: a cached image is never decoded again. Without keys the key is
        a digest of the pixels. Cache entries live on the CPU so that the cache holds no accelerator memory.
        ``should_stop()`` is polled before the tower runs; True raises :class:`EncodingCancelled`.
        """
        started = time.perf_counter()
        if keys is None:
            keys = [("pixels", llava_image_io.image_digest(image)) for image in images]
        else:
            keys = [("given", key) for key in keys]
        results: list[torch.Tensor | None] = [self.cache.get(key) for key in keys]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing and should_stop is not None and should_stop():
            raise EncodingCancelled("image encoding was stopped")
        images = list(images)
        for i in missing:
            if callable(images[i]):
                images[i] = images[i]()
        if missing and should_stop is not None and should_stop():  # decoding large images takes a while too
            raise EncodingCancelled("image encoding was stopped")
        if missing:
            fresh = [images[i] for i in missing]
            for index, embedding in zip(missing, self._encode_fresh(fresh)):
                results[index] = self._cache_fresh(keys[index], embedding)
        logger.info(
            "Encoded %d image(s) (%d from cache) in %.1f ms",
            len(images), len(images) - len(missing), (time.perf_counter() - started) * 1000,
        )
        return results  # type: ignore[return-value]

    def _encode_fresh(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """RGB images -> their ``[N_i, H_lm]`` rows: the plan's pixels, the tower and projector once per
        pixel shape (all tiles of all images together when the shapes are fixed), the plan's packing."""
        pixels = self.plan.preprocess(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, tiles in enumerate(pixels):
            by_shape.setdefault(tuple(tiles.shape[1:]), []).append(index)
        projected: list[torch.Tensor | None] = [None] * len(pixels)
        for members in by_shape.values():
            batch = pixels[members[0]] if len(members) == 1 else torch.cat([pixels[i] for i in members])
            features = self.encode_pixels(batch)
            offset = 0
            for index in members:
                projected[index] = features[offset:offset + pixels[index].shape[0]]
                offset += pixels[index].shape[0]
        return [self.plan.pack(rows, image.size) for rows, image in zip(projected, images)]

    def _cache_fresh(self, key, embedding: torch.Tensor) -> torch.Tensor:
        """Store a CPU copy of a new ``[N, H]`` embedding; return the tensor this request splices.

        A GPU embedding is spliced as it is (no round trip through host memory) and cached in pinned
        memory, from which later turns copy it back several times faster than from pageable memory."""
        if not embedding.is_cuda:
            copy = embedding.to("cpu", copy=True)
            self.cache.put(key, copy)
            return copy
        try:
            host = torch.empty(embedding.shape, dtype=embedding.dtype, pin_memory=True)
        except RuntimeError:  # pinning refused (e.g. a locked-memory limit): pageable memory still works
            host = torch.empty(embedding.shape, dtype=embedding.dtype)
        host.copy_(embedding)
        self.cache.put(key, host)
        return embedding

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels ``[B, 3, H, W]`` (one shape) -> projected features ``[B, n, H_lm]``: LLaVA-1.5
        ``n = (S / patch)²`` (+1 with CLS); a projector that merges patches (Mistral 3) returns fewer."""
        tower_param = next(self.tower.parameters())
        features = self.tower(pixels.to(tower_param.device))
        projector_params = list(self.projector.parameters())
        if projector_params:
            features = features.to(device=projector_params[0].device, dtype=projector_params[0].dtype)
        grid = (pixels.shape[-2] // self.tower.patch_size, pixels.shape[-1] // self.tower.patch_size)
        return self.projector(features, grid)

    # ------------------------------------------------------------------------------------------ prompt

    def placeholder_id(self, tokenizer) -> int:
        """The id written at image positions of ``input_ids``: a real vocabulary entry (its embedding
        row is overwritten), so embedding lookups, samplers and logits processors never see a sentinel."""
        if self.spec.format == "hf":
            return self.spec.image_token_id
        if self.spec.format == "v0":
            return _single_token_id(tokenizer, IM_PATCH_TEXT)
        # Original v1 checkpoints have no image token. The id must not be the pad, BOS or EOS id: callers
        # such as webui pass no attention mask, and generate() then masks every pad id in the prompt,
        # which would hide the image (LLaVA-1.5's pad token is <unk>, id 0).
        avoid = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
        avoid |= {self.spec.raw_config.get(key) for key in ("pad_token_id", "bos_token_id", "eos_token_id")}
        candidates = [tokenizer.unk_token_id, *range(len(tokenizer))]
        return next(int(c) for c in candidates if c is not None and c not in avoid)

    def reference_prompt(self, prompt: str, tokenizer) -> tuple[str, bool]:
        """``(text, add_bos)``: the prompt text to tokenize and whether a BOS id goes in front of it, as
        this checkpoint's reference tokenizes a prompt string (the same for every caller, whatever
        webui's "Add the bos_token" setting says).

        llava-hf, as ``processor.apply_chat_template(..., tokenize=True)``: a prompt that starts with the
        BOS text is tokenized as it is, without special tokens; any other gets what the tokenizer adds by
        itself (its BOS, or nothing). Original formats, as ``conv.get_prompt()`` + ``tokenizer_image_token``:
        the prompt has no BOS text and the tokenizer's own BOS comes once, in front. A BOS written as text
        (a webui instruction template) stands for that BOS: the text is removed and one BOS id goes in
        front, so that the first word tokenizes as the start of the prompt, as in the original (``▁A``, not
        ``A``, under ``legacy: false``).
        """
        bos_text = getattr(tokenizer, "bos_token", None) or ""
        starts_with_bos = bool(bos_text) and prompt.startswith(bos_text)
        if self.spec.format == "hf":
            return prompt, not starts_with_bos and tokenizer_adds_bos(tokenizer)
        if starts_with_bos:
            return prompt[len(bos_text):], tokenizer.bos_token_id is not None
        return prompt, tokenizer_adds_bos(tokenizer)

    def tokenize(
        self, parts: Sequence[Part], tokenizer, *, add_bos: bool, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> TokenizedPrompt:
        """Token ids for ``parts``, image ``i`` laid out as ``layout(image_sizes[i])`` (its family's slot).

        v1 (original): the text between images is tokenized chunk by chunk, like LLaVA's
        ``tokenizer_image_token`` (llava/mm_utils.py). v0 and the transformers layout: the prompt is
        tokenized once with each image spelled as its vocabulary tokens, as their references do; offsets
        tell our slots apart from the same token text typed by a user, which stays plain text and never
        becomes an image.
        """
        bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        if not self.plan.fixed_tokens and image_sizes is None:
            raise ValueError(f"{self.family.name} prompts need the image sizes to count image tokens")
        layouts = {}
        for part in parts:
            if isinstance(part, ImageRef):
                try:
                    layouts[part.index] = self.layout(image_sizes[part.index] if image_sizes is not None else None)
                except ValueError as exc:  # e.g. an image too thin for Pixtral's resize
                    raise LlavaInputError(f"image {part.index + 1}: {exc}") from exc
        if self.spec.tokenization == "chunks":
            return self._tokenize_chunks(parts, tokenizer, bos, {i: l.feature_rows for i, l in layouts.items()})
        return self._tokenize_inline(parts, tokenizer, bos, layouts)

    def _tokenize_chunks(self, parts, tokenizer, bos: list[int], counts: dict[int, int]) -> TokenizedPrompt:
        start_text, end_text = (IM_START_TEXT, IM_END_TEXT) if self.spec.use_im_start_end else ("", "")
        chunks, order, current = [], [], ""
        for part in parts:
            if isinstance(part, ImageRef):
                chunks.append(current + start_text)
                order.append(part.index)
                current = end_text
            else:
                current += part
        chunks.append(current)
        placeholder = self.placeholder_id(tokenizer)
        ids, spans = list(bos), []
        for index, chunk in enumerate(chunks):
            if index:
                n = counts[order[index - 1]]
                spans.append(ImageSpan(len(ids), n, order[index - 1]))
                ids.extend([placeholder] * n)
            if chunk:
                ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return TokenizedPrompt(ids, spans)

    def _tokenize_inline(self, parts, tokenizer, bos: list[int], layouts: dict[int, SlotLayout]) -> TokenizedPrompt:
        """One tokenizer call over the prompt with each image's slot spelled compactly (every run once:
        ``[IMG][IMG_BREAK][IMG][IMG_END]`` for 2 rows), then each run's id repeated ``count`` times.

        Spelling a run once instead of ``count`` times gives the same ids: the runs are single added
        tokens, which the tokenizer splits off before anything else, and the check below refuses a
        tokenizer that does not. The positions of the image runs become the image's span.
        """
        run_ids: dict[tuple[str, bool], int] = {}

        def run_id(text: str, image: bool) -> int:
            if (text, image) not in run_ids:
                # The image token's id is the config's (image_token_index); the tokenizer must agree.
                known = self.spec.image_token_id if image and self.spec.format == "hf" else None
                run_ids[(text, image)] = known if known is not None else _single_token_id(tokenizer, text)
            return run_ids[(text, image)]

        text, slots = "", []  # slots: (char_start, char_end, image_index, expected ids, layout)
        for part in parts:
            if isinstance(part, ImageRef):
                layout = layouts[part.index]
                runs = [run for run in layout.runs if run.count]
                slot_text = "".join(run.text for run in runs)
                expected = [run_id(run.text, run.image) for run in runs]
                slots.append((len(text), len(text) + len(slot_text), part.index, expected, runs))
                text += slot_text
            else:
                text += part
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        token_ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        ids, spans = list(bos), []
        position = 0
        for char_start, char_end, image_index, expected, runs in slots:
            while position < len(token_ids) and offsets[position][0] < char_start:
                ids.append(token_ids[position])
                position += 1
            slot_ids = []
            while position < len(token_ids) and offsets[position][1] <= char_end and offsets[position][0] >= char_start:
                slot_ids.append(token_ids[position])
                position += 1
            if slot_ids != expected:
                raise LlavaInputError(
                    f"the tokenizer does not turn {text[char_start:char_start + 40]!r} into the image token id(s) {expected[:3]}…; "
                    "is this the tokenizer that belongs to the LLaVA checkpoint?"
                )
            first, length, feature_runs = layouts[image_index].feature_span()
            if length:
                single_run = feature_runs == ((0, length),)
                spans.append(ImageSpan(len(ids) + first, length, image_index, None if single_run else feature_runs))
            for run, run_token in zip(runs, expected):
                ids.extend([run_token] * run.count)
        ids.extend(token_ids[position:])
        return TokenizedPrompt(ids, spans)

    # ------------------------------------------------------------------------------------------ splice

    @torch.no_grad()
    def embed(
        self, prompt: TokenizedPrompt, features: Sequence[torch.Tensor], embed_tokens: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed ``prompt.ids`` and overwrite image rows: -> ``input_ids [1, T]``, ``inputs_embeds [1, T, H]``.

        ``features[i]`` (``[N_i, H]``) fills the span of image ``i``. The one cast of image features to
        the embedding's device and dtype happens here.
        """
        weight = embed_tokens.weight
        input_ids = torch.tensor([prompt.ids], dtype=torch.long, device=weight.device)
        inputs_embeds = embed_tokens(input_ids)
        if len(prompt.image_spans) != len(features):
            raise LlavaInputError(
                f"image features and image slots do not match: {len(features)} image(s) for "
                f"{len(prompt.image_spans)} slot(s)"
            )
        if not prompt.image_spans:
            return input_ids, inputs_embeds
        for span, feature in zip(prompt.image_spans, features):
            if feature.shape[0] != span.feature_rows:
                raise LlavaInputError(
                    f"image {span.image_index + 1} has {feature.shape[0]} feature rows but its slot holds "
                    f"{span.feature_rows} image positions"
                )
        inputs_embeds = inputs_embeds.clone()
        for span, feature in zip(prompt.image_spans, features):
            # One copy per run of image positions (one per image for LLaVA, one per row for Pixtral)
            # straight from the cache's (pinned) CPU tensor or the projector's output, with no concatenated
            # staging tensor. Pinned sources copy asynchronously; the caching host allocator keeps them
            # alive until the copy has run.
            row = 0
            for offset, count in span.runs:
                start = span.start + offset
                inputs_embeds[0, start:start + count].copy_(feature[row:row + count], non_blocking=True)
                row += count
        return input_ids, inputs_embeds

    def prepare(
        self,
        parts: Sequence[Part],
        images: Sequence[Any],
        tokenizer,
        embed_tokens: torch.nn.Module,
        *,
        add_bos: bool,
        max_length: int | None = None,
        should_stop=None,
        image_sizes: Sequence[tuple[int, int]] | None = None,
        keys: Sequence[Any] | None = None,
    ) -> PreparedInputs:
        """Tokenize ``parts``, drop whole images that do not fit ``max_length`` (from the left), encode the
        images that remain and splice them in. ``images[i]`` is the RGB image of ``ImageRef(i)`` (or, with
        ``image_sizes`` and ``keys``, a callable returning it; see :meth:`encode_images`)."""
        refs = sorted({p.index for p in parts if isinstance(p, ImageRef)})
        if refs != list(range(len(images))):
            raise LlavaInputError(
                f"the prompt has {sum(isinstance(p, ImageRef) for p in parts)} image slot(s) for {len(images)} image(s)"
            )
        if image_sizes is None:
            image_sizes = [image.size for image in images]
        prompt = self.tokenize(parts, tokenizer, add_bos=add_bos, image_sizes=image_sizes)
        if max_length is not None:
            prompt = truncate_left(prompt, max_length)
        used = [span.image_index for span in prompt.image_spans]
        used_keys = [keys[i] for i in used] if keys is not None else None
        features = self.encode_images([images[i] for i in used], should_stop, used_keys) if used else []
        input_ids, inputs_embeds = self.embed(prompt, features, embed_tokens)
        return PreparedInputs(input_ids, inputs_embeds, prompt, len(used), list(prompt.dropped_images))


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` (special tokens on) starts with the BOS id, as the references' tokenization
    does whenever the tokenizer is configured to add it."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


def _single_token_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise LlavaInputError(f"the tokenizer has no single token for {text!r} (got {len(ids)} tokens)")
    return int(ids[0])
