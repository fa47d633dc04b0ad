"""One real webui (Gradio UI + API, the tiny llava-hf checkpoint, this extension) shared by the real-client
suites (test_api_clients.py, test_browser.py). Skipped like the other integration tests when
``$WEBUI_DIR`` / ``$WEBUI_PYTHON`` are not set."""

from __future__ import annotations

import pytest

import real_webui
from client_host import EXTENSION_DIR, MAX_IMAGES, MODEL_NAME, TRACEBACK, tiny_llava


@pytest.fixture(scope="session")
def llava_ui_server(tmp_path_factory):
    """A webui with its UI, the API (with a key) and the extension, the tiny llava-hf model loaded through
    the API as a user would from the Model tab. The log must hold no traceback when the session ends."""
    host, why = real_webui.host_from_env()
    if host is None:
        pytest.skip(why)
    if real_webui.gradio_version(host) is None:
        pytest.skip("gradio is not importable in $WEBUI_PYTHON (an API-only host)")
    root = tmp_path_factory.mktemp("webui-clients")
    checkpoints = tiny_llava().write_tiny_checkpoints(root / "checkpoints", seed=0)
    user_data = real_webui.make_user_data_dir(host, root / "user_data", settings={
        # Short replies from the random model; greedy, so that replies can be compared.
        "max_new_tokens": 12, "auto_max_new_tokens": False, "do_sample": False, "temperature": 0,
        "llava-max_images_per_request": MAX_IMAGES,
    })
    (user_data / "models" / MODEL_NAME).symlink_to(checkpoints.hf.resolve(), target_is_directory=True)
    real_webui.link_user_extension(user_data, "llava", EXTENSION_DIR)
    server = real_webui.WebuiServer(host, user_data, root / "webui.log", extensions=("llava",), nowebui=False)
    server.start_and_wait()
    try:
        server.load_model(MODEL_NAME)
        yield server
    finally:
        server.stop()
    log = server.log_text()
    assert TRACEBACK not in log and "Exception in ASGI application" not in log, log[-8000:]
