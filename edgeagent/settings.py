"""Settings: strict pydantic models, the single source of every default.

Sources, lowest precedence first:

1. the defaults below;
2. the TOML file (``/etc/edgeagent/edgeagent.toml``, or ``--config PATH``);
3. the persisted fleet overlay, ``<state_dir>/fleet-overlay.json``;
4. the environment, ``EDGEAGENT_*`` with ``__`` for nesting
   (``EDGEAGENT_RUNTIME__THREADS=2``).

Every field has a description: ``edgeagent config reference`` renders them as documentation.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/edgeagent/edgeagent.toml")
OVERLAY_FILE = "fleet-overlay.json"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct-int4"

Auto = Literal["auto"]

#: When a changed setting takes effect, weakest first: ``live``, at once (read where it is
#: used); ``scheduler``, handed to the running scheduler; ``reload``, it changes the model or
#: its plan, so the model is reloaded in the background while the old one serves;
#: ``restart``, read only at start (sockets, the broker connection, topics).
Liveness = Literal["live", "scheduler", "reload", "restart"]
LIVENESS: tuple[Liveness, ...] = ("live", "scheduler", "reload", "restart")
# Every leaf setting declares one, as Field(json_schema_extra=...): see liveness().
LIVE: JsonDict = {"liveness": "live"}
SCHEDULER: JsonDict = {"liveness": "scheduler"}
RELOAD: JsonDict = {"liveness": "reload"}
RESTART: JsonDict = {"liveness": "restart"}


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, and so are infinities and
    NaN (JSON has none; a fleet push could still send ``1e400``)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def _default_state_dir() -> Path:
    systemd_state = os.environ.get("STATE_DIRECTORY")
    if systemd_state:
        return Path(systemd_state.split(":")[0])
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "edgeagent"


#: The socket of a system install: systemd/edgeagent.socket listens there.
SYSTEM_SOCKET = Path("/run/edgeagent/api.sock")


def default_socket_path() -> Path:
    """The system install's socket when it exists (so the service, `doctor` and `ask` agree
    on it), else ``$XDG_RUNTIME_DIR`` for a user."""
    if SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "edgeagent" / "api.sock"
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    return Path(f"/tmp/edgeagent-{os.geteuid()}/api.sock")


class ModelSettings(Section):
    path: Path | None = Field(
        default=None,
        description="onnxruntime-genai model folder. Unset: the default model, "
        f"<state_dir>/models/{DEFAULT_MODEL_NAME}.",
        json_schema_extra=RELOAD,
    )
    verify: bool = Field(
        default=True,
        description="Check the sha256 sum of every file listed in the model's manifest before "
        "loading; a mismatch refuses to start.",
        json_schema_extra=RELOAD,
    )


class RuntimeSettings(Section):
    threads: int | Auto = Field(
        default="auto",
        description="Intra-op threads. auto: physical cores within the CPU affinity and the "
        "cgroup CPU quota. An explicit value above the CPUs this process may use is refused.",
        json_schema_extra=RELOAD,
    )
    context_length: int | Auto = Field(
        default="auto",
        description="Tokens per sequence (prompt + output). auto: the model's own limit, capped "
        "by runtime.auto_context_cap and by what fits in memory.",
        json_schema_extra=RELOAD,
    )
    max_batch: int | Auto = Field(
        default="auto",
        description="Sequences generated at once. auto: up to runtime.auto_max_batch_cap, as "
        "many as fit in memory.",
        json_schema_extra=RELOAD,
    )
    provider: Literal["cpu"] = Field(
        default="cpu", description="onnxruntime execution provider.",
        json_schema_extra=RELOAD,
    )
    auto_context_cap: int = Field(
        default=4096, ge=64, description="Upper bound for an automatic context length.",
        json_schema_extra=RELOAD,
    )
    auto_max_batch_cap: int = Field(
        default=4, ge=1, description="Upper bound for an automatic max_batch.",
        json_schema_extra=RELOAD,
    )
    batch_window_ms: float = Field(
        default=100.0,
        ge=0,
        le=1000,
        description="From idle, how long the scheduler may wait for more requests so that "
        "requests arriving together are generated as one batch. It waits only when requests "
        "have lately come in bursts (at least half of those of the last 10 seconds within "
        "this window of the one before), and only until as many requests are queued as were "
        "in the daemon at once in the last 10 seconds: a lone client's requests, and clients "
        "sending at unrelated moments, start at once.",
        json_schema_extra=SCHEDULER,
    )
    probe_root: Path = Field(
        default=Path("/"),
        description="Where the hardware probe finds proc/ and sys/: / on a gateway; a "
        "prepared tree to diagnose a planning problem or to test without the hardware.",
        json_schema_extra=RELOAD,
    )
    memory_headroom_mb: int = Field(
        default=256,
        ge=0,
        description="Memory kept free for the OS and the daemon's own Python heap; the "
        "planner will not plan into it and the memory guard refuses work below it.",
        json_schema_extra=RELOAD,
    )
    prefix_cache_mb: int | Auto = Field(
        default="auto",
        description="Memory for the prompt (prefix) cache: idle generators whose KV cache "
        "holds recent prompts (a system prompt, tools, a chat's earlier turns), so that a "
        "request starting with one prefills only the rest. Each holds one sequence's KV "
        "cache for the whole context. auto: up to runtime.max_batch of them, within half the "
        "memory the plan leaves spare; 0: off; an explicit size is reserved before the "
        "context and batch are sized.",
        json_schema_extra=RELOAD,
    )

    @field_validator("prefix_cache_mb")
    @classmethod
    def _cache_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 (off), a size in MB or \"auto\"")
        return value


class SocketSettings(Section):
    path: Path = Field(
        default_factory=default_socket_path,
        description="Unix socket of the HTTP API. Default: /run/edgeagent/api.sock when it "
        "exists (edgeagent.socket) or for root, else $XDG_RUNTIME_DIR/edgeagent/api.sock, "
        "else /tmp/edgeagent-<uid>/api.sock. Under socket activation the daemon serves the "
        "socket it is handed.",
        json_schema_extra=RESTART,
    )
    mode: int = Field(
        default=0o660, ge=0, le=0o777, description="File mode of the socket.",
        json_schema_extra=RESTART,
    )
    group: str | None = Field(
        default=None, description="Group that owns the socket, for local clients.",
        json_schema_extra=RESTART,
    )
    tcp_host: str = Field(
        default="127.0.0.1", description="Address of the optional TCP listener.",
        json_schema_extra=RESTART,
    )
    tcp_port: int | None = Field(
        default=None, ge=1, le=65535, description="Port of the optional TCP listener; unset: off.",
        json_schema_extra=RESTART,
    )
    idle_timeout_s: int = Field(
        default=10,
        ge=1,
        description="A connection that has not sent a complete request head this long after "
        "connecting or after its last response is closed (slow or silent clients hold a file "
        "descriptor each).",
        json_schema_extra=RESTART,
    )


class MqttSettings(Section):
    url: str | None = Field(
        default=None,
        description="Broker, mqtt://host:port or mqtts://host:port. Unset: MQTT is off.",
        json_schema_extra=RESTART,
    )
    topic_prefix: str = Field(
        default="edgeagent", min_length=1, description="First level of every topic.",
        json_schema_extra=RESTART,
    )
    client_id: str | None = Field(
        default=None, description="Client id; unset: the device id.", json_schema_extra=RESTART,
    )
    username: str | None = Field(
        default=None, description="Username for the broker.", json_schema_extra=RESTART,
    )
    password_file: Path | None = Field(
        default=None,
        description="File holding the broker password. Unset: the credential 'mqtt_password' "
        "in $CREDENTIALS_DIRECTORY, when present.",
        json_schema_extra=RESTART,
    )
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT protocol version.", json_schema_extra=RESTART,
    )
    keepalive_s: int = Field(
        default=30, ge=5, le=65535, description="Keepalive interval.", json_schema_extra=RESTART,
    )
    session_expiry_s: int = Field(
        default=3600,
        ge=0,
        description="MQTT 5 session expiry: requests published while the daemon restarts "
        "within it are delivered when it returns.",
        json_schema_extra=RESTART,
    )
    ca_file: Path | None = Field(
        default=None, description="CA bundle for mqtts://.", json_schema_extra=RESTART,
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate (mutual TLS).", json_schema_extra=RESTART,
    )
    key_file: Path | None = Field(
        default=None, description="Client key (mutual TLS).", json_schema_extra=RESTART,
    )
    max_payload_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest request payload accepted.",
        json_schema_extra=RESTART,
    )
    reply_topics: list[str] = Field(
        default=["{prefix}/clients/#", "replies/#"],
        min_length=1,
        description="MQTT topic filters a request's reply topic (Response Topic or reply_to) "
        "must match; {prefix} is mqtt.topic_prefix, {device} the device id. A reply topic "
        "outside them, with wildcards, or one the daemon itself uses, is refused and counted.",
        json_schema_extra=RESTART,
    )

    @field_validator("reply_topics")
    @classmethod
    def _valid_topic_filters(cls, filters: list[str]) -> list[str]:
        for topic_filter in filters:
            problem = _topic_filter_problem(topic_filter)
            if problem is not None:
                raise ValueError(f"{topic_filter!r} is not a valid MQTT topic filter: {problem}")
        return filters


def _topic_filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` (with {prefix} and {device}) is not a valid MQTT filter, or None.
    paho checks filters only when subscribing; a bad one here would match nothing, silently."""
    expanded = topic_filter.replace("{prefix}", "p").replace("{device}", "d")
    if re.search(r"\{\w*\}", expanded):
        return "unknown placeholder (there are {prefix} and {device})"
    if not expanded or "\0" in expanded:
        return "empty, or contains NUL"
    levels = expanded.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be the whole last level"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


class TelemetrySettings(Section):
    interval_s: float = Field(
        default=30.0, ge=0.1, le=86400, description="Seconds between two telemetry documents.",
        json_schema_extra=LIVE,
    )
    buffer_max: int = Field(
        default=1000, ge=1, description="Telemetry documents kept while the broker is away.",
        json_schema_extra=LIVE,
    )
    spool_dir: Path | None = Field(
        default=None, description="Folder where buffered telemetry survives a restart.",
        json_schema_extra=RESTART,
    )


class CanaryPrompt(Section):
    """One health prompt of a rollout's canary and what its answer must match."""

    prompt: str = Field(min_length=1, description="The user message.")
    regex: str | None = Field(
        default=None, description="A regular expression the answer must contain (re.search)."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="A JSON schema: the answer is generated under it (the engine's guidance) "
        "and must be complete JSON.",
    )
    max_tokens: int = Field(default=32, ge=1, le=4096, description="Tokens of the answer.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class CanarySettings(Section):
    prompts: list[CanaryPrompt] = Field(
        default_factory=lambda: [CanaryPrompt(prompt="Say hello.", regex=r"\S")],
        description="Prompts a rolled-out model answers before it serves (greedy), each "
        "with a regex or a JSON schema its answer must match. Empty: no answer check.",
        json_schema_extra=LIVE,
    )
    min_relative_speed: float = Field(
        default=0.5, ge=0,
        description="Slowest decode speed of a rolled-out model in its canary, relative to "
        "the serving model's recent decode tokens/s (0: no speed check; skipped while the "
        "serving model has no recent figure).",
        json_schema_extra=LIVE,
    )


class FleetSettings(Section):
    group: str | None = Field(
        default=None, description="Fleet group: shared request topic and group configuration.",
        json_schema_extra=RESTART,
    )
    trusted_keys: list[Path] = Field(
        default_factory=list,
        description="Ed25519 public keys (PEM); when set, configuration pushes must be signed.",
        json_schema_extra=LIVE,
    )
    download_rate_kbps: float | None = Field(
        default=None, gt=0,
        description="Rate limit of a model artifact download, in kilobits per second "
        "(gateways share thin uplinks). Unset: as fast as the link goes.",
        json_schema_extra=LIVE,
    )
    keep_models: int = Field(
        default=2, ge=1,
        description="Model folders kept under <state_dir>/models after a rollout (the one "
        "serving and the most recently used before it, for an instant rollback); older "
        "ones are deleted.",
        json_schema_extra=LIVE,
    )
    canary: CanarySettings = Field(
        default_factory=CanarySettings,
        description="Health check of a rolled-out model before it serves.",
    )


class LimitsSettings(Section):
    max_queue: int = Field(
        default=32, ge=1, description="Requests waiting for a batch slot; beyond it: 429.",
        json_schema_extra=SCHEDULER,
    )
    max_prompt_tokens: int | Auto = Field(
        default="auto",
        description="Longest prompt accepted. auto: the context length less "
        "limits.min_output_tokens.",
        json_schema_extra=RELOAD,
    )
    min_output_tokens: int = Field(
        default=256, ge=1, description="Room kept for output when max_prompt_tokens is auto.",
        json_schema_extra=RELOAD,
    )
    default_max_tokens: int = Field(
        default=512, ge=1, description="max_tokens of a request that does not set it.",
        json_schema_extra=LIVE,
    )
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="Deadline of a request from its arrival; beyond it: 408.",
        json_schema_extra=LIVE,
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest HTTP request body accepted, declared or chunked; beyond it: 413.",
        json_schema_extra=RESTART,
    )
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="Largest HTTP request head (request line and headers); beyond it: 431, "
        "before more is read.",
        json_schema_extra=RESTART,
    )
    max_connections: int = Field(
        default=128,
        ge=1,
        description="HTTP connections served at once; a request on one more gets 503. Keep it "
        "well below the unit's LimitNOFILE.",
        json_schema_extra=RESTART,
    )
    guided_string_max_length: int = Field(
        default=256, ge=1, le=100_000,
        description="Longest string a guided JSON answer (tool arguments, response_format) "
        "may write where its schema sets no maxLength, pattern, format, enum or const: a "
        "small model can repeat characters until max_tokens. The guided_* caps are halved "
        "in turn (down to a floor) until the schema's longest answer fits max_tokens.",
        json_schema_extra=LIVE,
    )
    guided_number_digits: int = Field(
        default=15, ge=1, le=300,
        description="Digits before the point of a number in a guided JSON answer whose "
        "schema sets no minimum or maximum (15: every such integer is exact in a double).",
        json_schema_extra=LIVE,
    )
    guided_number_decimals: int = Field(
        default=6, ge=0, le=15,
        description="Digits after the point of a number in a guided JSON answer whose "
        "schema sets no multipleOf.",
        json_schema_extra=LIVE,
    )
    tool_relevance_gate: bool = Field(
        default=True,
        description="With tool_choice auto, answer in text, without the tools, a request "
        "that shares no word with the offered tools (their names, descriptions and "
        "parameters) and names no identifier (a word with _ or digits), nor does the "
        "assistant's turn it answers: a small model otherwise calls some tool, with "
        "invented arguments, for any request. false: the model always chooses.",
        json_schema_extra=LIVE,
    )
    guided_array_max_items: int = Field(
        default=16, ge=1, le=10_000,
        description="Items of an array in a guided JSON answer whose schema sets no "
        "maxItems.",
        json_schema_extra=LIVE,
    )


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged.",
        json_schema_extra=LIVE,
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="json: one JSON object a line (journald); console: for a terminal; "
        "auto: console on a terminal, json otherwise.",
        json_schema_extra=LIVE,
    )


class ProfileSettings(Section):
    """A named preset, chosen by a request's ``model`` field: ``edgeagent:<name>``."""

    description: str = Field(default="", description="What the profile is for.")
    system_prompt: str | None = Field(
        default=None, description="System message put first unless the request has one."
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Default temperature (0: greedy)."
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="Default top_p.")
    top_k: int | None = Field(default=None, ge=0, description="Default top_k (0: off).")
    repetition_penalty: float | None = Field(
        default=None, gt=0, description="Default repetition penalty."
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Default max_tokens.")


def _default_profiles() -> dict[str, ProfileSettings]:
    return {
        "reasoning": ProfileSettings(
            description="Step-by-step reasoning before the answer.",
            system_prompt="You are a careful assistant. Think step by step, then give the "
            "final answer on its own line.",
            temperature=0.6, top_p=0.95, max_tokens=1024,
        ),
        "math": ProfileSettings(
            description="Arithmetic and math word problems, deterministic.",
            system_prompt="You are a precise math assistant. Show the calculation, then the "
            "result.",
            temperature=0.0, max_tokens=512,
        ),
        "coding": ProfileSettings(
            description="Code generation and explanation.",
            system_prompt="You are an expert programmer. Answer with correct, idiomatic code "
            "and a short explanation.",
            temperature=0.2, top_p=0.95, max_tokens=1024,
        ),
    }


class Settings(BaseSettings):
    """Everything the daemon can be told."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEAGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        nested_model_default_partial_update=True,
        allow_inf_nan=False,
    )

    device_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="This gateway's name in topics and telemetry. Default: the hostname.",
        json_schema_extra=RESTART,
    )
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Models, the fleet overlay and spooled telemetry. Default: "
        "$STATE_DIRECTORY under systemd, ~/.local/share/edgeagent for a user.",
        json_schema_extra=RELOAD,
    )
    drain_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight work may finish.",
        json_schema_extra=LIVE,
    )
    stall_timeout_s: float = Field(
        default=120.0, ge=1, le=86400,
        description="The systemd watchdog is fed only while the scheduler has made progress "
        "(a step, or an idle wait) within this many seconds; longer than the slowest "
        "legitimate step (a prefill chunk of a full batch on a loaded host).",
        json_schema_extra=LIVE,
    )
    model: ModelSettings = Field(default_factory=ModelSettings, description="The model.")
    runtime: RuntimeSettings = Field(
        default_factory=RuntimeSettings, description="How the model runs on this machine."
    )
    socket: SocketSettings = Field(
        default_factory=SocketSettings, description="The local HTTP API."
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="The MQTT transport.")
    telemetry: TelemetrySettings = Field(
        default_factory=TelemetrySettings, description="Health telemetry upstream."
    )
    fleet: FleetSettings = Field(
        default_factory=FleetSettings, description="Fleet membership and configuration."
    )
    limits: LimitsSettings = Field(default_factory=LimitsSettings, description="Admission.")
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    profiles: dict[str, ProfileSettings] = Field(
        default_factory=_default_profiles,
        description="Named presets (system prompt and sampling), chosen with the request's "
        "model field, e.g. edgeagent:coding.",
        json_schema_extra=LIVE,
    )

    @field_validator("profiles", mode="before")
    @classmethod
    def _keep_builtin_profiles(cls, value: Any) -> Any:
        """Configured profiles add to (or replace by name) the built-in ones."""
        if isinstance(value, Mapping):
            builtin: dict[str, Any] = {
                k: v.model_dump(exclude_none=True) for k, v in _default_profiles().items()
            }
            return {**builtin, **value}
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over what load_settings() merged from TOML and the overlay.
        return (env_settings, init_settings)

    @property
    def models_dir(self) -> Path:
        return self.state_dir / "models"

    @property
    def model_path(self) -> Path:
        return self.model.path if self.model.path is not None else (
            self.models_dir / DEFAULT_MODEL_NAME
        )

    @property
    def overlay_path(self) -> Path:
        return self.state_dir / OVERLAY_FILE


def leaf_fields(
    model: type[BaseModel] = Settings, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo]]:
    """Every setting that is not a section, by dotted name (``runtime.threads``);
    ``profiles`` is one setting."""
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def liveness(info: FieldInfo) -> Liveness:
    """What a setting declares about when a change to it takes effect."""
    extra = info.json_schema_extra
    kind = extra.get("liveness") if isinstance(extra, dict) else None
    if kind not in LIVENESS:
        raise TypeError(f"setting {info.description!r} declares no liveness")
    return kind


def changed_settings(old: Settings, new: Settings) -> dict[Liveness, list[str]]:
    """The settings whose values differ between ``old`` and ``new``, by liveness: what
    applying ``new`` must do (a reload only for ``reload``, a restart for ``restart``)."""
    changed: dict[Liveness, list[str]] = {}
    for name, info in leaf_fields():
        if _dotted(old, name) != _dotted(new, name):
            changed.setdefault(liveness(info), []).append(name)
    return changed


def _dotted(settings: Settings, name: str) -> Any:
    value: Any = settings
    for part in name.split("."):
        value = getattr(value, part)
    return value


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` are ``(path, message)`` pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "; ".join(f"{path}: {msg}" for path, msg in errors)
        super().__init__(f"{source}: {lines}")


def error_paths(exc: ValidationError) -> list[tuple[str, str]]:
    """Turn a pydantic error into ``(dotted.path, message)`` pairs."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(root)"
        out.append((loc, err["msg"]))
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: ``null`` deletes, objects merge, anything else replaces."""
    if not isinstance(patch, Mapping):
        return patch
    result: dict[str, Any] = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", exc.strerror or str(exc))]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [("(toml)", str(exc))]) from exc


def read_overlay(path: Path) -> dict[str, Any]:
    """The persisted fleet overlay: ``{"version": N, "settings": {...}}``; absent: empty."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(str(path), [("(overlay)", str(exc))]) from exc
    settings = doc.get("settings", {}) if isinstance(doc, dict) else None
    if not isinstance(settings, dict):
        raise ConfigError(str(path), [("settings", "must be an object")])
    return settings


def _env_state_dir() -> str | None:
    return os.environ.get("EDGEAGENT_STATE_DIR")


def load_settings(
    config_path: Path | None = None,
    *,
    use_overlay: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the effective settings from every source (see the module docstring).

    ``config_path`` None means the default path, used only when it exists. ``overrides``
    are merged above the overlay, below the environment (the fleet uses it to validate a
    push in memory before persisting it).
    """
    if config_path is None:
        data = read_toml(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else {}
        source = str(DEFAULT_CONFIG_PATH)
    else:
        data = read_toml(config_path)
        source = str(config_path)
    if use_overlay:
        state_dir = _env_state_dir() or data.get("state_dir") or str(_default_state_dir())
        data = merge_patch(data, read_overlay(Path(state_dir) / OVERLAY_FILE))
    if overrides:
        data = merge_patch(data, overrides)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(source, error_paths(exc)) from exc


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest parent that exists: where a folder would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def read_secret(name: str, explicit: Path | None) -> str | None:
    """A secret from ``explicit`` or from systemd's ``$CREDENTIALS_DIRECTORY/<name>``."""
    path = explicit
    if path is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / name).is_file():
            path = Path(creds) / name
    if path is None:
        return None
    secret = path.read_text(encoding="utf-8").rstrip("\r\n")
    return secret or None  # an empty file (installed as a placeholder) is no secret
