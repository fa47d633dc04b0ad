"""Opt-in end-to-end test of ``extensions/llava`` inside the real text-generation-webui.

Skipped unless ``$WEBUI_DIR`` (a webui checkout at ``1dcde41d``) and ``$WEBUI_PYTHON`` (its interpreter;
``tools/setup_webui_host.sh`` builds one) are set, and until ``extensions/llava/script.py`` exists.

For each checkpoint format a tiny random LLaVA (``tests/tiny_llava.py``) is linked into a private
``user_data/models``, our extension is linked as ``user_data/extensions/llava`` and webui is started on
free loopback ports with ``--loader Transformers --cpu --api --extensions llava``. Loading:

* ``v0`` has ``model_type: llama``, so webui's own startup load (``--model``) reads it;
* ``hf`` and ``v15`` (``model_type: llava``) make webui's startup load raise before any extension is
  imported (webui-host.md §2): webui starts without a model and the model is loaded afterwards through
  ``/v1/internal/model/load``, as a user would in the Model tab;
* ``hf`` once more with ``--model``, after ``llava_autoload.py install`` (the README's way), which writes
  a .pth hook into ``$WEBUI_PYTHON``'s site-packages for the duration of that case.

Each server then answers image chats (the first token's distribution must follow the image), a follow-up
turn without a new image, and a text-only chat; the server log must show the extension's vision lines.
One more server runs with the Gradio UI and the extension linked into ``$WEBUI_DIR/extensions/llava``
(webui's package-import path); that link is removed afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

import real_webui

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_DIR = REPO_ROOT / "extensions" / "llava"
TESTS_DIR = REPO_ROOT / "tests"
EXTENSION_NAME = "llava"

HOST, SKIP_REASON = real_webui.host_from_env()
if HOST is not None and not (EXTENSION_DIR / "script.py").is_file():
    HOST, SKIP_REASON = None, f"{EXTENSION_DIR / 'script.py'} does not exist yet"
pytestmark = pytest.mark.skipif(HOST is None, reason=SKIP_REASON)

# What script.py logs through webui's logger (its pipeline modules log through plain
# logging.getLogger(), which webui sends to a NullHandler, so only script.py's lines reach the log).
VISION_ACTIVE = re.compile(r"llava: Vision active: ")
IMAGES_SPLICED = re.compile(r"llava: (\d+) image\(s\) spliced into \d+ positions")
# Signs that something failed although the HTTP answer may still be 200 (webui-host.md §7).
FAILURE_MARKERS = ("Traceback (most recent call last)", "Failed to generate reply",
                   "Failed to load the extension", "Could not import the requirements")

QUESTION = "Describe the picture."
MAX_TOKENS = 8
# Top-5 log-probabilities of the first generated token: equal within this for the same image (the
# encoder cache may or may not be hit), and further apart than it for different images.
SAME_IMAGE_TOLERANCE = 1e-4


def _tiny_llava():
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import tiny_llava

    return tiny_llava


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_message(data_url: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "text", "text": text},
    ]}


def assert_no_failure(log_slice: str) -> None:
    for marker in FAILURE_MARKERS:
        assert marker not in log_slice, log_slice[-6000:]


def spliced_counts(log_slice: str) -> list[int]:
    """Images spliced per request, one entry per request that had any."""
    return [int(count) for count in IMAGES_SPLICED.findall(log_slice)]


def distribution_distance(first: dict[str, float], second: dict[str, float]) -> float:
    """Largest logprob difference over the top-5 tokens; infinite when the top-5 sets differ."""
    if set(first) != set(second):
        return float("inf")
    return max(abs(first[token] - second[token]) for token in first)


def ids_beyond_tokenizer(checkpoint_dir: Path) -> range:
    """Embedding rows the tokenizer has no token for (llava-hf pads its vocabulary to a multiple of 64).

    webui cannot turn such an id into text: when one is among the top log-probabilities or is the first
    reply token, ``get_reply_from_output_ids`` fails on ``convert_ids_to_tokens(id) is None``
    (modules/text_generation.py:297-306). A random model ranks them like any other id.
    """
    from transformers import AutoTokenizer

    config = json.loads((checkpoint_dir / "config.json").read_text(encoding="utf-8"))
    model_vocab = (config.get("text_config") or {}).get("vocab_size") or config["vocab_size"]
    return range(len(AutoTokenizer.from_pretrained(checkpoint_dir)), model_vocab)


class LoggedRequest:
    """Runs one chat request and keeps the part of the server log it produced."""

    def __init__(self, server: real_webui.WebuiServer, banned_ids: range = range(0)):
        self.server = server
        # A large negative bias keeps these ids out of the reply and out of the reported top-5.
        self.logit_bias = {str(token_id): -1e4 for token_id in banned_ids}

    def chat(self, messages: list[dict]) -> tuple[dict, str]:
        start = len(self.server.log_text())
        extra = {"logit_bias": self.logit_bias} if self.logit_bias else {}
        reply = self.server.chat(messages, max_tokens=MAX_TOKENS, **extra)
        log_slice = self.server.log_text()[start:]
        assert_no_failure(log_slice)
        # ban_eos_token is set, so a generation that ran to the end produced exactly MAX_TOKENS tokens.
        assert len(real_webui.generated_logprobs(reply)) == MAX_TOKENS, reply
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        return reply, log_slice


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _tiny_llava().write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-llava"), seed=0)


@pytest.fixture(scope="module")
def test_images():
    tiny_llava = _tiny_llava()
    # Not square, so the extension's pad/resize path runs; two seeds give two different pictures.
    return {"first": png_data_url(tiny_llava.make_test_image(72, 48, seed=1)),
            "second": png_data_url(tiny_llava.make_test_image(72, 48, seed=2))}


def prepare_user_data(root: Path, checkpoint_dir: Path, model_name: str, link_extension_in_user_data: bool) -> Path:
    user_data = real_webui.make_user_data_dir(HOST, root / "user_data")
    (user_data / "models" / model_name).symlink_to(checkpoint_dir.resolve(), target_is_directory=True)
    if link_extension_in_user_data:
        real_webui.link_user_extension(user_data, EXTENSION_NAME, EXTENSION_DIR)
    return user_data


def start_llava_server(root: Path, checkpoint_dir: Path, model_name: str, load_at_startup: bool,
                       nowebui: bool, link_extension_in_user_data: bool) -> real_webui.WebuiServer:
    user_data = root / "user_data"
    if not user_data.exists():
        prepare_user_data(root, checkpoint_dir, model_name, link_extension_in_user_data)
    server = real_webui.WebuiServer(HOST, user_data, root / "webui.log",
                                    model=model_name if load_at_startup else None,
                                    extensions=(EXTENSION_NAME,), nowebui=nowebui)
    ready_s = server.start_and_wait()
    try:
        if not load_at_startup:
            server.load_model(model_name)
    except BaseException:
        server.stop()
        raise
    logger.info("webui ready after %.1f s (%s, %s)", ready_s, model_name,
                "model at startup" if load_at_startup else "model loaded through the API")
    return server


def run_autoload(action: str, extension_dir: Path = EXTENSION_DIR) -> str:
    """``llava_autoload.py <action>`` with webui's interpreter (it acts on that venv's site-packages)."""
    result = subprocess.run([str(HOST.python), str(extension_dir / "llava_autoload.py"), action],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"llava_autoload.py {action} failed:\n{result.stdout}{result.stderr}")
    return result.stdout + result.stderr


@contextlib.contextmanager
def autoload_installed(extension_dir: Path = EXTENSION_DIR):
    """The .pth hook that lets webui's startup load (``--model``) read LLaVA configs (README, Install),
    installed by running the script from ``extension_dir`` as the README says for that location.

    Left in place if it was installed before the test; otherwise removed afterwards.
    """
    if not (EXTENSION_DIR / "llava_autoload.py").is_file():
        pytest.skip("extensions/llava/llava_autoload.py does not exist")
    was_installed = ": installed" in run_autoload("status")
    run_autoload("install", extension_dir)
    try:
        yield
    finally:
        if not was_installed:
            run_autoload("uninstall")


# (checkpoint format, how the model is loaded): "startup" = webui's --model load, plain;
# "autoload" = --model with the autoload hook installed; "api" = /v1/internal/model/load after startup.
CASES = [
    pytest.param(("v0", "startup"), id="v0-startup"),
    pytest.param(("hf", "api"), id="hf-api-load"),
    pytest.param(("v15", "api"), id="v15-api-load"),
    pytest.param(("hf", "autoload"), id="hf-startup-autoload"),
]


@pytest.fixture(scope="module", params=CASES)
def llava_server(request, checkpoints, tmp_path_factory) -> LoggedRequest:
    fmt, load_mode = request.param
    root = tmp_path_factory.mktemp(f"webui-{fmt}-{load_mode}")
    with contextlib.ExitStack() as stack:
        checkpoint_dir = getattr(checkpoints, fmt)
        if load_mode == "autoload":
            # The README's command for the user_data/extensions/llava location, run from that folder.
            user_data = prepare_user_data(root, checkpoint_dir, f"tiny-llava-{fmt}", link_extension_in_user_data=True)
            stack.enter_context(autoload_installed(user_data / "extensions" / EXTENSION_NAME))
        server = start_llava_server(root, checkpoint_dir, f"tiny-llava-{fmt}",
                                    load_at_startup=load_mode != "api", nowebui=True,
                                    link_extension_in_user_data=True)
        stack.callback(server.stop)
        log = server.log_text()
        assert f'Loading the extension "{EXTENSION_NAME}"' in log
        assert_no_failure(log)
        yield LoggedRequest(server, ids_beyond_tokenizer(checkpoint_dir))
    assert server.process.returncode == 0, server.log_tail()


def test_image_chat_follows_the_image(llava_server, test_images):
    requests = llava_server
    first, first_log = requests.chat([image_message(test_images["first"])])
    second, second_log = requests.chat([image_message(test_images["second"])])
    first_again, again_log = requests.chat([image_message(test_images["first"])])

    for log_slice in (first_log, second_log, again_log):
        assert spliced_counts(log_slice) == [1], log_slice[-3000:]
    assert VISION_ACTIVE.search(requests.server.log_text())

    first_dist = real_webui.first_token_distribution(first)
    # Same image, same prompt, greedy: the same distribution, whether or not the cache answered.
    assert distribution_distance(first_dist, real_webui.first_token_distribution(first_again)) \
        <= SAME_IMAGE_TOLERANCE
    # Another image must change what the model sees; an extension that drops images, or whose image
    # positions generate() masks out, fails here.
    assert distribution_distance(first_dist, real_webui.first_token_distribution(second)) \
        > SAME_IMAGE_TOLERANCE, "two different images gave the same first-token distribution"


def test_follow_up_turn_without_a_new_image(llava_server, test_images):
    requests = llava_server
    opening = image_message(test_images["first"])
    reply, _ = requests.chat([opening])
    history = [opening, {"role": "assistant", "content": reply["choices"][0]["message"]["content"]}]
    follow_up, log_slice = requests.chat(history + [{"role": "user", "content": "What colour is it?"}])
    # The image of the first turn is still in the prompt, so it is encoded (or served from cache) again.
    assert spliced_counts(log_slice) == [1], log_slice[-3000:]
    assert follow_up["choices"][0]["message"]["role"] == "assistant"


def test_text_only_chat(llava_server):
    requests = llava_server
    _, log_slice = requests.chat([{"role": "user", "content": "Hello, who are you?"}])
    assert spliced_counts(log_slice) == [], log_slice[-3000:]


@pytest.fixture()
def system_extension_link():
    """Link the extension as ``$WEBUI_DIR/extensions/llava`` (imported as ``extensions.llava.script``)."""
    link = HOST.webui_dir / "extensions" / EXTENSION_NAME
    if link.is_symlink() and link.resolve() == EXTENSION_DIR.resolve():
        link.unlink()  # left over from an interrupted run of this test
    if link.exists() or link.is_symlink():
        pytest.skip(f"{link} exists and is not ours; not touching it")
    link.symlink_to(EXTENSION_DIR.resolve(), target_is_directory=True)
    try:
        yield link
    finally:
        link.unlink()


def test_with_gradio_ui_as_system_extension(checkpoints, test_images, tmp_path, system_extension_link):
    if real_webui.gradio_version(HOST) is None:
        pytest.skip("gradio is not importable in $WEBUI_PYTHON (an API-only host)")
    server = start_llava_server(tmp_path, checkpoints.hf, "tiny-llava-hf", load_at_startup=False,
                                nowebui=False, link_extension_in_user_data=False)
    try:
        log = server.log_text()
        assert f'Loading the extension "{EXTENSION_NAME}"' in log
        assert_no_failure(log)
        requests = LoggedRequest(server, ids_beyond_tokenizer(checkpoints.hf))
        _, log_slice = requests.chat([image_message(test_images["first"])])
        assert spliced_counts(log_slice) == [1], log_slice[-3000:]
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log_tail()
