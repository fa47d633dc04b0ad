"""Bad images in API requests get a proper error, streamed or not (issue 13, items 2 and 3).

Driven through the stand-in's HTTP layer (tests/webui_stub/modules/api/script.py), which behaves as the
real webui did: a streaming request answers 200 and sends its first chunk before any extension hook
runs, and an exception raised after that escapes the app (the connection breaks). ``llava_api``'s guard
answers 400 before webui sees a request with an image that cannot be used, and turns an error inside a
started stream into a last error event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field

import pytest

import llava_api
from webui_harness import image_part, text_part
from webui_llava_support import image, loaded, make_harness  # noqa: F401 - fixtures

from modules.api import script as api_script  # noqa: E402
from modules.api.errors import InvalidRequestError  # noqa: E402

KEY = "secret"
BROKEN = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nnot really a png").decode()


@dataclass
class Response:
    status: int | None = None
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    finished: bool = False
    error: BaseException | None = None

    def json(self):
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The ``data:`` payloads of an event stream, in order."""
        return [line[len("data: "):] for line in self.body.decode().splitlines() if line.startswith("data: ")]


def call(app, path: str, body: dict, *, key: str | None = KEY, host: str = "127.0.0.1:5000",
         header: str = "authorization") -> Response:
    """One HTTP POST through an ASGI app, as uvicorn would make it."""
    response = Response()
    raw = json.dumps(body).encode()
    headers = [(b"host", host.encode()), (b"content-type", b"application/json")]
    if key is not None:
        headers.append((header.encode(), (f"Bearer {key}" if header == "authorization" else key).encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    messages = [{"type": "http.request", "body": raw[:10], "more_body": True},
                {"type": "http.request", "body": raw[10:], "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        assert not response.finished, "a message after the response was finished"
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            response.body += message.get("body", b"")
            response.finished = not message.get("more_body", False)

    try:
        asyncio.run(app(scope, receive, send))
    except Exception as error:  # noqa: BLE001 - what uvicorn would log as "Exception in ASGI application"
        response.error = error
    return response


@pytest.fixture
def api_app(monkeypatch):
    """A fresh webui API app (the extension installs its guard into it in setup())."""
    app = api_script.App()
    monkeypatch.setattr(api_script, "app", app)
    return app


@pytest.fixture
def api_harness(make_harness, api_app):
    def make(settings=None, **args):
        return make_harness("hf", settings, args={"api": True, "api_key": KEY, **args})

    return make


def question(*images, text="What is this?"):
    return [{"role": "user", "content": [*map(image_part, images), text_part(text)]}]


def decodes(harness, monkeypatch) -> list[str]:
    """Names of the images the extension's decoder is asked for from now on."""
    names = []
    pipeline = harness.extension._vision.current()
    original = pipeline.load_image

    def counting(source, *, name):
        names.append(name)
        return original(source, name=name)

    monkeypatch.setattr(pipeline, "load_image", counting)
    return names


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [True, False])
def test_a_bad_image_gets_http_400_before_webui_answers(api_harness, api_app, path, stream, caplog):
    harness = api_harness()
    calls = len(harness.generate_calls)
    with caplog.at_level(logging.WARNING):
        response = call(api_app, path, {"messages": question(image(30, 20), BROKEN), "stream": stream, "max_tokens": 4})
    assert response.error is None and response.finished
    assert response.status == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert error["message"].startswith("image 2 of message 1: cannot decode image")
    assert len(harness.generate_calls) == calls
    assert "Traceback" not in caplog.text


def test_without_the_guard_a_bad_image_breaks_the_stream(make_harness, api_app):
    """The defect as the real webui showed it (the stand-in must keep showing it): 200, the first chunk,
    then the hook's error escapes the app and the connection breaks."""
    make_harness("hf", args={"api_key": KEY})  # no --api: the extension installs no guard
    response = call(api_app, "/v1/chat/completions", {"messages": question(BROKEN), "stream": True, "max_tokens": 4})
    assert response.status == 200 and not response.finished
    assert len(response.events()) == 1  # the role chunk
    assert isinstance(response.error, InvalidRequestError)


def test_an_error_inside_a_started_stream_ends_it_with_an_error_event(api_harness, api_app, caplog):
    harness = api_harness({"llava-max_images_per_request": 2})
    pictures = [image(20 + i, 20, seed=i) for i in range(3)]
    with caplog.at_level(logging.WARNING):
        response = call(api_app, "/v1/completions", {"messages": question(*pictures), "stream": True, "max_tokens": 4})
    assert response.error is None
    assert response.status == 200 and response.finished
    first, last = response.events()[0], response.events()[-1]
    assert json.loads(first)["choices"][0]["text"] == ""
    error = json.loads(last)["error"]
    assert error["message"] == ("3 images in this request exceed the limit of 2 "
                                "(setting llava-max_images_per_request)")
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert "Traceback" not in caplog.text
    # The server goes on serving.
    response = call(api_app, "/v1/completions", {"messages": question(pictures[0]), "stream": True, "max_tokens": 4})
    assert response.status == 200 and response.finished and response.events()[-1] == "[DONE]"
    assert harness.generate_calls[-1].inputs_embeds is not None


def test_good_images_pass_and_are_decoded_once(api_harness, api_app, monkeypatch):
    harness = api_harness()
    names = decodes(harness, monkeypatch)
    response = call(api_app, "/v1/chat/completions",
                    {"messages": question(image(31, 20, seed=5)), "stream": True, "max_tokens": 4})
    assert response.status == 200 and response.finished and response.error is None
    assert response.events()[-1] == "[DONE]"
    # The guard decoded it; the prompt hook and the splice reuse that picture.
    assert names == ["image 1 of message 1"]
    assert harness.generate_calls[-1].inputs_embeds is not None


def test_a_corrupt_image_in_completions_is_never_answered_silently(make_harness, api_app):
    # Without the guard (webui dropped the image from raw_images itself) the hook still refuses it.
    harness = make_harness("hf")
    calls = len(harness.generate_calls)
    with pytest.raises(InvalidRequestError, match="image 2 of message 1: cannot decode image") as error:
        harness.api_completions(messages=question(image(30, 20), BROKEN))
    assert error.value.code == 400 and len(harness.generate_calls) == calls


def test_a_completion_takes_its_images_from_the_messages(make_harness, caplog):
    harness = make_harness("hf")
    with caplog.at_level(logging.INFO, logger="textgen"):
        harness.api_completions(messages=question(image(30, 20, seed=1), image(20, 30, seed=2)))
    assert "llava: 2 image(s) spliced" in caplog.text
    assert harness.generate_calls[-1].inputs_embeds is not None


@pytest.mark.parametrize("case", ["wrong key", "no key", "foreign host"])
def test_requests_webui_refuses_are_left_to_webui(api_harness, api_app, monkeypatch, case):
    harness = api_harness()
    names = decodes(harness, monkeypatch)
    kwargs = {"wrong key": {"key": "guess"}, "no key": {"key": None}, "foreign host": {"host": "evil.example"}}[case]
    response = call(api_app, "/v1/chat/completions", {"messages": question(BROKEN), "stream": True}, **kwargs)
    if case == "foreign host":
        assert (response.status, response.json()) == (400, {"detail": "Invalid host header"})
    else:
        assert (response.status, response.json()) == (401, {"detail": "Unauthorized"})
    assert names == []  # a stranger's request costs no decoding


def test_url_images_are_refused(api_harness, api_app):
    api_harness()
    response = call(api_app, "/v1/chat/completions",
                    {"messages": question("http://example.invalid/cat.png"), "stream": True})
    assert response.status == 400
    assert "image 1 of message 1: only inline (data: URL) images" in response.json()["error"]["message"]


def test_installed_after_the_api_started_it_wraps_the_running_stack(make_harness, api_app):
    call(api_app, "/v1/chat/completions", {"messages": question(image(20, 20))})  # builds the stack
    assert api_app.middleware_stack is not None
    make_harness("hf", args={"api": True, "api_key": KEY})
    response = call(api_app, "/v1/chat/completions", {"messages": question(BROKEN), "stream": True})
    assert response.status == 400 and "cannot decode image" in response.json()["error"]["message"]


def test_the_guard_is_the_innermost_middleware(api_harness, api_app):
    api_harness()
    assert [entry[0] for entry in api_app.user_middleware][-1] is llava_api.ImageRequestGuard


# ---------------------------------------------------------------------------------------------- Anthropic


def anthropic_guard(inner):
    def check_image(name, url):
        if "broken" in url:
            raise llava_api.ImageProblem(f"{name}: cannot decode image")

    return llava_api.ImageRequestGuard(inner, llava_api.GuardHooks(active=lambda headers, kind: True,
                                                                  check_image=check_image))


def anthropic_message(source):
    return {"model": "x", "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "Hi"}]}]}


@pytest.mark.parametrize("source, reason", [
    ({"type": "url", "url": "https://example.invalid/cat.png"}, "only base64 image sources are accepted"),
    ({"type": "base64", "media_type": "image/png", "data": "broken"}, "cannot decode image"),
])
def test_anthropic_requests_get_anthropic_errors(source, reason):
    async def inner(scope, receive, send):
        raise AssertionError("webui must not see this request")

    response = call(anthropic_guard(inner), "/v1/messages", anthropic_message(source), header="x-api-key")
    assert response.status == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("image 1 of message 1: " + reason)


def test_a_good_request_reaches_webui_unchanged_and_a_late_error_ends_the_stream():
    seen = {}

    async def inner(scope, receive, send):
        seen["body"] = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"event: message_start\ndata: {}\n\n", "more_body": True})
        raise ExceptionGroup("task group", [RuntimeError("the model went away")])

    body = anthropic_message({"type": "base64", "media_type": "image/png", "data": "aGVsbG8="})
    response = call(anthropic_guard(inner), "/v1/messages", body, header="x-api-key")
    assert json.loads(seen["body"]) == body
    assert response.error is None and response.finished
    lines = response.body.decode().splitlines()
    assert "event: error" in lines
    error = json.loads(response.events()[-1])
    assert error == {"type": "error", "error": {"type": "server_error",
                                                "message": "the reply failed: the model went away"}}


def test_errors_before_a_response_started_are_webuis_to_answer():
    async def inner(scope, receive, send):
        raise RuntimeError("boom")

    response = call(anthropic_guard(inner), "/v1/messages", anthropic_message({"type": "base64", "data": "aGk="}))
    assert isinstance(response.error, RuntimeError) and response.status is None
