"""The HTTP layer of webui modules/api/script.py @1dcde41d for /v1/chat/completions and /v1/completions,
as a plain ASGI app (no FastAPI, uvicorn or sse-starlette).

What a client and an ASGI middleware can observe, reproduced:
- ``app`` has Starlette's middleware bookkeeping: ``add_middleware`` puts a class first in
  ``user_middleware`` and raises ``RuntimeError`` once the stack is built (on the first request);
  webui's own Host-header check is a user middleware (script.py:136-147);
- the API key is checked per route (``Authorization: Bearer <key>``; 401 ``{"detail": "Unauthorized"}``);
- an ``OpenAIError`` raised while a non-streaming request is handled becomes its JSON error with its
  ``code`` as HTTP status (script.py:108-119);
- a streaming request answers 200 with ``text/event-stream`` and sends each chunk as ``data: <json>``
  followed by a blank line (``sep="\\n"``), then ``data: [DONE]``; an exception raised by the generator
  after that escapes the app (``EventSourceResponse``: the connection breaks and uvicorn logs "Exception in
  ASGI application") - seen in a real webui with a hook that raised.
Left out: CORS, /v1/messages, the other endpoints, disconnect polling between chunks.
"""
import asyncio
import json

from modules import shared
from modules.api import completions
from modules.api.errors import OpenAIError


class App:
    def __init__(self):
        self.user_middleware = [(_HostHeaderCheck, {})]
        self.middleware_stack = None

    def add_middleware(self, cls, **kwargs):
        if self.middleware_stack is not None:
            raise RuntimeError('Cannot add middleware after an application has started')
        self.user_middleware.insert(0, (cls, kwargs))

    def build_middleware_stack(self):
        app = _router
        for cls, kwargs in reversed(self.user_middleware):
            app = cls(app=app, **kwargs)
        return app

    async def __call__(self, scope, receive, send):
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)


class _HostHeaderCheck:
    """validate_host_header (script.py:136-147): loopback names only unless --listen / --public-api."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if not (shared.args.listen or shared.args.public_api):
            host = dict(scope.get('headers', [])).get(b'host', b'').decode('latin-1').split(':')[0]
            if host not in ('localhost', '127.0.0.1'):
                await _send_json(send, 400, {'detail': 'Invalid host header'})
                return
        await self.app(scope, receive, send)


ROUTES = {
    '/v1/chat/completions': (completions.chat_completions, completions.stream_chat_completions),
    '/v1/completions': (completions.completions, completions.stream_completions),
}


async def _router(scope, receive, send):
    handlers = ROUTES.get(scope['path'])
    if handlers is None or scope['method'] != 'POST':
        await _send_json(send, 404, {'detail': 'Not Found'})
        return

    headers = {name.decode('latin-1').lower(): value.decode('latin-1') for name, value in scope.get('headers', [])}
    if shared.args.api_key and headers.get('authorization') != f'Bearer {shared.args.api_key}':
        await _send_json(send, 401, {'detail': 'Unauthorized'})
        return

    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get('body', b''))
        if not message.get('more_body', False):
            break
    try:
        body = json.loads(b''.join(chunks))
    except ValueError:
        await _send_json(send, 422, {'detail': 'invalid JSON'})
        return

    answer, stream = handlers
    if not body.get('stream'):
        try:
            response = await asyncio.to_thread(answer, body)
        except OpenAIError as error:
            error_type = 'server_error' if error.code >= 500 else 'invalid_request_error'
            await _send_json(send, error.code, {'error': {'message': error.message, 'type': error_type,
                                                          'param': getattr(error, 'param', None), 'code': None}})
            return
        await _send_json(send, 200, response)
        return

    await send({'type': 'http.response.start', 'status': 200,
                'headers': [(b'content-type', b'text/event-stream; charset=utf-8'), (b'cache-control', b'no-cache')]})
    generator = stream(body)
    finished = object()
    try:
        while True:
            chunk = await asyncio.to_thread(next, generator, finished)
            if chunk is finished:
                break
            event = f'data: {json.dumps(chunk)}\n\n'.encode()
            await send({'type': 'http.response.body', 'body': event, 'more_body': True})
        await send({'type': 'http.response.body', 'body': b'data: [DONE]\n\n', 'more_body': True})
        await send({'type': 'http.response.body', 'body': b'', 'more_body': False})
    finally:
        generator.close()


async def _send_json(send, status, content):
    data = json.dumps(content).encode('utf-8')
    await send({'type': 'http.response.start', 'status': status,
                'headers': [(b'content-type', b'application/json'), (b'content-length', str(len(data)).encode())]})
    await send({'type': 'http.response.body', 'body': data, 'more_body': False})


app = App()
