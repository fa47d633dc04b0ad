"""Process-wide globals of webui (modules/shared.py @1dcde41d), reduced to what extensions read.

Real webui parses ``sys.argv`` here at import time (shared.py:231); the stand-in builds a
namespace with webui's defaults instead, and the harness overwrites fields per test.
``settings`` keeps webui's keys and defaults (shared.py:254-374) for the entries chat and
generation code read; the two Jinja templates are our own equivalents of webui's default
Alpaca instruction template and chat template (same rendered output), not copies.
"""
import argparse
import copy
from pathlib import Path

# shared.py:16 (resolve_user_data_dir): 'user_data' relative to the webui folder by default.
user_data_dir = Path('user_data')

# Text model variables (shared.py:19-27).
model = None
tokenizer = None
model_name = 'None'
is_seq2seq = False
is_multimodal = False  # only llama.cpp / ExLlamaV3 set it (models.py:73-75); Transformers never does
lora_names = []
bos_token = '<s>'  # replaced by tokenizer_config.json values in get_model_metadata (models_settings.py:140-146)
eos_token = '</s>'

# Generation variables (shared.py:35-37). stop_everything is one flag for every user.
stop_everything = False
generation_lock = None  # a threading.Lock, created by server.py:345 after the startup model load
processing_message = ''

# UI variables (shared.py:40-42). ``input_elements`` is assigned in server.py:146.
gradio = {}
persistent_interface_state = {}
input_elements = []
need_restart = False


def default_args():
    """webui's command-line defaults (shared.py:47-214) for the flags extensions and loaders read."""
    return argparse.Namespace(
        user_data_dir=str(user_data_dir),
        multi_user=False,
        model=None,
        lora=None,
        model_dir=str(user_data_dir / 'models'),
        settings=None,
        extensions=None,
        verbose=False,
        idle_timeout=0,
        loader=None,
        ctx_size=0,
        cpu=False,
        cpu_memory=0,
        disk=False,
        disk_cache_dir=str(user_data_dir / 'cache'),
        load_in_8bit=False,
        bf16=False,
        no_cache=False,
        trust_remote_code=False,
        force_safetensors=False,
        no_use_fast=False,
        attn_implementation='sdpa',
        load_in_4bit=False,
        use_double_quant=False,
        compute_dtype='float16',
        quant_type='nf4',
        gpu_split=None,
        listen=False,
        api=False,
        public_api=False,
        api_key='',
        nowebui=False,
        portable=False,
        chat_template_file=None,
    )


args = default_args()
original_args = copy.deepcopy(args)  # shared.py:233; the loader reads trust_remote_code from here


# Our own equivalent of webui's default instruction template (shared.py:349, "Alpaca" with a
# default system line when the conversation has none).
DEFAULT_INSTRUCTION_TEMPLATE = (
    "{%- if messages | selectattr('role', 'equalto', 'system') | list | length == 0 -%}"
    "{{- 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\\n\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n\\n' -}}"
    "{%- elif m['role'] == 'user' -%}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' -}}"
    "{%- else -%}{{- '### Response:\\n' + m['content'] + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

# Our own equivalent of webui's default chat template (shared.py:350): "name1: text" lines.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- if m['content'] -%}{{- m['content'] + '\\n\\n' -}}{%- endif -%}"
    "{%- if user_bio -%}{{- user_bio + '\\n\\n' -}}{%- endif -%}"
    "{%- elif m['role'] == 'user' -%}{{- name1 + ': ' + m['content'] + '\\n' -}}"
    "{%- else -%}{{- name2 + ': ' + m['content'] + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- name2 + ':' -}}{%- endif -%}"
)

settings = {
    'mode': 'instruct',
    'start_with': '',
    'chat-instruct_command': 'Continue the chat dialogue below. Write a single reply for the character "<|character|>". Reply directly, without starting the reply with the character name.\n\n<|prompt|>',
    'max_new_tokens': 512,
    'auto_max_new_tokens': True,
    'max_tokens_second': 0,
    'ban_eos_token': False,
    'add_bos_token': True,
    'skip_special_tokens': True,
    'stream': True,
    'truncation_length': 8192,
    'seed': -1,
    'custom_stopping_strings': '',
    'include_past_attachments': True,
    'temperature': 1.0,
    'top_p': 0.95,
    'top_k': 0,
    'repetition_penalty': 1.0,
    'do_sample': True,
    'character': 'Assistant',
    'name1': 'You',
    'name2': 'AI',
    'user_bio': '',
    'context': 'The following is a conversation with an AI Large Language Model. The AI has been trained to answer questions, provide recommendations, and help with decision making. The AI follows user requests. The AI thinks outside the box.',
    'greeting': 'How can I help you today?',
    'custom_system_message': '',
    'instruction_template_str': DEFAULT_INSTRUCTION_TEMPLATE,
    'chat_template_str': DEFAULT_CHAT_TEMPLATE,
    'default_extensions': [],
}

# shared.py:376. extensions.apply_settings writes '<ext>-<param>' defaults here.
default_settings = copy.deepcopy(settings)

# models_settings.py:165 reads this (loaded from '<model_dir>/config-user.yaml', shared.py:447-465).
user_config = {}


def is_chat():
    return True
