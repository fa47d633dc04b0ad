"""webui prompt plumbing without tensors: image slots in prompt strings, placement, webui markers.

webui marks images with the literal ``<__media__>`` (several tokens, forgeable by typing it). The
extension builds the chat prompt itself and writes each image as an unforgeable *slot*:
``SLOT_OPEN + "<index>:<width>x<height>" + SLOT_CLOSE`` with private-use characters that are removed from
everything a user sends. ``index`` points into the request's image list; the size lets a prompt string
alone be counted exactly (LLaVA-NeXT token counts depend on it). A slot cut by webui's truncation is an
incomplete fragment and counts as nothing. The newline that separates an image from its message's text
(``"<image>\\n" + text``) is written as ``IMAGE_NEWLINE``, because webui strips every message text and an
image-only message would otherwise lose it; it becomes ``"\\n"`` when the prompt is tokenized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from llava_prompt import IMAGE_MARKER, ImageRef, Part, place_images

MEDIA_MARKER = "<__media__>"
SLOT_OPEN = "\ue000"
SLOT_CLOSE = "\ue001"
IMAGE_NEWLINE = "\ue002"
# Every private-use character the extension gives a meaning in prompts (U+E003: llava_templates).
_RESERVED = re.compile("[\ue000-\ue003]")
_SLOT = re.compile(f"{SLOT_OPEN}(\\d+):(\\d+)x(\\d+){SLOT_CLOSE}")
# What truncation can leave of a slot: an opening without its closing character, with whatever part of
# "index:WxH" survived (webui's bisect keeps a prefix of the message; template text follows it).
_FRAGMENT = re.compile(f"{SLOT_OPEN}\\d*(?::\\d*(?:x\\d*)?)?|^[\\d:x]*{SLOT_CLOSE}")


def neutralize(text: str) -> str:
    """Remove the slot characters from user text, so typed text can never forge an image slot."""
    return _RESERVED.sub("", text)


def slot(index: int, size: tuple[int, int]) -> str:
    return f"{SLOT_OPEN}{index}:{size[0]}x{size[1]}{SLOT_CLOSE}"


def has_slots(prompt: str) -> bool:
    return SLOT_OPEN in prompt


def place_slots(text: str, slots: Sequence[str], placement: str, marker: str = IMAGE_MARKER,
                separator: str = "\n") -> str:
    """A message's text with its image slots placed (``llava_prompt.place_images``); ``""`` in ``slots``
    stands for an image without a slot. ``separator`` is what follows each image before the text (the
    family's ``image_text_separator``): ``"\n"``, written as ``IMAGE_NEWLINE``, for the llava-hf templates
    (``<image>\n``); nothing for Pixtral, Mistral 3 and Aya Vision, whose templates write the image token
    straight before the text."""
    return place_images(text, slots, placement, marker, newline=IMAGE_NEWLINE if separator == "\n" else separator)


@dataclass
class ParsedPrompt:
    """A prompt split into text and image parts. ``image_indices[i]`` is the request-level index of
    ``ImageRef(i)``; ``sizes[i]`` its ``(width, height)``."""

    parts: list[Part] = field(default_factory=list)
    image_indices: list[int] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)


def parse_slots(prompt: str) -> ParsedPrompt:
    """Split a prompt at complete slots; fragments and stray slot characters are dropped."""
    parsed = ParsedPrompt()
    position = 0
    for match in _SLOT.finditer(prompt):
        _append_text(parsed, prompt[position:match.start()])
        parsed.parts.append(ImageRef(len(parsed.image_indices)))
        parsed.image_indices.append(int(match.group(1)))
        parsed.sizes.append((int(match.group(2)), int(match.group(3))))
        position = match.end()
    _append_text(parsed, prompt[position:])
    return parsed


def _append_text(parsed: ParsedPrompt, text: str) -> None:
    text = _plain(text)
    if text:
        parsed.parts.append(text)


def strip_slots(prompt: str) -> str:
    """The prompt with every slot and fragment removed (the text-only fallback)."""
    return _plain(_SLOT.sub("", prompt))


def _plain(text: str) -> str:
    """Prompt text around the slots: fragments dropped, image newlines written as newlines."""
    return neutralize(_FRAGMENT.sub("", text).replace(IMAGE_NEWLINE, "\n"))


def strip_media_run(text: str, count: int) -> str | None:
    """``"<__media__>"*count + "\\n\\n" + rest`` -> ``rest`` (webui's API layout); None if absent."""
    head = MEDIA_MARKER * count + "\n\n"
    return text[len(head):] if count and text.startswith(head) else None


def api_processed_text(content) -> str:
    """What webui's API turns an OpenAI message content into (``process_multimodal_content``): image
    parts become leading markers, text parts are joined with spaces."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return str(content)
    texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    markers = "".join(MEDIA_MARKER for p in content if isinstance(p, dict) and p.get("type") == "image_url")
    text = " ".join(texts)
    return f"{markers}\n\n{text}" if markers else text


def api_image_urls(content) -> list[str]:
    """The image URLs of one OpenAI message content, in order."""
    if not isinstance(content, list):
        return []
    urls = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            image_url = part.get("image_url")
            urls.append(image_url.get("url", "") if isinstance(image_url, dict) else str(image_url or ""))
    return urls


def find_marked_rows(prompt: str, rows: Iterable[tuple[str, int]]) -> list[tuple[int, int, int]]:
    """Locate rows' ``"<__media__>"*k + "\\n\\n" + text`` in a prompt webui built itself.

    ``rows`` are ``(text, k)`` oldest first; the result lists ``(row_number, start, end)`` of each row
    found, where ``prompt[start:end]`` is the marker run (the ``\\n\\n`` excluded). Searching from the
    newest row backwards mirrors webui's truncation, which drops the oldest messages first; a marker
    typed inside a message's text is never taken for an image.
    """
    found = []
    limit = len(prompt)
    for number, (text, count) in reversed(list(enumerate(rows))):
        if count <= 0:
            continue
        needle = MEDIA_MARKER * count + "\n\n" + text.strip()
        start = prompt.rfind(needle, 0, limit)
        if start < 0:
            continue
        found.append((number, start, start + len(MEDIA_MARKER) * count))
        limit = start
    found.reverse()
    return found


def replace_spans(prompt: str, replacements: Sequence[tuple[int, int, str]]) -> str:
    """Replace non-overlapping ``(start, end, text)`` spans of ``prompt``."""
    out, position = [], 0
    for start, end, text in sorted(replacements):
        out.append(prompt[position:start])
        out.append(text)
        position = end
    out.append(prompt[position:])
    return "".join(out)
