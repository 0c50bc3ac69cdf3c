"""The request schema every transport speaks: OpenAI chat and text completions.

This module turns a validated request into what the scheduler runs (prompt tokens, sampling,
guidance) and turns results back into OpenAI's response shapes. It knows nothing of HTTP or
MQTT; both transports use it, so both accept exactly the same requests and profiles.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pydantic_core
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from edgeagent.engine import (
    Closer,
    Delta,
    Engine,
    Finish,
    Guidance,
    GuidanceError,
    Logprob,
    Plain,
    Sampling,
    TokenLogprob,
)
from edgeagent.scheduler import AdmissionError, Job, JobError, Sink, Unavailable
from edgeagent.settings import LimitsSettings, ProfileSettings, Settings

MODEL_PREFIX = "edgeagent"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Lenient(BaseModel):
    """Inside a message OpenAI ignores fields it does not know; so does the daemon."""

    model_config = ConfigDict(extra="ignore")


class InvalidRequest(AdmissionError):
    status = 400
    code = "invalid_request_error"


class Unsupported(InvalidRequest):
    """A valid OpenAI request asking for something this daemon cannot do."""

    code = "unsupported"


class ModelNotFound(AdmissionError):
    status = 404
    code = "model_not_found"


class ModelLoading(Unavailable):
    code = "model_loading"


# -------------------------------------------------------------- what each field gets
# Every request field says what the daemon does with it: "supported"; "ignored" (accepted,
# no effect, and why); or "refused" (accepted only at the neutral values listed, anything
# else is a 400 "unsupported: <field>"). docs/openai-compat.md is generated from these.
SUPPORT = "x-support"
WHY = "x-why"
NEUTRAL = "x-neutral"


def supported(default: Any = None, why: str = "", **kw: Any) -> Any:
    return Field(default, json_schema_extra={SUPPORT: "supported", WHY: why}, **kw)


def ignored(why: str, default: Any = None, **kw: Any) -> Any:
    return Field(default, json_schema_extra={SUPPORT: "ignored", WHY: why}, **kw)


def refused(why: str, neutral: list[Any], default: Any = None, **kw: Any) -> Any:
    return Field(default, json_schema_extra={SUPPORT: "refused", WHY: why, NEUTRAL: neutral},
                 **kw)


def support_of(info: Any) -> dict[str, Any]:
    """A field's support note (``x-support``, ``x-why``, ``x-neutral``)."""
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def refuse_unsupported(req: BaseModel) -> None:
    """400 "unsupported: <field>" for the first refused field set to a non-neutral value."""
    for name, info in type(req).model_fields.items():
        note = support_of(info)
        if note.get(SUPPORT) != "refused":
            continue
        value = getattr(req, name)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        if value not in note[NEUTRAL]:
            raise Unsupported(f"unsupported: {name}={json.dumps(value)[:80]}: {note[WHY]}",
                              name)


# -------------------------------------------------------------- messages
class ContentPart(Lenient):
    type: Literal["text", "refusal", "image_url", "input_audio", "file"]
    text: str | None = None
    refusal: str | None = None

    def value(self, where: str) -> str:
        if self.type == "text" and self.text is not None:
            return self.text
        if self.type == "refusal" and self.refusal is not None:
            return self.refusal
        if self.type in ("text", "refusal"):
            raise InvalidRequest(f"a {self.type} part needs its {self.type} field", where)
        raise Unsupported(f"unsupported: {where} of type {self.type}: the model reads text "
                          "only", where)


class FunctionCall(Lenient):
    name: str
    arguments: str


class ToolCall(Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self, where: str = "messages") -> str:
        """The text the model sees; an assistant's tool calls as the envelope it answered
        them in (see ``tool_guidance``), so a conversation keeps the calls it made."""
        if self.tool_calls:
            return json.dumps({"tool_calls": [
                {"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                for c in self.tool_calls]})
        if isinstance(self.content, list):
            return "".join(part.value(f"{where}.content.{i}")
                           for i, part in enumerate(self.content))
        return self.content or ""


def _arguments(text: str) -> Any:
    """A call's arguments: the JSON object OpenAI sends as a string (kept as a string when
    it does not parse)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, checked against JSON Schema's own meta-schema (2020-12) before anything
    walks it: a keyword of the wrong type (``"enum": 5``) is a 400 naming where."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "its top level"
        raise ValueError(f"not a valid JSON schema at {where}: {exc.message}") from None
    return schema


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = None

    _parameters = field_validator("parameters")(_json_schema)


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class CustomTool(Strict):
    type: Literal["custom"]
    custom: dict[str, Any]


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class AllowedTools(Strict):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolChoice(Strict):
    """A subset of ``tools`` the model may call (the rest stay in the prompt's history)."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


class CustomToolChoice(Strict):
    type: Literal["custom"]
    custom: NamedFunction


def _type_tag(value: Any) -> str | None:
    """The ``type`` of an object (a JSON object or a model) that picks its member of a
    tagged union; None (a 400 from the union's own message) when it has none."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


def _tool_choice_tag(value: Any) -> str | None:
    """Which member of ``tool_choice`` a value is: a string a mode, an object its type."""
    return "mode" if isinstance(value, str) else _type_tag(value)


#: A tool, by its ``type``: an error inside one names that kind alone (a plain union would
#: report every member), and a missing or unknown ``type`` is one error.
AnyTool = Annotated[
    Annotated[Tool, Tag("function")] | Annotated[CustomTool, Tag("custom")],
    Discriminator(_type_tag, custom_error_type="tool_type",
                  custom_error_message="Input should be a tool whose type is 'function' or "
                  "'custom'")]

#: ``tool_choice``, one member by its tag, as for tools.
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("mode")]
    | Annotated[NamedToolChoice, Tag("function")]
    | Annotated[AllowedToolChoice, Tag("allowed_tools")]
    | Annotated[CustomToolChoice, Tag("custom")],
    Discriminator(_tool_choice_tag, custom_error_type="tool_choice_type",
                  custom_error_message="Input should be 'none', 'auto', 'required' or an "
                  "object whose type is 'function', 'allowed_tools' or 'custom'")]

#: Where a tagged union's member tag sits in an error's loc (pydantic puts it right after
#: the union's own place): a field and the depth of its tag (``tools.0.<tag>``,
#: ``tool_choice.<tag>``). ``validation_message`` leaves it out of the param.
UNION_TAG_DEPTH = {"tools": 2, "tool_choice": 1}


class JsonSchemaFormat(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    _schema = field_validator("schema_")(_json_schema)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        default=None, description="Ignored: a local socket has no side channel to pad.")


INT64 = 2**63
PENALTY = "over the tokens generated, as OpenAI defines it"
NOT_STORED = "nothing is stored or logged per user"
LOGPROBS = ("the model's own distribution at each step (log-softmax of the raw logits: before "
            "penalties, temperature and top_p/top_k), as vLLM's default")


class SamplingFields(Strict):
    """Fields shared by chat and text completions."""

    model: str = supported(MODEL_PREFIX, "`edgeagent`, the model's id, or "
                           "`edgeagent:<profile>`")
    max_tokens: int | None = supported(None, "default: the profile's, else "
                                       "limits.default_max_tokens, within the context left",
                                       ge=1, le=1_000_000)
    min_tokens: int | None = supported(None, "extension (vLLM): no end of sequence before it",
                                       ge=0, le=1_000_000)
    temperature: float | None = supported(None, "0 to 2; 0 (the default) is greedy", ge=0,
                                          le=2)
    top_p: float | None = supported(None, "nucleus sampling", gt=0, le=1)
    top_k: int | None = supported(None, "extension: top-k sampling", ge=0)
    repetition_penalty: float | None = supported(None, "extension (vLLM, HF): multiplicative "
                                                 "penalty on repeated tokens", gt=0, le=10)
    frequency_penalty: float | None = supported(None, PENALTY, ge=-2, le=2)
    presence_penalty: float | None = supported(None, PENALTY, ge=-2, le=2)
    logit_bias: dict[str, int] | None = refused("not implemented", [None, {}])
    stop: str | list[str] | None = supported(None, "up to 4 strings, kept out of the text")
    seed: int | None = supported(None, "int64; the same seed reproduces the output; -1 means "
                                 "random", ge=-INT64, le=INT64 - 1)
    stream: bool = supported(False, "server-sent events ending in `data: [DONE]`")
    stream_options: StreamOptions | None = supported(
        None, "`include_usage`; `include_obfuscation` ignored; only with `stream`")
    n: int | None = supported(None, "n rows of one batch sharing the prompt, each with "
                              "its own draw (with a seed, row i > 0 a seed derived from it, and "
                              "each row runs alone, so that the seed reproduces it); "
                              "at most the batch capacity (`runtime.max_batch`); guided "
                              "choices run one after the other", ge=1, le=128)
    user: str | None = ignored(NOT_STORED)

    @field_validator("stream", "echo", mode="before", check_fields=False)
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value  # OpenAI types them Optional[bool]

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return value

    def token_cap(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = supported(..., "text content (image, audio and file parts are "
                                        "refused); `name` and `tool_call_id` reach the chat "
                                        "template; unknown message fields are ignored",
                                        min_length=1)
    max_completion_tokens: int | None = supported(None, "as max_tokens, and wins over it",
                                                  ge=1, le=1_000_000)
    tools: list[AnyTool] | None = supported(
        None, "function tools, under constrained decoding; custom (free-form) tools are "
        "refused")
    tool_choice: ToolChoice | None = supported(
        None, "`none`, `auto`, `required`, a named function, `allowed_tools`; all but "
        "`none` and `auto` need `tools`")
    parallel_tool_calls: bool | None = supported(
        None, "true (the default): distinct calls, an identical call returned once; false: "
        "one call")
    response_format: ResponseFormat | None = supported(
        None, "`text`, `json_object`, `json_schema` (constrained decoding)")
    logprobs: bool | None = supported(None, LOGPROBS)
    top_logprobs: int | None = supported(None, "needs `logprobs: true`", ge=0, le=20)
    audio: dict[str, Any] | None = refused("the model writes text only", [None])
    modalities: list[Literal["text", "audio"]] | None = refused(
        "the model writes text only", [None, ["text"]])
    functions: list[dict[str, Any]] | None = refused(
        "deprecated by OpenAI: send `tools`", [None, []])
    function_call: Literal["none", "auto"] | NamedFunction | None = refused(
        "deprecated by OpenAI: send `tool_choice`", [None, "none", "auto"])
    web_search_options: dict[str, Any] | None = refused("no web search on a gateway", [None])
    moderation: dict[str, Any] | None = refused("no moderation model on a gateway", [None])
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = (
        refused("one tier: requests are served in order of arrival",
                [None, "auto", "default"]))
    prediction: dict[str, Any] | None = ignored(
        "a speed hint; the output does not depend on it")
    reasoning_effort: str | None = ignored("the model has no separate reasoning to bound")
    verbosity: Literal["low", "medium", "high"] | None = ignored(
        "the model has no verbosity control")
    metadata: dict[str, str] | None = ignored(NOT_STORED)
    store: bool | None = ignored(NOT_STORED)
    safety_identifier: str | None = ignored(NOT_STORED)
    prompt_cache_key: str | None = ignored("no prompt cache across requests")
    prompt_cache_options: dict[str, Any] | None = ignored("no prompt cache across requests")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = ignored(
        "no prompt cache across requests")

    def token_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def function_tools(self) -> list[Tool]:
        """The tools, all function tools: a custom one (free-form input) is refused."""
        out = []
        for i, tool in enumerate(self.tools or []):
            if not isinstance(tool, Tool):
                raise Unsupported(f"unsupported: tools.{i} of type custom: only function "
                                  "tools (JSON arguments) are supported", "tools")
            out.append(tool)
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = supported(
        ..., "a string, strings, token ids, or lists of token ids; with several prompts, "
        "choice i answers prompt i // n and prompts times n is at most the batch capacity")
    echo: bool = supported(False, "the prompt before the completion")
    logprobs: int | None = supported(None, LOGPROBS + "; the legacy shape (tokens, "
                                     "token_logprobs, top_logprobs, text_offset)", ge=0, le=5)
    best_of: int | None = refused("one candidate per choice", [None, 1], ge=1, le=20)
    suffix: str | None = refused("the model has no fill-in-the-middle mode", [None, ""])


@dataclass
class Prepared:
    """A request ready for the scheduler, and what is needed to render its answer."""

    id: str
    model: str
    created: int
    prompt_tokens: Any  # np.ndarray
    sampling: Sampling
    guidance: tuple[str, str] | None
    tool_mode: bool  # the output is our tool envelope, parsed at the end
    include_usage: bool
    deadline: float = float("inf")  # time.monotonic(): limits.request_timeout_s from now
    echo: str = ""  # text completions: the prompt, asked back before the completion
    #: The engine generation that tokenized it: it runs on that engine or is refused.
    generation: int | None = None
    n: int = 1  # choices
    #: A completions request with several prompts: each one's tokens and echo. Choice i
    #: answers prompt i // (n / len(batch)), in OpenAI's order.
    batch: list[tuple[Any, str]] = field(default_factory=list)

    def prompt_of(self, index: int) -> tuple[Any, str]:
        """The prompt tokens and echo of choice ``index``."""
        if not self.batch:
            return self.prompt_tokens, self.echo
        return self.batch[index // (self.n // len(self.batch))]


def to_job(p: Prepared, sink: Sink, transport: str, *, expiry_s: float | None = None,
           unix_deadline: float | None = None) -> Job:
    """The scheduler's job for ``p``. Its deadline is the earliest of the request timeout,
    a message expiry (``expiry_s`` from now) and a client's deadline (Unix time)."""
    now = time.monotonic()
    deadline = p.deadline
    if expiry_s:
        deadline = min(deadline, now + expiry_s)
    if unix_deadline is not None:
        deadline = min(deadline, now + (unix_deadline - time.time()))
    rows = [p.prompt_of(i)[0] for i in range(p.n)] if p.batch else None
    return Job(p.prompt_tokens, p.sampling, sink, deadline, guidance=p.guidance,
               transport=transport, generation=p.generation, n=p.n, row_prompts=rows)


# -------------------------------------------------------------- profiles
def model_ids(settings: Settings) -> list[str]:
    return [MODEL_PREFIX] + [f"{MODEL_PREFIX}:{name}" for name in settings.profiles]


def resolve_profile(model: str, settings: Settings, model_id: str) -> ProfileSettings:
    """``edgeagent`` (or the model's own id) is the plain model; ``edgeagent:X`` profile X."""
    if model in (MODEL_PREFIX, model_id, ""):
        return ProfileSettings()
    if model.startswith(MODEL_PREFIX + ":"):
        name = model.split(":", 1)[1]
        if name in settings.profiles:
            return settings.profiles[name]
    raise ModelNotFound(
        f"unknown model {model!r}; available: {', '.join(model_ids(settings))}"
    )


# -------------------------------------------------------------- tools
def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with ``additionalProperties: false`` on every object without one."""
    out = dict(schema)
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
        if "properties" in out:
            out["properties"] = {k: _closed(v) if isinstance(v, dict) else v
                                 for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _closed(out["items"])
    return out


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": _closed(tool.function.parameters),
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def offered_tools(req: ChatCompletionRequest) -> tuple[list[Tool], bool] | None:
    """The tools the model may call and whether it may answer without a call; None when
    it calls none."""
    choice = req.tool_choice
    if not req.tools or choice == "none":
        return None
    tools = req.function_tools()
    if isinstance(choice, CustomToolChoice):
        raise Unsupported("unsupported: tool_choice of type custom: only function tools are "
                          "supported", "tool_choice")
    if isinstance(choice, NamedToolChoice):
        names, may_answer = {choice.function.name}, False
    elif isinstance(choice, AllowedToolChoice):
        names = {t.function.name for t in choice.allowed_tools.tools}
        may_answer = choice.allowed_tools.mode == "auto"
    else:
        return tools, choice in (None, "auto")
    tools = [t for t in tools if t.function.name in names]
    if not tools:
        raise InvalidRequest(f"tool_choice names {', '.join(sorted(names))}, not in tools",
                             "tool_choice")
    return tools, may_answer


def tool_guidance(req: ChatCompletionRequest, caps: LimitsSettings, max_tokens: int
                  ) -> tuple[dict[str, Any], list[Tool], bool] | None:
    """The JSON schema the answer must follow when tools are offered, the tools, and
    whether it may answer without a call; None without tools.

    The model answers in an envelope: ``{"tool_calls": [{"name", "arguments"}]}`` or, when
    it may answer without a call, ``{"content": "..."}``. The daemon parses it into
    OpenAI's shape. A call is bounded to fit ``max_tokens`` (``fitted``; the list's
    length is the closer's: ``close_tool_list``); the content is prose, bounded by
    max_tokens alone.
    """
    offer = offered_tools(req)
    if offer is None:
        return None
    tools, may_answer = offer
    call = fitted({"anyOf": [_call_schema(t) for t in tools]} if len(tools) > 1
                  else _call_schema(tools[0]), caps, max_tokens)
    calls = {
        "type": "object",
        "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1,
                                      "maxItems": 1 if req.parallel_tool_calls is False else 4}},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if may_answer:
        text = {"type": "object", "properties": {"content": {"type": "string"}},
                "required": ["content"], "additionalProperties": False}
        return {"anyOf": [calls, text]}, tools, True
    return calls, tools, False


#: How a tool envelope is written: no free whitespace, and the separators of
#: ``json.dumps`` (the tools note's JSON, and how SmolLM2's function-calling data wrote
#: its calls): the model copies arguments more often after ``": "`` than after ``":"``.
TOOL_SEPARATORS = {"item_separator": ", ", "key_separator": ": "}


def json_guidance(schema: dict[str, Any], closer: Closer | None = None,
                  separators: dict[str, str] | None = None) -> Guidance:
    """Guidance for a JSON schema, with no free whitespace, so the model spends its tokens
    on content: compact, or with ``separators`` (llguidance's ``x-guidance``
    ``item_separator``/``key_separator``)."""
    options = {"whitespace_flexible": False, **(separators or {})}
    return Guidance("json_schema", json.dumps({**schema, "x-guidance": options}), closer)


# -------------------------------------------------------------- bounded values
# A small model under a grammar can write "1000000000000..." or "11.1.1.1111..." until
# max_tokens: the grammar lets a value grow forever unless its schema bounds it. So every
# value the schema leaves unbounded gets a cap (LimitsSettings.guided_*), through keywords
# llguidance (onnxruntime-genai 0.18) honours: maxLength, minimum/maximum, multipleOf (it
# bounds the decimals), maxItems. A bound the client wrote is kept as it is.
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "additionalProperties", "not")
#: A string is bounded already by any of these.
_STRING_BOUNDS = ("maxLength", "pattern", "format", "enum", "const")


#: Where an object's other properties point: any JSON value, bounded (in the root's $defs).
_FREE_REF = "#/$defs/edgeagent_value"
_FREE_VALUE = {"anyOf": [
    {"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
    {"type": "array", "items": {"$ref": _FREE_REF}},
    {"type": "object", "additionalProperties": {"$ref": _FREE_REF}}]}


def bounded(schema: dict[str, Any], caps: LimitsSettings) -> dict[str, Any]:
    """``schema`` with a cap on every string, number and array it leaves unbounded; an
    object that allows other properties than its own (JSON schema's default) takes at most
    ``guided_array_max_items`` more, each a bounded JSON value."""
    out = _bounded(schema, caps)
    if _FREE_REF in json.dumps(out):
        out["$defs"] = {**out.get("$defs", {}), "edgeagent_value": _bounded(_FREE_VALUE, caps)}
    return out


def _bounded(schema: dict[str, Any], caps: LimitsSettings) -> dict[str, Any]:
    out = {k: _bounded_any(v, caps) if k in _SUBSCHEMAS else v for k, v in schema.items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_bounded_any(v, caps) for v in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _bounded_any(v, caps) for k, v in out[key].items()}
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "enum" in out or "const" in out:
        return out
    if "string" in types and not any(k in out for k in _STRING_BOUNDS):
        out["maxLength"] = caps.guided_string_max_length
    if types & {"number", "integer"}:
        largest = 10 ** caps.guided_number_digits - 1
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -largest
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = largest
        if "number" in types and "multipleOf" not in out:
            out["multipleOf"] = 10.0 ** -caps.guided_number_decimals
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(caps.guided_array_max_items, out.get("minItems", 0))
    if "object" in types or "properties" in out:
        declared = bool(out.get("properties"))
        if "additionalProperties" not in out and "patternProperties" not in out:
            # An object with properties of its own is answered with those (the answer still
            # validates); one without any is a map, whose values are bounded JSON.
            out["additionalProperties"] = False if declared else {"$ref": _FREE_REF}
        if out.get("additionalProperties") is not False and "maxProperties" not in out:
            out["maxProperties"] = max(len(out.get("properties", {}))
                                       + caps.guided_array_max_items,
                                       out.get("minProperties", 0))
        extra = out.get("additionalProperties")
        if (not declared and extra is not None and extra is not False
                and "patternProperties" not in out):
            # A map's key is a string that runs away like a value (the model wrote one
            # until max_tokens): keys get the strings' cap, through patternProperties
            # (llguidance has no propertyNames; beside declared properties the pattern
            # would intersect with them, which llguidance refuses for recursive values).
            out["patternProperties"] = {
                _KEY_PATTERN.format(caps.guided_string_max_length):
                    {"$ref": _FREE_REF} if extra is True else extra}
            out["additionalProperties"] = False
    return out


#: The keys an object's other properties may have: at most N characters.
_KEY_PATTERN = "^.{{0,{}}}$"


def fitted(schema: dict[str, Any], limits: LimitsSettings, max_tokens: int
           ) -> dict[str, Any]:
    """``schema`` bounded, its caps halved in turn (down to a floor) until its longest
    answer fits ``max_tokens``: a small model fills every cap (a 128-character string of
    digits, 8 numbers of 15 digits, 8 more properties), and its JSON must close."""
    caps = limits
    for _ in range(6):
        out = bounded(schema, caps)
        if longest_answer(out) <= max_tokens:
            break
        caps = caps.model_copy(update={
            "guided_string_max_length": max(16, caps.guided_string_max_length // 2),
            "guided_array_max_items": max(1, caps.guided_array_max_items // 2),
            "guided_number_digits": max(6, caps.guided_number_digits - 3),
            "guided_number_decimals": max(2, caps.guided_number_decimals - 2)})
    return out


def longest_answer(schema: Any, defs: dict[str, Any] | None = None, depth: int = 0) -> int:
    """About the tokens of the longest JSON ``schema`` (bounded) allows: a token per
    character of a value (SmolLM2 writes digits one token each), a key's characters and
    its punctuation; a bound it cannot see (a pattern) counts nothing."""
    if not isinstance(schema, dict) or depth > 3:
        return 1
    defs = schema.get("$defs", defs or {})
    if "const" in schema or "enum" in schema:
        return max(len(json.dumps(v)) for v in schema.get("enum", [schema.get("const")]))
    if schema.get("$ref") == _FREE_REF:
        return longest_answer(defs.get("edgeagent_value"), defs, depth + 1)
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives:
        return max(longest_answer(a, defs, depth) for a in alternatives)
    size = 1
    if "maxLength" in schema:
        size = max(size, schema["maxLength"] + 2)
    if "maximum" in schema and "minimum" in schema:
        digits = len(str(int(max(abs(schema["minimum"]), abs(schema["maximum"])))))
        decimals = len(repr(schema.get("multipleOf", 1)).split(".")[-1].rstrip("0"))
        size = max(size, digits + decimals + 2)
    if "maxItems" in schema:
        size = max(size, 2 + schema["maxItems"] * (longest_answer(schema.get("items"), defs,
                                                                  depth) + 1))
    properties = schema.get("properties", {})
    if properties or "maxProperties" in schema:
        own = sum(len(k) + 3 + longest_answer(v, defs, depth) for k, v in properties.items())
        extra, key = schema.get("additionalProperties"), 8
        for pattern, value in schema.get("patternProperties", {}).items():
            bound = re.fullmatch(r"\^\.\{0,(\d+)\}\$", pattern)
            extra, key = value, int(bound.group(1)) + 3 if bound else key
        more = max(0, schema.get("maxProperties", 0) - len(properties)) * (
            key + longest_answer(extra, defs, depth))
        size = max(size, 2 + own + more)
    return size


def _bounded_any(value: Any, caps: LimitsSettings) -> Any:
    """A subschema bounded; ``true``/``false`` and other non-schemas as they are."""
    return _bounded(value, caps) if isinstance(value, dict) else value


# -------------------------------------------------------------- no repeated calls
#: Tokens that ending the envelope's list takes ("]}": one token in byte-level BPE) and a
#: margin.
_CLOSE_TOKENS = 2


def close_tool_list(text: str, used: int, left: int) -> str | None:
    """The tail that ends a tool envelope's list now (an ``engine.Closer``), or None.

    A small model repeats its call until maxItems, and JSON schema cannot forbid a repeat
    (llguidance refuses uniqueItems): so the list ends as soon as its last whole call
    repeats an earlier one (the parser drops the repeat), or when the tokens left could
    not hold one more call of the average size so far (it would be cut by max_tokens).
    Checked only where a call has just closed, with nothing or a comma after it.
    """
    head = _CALLS_HEAD.match(text)
    if head is None:
        return None
    calls, pos, _ = _whole_calls(text, head.end())
    rest = text[pos:].strip()
    if not calls or rest not in ("", ","):
        return None
    keys = [_call_key(c) for c in calls]
    repeated = keys[-1] in keys[:-1]
    if not repeated and left >= used / len(calls) + _CLOSE_TOKENS:
        return None
    if rest == "":
        return "]}"
    # The comma is written already and text is not taken back: the list closes with one
    # more copy of the last call, which the parser drops as the duplicate it is.
    return json.dumps(calls[-1]) + "]}"


def _call_key(call: Any) -> str:
    """What makes two calls identical: their name and arguments, keys in any order."""
    return json.dumps(call, sort_keys=True)


def _tools_system_prompt(tools: list[Tool], may_answer: bool) -> str:
    """The tools note: each tool as a signature and its description, each parameter's
    description under it, then the envelope to answer in.

    Measured on SmolLM2-135M (scripts/eval_tools.py's cases, INT4 and INT8 builds):
    signatures rather than each tool's JSON schema pick the right function as often with
    a third fewer prompt tokens, and leave fewer quoted schema words (``"type"``,
    ``"string"``) for the model to copy into a value. The grammar still holds the answer
    to the full schema. The request's words follow the user's turn
    (``_request_words_note``)."""
    lines = ["You can call these functions:"]
    for t in tools:
        params = t.function.parameters or {}
        props = params.get("properties") or {}
        need = set(params.get("required") or [])
        args = ", ".join(f"{k}{'' if k in need else '?'}: {_param_type(v)}"
                         for k, v in props.items())
        line = f"{t.function.name}({args})"
        lines.append(f"{line} - {t.function.description}" if t.function.description else line)
        lines += [f"    {k}: {v['description']}" for k, v in props.items()
                  if isinstance(v, dict) and v.get("description")]
    lines.append('To call one, answer with JSON: {"tool_calls": [{"name": ..., "arguments": '
                 '{...}}]}.')
    if may_answer:
        lines.append('To answer without a call, answer with JSON: {"content": "..."}.')
    return "\n".join(lines)


def _param_type(schema: Any) -> str:
    """A parameter's type as a signature shows it: ``string``, ``"on"|"off"``,
    ``integer 0..100``; a structured one (object, array, combinations) as its JSON schema
    without descriptions."""
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    kind = schema.get("type")
    names = [str(k) for k in kind] if isinstance(kind, list) else [str(kind)]
    if not set(names) <= {"string", "number", "integer", "boolean", "null"}:
        return json.dumps({k: v for k, v in schema.items() if k != "description"})
    text = "|".join(names)
    if "minimum" in schema or "maximum" in schema:
        text += f" {schema.get('minimum', '')}..{schema.get('maximum', '')}"
    return text


#: Words left out of the request's words: English function words, never an argument.
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "to", "of", "in", "on", "at", "for", "from", "by", "with", "and", "or",
    "is", "are", "be", "it", "its", "this", "that", "my", "me", "i", "you", "please", "can",
    "could", "would", "will", "what", "which", "how"})
_WORD = re.compile(r"[^\s\"',;!?()\[\]{}]+")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?")  # as JSON writes one: 007 stays a word
#: At most this many words (a long request is not repeated whole).
REQUEST_WORDS = 48


def request_words(text: str) -> list[str | int | float]:
    """The words of a request as the tools' words note lists them: each once, in order,
    without sentence punctuation or English function words; a number as a number.

    A small model copies a value it has seen written as that value: after
    ``"sensor_id": "`` it copies a word that followed a quote (``"tank_level_2"``) far
    more often than one that followed a space in the request (`` tank_level_2``, another
    token), and a JSON number into a number rather than into an id."""
    words: list[str | int | float] = []
    seen: set[str] = set()
    for raw in _WORD.findall(text):
        word = raw.rstrip(".:")
        if not word or word.lower() in _FUNCTION_WORDS or word in seen:
            continue
        seen.add(word)
        if _NUMBER.fullmatch(word):
            words.append(float(word) if "." in word else int(word))
        else:
            words.append(word)
        if len(words) == REQUEST_WORDS:
            break
    return words


#: More words that say nothing of what a request is about.
_GENERIC_WORDS = _FUNCTION_WORDS | frozenset({
    "tell", "give", "show", "say", "make", "let", "now", "then", "one", "all", "any", "some",
    "not", "but", "was", "were", "has", "have", "had", "does", "did", "do", "your", "our",
    "there", "here", "about", "into", "use", "using"})
_LETTERS = re.compile(r"[a-z]+")
_IDENTIFIER = re.compile(r"(?=\w*[a-z])\w*(_|[a-z]\d|\d[a-z])\w*", re.IGNORECASE)


def names_offered(text: str, tools: list[Tool]) -> bool:
    """Whether a request names something the offered tools know of: a word (three letters
    or more, not a generic English word) of their names, descriptions or parameters, one
    the start of the other (``humid``, ``humidity``), or an identifier (``pump_1``,
    ``co2``). The tools' relevance gate (``limits.tool_relevance_gate``): a small model
    does not tell on its own when no tool fits (measured: docs/tool-calling.md)."""
    if _IDENTIFIER.search(text):
        return True
    theirs = {w for t in tools for w in _words(" ".join(
        [t.function.name, t.function.description or "", *_schema_text(t.function.parameters)]))}
    return any(w == o or (min(len(w), len(o)) >= 4 and (w.startswith(o) or o.startswith(w)))
               for w in _words(text) for o in theirs)


def _schema_text(schema: Any) -> list[str]:
    """The words a JSON schema says of its values: property names, titles, descriptions,
    enum and const values (not its keywords: ``type``, ``string``...)."""
    if isinstance(schema, list):
        return [w for s in schema for w in _schema_text(s)]
    if not isinstance(schema, dict):
        return []
    out = [str(schema[k]) for k in ("title", "description") if isinstance(schema.get(k), str)]
    out += [json.dumps(v) for v in [*schema.get("enum", []), schema.get("const", "")]]
    props = schema.get("properties")
    if isinstance(props, dict):
        out += [str(k) for k in props] + _schema_text(list(props.values()))
    for key in ("items", "anyOf", "oneOf", "allOf", "additionalProperties", "$defs"):
        sub = schema.get(key)
        out += _schema_text(list(sub.values()) if key == "$defs" and isinstance(sub, dict)
                            else sub)
    return out


def _words(text: str) -> set[str]:
    return {w for w in _LETTERS.findall(text.lower().replace("_", " "))
            if len(w) >= 3 and w not in _GENERIC_WORDS}


def _request_words_note(messages: list[Message]) -> list[str] | None:
    """The system turn that follows the user's request when tools are offered: the
    request's words as a JSON list (client text: a Plain part), or None when the
    conversation does not end with the user's turn (a tool result: nothing to copy)."""
    last = messages[-1] if messages else None
    if last is None or last.role != "user":
        return None
    words = request_words(last.text())
    if not words:
        return None
    return ["The request's words: ", Plain(json.dumps(words))]


def parse_tool_envelope(text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls in OpenAI's shape) from the guided envelope."""
    doc = json.loads(text)
    if "tool_calls" in doc:
        return None, _openai_calls(doc["tool_calls"])
    return str(doc.get("content", "")), None


def _openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls in OpenAI's shape, each identical call (name and arguments) once."""
    unique: dict[str, dict[str, Any]] = {}
    for call in calls:
        unique.setdefault(_call_key(call), call)
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for c in unique.values()]


_CALLS_HEAD = re.compile(r'\{\s*"tool_calls"\s*:\s*\[\s*')
_CALLS_SEP = re.compile(r"\s*,\s*")
_CONTENT_HEAD = re.compile(r'\{\s*"content"\s*:\s*"')


def _whole_calls(text: str, pos: int) -> tuple[list[dict[str, Any]], int, bool]:
    """The calls written whole from ``pos`` (just inside the envelope's list), where the
    last one ends, and whether the list is closed after it (no comma follows)."""
    calls: list[dict[str, Any]] = []
    decoder, last = json.JSONDecoder(), pos
    while True:
        try:
            call, last = decoder.raw_decode(text, pos)
        except ValueError:  # the call being written, or nothing yet
            return calls, last, False
        calls.append(call)
        comma = _CALLS_SEP.match(text, last)
        if comma is None:
            return calls, last, True
        pos = comma.end()


def cut_tool_envelope(text: str, reason: str) -> tuple[str | None,
                                                      list[dict[str, Any]] | None, str | None]:
    """(content, tool_calls, explanation) from an envelope cut short (``reason``: length or
    cancelled), so that the client never sees our envelope: the calls written whole (the
    one being written is dropped), or the text answered so far; the explanation says what
    was dropped."""
    cause = "max_tokens" if reason == "length" else "a cancel"
    head = _CALLS_HEAD.match(text)
    if head is not None:
        calls, _, closed = _whole_calls(text, head.end())
        if closed:
            return None, _openai_calls(calls), None
        return ("" if not calls else None, _openai_calls(calls) or None,
                f"{cause} ended the answer while it wrote a tool call: {len(calls)} "
                "complete call(s) returned, the unfinished one dropped")
    if _CONTENT_HEAD.match(text):
        doc = pydantic_core.from_json(text, allow_partial="trailing-strings")
        return str(doc.get("content", "")), None, None  # cut text, as any answer "length"
    return "", None, f"{cause} ended the answer before it said whether it calls a tool"


# -------------------------------------------------------------- preparing
def _sampling(req: SamplingFields, profile: ProfileSettings, prompt_len: int,
              settings: Settings, context_length: int) -> Sampling:
    max_tokens = req.token_cap()
    if max_tokens is None:
        max_tokens = min(profile.max_tokens or settings.limits.default_max_tokens,
                         max(1, context_length - prompt_len))
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    temperature = req.temperature if req.temperature is not None else profile.temperature
    if (req.min_tokens or 0) > max_tokens:
        raise InvalidRequest(f"min_tokens ({req.min_tokens}) is above max_tokens "
                             f"({max_tokens})", "min_tokens")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature if temperature is not None else 0.0,
        top_p=req.top_p or profile.top_p or 1.0,
        top_k=req.top_k if req.top_k is not None else (profile.top_k or 0),
        repetition_penalty=req.repetition_penalty or profile.repetition_penalty or 1.0,
        min_tokens=req.min_tokens or 0,
        stop=tuple(stops),
        seed=None if req.seed == -1 else req.seed,  # -1: random, as vLLM and llama.cpp
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logprobs=_logprobs(req),
    )


def _logprobs(req: SamplingFields) -> int | None:
    """How many alternatives each token's logprob comes with; None: no logprobs."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return (req.top_logprobs or 0) if req.logprobs else None
    return None


def _new(kind: str) -> tuple[str, int]:
    return f"{kind}-{uuid.uuid4().hex[:24]}", int(time.time())


def _check_common(req: SamplingFields) -> None:
    """What OpenAI refuses besides the schema, and what this daemon cannot honour."""
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true",
                             "stream_options")
    refuse_unsupported(req)


def _template_message(m: Message, where: str) -> dict[str, Any]:
    """A message as the chat template gets it: the role it knows (developer is system, the
    deprecated function is tool), the text, and a tool result's ``name`` and
    ``tool_call_id`` so the template can render it against its call."""
    role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
    out: dict[str, Any] = {"role": role, "content": [Plain(m.text(where))]}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def prepare_chat(req: ChatCompletionRequest, engine: Engine, settings: Settings,
                 model_id: str, generation: int | None = None) -> Prepared:
    _check_common(req)
    if req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise InvalidRequest("tool_choice other than none or auto needs tools", "tool_choice")
    profile = resolve_profile(req.model, settings, model_id)
    # Every content the client sent is Plain: tokenized as text, never as control tokens.
    # Only what the daemon itself adds (the profile's system prompt, the tools note) is
    # template text.
    messages = [_template_message(m, f"messages.{i}") for i, m in enumerate(req.messages)]
    if profile.system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [profile.system_prompt]})
    guidance: tuple[str, str] | None = None
    guided_by = "response_format"
    tool_mode = words_turn = False
    budget = req.token_cap() or profile.max_tokens or settings.limits.default_max_tokens
    tools = tool_guidance(req, settings.limits, budget)
    unused: Guidance | None = None  # the tools' guidance when no tool fits
    if tools is not None and _no_tool_fits(req, tools, settings.limits):
        unused, tools = json_guidance(tools[0]), None  # answered in text, without them
    if tools is not None:
        schema, offered, may_answer = tools
        note = _tools_system_prompt(offered, may_answer)
        if messages[0]["role"] == "system":
            messages[0]["content"] += ["\n\n" + note]
        else:
            messages.insert(0, {"role": "system", "content": [note]})
        words = _request_words_note(req.messages)
        if words is not None:
            messages.append({"role": "system", "content": words})
            words_turn = True
        guidance = json_guidance(schema, close_tool_list, TOOL_SEPARATORS)
        guided_by = "tools"
        tool_mode = True
    elif req.response_format is not None and req.response_format.type != "text":
        if req.response_format.type == "json_object":
            schema = {"type": "object"}
        else:
            if req.response_format.json_schema is None:
                raise InvalidRequest("response_format json_schema needs a json_schema object",
                                     "response_format")
            schema = req.response_format.json_schema.schema_ or {"type": "object"}
        guidance = json_guidance(fitted(schema, settings.limits, budget))
    try:
        tokens = _chat_tokens(engine, messages, words_turn)
    except Exception as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}",
                             "messages") from exc
    sampling = _sampling(req, profile, len(tokens), settings, engine.plan.context_length)
    if guidance is not None:
        _check_guidance(engine, guidance, sampling, guided_by)
    if unused is not None:  # the tools' schemas are the client's to get right all the same
        _check_guidance(engine, unused, sampling, "tools")
    rid, created = _new("chatcmpl")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Prepared(rid, req.model, created, tokens, sampling, guidance, tool_mode,
                    include_usage, _deadline(settings), generation=generation, n=req.n or 1)


def _no_tool_fits(req: ChatCompletionRequest, tools: tuple[dict[str, Any], list[Tool], bool],
                  caps: LimitsSettings) -> bool:
    """The relevance gate: tool_choice auto, and the user's request names nothing the
    offered tools know of (``names_offered``), nor does the assistant's turn it answers
    ("Shall I open valve_3?" "Yes.")."""
    *before, last = req.messages
    if not (tools[2] and caps.tool_relevance_gate and last.role == "user"):
        return False
    asked = before[-1].text() if before and before[-1].role == "assistant" else ""
    return not names_offered(f"{asked}\n{last.text()}", tools[1])


def _chat_tokens(engine: Engine, messages: list[dict[str, Any]], words_turn: bool
                 ) -> np.ndarray:
    """The prompt's tokens; without the request's words turn (the last message, when
    ``words_turn``) when the model's template refuses a system turn after the user's
    (templates that want roles to alternate)."""
    try:
        return engine.chat_tokens(messages)
    except Exception:
        if not words_turn:
            raise
        return engine.chat_tokens(messages[:-1])


def _deadline(settings: Settings) -> float:
    return time.monotonic() + settings.limits.request_timeout_s


def _check_guidance(engine: Engine, guidance: tuple[str, str], sampling: Sampling,
                    field: str) -> None:
    """A 400 naming ``field`` when onnxruntime-genai refuses the grammar, here rather than
    when its batch starts."""
    try:
        engine.check_guidance(guidance, sampling)
    except GuidanceError as exc:
        raise InvalidRequest(f"{field} cannot be used for constrained decoding: {exc}",
                             field) from exc


def prepare_completion(req: CompletionRequest, engine: Engine, settings: Settings,
                       model_id: str, generation: int | None = None) -> Prepared:
    _check_common(req)
    profile = resolve_profile(req.model, settings, model_id)
    prompts = [(tokens, text if req.echo else "")
               for tokens, text in _prompts(req.prompt, engine)]
    # The longest prompt sizes the default max_tokens and the scheduler's length checks.
    tokens = max((t for t, _ in prompts), key=len)
    sampling = _sampling(req, profile, len(tokens), settings, engine.plan.context_length)
    rid, created = _new("cmpl")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n = req.n or 1
    if len(prompts) == 1:
        return Prepared(rid, req.model, created, tokens, sampling, None, False,
                        include_usage, _deadline(settings), prompts[0][1], generation, n)
    return Prepared(rid, req.model, created, tokens, sampling, None, False, include_usage,
                    _deadline(settings), "", generation, n * len(prompts), prompts)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]], engine: Engine
             ) -> list[tuple[Any, str]]:
    """A completion request's prompts (tokens and text), from any of OpenAI's four shapes:
    a string, strings, token ids, lists of token ids."""
    if not prompt:
        raise InvalidRequest("prompt must not be empty", "prompt")
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [_one_prompt(prompt, engine, "prompt")]
    return [_one_prompt(p, engine, f"prompt.{i}") for i, p in enumerate(prompt)]


def _one_prompt(prompt: Any, engine: Engine, where: str) -> tuple[Any, str]:
    """One prompt, a string or token ids: its tokens and its text."""
    if not prompt:
        raise InvalidRequest(f"{where} must not be empty", where)
    if isinstance(prompt, str):
        return engine.encode(prompt), prompt
    ids = [int(t) for t in prompt]
    bad = [t for t in ids if not 0 <= t < engine.vocab_size]
    if bad:
        raise InvalidRequest(f"{where}: token {bad[0]} is outside the vocabulary "
                             f"(0..{engine.vocab_size - 1})", where)
    tokens = np.asarray(ids, dtype=np.int32)
    return tokens, str(engine.tokenizer.decode(tokens))


# -------------------------------------------------------------- rendering
def finish_reason(reason: str) -> str:
    """OpenAI's finish reason for an engine's: "stop" and "length" as they are; a cancelled
    request (a client's cancel, a drain) is "stop", for OpenAI has no other word for it."""
    return reason if reason in ("stop", "length") else "stop"


def error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def job_error_body(err: JobError | AdmissionError) -> dict[str, Any]:
    """The error object of a refused or failed request; its type follows its status."""
    param = err.param if isinstance(err, AdmissionError) else None
    return error_body(err.message, error_type(err.status), err.code, param)


def error_path(loc: SequenceT[Any]) -> str:
    """An error's loc as the request's JSON path (``tools.0.function.parameters``): without
    FastAPI's ``body`` and without the member tag of a tagged union (``UNION_TAG_DEPTH``)."""
    parts = [p for p in loc if p != "body"]
    depth = UNION_TAG_DEPTH.get(parts[0]) if parts else None
    if depth is not None and len(parts) > depth:
        del parts[depth]
    return ".".join(str(p) for p in parts)


def validation_message(errors: SequenceT[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one line (``path: message; ...``) and the first field at fault."""
    parts = []
    first_param = None
    for err in errors:
        path = error_path(err.get("loc", ()))
        first_param = first_param or path or None
        parts.append(f"{path or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first_param


def render_completion(p: Prepared, text: str, fin: Finish, chat: bool) -> dict[str, Any]:
    """The whole answer; ValueError or KeyError when a guided output does not parse."""
    if chat:
        return chat_completion(p, text, fin.reason, fin.prompt_tokens, fin.completion_tokens)
    return text_completion(p, p.prompt_of(fin.index)[1] + text, fin.reason,
                           fin.prompt_tokens, fin.completion_tokens)


class Choice:
    """What one choice has produced: its text, its tokens' logprobs, its end."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[Logprob] = []
        self.finish: Finish | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts) + (self.finish.tail if self.finish else "")


class Choices:
    """A request's ``n`` choices, gathered from the scheduler's items by a transport."""

    def __init__(self, p: Prepared) -> None:
        self.p = p
        self.rows = [Choice() for _ in range(p.n)]

    def add(self, item: Delta | Finish) -> None:
        row = self.rows[item.index]
        if isinstance(item, Delta):
            row.parts.append(item.text)
            row.logprobs.extend(item.logprobs)
        else:
            row.finish = item

    @property
    def done(self) -> bool:
        return all(row.finish is not None for row in self.rows)

    def offset(self, index: int) -> int:
        """Where choice ``index``'s next token starts in its text (echo included), counted
        in the tokens' own texts, as text_offset counts them."""
        return len(self.p.prompt_of(index)[1]) + sum(len(lp.chosen.token)
                                                     for lp in self.rows[index].logprobs)

    def usage(self) -> dict[str, int]:
        """The prompt once, the completions of every choice (as OpenAI counts n)."""
        fins = [row.finish for row in self.rows if row.finish is not None]
        prompt = (sum(len(t) for t, _ in self.p.batch) if self.p.batch
                  else fins[0].prompt_tokens if fins else 0)
        return usage(prompt, sum(f.completion_tokens for f in fins))


def _token(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": t.bytes}


def render_logprobs(p: Prepared, logprobs: list[Logprob], chat: bool, offset: int = 0
                    ) -> dict[str, Any] | None:
    """A choice's (or a chunk's) logprobs in OpenAI's shape: chat's ``content`` list, or
    completions' legacy columns with ``text_offset`` from ``offset``; None when not asked."""
    if p.sampling.logprobs is None:
        return None
    if chat:
        return {"content": [dict(_token(lp.chosen), top_logprobs=[_token(t) for t in lp.top])
                            for lp in logprobs], "refusal": None}
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.chosen.token)
    return {"tokens": [lp.chosen.token for lp in logprobs],
            "token_logprobs": [lp.chosen.logprob for lp in logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
            "text_offset": offsets}


def answer(p: Prepared, choices: Choices, chat: bool) -> dict[str, Any] | JobError:
    """The whole answer of every choice, or a 500 when a guided output does not parse."""
    docs = []
    for index, row in enumerate(choices.rows):
        assert row.finish is not None, "answer() before every choice finished"
        try:
            doc = render_completion(p, row.text, row.finish, chat)
        except (ValueError, KeyError) as exc:
            return JobError(500, "guidance_error", f"the guided output did not parse: {exc}")
        docs.append(dict(doc["choices"][0], index=index,
                         logprobs=render_logprobs(p, row.logprobs, chat,
                                                  len(p.prompt_of(index)[1]))))
    return dict(doc, choices=docs, usage=choices.usage())


def first_chunks(p: Prepared, chat: bool) -> list[dict[str, Any]]:
    """The chunks that open a stream: each choice's role, or its echoed prompt."""
    if chat:
        return [chat_chunk(p, {"role": "assistant", "content": ""}, None, i)
                for i in range(p.n)]
    echoes = [p.prompt_of(i)[1] for i in range(p.n)]
    return [text_chunk(p, echo, None, i) for i, echo in enumerate(echoes) if echo]


def delta_chunk(p: Prepared, text: str, chat: bool, index: int = 0,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    if chat:
        return chat_chunk(p, {"content": text}, None, index, logprobs)
    return text_chunk(p, text, None, index, logprobs)


def stream_delta(p: Prepared, choices: Choices, d: Delta, chat: bool) -> dict[str, Any]:
    """The chunk of a choice's tokens (their text and logprobs); ``choices`` records them."""
    logprobs = render_logprobs(p, d.logprobs, chat, choices.offset(d.index))
    choices.add(d)
    return delta_chunk(p, d.text, chat, d.index, logprobs)


def coalesce(items: SequenceT[Any]) -> list[Any]:
    """Consecutive Deltas of one choice merged into one (their text and logprobs), so that
    what arrived together goes out as one chunk; other items as they are."""
    out: list[Any] = []
    for item in items:
        prev = out[-1] if out else None
        if (isinstance(item, Delta) and isinstance(prev, Delta)
                and prev.index == item.index):
            out[-1] = Delta(item.token, prev.text + item.text, prev.logprobs + item.logprobs,
                            item.index)
        else:
            out.append(item)
    return out


def final_chunks(p: Prepared, fin: Finish, held: list[str], chat: bool,
                 choices: Choices | None = None) -> list[dict[str, Any]]:
    """The chunks that end a choice's stream: a tool call (parsed from the ``held``
    envelope) or the held-back tail, the finish reason; and, once every choice of
    ``choices`` has ended (it records ``fin``), the usage when asked for."""
    if choices is not None:
        choices.add(fin)
    index = fin.index
    out = []
    reason = finish_reason(fin.reason)
    if p.tool_mode:
        doc = chat_completion(p, "".join(held) + fin.tail, fin.reason, fin.prompt_tokens,
                              fin.completion_tokens)
        message = doc["choices"][0]["message"]
        delta: dict[str, Any] = {"content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [dict(c, index=i) for i, c in
                                   enumerate(message["tool_calls"])]
        out.append(chat_chunk(p, delta, None, index))
        reason = doc["choices"][0]["finish_reason"]
    elif fin.tail:
        out.append(delta_chunk(p, fin.tail, chat, index))
    out.append(chat_chunk(p, {}, reason, index) if chat else text_chunk(p, "", reason, index))
    if p.tool_mode and "explanation" in doc["choices"][0]:
        out[-1]["choices"][0]["explanation"] = doc["choices"][0]["explanation"]
    if p.include_usage and (choices is None or choices.done):
        totals = choices.usage() if choices is not None else usage(fin.prompt_tokens,
                                                                   fin.completion_tokens)
        out.append(usage_chunk(p, totals["prompt_tokens"], totals["completion_tokens"], chat))
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(p: Prepared, text: str, reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish = finish_reason(reason)
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish,
                              "logprobs": None}
    if p.tool_mode:
        # Whole, the envelope is parsed; cut short (length, a cancel), what it holds.
        explanation = None
        if reason == "stop":
            content, calls = parse_tool_envelope(text)
        else:
            content, calls, explanation = cut_tool_envelope(text, reason)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        if calls and reason == "stop":
            choice["finish_reason"] = "tool_calls"
        choice["message"] = message
        if explanation is not None:
            choice["explanation"] = explanation  # an extension: why nothing or less
    return {
        "id": p.id, "object": "chat.completion", "created": p.created, "model": p.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(p: Prepared, delta: dict[str, Any], finish: str | None, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": p.id, "object": "chat.completion.chunk", "created": p.created, "model": p.model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                     "logprobs": logprobs}],
    }


def usage_chunk(p: Prepared, prompt_tokens: int, completion_tokens: int, chat: bool
                ) -> dict[str, Any]:
    """The last chunk of a stream that asked for usage; no choices."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": p.id, "object": kind, "created": p.created,
            "model": p.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def text_completion(p: Prepared, text: str, reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {
        "id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(reason),
                     "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def text_chunk(p: Prepared, text: str, finish: str | None, index: int = 0,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": p.id, "object": "text_completion", "created": p.created, "model": p.model,
            "choices": [{"index": index, "text": text, "finish_reason": finish,
                         "logprobs": logprobs}]}


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

