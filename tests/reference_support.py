"""Reference token ids for a conversation, computed without the extension's code, and checkpoint variants
in the tokenizer configs and chat-template shapes real checkpoints ship. Shared by the stand-in suite
(tests/test_reference_ids.py) and the real-webui suite (tests/integration/test_webui_reference_ids.py).

References:

* llava-hf: the checkpoint's processor, as ``processor.apply_chat_template(..., tokenize=True)`` does it
  (render, then the processor's tokenization, special tokens off when the rendered text starts with the
  BOS text), images as image parts for a template that iterates parts and as ``"<image>\\n" + text`` for
  one that prints the content as a string;
* original formats: ``Conversation.get_prompt`` + ``tokenizer_image_token`` (tests/original_llava.py),
  each ``-200`` standing for the image's feature rows; v0: its prompt with ``<im_start>`` +
  ``<im_patch>`` * N + ``<im_end>`` tokenized whole.

Ids are compared with image rows written as ``None``: every id outside them, and the place and length of
every image span. This module is test support, not a test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import original_llava
from tiny_llava import LLAVA_15_HF_CHAT_TEMPLATE

# A template in the style of the llava-hf hub files: list contents only, {% generation %} around replies.
HUB_STYLE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{%- generation -%}{{ content['text'] + ' '}}{%- endgeneration -%}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A plain template that prints the content as a string (community conversions, an LM's tokenizer_config).
STRING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

TOKENIZER_CONFIGS = {
    "legacy-false": {"legacy": False},
    "legacy-true": {"legacy": True},
    # Only the flag: transformers 5.6 keeps the BOS of tokenizer.json's post-processor (so does the reference).
    "add-bos-false-flag": {"add_bos_token": False},
    # The flag and no post-processor: the tokenizer adds no BOS at all.
    "add-bos-false": {"add_bos_token": False, "_no_post_processor": True},
}
# How a llava-hf checkpoint carries its template: (file, template, content shape it renders).
HF_TEMPLATES = {
    "fixture": ("chat_template.jinja", LLAVA_15_HF_CHAT_TEMPLATE, "parts"),
    "hub-parts": ("chat_template.json", HUB_STYLE_TEMPLATE, "parts"),
    "string": ("chat_template.jinja", STRING_TEMPLATE, "string"),
    "tokenizer-config-string": ("tokenizer_config.json", STRING_TEMPLATE, "string"),
}
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Folder names that select the other conversation formats of original checkpoints (run_llava.py picks by name).
FORMAT_FOLDERS = {"llava_llama_2": "llava-llama-2-13b-chat-tiny", "mistral_instruct": "llava-v1.6-mistral-7b-tiny",
                  "chatml_direct": "llava-v1.6-34b-tiny"}


def make_variant(source: Path, target: Path, tokenizer_config: str, template: str | None = None) -> Path:
    """A copy of a checkpoint folder (weights linked) with the tokenizer config ``TOKENIZER_CONFIGS[...]``
    and, for llava-hf, the chat template ``HF_TEMPLATES[template]`` in place of its own."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            (target / path.name).symlink_to(path.resolve())
        elif path.is_file():
            shutil.copy(path, target / path.name)
    config = json.loads((target / "tokenizer_config.json").read_text())
    changes = dict(TOKENIZER_CONFIGS[tokenizer_config])
    if changes.pop("_no_post_processor", False):
        tokenizer_json = json.loads((target / "tokenizer.json").read_text())
        tokenizer_json["post_processor"] = None
        (target / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config.update(changes)
    if template is not None:
        file_name, text, _ = HF_TEMPLATES[template]
        for name in _TEMPLATE_FILES:
            (target / name).unlink(missing_ok=True)
        config.pop("chat_template", None)
        if file_name == "chat_template.jinja":
            (target / file_name).write_text(text)
        elif file_name == "chat_template.json":
            (target / file_name).write_text(json.dumps({"chat_template": text}))
        else:
            config["chat_template"] = text
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


def hf_messages(turns, shape: str, system: str | None = None) -> tuple[list[dict], list]:
    """``(messages, images)`` of ``(text, images, reply_or_None)`` turns in the content shape of a template."""
    def text_content(text):
        return text if shape == "string" else [{"type": "text", "text": text}]

    messages, pictures = [], []
    if system is not None:
        messages.append({"role": "system", "content": text_content(system)})
    for text, images, reply in turns:
        pictures += images
        if shape == "string":
            content = "".join("<image>\n" for _ in images) + text
        else:
            content = [{"type": "image"} for _ in images] + ([{"type": "text", "text": text}] if text else [])
        messages.append({"role": "user", "content": content})
        if reply is not None:
            messages.append({"role": "assistant", "content": text_content(reply)})
    return messages, pictures


def processor_ids(folder: Path, turns, shape: str, *, chat_template: str | None = None,
                  system: str | None = None) -> list:
    """llava-hf: what ``processor.apply_chat_template(messages, tokenize=True)`` feeds the model, image
    rows as None."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder))
    messages, pictures = hf_messages(turns, shape, system)
    if chat_template is None and processor.chat_template is None:
        chat_template = processor.tokenizer.chat_template
    rendered = processor.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                             tokenize=False)
    return processor_prompt_ids(folder, rendered, pictures, processor=processor)


def processor_prompt_ids(folder: Path, prompt: str, pictures, *, processor=None) -> list:
    """llava-hf: the processor's tokenization of a rendered prompt (``<image>`` where each image goes), as
    ``apply_chat_template(tokenize=True)`` calls it: no special tokens when the prompt starts with the BOS
    text (processing_utils.py). Image rows as None."""
    if processor is None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(folder))
    bos = processor.tokenizer.bos_token
    out = processor(text=prompt, images=list(pictures) or None, add_special_tokens=not (bos and prompt.startswith(bos)))
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return [None if token == image_token_id else int(token) for token in out["input_ids"][0]]


def original_ids(tokenizer, fmt: str, prompt: str, image_rows: list[int]) -> list:
    """Original formats: the ids of a ``get_prompt()`` string (``<image>`` per image), image rows as None.
    ``image_rows[i]``: the feature rows of image i."""
    if fmt == "v0":  # 7ace501 run_llava: the image spelled as vocabulary tokens, the prompt tokenized whole
        expanded = prompt
        for rows in image_rows:
            expanded = expanded.replace("<image>", "<im_start>" + "<im_patch>" * rows + "<im_end>", 1)
        patch = tokenizer.convert_tokens_to_ids("<im_patch>")
        return [None if token == patch else token for token in tokenizer(expanded).input_ids]
    ids = original_llava.tokenizer_image_token(prompt, tokenizer)
    return original_llava.expand_images(ids, image_rows, None)


def tokens_per_image(folder: Path) -> int:
    """Feature rows of one image of a non-tiled checkpoint: (image_size / patch_size)², from the tower's
    config (CLS dropped, as every checkpoint here selects)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    vision = config.get("vision_config")
    if vision is None:  # original formats name their tower folder
        tower = Path(config["mm_vision_tower"])
        vision = json.loads((tower / "config.json").read_text())
        vision = vision.get("vision_config", vision)
    return (vision["image_size"] // vision["patch_size"]) ** 2
