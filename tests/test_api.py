"""The local HTTP API over a real Unix socket, with real clients: openai, httpx, curl."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import DaemonProc

pytestmark = pytest.mark.model


def _http(d: DaemonProc, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                        base_url="http://localhost", timeout=timeout)


@pytest.fixture
def http(api_daemon: DaemonProc) -> Iterator[httpx.Client]:
    with _http(api_daemon) as client:
        yield client


@pytest.fixture
def oai(http: httpx.Client) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)


def _wait_idle(http: httpx.Client, timeout: float = 30.0) -> dict[str, Any]:
    """Poll /health until no sequence runs and none waits (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        serving = http.get("/health").json()["serving"]
        if serving["active_sequences"] == 0 and serving["queue_depth"] == 0:
            return serving
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle: {serving}")


def _curl(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--unix-socket", str(d.socket_path), *args],
                          capture_output=True, text=True, timeout=120)


USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_openai_client_chat(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                       max_tokens=24, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 5
    assert 0 < resp.usage.completion_tokens <= 24
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_openai_client_streaming_with_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="edgeagent", messages=USER, max_tokens=16, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text
    assert finishes[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stream_matches_non_stream_greedy(oai: openai.OpenAI) -> None:
    full = oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                       max_tokens=20, temperature=0)
    stream = oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                         max_tokens=20, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full.choices[0].message.content


def test_text_completion_and_stop(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(model="edgeagent", prompt="1, 2, 3, 4,", max_tokens=20,
                                  temperature=0, stop=[" 7"])
    assert " 7" not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"


def test_curl_health_models_and_sse(api_daemon: DaemonProc) -> None:
    health = _curl(api_daemon, "http://localhost/health")
    doc = json.loads(health.stdout)
    assert doc["status"] == "ready"
    assert doc["plan"]["context_length"] == 2048
    assert "onnxruntime_genai" in doc["versions"]

    models = json.loads(_curl(api_daemon, "http://localhost/v1/models").stdout)
    ids = {m["id"] for m in models["data"]}
    assert {"edgeagent", "edgeagent:reasoning", "edgeagent:math", "edgeagent:coding"} <= ids

    body = json.dumps({"messages": USER, "max_tokens": 8, "stream": True})
    sse = _curl(api_daemon, "-N", "-H", "Content-Type: application/json", "-d", body,
                "http://localhost/v1/chat/completions")
    lines = [ln for ln in sse.stdout.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "chat.completion.chunk"


def test_metrics_and_openapi(http: httpx.Client) -> None:
    http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
    text = http.get("/metrics").text
    assert "edgeagent_generated_tokens_total" in text
    assert "edgeagent_queue_depth" in text
    spec = http.get("/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]


def test_profile_changes_the_prompt(http: httpx.Client) -> None:
    plain = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).json()
    coding = http.post("/v1/chat/completions", json={
        "model": "edgeagent:coding", "messages": USER, "max_tokens": 2}).json()
    assert coding["model"] == "edgeagent:coding"
    # The profile's system prompt replaces the template's default one: a different prompt.
    assert coding["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"]


def test_four_concurrent_clients(api_daemon: DaemonProc) -> None:
    def one(i: int) -> str:
        with _http(api_daemon) as client:
            oai = openai.OpenAI(base_url="http://localhost/v1", api_key="x", http_client=client)
            resp = oai.chat.completions.create(
                model="edgeagent", max_tokens=24,
                messages=[{"role": "user", "content": f"Name a colour ({i})."}])
            return resp.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(4)))
    assert all(answers)


def test_cancel_mid_stream_frees_the_slot(http: httpx.Client) -> None:
    before = http.get("/health").json()["serving"]["cancelled"]
    body = {"messages": USER, "max_tokens": 400, "min_tokens": 400, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 3:
                break
    # Closing the response disconnects; the job must leave the batch.
    serving = _wait_idle(http)
    assert serving["cancelled"] >= before + 1


def test_tool_call_is_valid_json_matching_the_schema(oai: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string",
                                                 "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}}]
    resp = oai.chat.completions.create(
        model="edgeagent", max_tokens=80, tools=tools, tool_choice="required",  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "What's the weather in Paris?"}])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert set(args) == {"city", "unit"}
    assert isinstance(args["city"], str)
    assert args["unit"] in ("celsius", "fahrenheit")


def test_response_format_json_schema(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    resp = oai.chat.completions.create(
        model="edgeagent", max_tokens=30,
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    doc = json.loads(resp.choices[0].message.content or "")
    assert isinstance(doc["answer"], int)


@pytest.mark.parametrize(("content", "headers", "status"), [
    (b"{not json", {}, 400),
    (b'{"messages": "hello"}', {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "colour": 1}', {}, 400),
    (b'{"messages": []}', {}, 400),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999999999}', {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', {}, 400),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', {}, 400),
    (b'{"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}', {}, 404),
    (b'[1, 2, 3]', {}, 400),
    # a JSON schema whose keywords have the wrong types (the daemon walks it: was a 500)
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
     b'"function": {"name": "f", "parameters": {"properties": {"x": {"enum": 5}}}}}]}',
     {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": '
     b'"json_schema", "json_schema": {"name": "r", "schema": {"anyOf": 7}}}}', {}, 400),
    # a tool without a type, of an unknown type (tagged unions: one error naming the types)
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"function": '
     b'{"name": "f"}}]}', {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web"}]}', {},
     400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "web"}}',
     {}, 400),
])
def test_bad_input_gets_an_openai_error(
    http: httpx.Client, content: bytes, headers: dict[str, str], status: int
) -> None:
    resp = http.post("/v1/chat/completions", content=content,
                     headers={"Content-Type": "application/json", **headers})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"]
    assert err["type"]
    if b'"enum": 5' in content:
        assert "properties/x/enum" in err["message"], err
    if b'"web"' in content or b'[{"function"' in content:
        assert err["param"] in ("tools.0", "tool_choice"), err
        assert "'function'" in err["message"] and ";" not in err["message"], err


def test_oversized_body_and_long_prompt(http: httpx.Client) -> None:
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]})
    resp = http.post("/v1/chat/completions", content=big,
                     headers={"Content-Type": "application/json"})
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "body_too_large"

    long_prompt = "word " * 3000  # more tokens than the 2048 context
    resp = http.post("/v1/chat/completions",
                     json={"messages": [{"role": "user", "content": long_prompt}]})
    assert resp.status_code == 400
    msg = resp.json()["error"]["message"]
    assert "2048" in msg and "tokens" in msg
    assert resp.json()["error"]["code"] == "context_length_exceeded"


def test_daemon_survives_and_leaks_no_slot(http: httpx.Client) -> None:
    for _ in range(3):
        http.post("/v1/chat/completions", content=b"\x00\x01garbage",
                  headers={"Content-Type": "application/json"})
    serving = _wait_idle(http)
    assert serving["active_sequences"] == 0
    assert http.get("/health").status_code == 200
