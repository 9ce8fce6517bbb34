"""The OpenAPI document of an app whose handlers read their JSON bodies themselves (to answer
every malformed body in OpenAI's shape), so that it still describes those bodies - what a
schema-driven tester or a client generator reads.

- :func:`json_body` -> a route's ``openapi_extra``: the model's schema, its nested models
  placed in the document's ``components`` (a ``$ref`` to ``#/$defs`` would point nowhere);
- :func:`get_and_head`: a ``GET`` route that also answers ``HEAD``, listed once.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from pydantic import BaseModel

_KEY = "edgellm_body_schemas"


def json_body(app: FastAPI, model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = getattr(app.state, _KEY, None)
    if defs is None:
        defs = {}
        setattr(app.state, _KEY, defs)
        original = app.openapi

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                spec = original()
                spec.setdefault("components", {}).setdefault("schemas", {}).update(defs)
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]
    defs.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}  # fmt: skip


def get_and_head(app: FastAPI, path: str, endpoint: Callable, **kwargs: Any) -> None:
    app.add_api_route(path, endpoint, methods=["GET"], **kwargs)
    app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
