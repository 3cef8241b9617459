"""Which model a request names: the pure routing function, on the bodies clients really send."""

from __future__ import annotations

import json

import pytest

from autosleepd.proxy.route import NoModel, model_of


def test_the_model_field_of_a_json_body():
    body = json.dumps({"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": "hi"}]})
    assert model_of("POST", "/v1/chat/completions", "application/json", body.encode()) == "Qwen/Qwen3-8B"
    assert model_of("POST", "/v1/completions", "application/json; charset=utf-8",
                    b'{"prompt": "x", "model": "small"}') == "small"


def test_a_json_body_sent_with_curl_s_default_form_type_is_still_read():
    assert model_of("POST", "/v1/completions", "application/x-www-form-urlencoded",
                    b'{"model": "small", "prompt": "x"}') == "small"


def test_the_model_in_the_path_wins_and_is_unquoted():
    assert model_of("GET", "/v1/models/Qwen%2FQwen3-8B", "", b"") == "Qwen/Qwen3-8B"
    assert model_of("GET", "//v1/models/small/", "", b"") == "small"
    assert model_of("GET", "/v1/models", "", b"") is None


def test_the_model_field_of_a_multipart_form():
    boundary = "----form7MA4YWxkTrZu0gW"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\n"
            f"Content-Type: audio/wav\r\n\r\nRIFF...name=\"model\"\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-large\r\n"
            f"--{boundary}--\r\n").encode()
    assert model_of("POST", "/v1/audio/transcriptions",
                    f"multipart/form-data; boundary={boundary}", body) == "whisper-large"


def test_bodies_that_name_no_model():
    assert model_of("POST", "/v1/completions", "application/json", b'{"prompt": "x"}') is None
    assert model_of("POST", "/v1/completions", "application/json", b"[1, 2]") is None
    assert model_of("POST", "/v1/completions", "", b"") is None
    assert model_of("POST", "/upload", "application/octet-stream", b"\x00\x01") is None


@pytest.mark.parametrize("content_type, body, said", [
    ("application/json", b'{"model": ', "not valid JSON"),
    ("application/json", b'{"model": 7}', "is a number, not a string"),
    ("multipart/form-data", b"--x\r\n", "no boundary"),
])
def test_a_body_that_cannot_be_read_for_its_model_says_why(content_type, body, said):
    with pytest.raises(NoModel, match=said):
        model_of("POST", "/v1/completions", content_type, body)
