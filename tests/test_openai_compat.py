"""OpenAI request compatibility (issue 12, items 1-3): every field of the SDK's request
schemas is accepted; a value the daemon cannot honour is a 400 "unsupported" naming it; the
completions prompt shapes, seed and models.retrieve as the official `openai` client uses
them, against the daemon as a subprocess over its real socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast, get_type_hints

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import ValidationError

from edgeagent import protocol
from edgeagent.docs import openai_compat
from edgeagent.engine import Engine
from edgeagent.settings import Settings
from edgeagent.testing.fake_engine import FakeEngine
from tests.conftest import DaemonProc

USER = [{"role": "user", "content": "Count: 1, 2, 3,"}]
#: Our extensions: not in OpenAI's schemas, documented as such.
EXTENSIONS = {"min_tokens", "top_k", "repetition_penalty"}


@pytest.fixture
def http(api_daemon: DaemonProc) -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(api_daemon.socket_path)),
                      base_url="http://localhost", timeout=120) as client:
        yield client


@pytest.fixture
def oai(http: httpx.Client) -> openai.OpenAI:
    # No retries: a refusal must surface as it is, not after the SDK's back-off.
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http,
                         max_retries=0)


# ------------------------------------------------------------------ the schema, in process
def _sdk_fields(params: Any) -> set[str]:
    return set(get_type_hints(params))


@pytest.mark.parametrize("ours, sdk", [
    (protocol.ChatCompletionRequest, chat_create_params.CompletionCreateParamsStreaming),
    (protocol.CompletionRequest, completion_create_params.CompletionCreateParamsStreaming),
])
def test_every_sdk_request_field_is_declared(ours: type[protocol.SamplingFields], sdk: Any
                                            ) -> None:
    """The installed SDK is what users send: each of its fields is a field of ours with a
    support note, and ours are the SDK's plus the documented extensions."""
    assert set(ours.model_fields) - EXTENSIONS == _sdk_fields(sdk)
    for name, info in ours.model_fields.items():
        assert protocol.support_of(info).get(protocol.SUPPORT) in (
            "supported", "ignored", "refused"), name


def test_compat_page_is_generated_from_the_models() -> None:
    page = Path(__file__).parent.parent / "docs" / "openai-compat.md"
    assert page.read_text() == openai_compat(), (
        "docs/openai-compat.md is stale: run `python -m edgeagent.docs openai-compat > "
        "docs/openai-compat.md`")


def test_tool_result_reaches_the_template_with_its_name_and_call_id() -> None:
    """Multi-turn tool use: the template gets the tool message's ``name`` and
    ``tool_call_id`` (to render the result against its call); unknown message fields are
    ignored, as OpenAI ignores them."""
    req = protocol.ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather in Oslo?", "client_ts": 17},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather", "content": "-3 C"},
    ]})
    engine = FakeEngine()
    protocol.prepare_chat(req, cast(Engine, engine), Settings(), "m")
    tool = engine.messages[-1]
    assert (tool["role"], tool["name"], tool["tool_call_id"]) == ("tool", "weather", "call_1")
    assert "client_ts" not in engine.messages[0]


def _errors(body: dict[str, Any]) -> tuple[int, str, str | None]:
    """How many errors a chat body gives, and the 400's message and param."""
    with pytest.raises(ValidationError) as info:
        protocol.ChatCompletionRequest.model_validate({"messages": USER, **body})
    return (len(info.value.errors()), *protocol.validation_message(info.value.errors()))


def test_a_bad_tool_is_one_error_named_by_its_json_path() -> None:
    """tools and tool_choice are unions tagged by ``type``: an error inside a tool is that
    kind's alone, and its param is the request's path, without the union member's name."""
    count, message, param = _errors({"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "hiccup"}}}]})
    assert (count, param) == (1, "tools.0.function.parameters"), message
    assert message.startswith("tools.0.function.parameters: ") and "hiccup" in message
    assert _errors({"tools": [{"type": "function", "function": {"name": "f"}, "x": 1}]}
                   )[2] == "tools.0.x"
    assert _errors({"tool_choice": {"type": "function", "function": {}}}
                   )[::2] == (1, "tool_choice.function.name")
    assert _errors({"tool_choice": "sometimes"})[::2] == (1, "tool_choice")


@pytest.mark.parametrize("body, param, says", [
    ({"tools": [{"function": {"name": "f"}}]}, "tools.0", "'function' or 'custom'"),
    ({"tools": [{"type": "web", "function": {"name": "f"}}]}, "tools.0", "'custom'"),
    ({"tools": ["f"]}, "tools.0", "'function' or 'custom'"),
    ({"tool_choice": {"function": {"name": "f"}}}, "tool_choice", "'allowed_tools'"),
    ({"tool_choice": {"type": "web"}}, "tool_choice", "'none', 'auto', 'required'"),
])
def test_a_missing_or_unknown_type_is_one_error_naming_the_types(
        body: dict[str, Any], param: str, says: str) -> None:
    count, message, got = _errors(body)
    assert (count, got) == (1, param), message
    assert says in message


# ------------------------------------------------------------------ the daemon (conftest
# marks these `model`: they use api_daemon)
def test_neutral_and_informational_fields_are_accepted(oai: openai.OpenAI) -> None:
    """What SDKs and frameworks send by default (issue 12, item 1)."""
    resp = oai.chat.completions.create(
        model="edgeagent", messages=USER, max_tokens=4, temperature=0,
        logprobs=False, frequency_penalty=0, presence_penalty=0, n=1,
        store=False, metadata={"app": "test"}, user="u-1", safety_identifier="h",
        prompt_cache_key="k", parallel_tool_calls=False, service_tier="auto",
        modalities=["text"], reasoning_effort="low", verbosity="low", seed=-1,
        prediction={"type": "content", "content": "4, 5"},
        stream_options=None, logit_bias={}, tool_choice="none")
    assert resp.choices[0].message.content
    text = oai.completions.create(model="edgeagent", prompt="1, 2, 3,", max_tokens=4,
                                  temperature=0, frequency_penalty=0, presence_penalty=0,
                                  best_of=1, echo=False, suffix=None, user="u-1", n=1)
    assert text.choices[0].text


@pytest.mark.parametrize("param, value", [
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("web_search_options", {}),
    ("service_tier", "priority"),
    ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
    ("moderation", {"model": "omni-moderation-latest"}),
    ("tools", [{"type": "custom", "custom": {"name": "sql", "description": "free-form"}}]),
])
def test_a_chat_value_that_cannot_be_honoured_is_refused_by_name(
        oai: openai.OpenAI, param: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="edgeagent", messages=USER,  # type: ignore[arg-type]
                                    max_tokens=4, extra_body={param: value})
    err = cast(dict[str, Any], info.value.body)
    assert (err["code"], err["param"]) == ("unsupported", param)
    assert err["message"].startswith(f"unsupported: {param}")


def test_allowed_tools_limits_the_calls(oai: openai.OpenAI) -> None:
    """tool_choice allowed_tools (mode required): the call is to one of the allowed tools."""
    def tool(name: str) -> dict[str, Any]:
        return {"type": "function", "function": {
            "name": name, "parameters": {"type": "object", "properties": {}}}}

    resp = oai.chat.completions.create(
        model="edgeagent", max_tokens=60,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=[tool("get_weather"), tool("get_time")],  # type: ignore[list-item]
        tool_choice={"type": "allowed_tools", "allowed_tools": {
            "mode": "required", "tools": [{"type": "function",
                                           "function": {"name": "get_time"}}]}})
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert {c.function.name for c in choice.message.tool_calls or []  # type: ignore[union-attr]
            } == {"get_time"}


def test_a_completions_value_that_cannot_be_honoured_is_refused_by_name(
        oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="edgeagent", prompt="def f(", suffix="\n    return x",
                               max_tokens=4)
    err = cast(dict[str, Any], info.value.body)
    assert (err["code"], err["param"]) == ("unsupported", "suffix")


def test_a_non_text_content_part_is_refused_by_name(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == ("unsupported", "messages.0.content.1")


@pytest.mark.parametrize("body, param", [
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
])
def test_inconsistent_chat_requests_are_refused(http: httpx.Client, body: dict[str, Any],
                                                param: str) -> None:
    """As OpenAI and vLLM: stream_options needs stream, tool_choice required or named needs
    tools, seed is an int64."""
    resp = http.post("/v1/chat/completions",
                     json={"messages": USER, "max_tokens": 2, **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_seed_reproduces_and_minus_one_is_random(oai: openai.OpenAI) -> None:
    def run(seed: int) -> str:
        resp = oai.chat.completions.create(
            model="edgeagent", messages=[{"role": "user", "content": "Tell a story."}],
            max_tokens=12, temperature=1.5, seed=seed)
        return resp.choices[0].message.content or ""

    top = 2**63 - 1
    assert run(top) == run(top)
    assert len({run(-1) for _ in range(3)}) > 1


def test_completions_prompt_shapes_give_the_same_answer(oai: openai.OpenAI,
                                                        http: httpx.Client) -> None:
    """A string, a list of one string, token ids and a list of one token-id list are the
    same prompt; echo gives back its text for each."""
    prompt = "The days of the week are Monday, Tuesday,"
    echoed = oai.completions.create(model="edgeagent", prompt=prompt, max_tokens=6,
                                    temperature=0, echo=True).choices[0].text
    assert echoed.startswith(prompt)
    ids = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
    n_prompt = ids["usage"]["prompt_tokens"]
    tokens = _tokens(http, prompt)
    assert len(tokens) == n_prompt
    for shape in ([prompt], tokens, [tokens]):
        got = oai.completions.create(model="edgeagent", prompt=shape,
                                     max_tokens=6, temperature=0, echo=True)
        assert got.choices[0].text == echoed, shape


def test_completions_several_prompts_answer_each_in_order(oai: openai.OpenAI,
                                                         http: httpx.Client) -> None:
    """A list of prompts (strings or token-id lists) with n: choice i answers prompt
    i // n, each as it would alone; usage counts every prompt; a stream carries each
    choice's index."""
    prompts = ["The days of the week are Monday,", "1, 2, 3,"]
    alone = [oai.completions.create(model="edgeagent", prompt=p, max_tokens=5, temperature=0,
                                    echo=True).choices[0].text for p in prompts]
    both = oai.completions.create(model="edgeagent", prompt=prompts, max_tokens=5,
                                  temperature=0, echo=True, n=2)
    assert [(c.index, c.text) for c in both.choices] == [
        (0, alone[0]), (1, alone[0]), (2, alone[1]), (3, alone[1])]
    ids = [_tokens(http, p) for p in prompts]
    assert both.usage is not None and both.usage.prompt_tokens == sum(map(len, ids))
    by_ids = oai.completions.create(model="edgeagent", prompt=ids, max_tokens=5,
                                    temperature=0, echo=True)
    assert [c.text for c in by_ids.choices] == alone

    streamed = ["", ""]
    for chunk in oai.completions.create(model="edgeagent", prompt=prompts, max_tokens=5,
                                        temperature=0, echo=True, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == alone


def _tokens(http: httpx.Client, prompt: str) -> list[int]:
    """The prompt's token ids by the daemon's own tokenizer (onnxruntime-genai's, over the
    model folder /health names)."""
    import onnxruntime_genai as og

    health = http.get("/health").json()
    tokenizer = og.Tokenizer(og.Model(health["model"]["path"]))
    return [int(t) for t in tokenizer.encode(prompt)]


def test_completions_prompt_token_outside_the_vocabulary_is_refused(
        http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json={"prompt": [1, 2, 10**9], "max_tokens": 2})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "prompt" and "outside the vocabulary" in err["message"]


def test_completions_stream_chunks_are_text_completions(http: httpx.Client) -> None:
    """Every chunk of a /v1/completions stream, the usage one included, is a
    text_completion (it said chat.completion.chunk)."""
    with http.stream("POST", "/v1/completions", json={
            "prompt": "1, 2, 3,", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}) as resp:
        docs = [json.loads(line[6:]) for line in resp.iter_lines()
                if line.startswith("data: {")]
    assert docs[-1]["usage"]["completion_tokens"] >= 1
    assert {d["object"] for d in docs} == {"text_completion"}


def test_models_retrieve(oai: openai.OpenAI) -> None:
    model = oai.models.retrieve("edgeagent:coding")
    assert (model.id, model.object, model.owned_by) == ("edgeagent:coding", "model",
                                                         "edgeagent")
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-5")
    assert cast(dict[str, Any], info.value.body)["code"] == "model_not_found"
