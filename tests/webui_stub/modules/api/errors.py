"""webui modules/api/errors.py @1dcde41d: errors the API turns into OpenAI-style JSON replies.

An ``OpenAIError`` raised anywhere during a request (an extension hook included) becomes a JSON
error with its ``code`` as HTTP status (api/script.py:108-119); any other exception is a plain
HTTP 500 from FastAPI.
"""


class OpenAIError(Exception):
    def __init__(self, message=None, code=500, internal_message=''):
        super().__init__(message)
        self.message = message
        self.code = code
        self.internal_message = internal_message


class InvalidRequestError(OpenAIError):
    def __init__(self, message, param, code=400, internal_message=''):
        super().__init__(message, code, internal_message)
        self.param = param
