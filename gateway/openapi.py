"""The gateway's own OpenAPI 3.1 document, written from the validation rules of the gateway
(gateway/validation.py) and of the local engine (backends/local/request.py): the same fields,
bounds no narrower than those checks (what the document refuses, the gateway refuses; remote
kinds forward any field to their upstream). Served at GET /openapi.json."""

from __future__ import annotations

from typing import Any

from gateway.settings import Settings
from gateway.validation import MAX_N, ROLES

INT_MAX = 1 << 31  # validation's upper bound for max_tokens
ERROR_STATUSES = {
    "400": "Invalid body or field (names `param`), or the context is too long.",
    "401": "Missing or wrong API key.",
    "403": "The key may not use this adapter or endpoint.",
    "404": "Unknown model or adapter (or one this tenant may not see).",
    "408": "The request body was not received in time.",
    "413": "The body is larger than server.max_body_bytes.",
    "415": "The Content-Type is not application/json.",
    "422": "The tenant's adapter could not be loaded.",
    "429": "A rate, concurrency or KV-share limit (Retry-After).",
    "500": "The gateway failed (never expected).",
    "502": "The backend failed or is unreachable.",
    "503": "At capacity, starting or shutting down (Retry-After).",
    "504": "The backend timed out.",
}


def _error_schema() -> dict[str, Any]:
    nullable = {"type": ["string", "null"]}
    return {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": nullable, "code": nullable},
        }},
    }


def _sampling() -> dict[str, Any]:
    """Fields both endpoints take on the local engine (backends/local/request.py; remote
    kinds forward any field to their upstream); null means the default."""
    number = {"type": ["number", "null"]}
    recorded: dict[str, dict[str, Any]] = {
        "metadata": {"type": ["object", "null"]}, "store": {"type": ["boolean", "null"]},
        "service_tier": {"type": ["string", "null"]},
        "prompt_cache_key": {"type": ["string", "null"]},
        "safety_identifier": {"type": ["string", "null"]}}
    return {
        "max_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": INT_MAX},
        "temperature": {**number, "minimum": 0, "maximum": 2},
        "top_p": {**number, "minimum": 0, "maximum": 1},
        "min_p": {**number, "minimum": 0, "maximum": 1},
        "top_k": {"type": ["integer", "null"], "minimum": -1},
        "repetition_penalty": {**number, "minimum": 0.01, "maximum": 10},
        "presence_penalty": {**number, "minimum": -2, "maximum": 2},
        "frequency_penalty": {**number, "minimum": -2, "maximum": 2},
        "seed": {"type": ["integer", "null"], "minimum": -(1 << 63), "maximum": (1 << 63) - 1},
        "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N},
        "stream": {"type": ["boolean", "null"]},
        "stop": {"oneOf": [{"type": ["string", "null"]},
                           {"type": "array", "items": {"type": "string"}, "maxItems": 64}]},
        "stream_options": {"type": ["object", "null"], "additionalProperties": False,
                           "properties": {"include_usage": {"type": "boolean"}}},
        "ignore_eos": {"type": "boolean"},
        "user": {"type": ["string", "null"]},
        "logit_bias": {"type": ["object", "null"],
                       "additionalProperties": {"type": "number", "minimum": -100,
                                                "maximum": 100}},
        **recorded,
    }


_SCHEMA = {"type": "object"}  # any JSON schema
_TOOL = {"type": "object", "required": ["type", "function"], "additionalProperties": False,
         "properties": {"type": {"const": "function"},
                        "function": {"type": "object", "required": ["name"],
                                     "additionalProperties": False,
                                     "properties": {"name": {"type": "string",
                                                             "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                                                    "description": {"type": "string"},
                                                    "parameters": _SCHEMA,
                                                    "strict": {"type": "boolean"}}}}}


def _chat_request(models: list[str]) -> dict[str, Any]:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
    message = {
        "type": "object", "required": ["role", "content"],
        "properties": {
            "role": {"enum": list(ROLES)},
            "content": {"oneOf": [{"type": "string"},
                                  {"type": "array", "items": text_part}]},
        },
    }
    formats = [{"type": "null"},
               {"type": "object", "required": ["type"], "additionalProperties": False,
                "properties": {"type": {"enum": ["text", "json_object"]}}},
               {"type": "object", "required": ["type", "json_schema"],
                "additionalProperties": False,
                "properties": {"type": {"const": "json_schema"},
                               "json_schema": {"type": "object", "required": ["name", "schema"],
                                               "properties": {"name": {"type": "string"},
                                                              "schema": _SCHEMA,
                                                              "strict": {"type": "boolean"}}}}}]
    return {
        "type": "object", "required": ["model", "messages"], "additionalProperties": False,
        "properties": {"model": {"enum": models},
                       "messages": {"type": "array", "minItems": 1, "items": message},
                       "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1,
                                                 "maximum": INT_MAX},
                       "logprobs": {"type": ["boolean", "null"]},
                       "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
                       "tools": {"type": ["array", "null"], "items": _TOOL},
                       "tool_choice": {"oneOf": [
                           {"enum": ["none", "auto", "required", None]},
                           {"type": "object", "required": ["type", "function"],
                            "properties": {"type": {"const": "function"},
                                           "function": {"type": "object", "required": ["name"],
                                                        "properties": {"name": {"type": "string"}}}}}]},
                       "parallel_tool_calls": {"type": ["boolean", "null"]},
                       "chat_template_kwargs": {"type": ["object", "null"]},
                       "response_format": {"oneOf": formats},
                       **_sampling()},
    }


def _completion_request(models: list[str]) -> dict[str, Any]:
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": INT_MAX},
           "minItems": 1}
    return {
        "type": "object", "required": ["model", "prompt"], "additionalProperties": False,
        "properties": {"model": {"enum": models},
                       "prompt": {"oneOf": [{"type": "string"}, ids,
                                            {"type": "array", "items": {"type": "string"},
                                             "minItems": 1},
                                            {"type": "array", "items": ids, "minItems": 1}]},
                       "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
                       "echo": {"type": ["boolean", "null"]},
                       "best_of": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N},
                       "suffix": {"enum": ["", None]},
                       **_sampling()},
    }


def _usage() -> dict[str, Any]:
    n = {"type": "integer", "minimum": 0}
    return {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {"prompt_tokens": n, "completion_tokens": n, "total_tokens": n}}


def _completion_response(chat: bool) -> dict[str, Any]:
    finish = {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", None]}
    if chat:
        message = {"type": "object", "required": ["role", "content"],
                   "properties": {"role": {"const": "assistant"},
                                  "content": {"type": ["string", "null"]},
                                  "tool_calls": {"type": "array"}}}
        choice = {"type": "object", "required": ["index", "message", "finish_reason"],
                  "properties": {"index": {"type": "integer"}, "finish_reason": finish,
                                 "message": message}}
    else:
        choice = {"type": "object", "required": ["index", "text", "finish_reason"],
                  "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                 "finish_reason": finish}}
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {"id": {"type": "string"}, "created": {"type": "integer"},
                           "object": {"const": "chat.completion" if chat else "text_completion"},
                           "model": {"type": "string"}, "usage": _usage(),
                           "choices": {"type": "array", "items": choice}}}


def _responses(ok: dict[str, Any], statuses: tuple[str, ...], stream: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": ok}}
    if stream:
        # each server-sent event: `data: <JSON chunk, error object, or [DONE]>`
        content["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}
    out: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for status in statuses:
        out[status] = {"description": ERROR_STATUSES[status],
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    return out


GENERATION_ERRORS = ("400", "401", "403", "404", "408", "413", "415", "422", "429", "500", "502",
                     "503", "504")
READ_ERRORS = ("401", "404", "500")


def document(settings: Settings) -> dict[str, Any]:
    models = sorted(m.name for m in settings.models)
    model = {"type": "object", "required": ["id", "object", "created", "owned_by"],
             "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                            "created": {"type": "integer"}, "owned_by": {"type": "string"}}}
    model_list = {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"},
                                 "data": {"type": "array", "items": model}}}
    security: list[dict[str, list[str]]] = [{"bearer": []}]

    def generation(op_id: str, schema: dict[str, Any], chat: bool) -> dict[str, Any]:
        return {"post": {
            "operationId": op_id, "security": security,
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}},
            "responses": _responses(_completion_response(chat), GENERATION_ERRORS, stream=True),
        }}

    return {
        "openapi": "3.1.0",
        "info": {"title": "memgate", "version": "0.1.0",
                 "description": "OpenAI-compatible, memory-aware multi-tenant gateway."},
        "paths": {
            "/v1/chat/completions": generation("createChatCompletion", _chat_request(models), True),
            "/v1/completions": generation("createCompletion", _completion_request(models), False),
            "/v1/models": {"get": {"operationId": "listModels", "security": security,
                                   "responses": _responses(model_list, READ_ERRORS)}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel", "security": security,
                "parameters": [{"name": "model", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "responses": _responses(model, READ_ERRORS)}},
        },
        "components": {
            "schemas": {"Error": _error_schema()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
