"""Opt-in: the OpenAI-compatible API of a real webui with this extension, driven by real clients.

The official ``openai`` package is the client (chat, streaming, errors, logprobs); ``curl`` checks that
a stream that fails still ends cleanly on the wire (exit status 0, no ``curl: (18)``). Skipped unless
``$WEBUI_DIR`` / ``$WEBUI_PYTHON`` are set, and (each test) when its client is not installed. The server
(tests/integration/conftest.py) must log no traceback over the whole session.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess

import pytest

from client_host import (  # noqa: F401 - llava_ui_server is a fixture
    MAX_IMAGES, MODEL_NAME, TRACEBACK, LogSlice, llava_ui_server, spliced_counts, tiny_llava)

openai = pytest.importorskip("openai")

BROKEN_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR truncated").decode()
BROKEN_URL = "data:image/png;base64," + BROKEN_PNG
MAX_TOKENS = 8


def png_url(width: int, height: int, seed: int) -> str:
    buffer = io.BytesIO()
    tiny_llava().make_test_image(width, height, seed=seed).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(*urls: str, text: str = "Compare the pictures.") -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": url}} for url in urls),
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def server(llava_ui_server):
    return llava_ui_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.api_port}/v1", api_key=server.api_key,
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pictures():
    return {name: png_url(72, 48, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4))}


# Greedy, EOS banned (exactly MAX_TOKENS tokens), the top-5 candidates of every token.
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": 5,
          "extra_body": {"ban_eos_token": True}}


def curl(server, path: str, body: dict, key_header: str = "authorization") -> subprocess.CompletedProcess:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    header = (f"Authorization: Bearer {server.api_key}" if key_header == "authorization"
              else f"x-api-key: {server.api_key}")
    return subprocess.run(
        ["curl", "-sS", "-N", "--noproxy", "127.0.0.1", "-w", "\nHTTP %{http_code}\n",
         f"http://127.0.0.1:{server.api_port}{path}", "-H", header, "-H", "Content-Type: application/json",
         "-d", json.dumps(body)],
        capture_output=True, text=True, timeout=120)


def test_chat_with_an_image(client, server, pictures):
    log = LogSlice(server)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[user(pictures["a"], text="What is this?")],
                                           **GREEDY)
    assert isinstance(reply.choices[0].message.content, str)
    assert len(reply.choices[0].logprobs.content) == MAX_TOKENS
    assert spliced_counts(log.text()) == [1]


def test_streamed_chat_with_an_image(client, server, pictures):
    log = LogSlice(server)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=[user(pictures["b"], text="What is this?")],
                                            stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason is not None
    assert spliced_counts(log.text()) == [1]


def first_tokens(reply) -> tuple[list[str], dict[str, float]]:
    """The greedy tokens of a reply and the top-5 distribution of its first token."""
    entries = reply.choices[0].logprobs.content
    return [entry.token for entry in entries], {item.token: item.logprob for item in entries[0].top_logprobs}


def test_two_images_in_one_message_are_both_seen(client, server, pictures):
    """Issue 13, item 1: every image of the message is shown to the model, so swapping the first of two
    images changes the greedy reply (with only the last image shown, it could not)."""
    log = LogSlice(server)
    original = client.chat.completions.create(model=MODEL_NAME, messages=[user(pictures["a"], pictures["b"])], **GREEDY)
    swapped = client.chat.completions.create(model=MODEL_NAME, messages=[user(pictures["c"], pictures["b"])], **GREEDY)
    again = client.chat.completions.create(model=MODEL_NAME, messages=[user(pictures["a"], pictures["b"])], **GREEDY)
    assert spliced_counts(log.text()) == [2, 2, 2]
    original_tokens, original_first = first_tokens(original)
    swapped_tokens, swapped_first = first_tokens(swapped)
    assert first_tokens(again)[0] == original_tokens  # greedy is deterministic
    assert swapped_tokens != original_tokens, (original_tokens, swapped_tokens)
    assert swapped_first != original_first


def test_a_follow_up_keeps_the_images_of_the_last_message_with_images(client, server, pictures):
    log = LogSlice(server)
    history = [user(pictures["a"], pictures["b"]), {"role": "assistant", "content": "Two pictures."},
               {"role": "user", "content": "Which one is brighter?"}]
    client.chat.completions.create(model=MODEL_NAME, messages=history, **GREEDY)
    assert spliced_counts(log.text()) == [2]


@pytest.mark.parametrize("stream", [True, False])
def test_a_broken_image_fails_the_request_with_http_400(client, server, pictures, stream):
    log = LogSlice(server)
    with pytest.raises(openai.BadRequestError) as error:
        reply = client.chat.completions.create(model=MODEL_NAME, messages=[user(pictures["a"], BROKEN_URL)],
                                               stream=stream, max_tokens=MAX_TOKENS)
        if stream:
            list(reply)
    assert isinstance(error.value, openai.APIError) and error.value.status_code == 400
    assert "image 2 of message 1: cannot decode image" in error.value.message
    assert error.value.body["type"] == "invalid_request_error"
    assert TRACEBACK not in log.text()


def test_a_streamed_broken_image_ends_cleanly_for_curl(server, pictures):
    body = {"messages": [user(BROKEN_URL)], "stream": True, "max_tokens": MAX_TOKENS}
    result = curl(server, "/v1/chat/completions", body)
    assert result.returncode == 0, result.stderr  # not curl: (18) transfer closed with outstanding read data
    payload, status = result.stdout.rsplit("\nHTTP ", 1)
    assert status.strip() == "400"
    assert json.loads(payload)["error"]["message"].startswith("image 1 of message 1: cannot decode image")


def test_an_error_inside_a_started_stream_is_an_error_event(client, server):
    """More images than llava-max_images_per_request in /v1/completions: found once the stream has begun
    (webui sends its first chunk before any hook), so the stream carries the error and ends."""
    log = LogSlice(server)
    many = [png_url(24, 24, seed) for seed in range(MAX_IMAGES + 1)]
    message = f"{MAX_IMAGES + 1} images in this request exceed the limit of {MAX_IMAGES}"
    with pytest.raises(openai.APIError) as error:
        list(client.completions.create(model=MODEL_NAME, prompt="", stream=True, max_tokens=MAX_TOKENS,
                                       extra_body={"messages": [user(*many)]}))
    assert not isinstance(error.value, openai.APIConnectionError)
    assert message in error.value.message
    result = curl(server, "/v1/completions", {"messages": [user(*many)], "stream": True, "max_tokens": 4})
    assert result.returncode == 0, result.stderr
    events = [line[len("data: "):] for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert result.stdout.rstrip().endswith("HTTP 200")
    assert message in json.loads(events[-1])["error"]["message"]
    assert TRACEBACK not in log.text()


def test_completions_with_a_corrupt_image_is_refused(client, pictures):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=MODEL_NAME, prompt="", max_tokens=4,
                                  extra_body={"messages": [user(pictures["a"], BROKEN_URL)]})
    assert "image 2 of message 1: cannot decode image" in error.value.message


def test_anthropic_messages_with_a_broken_image(server):
    body = {"model": MODEL_NAME, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": BROKEN_PNG}},
        {"type": "text", "text": "What is this?"}]}]}
    result = curl(server, "/v1/messages", body, key_header="x-api-key")
    assert result.returncode == 0, result.stderr
    payload, status = result.stdout.rsplit("\nHTTP ", 1)
    assert status.strip() == "400"
    error = json.loads(payload)
    assert error["type"] == "error" and error["error"]["message"].startswith("image 1 of message 1: cannot decode")


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_with_the_padded_vocabulary(client, server, pictures, stream):
    """llava-hf pads its vocabulary past the tokenizer; no id without a token may reach webui's logprobs."""
    log = LogSlice(server)
    reply = client.chat.completions.create(model=MODEL_NAME, messages=[user(pictures["d"], text="Describe it.")],
                                           stream=stream, **{**GREEDY, "top_logprobs": 20})
    if stream:
        chunks = list(reply)
        entries = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                   for entry in chunk.choices[0].logprobs.content]
    else:
        entries = reply.choices[0].logprobs.content
    assert entries and all(entry.top_logprobs for entry in entries)
    if not stream:
        assert len(entries) == MAX_TOKENS
    completion = client.completions.create(model=MODEL_NAME, prompt="", max_tokens=MAX_TOKENS, logprobs=5,
                                           extra_body={"messages": [user(pictures["d"])], "ban_eos_token": True})
    assert len(completion.choices[0].logprobs.tokens) == MAX_TOKENS
    assert "Failed" not in log.text() and TRACEBACK not in log.text()


def test_next_token_logits_list_only_real_tokens(server):
    """/v1/internal/logits runs the model without any extension hook: the mask must already be there
    (webui lists an id without a token under the key null)."""
    status, reply = server.request("POST", "/v1/internal/logits",
                                   {"prompt": "USER: Describe the picture. ASSISTANT:", "top_logits": 50})
    assert status == 200 and isinstance(reply, dict) and reply, reply
    assert "null" not in reply and "None" not in reply


def test_the_server_log_holds_no_traceback(server):
    log = server.log_text()
    assert TRACEBACK not in log and "Exception in ASGI application" not in log, log[-6000:]
