"""Which model a request names: a pure function of its method, path, content type and body.

Only the model is read; the caller forwards the body byte for byte. Three places name a model:
the ``model`` field of a JSON body (completions, chat, embeddings, responses, tokenize...), the
path of ``/v1/models/{model}``, and the ``model`` field of a multipart form (audio
transcriptions and translations). No I/O here, so any data path (aiohttp's or a lean one) can
call it with the bytes it already holds.
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

from .routes import normalize_path

_MODEL_PATH = "/v1/models/"
# A multipart part named "model": its headers end at the blank line, its value at the boundary.
_PART_NAME_RE = re.compile(rb'name="?model"?(?:;|\r\n|\s)', re.IGNORECASE)
_BOUNDARY_RE = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


class NoModel(ValueError):
    """The body names no model, or cannot be read for one; the message says which."""


def model_of(method: str, path: str, content_type: str, body: bytes) -> str | None:
    """The model the request names, or None when its path and body name none.

    Raises ``NoModel`` for a body that says it is JSON or a form but cannot be read as one: the
    client's mistake, answered 400 by the caller, rather than a guess.
    """
    normal = normalize_path(path)
    if normal.startswith(_MODEL_PATH) and len(normal) > len(_MODEL_PATH):
        return unquote(normal[len(_MODEL_PATH):])
    if not body:
        return None
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        return _form_model(content_type, body)
    # JSON by its type, and leniently under any other (curl -d sends a form type)
    return _json_model(body, strict=kind == "application/json" or kind.endswith("+json"))


def _json_model(body: bytes, strict: bool) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        if strict:
            raise NoModel("the body is not valid JSON") from None
        return None   # not said to be JSON, and not JSON: it names nothing
    if not isinstance(document, dict):
        return None
    model = document.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        kind = {bool: "true or false", int: "a number", float: "a number", list: "an array",
                dict: "an object", type(None): "null"}.get(type(model), type(model).__name__)
        raise NoModel(f"the 'model' field is {kind}, not a string")
    return model


def _form_model(content_type: str, body: bytes) -> str | None:
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        raise NoModel("the multipart body has no boundary in its Content-Type")
    delimiter = b"--" + match.group(1).encode("latin-1")
    for part in body.split(delimiter)[1:]:
        head, separator, value = part.partition(b"\r\n\r\n")
        if not separator or b"filename=" in head.lower() or not _PART_NAME_RE.search(head + b"\r\n"):
            continue
        try:
            return value.removesuffix(b"\r\n").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise NoModel("the form's 'model' field is not UTF-8") from None
    return None
