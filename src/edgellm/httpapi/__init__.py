"""The one HTTP stack of the product (FastAPI + uvicorn), shared by ``edgellm serve`` (the
OpenAI gateway) and ``edgellm kv-events``.

- :mod:`~edgellm.httpapi.errors`: OpenAI's error shape on every answer that is not a success;
- :mod:`~edgellm.httpapi.guard`: API key, body size and body deadline (ASGI middleware);
- :mod:`~edgellm.httpapi.protocol`: what happens before the app sees a request: connection
  count, request-head deadline, unparsable requests (a uvicorn protocol);
- :mod:`~edgellm.httpapi.server`: binding, serving in the foreground (signals, bounded drain)
  or on a thread.
"""

from edgellm.httpapi.errors import APIError, error_body, install_error_handlers
from edgellm.httpapi.guard import RequestGuard
from edgellm.httpapi.server import HttpLimits, HttpServer

__all__ = ["APIError", "HttpLimits", "HttpServer", "RequestGuard", "error_body",
           "install_error_handlers"]
