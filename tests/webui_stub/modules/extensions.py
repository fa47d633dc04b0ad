"""Extension loading and hook dispatch, as in webui modules/extensions.py @1dcde41d.

Semantics reproduced (line numbers refer to that file):
- load order is ``shared.args.extensions`` order; names missing from ``available_extensions``
  are skipped silently (:31-33);
- ``<user_data>/extensions/<name>/script.py`` is loaded by file path as module ``user_ext_<name>``
  and wins over ``extensions.<name>.script`` (:38-49);
- saved ``<name>-<param>`` settings overwrite ``params`` entries, then ``setup()`` runs, once
  per module object (:16-24, :51-55);
- ModuleNotFoundError is logged and re-raised; any other error is logged and the extension is
  simply left out (:59-76);
- string hooks count their parameters other than ``is_chat`` (:87-114);
- ``custom_generate_chat_prompt``, ``custom_tokenized_length`` and ``custom_generate_reply``
  come from the first extension that defines them, even if it returns None (:127-190);
- ``logits_processor_modifier`` replaces the list only when it returns a ``list`` (:164-171).
"""
import importlib
import importlib.util
import sys
from inspect import signature

from modules import shared
from modules.logging_colors import logger

# name -> [enabled, position in --extensions, module]  (:11, :57)
state = {}
available_extensions = []
setup_called = set()


def apply_settings(extension, name):
    params = getattr(extension, 'params', None)
    if params is None:
        return

    for param in params:
        setting_key = f'{name}-{param}'
        shared.default_settings[setting_key] = params[param]
        if setting_key in shared.settings:
            params[param] = shared.settings[setting_key]


def _import_extension(name):
    user_script = shared.user_data_dir / 'extensions' / name / 'script.py'
    if user_script.exists():
        spec = importlib.util.spec_from_file_location(f'user_ext_{name}', str(user_script))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return importlib.import_module(f'extensions.{name}.script')


def load_extensions():
    global state
    state = {}

    for position, name in enumerate(shared.args.extensions or []):
        if name not in available_extensions:
            continue

        logger.info(f'Loading the extension "{name}"')
        try:
            module = _import_extension(name)
            if module not in setup_called:
                apply_settings(module, name)
                if hasattr(module, 'setup'):
                    module.setup()

                setup_called.add(module)

            state[name] = [True, position, module]
        except ModuleNotFoundError:
            logger.error(f"Could not import the requirements for '{name}'.")
            raise
        except Exception:
            logger.exception(f'Failed to load the extension "{name}".')


def iterator():
    for name in sorted(state, key=lambda key: state[key][1]):
        enabled, _, module = state[name]
        if enabled:
            yield module, name


def _apply_string_extensions(function_name, text, state, is_chat=False):
    for extension, _ in iterator():
        func = getattr(extension, function_name, None)
        if func is None:
            continue

        names = list(signature(func).parameters)
        takes_is_chat = 'is_chat' in names
        positional_count = len(names) - (1 if takes_is_chat else 0)
        call_args = [text, state] if positional_count == 2 else [text]
        call_kwargs = {'is_chat': is_chat} if takes_is_chat else {}
        text = func(*call_args, **call_kwargs)

    return text


def _apply_chat_input_extensions(text, visible_text, state):
    for extension, _ in iterator():
        if hasattr(extension, 'chat_input_modifier'):
            text, visible_text = extension.chat_input_modifier(text, visible_text, state)

    return text, visible_text


def _first_defining(function_name):
    for extension, _ in iterator():
        if hasattr(extension, function_name):
            return getattr(extension, function_name)

    return None


def _apply_custom_generate_chat_prompt(text, state, **kwargs):
    func = _first_defining('custom_generate_chat_prompt')
    return None if func is None else func(text, state, **kwargs)


def _apply_state_modifier_extensions(state):
    for extension, _ in iterator():
        if hasattr(extension, 'state_modifier'):
            state = extension.state_modifier(state)

    return state


def _apply_history_modifier_extensions(history):
    for extension, _ in iterator():
        if hasattr(extension, 'history_modifier'):
            history = extension.history_modifier(history)

    return history


def _apply_tokenizer_extensions(function_name, state, prompt, input_ids, input_embeds):
    for extension, _ in iterator():
        if hasattr(extension, function_name):
            prompt, input_ids, input_embeds = getattr(extension, function_name)(state, prompt, input_ids, input_embeds)

    return prompt, input_ids, input_embeds


def _apply_logits_processor_extensions(function_name, processor_list, input_ids):
    for extension, _ in iterator():
        if hasattr(extension, function_name):
            result = getattr(extension, function_name)(processor_list, input_ids)
            if type(result) is list:
                processor_list = result

    return processor_list


def _apply_custom_tokenized_length(prompt):
    func = _first_defining('custom_tokenized_length')
    return None if func is None else func(prompt)


def _apply_custom_generate_reply():
    return _first_defining('custom_generate_reply')


def _apply_custom_css():
    return ''.join(extension.custom_css() for extension, _ in iterator() if hasattr(extension, 'custom_css'))


def _apply_custom_js():
    return ''.join(extension.custom_js() for extension, _ in iterator() if hasattr(extension, 'custom_js'))


def _string_hook(function_name):
    def apply(text, state, is_chat=False):
        return _apply_string_extensions(function_name, text, state, is_chat=is_chat)

    return apply


EXTENSION_MAP = {
    'input': _string_hook('input_modifier'),
    'output': _string_hook('output_modifier'),
    'chat_input': _apply_chat_input_extensions,
    'state': _apply_state_modifier_extensions,
    'history': _apply_history_modifier_extensions,
    'bot_prefix': _string_hook('bot_prefix_modifier'),
    'tokenizer': lambda *args: _apply_tokenizer_extensions('tokenizer_modifier', *args),
    'logits_processor': lambda *args: _apply_logits_processor_extensions('logits_processor_modifier', *args),
    'custom_generate_chat_prompt': _apply_custom_generate_chat_prompt,
    'custom_generate_reply': _apply_custom_generate_reply,
    'tokenized_length': _apply_custom_tokenized_length,
    'css': _apply_custom_css,
    'js': _apply_custom_js,
}


def apply_extensions(typ, *args, **kwargs):
    if typ not in EXTENSION_MAP:
        raise ValueError(f'Invalid extension type {typ}')

    return EXTENSION_MAP[typ](*args, **kwargs)


def ui_placement():
    """Where webui would draw each extension's ``ui()`` (extensions.py:209-230), without Gradio.

    Returns ``(block_names, tabs)``: extensions without ``params['is_tab']`` share one column
    below the chat; the others get a tab titled ``params['display_name']`` (default: the name).
    """
    block_names, tabs = [], []
    for extension, name in iterator():
        if not hasattr(extension, 'ui'):
            continue

        params = getattr(extension, 'params', {})
        if params.get('is_tab', False):
            tabs.append((name, params.get('display_name', name)))
        else:
            block_names.append(name)

    return block_names, tabs
