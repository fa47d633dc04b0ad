"""How webui derives per-model settings (modules/models_settings.py @1dcde41d), Transformers only.

Instruction template precedence (models_settings.py:116-177):
1. ``chat_template.jinja`` in the model folder, else ``chat_template.json`` ``{"chat_template": …}``,
   else ``tokenizer_config.json`` ``chat_template`` — all three only count when
   ``tokenizer_config.json`` exists (the processing sits inside that ``if``). The result is named
   'Custom (obtained from model metadata)'; ``raise_exception(...)`` calls are stripped.
2. Otherwise 'Alpaca'.
3. Then every regex key of ``<model_dir>/config-user.yaml`` that ``re.match``es the lower-cased
   folder name overrides settings; ``instruction_template: <Name>`` there wins over step 1 and is
   loaded from ``<user_data>/instruction-templates/<Name>.{jinja,jinja2,yaml,yml}``.
"""
import json
import re
from pathlib import Path

import yaml

from modules import shared, utils
from modules.logging_colors import logger

CUSTOM_TEMPLATE_NAME = 'Custom (obtained from model metadata)'


def _strip_raise_exception(template):
    template = re.sub(r"\{\{-?\s*raise_exception\(.*?\)\s*-?\}\}", '', template, flags=re.DOTALL)
    return re.sub(r'raise_exception\([^)]*\)', "''", template)


def get_model_metadata(model):
    model_path = utils.resolve_model_path(model)
    settings = {
        'truncation_length': shared.settings['truncation_length'],
        'skip_special_tokens': shared.settings['skip_special_tokens'],
        'loader': 'Transformers' if model_path.exists() else None,
    }

    shared.bos_token, shared.eos_token = '<s>', '</s>'  # :46-47 defaults for templates

    config_path = model_path / 'config.json'
    if config_path.exists():
        metadata = json.loads(config_path.read_text(encoding='utf-8'))
        metadata = metadata.get('pretrained_config', metadata)
        for key in ('max_position_embeddings', 'model_max_length', 'max_seq_len'):
            value = metadata.get(key, metadata.get('text_config', {}).get(key))
            if value is not None:
                settings['truncation_length'] = value
                break

    template = None
    if (model_path / 'chat_template.jinja').exists():
        template = (model_path / 'chat_template.jinja').read_text(encoding='utf-8')
    elif (model_path / 'chat_template.json').exists():
        template = json.loads((model_path / 'chat_template.json').read_text(encoding='utf-8')).get('chat_template')

    tokenizer_config_path = model_path / 'tokenizer_config.json'
    if tokenizer_config_path.exists():
        tokenizer_config = json.loads(tokenizer_config_path.read_text(encoding='utf-8'))
        for key in ('eos_token', 'bos_token'):
            if key in tokenizer_config:
                value = tokenizer_config[key]
                setattr(shared, key, value['content'] if isinstance(value, dict) else value)

        if template is None and 'chat_template' in tokenizer_config:
            template = tokenizer_config['chat_template']
            if isinstance(template, list):
                template = template[0]['template']

        if template:
            settings['instruction_template'] = CUSTOM_TEMPLATE_NAME
            settings['instruction_template_str'] = _strip_raise_exception(template)

    settings.setdefault('instruction_template', 'Alpaca')

    for pattern, overrides in shared.user_config.items():
        if re.match(pattern.lower(), Path(model).name.lower()):
            settings.update(overrides)

    if settings['instruction_template'] != CUSTOM_TEMPLATE_NAME:
        settings['instruction_template_str'] = load_instruction_template(settings['instruction_template'])

    return settings


def load_template_by_name(name):
    template_dir = shared.user_data_dir / 'instruction-templates'
    for suffix in utils.TEMPLATE_EXTENSIONS:
        path = template_dir / f'{name}{suffix}'
        if path.is_file():
            break
    else:
        return ''

    text = path.read_text(encoding='utf-8')
    if path.suffix in utils.JINJA_EXTENSIONS:
        return text

    data = yaml.safe_load(text) or {}
    # webui also converts the pre-2024 'turn_template' format (:422-423); not needed here.
    return data.get('instruction_template', '')


def load_instruction_template(template):
    if template == 'None':
        return ''

    found = load_template_by_name(template)
    if found:
        return found

    logger.warning(f"Instruction template '{template}' not found, falling back to Alpaca")
    # webui reads user_data/instruction-templates/Alpaca.yaml; the stand-in's default is the same template.
    return load_template_by_name('Alpaca') or shared.DEFAULT_INSTRUCTION_TEMPLATE
