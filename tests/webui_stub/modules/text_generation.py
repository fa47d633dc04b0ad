"""Tokenization and Transformers generation, as in webui modules/text_generation.py @1dcde41d.

Kept: the exact order of ``generate_reply_HF`` (encode with left truncation, then
``auto_max_new_tokens``, then ``tokenizer_modifier``, then ``generate(inputs=…, inputs_embeds=…)``,
reply decoded from ``len(input_ids[0])``), the deep copy of ``state`` for non-streaming requests
with stopping strings, the streaming path that runs ``generate`` in a worker thread, and the
places where exceptions are caught (or not). Dropped: webui's sampler hijack (only standard
Hugging Face sampling arguments reach ``generate``), grammar, negative prompts, tokens/second
throttling and UI-lag skipping of intermediate yields.
"""
import copy
import html
import queue
import random
import threading
import time

from modules import models, shared
from modules.extensions import apply_extensions
from modules.logging_colors import logger
from modules.utils import check_model_loaded


def generate_reply(*args, **kwargs):
    # text_generation.py:19-44: lazy reload after an idle unload, then one generation at a time.
    models.load_model_if_idle_unloaded()
    lock = shared.generation_lock
    if lock is not None:
        lock.acquire()

    try:
        yield from _generate_reply(*args, **kwargs)
    finally:
        models.last_generation_time = time.time()
        if lock is not None:
            lock.release()


def _stop_strings(stopping_strings, custom_stopping_strings):
    import ast

    found = []
    for strings in (stopping_strings, custom_stopping_strings):
        if type(strings) is str:
            strings = ast.literal_eval(f'[{strings}]')  # text_generation.py:74-75: '"a", "b"' in the UI box
        if type(strings) is list and strings:
            found += strings

    return found


def _generate_reply(question, state, stopping_strings=None, is_chat=False, escape_html=False, for_ui=False):
    generate_func = apply_extensions('custom_generate_reply')  # :49, first extension only
    if generate_func is None:
        model_is_loaded, _ = check_model_loaded()
        if not model_is_loaded:
            yield ''
            return

        generate_func = generate_reply_HF

    original_question = question
    if not is_chat:  # :67-69: chat requests ran these hooks in chatbot_wrapper already
        state = apply_extensions('state', state)
        question = apply_extensions('input', question, state)

    all_stop_strings = _stop_strings(stopping_strings, state['custom_stopping_strings'])

    shared.stop_everything = False  # :80, reset before tokenizer_modifier runs
    reply = ''
    is_stream = state['stream']
    if all_stop_strings and not state['stream']:
        # :83-91: the generation (tokenizer_modifier included) gets a deep copy and streams internally.
        # 'stop_event' is popped from the caller's dict and only put back into the copy.
        logits_processor = state.get('logits_processor')
        stop_event = state.pop('stop_event', None)
        state = copy.deepcopy(state)
        if stop_event is not None:
            state['stop_event'] = stop_event
        if logits_processor is not None:
            state['logits_processor'] = logits_processor
        state['stream'] = True

    for reply in generate_func(question, original_question, state, stopping_strings, is_chat=is_chat):
        reply, stop_found = apply_stopping_strings(reply, all_stop_strings)
        if escape_html:
            reply = html.escape(reply)
        if is_stream:
            yield reply

        stop_event = state.get('stop_event')
        if stop_found or shared.stop_everything or (stop_event and stop_event.is_set()):
            break

    if not is_chat:
        reply = apply_extensions('output', reply, state)

    yield reply


def encode(prompt, add_special_tokens=True, add_bos_token=True, truncation_length=None):
    """Prompt string -> ids ``[1, n]`` (int64), Transformers branch of text_generation.py:131-180."""
    import torch

    if shared.tokenizer is None:
        models.load_model_if_idle_unloaded()
        if shared.tokenizer is None:
            raise ValueError('No tokenizer is loaded')

    input_ids = shared.tokenizer.encode(str(prompt), return_tensors='pt', add_special_tokens=add_special_tokens)
    bos_id = getattr(shared.tokenizer, 'bos_token_id', None)
    if bos_id is not None:
        if add_bos_token and (input_ids.shape[1] == 0 or input_ids[0][0] != bos_id):
            input_ids = torch.cat((torch.tensor([[bos_id]]), input_ids), 1)

        # :166-168: drop duplicated leading BOS tokens even when add_bos_token is False,
        # e.g. a template that writes '<s>' plus a tokenizer post-processor that adds one.
        while input_ids.shape[1] > 1 and input_ids[0][0] == bos_id and input_ids[0][1] == bos_id:
            input_ids = input_ids[:, 1:]

    if truncation_length is not None:
        input_ids = input_ids[:, -truncation_length:]  # :171, keeps the newest tokens

    if shared.args.cpu:
        return input_ids

    device = _model_device()
    return input_ids.to(device) if device is not None else input_ids


def _model_device():
    # torch_utils.get_device (torch_utils.py:10-22), without the accelerator fallbacks.
    return getattr(shared.model, 'device', None)


def decode(output_ids, skip_special_tokens=True):
    if shared.tokenizer is None:
        raise ValueError('No tokenizer is loaded')

    return shared.tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)


def get_encoded_length(prompt):
    # :192-197: the first extension's custom_tokenized_length, else the plain token count.
    length = apply_extensions('tokenized_length', prompt)
    if length is not None:
        return length

    return len(encode(prompt)[0])


def get_max_prompt_length(state):
    # :211-212: the max_new_tokens slider counts even when auto_max_new_tokens is on.
    return state['truncation_length'] - state['max_new_tokens']


def stop_everything_event():
    shared.stop_everything = True


def apply_stopping_strings(reply, all_stop_strings):
    """Cut ``reply`` at the first stopping string; else drop a trailing partial one (:262-284)."""
    for string in all_stop_strings:
        position = reply.find(string)
        if position != -1:
            return reply[:position], True

    for string in all_stop_strings:
        for length in range(len(string) - 1, 0, -1):
            if reply.endswith(string[:length]):
                return reply[:-length], False

    return reply, False


def get_reply_from_output_ids(output_ids, state=None, starting_from=0):
    # :287-309: decode the new tokens; restore the leading space SentencePiece marks with '▁'.
    # An id the tokenizer has no token for (a padded vocabulary row) decodes to '' and converts to
    # None, and ``None.startswith`` raises AttributeError, as in webui (seen in a real webui with a
    # llava-hf vocabulary: "'NoneType' object has no attribute 'startswith'").
    reply = decode(output_ids[starting_from:], state['skip_special_tokens'] if state else True)
    if hasattr(shared.tokenizer, 'convert_ids_to_tokens') and len(output_ids) > starting_from and not reply.startswith(' '):
        first_token = shared.tokenizer.convert_ids_to_tokens(int(output_ids[starting_from]))
        if isinstance(first_token, bytes):
            try:
                first_token = first_token.decode('utf8')
            except UnicodeDecodeError:
                first_token = ''
        if first_token.startswith('▁'):
            reply = ' ' + reply

    return reply


class _StopNow(Exception):
    pass


def _StopEverythingCriteria():
    import transformers

    class StopEverything(transformers.StoppingCriteria):
        # transformers_loader.py:27-32: the Stop button ends every running generation.
        def __call__(self, input_ids, scores, **kwargs):
            return shared.stop_everything

    return StopEverything()


def _stream_generate(generate_params):
    """Run ``shared.model.generate`` in a worker thread; yield the sequence after every new token.

    Equivalent of webui's Stream stopping criterion + Iteratorize (transformers_loader.py:35-43,
    callbacks.py:12-67): exceptions raised inside ``generate`` are logged as "Failed in generation
    callback" and end the stream (so the reply is ''); they never reach generate_reply_HF's handler.
    """
    import torch
    import transformers

    updates = queue.Queue()
    finished = object()
    consumer_gone = threading.Event()

    class Stream(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if consumer_gone.is_set() or shared.stop_everything:
                raise _StopNow
            updates.put(input_ids[0])
            return False

    def worker():
        try:
            with torch.no_grad():  # no_grad is thread-local: only the worker thread has it
                shared.model.generate(**generate_params)
        except _StopNow:
            pass
        except Exception:
            logger.exception('Failed in generation callback')
        updates.put(finished)

    generate_params['stopping_criteria'].append(Stream())
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = updates.get()
            if item is finished:
                return
            yield item
    finally:
        consumer_gone.set()
        thread.join()


def generate_reply_HF(question, original_question, state, stopping_strings=None, is_chat=False):
    import torch
    import transformers
    from transformers import LogitsProcessorList

    seed = int(state.get('seed', -1))
    torch.manual_seed(random.randint(1, 2**31) if seed == -1 else seed)

    generate_params = {}
    # Standard Hugging Face sampling arguments only (webui passes ~40 keys through its sampler hijack).
    generate_params['max_new_tokens'] = state['max_new_tokens']
    if 'do_sample' in state:
        generate_params['do_sample'] = state['do_sample']
        if state['do_sample']:
            for key in ('temperature', 'top_p', 'top_k', 'repetition_penalty'):
                if key in state:
                    generate_params[key] = state[key]
    if state.get('ban_eos_token'):
        generate_params['suppress_tokens'] = [shared.tokenizer.eos_token_id]
    generate_params['use_cache'] = not shared.args.no_cache

    # :406-409: left-truncate to truncation_length - max_new_tokens, then size the reply budget
    # from this pre-extension length.
    input_ids = encode(question, add_bos_token=state['add_bos_token'], truncation_length=get_max_prompt_length(state))
    output = input_ids[0]
    if state['auto_max_new_tokens']:
        generate_params['max_new_tokens'] = state['truncation_length'] - input_ids.shape[-1]

    # :412-416: tokenizer_modifier runs here, outside the try block below, so its exceptions
    # propagate to the caller (chat UI error / API HTTP 500).
    question, input_ids, inputs_embeds = apply_extensions('tokenizer', state, question, input_ids, None)
    original_input_ids = input_ids
    generate_params['inputs'] = input_ids
    if inputs_embeds is not None:
        generate_params['inputs_embeds'] = inputs_embeds

    eos_token_ids = [shared.tokenizer.eos_token_id] if shared.tokenizer.eos_token_id is not None else []
    generate_params['eos_token_id'] = eos_token_ids
    generate_params['stopping_criteria'] = transformers.StoppingCriteriaList([_StopEverythingCriteria()])

    processor = state.get('logits_processor', LogitsProcessorList([]))
    if not isinstance(processor, LogitsProcessorList):
        processor = LogitsProcessorList([processor])

    # :435: the return value is discarded, so only in-place appends to `processor` take effect.
    apply_extensions('logits_processor', processor, input_ids)
    generate_params['logits_processor'] = processor

    started = time.time()
    try:
        if not is_chat and not shared.is_seq2seq:
            yield ''

        if not state['stream']:
            with torch.no_grad():
                output = shared.model.generate(**generate_params)[0]
            yield get_reply_from_output_ids(output, state, starting_from=len(input_ids[0]))
        else:
            cumulative_reply = ''
            starting_from = len(input_ids[0])
            for output in _stream_generate(generate_params):
                if output[-1] in eos_token_ids:
                    break

                new_content = get_reply_from_output_ids(output, state, starting_from=starting_from)
                if chr(0xfffd) in new_content:  # an incomplete UTF-8 character: wait for more tokens
                    continue

                cumulative_reply += new_content
                starting_from = len(output)
                yield cumulative_reply
    except Exception:
        logger.exception('Failed to generate reply (HF)')
    finally:
        new_tokens = len(output) - len(original_input_ids[0])
        logger.info(f'Output generated in {time.time() - started:.2f} seconds ({new_tokens} tokens, context {len(original_input_ids[0])})')
