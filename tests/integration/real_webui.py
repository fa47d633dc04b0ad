"""Start and drive a real text-generation-webui ("webui") as a subprocess, for opt-in integration tests.

Nothing here imports webui: webui runs in its own interpreter (``$WEBUI_PYTHON``, a venv made by
``tools/setup_webui_host.sh``) from its own checkout (``$WEBUI_DIR``, commit ``1dcde41d``).
Every server binds loopback only (no ``--listen``) and every request has a timeout.

Isolation: each server gets a private copy of ``$WEBUI_DIR/user_data`` (``--user-data-dir``), so models,
extension links, ``settings.yaml`` and webui's autosaves land in a temporary folder, not in the checkout.
``user_data/extensions/<name>/script.py`` is how webui finds a user extension (``modules/utils.py``
``get_available_extensions``; loaded by file path as module ``user_ext_<name>``).

This module is test support, not a test.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

WEBUI_DIR_ENV = "WEBUI_DIR"
WEBUI_PYTHON_ENV = "WEBUI_PYTHON"
# Readiness took 7-21 s with --nowebui and 15-31 s with the UI on 2 shared CPU cores; the bound leaves
# room for a slower machine.
DEFAULT_READY_TIMEOUT_S = 180.0
DEFAULT_REQUEST_TIMEOUT_S = 120.0

# webui prints the API address once uvicorn is about to serve (modules/api/script.py run_server).
_API_URL_PATTERN = re.compile(r"http://127\.0\.0\.1:(\d+)/v1")
# Gradio prints this before its own reachability check (Blocks.launch), so it does not mean success.
_UI_URL_PATTERN = re.compile(r"Running on local URL:\s+http://127\.0\.0\.1:(\d+)")
# What webui logs when that check fails: create_interface() dies while the API keeps serving.
_UI_LAUNCH_FAILURES = ("When localhost is not accessible", "ReadTimeout")
# That check is one HEAD with a 3 s timeout (it retries only on a non-200 answer). The margin covers
# a slow start of the request and rich rendering the traceback on a loaded machine (seen: > 1 s).
_UI_SELF_CHECK_S = 8.0
_BOX_PADDING = re.compile(r"\s{2,}│$")

# A Vicuna / LLaVA-1.5 style template: what llava-hf checkpoints ship, and what webui turns into its
# instruction template when it finds chat_template.jinja next to tokenizer_config.json.
LLAVA_STYLE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class UiLaunchError(RuntimeError):
    """Gradio's launch check of its own page failed; webui then serves the API without its UI."""


@dataclass(frozen=True)
class WebuiHost:
    """A webui checkout and the interpreter that runs it."""

    webui_dir: Path
    python: Path


def host_from_env() -> tuple[WebuiHost | None, str]:
    """Return ``(host, "")`` when ``$WEBUI_DIR`` and ``$WEBUI_PYTHON`` name a usable host, else ``(None, why)``."""
    webui_dir = os.environ.get(WEBUI_DIR_ENV, "")
    python = os.environ.get(WEBUI_PYTHON_ENV, "")
    if not webui_dir or not python:
        return None, f"set {WEBUI_DIR_ENV} (webui checkout) and {WEBUI_PYTHON_ENV} (its python) to run"
    webui_path = Path(webui_dir).resolve()
    if not (webui_path / "server.py").is_file() or not (webui_path / "modules" / "extensions.py").is_file():
        return None, f"{WEBUI_DIR_ENV}={webui_dir} is not a text-generation-webui checkout (no server.py)"
    python_path = Path(python)
    if not python_path.is_file() or not os.access(python_path, os.X_OK):
        return None, f"{WEBUI_PYTHON_ENV}={python} is not an executable file"
    return WebuiHost(webui_dir=webui_path, python=python_path), ""


def gradio_version(host: WebuiHost) -> str | None:
    """The gradio version installed for ``host.python``, or ``None`` (an API-only host)."""
    probe = subprocess.run([str(host.python), "-c", "import gradio; print(gradio.__version__)"],
                           capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() if probe.returncode == 0 else None


def generated_logprobs(reply: dict) -> list[dict]:
    """The per-token log-probability entries of a chat completion (one per generated token)."""
    logprobs = reply["choices"][0].get("logprobs") or {}
    return logprobs.get("content") or []


def first_token_distribution(reply: dict) -> dict[str, float]:
    """``{token: logprob}`` of the top candidates for the first generated token."""
    entries = generated_logprobs(reply)
    if not entries:
        raise ValueError(f"the reply has no logprobs: {str(reply)[:500]}")
    return {item["token"]: item["logprob"] for item in entries[0]["top_logprobs"]}


def free_loopback_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_user_data_dir(host: WebuiHost, destination: Path, settings: dict | None = None) -> Path:
    """Copy the checkout's ``user_data`` skeleton (presets, templates, characters) to ``destination``.

    ``settings`` is written as ``settings.yaml`` (JSON is valid YAML), which webui loads at startup.
    Returns ``destination``.
    """
    source = host.webui_dir / "user_data"
    # models/cache/logs may be large or personal in a used checkout; the tests bring their own.
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("models", "cache", "logs", "settings.yaml"))
    (destination / "models").mkdir(exist_ok=True)
    (destination / "extensions").mkdir(exist_ok=True)
    if settings:
        (destination / "settings.yaml").write_text(json.dumps(settings, indent=1), encoding="utf-8")
    return destination


def link_user_extension(user_data_dir: Path, name: str, extension_dir: Path) -> Path:
    """Symlink ``extension_dir`` as ``<user_data_dir>/extensions/<name>``; returns the link."""
    if not (extension_dir / "script.py").is_file():
        raise FileNotFoundError(f"{extension_dir} has no script.py; webui would not list it as an extension")
    link = user_data_dir / "extensions" / name
    link.symlink_to(extension_dir.resolve(), target_is_directory=True)
    return link


def write_tiny_llama(model_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` webui can load with ``--loader Transformers --cpu``.

    hidden 64, 2 layers, 4 heads, intermediate 128, 2048 positions; a byte-level BPE tokenizer trained
    here (``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, ``<s>`` prepended by the post-processor) and
    :data:`LLAVA_STYLE_CHAT_TEMPLATE` as ``chat_template.jinja``. Needs torch, transformers, tokenizers.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = ["red", "green", "blue", "square", "circle", "picture", "image", "what", "is", "in", "this",
             "describe", "the", "a", "colour", "USER", "ASSISTANT", "and", "of", "it", "<__media__>"]
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", model_max_length=2048)
    model_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").write_text(LLAVA_STYLE_CHAT_TEMPLATE, encoding="utf-8")

    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


@dataclass
class WebuiServer:
    """One webui process: ``start_and_wait()``, requests, then ``stop()`` (kills it if need be).

    ``model`` is a folder name under ``<user_data_dir>/models`` or ``None`` (start without a model).
    ``nowebui`` skips the Gradio UI (webui then serves only the API).
    """

    host: WebuiHost
    user_data_dir: Path
    log_path: Path
    model: str | None = None
    extensions: tuple[str, ...] = ()
    nowebui: bool = True
    extra_args: tuple[str, ...] = ()
    api_port: int = 0
    ui_port: int = 0
    api_key: str = field(default_factory=lambda: secrets.token_hex(8))
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_after_s: float | None = None

    def command(self) -> list[str]:
        args = [str(self.host.python), "server.py",
                "--user-data-dir", str(self.user_data_dir),
                "--model-dir", str(self.user_data_dir / "models"),
                "--loader", "Transformers", "--cpu",
                "--api", "--api-port", str(self.api_port), "--api-key", self.api_key]
        if self.model is not None:
            args += ["--model", self.model]
        if self.extensions:
            args += ["--extensions", *self.extensions]
        if self.nowebui:
            args.append("--nowebui")
        else:
            args += ["--listen-port", str(self.ui_port)]
        return args + list(self.extra_args)

    def start(self) -> "WebuiServer":
        if not self.api_port:
            self.api_port = free_loopback_port()
        if not self.nowebui and not self.ui_port:
            self.ui_port = free_loopback_port()
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "DO_NOT_TRACK": "1",
            # webui logs through rich, which wraps at 80 columns when not on a terminal; one record per
            # line keeps the log greppable.
            "COLUMNS": "400",
            # Keep loopback requests away from any proxy the caller's environment sets.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        # Our pytest's sys.path must not leak into webui's interpreter.
        env.pop("PYTHONPATH", None)
        log_file = open(self.log_path, "wb")
        try:
            self.started_at = time.monotonic()
            # A new session makes the process group ours to signal as a whole (webui may spawn helpers).
            self.process = subprocess.Popen(self.command(), cwd=self.host.webui_dir, env=env,
                                            stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_file.close()
        return self

    def start_and_wait(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S, ui_attempts: int = 2) -> float:
        """``start()`` then ``wait_ready()``; returns the seconds to readiness of the last start.

        With the UI, Gradio checks its own page with a 3 s timeout during launch; on a CPU-starved
        machine that check can time out (:class:`UiLaunchError`), so the UI gets up to ``ui_attempts``
        starts, each on fresh ports and with its own log file. Other failures are not retried. On
        failure the process is stopped before the error propagates.
        """
        attempts = 1 if self.nowebui else ui_attempts
        first_log = self.log_path
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                self.log_path = first_log.with_name(f"{first_log.stem}-start{attempt}{first_log.suffix}")
                self.api_port = self.ui_port = 0
            self.start()
            try:
                return self.wait_ready(timeout_s)
            except UiLaunchError:
                self.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def log_text(self) -> str:
        """The server's stdout and stderr so far, trailing padding stripped from each line."""
        try:
            raw = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        # rich pads every console line to the full width (COLUMNS), traceback boxes included.
        return "\n".join(_BOX_PADDING.sub(" │", line.rstrip()) for line in raw.splitlines())

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> float:
        """Wait until the API (and the UI unless ``nowebui``) serve; returns seconds since start.

        Raises ``RuntimeError`` with the log tail if the process exits, the UI fails to launch or
        ``timeout_s`` passes.
        """
        deadline = self.started_at + timeout_s
        api_up = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"webui exited with code {self.process.returncode} during startup:\n"
                                   f"{self.log_tail()}")
            log = self.log_text()
            # webui moves to another port if ours was taken in between; the log says which it used.
            announced = _API_URL_PATTERN.findall(log)
            if announced:
                self.api_port = int(announced[-1])
            api_up = api_up or self._api_ready()
            # The UI is not polled before Gradio announces it: launch() then checks the page itself
            # with a 3 s HEAD (gradio/networking.py url_ok), and competing requests can make that
            # check time out, which aborts webui's create_interface() (see _confirm_ui).
            if api_up and (self.nowebui or _UI_URL_PATTERN.search(log)):
                if not self.nowebui:
                    self._confirm_ui(deadline)
                self.ready_after_s = time.monotonic() - self.started_at
                return self.ready_after_s
            time.sleep(0.25)
        raise RuntimeError(f"webui not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def _api_ready(self) -> bool:
        try:
            status, _ = self.request("GET", "/v1/internal/health", timeout_s=2.0)
        except (OSError, urllib.error.URLError):
            return False
        return status == 200

    def _confirm_ui(self, deadline: float) -> None:
        """Let Gradio's launch check of its own page finish undisturbed, then check the page ourselves.

        Rendering the page is heavy (webui's ~770 components); a request of ours running at the same
        time as Gradio's 3 s check can make that check time out, so ours waits until it is over.
        """
        time.sleep(_UI_SELF_CHECK_S)
        self.ui_port = int(_UI_URL_PATTERN.search(self.log_text()).group(1))
        self._raise_if_ui_failed("Gradio's launch check failed")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"http://127.0.0.1:{self.ui_port}/", method="HEAD")
        try:
            with opener.open(request, timeout=max(deadline - time.monotonic(), 1.0)) as response:
                status = response.status
        except (OSError, urllib.error.URLError) as error:
            raise UiLaunchError(f"the Gradio UI does not answer ({error}):\n{self.log_tail()}") from error
        if status != 200:
            raise UiLaunchError(f"the Gradio UI answered HEAD / with {status}:\n{self.log_tail()}")

    def _raise_if_ui_failed(self, what: str) -> None:
        log = self.log_text()
        failed = [marker for marker in _UI_LAUNCH_FAILURES if marker in log]
        if failed:
            raise UiLaunchError(f"the Gradio UI did not launch: {what} ({failed}):\n{self.log_tail()}")

    def request(self, method: str, path: str, body: dict | None = None,
                timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> tuple[int, dict | str]:
        """One HTTP request to the API on loopback; returns ``(status, parsed JSON or text)``."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.api_key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        # Loopback only, so bypass proxies explicitly rather than trusting the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def chat(self, messages: list[dict], max_tokens: int = 8, **extra) -> dict:
        """POST ``/v1/chat/completions``; returns the JSON reply (raises on a non-200 answer).

        Defaults make the reply deterministic and checkable on a random model: greedy decoding,
        EOS banned (so exactly ``max_tokens`` tokens are generated) and the top-5 log-probabilities of
        every generated token in ``choices[0].logprobs.content``. ``extra`` overrides or adds fields.
        """
        body = {"messages": messages, "max_tokens": max_tokens, "stream": False, "do_sample": False,
                "ban_eos_token": True, "logprobs": True, "top_logprobs": 5, **extra}
        status, reply = self.request("POST", "/v1/chat/completions", body)
        if status != 200 or not isinstance(reply, dict):
            raise RuntimeError(f"/v1/chat/completions answered {status}: {str(reply)[:1000]}\n{self.log_tail()}")
        return reply

    def ui_json(self, path: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> dict:
        """GET a JSON document from the Gradio UI server (e.g. ``/config``)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{self.ui_port}{path}", timeout=timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def load_model(self, model: str, timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        """Load ``model`` through ``/v1/internal/model/load`` (Transformers loader, CPU)."""
        body = {"model_name": model, "args": {"loader": "Transformers", "cpu": True}}
        status, reply = self.request("POST", "/v1/internal/model/load", body, timeout_s=timeout_s)
        if status != 200:
            raise RuntimeError(f"model load answered {status}: {str(reply)[:1000]}\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (webui's graceful path), then SIGKILL to the process group; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGINT)
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=timeout_s)
        return self.process.returncode
