"""Chat prompt building and the chat entry points, as in webui modules/chat.py @1dcde41d.

Reproduced (line numbers refer to that file): Jinja rendering in an immutable sandbox with
``bos_token``/``eos_token`` (:115-146, :351-376); ``<__media__>`` markers for image attachments
put before the text (:320-335, :506-516, :529-536); past rows with empty user text are left out
of the prompt, markers included (:500); the continue/impersonate prompt surgery (:547-615); the
truncation loop (:622-687); hook order and ``state`` handling of ``chatbot_wrapper`` (:1019-1259);
impersonate (:1262-1281), remove-last (:1622-1639), "Start reply with" (:1324-1331), Count tokens
(:695-735). Dropped: tools, thinking blocks, web search, PDF/DOCX attachments, history files,
HTML rendering.
"""
import base64
import copy
import html
import json
import re
from datetime import datetime
from functools import partial
from pathlib import Path

import markupsafe
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from modules import shared, utils
from modules.extensions import apply_extensions
from modules.logging_colors import logger
from modules.text_generation import (
    generate_reply,
    get_encoded_length,
    get_max_prompt_length
)

MEDIA_MARKER = '<__media__>'
GREETING_ROW_MARKER = '<|BEGIN-VISIBLE-CHAT|>'

# Placeholders cut out of rendered prompts; any text absent from real prompts works.
_CONTINUE_PLACEHOLDER = '\x00continue-here\x00'
_IMPERSONATE_PLACEHOLDER = '\x00impersonate-here\x00'
_DROPPED_TURN = '\x00dropped\x00'

# add_message_attachment (:858-872): the MIME type comes from the file extension.
IMAGE_MIME_TYPES = {
    '.jpg': 'image/jpeg',
    '.jpeg': 'image/jpeg',
    '.png': 'image/png',
    '.webp': 'image/webp',
    '.bmp': 'image/bmp',
    '.gif': 'image/gif',
}


def get_current_timestamp():
    return datetime.now().strftime('%b %d, %Y %H:%M')


def update_message_metadata(metadata_dict, role, index, **fields):
    metadata_dict.setdefault(f'{role}_{index}', {}).update(fields)


def _tojson(value, indent=None, ensure_ascii=True):
    return markupsafe.Markup(json.dumps(value, indent=indent, ensure_ascii=ensure_ascii))


def _raise_exception(message):
    raise ValueError(message)


jinja_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
jinja_env.filters['tojson'] = _tojson
jinja_env.globals['raise_exception'] = _raise_exception
jinja_env.globals['strftime_now'] = lambda fmt: datetime.now().strftime(fmt)
_compiled_templates = {}


def get_compiled_template(template_str):
    if template_str not in _compiled_templates:
        _compiled_templates[template_str] = jinja_env.from_string(template_str)
    return _compiled_templates[template_str]


def replace_character_names(text, name1, name2):
    text = text.replace('{{user}}', name1).replace('{{char}}', name2)
    return text.replace('<USER>', name1).replace('<BOT>', name2)


def _format_attachments(attachments, include_text=True):
    """Returns ``(image_refs, attachments_text)``: one marker per image, in attachment order."""
    image_refs = ''
    attachments_text = ''
    for attachment in attachments:
        if attachment.get('type') == 'image':
            image_refs += MEDIA_MARKER
        elif include_text:
            attachments_text += f"\nName: {attachment.get('name', 'file')}\nContents:\n\n=====\n{attachment.get('content', '')}\n=====\n\n"

    return image_refs, attachments_text


def _with_attachments(text, attachments, include_text=True):
    image_refs, attachments_text = _format_attachments(attachments, include_text=include_text)
    if image_refs:
        text = f'{image_refs}\n\n{text}'  # markers first, even before an empty text
    if attachments_text:
        text += f'\n\nATTACHMENTS:\n{attachments_text}'
    return text


def _history_messages(rows, metadata, state):
    """Past rows -> role/content messages, oldest first (the loop at :394-516 without tools)."""
    messages = []
    for row_idx, row in enumerate(rows):
        user_text = row[0].strip()
        assistant_text = row[1].strip()
        row_meta = row[3] if len(row) > 3 else {}

        if row_meta.get('role') == 'system':
            if user_text:
                messages.append({'role': 'system', 'content': user_text})
        elif user_text not in ('', GREETING_ROW_MARKER):
            # :500: a past row whose user text is empty (an image-only message) is skipped
            # entirely, so its images get no marker although image_attachments lists them.
            attachments = metadata.get(f'user_{row_idx}', {}).get('attachments')
            if attachments is not None:
                user_text = _with_attachments(user_text, attachments, include_text=state.get('include_past_attachments', True))
            messages.append({'role': 'user', 'content': user_text})

        if assistant_text:
            messages.append({'role': 'assistant', 'content': assistant_text})

    return messages


def generate_chat_prompt(user_input, state, **kwargs):
    impersonate = kwargs.get('impersonate', False)
    _continue = kwargs.get('_continue', False)
    history_data = kwargs.get('history', state['history'])
    rows = history_data['internal']
    metadata = history_data.get('metadata', {})
    mode = state['mode']
    name1, name2 = state['name1'], state['name2']

    chat_template_str = state['chat_template_str']
    if mode != 'instruct':
        chat_template_str = replace_character_names(chat_template_str, name1, name2)

    render_instruct = partial(
        get_compiled_template(state['instruction_template_str']).render,
        add_generation_prompt=False,
        builtin_tools=None,
        tools=state.get('tools'),
        tools_in_user_message=False,
        enable_thinking=state.get('enable_thinking', True),
        thinking=state.get('enable_thinking', True),
        reasoning_effort=state.get('reasoning_effort', 'medium'),
        preserve_thinking=state.get('preserve_thinking', False),
        bos_token=shared.bos_token,
        eos_token=shared.eos_token,
    )
    render_chat = partial(
        get_compiled_template(chat_template_str).render,
        add_generation_prompt=False,
        name1=name1,
        name2=name2,
        user_bio=replace_character_names(state['user_bio'], name1, name2),
        tools=state.get('tools'),
    )

    messages = []
    if mode == 'instruct':
        render = render_instruct
        if state['custom_system_message'].strip() != '':
            messages.append({'role': 'system', 'content': state['custom_system_message']})
    else:
        render = render_chat
        if state['context'].strip() != '' or state['user_bio'].strip() != '':
            messages.append({'role': 'system', 'content': replace_character_names(state['context'], name1, name2)})

    messages += _history_messages(rows, metadata, state)

    user_input = user_input.strip()
    if not (impersonate or _continue):
        current_key = f'user_{len(rows)}'
        has_attachments = current_key in metadata and 'attachments' in metadata[current_key]
        if user_input or has_attachments:
            if has_attachments:
                user_input = _with_attachments(user_input, metadata[current_key]['attachments'])
            messages.append({'role': 'user', 'content': user_input})

    if impersonate and mode != 'chat-instruct':
        messages.append({'role': 'user', 'content': _IMPERSONATE_PLACEHOLDER})

    def make_prompt(messages):
        if _continue:
            messages = copy.deepcopy(messages)
        last_message = messages[-1].copy()
        if _continue:
            if mode == 'chat-instruct':
                messages = messages[:-1]
            else:
                # Render the partial reply as a normal turn, then cut the text at its start.
                messages[-1]['content'] = _CONTINUE_PLACEHOLDER
                messages.append({'role': 'assistant', 'content': _DROPPED_TURN})

        add_generation_prompt = (not _continue and not impersonate) if mode != 'chat-instruct' else False
        prompt = render(messages=messages, add_generation_prompt=add_generation_prompt)

        if mode == 'chat-instruct':
            # :568-587: the whole chat transcript (markers included) becomes one instruct user turn.
            command = state['chat-instruct_command']
            command = command.replace('<|character|>', name2 if not impersonate else name1)
            command = replace_character_names(command.replace('<|prompt|>', prompt), name1, name2)
            outer = []
            if state['custom_system_message'].strip() != '':
                outer.append({'role': 'system', 'content': state['custom_system_message']})
            outer.append({'role': 'user', 'content': command})
            if _continue:
                outer.append(dict(last_message, content=_CONTINUE_PLACEHOLDER))
                outer.append({'role': 'assistant', 'content': _DROPPED_TURN})
            prompt = render_instruct(messages=outer, add_generation_prompt=not _continue)

        if _continue:
            prompt = prompt.split(_CONTINUE_PLACEHOLDER, 1)[0] + last_message.get('content', '')
        if impersonate:
            prompt = prompt.split(_IMPERSONATE_PLACEHOLDER, 1)[0] + user_input
        if mode in ('chat', 'chat-instruct') and not impersonate and not _continue:
            prompt += apply_extensions('bot_prefix', '', state)

        return prompt

    prompt = make_prompt(messages)

    # :622-687: drop one message at a time (never a leading system message); when only the
    # current message is left, keep the longest character prefix that fits.
    if shared.tokenizer is not None:
        max_length = get_max_prompt_length(state)
        encoded_length = get_encoded_length(prompt)
        while len(messages) > 0 and encoded_length > max_length:
            if len(messages) > 2 and messages[0]['role'] == 'system':
                messages.pop(1)
            elif len(messages) > 1 and messages[0]['role'] != 'system':
                messages.pop(0)
            else:
                full_text = messages[-1]['content']
                low, high = 0, len(full_text)
                while low < high:
                    middle = (low + high + 1) // 2
                    messages[-1]['content'] = full_text[:middle]
                    if get_encoded_length(make_prompt(messages)) <= max_length:
                        low = middle
                    else:
                        high = middle - 1

                messages[-1]['content'] = full_text[:low]
                prompt = make_prompt(messages)
                if get_encoded_length(prompt) > max_length:
                    logger.error(f"Failed to build the chat prompt. The input is too long for the available context length.\n\nTruncation length: {state['truncation_length']}\nmax_new_tokens: {state['max_new_tokens']} (is it too high?)\nAvailable context length: {max_length}\n")
                    raise ValueError

                logger.warning(f'User message truncated from {get_encoded_length(full_text)} to {get_encoded_length(full_text[:low])} tokens.')
                break

            prompt = make_prompt(messages)
            encoded_length = get_encoded_length(prompt)

    return prompt


def count_prompt_tokens(text_input, state):
    """The chat tab's "History + Input" counter (:695-735): no custom_generate_chat_prompt."""
    if shared.tokenizer is None:
        return 'Tokenizer not available'

    try:
        files = text_input.get('files', []) if isinstance(text_input, dict) else []
        text = text_input.get('text', '') if isinstance(text_input, dict) else text_input
        temp_history = copy.deepcopy(state['history'])
        temp_history.setdefault('metadata', {})
        for file_path in files:
            add_message_attachment(temp_history, len(temp_history['internal']), file_path, is_user=True)

        temp_state = copy.deepcopy(state)
        temp_state['history'] = temp_history
        current_tokens = get_encoded_length(generate_chat_prompt(text, temp_state))
        max_tokens = temp_state['truncation_length']
        percentage = (current_tokens / max_tokens) * 100 if max_tokens > 0 else 0
        return f'History + Input:<br/>{current_tokens:,} / {max_tokens:,} tokens ({percentage:.1f}%)'
    except Exception as error:
        logger.error(f'Error counting tokens: {error}')
        return f'Error: {error}'


def get_stopping_strings(state):
    """Turn separators guessed by rendering a fake two-turn chat (:738-810)."""
    renderers = []
    if state['mode'] in ('instruct', 'chat-instruct'):
        renderers.append(partial(get_compiled_template(state['instruction_template_str']).render,
                                 add_generation_prompt=False, bos_token=shared.bos_token, eos_token=shared.eos_token))
    if state['mode'] == 'chat':
        renderers.append(partial(get_compiled_template(state['chat_template_str']).render,
                                 add_generation_prompt=False, name1=state['name1'], name2=state['name2']))

    turns = ['first user message', 'first assistant message', 'second user message', 'second assistant message']
    fake_messages = [{'role': role, 'content': text} for role, text in zip(['user', 'assistant'] * 2, turns)]

    found = []
    for render in renderers:
        prompt = render(messages=fake_messages)
        starts = [prompt.find(text) for text in turns]
        gaps = [
            prompt[starts[0] + len(turns[0]):starts[1]],
            prompt[starts[1] + len(turns[1]):starts[2]],
            prompt[starts[3] + len(turns[3]):],
        ]
        for gap in gaps:
            stripped = gap.strip()
            for opener, closer in (('<', '>'), ('[', ']'), ('(', ')'), ('{', '}')):
                if stripped.startswith(opener) and closer in stripped:
                    found.append(stripped.split(closer)[0] + closer)
                    break
            else:
                if ':' in gap:
                    found.append(gap.split(':')[0] + ':')

    if isinstance(state.get('stopping_strings'), list):
        found += state.pop('stopping_strings')

    return list({s for s in found if not any(s.startswith(other) and s != other for other in found)})


def add_message_version(history, role, row_idx, is_current=True):
    entry = history.setdefault('metadata', {}).setdefault(f'{role}_{row_idx}', {})
    versions = entry.setdefault('versions', [])
    column = 0 if role == 'user' else 1
    versions.append({
        'content': history['internal'][row_idx][column],
        'visible_content': history['visible'][row_idx][column],
        'timestamp': get_current_timestamp(),
    })
    if is_current:
        entry['current_version_index'] = len(versions) - 1


def add_message_attachment(history, row_idx, file_path, is_user=True):
    """Store an uploaded image as a data URL in ``metadata['user_<row>']['attachments']`` (:839-916).

    ``image_id`` counts images within this one message, starting at 1. Other files are stored
    as text attachments (webui also extracts PDF/DOCX text).
    """
    entry = history.setdefault('metadata', {}).setdefault(f"{'user' if is_user else 'assistant'}_{row_idx}",
                                                           {'timestamp': get_current_timestamp()})
    attachments = entry.setdefault('attachments', [])
    path = Path(file_path)
    try:
        suffix = path.suffix.lower()
        if suffix in IMAGE_MIME_TYPES:
            encoded = base64.b64encode(path.read_bytes()).decode('utf-8')
            attachment = {
                'name': path.name,
                'type': 'image',
                'image_data': f'data:{IMAGE_MIME_TYPES[suffix]};base64,{encoded}',
                'image_id': sum(1 for a in attachments if a.get('type') == 'image') + 1,
            }
        else:
            attachment = {'name': path.name, 'type': 'text/plain', 'content': path.read_text(encoding='utf-8')}
        attachments.append(attachment)
        return attachment
    except Exception as error:
        logger.error(f'Error processing attachment {path.name}: {error}')
        return None


def chatbot_wrapper(text, state, regenerate=False, _continue=False, loading_message=True, for_ui=False):
    files = []
    if isinstance(text, dict):
        files = text.get('files', [])
        text = text.get('text', '')

    output = copy.deepcopy(state['history'])
    output = apply_extensions('history', output)
    state = apply_extensions('state', state)

    # :1035-1037: the template is expected to write the BOS token itself.
    if state['mode'] in ('instruct', 'chat-instruct'):
        state['add_bos_token'] = False

    output.setdefault('metadata', {})
    visible_text = None
    stopping_strings = get_stopping_strings(state)
    is_stream = state['stream']

    if not (regenerate or _continue):
        visible_text = html.escape(text)
        row_idx = len(output['internal'])
        for file_path in files:
            add_message_attachment(output, row_idx, file_path, is_user=True)

        text, visible_text = apply_extensions('chat_input', text, visible_text, state)
        text = apply_extensions('input', text, state, is_chat=True)

        output['internal'].append([text, ''])
        output['visible'].append([visible_text, ''])
        update_message_metadata(output['metadata'], 'user', row_idx, timestamp=get_current_timestamp())
        if loading_message:
            yield {
                'visible': output['visible'][:-1] + [[output['visible'][-1][0], shared.processing_message]],
                'internal': output['internal'],
                'metadata': output['metadata'],
            }
    else:
        text, visible_text = output['internal'][-1][0], output['visible'][-1][0]
        if regenerate:
            row_idx = len(output['internal']) - 1
            key = f'assistant_{row_idx}'
            if not output['metadata'].get(key, {}).get('versions'):
                add_message_version(output, 'assistant', row_idx, is_current=False)
            versions = output['metadata'][key]['versions']
            versions.append({'content': '', 'visible_content': '', 'timestamp': get_current_timestamp()})
            output['metadata'][key]['current_version_index'] = len(versions) - 1
            if loading_message:
                yield {
                    'visible': output['visible'][:-1] + [[visible_text, shared.processing_message]],
                    'internal': output['internal'][:-1] + [[text, '']],
                    'metadata': output['metadata'],
                }
        elif _continue:
            last_reply = [output['internal'][-1][1], output['visible'][-1][1]]
            if loading_message:
                yield {
                    'visible': output['visible'][:-1] + [[visible_text, last_reply[1] + '...']],
                    'internal': output['internal'],
                    'metadata': output['metadata'],
                }

    row_idx = len(output['internal']) - 1
    version_meta = output['metadata'].get(f'assistant_{row_idx}')
    sync_versions = version_meta is not None and 'current_version_index' in version_meta

    # :1123-1135: every image of every user row, oldest first, current row included; collected
    # before truncation and never pruned. The key is absent when there are no images.
    image_attachments = []
    for i in range(len(output['internal'])):
        for attachment in output['metadata'].get(f'user_{i}', {}).get('attachments', []):
            if attachment.get('type') == 'image':
                image_attachments.append(attachment)
    if image_attachments:
        state['image_attachments'] = image_attachments

    # :1138-1144: the history kwarg excludes the current row's texts unless continuing; its
    # metadata (and so the current row's attachments) is complete.
    kwargs = {
        '_continue': _continue,
        'history': output if _continue else {
            key: (value[:-1] if key in ('internal', 'visible') else value) for key, value in output.items()
        },
    }
    prompt = apply_extensions('custom_generate_chat_prompt', text, state, **kwargs)
    if prompt is None:
        prompt = generate_chat_prompt(text, state, **kwargs)

    update_message_metadata(output['metadata'], 'assistant', row_idx, timestamp=get_current_timestamp(), model_name=shared.model_name)

    reply = None
    for j, reply in enumerate(generate_reply(prompt, state, stopping_strings=stopping_strings, is_chat=True, for_ui=for_ui)):
        if state['mode'] in ('chat', 'chat-instruct'):
            if not _continue:
                reply = reply.lstrip()
            for name in (state['name2'], state['name1']):
                if reply.startswith(name + ':'):
                    reply = reply[len(name + ':'):]
                    break
            visible_reply = re.sub('(<USER>|<user>|{{user}})', state['name1'], reply)
        else:
            visible_reply = reply

        visible_reply = html.escape(visible_reply)
        if shared.stop_everything:
            output['visible'][-1][1] = apply_extensions('output', output['visible'][-1][1], state, is_chat=True)
            yield output
            return

        if _continue:
            output['internal'][-1] = [text, last_reply[0] + reply]
            output['visible'][-1] = [visible_text, last_reply[1] + visible_reply]
        elif not (j == 0 and visible_reply.strip() == ''):
            output['internal'][-1] = [text, reply.lstrip(' ')]
            output['visible'][-1] = [visible_text, visible_reply.lstrip(' ')]

        if sync_versions:
            version_meta['versions'][version_meta['current_version_index']].update({
                'content': output['internal'][row_idx][1],
                'visible_content': output['visible'][row_idx][1],
            })

        if is_stream:
            yield output

    if _continue:
        full_internal = output['internal'][-1][1]
        if state['mode'] in ('chat', 'chat-instruct'):
            full_internal = re.sub('(<USER>|<user>|{{user}})', state['name1'], full_internal)
        output['visible'][-1][1] = apply_extensions('output', html.escape(full_internal), state, is_chat=True)
    else:
        output['visible'][-1][1] = apply_extensions('output', output['visible'][-1][1], state, is_chat=True)

    if sync_versions:
        version_meta['versions'][version_meta['current_version_index']].update({
            'content': output['internal'][row_idx][1],
            'visible_content': output['visible'][row_idx][1],
        })

    yield output


def generate_chat_reply(text, state, regenerate=False, _continue=False, loading_message=True, for_ui=False):
    history = state['history']
    if regenerate or _continue:
        text = ''
        if (len(history['visible']) == 1 and not history['visible'][0][0]) or len(history['internal']) == 0:
            yield history
            return

    yield from chatbot_wrapper(text, state, regenerate=regenerate, _continue=_continue, loading_message=loading_message, for_ui=for_ui)


def character_is_loaded(state, raise_exception=False):
    if state['mode'] in ('chat', 'chat-instruct') and state['name2'] == '':
        logger.error('It looks like no character is loaded. Please load one under Parameters > Character.')
        if raise_exception:
            raise ValueError
        return False
    return True


def generate_chat_reply_wrapper(text, state, regenerate=False, _continue=False):
    """The Send / Regenerate / Continue buttons (:1307-1619), yielding histories instead of HTML."""
    if not character_is_loaded(state):
        return

    model_is_loaded, error_message = utils.check_model_loaded()
    if not model_is_loaded:
        raise RuntimeError(error_message)  # gr.Error in webui

    if state['start_with'] != '' and not _continue:
        # :1324-1331: "Start reply with" turns the request into a continue; only the text of the
        # chat box is kept, attached files are dropped.
        if regenerate:
            text, state['history'] = remove_last_message(state['history'])
            regenerate = False
        _continue = True
        send_dummy_message(text, state)
        send_dummy_reply(state['start_with'], state)

    history = state['history']
    for history in generate_chat_reply(text, state, regenerate, _continue, loading_message=True, for_ui=True):
        yield history

    state['history'] = history


def impersonate_wrapper(textbox, state):
    """The Impersonate button (:1262-1281): no custom_generate_chat_prompt, no chat hooks, and
    ``state`` is not modified (``add_bos_token`` stays as set, no ``image_attachments``)."""
    text = textbox['text']
    model_is_loaded, error_message = utils.check_model_loaded()
    if not model_is_loaded:
        raise RuntimeError(error_message)

    prompt = generate_chat_prompt('', state, impersonate=True)
    stopping_strings = get_stopping_strings(state)
    textbox['text'] = text + '...'
    yield textbox
    for reply in generate_reply(prompt + text, state, stopping_strings=stopping_strings, is_chat=True):
        textbox['text'] = (text + reply).lstrip(' ')
        yield textbox
        if shared.stop_everything:
            return


def remove_last_message(history):
    history.setdefault('metadata', {})
    if len(history['visible']) > 0 and history['internal'][-1][0] != GREETING_ROW_MARKER:
        row_idx = len(history['internal']) - 1
        last = history['visible'].pop()
        history['internal'].pop()
        history['metadata'].pop(f'user_{row_idx}', None)
        history['metadata'].pop(f'assistant_{row_idx}', None)
    else:
        last = ['', '']

    return html.unescape(last[0]), history


def handle_remove_last_click(state):
    # :2417-2422: the text goes back to the chat box, the attachments do not.
    last_input, history = remove_last_message(state['history'])
    return [history, {'text': last_input, 'files': []}]


def send_dummy_message(text, state):
    history = state['history']
    if isinstance(text, dict):
        text = text['text']

    history.setdefault('metadata', {})
    row_idx = len(history['internal'])
    history['visible'].append([html.escape(text), ''])
    history['internal'].append([apply_extensions('input', text, state, is_chat=True), ''])
    update_message_metadata(history['metadata'], 'user', row_idx, timestamp=get_current_timestamp())
    return history


def send_dummy_reply(text, state):
    history = state['history']
    if isinstance(text, dict):
        text = text['text']

    history.setdefault('metadata', {})
    if len(history['visible']) > 0 and history['visible'][-1][1] != '':
        history['visible'].append(['', ''])
        history['internal'].append(['', ''])

    row_idx = len(history['internal']) - 1
    history['visible'][-1][1] = html.escape(text)
    history['internal'][-1][1] = apply_extensions('input', text, state, is_chat=True)
    update_message_metadata(history['metadata'], 'assistant', row_idx, timestamp=get_current_timestamp())
    return history


def start_new_chat(state):
    """A new chat (:1690-1709): in chat modes row 0 is the greeting, passed through output_modifier."""
    history = {'internal': [], 'visible': [], 'metadata': {}}
    if state['mode'] != 'instruct':
        greeting = replace_character_names(state['greeting'], state['name1'], state['name2'])
        if greeting != '':
            history['internal'].append([GREETING_ROW_MARKER, greeting])
            history['visible'].append(['', apply_extensions('output', html.escape(greeting), state, is_chat=True)])
            update_message_metadata(history['metadata'], 'assistant', 0, timestamp=get_current_timestamp())

    return history
