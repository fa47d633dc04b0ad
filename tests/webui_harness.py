"""Drive a webui extension through the webui stand-in (tests/webui_stub) without webui.

``WebuiHarness`` loads an extension the way webui does (as package ``extensions.<name>.script``,
or by file path from ``<user_data>/extensions/<name>/script.py``), installs a model and tokenizer
as ``shared.model`` / ``shared.tokenizer``, and exposes webui's entry points: the chat buttons
(send, regenerate, continue, impersonate, remove last, count tokens) and the API
(``/v1/chat/completions``, ``/v1/completions``, ``/v1/internal/chat-prompt``). It records every
``model.generate`` call (``input_ids``, ``inputs_embeds``) and every hook call of the extension,
so tests can assert hook order and parity.

The stand-in keeps process-wide state in ``modules.shared`` just like webui; use one harness at a
time and ``close()`` it (or use it as a context manager).
"""
from __future__ import annotations

import base64
import copy
import functools
import importlib
import io
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STUB_DIR = Path(__file__).resolve().parent / 'webui_stub'
if str(STUB_DIR) not in sys.path:
    sys.path.insert(0, str(STUB_DIR))

from modules import chat, extensions, models, shared  # noqa: E402
from modules.api import completions as api  # noqa: E402

# Every hook webui may look up on an extension module (modules/extensions.py @1dcde41d).
HOOK_NAMES = (
    'setup', 'ui', 'custom_css', 'custom_js',
    'history_modifier', 'state_modifier', 'chat_input_modifier', 'input_modifier',
    'bot_prefix_modifier', 'custom_generate_chat_prompt', 'custom_tokenized_length',
    'tokenizer_modifier', 'logits_processor_modifier', 'output_modifier', 'custom_generate_reply',
)

_PRISTINE_SETTINGS = copy.deepcopy(shared.settings)

# Test-friendly departures from webui's defaults: greedy decoding, short replies, a 2048 context.
HARNESS_SETTINGS = {
    'max_new_tokens': 8,
    'auto_max_new_tokens': False,
    'do_sample': False,
    'truncation_length': 2048,
    'seed': 0,
}


@dataclass
class GenerateCall:
    """One ``shared.model.generate`` call. ``input_ids``: ``[1, n]``; ``inputs_embeds``: ``[1, n, hidden]`` or None."""

    input_ids: Any
    inputs_embeds: Any
    kwargs: dict
    output: Any = None
    error: BaseException | None = None


@dataclass
class HookCall:
    """One call of an extension hook, with references (not copies) to its arguments and result."""

    name: str
    args: tuple
    kwargs: dict
    result: Any = None
    error: BaseException | None = None
    thread: str = field(default_factory=lambda: threading.current_thread().name)


def _detached(value):
    return value.detach().clone() if hasattr(value, 'detach') else value


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def data_url(image, mime: str = 'image/png') -> str:
    """A PIL image (saved as PNG) or raw bytes as a ``data:`` URL."""
    raw = image if isinstance(image, bytes) else png_bytes(image)
    return f'data:{mime};base64,{base64.b64encode(raw).decode("ascii")}'


def image_part(image, mime: str = 'image/png') -> dict:
    """An OpenAI ``image_url`` content part for a PIL image, raw bytes, or a URL string."""
    url = image if isinstance(image, str) else data_url(image, mime)
    return {'type': 'image_url', 'image_url': {'url': url}}


def text_part(text: str) -> dict:
    return {'type': 'text', 'text': text}


class WebuiHarness:
    """One loaded extension plus a model, driven through the stand-in's UI and API entry points.

    ``settings`` are applied like ``user_data/settings.yaml`` (so ``'<ext>-<param>'`` keys reach the
    extension's ``params`` before ``setup()``); ``args`` override command-line flags (``cpu``,
    ``multi_user``, ...). ``load_as`` is ``'package'`` (``extension_dir`` must be
    ``<root>/extensions/<name>``) or ``'user_data'`` (the folder is copied to
    ``<user_data>/extensions/<name>`` and loaded by file path as ``user_ext_<name>``).
    """

    def __init__(self, extension_dir, model, tokenizer, settings: dict | None = None, *,
                 args: dict | None = None, load_as: str = 'package', user_data_dir=None,
                 model_name: str = 'tiny-test-model', record_hooks: bool = True):
        if load_as not in ('package', 'user_data'):
            raise ValueError(f"load_as must be 'package' or 'user_data', got {load_as!r}")

        self.extension_dir = Path(extension_dir).resolve()
        self.name = self.extension_dir.name
        self.model = model
        self.generate_calls: list[GenerateCall] = []
        self.hook_calls: list[HookCall] = []
        self.last_api_response = None
        self._tmp = Path(tempfile.mkdtemp(prefix='webui_harness_'))
        self._image_count = 0
        self._closed = False
        self.history = {'internal': [], 'visible': [], 'metadata': {}}
        self._recorder = None

        # webui silences transformers below ERROR for the whole process (transformers_loader.py:24);
        # restored in close().
        import transformers
        self._transformers_verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()

        try:
            self._reset_shared(model, tokenizer, settings or {}, args or {}, user_data_dir, model_name)
            self._install_generate_recorder(model)
            self.extension = self._load_extension(load_as)
            if record_hooks:
                self._wrap_hooks(self.extension)
            self.history = self.new_chat()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _reset_shared(self, model, tokenizer, settings, args, user_data_dir, model_name):
        shared.args = shared.default_args()
        for key, value in args.items():
            if not hasattr(shared.args, key):
                raise ValueError(f'unknown webui flag {key!r}')
            setattr(shared.args, key, value)
        shared.args.loader = shared.args.loader or 'Transformers'
        shared.original_args = copy.deepcopy(shared.args)

        shared.default_settings = copy.deepcopy(_PRISTINE_SETTINGS)
        shared.settings = copy.deepcopy(_PRISTINE_SETTINGS)
        shared.settings.update(HARNESS_SETTINGS)
        shared.settings.update(copy.deepcopy(settings))

        shared.user_data_dir = Path(user_data_dir) if user_data_dir else self._tmp / 'user_data'
        shared.user_data_dir.mkdir(parents=True, exist_ok=True)
        shared.user_config = {}
        shared.model, shared.tokenizer, shared.model_name = model, tokenizer, model_name
        shared.is_seq2seq = False
        shared.is_multimodal = False
        shared.bos_token = getattr(tokenizer, 'bos_token', None) or '<s>'
        shared.eos_token = getattr(tokenizer, 'eos_token', None) or '</s>'
        shared.stop_everything = False
        shared.generation_lock = threading.Lock()
        shared.gradio = {}
        shared.persistent_interface_state = {}

    def _install_generate_recorder(self, model):
        if 'generate' in vars(model):
            raise RuntimeError('model.generate is already wrapped: close() the previous WebuiHarness first')

        original = model.generate

        @functools.wraps(original)
        def recording_generate(*args, **kwargs):
            call = GenerateCall(
                input_ids=_detached(kwargs.get('inputs', args[0] if args else None)),
                inputs_embeds=_detached(kwargs.get('inputs_embeds')),
                kwargs={k: v for k, v in kwargs.items() if k not in ('inputs', 'inputs_embeds')},
            )
            self.generate_calls.append(call)
            try:
                output = original(*args, **kwargs)
            except BaseException as error:
                call.error = error
                raise
            call.output = _detached(getattr(output, 'sequences', output))
            return output

        model.generate = recording_generate
        self._recorder = recording_generate

    def _purge_modules(self, prefix):
        for module_name in list(sys.modules):
            if module_name == prefix or module_name.startswith(prefix + '.'):
                del sys.modules[module_name]

    def _load_extension(self, load_as):
        if load_as == 'package':
            if self.extension_dir.parent.name != 'extensions':
                raise ValueError(f'package loading needs <root>/extensions/<name>, got {self.extension_dir}')
            root = str(self.extension_dir.parent.parent)
            if root not in sys.path:
                sys.path.insert(0, root)
            self._purge_modules(f'extensions.{self.name}')
            expected_script = self.extension_dir / 'script.py'
        else:
            target = shared.user_data_dir / 'extensions' / self.name
            if target.resolve() != self.extension_dir:
                shutil.copytree(self.extension_dir, target, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns('__pycache__'))
            self._purge_modules(f'user_ext_{self.name}')
            expected_script = target / 'script.py'
        importlib.invalidate_caches()

        shared.args.extensions = [self.name]
        extensions.available_extensions = [self.name]
        extensions.setup_called = set()
        extensions.load_extensions()  # webui logs and swallows any error but ModuleNotFoundError
        if self.name not in extensions.state:
            raise RuntimeError(f'extension {self.name!r} failed to load; see the "textgen" log records')

        module = extensions.state[self.name][2]
        if Path(module.__file__).resolve() != expected_script.resolve():
            raise RuntimeError(f'loaded {module.__file__} instead of {expected_script} (a user_data copy wins over '
                               f'extensions/, and the first extensions/ folder on sys.path wins)')
        return module

    def _wrap_hooks(self, module):
        for hook_name in HOOK_NAMES:
            hook = getattr(module, hook_name, None)
            if callable(hook):
                setattr(module, hook_name, self._recording(hook_name, hook))

    def _recording(self, hook_name, hook):
        # functools.wraps sets __wrapped__, so inspect.signature (webui's parameter counting for
        # string hooks) still sees the original parameters.
        @functools.wraps(hook)
        def recorded(*args, **kwargs):
            call = HookCall(hook_name, args, kwargs)
            self.hook_calls.append(call)
            try:
                call.result = hook(*args, **kwargs)
            except BaseException as error:
                call.error = error
                raise
            return call.result

        return recorded

    # ------------------------------------------------------------------ state

    @property
    def params(self) -> dict:
        return getattr(self.extension, 'params', {})

    def hook_names(self, since: int = 0) -> list[str]:
        """Names of the hooks called, in order, from ``hook_calls[since]`` on."""
        return [call.name for call in self.hook_calls[since:]]

    def ui_state(self) -> dict:
        """A fresh ``interface_state`` as ``gather_interface_values`` builds it for each UI event.

        ``history`` is the harness's chat history object itself (a Gradio State value).
        """
        state = copy.deepcopy(shared.settings)
        state.update({
            'history': self.history,
            'unique_id': 'harness-chat',
            'character_menu': shared.settings['character'],
            'textbox': None,
        })
        return state

    def new_chat(self) -> dict:
        """Start a chat: empty in instruct mode, the greeting row in chat modes."""
        self.history = {'internal': [], 'visible': [], 'metadata': {}}
        self.history = chat.start_new_chat(self.ui_state())
        return self.history

    def _attachment_file(self, image) -> str:
        if isinstance(image, (str, Path)):
            return str(image)

        self._image_count += 1
        if isinstance(image, tuple):  # (file name, raw bytes)
            file_name, raw = image
            path = self._tmp / 'uploads' / f'{self._image_count}' / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)
            return str(path)

        path = self._tmp / 'uploads' / f'{self._image_count}' / f'image{self._image_count}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format='PNG')
        return str(path)

    # ------------------------------------------------------------------ UI entry points

    def _run_chat(self, text, files, regenerate=False, _continue=False) -> str:
        state = self.ui_state()
        final = None
        for final in chat.generate_chat_reply_wrapper({'text': text, 'files': files}, state,
                                                      regenerate=regenerate, _continue=_continue):
            pass
        if final is not None:
            self.history = final
        return self.history['internal'][-1][1] if self.history['internal'] else ''

    def send(self, text: str, images=()) -> str:
        """The Send button with ``images`` attached (paths, PIL images or ``(name, bytes)``)."""
        return self._run_chat(text, [self._attachment_file(image) for image in images])

    def regenerate(self) -> str:
        return self._run_chat('', [], regenerate=True)

    def continue_(self) -> str:
        """Continue: returns the whole assistant text of the last row (old part + new part)."""
        return self._run_chat('', [], _continue=True)

    def impersonate(self, text: str = '') -> str:
        """Impersonate: returns the chat box text (``text`` plus the generated continuation)."""
        textbox = {'text': text, 'files': []}
        for textbox in chat.impersonate_wrapper(textbox, self.ui_state()):
            pass
        return textbox['text']

    def remove_last(self) -> dict:
        """Remove last: returns the chat box content webui restores (``files`` is always empty)."""
        self.history, textbox = chat.handle_remove_last_click(self.ui_state())
        return textbox

    def count_tokens(self, text: str = '', images=()) -> int:
        """The chat tab's "History + Input" token count."""
        files = [self._attachment_file(image) for image in images]
        display = chat.count_prompt_tokens({'text': text, 'files': files}, self.ui_state())
        match = re.search(r'([\d,]+) / [\d,]+ tokens', display)
        if match is None:
            raise RuntimeError(f'count tokens failed: {display}')
        return int(match.group(1).replace(',', ''))

    def unload_model(self) -> None:
        """The Model tab's Unload button (or ``/v1/internal/model/unload``)."""
        models.unload_model()

    # ------------------------------------------------------------------ API entry points

    def _api_body(self, body):
        # JSON requests arrive as fresh objects; copy so tests can reuse their message lists.
        body = copy.deepcopy(body)
        body.setdefault('temperature', 0)  # greedy: process_parameters turns 0 into do_sample=False
        body.setdefault('max_tokens', shared.settings['max_new_tokens'])
        return body

    def api_chat(self, messages, stream: bool = False, **body) -> str:
        """``/v1/chat/completions``; returns the assistant content."""
        body = self._api_body({'messages': messages, **body})
        if stream:
            chunks = list(api.stream_chat_completions(body))
            self.last_api_response = chunks
            return ''.join(chunk['choices'][0]['delta'].get('content', '') for chunk in chunks)

        self.last_api_response = api.chat_completions(body)
        return self.last_api_response['choices'][0]['message']['content']

    def api_chat_prompt(self, messages, **body) -> str:
        """``/v1/internal/chat-prompt``: webui's prompt builder directly (no custom_generate_chat_prompt)."""
        body = self._api_body({'messages': messages, **body})
        return next(api.chat_completions_common(api.chat_request(**body), prompt_only=True))['prompt']

    def api_completions(self, prompt: str | None = None, messages=None, stream: bool = False, **body) -> str:
        """``/v1/completions`` with a ``prompt`` or with OpenAI ``messages``; returns the text."""
        body = self._api_body({'prompt': prompt, 'messages': messages, **body})
        if stream:
            chunks = list(api.stream_completions(body))
            self.last_api_response = chunks
            return ''.join(chunk['choices'][0]['text'] for chunk in chunks)

        self.last_api_response = api.completions(body)
        return self.last_api_response['choices'][0]['text']

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._recorder is not None and vars(self.model).get('generate') is self._recorder:
            del self.model.generate
        import transformers
        transformers.logging.set_verbosity(self._transformers_verbosity)
        extensions.state = {}
        extensions.setup_called = set()
        shared.model = shared.tokenizer = None
        shared.model_name = 'None'
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
