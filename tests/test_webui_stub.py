"""The webui stand-in (tests/webui_stub) reproduces the observations of webui-host.md.

Each test drives a do-nothing extension (written to tmp_path) through `WebuiHarness` with a tiny
random Llama and checks one documented behaviour of webui @1dcde41d: hook order per entry point,
the `<__media__>` marker format, `image_attachments`, BOS handling, truncation, state copies and
what `model.generate` receives.
"""
import base64
import logging
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import tiny_llava
from webui_harness import WebuiHarness, data_url, image_part, text_part

# The stand-in's modules; importing webui_harness put tests/webui_stub on sys.path.
from modules import extensions, image_utils, models, shared, text_generation  # noqa: E402

MARKER = '<__media__>'

# A Vicuna/LLaVA-v1-style instruct template (our own) that writes the BOS token itself, like the
# test model's chat_template.jinja in webui-host.md §14.
LLAVA_LIKE_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n\\n' -}}"
    "{%- elif m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + '\\n' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + m['content'] + '</s>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

DUMMY_SCRIPT = '''
"""A do-nothing extension that snapshots what each hook sees at call time."""
import torch

from modules import chat, shared
from modules.text_generation import encode

params = {'display_name': 'Dummy', 'is_tab': False, 'level': 1}
LOG = []
SETUP_PARAMS = []
BEHAVIOUR = {}


def _note(hook, state=None, **extra):
    entry = {'hook': hook, **extra}
    if state is not None:
        entry.update(state_id=id(state), has_images='image_attachments' in state,
                     has_raw_images='raw_images' in state, add_bos_token=state.get('add_bos_token'))
    LOG.append(entry)


def setup():
    SETUP_PARAMS.append(dict(params))


def history_modifier(history):
    _note('history', rows=len(history['internal']))
    return history


def state_modifier(state):
    _note('state', state)
    return state


def chat_input_modifier(text, visible_text, state):
    _note('chat_input', state, text=text, visible_text=visible_text)
    return text, visible_text


def input_modifier(string, state, is_chat=False):
    _note('input', state, text=string, is_chat=is_chat)
    return string


def bot_prefix_modifier(string, state):
    _note('bot_prefix', state, text=string)
    return string


def custom_generate_chat_prompt(user_input, state, **kwargs):
    _note('custom_generate_chat_prompt', state, user_input=user_input, kwargs=kwargs,
          history_rows=len(state['history']['internal']))
    if BEHAVIOUR.get('own_prompt') is not None:
        return BEHAVIOUR['own_prompt']
    return chat.generate_chat_prompt(user_input, state, **kwargs)


def custom_tokenized_length(prompt):
    _note('tokenized_length', prompt=prompt)
    extra = BEHAVIOUR.get('tokens_per_marker')
    if extra is None:
        return None
    return len(encode(prompt)[0]) + extra * prompt.count('<__media__>')


def tokenizer_modifier(state, prompt, input_ids, input_embeds):
    _note('tokenizer', state, prompt=prompt, input_ids=input_ids.clone(),
          image_attachments=state.get('image_attachments'))
    mode = BEHAVIOUR.get('embeds')
    if mode == 'raise':
        raise RuntimeError('tokenizer_modifier failed on purpose')
    if mode is None:
        return prompt, input_ids, input_embeds

    embed = shared.model.get_input_embeddings()
    if mode == 'pad':
        # Expand: k placeholder ids after the BOS, as an image-splicing extension does.
        k = BEHAVIOUR.get('pad', 5)
        pad = torch.full((1, k), shared.tokenizer.unk_token_id, dtype=input_ids.dtype)
        input_ids = torch.cat([input_ids[:, :1], pad, input_ids[:, 1:]], dim=1)
    with torch.no_grad():
        embeds = embed(input_ids)
    if mode == 'perturbed':
        generator = torch.Generator().manual_seed(1)
        embeds = embeds + 3.0 * torch.randn(embeds.shape, generator=generator)
    elif mode == 'longer':
        embeds = torch.cat([embeds, embeds], dim=1)
    return prompt, input_ids, embeds


class MarkerProcessor:
    def __call__(self, input_ids, scores):
        return scores


def logits_processor_modifier(processor_list, input_ids):
    _note('logits_processor', input_len=input_ids.shape[1])
    mode = BEHAVIOUR.get('logits')
    if mode == 'append':
        processor_list.append(MarkerProcessor())
    elif mode == 'new_list':
        return [MarkerProcessor()]
    return processor_list


def output_modifier(string, state, is_chat=False):
    _note('output', state, text=string, is_chat=is_chat)
    return string
'''


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def tokenizer():
    """The tiny Llama-like BPE tokenizer; its post-processor prepends `<s>` (id 1)."""
    return PreTrainedTokenizerFast(tokenizer_object=tiny_llava.train_tiny_tokenizer(),
                                   bos_token='<s>', eos_token='</s>', unk_token='<unk>')


@pytest.fixture(scope='module')
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def write_extension(root: Path, name: str = 'dummy', source: str = DUMMY_SCRIPT) -> Path:
    folder = root / 'extensions' / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'script.py').write_text(textwrap.dedent(source))
    return folder


@pytest.fixture
def dummy_dir(tmp_path):
    return write_extension(tmp_path / 'webui')


@pytest.fixture
def make_harness(dummy_dir, model, tokenizer):
    made = []

    def make(settings=None, **kwargs):
        merged = {'instruction_template_str': LLAVA_LIKE_TEMPLATE, **(settings or {})}
        harness = WebuiHarness(kwargs.pop('extension_dir', dummy_dir), model, tokenizer, merged, **kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def harness(make_harness):
    return make_harness()


def red(size=8):
    return Image.new('RGB', (size, size), (255, 0, 0))


def log_of(harness, hook, since=0):
    return [entry for entry in harness.extension.LOG[since:] if entry['hook'] == hook]


def hooks_since(harness, since):
    return [entry['hook'] for entry in harness.extension.LOG[since:]]


def last_prompt(harness):
    return log_of(harness, 'tokenizer')[-1]['prompt']


# ---------------------------------------------------------------------------------------------- loading


def test_saved_settings_reach_params_before_setup(make_harness):
    harness = make_harness({'dummy-level': 7})
    assert harness.extension.SETUP_PARAMS == [{'display_name': 'Dummy', 'is_tab': False, 'level': 7}]
    assert shared.default_settings['dummy-level'] == 1  # the extension's own default is recorded
    assert harness.extension.__name__ == 'extensions.dummy.script'


def test_user_data_extension_is_loaded_by_file_path(make_harness, tmp_path):
    harness = make_harness(load_as='user_data', user_data_dir=tmp_path / 'user_data')
    assert harness.extension.__name__ == 'user_ext_dummy'
    assert not harness.extension.__package__  # relative imports are impossible in this mode
    assert Path(harness.extension.__file__) == tmp_path / 'user_data' / 'extensions' / 'dummy' / 'script.py'


def test_user_data_copy_shadows_the_package(make_harness, tmp_path):
    user_data = tmp_path / 'user_data'
    shadow = write_extension(user_data, source=DUMMY_SCRIPT + '\nSHADOW = True\n') / 'script.py'
    with pytest.raises(RuntimeError) as error:
        make_harness(user_data_dir=user_data)
    assert str(error.value).startswith(f'loaded {shadow} instead of')


def test_failing_setup_is_logged_and_the_extension_left_out(make_harness, tmp_path, caplog):
    broken = write_extension(tmp_path / 'other', 'broken', 'def setup():\n    raise ValueError("no")\n')
    with caplog.at_level(logging.ERROR, logger='textgen'):
        with pytest.raises(RuntimeError, match='failed to load'):
            make_harness(extension_dir=broken)
    assert 'Failed to load the extension "broken"' in caplog.text


def test_ui_placement_follows_is_tab(make_harness, tmp_path):
    tab = write_extension(tmp_path / 'tab', 'tabbed', "params = {'is_tab': True, 'display_name': 'LLaVA'}\ndef ui():\n    pass\n")
    make_harness(extension_dir=tab)
    assert extensions.ui_placement() == ([], [('tabbed', 'LLaVA')])


# ---------------------------------------------------------------------------------------------- dispatch


def test_string_hooks_get_state_and_is_chat_only_when_declared(make_harness, tmp_path):
    source = '''
CALLS = []
def input_modifier(string):
    CALLS.append(('input', string))
    return string
def output_modifier(string, state):
    CALLS.append(('output', string, type(state).__name__))
    return string + '!'
'''
    harness = make_harness(extension_dir=write_extension(tmp_path / 'plain', 'plain', source))
    reply = harness.send('hello')
    assert harness.extension.CALLS[0] == ('input', 'hello')
    assert harness.extension.CALLS[-1][0] == 'output' and harness.extension.CALLS[-1][2] == 'dict'
    assert harness.history['visible'][-1][1].endswith('!') and not reply.endswith('!')


def test_first_extension_only_hooks_and_chained_hooks():
    class Ext:
        def __init__(self, tag):
            self.tag = tag

        def custom_generate_chat_prompt(self, text, state, **kwargs):
            return None  # first one answers None: webui does not ask the second one

        def custom_tokenized_length(self, prompt):
            return {'a': 1, 'b': 2}[self.tag]

        def state_modifier(self, state):
            return {**state, self.tag: True}

    saved = extensions.state
    try:
        extensions.state = {'b': [True, 1, Ext('b')], 'a': [True, 0, Ext('a')]}
        assert extensions.apply_extensions('custom_generate_chat_prompt', 'x', {}) is None
        assert extensions.apply_extensions('tokenized_length', 'x') == 1
        assert extensions.apply_extensions('state', {}) == {'a': True, 'b': True}
        with pytest.raises(ValueError):
            extensions.apply_extensions('nonexistent')
    finally:
        extensions.state = saved


# ---------------------------------------------------------------------------------------------- hook order (§4)

SEND_ORDER = ['history', 'state', 'chat_input', 'input', 'custom_generate_chat_prompt', 'tokenized_length',
              'tokenizer', 'logits_processor', 'output']


@pytest.mark.parametrize('mode, extra', [('instruct', []), ('chat', ['bot_prefix']), ('chat-instruct', ['bot_prefix'])])
def test_send_hook_order(make_harness, mode, extra):
    harness = make_harness({'mode': mode})
    start = len(harness.extension.LOG)
    harness.send('Look at my picture.', images=[red()])
    expected = SEND_ORDER[:5] + extra + SEND_ORDER[5:]
    assert hooks_since(harness, start) == expected
    assert log_of(harness, 'output', start)[0]['is_chat'] is True


def test_new_chat_in_chat_mode_passes_the_greeting_through_output_modifier(make_harness):
    harness = make_harness({'mode': 'chat'})
    assert [entry['hook'] for entry in harness.extension.LOG] == ['output']
    assert harness.history['internal'] == [['<|BEGIN-VISIBLE-CHAT|>', 'How can I help you today?']]


def test_other_ui_actions_hook_order(harness):
    harness.send('first', images=[red()])
    marks = {}
    for action in ('regenerate', 'continue_', 'impersonate', 'count_tokens', 'remove_last'):
        start = len(harness.extension.LOG)
        getattr(harness, action)()
        marks[action] = hooks_since(harness, start)

    after_prompt = ['custom_generate_chat_prompt', 'tokenized_length', 'tokenizer', 'logits_processor', 'output']
    assert marks['regenerate'] == ['history', 'state'] + after_prompt
    assert marks['continue_'] == ['history', 'state'] + after_prompt
    assert marks['impersonate'] == ['tokenized_length', 'tokenizer', 'logits_processor']
    assert marks['count_tokens'] == ['tokenized_length', 'tokenized_length']
    assert marks['remove_last'] == []


def test_api_hook_orders(harness):
    messages = [{'role': 'user', 'content': [text_part('what is this?'), image_part(red())]}]
    start = len(harness.extension.LOG)
    harness.api_chat(messages)
    assert hooks_since(harness, start) == SEND_ORDER

    start = len(harness.extension.LOG)
    harness.api_completions(messages=messages)
    assert hooks_since(harness, start) == ['state', 'input', 'tokenizer', 'logits_processor', 'output']
    assert log_of(harness, 'input', start)[0]['is_chat'] is False
    assert log_of(harness, 'output', start)[0]['is_chat'] is False

    start = len(harness.extension.LOG)
    harness.api_chat_prompt(messages)
    assert hooks_since(harness, start) == ['tokenized_length']


# ---------------------------------------------------------------------------------------------- images and markers (§5, §6)


def test_ui_send_stores_images_as_data_urls_and_lists_them_in_state(harness, tmp_path):
    start = len(harness.extension.LOG)
    harness.send('no image here')
    assert log_of(harness, 'tokenizer', start)[0]['has_images'] is False  # absent, not []

    raw = base64.b64decode(data_url(red()).split(',', 1)[1])
    jpeg = tmp_path / 'photo.JPG'
    red().save(jpeg, format='JPEG')
    start = len(harness.extension.LOG)
    harness.send('What is in this picture?', images=[('red_square.png', raw), jpeg])

    entry = log_of(harness, 'tokenizer', start)[0]
    first, second = entry['image_attachments']
    assert first == {'name': 'red_square.png', 'type': 'image',
                     'image_data': 'data:image/png;base64,' + base64.b64encode(raw).decode(), 'image_id': 1}
    assert second['image_data'].startswith('data:image/jpeg;base64,') and second['image_id'] == 2
    assert base64.b64decode(second['image_data'].split(',', 1)[1]) == jpeg.read_bytes()  # original bytes

    # Set after the input hooks, before custom_generate_chat_prompt.
    assert [e['has_images'] for e in harness.extension.LOG[start:] if 'has_images' in e][:3] == [False, False, False]
    assert log_of(harness, 'custom_generate_chat_prompt', start)[0]['has_images'] is True

    # The texts stay clean; metadata keeps the attachments of row 1.
    assert harness.history['internal'][-1][0] == 'What is in this picture?'
    assert MARKER not in harness.history['visible'][-1][0]
    assert harness.history['metadata']['user_1']['attachments'] == [first, second]


def test_markers_precede_the_text_and_image_ids_restart_per_message(harness):
    harness.send('', images=[red()])
    assert last_prompt(harness).endswith(f'USER: {MARKER}\n\n\nASSISTANT:')  # marker before an empty text

    harness.send('And what about these?', images=[red(), red()])
    prompt = last_prompt(harness)
    assert prompt.endswith(f'USER: {MARKER}{MARKER}\n\nAnd what about these?\nASSISTANT:')
    images = log_of(harness, 'tokenizer')[-1]['image_attachments']
    assert [image['image_id'] for image in images] == [1, 1, 2]


def test_past_image_only_message_loses_its_marker(harness):
    """chat.py:500 skips past rows whose user text is empty: their images stay in
    image_attachments but get no marker, so markers are not simply the last N images."""
    harness.send('', images=[('a.png', base64.b64decode(data_url(red()).split(',', 1)[1]))])
    harness.send('second', images=[red()])
    entry = log_of(harness, 'tokenizer')[-1]
    assert entry['prompt'].count(MARKER) == 1
    assert [image['name'] for image in entry['image_attachments']][0] == 'a.png'
    assert len(entry['image_attachments']) == 2


def test_current_row_is_only_in_the_history_kwarg(harness):
    harness.send('one', images=[red()])
    start = len(harness.extension.LOG)
    harness.send('two', images=[red()])
    entry = log_of(harness, 'custom_generate_chat_prompt', start)[0]
    assert entry['history_rows'] == 1  # state['history'] is the pre-request history
    kwargs = entry['kwargs']
    assert kwargs['_continue'] is False
    assert len(kwargs['history']['internal']) == 1
    assert 'attachments' in kwargs['history']['metadata']['user_1']


def test_ui_state_is_one_object_through_the_request(harness):
    harness.send('hi', images=[red()])
    ids = {e['state_id'] for e in harness.extension.LOG if 'state_id' in e and e['hook'] != 'output'}
    ids.add(log_of(harness, 'output')[-1]['state_id'])
    assert len(ids) == 1


def test_chat_mode_prompt_with_marker(make_harness):
    harness = make_harness({'mode': 'chat', 'context': 'CTX'})
    harness.send('Look at my picture.', images=[red()])
    assert last_prompt(harness) == f'CTX\n\nAI: How can I help you today?\nYou: {MARKER}\n\nLook at my picture.\nAI:'
    assert log_of(harness, 'tokenizer')[-1]['add_bos_token'] is True


def test_chat_instruct_nests_markers_in_one_instruct_turn(make_harness):
    harness = make_harness({'mode': 'chat-instruct', 'context': 'CTX'})
    harness.send('Look.', images=[red()])
    prompt = last_prompt(harness)
    assert prompt.startswith('<s>USER: Continue the chat dialogue below. Write a single reply for the character "AI".')
    assert prompt.endswith(f'AI: How can I help you today?\nYou: {MARKER}\n\nLook.\n\nASSISTANT:')
    assert log_of(harness, 'tokenizer')[-1]['add_bos_token'] is False


# ---------------------------------------------------------------------------------------------- other UI actions


def test_regenerate_keeps_images_and_versions(harness):
    harness.send('describe', images=[red()])
    old_reply = harness.history['internal'][-1][1]
    start = len(harness.extension.LOG)
    harness.regenerate()
    entry = log_of(harness, 'tokenizer', start)[0]
    assert entry['prompt'].count(MARKER) == 1 and len(entry['image_attachments']) == 1
    versions = harness.history['metadata']['assistant_0']['versions']
    assert versions[0]['content'] == old_reply and harness.history['metadata']['assistant_0']['current_version_index'] == 1


def test_continue_prompt_ends_with_the_partial_reply(harness):
    harness.send('describe', images=[red()])
    partial = harness.history['internal'][-1][1]
    start = len(harness.extension.LOG)
    harness.continue_()
    entry = log_of(harness, 'custom_generate_chat_prompt', start)[0]
    assert entry['kwargs']['_continue'] is True and len(entry['kwargs']['history']['internal']) == 1
    prompt = log_of(harness, 'tokenizer', start)[0]['prompt']
    assert prompt.endswith('ASSISTANT: ' + partial.strip()) and MARKER in prompt


def test_impersonate_has_past_markers_but_no_image_attachments(harness):
    harness.send('describe', images=[red()])
    start = len(harness.extension.LOG)
    harness.impersonate()
    entry = log_of(harness, 'tokenizer', start)[0]
    assert MARKER in entry['prompt'] and entry['prompt'].endswith('USER: ')
    assert entry['has_images'] is False and entry['add_bos_token'] is True


def test_remove_last_drops_the_image(harness):
    harness.send('describe', images=[red()])
    box = harness.remove_last()
    assert box == {'text': 'describe', 'files': []}
    assert harness.history['internal'] == [] and 'user_0' not in harness.history['metadata']


def test_start_reply_with_drops_attached_files(make_harness):
    harness = make_harness({'start_with': 'Sure,'})
    harness.send('describe', images=[red()])
    entry = log_of(harness, 'tokenizer')[-1]
    assert MARKER not in entry['prompt'] and entry['has_images'] is False
    assert entry['prompt'].endswith('ASSISTANT: Sure,')


def test_count_tokens_counts_attached_images_markers(harness, tokenizer):
    plain = harness.count_tokens('what is this')
    with_image = harness.count_tokens('what is this', images=[red()])
    marker_tokens = len(tokenizer(MARKER + '\n\n', add_special_tokens=False)['input_ids'])
    assert abs((with_image - plain) - marker_tokens) <= 1  # the boundary may tokenize a little differently


# ---------------------------------------------------------------------------------------------- BOS (§6)


def test_instruct_forces_add_bos_false_and_one_bos_survives(harness, tokenizer):
    harness.send('hello')
    entry = log_of(harness, 'tokenizer')[-1]
    assert entry['add_bos_token'] is False
    assert entry['prompt'].startswith('<s>')
    assert tokenizer('<s>hello')['input_ids'][:2] == [1, 1]  # template BOS + post-processor BOS
    ids = entry['input_ids'][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_encode_adds_missing_bos_and_left_truncates(harness, tokenizer):
    plain = tokenizer('a b c d e f', add_special_tokens=False)['input_ids']
    assert text_generation.encode('a b c d e f')[0].tolist()[0] == 1
    assert text_generation.encode('a b c d e f', truncation_length=3)[0].tolist() == plain[-3:]


# ---------------------------------------------------------------------------------------------- truncation (§8)


def image_bytes(name):
    return (name, base64.b64decode(data_url(red()).split(',', 1)[1]))


def test_truncation_drops_old_markers_but_not_image_attachments(harness):
    for i in range(2):
        harness.send(f'picture number {i}', images=[image_bytes(f'img{i}.png')])
    full = text_generation.get_encoded_length(last_prompt(harness))
    shared.settings['truncation_length'] = full + shared.settings['max_new_tokens'] - 5
    harness.send('picture number 2', images=[image_bytes('img2.png')])
    entry = log_of(harness, 'tokenizer')[-1]
    assert entry['prompt'].count(MARKER) < 3
    assert [image['name'] for image in entry['image_attachments']] == ['img0.png', 'img1.png', 'img2.png']


def test_bisect_can_slice_a_marker(harness):
    sliced = f'<s>USER: {MARKER[:-1]}\nASSISTANT:'
    budget = len(text_generation.encode(sliced)[0])
    assert len(text_generation.encode(f'<s>USER: {MARKER}\nASSISTANT:')[0]) > budget
    shared.settings['truncation_length'] = budget + shared.settings['max_new_tokens']
    harness.send('a long question ' * 20, images=[red()])
    entry = log_of(harness, 'tokenizer')[-1]
    assert entry['prompt'] == sliced
    assert len(entry['image_attachments']) == 1


def test_prompt_that_cannot_fit_raises_value_error(harness):
    shared.settings['truncation_length'] = shared.settings['max_new_tokens'] + 2
    with pytest.raises(ValueError):
        harness.send('hello')


def test_custom_tokenized_length_makes_truncation_drop_more(harness):
    harness.send('one', images=[red()])
    harness.send('two', images=[red()])
    assert last_prompt(harness).count(MARKER) == 2
    shared.settings['truncation_length'] = 2048
    harness.extension.BEHAVIOUR['tokens_per_marker'] = 1000
    harness.send('three', images=[red()])
    assert last_prompt(harness).count(MARKER) == 1


# ---------------------------------------------------------------------------------------------- generate (§7)


def test_same_length_embeds_reach_generate_and_change_nothing(harness):
    reference = harness.api_completions(prompt='USER: hello\nASSISTANT:')
    harness.extension.BEHAVIOUR['embeds'] = 'same'
    with_embeds = harness.api_completions(prompt='USER: hello\nASSISTANT:')
    call = harness.generate_calls[-1]
    assert call.inputs_embeds.shape == (*call.input_ids.shape, 32)
    assert with_embeds == reference

    harness.extension.BEHAVIOUR['embeds'] = 'perturbed'
    assert harness.api_completions(prompt='USER: hello\nASSISTANT:') != reference  # the embeddings are used


@pytest.mark.parametrize('entry, message', [('ui', 'Failed in generation callback'),
                                             ('completions', 'Failed to generate reply (HF)')])
def test_embeds_longer_than_ids_give_an_empty_reply_and_a_log(harness, caplog, entry, message):
    harness.extension.BEHAVIOUR['embeds'] = 'longer'
    with caplog.at_level(logging.ERROR, logger='textgen'):
        reply = harness.send('hello') if entry == 'ui' else harness.api_completions(prompt='hello')
    assert reply == ''
    assert message in caplog.text
    assert isinstance(harness.generate_calls[-1].error, RuntimeError)


def test_padded_ids_work_and_the_reply_starts_after_them(harness, tokenizer):
    harness.extension.BEHAVIOUR.update(embeds='pad', pad=7)
    reply = harness.api_completions(prompt='USER: hello\nASSISTANT:')
    call = harness.generate_calls[-1]
    original_len = log_of(harness, 'tokenizer')[-1]['input_ids'].shape[1]
    assert call.input_ids.shape[1] == original_len + 7 == call.inputs_embeds.shape[1]
    new_tokens = call.output[0][call.input_ids.shape[1]:]
    assert 0 < len(new_tokens) <= shared.settings['max_new_tokens']
    assert reply.strip() == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_auto_max_new_tokens_is_computed_before_expansion(make_harness):
    harness = make_harness({'auto_max_new_tokens': True, 'truncation_length': 60})
    harness.extension.BEHAVIOUR.update(embeds='pad', pad=10)
    harness.send('hello')
    original_len = log_of(harness, 'tokenizer')[-1]['input_ids'].shape[1]
    call = harness.generate_calls[-1]
    assert call.kwargs['max_new_tokens'] == 60 - original_len
    assert call.input_ids.shape[1] == original_len + 10


def test_completions_prompt_is_left_truncated_bos_included(harness, tokenizer):
    harness.api_completions(prompt='word ' * 40, truncation_length=20)
    ids = harness.generate_calls[-1].input_ids[0].tolist()
    assert len(ids) == 20 - shared.settings['max_new_tokens'] and ids[0] != tokenizer.bos_token_id


def test_logits_processor_list_returned_is_ignored_but_appends_count(harness):
    harness.extension.BEHAVIOUR['logits'] = 'new_list'
    harness.send('hello')
    names = [type(p).__name__ for p in harness.generate_calls[-1].kwargs['logits_processor']]
    assert 'MarkerProcessor' not in names
    harness.extension.BEHAVIOUR['logits'] = 'append'
    harness.send('hello')
    names = [type(p).__name__ for p in harness.generate_calls[-1].kwargs['logits_processor']]
    assert 'MarkerProcessor' in names


def test_tokenizer_modifier_errors_propagate(harness):
    harness.extension.BEHAVIOUR['embeds'] = 'raise'
    with pytest.raises(RuntimeError, match='on purpose'):
        harness.send('hello')
    assert shared.generation_lock.acquire(blocking=False)  # released despite the error
    shared.generation_lock.release()


# ---------------------------------------------------------------------------------------------- API (§5.2, §5.3, §9)


def test_api_chat_markers_are_in_the_text_and_bytes_only_in_messages(harness):
    url = data_url(red())
    messages = [
        {'role': 'system', 'content': 'You are a vision assistant.'},
        {'role': 'user', 'content': [text_part('First:'), image_part(url), text_part('second:'), image_part(url),
                                     text_part('which is bluer?')]},
    ]
    harness.api_chat(messages)
    chat_input = log_of(harness, 'chat_input')[-1]
    assert chat_input['text'] == f'{MARKER}{MARKER}\n\nFirst: second: which is bluer?'
    assert chat_input['visible_text'].startswith('&lt;__media__&gt;&lt;__media__&gt;')
    entry = log_of(harness, 'tokenizer')[-1]
    assert entry['prompt'] == f'<s>You are a vision assistant.\n\nUSER: {MARKER}{MARKER}\n\nFirst: second: which is bluer?\nASSISTANT:'
    assert entry['has_images'] is False and entry['has_raw_images'] is False

    state = next(call.args[0] for call in reversed(harness.hook_calls) if call.name == 'tokenizer_modifier')
    assert state['history']['messages'] == state['messages']
    assert state['messages'][1]['content'][1]['image_url']['url'] == url
    assert 'metadata' not in state['history']


def test_api_chat_history_rows_keep_markers(harness):
    url = data_url(red())
    messages = [
        {'role': 'user', 'content': [image_part(url), text_part('Describe picture one.')]},
        {'role': 'assistant', 'content': 'It is red.'},
        {'role': 'user', 'content': [image_part(url), text_part('And picture two?')]},
    ]
    harness.api_chat(messages)
    assert last_prompt(harness) == (f'<s>USER: {MARKER}\n\nDescribe picture one.\nASSISTANT: It is red.</s>\n'
                                    f'USER: {MARKER}\n\nAnd picture two?\nASSISTANT:')
    kwargs = log_of(harness, 'custom_generate_chat_prompt')[-1]['kwargs']
    assert all(set(value) == {'timestamp'} or set(value) == {'timestamp', 'model_name'}
               for value in kwargs['history']['metadata'].values())


@pytest.mark.parametrize('stream', [False, True])
def test_non_streaming_api_chat_hands_tokenizer_modifier_a_copy(harness, stream):
    harness.api_chat([{'role': 'user', 'content': 'hi'}], stream=stream)
    tokenizer_state = log_of(harness, 'tokenizer')[-1]['state_id']
    output_state = log_of(harness, 'output')[-1]['state_id']
    assert (tokenizer_state == output_state) is stream


def test_completions_with_messages_give_raw_images_and_no_marker(harness, caplog):
    messages = [{'role': 'user', 'content': [text_part('USER: what is this?\nASSISTANT:'), image_part(red())]}]
    with caplog.at_level(logging.INFO, logger='textgen'):
        harness.api_completions(messages=messages)
    assert 'Found 1 image(s) in request.' in caplog.text
    entry = log_of(harness, 'tokenizer')[-1]
    assert entry['prompt'] == 'USER: what is this?\nASSISTANT:' and entry['has_raw_images'] is True
    state = next(call.args[0] for call in reversed(harness.hook_calls) if call.name == 'tokenizer_modifier')
    (image,) = state['raw_images']
    assert type(image).__name__ == 'PngImageFile' and image.mode == 'RGB'
    assert entry['add_bos_token'] is True


def test_openai_image_conversion_decodes_data_urls_and_skips_http(caplog):
    palette = Image.new('P', (4, 4))
    messages = [
        {'role': 'user', 'content': [image_part(palette), image_part('http://example.invalid/cat.png')]},
        {'role': 'user', 'content': 'text only'},
    ]
    with caplog.at_level(logging.WARNING, logger='textgen'):
        images = image_utils.convert_openai_messages_to_images(messages)
    assert len(images) == 1 and images[0].mode == 'P'  # decoded as is, not converted to RGB
    assert 'Failed to fetch external image' in caplog.text


# ---------------------------------------------------------------------------------------------- models and unload


def test_unload_model_leaves_nothing_for_hooks(harness):
    harness.unload_model()
    assert shared.model is None and shared.tokenizer is None and shared.model_name == 'None'
    with pytest.raises(RuntimeError, match='No model is loaded'):
        harness.send('hello')


def test_load_model_uses_webui_metadata_and_template_rules(harness, model, tokenizer, tmp_path):
    model_dir = tmp_path / 'models'
    folder = model_dir / 'tiny-llava-v1.5'
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shared.args.model_dir = str(model_dir)
    shared.args.cpu = True

    loaded, loaded_tokenizer = models.load_model('tiny-llava-v1.5')
    assert next(loaded.parameters()).dtype == torch.float32  # --cpu forces float32
    assert shared.settings['truncation_length'] == 2048  # from max_position_embeddings
    assert loaded_tokenizer.bos_token_id == tokenizer.bos_token_id

    # A chat_template.jinja is used because tokenizer_config.json exists ...
    (folder / 'chat_template.jinja').write_text('JINJA {{ messages }}')
    from modules.models_settings import get_model_metadata
    assert get_model_metadata('tiny-llava-v1.5')['instruction_template_str'] == 'JINJA {{ messages }}'

    # ... but a config-user.yaml pattern naming a user_data/instruction-templates file wins.
    templates = shared.user_data_dir / 'instruction-templates'
    templates.mkdir(parents=True)
    (templates / 'LLaVA-v1.yaml').write_text('instruction_template: |-\n  LLAVA {{ messages }}\n')
    shared.user_config = {r'.*llava-v1\.5': {'instruction_template': 'LLaVA-v1'}}
    assert get_model_metadata('tiny-llava-v1.5')['instruction_template_str'] == 'LLAVA {{ messages }}'


def test_llava_config_is_not_an_auto_causal_lm(harness, tmp_path):
    """webui-host.md §2: a model_type 'llava' checkpoint fails in load_model_HF."""
    from transformers import LlavaConfig

    folder = tmp_path / 'models' / 'llava-hf'
    LlavaConfig(text_config={'model_type': 'llama', 'hidden_size': 32, 'num_hidden_layers': 1,
                             'num_attention_heads': 2, 'intermediate_size': 64, 'vocab_size': 64}).save_pretrained(folder)
    shared.args.model_dir = str(tmp_path / 'models')
    shared.args.cpu = True
    from modules.transformers_loader import load_model_HF
    with pytest.raises(ValueError, match='Unrecognized configuration class'):
        load_model_HF('llava-hf')


def test_truncation_pops_single_messages_after_the_system_message(harness):
    messages = [
        {'role': 'system', 'content': 'You are a vision assistant.'},
        {'role': 'user', 'content': 'first question about the picture'},
        {'role': 'assistant', 'content': 'first answer'},
        {'role': 'user', 'content': [image_part(red()), text_part('second question')]},
    ]
    full = harness.api_chat_prompt(messages)
    budget = text_generation.get_encoded_length(full) - 3
    prompt = harness.api_chat_prompt(messages, truncation_length=budget + shared.settings['max_new_tokens'])
    # One message (not a whole turn) went: the system message stays, a dangling reply leads.
    assert prompt == f'<s>You are a vision assistant.\n\nASSISTANT: first answer</s>\nUSER: {MARKER}\n\nsecond question\nASSISTANT:'


# ---------------------------------------------------------------------------------------------- logprobs and HTTP


@pytest.fixture
def padded_model(tokenizer):
    """A model with 8 embedding rows past the tokenizer, the first of which always wins (as one of a
    padded llava-hf vocabulary can)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer) + 8, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()

    def padding_wins(module, args, output):
        output.logits[..., len(tokenizer)] = 1e4

    model.register_forward_hook(padding_wins)
    return model


@pytest.mark.parametrize('stream', [False, True])
def test_logprobs_see_an_id_without_a_token_and_the_reply_fails(dummy_dir, padded_model, tokenizer, stream, caplog):
    """webui's LogprobProcessor (a logits processor of the request) turns every candidate into text and
    fails on an id the tokenizer has no token for, as the real webui did with a llava-hf vocabulary."""
    with WebuiHarness(dummy_dir, padded_model, tokenizer, {'instruction_template_str': LLAVA_LIKE_TEMPLATE}) as harness:
        with caplog.at_level(logging.ERROR, logger='textgen'):
            reply = harness.api_chat([{'role': 'user', 'content': 'hello'}], stream=stream, logprobs=True,
                                     top_logprobs=3)
    assert reply == ''
    assert 'Failed in generation callback' in caplog.text
    assert "'NoneType' object has no attribute 'startswith'" in caplog.text


def test_logprobs_are_reported_per_token(harness):
    harness.api_chat([{'role': 'user', 'content': 'hello'}], logprobs=True, top_logprobs=2, max_tokens=3,
                     ban_eos_token=True)
    entries = harness.last_api_response['choices'][0]['logprobs']['content']
    assert len(entries) == 3 and all(1 <= len(entry['top_logprobs']) <= 2 for entry in entries)
