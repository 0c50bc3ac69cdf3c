"""Tool calls cut by ``max_tokens`` never hand the client our envelope (``{"tool_calls":
[...``): the calls written whole, or empty content with ``finish_reason: "length"`` and an
``explanation``; the same on the socket, streamed or not, and over MQTT. The daemon as a
subprocess, a real Mosquitto; the parser itself over strings."""

from __future__ import annotations

import json
from typing import Any

import httpx

from edgeagent.protocol import cut_tool_envelope
from tests.broker import Broker, requester
from tests.conftest import DaemonProc

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string",
                                             "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}]
#: Six tokens cut the call in the middle: the whole envelope takes about 25.
CUT = {"messages": [{"role": "user", "content": "What's the weather in Paris?"}],
       "tools": TOOLS, "tool_choice": "required", "max_tokens": 6}


def _no_envelope(content: str | None) -> None:
    assert not (content or "").lstrip().startswith("{"), content
    assert "tool_calls" not in (content or ""), content


def _assert_cut(choice: dict[str, Any]) -> None:
    """A required call that max_tokens cut: nothing of it, and why."""
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == ""
    assert "tool_calls" not in choice["message"]
    assert "max_tokens" in choice["explanation"]


def _sse(resp: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in resp.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_cut_envelope_keeps_whole_calls_and_drops_the_rest() -> None:
    two = ('{"tool_calls":[{"name":"a","arguments":{"x":1}}, {"name":"b","arguments":{"y"')
    content, calls, why = cut_tool_envelope(two, "length")
    assert content is None and why is not None and "1 complete call" in why
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls or []] == [("a", {"x": 1})]
    assert cut_tool_envelope('{"tool_calls":[{"name":"a","argu', "length")[:2] == ("", None)
    assert cut_tool_envelope('{"content":"Hel', "length") == ("Hel", None, None)
    assert cut_tool_envelope('{"tool_ca', "cancelled")[0] == ""
    closed = cut_tool_envelope('{"tool_calls":[{"name":"a","arguments":{}}]', "length")
    assert closed[1] is not None and closed[2] is None  # only the final brace was missing


def test_socket_never_returns_half_an_envelope(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml="[runtime]\ncontext_length = 1024\n")
    d.wait_ready()
    with d.client() as client:
        resp = client.post("/v1/chat/completions", json=CUT)
        assert resp.status_code == 200, resp.text
        _assert_cut(resp.json()["choices"][0])

        with client.stream("POST", "/v1/chat/completions", json={**CUT, "stream": True}) as s:
            chunks = _sse(s)
        for chunk in chunks:
            _no_envelope(chunk["choices"][0]["delta"].get("content"))
        last = chunks[-1]["choices"][0]
        assert last["finish_reason"] == "length"
        assert "max_tokens" in last["explanation"]

        # tool_choice auto: the model may answer in text; cut, it is text, not our JSON.
        auto = client.post("/v1/chat/completions", json={**CUT, "tool_choice": "auto"})
        assert auto.status_code == 200, auto.text
        assert auto.json()["choices"][0]["finish_reason"] == "length"
        _no_envelope(auto.json()["choices"][0]["message"]["content"])


def test_mqtt_never_returns_half_an_envelope(start_daemon: Any, broker: Broker) -> None:
    d: DaemonProc = start_daemon(extra_toml=(f'[mqtt]\nurl = "{broker.url}"\n'
                                             "[runtime]\ncontext_length = 1024\n"))
    d.wait_ready()
    with requester(broker) as r:
        for stream in (False, True):  # tool calls are never streamed token by token
            r.request(f"edgeagent/{d.device_id}/request", {**CUT, "stream": stream})
            _assert_cut(r.get()[1]["choices"][0])
