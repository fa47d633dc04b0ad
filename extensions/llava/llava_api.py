"""A guard in front of webui's OpenAI / Anthropic API for requests that carry images (pure ASGI).

Two things webui cannot do for an extension, done at the HTTP level:

* **HTTP 400 before webui sees a bad image.** webui's streaming endpoints answer 200 and send their
  first chunk before any extension hook runs (``EventSourceResponse`` around a generator), so a hook can
  no longer refuse the request; and ``/v1/completions`` drops an undecodable image itself before any
  hook sees it. The guard reads the JSON body, hands every image of it to ``check_image`` and answers
  400 in the endpoint's error shape when one cannot be used; otherwise it replays the body to webui
  unchanged.
* **An error inside a started event stream ends the stream cleanly.** An exception that escapes webui
  after the stream started would break the connection (``curl: (18)``, the ``openai`` client's
  ``APIConnectionError``) and log a traceback; the guard sends it as a last, well-formed error event
  instead (``data: {"error": {...}}`` for OpenAI, which the ``openai`` client raises as ``APIError``;
  ``event: error`` for Anthropic) and finishes the response.

Nothing here imports webui or a web framework, so it runs and is tested without them. ``install`` puts
the guard into webui's FastAPI app.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

logger = logging.getLogger(__name__)

# Endpoint -> error shape. /v1/completions carries images only in ``messages`` (then webui decodes them).
GUARDED_PATHS = {"/v1/chat/completions": "openai", "/v1/completions": "openai", "/v1/messages": "anthropic"}


class ImageProblem(ValueError):
    """An image of a request that cannot be used; ``str()`` names the image and the reason."""


@dataclass(frozen=True)
class GuardHooks:
    """What the guard asks of its host (the extension), each call made on a worker thread.

    ``active(headers, kind)``: check this request's images? False when vision is off, or when webui
    will refuse the request anyway (wrong API key, foreign Host header), so that only webui answers it.
    ``headers``: lower-case name -> value. ``check_image(name, url)``: raise :class:`ImageProblem` (or
    any ``ValueError``) for an image that cannot be used; ``url`` is what webui will see (a data URL for
    Anthropic base64 blocks).
    """

    active: Callable[[dict, str], bool]
    check_image: Callable[[str, str], None]


def request_images(kind: str, path: str, payload) -> list[tuple[str, str]]:
    """``(name, url)`` of every image webui will take from this request body, in message order.

    OpenAI: ``image_url`` parts of user messages (of every message for /v1/completions, whose images
    webui takes from all of them). Anthropic: ``image`` blocks of user messages, as the data URL webui
    builds from a base64 block. A malformed part is left to webui's own validation. Raises
    :class:`ImageProblem` for an Anthropic image that webui would drop silently (a URL source).
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
        return []
    images = []
    for number, message in enumerate(payload["messages"], start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            continue
        if message.get("role") != "user" and path != "/v1/completions":
            continue
        count = 0
        for part in message["content"]:
            if not isinstance(part, dict):
                continue
            if kind == "openai" and part.get("type") == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else None
                if isinstance(url, str):
                    count += 1
                    images.append((f"image {count} of message {number}", url))
            elif kind == "anthropic" and part.get("type") == "image":
                count += 1
                name = f"image {count} of message {number}"
                source = part.get("source") if isinstance(part.get("source"), dict) else {}
                if source.get("type") != "base64":
                    raise ImageProblem(f"{name}: only base64 image sources are accepted (got "
                                       f"{source.get('type')!r}); send the image data")
                # The data URL webui's Anthropic converter builds (modules/api/anthropic.py).
                images.append((name, f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"))
    return images


def error_body(kind: str, message: str, error_type: str = "invalid_request_error",
               param: str | None = "messages") -> dict:
    """webui's error JSON for the endpoint kind (OpenAI's ``error`` object / Anthropic's error)."""
    if kind == "anthropic":
        return {"type": "error", "error": {"type": error_type, "message": message}}
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


def stream_error_event(kind: str, message: str, error_type: str, param: str | None = None) -> bytes:
    """The last event of a stream that failed, in the separator webui's streams use (``\\n``)."""
    body = json.dumps(error_body(kind, message, error_type, param))
    return (f"event: error\ndata: {body}\n\n" if kind == "anthropic" else f"data: {body}\n\n").encode("utf-8")


class ImageRequestGuard:
    """ASGI middleware; see the module docstring. ``app`` is the ASGI app it wraps."""

    def __init__(self, app, hooks: GuardHooks):
        self.app = app
        self.hooks = hooks

    async def __call__(self, scope, receive, send):
        kind = GUARDED_PATHS.get(scope.get("path", "")) if scope.get("type") == "http" else None
        if kind is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return
        problem = await asyncio.to_thread(self._problem, kind, scope, body)
        if problem is not None:
            logger.warning("llava: %s refused (HTTP 400): %s", scope["path"], problem)
            await _send_json(send, 400, error_body(kind, problem))
            return
        await self._forward(kind, scope, _replay(body, receive), send)

    def _problem(self, kind: str, scope, body: bytes) -> str | None:
        """The message for the first image that cannot be used, or None (runs on a worker thread)."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
        if not self.hooks.active(headers, kind):
            return None
        try:
            payload = json.loads(body)
        except ValueError:
            return None  # webui answers a body that is not JSON itself
        try:
            for name, url in request_images(kind, scope["path"], payload):
                self.hooks.check_image(name, url)
        except ValueError as problem:  # ImageProblem and the decoder's ImageError
            return str(problem)
        return None

    async def _forward(self, kind: str, scope, receive, send):
        response = _ResponseState()

        async def tracking_send(message):
            response.saw(message)
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - includes the ExceptionGroup of the stream's task group
            if not (response.started and response.streaming) or response.finished:
                raise
            message, error_type, param, expected = _describe(exc)
            if expected:
                logger.warning("llava: %s stream ended with an error: %s", scope["path"], message)
            else:
                logger.exception("llava: %s stream failed; the client gets an error event", scope["path"])
            try:
                await send({"type": "http.response.body", "more_body": True,
                            "body": stream_error_event(kind, message, error_type, param)})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception:  # noqa: BLE001 - the client is gone; nothing left to tell it
                pass


class _ResponseState:
    def __init__(self):
        self.started = self.streaming = self.finished = False

    def saw(self, message) -> None:
        if message.get("type") == "http.response.start":
            self.started = True
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            self.streaming = content_type.startswith(b"text/event-stream")
        elif message.get("type") == "http.response.body" and not message.get("more_body", False):
            self.finished = True


def _describe(exc: BaseException) -> tuple[str, str, str | None, bool]:
    """``(message, error type, param, expected)`` for an exception that ended a stream.

    webui's own request errors (``OpenAIError``: a ``message`` and an HTTP ``code``) are expected; the
    stream's task group may wrap them in an ExceptionGroup.
    """
    for error in _leaves(exc):
        message, code = getattr(error, "message", None), getattr(error, "code", None)
        if isinstance(message, str) and isinstance(code, int):
            error_type = "invalid_request_error" if code < 500 else "server_error"
            return message, error_type, getattr(error, "param", None), code < 500
    first = next(iter(_leaves(exc)))
    text = str(first).strip().splitlines()
    return f"the reply failed: {text[0] if text else type(first).__name__}", "server_error", None, False


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    nested = getattr(exc, "exceptions", None)
    if not nested:
        yield exc
        return
    for inner in nested:
        yield from _leaves(inner)


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A ``receive`` that hands webui the body already read, then the client's later messages
    (webui watches them for a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        if pending:
            return pending.pop()
        return await receive()

    return replayed


async def _send_json(send, status: int, content: dict) -> None:
    data = json.dumps(content).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def install(app, hooks: GuardHooks) -> str:
    """Put the guard into webui's FastAPI ``app``; returns how (for the log).

    Before the app served its first request, the guard becomes the innermost of its user middleware:
    after webui's Host-header check and CORS, so its answers carry the CORS headers webui's do. Once the
    middleware stack is built (the extension was enabled after the API started), it wraps the built
    stack instead; its 400 answers then lack CORS headers.
    """
    if getattr(app, "_llava_guard", False):
        return "already installed"
    try:
        app.add_middleware(ImageRequestGuard, hooks=hooks)
    except RuntimeError:  # Starlette: "Cannot add middleware after an application has started"
        app.middleware_stack = ImageRequestGuard(app.middleware_stack, hooks)
        how = "around the running API"
    else:
        # add_middleware puts the new middleware first (outermost); move it last (innermost).
        app.user_middleware.append(app.user_middleware.pop(0))
        how = "as the API's innermost middleware"
    app._llava_guard = True
    return how
