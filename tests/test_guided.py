"""Guided JSON a small model gets right: no call returned twice, values that cannot run
away, an envelope closed before max_tokens. The schema and envelope helpers over plain
data; the rest on the real default model, the daemon as a subprocess, over its socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import pytest

from edgeagent.engine import Delta, Engine, Finish, GuidanceError, Sampling
from edgeagent.planner import ModelMeta, plan
from edgeagent.probe import probe
from edgeagent.protocol import (
    bounded,
    close_tool_list,
    fitted,
    longest_answer,
    parse_tool_envelope,
)
from edgeagent.settings import LimitsSettings, RuntimeSettings
from tests.conftest import DaemonProc

CAPS = LimitsSettings()


def tool(name: str, description: str, properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties,
                       "required": list(properties)}}}


WEATHER = tool("get_weather", "Weather for a city", {"city": {"type": "string"}})
VALVE = tool("set_valve", "Open a valve to a percentage",
             {"valve_id": {"type": "integer"}, "percent": {"type": "number"}})
DEVICE = tool("register_device", "Register a device by its MAC address and serial",
              {"mac": {"type": "string"}, "serial": {"type": "string"}})
#: The model calls get_weather four times over for this one (before the fix).
PARIS = {"messages": [{"role": "user", "content": "What's the weather in Paris?"}],
         "tools": [WEATHER],
         "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}


# ------------------------------------------------------------------ the helpers
def test_bounded_caps_what_the_schema_leaves_open() -> None:
    schema = {"type": "object", "properties": {
        "s": {"type": "string"}, "n": {"type": "number"}, "i": {"type": "integer"},
        "a": {"type": "array", "items": {"type": "string"}},
        "o": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    out = bounded(schema, CAPS)["properties"]
    assert out["s"]["maxLength"] == CAPS.guided_string_max_length
    largest = 10 ** CAPS.guided_number_digits - 1
    assert (out["n"]["minimum"], out["n"]["maximum"]) == (-largest, largest)
    assert out["n"]["multipleOf"] == 10.0 ** -CAPS.guided_number_decimals
    assert "multipleOf" not in out["i"] and out["i"]["maximum"] == largest
    assert out["a"]["maxItems"] == CAPS.guided_array_max_items
    assert out["a"]["items"]["maxLength"] == CAPS.guided_string_max_length
    assert out["o"]["anyOf"][0]["maxLength"] == CAPS.guided_string_max_length


def test_bounded_caps_the_keys_of_a_map_and_answers_an_object_with_its_own(
        default_model: Path) -> None:
    """json_object: the model wrote one key ("2022-01-01T12:30:00.0000…") until max_tokens.
    A map's keys get the strings' cap; an object with properties is answered with those."""
    tokenizer = llguidance.LLTokenizer(
        (default_model / "tokenizer.json").read_text(), eos_token=[2])

    def accepts(schema: dict[str, Any], text: str) -> bool:
        grammar = llguidance.grammar_from("json_schema", json.dumps(bounded(schema, CAPS)))
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        tokens = tokenizer.tokenize_str(text)
        return bool(matcher.validate_tokens(tokens) == len(tokens))

    cap = CAPS.guided_string_max_length
    assert accepts({"type": "object"}, json.dumps({"k" * cap: 1}, separators=(",", ":")))
    assert not accepts({"type": "object"}, '{"' + "k" * (cap + 1))
    assert not accepts({"type": "object", "additionalProperties": {"type": "integer"}},
                       '{"' + "k" * (cap + 1))
    device = {"type": "object", "properties": {"mac": {"type": "string"}}}
    assert accepts(device, '{"mac":"aa"}')
    assert not accepts(device, '{"mac":"aa","x"')


def test_bounded_keeps_the_clients_own_bounds() -> None:
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 9000}, "p": {"type": "string", "pattern": "^a+$"},
        "e": {"type": "string", "enum": ["x", "y"]}, "d": {"type": "string", "format": "date"},
        "n": {"type": "number", "minimum": 0, "multipleOf": 0.5},
        "a": {"type": "array", "items": {"type": "integer"}, "minItems": 40}}}
    out = bounded(schema, CAPS)["properties"]
    assert out["s"] == {"type": "string", "maxLength": 9000}
    assert "maxLength" not in out["p"] and "maxLength" not in out["e"]
    assert "maxLength" not in out["d"]
    assert out["n"]["minimum"] == 0 and out["n"]["multipleOf"] == 0.5
    assert out["a"]["maxItems"] == 40  # never below the client's minItems


def test_caps_shrink_until_the_longest_answer_fits_max_tokens() -> None:
    """The issue's nested schema (objects open to more properties): at the default caps
    its longest answer is thousands of tokens; fitted to 512 it closes within them."""
    schema = {"type": "object", "properties": {"device": {"type": "object", "properties": {
        "mac": {"type": "string"}, "serial": {"type": "string"},
        "readings": {"type": "array", "items": {"type": "number"}}}}}}
    assert longest_answer(bounded(schema, CAPS)) > 512
    assert longest_answer(fitted(schema, CAPS, 512)) <= 512
    small = {"type": "object", "properties": {"on": {"type": "boolean"}},
             "additionalProperties": False}
    assert fitted(small, CAPS, 16) == bounded(small, CAPS)


def _call(city: str) -> str:
    return json.dumps({"name": "get_weather", "arguments": {"city": city}},
                      separators=(",", ":"))


def test_the_list_ends_when_a_call_repeats() -> None:
    head = '{"tool_calls":['
    # A second call that repeats the first: the list ends, with or without its comma.
    for after in ("", ","):
        text = head + _call("Paris") + "," + _call("Paris") + after
        tail = close_tool_list(text, 30, 400)
        assert tail is not None
        _, calls = parse_tool_envelope(text + tail)
        assert [c["function"]["arguments"] for c in calls or []] == ['{"city": "Paris"}']
    # Distinct calls, plenty of tokens left, or a call still being written: go on.
    assert close_tool_list(head + _call("Paris") + "," + _call("Rome") + ",", 30, 400) is None
    assert close_tool_list(head + _call("Paris") + ',{"name":"get', 20, 400) is None
    assert close_tool_list(head + _call("Paris") + "]}", 15, 400) is None
    assert close_tool_list('{"content":"Paris"}', 5, 400) is None


def test_the_list_ends_when_one_more_call_would_not_fit() -> None:
    text = '{"tool_calls":[' + _call("Paris") + ","
    assert close_tool_list(text, 20, 40) is None  # room for another call of ~20 tokens
    tail = close_tool_list(text, 20, 10)
    assert tail is not None
    assert len(parse_tool_envelope(text + tail)[1] or []) == 1


def test_identical_calls_are_parsed_once_in_order() -> None:
    written = [_call("Paris"), _call("Rome"), _call("Paris"),
               '{"arguments":{"city":"Rome"},"name":"get_weather"}']  # keys in another order
    _, calls = parse_tool_envelope('{"tool_calls":[' + ",".join(written) + "]}")
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls or []] == [
        "Paris", "Rome"]


# ------------------------------------------------------------------ the real model
def _chat(d: DaemonProc, body: dict[str, Any]) -> dict[str, Any]:
    with d.client() as client:
        resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def _calls(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    message = doc["choices"][0]["message"]
    return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in message.get("tool_calls") or []]


@pytest.mark.timeout(300)
def test_a_named_function_is_called_once_and_the_loop_ends(api_daemon: DaemonProc) -> None:
    one = _chat(api_daemon, {**PARIS, "parallel_tool_calls": False})
    assert one["choices"][0]["finish_reason"] == "tool_calls"
    assert _calls(one) == [("get_weather", {"city": "Paris"})]
    single = one["usage"]["completion_tokens"]

    doc = _chat(api_daemon, {**PARIS, "max_tokens": 256})
    assert doc["choices"][0]["finish_reason"] == "tool_calls"
    assert _calls(doc) == [("get_weather", {"city": "Paris"})]
    # The list ended when the repeat was written, not at maxItems (four calls).
    assert doc["usage"]["completion_tokens"] <= 2 * single + 2


@pytest.mark.timeout(300)
def test_the_list_closes_before_max_tokens(api_daemon: DaemonProc) -> None:
    """Room for one call and a few tokens: the model goes on to a second call, which
    max_tokens would cut; the list ends after the first instead."""
    single = _chat(api_daemon, {**PARIS, "parallel_tool_calls": False})
    room = single["usage"]["completion_tokens"] + 3
    doc = _chat(api_daemon, {**PARIS, "max_tokens": room})
    assert doc["choices"][0]["finish_reason"] == "tool_calls", doc
    assert _calls(doc) == [("get_weather", {"city": "Paris"})]
    assert doc["usage"]["completion_tokens"] <= room


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("prompt", "tools"), [
    ("Set valve 7 to a very large number", [VALVE]),
    ("Register device aa:bb:cc:dd:ee:ff with serial SN-0042", [DEVICE]),
])
def test_runaway_values_end_with_a_call(api_daemon: DaemonProc, prompt: str,
                                        tools: list[dict[str, Any]]) -> None:
    """Prompts on which the model wrote digits until max_tokens: the values are capped,
    the call ends and comes back whole, within max_tokens."""
    doc = _chat(api_daemon, {"messages": [{"role": "user", "content": prompt}],
                             "tools": tools, "tool_choice": "required", "max_tokens": 256})
    assert doc["choices"][0]["finish_reason"] == "tool_calls", doc
    assert doc["usage"]["completion_tokens"] <= 256
    for _, arguments in _calls(doc):
        for value in arguments.values():
            if isinstance(value, str):
                assert len(value) <= CAPS.guided_string_max_length
            else:
                assert abs(value) < 10 ** CAPS.guided_number_digits


@pytest.mark.timeout(300)
def test_response_format_values_cannot_run_away(api_daemon: DaemonProc) -> None:
    schema = {"type": "object", "properties": {
        "device": {"type": "object", "properties": {
            "mac": {"type": "string"}, "serial": {"type": "string"},
            "readings": {"type": "array", "items": {"type": "number"}}},
            "required": ["mac", "serial", "readings"]}},
        "required": ["device"]}
    for response_format in ({"type": "json_schema",
                             "json_schema": {"name": "device", "schema": schema}},
                            {"type": "json_object"}):
        doc = _chat(api_daemon, {
            "messages": [{"role": "user", "content": "Register device aa:bb:cc:dd:ee:ff with "
                          "serial SN-0042 and its readings. Answer in JSON."}],
            "response_format": response_format, "max_tokens": 512})
        choice = doc["choices"][0]
        assert choice["finish_reason"] == "stop", (response_format["type"], choice)
        assert isinstance(json.loads(choice["message"]["content"]), dict)


@pytest.fixture(scope="module")
def engine(default_model: Path) -> Engine:
    the_plan = plan(probe(), ModelMeta.from_folder(default_model),
                    RuntimeSettings(context_length=1024), LimitsSettings())
    return Engine(default_model, the_plan)


def test_a_grammar_is_compiled_once_for_its_admission_and_its_sequences(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """llguidance compiles a grammar once per text: the admission check compiles it, and
    repeated checks (whatever the sampling) and the sequences that run under it take it."""
    built: list[str] = []
    real = llguidance.LLMatcher

    def counting(tokenizer: Any, grammar: str, **kwargs: Any) -> Any:
        built.append(grammar)
        return real(tokenizer, grammar, **kwargs)

    monkeypatch.setattr(llguidance, "LLMatcher", counting)
    guidance = ("json_schema", json.dumps({"type": "object", "properties": {
        "n": {"type": "integer", "maximum": 99}}, "required": ["n"],
        "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}))
    for _ in range(3):
        engine.check_guidance(guidance, Sampling(max_tokens=5))
    engine.check_guidance(guidance, Sampling(max_tokens=50))  # max_tokens is not the grammar's
    engine.check_guidance(guidance, Sampling(temperature=0.7))  # nor is the sampler
    assert len(built) == 1
    prompt = engine.encode(engine.chat_prompt([{"role": "user", "content": "A number?"}]))
    for sampling in (Sampling(max_tokens=12), Sampling(max_tokens=12, temperature=0.9, seed=3)):
        items = list(engine.generate(prompt, sampling, guidance=guidance))
        fin = items[-1]
        assert isinstance(fin, Finish) and fin.reason == "stop", fin
        text = "".join(i.text for i in items if isinstance(i, Delta)) + fin.tail
        assert set(json.loads(text)) == {"n"}
    assert len(built) == 1
    for _ in range(2):  # a refusal is not remembered as an acceptance
        with pytest.raises(GuidanceError):
            engine.check_guidance(("json_schema", '{"type": "hiccup"}'), Sampling())
    assert len(built) == 3


def test_a_seeded_guided_answer_repeats(engine: Engine) -> None:
    """Sampling under a grammar is the engine's own: a seed gives the same answer again."""
    guidance = ("json_schema", json.dumps({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16}}, "required": ["city"],
        "x-guidance": {"whitespace_flexible": False}}))
    prompt = engine.encode(engine.chat_prompt(
        [{"role": "user", "content": "Name a city, as JSON."}]))
    sampling = Sampling(max_tokens=24, temperature=1.0, top_p=0.9, seed=42)
    answers = [[i.token for i in engine.generate(prompt, sampling, guidance=guidance)
                if isinstance(i, Delta)] for _ in range(2)]
    assert answers[0] == answers[1]
