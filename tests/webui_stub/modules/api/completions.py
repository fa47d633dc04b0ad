"""``/v1/chat/completions`` and ``/v1/completions`` request handling, as in webui
modules/api/completions.py @1dcde41d (no HTTP layer, no tools, no logprobs, no presets).

What an extension sees, reproduced:
- chat: every user message with images becomes ``"<__media__>"*k + "\\n\\n" + " ".join(texts)``
  in the history text *and* the current input (:375-400, :402-473); the image bytes stay only
  in ``state['history']['messages']`` and ``state['messages']`` (the request's message list);
  ``image_attachments`` and ``raw_images`` are absent; default mode 'instruct'; a missing
  ``max_tokens`` means 512 with ``auto_max_new_tokens`` (:582-584);
- non-streaming chat always has stopping strings, so text_generation deep-copies ``state``
  before tokenizer_modifier;
- completions with ``messages``: the prompt is the text parts concatenated with no marker, and
  ``state['raw_images']`` holds the decoded PIL images (:803-852).
"""
import copy
import time

from modules import shared
from modules.api.errors import InvalidRequestError
from modules.chat import generate_chat_prompt, generate_chat_reply
from modules.image_utils import convert_openai_messages_to_images
from modules.logging_colors import logger
from modules.models_settings import load_instruction_template
from modules.text_generation import encode, generate_reply

# Defaults of modules/api/typing.py GenerationOptions (:10-58) for the keys the stand-in reads.
GENERATION_DEFAULTS = {
    'preset': None,
    'temperature': 1.0,
    'top_p': 0.95,
    'top_k': 0,
    'repetition_penalty': 1.0,
    'do_sample': True,
    'max_tokens_second': 0,
    'auto_max_new_tokens': False,
    'ban_eos_token': False,
    'add_bos_token': True,
    'enable_thinking': True,
    'reasoning_effort': 'medium',
    'preserve_thinking': False,
    'skip_special_tokens': True,
    'truncation_length': 0,
    'seed': -1,
}

# ChatCompletionRequestParams (:147-203); field names as in the model's __dict__ (to_dict, :346).
CHAT_REQUEST_DEFAULTS = {
    'model': None,
    'max_tokens': None,
    'stop': None,
    'stream': False,
    'tools': None,
    'mode': 'instruct',
    'instruction_template': None,
    'instruction_template_str': None,
    'character': None,
    'bot_name': None,
    'context': None,
    'greeting': None,
    'user_name': None,
    'user_bio': None,
    'chat_template_str': None,
    'chat_instruct_command': 'Continue the chat dialogue below. Write a single reply for the character "<|character|>".\n\n<|prompt|>',
    'continue_': False,
}

# CompletionRequestParams (:103-128).
COMPLETION_REQUEST_DEFAULTS = {
    'model': None,
    'prompt': None,
    'messages': None,
    'echo': False,
    'max_tokens': 512,
    'stop': None,
    'stream': False,
    'suffix': None,
}


def chat_request(**fields):
    """A request body as webui's handler receives it: defaults filled in, like pydantic would."""
    return {**GENERATION_DEFAULTS, **CHAT_REQUEST_DEFAULTS, **fields}


def completion_request(**fields):
    if fields.get('prompt') is None and fields.get('messages') is None:
        raise InvalidRequestError("Either 'prompt' or 'messages' must be provided", param='prompt')
    return {**GENERATION_DEFAULTS, **COMPLETION_REQUEST_DEFAULTS, **fields}


def process_parameters(body):
    # :321-372 without presets and logit_bias.
    params = body
    params['max_new_tokens'] = body.pop('max_tokens')
    if params['truncation_length'] == 0:
        params['truncation_length'] = shared.settings['truncation_length']
    if params['temperature'] == 0:
        params['do_sample'] = False
        params['top_k'] = 1

    params['custom_stopping_strings'] = []
    if isinstance(body.get('stop'), str):
        params['custom_stopping_strings'] = [body['stop']]
    elif isinstance(body.get('stop'), list):
        params['custom_stopping_strings'] = body['stop']

    # :343-369: chat's ``logprobs: true`` takes its count from ``top_logprobs`` (default 5); the request's
    # LogprobProcessor becomes state['logits_processor'], ahead of any processor an extension appends.
    logprobs = body.get('logprobs')
    if logprobs is True:
        logprobs = max(body.get('top_logprobs') or 1, 1) if body.get('top_logprobs') is not None else 5
        params['logprobs'] = logprobs
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs > 0:
        from transformers import LogitsProcessorList

        from modules.transformers_loader import LogprobProcessor

        params['logprob_proc'] = LogprobProcessor(logprobs)
        params['logits_processor'] = LogitsProcessorList([params['logprob_proc']])

    return params


def _chat_logprobs(alternatives_list):
    """format_chat_logprobs (:221-254) for the stand-in's ``{token: logprob}`` entries."""
    content = [{'token': next(iter(alternatives)), 'logprob': next(iter(alternatives.values())),
                'top_logprobs': [{'token': token, 'logprob': value} for token, value in alternatives.items()]}
               for alternatives in alternatives_list if alternatives]
    return {'content': content} if content else None


def _completion_logprobs(alternatives_list):
    """format_completion_logprobs (:257-318), tokens and top candidates only."""
    entries = [alternatives for alternatives in alternatives_list if alternatives]
    if not entries:
        return None
    return {'tokens': [next(iter(a)) for a in entries], 'token_logprobs': [next(iter(a.values())) for a in entries],
            'top_logprobs': entries}


def process_multimodal_content(content):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return str(content)

    texts = [part.get('text', '') for part in content if isinstance(part, dict) and part.get('type') == 'text']
    markers = ''.join('<__media__>' for part in content if isinstance(part, dict) and part.get('type') == 'image_url')
    text = ' '.join(texts)
    return f'{markers}\n\n{text}' if markers else text


def convert_history(history):
    """OpenAI messages -> ``(user_input, system_message, webui history)`` (:402-473, no tool calls)."""
    rows = []
    pending_user = ''
    user_input = ''
    user_input_last = True
    system_message = ''
    seen_non_system = False

    for entry in history:
        content, role = entry['content'], entry['role']
        if role == 'user':
            seen_non_system = True
            content = process_multimodal_content(content)
            user_input = content
            user_input_last = True
            if pending_user:
                rows.append([pending_user, '', '', {}])
            pending_user = content
        elif role == 'assistant':
            seen_non_system = True
            user_input_last = False
            rows.append([pending_user, content, '', {}])
            pending_user = ''
        elif role in ('system', 'developer'):
            if not seen_non_system:
                system_message += f'\n{content}' if system_message else content
            else:
                if pending_user:
                    rows.append([pending_user, '', '', {}])
                    pending_user = ''
                rows.append([content, '', '', {'role': 'system'}])

    if not user_input_last:
        user_input = ''

    # The last user message is not a row: it is the current input. No 'metadata' key at all.
    return user_input, system_message, {
        'internal': rows,
        'visible': copy.deepcopy(rows),
        'messages': history,
    }


def _validate_messages(messages):
    for message in messages:
        if 'role' not in message:
            raise InvalidRequestError('messages: missing role', param='messages')
        content = message.get('content')
        if content is None:
            raise InvalidRequestError('messages: missing content', param='messages')
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get('type') not in ('text', 'image_url'):
                    raise InvalidRequestError('messages: unsupported content type', param='messages')
                if part['type'] == 'image_url' and 'url' not in part.get('image_url', {}):
                    raise InvalidRequestError('messages: missing image_url in content item', param='messages')


def _chat_state(body, stream):
    """The ``state`` dict a chat completion generates with (``generate_params`` at :529-584)."""
    if 'messages' not in body:
        raise InvalidRequestError('messages is required', param='messages')
    _validate_messages(body['messages'])

    params = process_parameters(body)
    if body['instruction_template_str']:
        instruction_template_str = body['instruction_template_str']
    elif body['instruction_template']:
        instruction_template_str = load_instruction_template(body['instruction_template'])
    else:
        instruction_template_str = shared.settings['instruction_template_str']

    # The default 'Assistant' character (user_data/characters/Assistant.yaml) has the same
    # name, greeting and context as the default settings.
    user_input, custom_system_message, history = convert_history(body['messages'])
    params.update({
        'mode': body['mode'],
        'name1': body['user_name'] or shared.default_settings['name1'],
        'name2': body['bot_name'] or shared.default_settings['name2'],
        'context': body['context'] or shared.default_settings['context'],
        'greeting': body['greeting'] or shared.default_settings['greeting'],
        'user_bio': body['user_bio'] or '',
        'instruction_template_str': instruction_template_str,
        'custom_system_message': custom_system_message,
        'chat_template_str': body['chat_template_str'] or shared.default_settings['chat_template_str'],
        'chat-instruct_command': body['chat_instruct_command'] or shared.default_settings['chat-instruct_command'],
        'tools': None,
        'history': history,
        'stream': stream,
    })
    if params['max_new_tokens'] is None:
        params['max_new_tokens'] = 512
        params['auto_max_new_tokens'] = True
    elif params['max_new_tokens'] <= 0:
        raise InvalidRequestError('max_tokens must be greater than 0.', param='max_tokens')
    params.pop('model')
    return user_input, params


def chat_completions_common(body, stream=False, prompt_only=False, stop_event=None):
    """Yields the OpenAI-shaped response (non-streaming) or content chunks (streaming)."""
    user_input, state = _chat_state(body, stream)
    if stop_event is not None:
        state['stop_event'] = stop_event

    if prompt_only:  # /v1/internal/chat-prompt: webui's builder directly, no custom_generate_chat_prompt
        yield {'prompt': generate_chat_prompt(user_input, state, _continue=body['continue_'])}
        return

    logprob_proc = state.pop('logprob_proc', None)
    answer = ''
    seen = ''
    if stream:  # :667: the role chunk goes out before the prompt is built (and before any extension hook)
        yield {'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None, 'logprobs': None}]}
    for history in generate_chat_reply(user_input, state, regenerate=False, _continue=body['continue_'], loading_message=False):
        answer = history['internal'][-1][1]
        if stream and len(answer) > len(seen):
            chunk = {'choices': [{'index': 0, 'delta': {'content': answer[len(seen):]}, 'finish_reason': None, 'logprobs': None}]}
            if logprob_proc:
                chunk['choices'][0]['logprobs'] = _chat_logprobs([logprob_proc.token_alternatives])
            yield chunk
            seen = answer

    if stream:
        yield {'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]}
        return

    yield {
        'object': 'chat.completion',
        'created': int(time.time()),
        'model': shared.model_name,
        'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': answer},
                     'logprobs': _chat_logprobs(logprob_proc.token_alternatives_history) if logprob_proc else None}],
        # Under Transformers the model has no last_prompt_token_count, so webui reports 0.
        'usage': {'prompt_tokens': 0, 'completion_tokens': len(encode(answer)[0]) if answer else 0},
    }


def chat_completions(body, stop_event=None):
    return next(iter(chat_completions_common(chat_request(**body), stream=False, stop_event=stop_event)))


def stream_chat_completions(body, stop_event=None):
    yield from chat_completions_common(chat_request(**body), stream=True, stop_event=stop_event)


def completions_common(body, stream=False, stop_event=None):
    if body['prompt'] is None:
        # :804-820: the text parts of all messages concatenated; images leave no marker.
        prompt_text = ''
        for message in body.get('messages') or []:
            if isinstance(message, dict) and 'content' in message:
                content = message['content']
                if isinstance(content, str):
                    prompt_text += content
                elif isinstance(content, list):
                    prompt_text += ''.join(part.get('text', '') for part in content if isinstance(part, dict) and part.get('type') == 'text')
        body['prompt'] = prompt_text

    params = process_parameters(body)
    if params['max_new_tokens'] is None:
        params['max_new_tokens'] = 512
        params['auto_max_new_tokens'] = True
    params['stream'] = stream
    if stop_event is not None:
        params['stop_event'] = stop_event
    params.pop('model')

    if body.get('messages'):
        params['messages'] = body['messages']
        raw_images = convert_openai_messages_to_images(params['messages'])
        if raw_images:
            logger.info(f'Found {len(raw_images)} image(s) in request.')
            params['raw_images'] = raw_images

    logprob_proc = params.pop('logprob_proc', None)
    prompt = body['prompt']
    answer = ''
    seen = ''
    if stream:  # :1020-1030: the first chunk goes out before generation (and before any extension hook)
        yield {'choices': [{'index': 0, 'text': '', 'finish_reason': None, 'logprobs': None}]}
    for answer in generate_reply(prompt, params, is_chat=False):
        if stream and len(answer) > len(seen):
            chunk = {'choices': [{'index': 0, 'text': answer[len(seen):], 'logprobs': None}]}
            if logprob_proc:
                chunk['choices'][0]['logprobs'] = _completion_logprobs([logprob_proc.token_alternatives])
            yield chunk
            seen = answer

    if not stream:
        yield {
            'object': 'text_completion',
            'model': shared.model_name,
            'choices': [{'index': 0, 'finish_reason': 'stop', 'text': answer,
                         'logprobs': _completion_logprobs(logprob_proc.token_alternatives_history) if logprob_proc else None}],
            'usage': {'prompt_tokens': len(encode(prompt)[0])},
        }


def completions(body, stop_event=None):
    return next(iter(completions_common(completion_request(**body), stream=False, stop_event=stop_event)))


def stream_completions(body, stop_event=None):
    yield from completions_common(completion_request(**body), stream=True, stop_event=stop_event)
