"""Instruction templates for webui (Jinja over ``messages``; webui passes every content as a string).

Original checkpoints carry no chat template: :func:`conversation_jinja` writes one per conversation
format they were trained on (llava/conversation.py, shared docs llava-formats.md §2.10) that renders
exactly what ``Conversation.get_prompt`` renders, so webui's prompt is the CLI's prompt. They emit no
BOS text: the original prompt has none, and the BOS comes from the tokenizer (a ``<s>`` written as text
would change how the next word tokenizes under ``legacy: false``).

llava-hf checkpoints ship their own template, written for the transformers processor. Templates come in
two content shapes: some print ``message['content']`` as a string, others iterate it as a list of typed
parts (``{"type": "image"}``, ``{"type": "text", "text": ...}``), and some use ``{% generation %}`` tags
webui does not know. :func:`adapt_chat_template` finds the shape by rendering probe conversations and
wraps the template so that webui's string contents reach it in the shape it renders: a parts template
gets an image part for each image slot placed before a user message's text (and renders its own image
text, such as ``<image>\\n``, which the wrapper turns back into the slot), a string template gets the
strings with the slots in them.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from llava_chat import IMAGE_NEWLINE, SLOT_CLOSE, SLOT_OPEN
from llava_prompt import TEMPLATES, ConversationTemplate

logger = logging.getLogger(__name__)

# Typed image-token text is swapped for this while a parts template renders, so that only the image
# text the template writes for image parts is turned into slots.
_PROTECTED_IMAGE_TEXT = "\ue003"
_GENERATION_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def _literal(value: Any) -> str:
    """A Jinja literal for a str / list / bool (Jinja string literals take Python escapes, as JSON writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------- originals


def conversation_jinja(template: ConversationTemplate) -> str:
    """A webui instruction template that renders ``llava_prompt.render_conversation(template, ...)``.

    webui's messages map as: a ``system`` message replaces the template's system text, ``user`` /
    ``assistant`` become the template's two roles (tool messages are ignored), and
    ``add_generation_prompt`` appends the open assistant turn. Turn parity (which separator follows a
    message) counts turns as ``get_prompt`` does, few-shot turns included.
    """
    user, assistant = (_literal(role) for role in template.roles)
    sep, sep2 = _literal(template.sep), _literal(template.sep2)
    head = (
        "{%- set ns = namespace(system=" + _literal(template.system) + ", turns="
        + _literal([list(turn) for turn in template.few_shot]) + ") -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
        "{%- elif message['role'] == 'user' -%}{%- set ns.turns = ns.turns + [[" + user + ", message['content']]] -%}"
        "{%- elif message['role'] == 'assistant' -%}{%- set ns.turns = ns.turns + [[" + assistant + ", message['content']]] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{%- set ns.turns = ns.turns + [[" + assistant + ", '']] -%}{%- endif -%}"
        "{%- set system = " + _literal(template.system_prefix) + " + ns.system -%}"
    )
    if template.style == "single":
        body = (
            "{{- system + " + sep + " -}}"
            "{%- for turn in ns.turns -%}"
            "{%- if turn[1] -%}{{- turn[0] + ': ' + turn[1] + " + sep + " -}}{%- else -%}{{- turn[0] + ':' -}}{%- endif -%}"
            "{%- endfor -%}"
        )
    elif template.style == "two":
        body = (
            "{{- system + " + sep + " -}}"
            "{%- for turn in ns.turns -%}"
            "{%- if turn[1] -%}{{- turn[0] + ': ' + turn[1] + (" + sep + " if loop.index0 % 2 == 0 else " + sep2 + ") -}}"
            "{%- else -%}{{- turn[0] + ':' -}}{%- endif -%}"
            "{%- endfor -%}"
        )
    elif template.style == "mpt":
        body = (
            "{{- system + " + sep + " -}}"
            "{%- for turn in ns.turns -%}"
            "{%- if turn[1] -%}{{- turn[0] + turn[1] + " + sep + " -}}{%- else -%}{{- turn[0] -}}{%- endif -%}"
            "{%- endfor -%}"
        )
    elif template.style == "llama_2":
        body = (
            "{%- set out = namespace(text='') -%}"
            "{%- for turn in ns.turns -%}{%- if turn[1] -%}"
            "{%- set message = turn[1] -%}"
            "{%- if loop.first and system -%}{%- set message = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message -%}{%- endif -%}"
            "{%- if loop.index0 % 2 == 0 -%}{%- set out.text = out.text + " + sep + " + '[INST] ' + message + ' [/INST]' -%}"
            "{%- else -%}{%- set out.text = out.text + ' ' + message + ' ' + " + sep2 + " -%}{%- endif -%}"
            "{%- endif -%}{%- endfor -%}"
            # get_prompt ends with ret.lstrip(sep): llava_llama_2's leading "<s>" goes.
            "{{- out.text.lstrip(" + sep + ") if " + sep + " else out.text -}}"
        )
    else:
        raise ValueError(f"unknown template style {template.style!r}")
    return head + body


WEBUI_TEMPLATES = {name: conversation_jinja(template) for name, template in TEMPLATES.items()}


# ---------------------------------------------------------------------------------------------- llava-hf


_PROBE = "llava probe 5f1c"


def _environment():
    """A Jinja environment configured like webui's (modules/chat.py) and transformers' chat templates."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = lambda value, indent=None, ensure_ascii=True: json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment


def _render(source: str, messages: list[dict], **context) -> str | None:
    """The template rendered, or None when it fails or prints a content list instead of its text."""
    try:
        out = _environment().from_string(source).render(messages=messages, add_generation_prompt=True, **context)
    except Exception:  # noqa: BLE001 - any failure means "this shape does not work"
        return None
    if "'type'" in out or '"type"' in out:  # the repr of a parts list: the template printed it as a string
        return None
    return out


def content_shapes(source: str, image_text: str, **context) -> dict[str, str] | None:
    """How ``source`` renders each role's content, found by rendering probe conversations.

    Returns ``{"user": shape, "system": shape, "assistant": shape}`` with shape ``"images"`` (a list of
    parts whose image parts the template renders as ``image_text``; user only), ``"parts"`` (a list of
    text parts) or ``"string"``; None when no user shape renders the user's text at all.
    """
    source = _GENERATION_TAGS.sub("", source)

    def text_parts(text):
        return [{"type": "text", "text": text}]

    def user_ok(content, images=0):
        out = _render(source, [{"role": "user", "content": content}], **context)
        return out is not None and _PROBE in out and out.count(image_text) == images

    if user_ok([{"type": "image"}, *text_parts(_PROBE)], images=1):
        user = "images"
    elif user_ok(_PROBE):
        user = "string"
    elif user_ok(text_parts(_PROBE)):
        user = "parts"
    else:
        return None
    user_message = {"role": "user", "content": text_parts("hello") if user != "string" else "hello"}

    def role_shape(role: str, conversation) -> str:
        preferred, other = ("string", "parts") if user == "string" else ("parts", "string")
        for shape in (preferred, other):
            content = _PROBE if shape == "string" else text_parts(_PROBE)
            out = _render(source, conversation({"role": role, "content": content}), **context)
            if out is not None and _PROBE in out:
                return shape
        return "string"  # e.g. no system role at all: what webui sends then fails as it would anyway

    return {
        "user": user,
        "system": role_shape("system", lambda message: [message, user_message]),
        "assistant": role_shape("assistant", lambda message: [user_message, message, user_message]),
    }


def adapt_chat_template(template: str, image_text: str, *, bos_token: str = "<s>", eos_token: str = "</s>") -> str | None:
    """A checkpoint's chat template made renderable by webui with the extension's image slots.

    ``{% generation %}`` tags are removed (webui's renderer does not know them). Contents are handed to
    the template in the shape it renders (:func:`content_shapes`); for a template that renders image
    parts, each image slot placed before a user message's text becomes an image part and the image text
    the template writes for it (``image_text``, e.g. ``<image>``) is turned back into that slot. Returns
    None when the template cannot render a user message in any shape.
    """
    source = _GENERATION_TAGS.sub("", template)
    shapes = content_shapes(source, image_text, bos_token=bos_token, eos_token=eos_token)
    if shapes is None:
        logger.warning("The checkpoint's chat template renders no user text in any content shape; not using it")
        return None
    if set(shapes.values()) == {"string"}:
        return source
    images = shapes["user"] == "images"
    part_roles = [role for role, shape in shapes.items() if shape != "string"]
    protect = (lambda expression: f"{expression}.replace({_literal(image_text)}, {_literal(_PROTECTED_IMAGE_TEXT)})") \
        if images else (lambda expression: expression)
    wrapper = (
        "{%- set ns_llava = namespace(messages=[], slots=[], parts=[], text=none) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is not string -%}{%- set ns_llava.messages = ns_llava.messages + [m] -%}"
        "{%- elif m['role'] not in " + _literal(part_roles) + " -%}"
        "{%- set ns_llava.messages = ns_llava.messages + [dict(m, content=" + protect("m['content']") + ")] -%}"
        "{%- else -%}"
        "{%- set ns_llava.parts = [] -%}{%- set ns_llava.text = none -%}"
        # A slot placed before the text is followed by IMAGE_NEWLINE: "S0<nl>S1<nl>text" -> 2 images + text.
        "{%- for piece in m['content'].split(" + _literal(IMAGE_NEWLINE) + ") -%}"
        "{%- if " + _literal(images) + " and m['role'] == 'user' and ns_llava.text is none and not loop.last"
        " and piece.startswith(" + _literal(SLOT_OPEN) + ") and piece.endswith(" + _literal(SLOT_CLOSE) + ")"
        " and piece.count(" + _literal(SLOT_OPEN) + ") == 1 -%}"
        "{%- set ns_llava.parts = ns_llava.parts + [{'type': 'image'}] -%}"
        "{%- set ns_llava.slots = ns_llava.slots + [piece] -%}"
        "{%- elif ns_llava.text is none -%}{%- set ns_llava.text = piece -%}"
        "{%- else -%}{%- set ns_llava.text = ns_llava.text + " + _literal(IMAGE_NEWLINE) + " + piece -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns_llava.text or not ns_llava.parts -%}"
        "{%- set ns_llava.parts = ns_llava.parts + [{'type': 'text', 'text': " + protect("(ns_llava.text or '')") + "}] -%}"
        "{%- endif -%}"
        "{%- set ns_llava.messages = ns_llava.messages + [dict(m, content=ns_llava.parts)] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        # A top-level `set` shadows the context variable for the rest of the template.
        "{%- set messages = ns_llava.messages -%}"
    )
    if not images:
        return wrapper + source
    return (
        wrapper
        + "{%- set llava_rendered -%}" + source + "{%- endset -%}"
        + "{%- for piece in llava_rendered.split(" + _literal(image_text) + ") -%}"
        + "{{- piece.replace(" + _literal(_PROTECTED_IMAGE_TEXT) + ", " + _literal(image_text) + ") -}}"
        + "{%- if not loop.last -%}{{- ns_llava.slots[loop.index0] if loop.index0 < ns_llava.slots | length else "
        + _literal(image_text) + " -}}{%- endif -%}"
        + "{%- endfor -%}"
    )


def checkpoint_chat_template(folder) -> str | None:
    """The chat template a llava-hf checkpoint ships, in the order its processor reads them:
    ``chat_template.jinja``, ``chat_template.json``, then ``tokenizer_config.json`` (a string, or a list of
    named templates of which ``default`` is used)."""
    from pathlib import Path

    folder = Path(folder)
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    return None


def adapt_checkpoint_template(folder, image_text: str) -> str | None:
    """:func:`adapt_chat_template` of the template a checkpoint folder ships (None without one)."""
    from pathlib import Path

    template = checkpoint_chat_template(folder)
    if template is None:
        return None
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    config_path = Path(folder) / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in special:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                special[key] = value
    return adapt_chat_template(template, image_text, **special)
