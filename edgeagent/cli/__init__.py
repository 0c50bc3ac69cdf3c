"""The ``edgeagent`` command line: the only importer of the daemon (``run``, ``ask --local``).

Each command imports what it needs when it runs, so that the clients (``ask``, ``config
push``, ``doctor``) never load the model runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgeagent import __version__

EXIT_USAGE = 2


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", type=Path, default=None,
        help="TOML configuration file (default: /etc/edgeagent/edgeagent.toml when present)",
    )


def _settings(args: argparse.Namespace) -> Any:
    from edgeagent.settings import ConfigError, load_settings

    try:
        return load_settings(args.config)
    except ConfigError as exc:
        _print_config_errors(exc)
        raise SystemExit(EXIT_USAGE) from exc


def _print_config_errors(exc: Any) -> None:
    print(f"{exc.source}: invalid configuration", file=sys.stderr)
    for path, msg in exc.errors:
        print(f"  {path}: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    from edgeagent.daemon import run

    return run(args.config)


def cmd_plan(args: argparse.Namespace) -> int:
    from edgeagent.planner import ModelMeta, PlanError, plan
    from edgeagent.probe import probe

    settings = _settings(args)
    if not args.offline:
        running = _running_plan(settings.socket.path)
        if running is not None:
            return _print_running_plan(settings.socket.path, running, args.json)
    hw = probe(settings.runtime.probe_root)
    try:
        meta = ModelMeta.from_folder(settings.model_path)
        the_plan = plan(hw, meta, settings.runtime, settings.limits)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"source": "computed", "hardware": hw.to_dict(),
                          "model": str(settings.model_path), "plan": the_plan.to_dict()},
                         indent=2))
    else:
        print(f"model: {settings.model_path}")
        print(the_plan.describe())
    return 0


def _running_plan(socket_path: Path) -> dict[str, Any] | None:
    """The /health document of a daemon that answers on ``socket_path`` with a plan (it
    has loaded its model), else None. The plan a daemon runs is what matters on a running
    gateway: a configuration edited since, or memory its model now uses, plan otherwise."""
    from edgeagent.cli.ask import UnixHTTPConnection

    conn = UnixHTTPConnection(socket_path, timeout=5.0)
    try:
        conn.request("GET", "/health")
        doc = json.loads(conn.getresponse().read())
    except (OSError, ValueError):
        return None  # nobody listens (or not a daemon): compute the plan
    finally:
        conn.close()
    return doc if isinstance(doc, dict) and isinstance(doc.get("plan"), dict) else None


def _print_running_plan(socket_path: Path, health: dict[str, Any], as_json: bool) -> int:
    import dataclasses

    from edgeagent.planner import Plan

    model = (health.get("model") or {}).get("path")
    if as_json:
        print(json.dumps({"source": "daemon", "socket": str(socket_path), "model": model,
                          "plan": health["plan"]}, indent=2))
        return 0
    names = {f.name for f in dataclasses.fields(Plan)}
    the_plan = Plan(**{k: v for k, v in health["plan"].items() if k in names})
    print(f"a daemon is running on {socket_path} ({health.get('status')}); its plan "
          "(--offline: the plan this configuration would get):")
    print(f"model: {model}")
    print(the_plan.describe())
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from edgeagent.cli.ask import ask

    return ask(args)


def cmd_model_build(args: argparse.Namespace) -> int:
    from edgeagent.convert import build_model

    output = args.output
    if output is None:
        output = _settings(args).model_path if args.from_hf is None else None
    if output is None:
        print("error: --output is required with --from-hf", file=sys.stderr)
        return EXIT_USAGE
    try:
        build_model(output, from_hf=args.from_hf, force=args.force)
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_model_verify(args: argparse.Namespace) -> int:
    from edgeagent.manifest import ModelIntegrityError, verify_model

    path = args.path or _settings(args).model_path
    try:
        manifest = verify_model(path)
    except ModelIntegrityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: " + ("verified" if manifest else "no manifest (unverified)"))
    return 0


def cmd_model_pack(args: argparse.Namespace) -> int:
    from edgeagent.artifact import ArtifactError, pack

    out = args.output or Path(f"{args.path.resolve().name}.tar.gz")
    try:
        info = pack(args.path, out)
    except (ArtifactError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:  # the fields of a push's "model", but the URL
        print(json.dumps({"name": info.name, "sha256": info.sha256, "size": info.size,
                          "file": str(info.path)}))
    else:
        print(f"{info.path}: model {info.name}\nsha256 {info.sha256}\nsize {info.size}")
    return 0


#: ``config push`` flags that override an ``mqtt.*`` setting of ``--config``.
PUSH_MQTT_FLAGS = {"mqtt": "url", "topic_prefix": "topic_prefix", "username": "username",
                   "password_file": "password_file", "ca_file": "ca_file",
                   "cert_file": "cert_file", "key_file": "key_file"}


def cmd_config_push(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgeagent.cli.push import push_main
    from edgeagent.settings import MqttSettings

    settings = _settings(args)
    flags = {key: getattr(args, flag) for flag, key in PUSH_MQTT_FLAGS.items()
             if getattr(args, flag) is not None}
    try:  # validated as the daemon validates them (an empty topic prefix, ...)
        mqtt = MqttSettings.model_validate({**settings.mqtt.model_dump(), **flags})
    except ValidationError as exc:
        for err in exc.errors():
            print(f"error: mqtt.{'.'.join(map(str, err['loc']))}: {err['msg']}",
                  file=sys.stderr)
        return EXIT_USAGE
    if mqtt.url is None:
        print("error: no broker: give --mqtt URL, or mqtt.url in --config", file=sys.stderr)
        return EXIT_USAGE
    layer, target = ("group", args.group) if args.group is not None else ("device", args.device)
    return push_main(settings.model_copy(update={"mqtt": mqtt}), layer, target, args.file,
                     args.sign, args.timeout, args.watch)


def cmd_keygen(args: argparse.Namespace) -> int:
    from edgeagent.cli.push import keygen_main

    return keygen_main(args.prefix)


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgeagent.doctor import run_doctor

    return run_doctor(args.config)


def cmd_config_validate(args: argparse.Namespace) -> int:
    from edgeagent.settings import ConfigError, load_settings

    try:
        load_settings(args.file, use_overlay=False)
    except ConfigError as exc:
        _print_config_errors(exc)
        return EXIT_USAGE
    print(f"{args.file}: valid")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    doc = settings.model_dump(mode="json")
    doc["socket"]["mode"] = oct(settings.socket.mode)  # 0o660, as chmod and TOML write it
    print(json.dumps(doc, indent=2))
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from edgeagent.docs import settings_reference

    sys.stdout.write(settings_reference())
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeagent", description="An LLM daemon for IoT gateways."
    )
    parser.add_argument("--version", action="version", version=f"edgeagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="show how the running daemon sized itself (--offline: "
                       "how it would size itself on this machine)")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--offline", action="store_true",
                   help="compute the plan even when a daemon answers on the socket")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("ask", help="one-shot generation (through the daemon's socket)")
    _add_config(p)
    p.add_argument("prompt", help="the user message")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--model", default=None, help="model or profile, e.g. edgeagent:coding")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", type=Path, default=None, help="the daemon's Unix socket")
    where.add_argument("--local", action="store_true",
                       help="load the model in this process instead of asking the daemon")
    where.add_argument("--mqtt", default=None, metavar="URL", help="ask over MQTT")
    p.add_argument("--device", default=None, help="with --mqtt: the device id to ask")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("doctor", help="check this gateway's setup and list what to fix")
    _add_config(p)
    p.set_defaults(func=cmd_doctor)

    model = sub.add_parser("model", help="build and check models").add_subparsers(
        dest="model_command", required=True)
    p = model.add_parser("build", help="build the default INT4 model, or one from --from-hf")
    _add_config(p)
    p.add_argument("--from-hf", type=Path, default=None, metavar="DIR",
                   help="a local Hugging Face checkpoint to convert")
    p.add_argument("--output", type=Path, default=None,
                   help="model folder (default: the configured model path)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=cmd_model_build)
    p = model.add_parser("verify", help="check a model folder against its manifest")
    _add_config(p)
    p.add_argument("path", type=Path, nargs="?", default=None)
    p.set_defaults(func=cmd_model_verify)
    p = model.add_parser("pack", help="make one archive (tar.gz) of a verified model folder",
                         description="Archive a model folder that verifies against its "
                         "manifest, for a fleet push's model: its sha256 and size.")
    p.add_argument("path", type=Path, metavar="DIR", help="the model folder")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                   help="the archive (default: ./<folder name>.tar.gz)")
    p.add_argument("--json", action="store_true",
                   help='one JSON line: {"name", "sha256", "size", "file"}')
    p.set_defaults(func=cmd_model_pack)

    config = sub.add_parser("config", help="configuration tools").add_subparsers(
        dest="config_command", required=True)
    p = config.add_parser("validate", help="check a TOML file; print every error, exit 2")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_config_validate)
    p = config.add_parser("show", help="print the effective configuration")
    _add_config(p)
    p.set_defaults(func=cmd_config_show)
    p = config.add_parser("reference", help="print the configuration reference (markdown)")
    p.set_defaults(func=cmd_config_reference)
    p = config.add_parser("push", help="push a fleet configuration (retained) over MQTT",
                          description="Connect as the daemon does (the mqtt settings of "
                          "--config; each flag overrides one), publish the push retained and "
                          "wait for the broker's acknowledgement; with --device, wait for "
                          "the device's report.")
    _add_config(p)
    p.add_argument("--mqtt", default=None, metavar="URL",
                   help="mqtt://host:port or mqtts://host:port (default: mqtt.url)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="one gateway: waits for its report")
    target.add_argument("--group", help="every gateway of a fleet group")
    p.add_argument("file", type=Path, help='JSON: {"version": N, "settings": {...}}')
    p.add_argument("--sign", type=Path, default=None, metavar="KEYFILE",
                   help="Ed25519 private key (edgeagent keygen)")
    p.add_argument("--topic-prefix", default=None, help="default: mqtt.topic_prefix")
    p.add_argument("--username", default=None, help="default: mqtt.username")
    p.add_argument("--password-file", type=Path, default=None,
                   help="default: mqtt.password_file, else the credential mqtt_password")
    p.add_argument("--ca-file", type=Path, default=None, help="CA bundle for mqtts://")
    p.add_argument("--cert-file", type=Path, default=None, help="client certificate")
    p.add_argument("--key-file", type=Path, default=None, help="client key")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for each answer of the broker, and for the report")
    p.add_argument("--watch", action="store_true",
                   help="print each device's progress on this push (device, status, "
                   "download percent) as it changes, then the table: for --device until "
                   "it reports an outcome, for --group until no report for --timeout s")
    p.set_defaults(func=cmd_config_push)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing fleet pushes")
    p.add_argument("prefix", type=Path, help="writes PREFIX.key and PREFIX.pub")
    p.set_defaults(func=cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
