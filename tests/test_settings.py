"""Settings: precedence of sources, strict validation, secrets, `config validate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.docs import settings_reference
from edgeagent.settings import (
    ConfigError,
    Settings,
    load_settings,
    merge_patch,
    read_secret,
)


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "edgeagent.toml"
    path.write_text(body)
    return path


def test_defaults_are_auto_and_documented() -> None:
    s = Settings()
    assert s.runtime.threads == "auto"
    assert s.runtime.context_length == "auto"
    assert s.runtime.max_batch == "auto"
    assert s.mqtt.topic_prefix == "edgeagent"
    assert s.mqtt.url is None
    assert s.device_id


def test_every_field_has_a_description() -> None:
    ref = settings_reference()
    for line in ref.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented: {line}"
    for name in ("device_id", "state_dir", "model.path", "runtime.threads",
                 "runtime.context_length", "runtime.max_batch", "socket.path", "mqtt.url",
                 "mqtt.topic_prefix", "telemetry.interval_s", "fleet.group",
                 "limits.max_queue", "limits.max_prompt_tokens"):
        assert f"| `{name}` |" in ref


def test_precedence_defaults_toml_overlay_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "st"
    state.mkdir()
    monkeypatch.setenv("EDGEAGENT_STATE_DIR", str(state))
    cfg = _toml(tmp_path, """
device_id = "from-toml"
[runtime]
threads = 1
context_length = 1024
[limits]
max_queue = 5
[telemetry]
interval_s = 10
""")
    s = load_settings(cfg)
    assert (s.device_id, s.runtime.threads, s.limits.max_queue) == ("from-toml", 1, 5)

    (state / "fleet-overlay.json").write_text(json.dumps(
        {"version": 3, "settings": {"runtime": {"threads": 2}, "telemetry": {"interval_s": 5}}}))
    s = load_settings(cfg)
    assert s.runtime.threads == 2  # overlay beats TOML
    assert s.runtime.context_length == 1024  # merged, not replaced
    assert s.telemetry.interval_s == 5

    monkeypatch.setenv("EDGEAGENT_RUNTIME__THREADS", "3")
    monkeypatch.setenv("EDGEAGENT_DEVICE_ID", "from-env")
    s = load_settings(cfg)
    assert s.runtime.threads == 3  # environment beats everything
    assert s.device_id == "from-env"
    assert s.runtime.context_length == 1024
    assert s.telemetry.interval_s == 5


def test_unknown_and_wrong_fields_report_their_paths(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, """
colour = "blue"
[runtime]
threads = "many"
[mqtt]
keepalive_s = 1
""")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    paths = {p for p, _ in info.value.errors}
    assert "colour" in paths
    assert any(p.startswith("runtime.threads") for p in paths)
    assert "mqtt.keepalive_s" in paths


def test_malformed_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="toml"):
        load_settings(_toml(tmp_path, "[runtime\nthreads = 2"))


def test_corrupt_overlay_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEAGENT_STATE_DIR", str(tmp_path))
    (tmp_path / "fleet-overlay.json").write_text("{not json")
    with pytest.raises(ConfigError, match="overlay"):
        load_settings(_toml(tmp_path, ""))


def test_merge_patch_rfc7386() -> None:
    assert merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}}) == {
        "a": 1, "b": {"d": 3, "e": 4}}
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}


def test_secret_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_secret("mqtt_password", None) is None
    (tmp_path / "mqtt_password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret("mqtt_password", None) == "s3cret"
    explicit = tmp_path / "other"
    explicit.write_text("explicit")
    assert read_secret("mqtt_password", explicit) == "explicit"


def test_config_validate_command(tmp_path: Path) -> None:
    bad = _toml(tmp_path, '[runtime]\nthreads = 0.5\nbogus = 1\n[limits]\nmax_queue = 0\n')
    res = subprocess.run([sys.executable, "-m", "edgeagent", "config", "validate", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "runtime.bogus" in res.stderr
    assert "limits.max_queue" in res.stderr
    assert "runtime.threads" in res.stderr

    good = tmp_path / "good.toml"
    good.write_text((Path(__file__).parent.parent / "configs" / "edgeagent.toml").read_text())
    res = subprocess.run([sys.executable, "-m", "edgeagent", "config", "validate", str(good)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_configuration_reference_is_up_to_date() -> None:
    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == settings_reference(), (
        "docs/configuration.md is stale: run `edgeagent config reference > "
        "docs/configuration.md`")


def test_reference_prints_only_file_modes_in_octal() -> None:
    from edgeagent.docs import settings_reference

    rows = {line.split("|")[1].strip(" `"): line for line in settings_reference().splitlines()
            if line.startswith("| `")}
    assert "`0o660`" in rows["socket.mode"]
    assert "`256`" in rows["limits.guided_string_max_length"]  # "mode" is in its description
    assert "`2`" in rows["fleet.keep_models"]
