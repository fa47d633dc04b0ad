"""Opt-in check that the local webui host works, using a stand-in extension instead of ``extensions/llava``.

Skipped unless ``$WEBUI_DIR`` (a text-generation-webui checkout at ``1dcde41d``) and ``$WEBUI_PYTHON``
(its interpreter, see ``tools/setup_webui_host.sh``) are set. It proves the host independently of our
extension: webui starts on loopback with a tiny random Llama, imports a user extension, dispatches its
hooks for an API image chat, and shuts down on SIGINT. It also pins two host facts the extension relies
on (webui-host.md §5.2 and the logging note in tools/setup_webui_host.sh).
"""

from __future__ import annotations

import base64
import io
import logging
import re
import textwrap

import pytest

import real_webui

logger = logging.getLogger(__name__)

HOST, SKIP_REASON = real_webui.host_from_env()
pytestmark = pytest.mark.skipif(HOST is None, reason=SKIP_REASON)

# Logs through webui's own logger (what reaches the console) and through a plain module logger
# (what an extension gets from logging.getLogger(__name__)) to show which of the two is visible.
STAND_IN_EXTENSION = textwrap.dedent('''
    import logging

    from modules.logging_colors import logger as webui_logger

    plain_logger = logging.getLogger("stand_in_plain")
    params = {"display_name": "host check"}


    def setup():
        webui_logger.info("HOSTCHECK setup")
        plain_logger.warning("HOSTCHECK-PLAIN setup")


    def ui():
        import gradio as gr

        gr.Markdown("host check stand-in")
        webui_logger.info("HOSTCHECK ui")


    def chat_input_modifier(text, visible_text, state):
        webui_logger.info("HOSTCHECK chat_input_modifier text=%r", text)
        return text, visible_text


    def tokenizer_modifier(state, prompt, input_ids, input_embeds):
        webui_logger.info("HOSTCHECK tokenizer_modifier prompt=%r ids=%s embeds=%s",
                          prompt, tuple(input_ids.shape), input_embeds is None)
        return prompt, input_ids, input_embeds
''')


def png_data_url(colour: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def make_host_server(root, nowebui: bool) -> real_webui.WebuiServer:
    user_data = real_webui.make_user_data_dir(HOST, root / "user_data")
    real_webui.write_tiny_llama(user_data / "models" / "tiny-llama")
    extension_dir = root / "hostcheck"
    extension_dir.mkdir()
    (extension_dir / "script.py").write_text(STAND_IN_EXTENSION, encoding="utf-8")
    real_webui.link_user_extension(user_data, "hostcheck", extension_dir)
    return real_webui.WebuiServer(HOST, user_data, root / "webui.log", model="tiny-llama",
                                  extensions=("hostcheck",), nowebui=nowebui)


@pytest.fixture(scope="module")
def host_server(tmp_path_factory):
    server = make_host_server(tmp_path_factory.mktemp("webui-host"), nowebui=True)
    ready_s = server.start_and_wait()
    logger.info("webui (--nowebui, tiny Llama) ready after %.1f s", ready_s)
    try:
        yield server
    finally:
        server.stop()
    # SIGINT is webui's graceful path: its handler exits with 0.
    assert server.process.returncode == 0, server.log_tail()


def test_host_loads_extension_after_model(host_server):
    log = host_server.log_text()
    loaded = log.index('Loaded "tiny-llama"')
    extension = log.index('Loading the extension "hostcheck"')
    assert loaded < extension < log.index("HOSTCHECK setup")
    assert "CONTEXT LENGTH: 2048" in log
    # No Gradio, so no ui() (style.md: nothing may depend on ui() having run).
    assert "HOSTCHECK ui" not in log


def test_api_image_chat_reaches_extension_hooks(host_server):
    question = "What colour is this square?"
    reply = host_server.chat(
        [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": png_data_url((220, 30, 30))}},
        ]}],
        max_tokens=6,
    )
    # A random model's text may be cut by webui's stop strings; the generated tokens are not.
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert len(real_webui.generated_logprobs(reply)) == 6, reply

    log = host_server.log_text()
    # webui-host.md §5.2: the API puts the marker into the text before any hook sees it.
    assert f"HOSTCHECK chat_input_modifier text='<__media__>\\n\\n{question}'" in log
    # §6: instruct mode with the model's chat_template.jinja; the template's BOS starts the prompt.
    prompts = re.findall(r"HOSTCHECK tokenizer_modifier prompt='(.*?)' ids=\(1, (\d+)\) embeds=True", log)
    assert prompts, host_server.log_tail()
    prompt, _ = prompts[-1]
    assert prompt == f"<s>USER: <__media__>\\n\\n{question}\\nASSISTANT:"
    assert "Failed to generate reply" not in log


def test_plain_module_loggers_are_silent_in_webui(host_server):
    # webui routes the root logger to a NullHandler at level ERROR (modules/logging_colors.py), so an
    # extension's logging.getLogger(__name__) output never reaches the console unless it is wired up.
    log = host_server.log_text()
    assert "HOSTCHECK setup" in log
    assert "HOSTCHECK-PLAIN" not in log


def test_gradio_ui_host(tmp_path):
    version = real_webui.gradio_version(HOST)
    if version is None:
        pytest.skip("gradio is not installed for $WEBUI_PYTHON (an API-only host)")
    server = make_host_server(tmp_path, nowebui=False)
    ready_s = server.start_and_wait()
    logger.info("webui (UI + API, tiny Llama) ready after %.1f s", ready_s)
    try:
        log = server.log_text()
        assert log.index("HOSTCHECK setup") < log.index("HOSTCHECK ui")
        config = server.ui_json("/config")
        assert config["version"] == version
        # The components webui 1dcde41d needs from oobabooga's fork (webui-host.md §14, items 2-3).
        component_types = {component["type"] for component in config["components"]}
        assert {"headless", "dragdrop", "multimodaltextbox"} <= component_types
        reply = server.chat([{"role": "user", "content": "Hello"}], max_tokens=4)
        assert len(real_webui.generated_logprobs(reply)) == 4
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log_tail()
