"""Instruction templates for webui (Jinja over ``messages`` with string contents).

Original checkpoints carry no chat template; these reproduce the conversation formats they were
trained on (llava/conversation.py, shared docs llava-formats.md §2.10). llava-hf checkpoints ship their
own template, written for the transformers processor: it iterates ``content`` as a list of typed parts
and uses the ``{% generation %}`` tag, both of which break webui's renderer (it passes plain strings
and does not know the tag). :func:`adapt_hf_template` keeps the checkpoint's template and wraps it.
"""

from __future__ import annotations

import re

from llava_prompt import LLAVA_SYSTEM

_V1_SYSTEM = LLAVA_SYSTEM.replace("'", "\\'")

LLAVA_V1 = (
    "{%- set ns = namespace(system=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.system = true -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- if not ns.system -%}{{- '" + _V1_SYSTEM + " ' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + message['content'] + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# webui's original "LLaVA" template for v0 checkpoints (`### Human:` / `### Assistant:`).
_V0_SYSTEM = (
    "You are LLaVA, a large language and vision assistant trained by UW Madison WAIV Lab. You are able to "
    "understand the visual content that the user provides, and assist the user with a variety of tasks using "
    "natural language. Follow the instructions carefully and explain your answers in detail."
)
LLAVA_V0 = (
    "{%- set ns = namespace(system=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.system = true -%}{%- endif -%}{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- if not ns.system -%}{{- '" + _V0_SYSTEM + "\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '### Human: ' + message['content'] + '\\n' -}}"
    "{%- else -%}{{- '### Assistant: ' + message['content'] + '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Assistant:' -}}{%- endif -%}"
)

MISTRAL_INSTRUCT = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '[INST] ' + message['content'] + ' [/INST] </s>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}{{- ' ' + message['content'] + ' ' + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

CHATML_DIRECT = (
    "{%- set ns = namespace(system=false) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{%- set ns.system = true -%}{%- endif -%}{%- endfor -%}"
    "{%- if not ns.system -%}{{- '<|im_start|>system\\nAnswer the questions.<|im_end|>' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

WEBUI_TEMPLATES = {
    "llava_v0": LLAVA_V0,
    "llava_v1": LLAVA_V1,
    "mistral_instruct": MISTRAL_INSTRUCT,
    "chatml_direct": CHATML_DIRECT,
}

# Turns string contents into the list-of-parts shape the llava-hf templates iterate over. A top-level
# `set` shadows the context variable for the rest of the template.
_STRING_TO_PARTS = (
    "{%- set ns_llava = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- set ns_llava.messages = ns_llava.messages + [{'role': m['role'], 'content': [{'type': 'text', 'text': m['content']}]}] -%}"
    "{%- else -%}{%- set ns_llava.messages = ns_llava.messages + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns_llava.messages -%}"
)
_GENERATION_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def adapt_hf_template(template: str) -> str:
    """A llava-hf chat template made renderable by webui: generation tags removed, string contents
    wrapped as one text part. Image parts never appear; the extension places the images itself."""
    return _STRING_TO_PARTS + _GENERATION_TAGS.sub("", template)
