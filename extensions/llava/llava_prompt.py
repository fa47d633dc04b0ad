"""Prompt logic without tensors: image slots, token spans, truncation, conversation templates.

A prompt is a list of parts, each a ``str`` or an :class:`ImageRef` (the position of one image).
Tokenizing it (see ``llava_pipeline``) gives a :class:`TokenizedPrompt`: token ids plus the span each
image occupies. Everything here works on ``str`` and ``list[int]`` and is tested without torch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class ImageRef:
    """Stands for image number ``index`` (0-based, in the order images were given)."""

    index: int


Part = Union[str, ImageRef]


@dataclass(frozen=True)
class ImageSpan:
    """Image ``image_index`` occupies ``ids[start:start + length]``.

    ``feature_runs`` are ``(offset, count)`` pairs relative to ``start``: the positions its feature rows
    fill, in order. None (the LLaVA case) means the whole span is feature rows. Pixtral's rows of
    ``[IMG]`` separated by ``[IMG_BREAK]`` are one span with one run per row: the break tokens inside it
    keep their own embeddings. A span never starts or ends with a non-feature position.
    """

    start: int
    length: int
    image_index: int
    feature_runs: tuple[tuple[int, int], ...] | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def runs(self) -> tuple[tuple[int, int], ...]:
        """``(offset, count)`` of every run of feature positions (one run covering all by default)."""
        return self.feature_runs if self.feature_runs is not None else ((0, self.length),)

    @property
    def feature_rows(self) -> int:
        """How many feature rows the image brings (``length`` minus the ordinary tokens inside)."""
        return sum(count for _, count in self.runs)


@dataclass(frozen=True)
class TokenRun:
    """``count`` copies of one token, spelled ``text`` (e.g. ``"[IMG]"`` x 32). ``image`` runs are the
    positions that receive the image's feature rows; the others are ordinary tokens of the image's slot
    (``[IMG_BREAK]``, ``<im_start>``), embedded from the vocabulary like any text."""

    text: str
    count: int
    image: bool = False

    def __post_init__(self):
        if self.count < 0:
            raise ValueError(f"a token run cannot repeat {self.count} times")


@dataclass(frozen=True)
class SlotLayout:
    """The tokens one image expands to in the prompt, as runs (what a transformers processor writes in
    place of the image token). Examples, for an image of 2 x 3 feature rows:

    * LLaVA / NeXT (llava-hf): ``(TokenRun("<image>", 6, image=True),)``
    * Pixtral: ``[IMG][IMG][IMG][IMG_BREAK][IMG][IMG][IMG][IMG_END]`` =
      ``(TokenRun("[IMG]", 3, True), TokenRun("[IMG_BREAK]", 1), TokenRun("[IMG]", 3, True), TokenRun("[IMG_END]", 1))``
    * LLaVA v0: ``(TokenRun("<im_start>", 1), TokenRun("<im_patch>", 6, True), TokenRun("<im_end>", 1))``
    """

    runs: tuple[TokenRun, ...]

    @classmethod
    def image_tokens(cls, text: str, count: int) -> "SlotLayout":
        """``count`` image positions spelled ``text`` and nothing else (the LLaVA layout)."""
        return cls((TokenRun(text, count, image=True),))

    @property
    def positions(self) -> int:
        """Prompt positions of the whole slot."""
        return sum(run.count for run in self.runs)

    @property
    def feature_rows(self) -> int:
        """Feature rows the image must bring: the count of its image positions."""
        return sum(run.count for run in self.runs if run.image)

    def text(self) -> str:
        """The slot spelled out in full, every token of every run (the processor's replacement text)."""
        return "".join(run.text * run.count for run in self.runs)

    def feature_span(self) -> tuple[int, int, tuple[tuple[int, int], ...]]:
        """``(first, length, runs)``: offset in the slot of the first image position, distance from it to
        just past the last one, and the ``(offset, count)`` image runs relative to ``first`` (ImageSpan's
        ``feature_runs``). A slot without image positions gives ``(0, 0, ())``."""
        offset, runs = 0, []
        for run in self.runs:
            if run.image and run.count:
                runs.append((offset, run.count))
            offset += run.count
        if not runs:
            return 0, 0, ()
        first = runs[0][0]
        last_offset, last_count = runs[-1]
        return first, last_offset + last_count - first, tuple((o - first, c) for o, c in runs)


@dataclass
class TokenizedPrompt:
    """Token ids with placeholder ids at image positions; ``len(ids)`` is the embedding length."""

    ids: list[int]
    image_spans: list[ImageSpan] = field(default_factory=list)
    dropped_images: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def split_on_marker(text: str, images: int, marker: str | Sequence[str] = IMAGE_MARKER) -> list[Part]:
    """``"a<image>b"`` -> ``["a", ImageRef(0), "b"]``; each marker takes the next image, in order.

    ``marker`` may be several spellings, each standing for the next image (``("<image>", "[IMG]")``:
    Pixtral prompts accept the generic marker and the checkpoint's own image token). Raises ValueError
    naming both numbers when markers and images differ in count.
    """
    markers = (marker,) if isinstance(marker, str) else tuple(dict.fromkeys(marker))
    # Longest first, so that a marker containing another is found whole.
    pattern = "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True))
    pieces = re.split(pattern, text)
    if len(pieces) - 1 != images:
        named = " or ".join(markers)
        raise ValueError(
            f"the prompt has {len(pieces) - 1} {named} marker(s) but {images} image(s) were given; "
            f"put one {markers[0]} where each image belongs"
        )
    parts: list[Part] = []
    for index, piece in enumerate(pieces):
        if index:
            parts.append(ImageRef(index - 1))
        if piece:
            parts.append(piece)
    return parts


def truncate_left(prompt: TokenizedPrompt, max_length: int) -> TokenizedPrompt:
    """Keep the last ``max_length`` positions, never half an image.

    A cut that would fall inside an image moves right past it, so that image is dropped whole (and the
    result may be shorter than ``max_length``). Spans are re-based to the new start. Dropped image
    indices are listed in ``dropped_images``.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if len(prompt.ids) <= max_length:
        return prompt
    start = len(prompt.ids) - max_length
    for span in prompt.image_spans:
        if span.start < start < span.end:
            start = span.end
    kept = [ImageSpan(s.start - start, s.length, s.image_index, s.feature_runs)
            for s in prompt.image_spans if s.start >= start]
    dropped = [s.image_index for s in prompt.image_spans if s.start < start]
    if dropped:
        logger.warning(
            "Prompt truncated to %d of %d tokens: %d image(s) fell out of the context and were dropped whole",
            len(prompt.ids) - start, len(prompt.ids), len(dropped),
        )
    return TokenizedPrompt(prompt.ids[start:], kept, prompt.dropped_images + dropped)


# ----------------------------------------------------------------------------------------------------------
# Conversation templates of the original checkpoints (llava/conversation.py; llava-formats.md §2.10)

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_V0_MM_SYSTEM = (
    "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab."
    "You are able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


@dataclass(frozen=True)
class ConversationTemplate:
    """One ``Conversation`` of llava/conversation.py. ``system_prefix + system`` is the original's
    ``system`` string (chatml keeps its ``<|im_start|>system\\n`` when a chat brings its own system text)."""

    name: str
    system: str
    roles: tuple[str, str]
    style: str  # "single", "two", "llama_2", "mpt"
    sep: str
    sep2: str = ""
    few_shot: tuple[tuple[str, str], ...] = ()
    system_prefix: str = ""

    @property
    def stop_string(self) -> str:
        # llava/serve/cli.py: stop_str = sep if sep_style != TWO else sep2 ("" for mistral_instruct).
        return self.sep2 if self.style in ("two", "llama_2") else self.sep


TEMPLATES = {
    # v0-era `simple_conv_multimodal` (LLaVA@7ace501 conversation.py), what v0 checkpoints were trained on.
    "llava_v0": ConversationTemplate(
        "llava_v0", LLAVA_V0_MM_SYSTEM, ("Human", "Assistant"), "single", "###",
        few_shot=(("Human", "Hi!"), ("Assistant", "Hi there!  How can I help you today?\n")),
    ),
    "llava_v1": ConversationTemplate("llava_v1", LLAVA_SYSTEM, ("USER", "ASSISTANT"), "two", " ", "</s>"),
    "llava_llama_2": ConversationTemplate(
        "llava_llama_2", LLAVA_LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "llama_2", "<s>", "</s>",
    ),
    "mistral_instruct": ConversationTemplate("mistral_instruct", "", ("USER", "ASSISTANT"), "llama_2", "", "</s>"),
    "chatml_direct": ConversationTemplate(
        "chatml_direct", "Answer the questions.", ("<|im_start|>user\n", "<|im_start|>assistant\n"), "mpt",
        "<|im_end|>", system_prefix="<|im_start|>system\n",
    ),
}


def render_conversation(
    template: ConversationTemplate, messages: Sequence[tuple[str, str | None]], system: str | None = None
) -> str:
    """Render ``[(role, text), ...]`` the way ``Conversation.get_prompt`` does; a message whose text is
    empty or ``None`` renders as its bare role (the last one is the open assistant turn, the generation
    prompt). ``system`` replaces the template's system text."""
    system_text = template.system_prefix + (template.system if system is None else system)
    messages = list(template.few_shot) + list(messages)
    if template.style == "single":
        out = system_text + template.sep
        for role, text in messages:
            out += f"{role}: {text}{template.sep}" if text else f"{role}:"
        return out
    if template.style == "two":
        seps = (template.sep, template.sep2)
        out = system_text + seps[0]
        for i, (role, text) in enumerate(messages):
            out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
        return out
    if template.style == "mpt":
        out = system_text + template.sep
        for role, text in messages:
            out += f"{role}{text}{template.sep}" if text else role
        return out
    if template.style == "llama_2":
        out = ""
        for i, (role, text) in enumerate(messages):
            if not text:
                continue
            if i == 0 and system_text:
                text = f"<<SYS>>\n{system_text}\n<</SYS>>\n\n{text}"
            out += f"{template.sep}[INST] {text} [/INST]" if i % 2 == 0 else f" {text} {template.sep2}"
        # get_prompt ends with ret.lstrip(sep): the leading "<s>" of llava_llama_2 goes (characters, not prefix).
        return out.lstrip(template.sep) if template.sep else out
    raise ValueError(f"unknown template style {template.style!r}")


def place_images(
    text: str, images: Sequence[str], placement: str, marker: str = IMAGE_MARKER, newline: str = "\n"
) -> str:
    """A user message's text with its images placed; each entry of ``images`` is the text standing for
    one image (``marker`` itself, or an image slot), ``""`` for an image that takes no place.

    ``marker`` typed in the text takes the message's images in order; images left over go where the
    checkpoint family was trained to see them: ``before`` -> ``image + newline`` per image, then the text
    (LLaVA v1+: ``"<image>\\n" + text``), ``after`` -> the text, then ``newline + image`` per image (v0).
    Markers beyond the image count stay text. The images always appear in the order given: with fewer
    markers than images, the markers take the last images under ``before`` and the first ones under
    ``after``. ``newline`` is ``"\\n"`` in plain prompts; webui prompts use a character that survives
    webui's ``strip()`` of message texts (llava_chat.IMAGE_NEWLINE).
    """
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after', got {placement!r}")
    if not images:
        return text
    remaining = list(images)
    if marker in text:
        pieces = text.split(marker)
        typed = min(len(pieces) - 1, len(remaining))
        first = len(remaining) - typed if placement == "before" else 0
        taken, remaining = remaining[first:first + typed], remaining[:first] + remaining[first + typed:]
        rebuilt = pieces[0]
        for piece in pieces[1:]:
            rebuilt += (taken.pop(0) if taken else marker) + piece
        text = rebuilt
    remaining = [image for image in remaining if image]
    if placement == "before":
        return "".join(image + newline for image in remaining) + text
    return text + "".join(newline + image for image in remaining)
