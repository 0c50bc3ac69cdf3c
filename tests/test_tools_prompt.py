"""The prompt and envelope a tool call is asked in: the tools as signatures, the request's
words in a system turn after the user's (so that a small model copies an id rather than
inventing one), the envelope written with ``json.dumps``'s separators. The parts over plain
data and the real default model's template; the copy itself through the daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from edgeagent import protocol
from edgeagent.engine import Engine, Plain
from edgeagent.planner import ModelMeta, plan
from edgeagent.probe import probe
from edgeagent.protocol import (
    ChatCompletionRequest,
    Tool,
    names_offered,
    prepare_chat,
    request_words,
)
from edgeagent.settings import LimitsSettings, RuntimeSettings, Settings
from edgeagent.testing.fake_engine import FakeEngine
from tests.conftest import DaemonProc


def tool(name: str, description: str | None, properties: dict[str, Any],
         required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, **({"description": description} if description else {}),
        "parameters": {"type": "object", "properties": properties,
                       "required": list(properties) if required is None else required}}}


SENSOR = tool("read_sensor", "Read the current value of a sensor on the gateway.",
              {"sensor_id": {"type": "string", "description": "The sensor's id, e.g. boiler_temp"}})
STATUS = tool("get_device_status", "Tell whether a device is online, its firmware and its "
              "uptime.", {"device_id": {"type": "string"}})
RELAY = tool("set_actuator", "Switch a device on or off.",
             {"device_id": {"type": "string"}, "state": {"type": "string", "enum": ["on", "off"]}})
VALVE = tool("set_valve", None, {"valve_id": {"type": "string"},
                                 "percent": {"type": "integer", "minimum": 0, "maximum": 100}})
LIMITS = tool("set_threshold", "Alarm limits.", {
    "sensor_id": {"type": "string"}, "min": {"type": "number"}, "max": {"type": "number"},
    "window": {"type": "object", "properties": {"minutes": {"type": "integer"}},
               "description": "Over how long."}}, required=["sensor_id"])


def _chat(messages: list[dict[str, Any]], tools: list[dict[str, Any]], **kw: Any
          ) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": messages, "tools": tools, **kw})


# ------------------------------------------------------------------ the tools note
def test_the_tools_are_listed_as_signatures() -> None:
    tools = [Tool.model_validate(t) for t in (SENSOR, RELAY, VALVE, LIMITS)]
    note = protocol._tools_system_prompt(tools, may_answer=True).splitlines()
    assert note == [
        "You can call these functions:",
        "read_sensor(sensor_id: string) - Read the current value of a sensor on the gateway.",
        "    sensor_id: The sensor's id, e.g. boiler_temp",
        'set_actuator(device_id: string, state: "on"|"off") - Switch a device on or off.',
        "set_valve(valve_id: string, percent: integer 0..100)",
        # optional parameters end in ?, a structured one is its JSON schema
        'set_threshold(sensor_id: string, min?: number, max?: number, window?: {"type": '
        '"object", "properties": {"minutes": {"type": "integer"}}}) - Alarm limits.',
        "    window: Over how long.",
        'To call one, answer with JSON: {"tool_calls": [{"name": ..., "arguments": {...}}]}.',
        'To answer without a call, answer with JSON: {"content": "..."}.',
    ]
    assert "content" not in protocol._tools_system_prompt(tools, may_answer=False)


def test_a_parameter_without_a_type_is_shown_as_its_schema() -> None:
    assert protocol._param_type({"anyOf": [{"type": "string"}, {"type": "integer"}]}) == (
        '{"anyOf": [{"type": "string"}, {"type": "integer"}]}')
    assert protocol._param_type({"type": ["string", "null"]}) == "string|null"
    assert protocol._param_type({"const": "celsius"}) == '"celsius"'
    assert protocol._param_type(True) == "any"


# ------------------------------------------------------------------ the request's words
def test_request_words() -> None:
    assert request_words("Check the CO2 level from sensor co2_office.") == [
        "Check", "CO2", "level", "sensor", "co2_office"]
    # numbers as numbers (a JSON number cannot start with 0: 007 stays a word), each word
    # once, quotes and brackets dropped, a time kept whole
    assert request_words('Set valve_main to 60 percent, then "valve_main" to 20.5 at 07:00; '
                         "id 007, offset -3.") == [
        "Set", "valve_main", 60, "percent", "then", 20.5, "07:00", "id", "007", "offset", -3]
    assert request_words("Tell me a joke!") == ["Tell", "joke"]
    assert request_words("the a an") == []
    many = " ".join(f"w{i}" for i in range(200))
    assert len(request_words(many)) == protocol.REQUEST_WORDS


def test_the_words_follow_the_users_turn_as_client_text() -> None:
    engine = FakeEngine()
    req = _chat([{"role": "user", "content": "Read sensor tank_level_2."}], [SENSOR])
    prepare_chat(req, cast(Engine, engine), Settings(), "m")
    roles = [m["role"] for m in engine.messages]
    assert roles == ["system", "user", "system"]
    label, words = engine.messages[-1]["content"]
    assert (label, words) == ("The request's words: ", '["Read", "sensor", "tank_level_2"]')
    assert isinstance(words, Plain) and not isinstance(label, Plain)


def test_no_words_without_a_users_turn_to_copy_from() -> None:
    """After a tool result the model answers from it: no words turn; nor for a request
    without tools."""
    engine = FakeEngine()
    prepare_chat(_chat([
        {"role": "user", "content": "Read sensor tank_level_2."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "read_sensor", "arguments": '{"sensor_id": "x"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "41 %"}], [SENSOR]),
        cast(Engine, engine), Settings(), "m")
    assert [m["role"] for m in engine.messages] == ["system", "user", "assistant", "tool"]
    prepare_chat(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "Read sensor tank_level_2."}]}),
        cast(Engine, engine), Settings(), "m")
    assert [m["role"] for m in engine.messages] == ["user"]


def test_a_template_that_wants_alternating_roles_gets_no_words_turn() -> None:
    engine = _Alternating()
    p = prepare_chat(_chat([{"role": "user", "content": "Read sensor tank_level_2."}],
                           [SENSOR]), cast(Engine, engine), Settings(), "m")
    assert [m["role"] for m in engine.messages] == ["system", "user"]
    assert "tank_level_2" in engine.read(p.prompt_tokens)
    # a refusal of the client's own messages is the client's: a 400, nothing dropped
    for req in (ChatCompletionRequest.model_validate({"messages": [
                    {"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}),
                _chat([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                      [SENSOR])):
        with pytest.raises(protocol.InvalidRequest, match="chat template rejected"):
            prepare_chat(req, cast(Engine, engine), Settings(), "m")


def test_the_envelope_has_json_dumps_separators() -> None:
    engine = FakeEngine()
    p = prepare_chat(_chat([{"role": "user", "content": "Read sensor x."}], [SENSOR]),
                     cast(Engine, engine), Settings(), "m")
    assert p.guidance is not None
    assert json.loads(p.guidance[1])["x-guidance"] == {
        "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    # response_format stays compact (not measured otherwise)
    p = prepare_chat(ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "JSON please"}],
        "response_format": {"type": "json_object"}}), cast(Engine, engine), Settings(), "m")
    assert p.guidance is not None
    assert json.loads(p.guidance[1])["x-guidance"] == {"whitespace_flexible": False}
    # the closer's tail is written as the envelope is
    assert protocol.close_tool_list(
        '{"tool_calls": [{"name": "f", "arguments": {"a": 1}}, '
        '{"name": "f", "arguments": {"a": 1}},', 30, 50) == (
        '{"name": "f", "arguments": {"a": 1}}]}')


# ------------------------------------------------------------------ the relevance gate
def test_a_request_names_what_the_tools_know_of() -> None:
    tools = [Tool.model_validate(t) for t in (SENSOR, RELAY, VALVE, LIMITS)]
    # a word of a name, a description, a parameter's name or description, an enum value;
    # one word the start of the other
    for text in ("Switch the heater off.", "Read the humidity sensors!",
                 "How long is the window?", "open valve 3", "Set the thresholds.",
                 "give me the boiler temperature"):  # boiler: a parameter's description
        assert names_offered(text, tools), text
    # an identifier names a thing of the gateway, whatever the tools say
    for text in ("What does pump_1 say?", "Check CO2.", "Is 2nd floor ok?"):
        assert names_offered(text, []), text
    # generic words, short words, numbers, a schema's own keywords are not a match
    for text in ("Tell me a joke.", "What is 7 plus 8?", "Give me a string or an object.",
                 "Say hello to them.", "the a an on of"):
        assert not names_offered(text, tools), text


def _prepared(messages: list[dict[str, Any]], settings: Settings | None = None, **kw: Any
              ) -> tuple[protocol.Prepared, FakeEngine]:
    engine = FakeEngine()
    return prepare_chat(_chat(messages, [SENSOR, RELAY], **kw), cast(Engine, engine),
                        settings or Settings(), "m"), engine


def test_a_request_the_tools_know_nothing_of_is_answered_in_text() -> None:
    joke = [{"role": "user", "content": "Tell me a joke about engineers."}]
    p, engine = _prepared(joke)
    assert (p.tool_mode, p.guidance) == (False, None)
    assert [m["role"] for m in engine.messages] == ["user"]  # no tools note, no words
    # the gate is for auto only: a call that is required is made
    for choice in ("required", {"type": "function", "function": {"name": "read_sensor"}}):
        assert _prepared(joke, tool_choice=choice)[0].tool_mode
    # after a tool result the model answers from it, calls on as it chooses
    assert _prepared([*joke, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "read_sensor",
                                                      "arguments": '{"sensor_id": "x"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}])[0].tool_mode
    # a reply to the assistant's question is about what the question names
    assert _prepared([{"role": "user", "content": "Hi."},
                      {"role": "assistant", "content": "Shall I switch relay_4 on?"},
                      {"role": "user", "content": "Yes please."}])[0].tool_mode
    assert not _prepared([{"role": "user", "content": "Hi."},
                          {"role": "assistant", "content": "Hello! How can I help?"},
                          {"role": "user", "content": "Yes please."}])[0].tool_mode
    # and it can be turned off
    off = Settings.model_validate({"limits": {"tool_relevance_gate": False}})
    assert _prepared(joke, off)[0].tool_mode
    assert _prepared([{"role": "user", "content": "Read sensor tank_level_2."}])[0].tool_mode


class _Alternating(FakeEngine):
    """A template that refuses a system turn after the first message, as templates that
    want user and assistant turns to alternate do."""

    def chat_tokens(self, messages: Any, tools: Any = None) -> Any:
        if any(m["role"] == "system" for m in list(messages)[1:]):
            raise ValueError("Conversation roles must alternate user/assistant/user/...")
        return super().chat_tokens(messages)


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def engine(default_model: Path) -> Engine:
    the_plan = plan(probe(), ModelMeta.from_folder(default_model),
                    RuntimeSettings(context_length=1024), LimitsSettings())
    return Engine(default_model, the_plan)


def test_the_words_turn_in_the_models_template(engine: Engine) -> None:
    """A system turn after the user's, the words as text: a control token the client
    wrote stays text there as in its own turn."""
    text = "Read sensor tank_level_2<|im_end|>."
    p = prepare_chat(_chat([{"role": "user", "content": text}], [SENSOR]), engine,
                     Settings(), "m")
    prompt = engine.tokenizer.decode(p.prompt_tokens)  # control tokens left out
    assert prompt.endswith('.\nsystem\nThe request\'s words: ["Read", "sensor", '
                           '"tank_level_2<|im_end|>"]\nassistant\n')
    im_end = int(engine.encode("<|im_end|>")[0])
    # the template's own: system, user, words turn; none from the client's text
    assert list(p.prompt_tokens).count(im_end) == 3


# ------------------------------------------------------------------ through the daemon
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("content", "tools", "call"), [
    # cases of scripts/eval_cases (single-008, single-054): right on the INT4 and INT8
    # builds with this prompt, an invented id with the one before
    ("Read the soil moisture sensor soil_moisture_b.", [SENSOR],
     ("read_sensor", {"sensor_id": "soil_moisture_b"})),
    ("What firmware does camera_gate run?", [STATUS],
     ("get_device_status", {"device_id": "camera_gate"})),
])
def test_the_call_copies_the_id_from_the_request(api_daemon: DaemonProc, content: str,
                                                 tools: list[dict[str, Any]],
                                                 call: tuple[str, dict[str, Any]]) -> None:
    """The issue's failure: the model wrote ``"sensor_id": "1234567890…"``. With the
    request's words after it, it copies the id (greedy, the default model)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(api_daemon.socket_path)),
                      base_url="http://localhost", timeout=120) as c:
        r = c.post("/v1/chat/completions", json={
            "model": "edgeagent", "messages": [{"role": "user", "content": content}],
            "tools": tools, "max_tokens": 96, "temperature": 0})
    r.raise_for_status()
    message = r.json()["choices"][0]["message"]
    first = message["tool_calls"][0]["function"]
    assert (first["name"], json.loads(first["arguments"])) == call


@pytest.mark.timeout(300)
def test_no_call_when_no_tool_fits(api_daemon: DaemonProc) -> None:
    """The eval's no-tool-fits case: answered in text, finish_reason stop, with the tools
    offered and tool_choice auto (the model alone called read_sensor with an invented
    id)."""
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(api_daemon.socket_path)),
                      base_url="http://localhost", timeout=120) as c:
        r = c.post("/v1/chat/completions", json={
            "model": "edgeagent", "max_tokens": 32, "temperature": 0, "tools": [SENSOR, RELAY],
            "messages": [{"role": "user", "content": "Write a short poem about the sea."}]})
    r.raise_for_status()
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert not choice["message"].get("tool_calls")
    assert choice["message"]["content"].strip()
