"""Shared helpers for the hook-level tests of extensions/llava through the webui stand-in.

The tests drive ``extensions/llava/script.py`` with ``WebuiHarness`` on the tiny checkpoints and compare
what reaches ``model.generate`` with what the pipeline computes directly (``LlavaPipeline.prepare``) for
the prompt a test expects. Loaded language models and reference pipelines are module-scoped; a harness
is cheap (it reloads ``script.py`` and its vision modules in ~0.1 s) and is made per test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from llava_checkpoint import load_language_model
from llava_pipeline import LlavaPipeline, VisionSettings
from llava_prompt import split_on_marker
from tiny_llava import make_test_image
from webui_harness import WebuiHarness

EXTENSION_DIR = Path(__file__).resolve().parent.parent / "extensions" / "llava"
CPU = VisionSettings(clip_device="cpu", projector_device="cpu")

# An image slot as the extension writes it into prompts (llava_chat): U+E000 index:WxH U+E001. Written
# out here rather than imported, so the tests pin the format instead of echoing the implementation.
SLOT_PATTERN = re.compile("\ue000(\\d+):(\\d+)x(\\d+)\ue001")
MARKER = "<__media__>"
NOTICE_PREFIX = "> ⚠️ llava:"

V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
V0_SYSTEM = (
    "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab."
    "You are able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language."
    "Follow the instructions carefully and explain your answers in detail."
)


# ``add_bos`` for LlavaPipeline.prepare: whether BOS is added in front of the prompt text. No template writes a
# BOS text for these checkpoints (llava-1.5-hf's has none; the original formats have none either), and the
# tiny tokenizer adds one by itself, as their references tokenize.
ADD_BOS = {"hf": True, "hf5": True, "v15": True, "v0": True}


def image(width: int, height: int, seed: int = 0):
    return make_test_image(width, height, seed=seed)


def instruct_prompt(fmt: str, turns, *, system: str | None = None) -> str:
    """The instruct prompt webui renders with the extension's template for ``fmt``, images as ``<image>``.

    ``turns``: ``[(user_text, assistant_text_or_None), ...]``; a final ``None`` reply is the generation prompt.
    Written out from the checkpoint families' formats: the llava-1.5-hf chat template, and original LLaVA's
    ``Conversation.get_prompt`` (tests/original_llava.py: llava_v1 for v15, the v0-era format for v0),
    not from the extension's templates.
    """
    if fmt in ("hf", "hf5"):
        # llava-1.5-hf: "<image>\n" per image part, then each text part + " " (an image-only message has none).
        out = "" if system is None else f"{system} "
        for user, reply in turns:
            out += f"USER: {user}" + ("" if user and not user.replace("<image>\n", "") else " ")
            out += "ASSISTANT:" if reply is None else f"ASSISTANT: {reply} "
        return out
    if fmt in ("v15", "v0"):
        import original_llava

        conversation = original_llava.conversation("llava_v1" if fmt == "v15" else "llava_v0", system)
        for user, reply in turns:
            conversation.messages += [[conversation.roles[0], user], [conversation.roles[1], reply]]
        return conversation.get_prompt()
    raise ValueError(fmt)


IMAGE_NEWLINE = "\ue002"  # the newline after / before an image in webui prompts (llava_chat)


def marked(prompt: str, marker: str = "<image>") -> str:
    """A prompt with every image slot written as ``marker`` and image newlines as newlines."""
    return SLOT_PATTERN.sub(marker, prompt).replace(IMAGE_NEWLINE, "\n")


def slots_in(prompt: str) -> list[tuple[int, tuple[int, int]]]:
    return [(int(m.group(1)), (int(m.group(2)), int(m.group(3)))) for m in SLOT_PATTERN.finditer(prompt)]


class Loaded:
    """One tiny checkpoint's language model, tokenizer and an independent reference pipeline."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        self.folder = folder
        self.name = folder.name
        self.model = load_language_model(folder, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.pipeline = LlavaPipeline.load(folder, CPU, lm_hidden_size=self.model.config.hidden_size)

    @property
    def embed(self):
        return self.model.get_input_embeddings()

    def features(self, picture) -> torch.Tensor:
        """``[N, H]`` features of one image, encoded alone (no cache)."""
        self.pipeline.cache.clear()
        return self.pipeline.encode_images([picture])[0]

    def prepare(self, prompt: str, pictures, *, add_bos: bool, max_length: int | None = None, marker="<image>"):
        """``LlavaPipeline.prepare`` for a prompt with one ``marker`` per picture."""
        parts = split_on_marker(prompt, len(pictures), marker)
        self.pipeline.cache.clear()
        with torch.inference_mode():
            return self.pipeline.prepare(parts, list(pictures), self.tokenizer, self.embed, add_bos=add_bos,
                                         max_length=max_length)

    def length(self, prompt: str, pictures, *, add_bos: bool, marker="<image>") -> int:
        parts = split_on_marker(prompt, len(pictures), marker)
        return len(self.pipeline.tokenize(parts, self.tokenizer, add_bos=add_bos,
                                          image_sizes=[p.size for p in pictures]))


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints):
    """``loaded(fmt)`` -> :class:`Loaded`, each format loaded once per test module."""
    cache = {}

    def get(fmt: str) -> Loaded:
        if fmt not in cache:
            cache[fmt] = Loaded(getattr(tiny_checkpoints, fmt))
        return cache[fmt]

    return get


class _Harnesses:
    """Makes WebuiHarness objects one at a time (the stand-in is process-wide: the previous one is closed)."""

    def __init__(self):
        self.made: list[WebuiHarness] = []

    def make(self, entry: Loaded, settings: dict | None = None, *, args: dict | None = None, **kwargs) -> WebuiHarness:
        self.close()
        merged_args = {"model_dir": str(entry.folder.parent), "cpu": True, **(args or {})}
        harness = WebuiHarness(EXTENSION_DIR, entry.model, entry.tokenizer, {"mode": "instruct", **(settings or {})},
                               args=merged_args, model_name=entry.name, **kwargs)
        self.made.append(harness)
        return harness

    def close(self) -> None:
        for harness in self.made:
            harness.close()


@pytest.fixture
def harness_for():
    """``harness_for(entry, settings=None, *, args=None, **harness_kwargs)`` -> a WebuiHarness (instruct mode
    unless ``settings`` say otherwise) on a :class:`Loaded` checkpoint."""
    harnesses = _Harnesses()
    yield harnesses.make
    harnesses.close()


@pytest.fixture
def make_harness(loaded):
    """``make_harness(fmt, settings=None, **harness_kwargs)`` -> a WebuiHarness on that tiny checkpoint."""
    harnesses = _Harnesses()
    yield lambda fmt, settings=None, **kwargs: harnesses.make(loaded(fmt), settings, **kwargs)
    harnesses.close()


def hook_calls(harness, name: str, since: int = 0):
    return [call for call in harness.hook_calls[since:] if call.name == name]


def last_prompt(harness) -> str:
    """The final prompt string webui handed to tokenizer_modifier in the last generation."""
    return hook_calls(harness, "tokenizer_modifier")[-1].args[1]


def last_call(harness):
    return harness.generate_calls[-1]


def assert_generate_matches(call, expected) -> None:
    """What reached ``generate`` is exactly what ``LlavaPipeline.prepare`` computes for the expected prompt."""
    assert call.inputs_embeds is not None, "no inputs_embeds reached generate"
    assert call.input_ids.shape[1] == call.inputs_embeds.shape[1]
    assert call.input_ids.tolist() == expected.input_ids.tolist()
    torch.testing.assert_close(call.inputs_embeds, expected.inputs_embeds, atol=0, rtol=0)


def visible_reply(harness) -> str:
    return harness.history["visible"][-1][1]


def png(picture) -> bytes:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_no_image_rows(call, entry: Loaded) -> None:
    """A generate call whose embeddings (if any) are the plain token embeddings of its ids."""
    if call.inputs_embeds is not None:
        assert call.input_ids.shape[1] == call.inputs_embeds.shape[1]
        with torch.no_grad():
            torch.testing.assert_close(call.inputs_embeds, entry.embed(call.input_ids), atol=0, rtol=0)


__all__ = [
    "ADD_BOS", "CPU", "EXTENSION_DIR", "Loaded", "MARKER", "NOTICE_PREFIX", "SLOT_PATTERN", "V0_SYSTEM",
    "V1_SYSTEM", "assert_generate_matches", "assert_no_image_rows", "hook_calls", "image", "png",
    "harness_for", "instruct_prompt", "last_call", "last_prompt", "loaded", "make_harness", "marked",
    "slots_in",
    "visible_reply",
]
