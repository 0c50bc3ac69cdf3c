#!/usr/bin/env python3
"""Function-calling evaluation against any OpenAI-compatible endpoint.

    .venv/bin/python scripts/eval_tools.py          # starts a daemon of its own (default model)
    .venv/bin/python scripts/eval_tools.py --socket /run/edgeagent/api.sock
    .venv/bin/python scripts/eval_tools.py --base-url http://127.0.0.1:8088/v1 \\
        --mode response_format --json peer.json --markdown peer.md
    .venv/bin/python scripts/eval_tools.py --compare a.json b.json --markdown both.md

Each case (scripts/eval_cases/tools.jsonl) offers some of the gateway tools of
scripts/eval_cases/tools.json and lists its accepted answers: one or more lists of calls
(order free), or none at all when no tool fits and the answer must be text.

Modes: ``tools`` sends OpenAI's ``tools`` and ``tool_choice`` and reads the answer's
``tool_calls``; ``response_format`` sends edgeagent's own tools system prompt and envelope
schema (``{"tool_calls": [...]}`` or ``{"content": ...}``) as a ``json_schema``
``response_format`` and parses the envelope itself: how a peer server fares on exactly what
edgeagent asks of the model. ``trained`` sends the tools prompt SmolLM2 was fine-tuned with
(``TRAINED_PROMPT``) and reads ``<tool_call>[...]</tool_call>`` from the text;
``trained_guided`` the same prompt with the list of calls held to the tools' schemas as a
``response_format``. A named ``tool_choice`` reaches the model only in ``tools`` and
``response_format`` modes.

Reported per category and overall: right function (the first call's name), right first
call (name and arguments), all right (every call, no extra), valid JSON, duplicate calls,
truncated (finish_reason length), envelope leaks (our envelope in the content), irrelevance
(no call when none fits), latency and completion tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES = REPO / "scripts" / "eval_cases" / "tools.jsonl"
TOOLS = REPO / "scripts" / "eval_cases" / "tools.json"
CATEGORIES = ("single", "multiple", "parallel", "irrelevance")
MODES = ("tools", "response_format", "trained", "trained_guided")


# -------------------------------------------------------------- judging
def value_ok(expected: Any, got: Any) -> bool:
    """One argument against its accepted value: ``{"$any": "string"}`` any non-empty
    string, ``{"$contains": [...]}`` a string holding one of them, ``{"$in": [...]}`` one
    of them; strings compare case-insensitively, numbers by value (not as strings)."""
    if isinstance(expected, dict) and "$any" in expected:
        return isinstance(got, str) and bool(got.strip())
    if isinstance(expected, dict) and "$contains" in expected:
        return isinstance(got, str) and any(s.lower() in got.lower()
                                            for s in expected["$contains"])
    if isinstance(expected, dict) and "$in" in expected:
        return any(value_ok(e, got) for e in expected["$in"])
    if isinstance(expected, str):
        return isinstance(got, str) and got.strip().lower() == expected.lower()
    if isinstance(expected, (int, float)):
        return (isinstance(got, (int, float)) and not isinstance(got, bool)
                and abs(got - expected) < 1e-9)
    return bool(expected == got)


def call_ok(expected: dict[str, Any], got: dict[str, Any]) -> bool:
    """Same name, the same argument names (an extra limit or option is a wrong call), each
    value accepted."""
    want, args = expected["arguments"], got.get("arguments")
    return (got.get("name") == expected["name"] and isinstance(args, dict)
            and set(args) == set(want) and all(value_ok(want[k], args[k]) for k in want))


def calls_ok(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> bool:
    """Every expected call once, in any order, and nothing else."""
    left = list(got)
    for e in expected:
        hit = next((g for g in left if call_ok(e, g)), None)
        if hit is None:
            return False
        left.remove(hit)
    return not left


@dataclass
class Outcome:
    """One case's answer, judged."""

    id: str
    category: str
    calls: list[dict[str, Any]]
    content: str | None
    finish_reason: str | None
    valid_json: bool
    latency_s: float
    completion_tokens: int
    error: str | None = None
    right_function: bool = False
    right_first_call: bool = False
    all_right: bool = False
    duplicates: bool = False
    leak: bool = False
    no_call: bool = False


def judge(case: dict[str, Any], o: Outcome) -> Outcome:
    accepted: list[list[dict[str, Any]]] = case["accepted"]
    # An answer in text: no call, and neither an error nor a broken answer (an envelope or
    # a <tool_call> cut by max_tokens is a call begun, not text).
    o.no_call = not o.calls and o.error is None and o.valid_json
    # our envelope in an answer read as text (a cut envelope is counted as truncated)
    o.leak = o.valid_json and '"tool_calls"' in (o.content or "")
    keys = [json.dumps([c.get("name"), c.get("arguments")], sort_keys=True) for c in o.calls]
    o.duplicates = len(keys) != len(set(keys))
    if not accepted:  # no tool fits: right when answered in text
        o.all_right = o.no_call and o.error is None
        return o
    if o.calls:
        first = o.calls[0]
        o.right_function = any(first.get("name") == c["name"] for a in accepted for c in a)
        o.right_first_call = any(call_ok(c, first) for a in accepted for c in a)
    o.all_right = any(calls_ok(a, o.calls) for a in accepted)
    return o


# -------------------------------------------------------------- asking
#: The tools prompt SmolLM2-Instruct was fine-tuned with (its function-calling data, as the
#: model's Ollama template renders it): the tools as a JSON list in <tools>, the answer a JSON
#: list of calls in <tool_call>, ``[]`` for none. Its Hugging Face chat template has no
#: ``tools`` branch, so only a prompt can ask for it.
TRAINED_PROMPT = """You are an expert in composing functions. You are given a question and \
a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the \
purpose.
If none of the functions can be used, point it out and refuse to answer.
If the given question lacks the parameters required by the function, also point it out.
You have access to the following tools:
<tools>{tools}</tools>
The output MUST strictly adhere to the following format, and NO other text MUST be included.
The example format is as follows. Please make sure the parameter type is correct. If no \
function call is needed, please make the tool calls an empty list '[]'.
<tool_call>[
{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},
(more tool calls as required)
]</tool_call>"""


def trained_request(tools: list[dict[str, Any]], messages: list[dict[str, Any]],
                    guided: bool) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The trained prompt; ``guided``: the list of calls held to the tools' schemas (the
    ``<tool_call>`` tags cannot be: a JSON schema starts at the list)."""
    listed = json.dumps([t["function"] for t in tools])
    system = {"role": "system", "content": TRAINED_PROMPT.format(tools=listed)}
    if not guided:
        return [system, *messages], None
    calls = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
        "required": ["name", "arguments"]} for t in tools]
    schema = {"type": "array", "items": {"anyOf": calls}, "maxItems": 4}
    return [system, *messages], {"type": "json_schema",
                                 "json_schema": {"name": "tool_calls", "schema": schema}}


def parse_trained(content: str) -> tuple[list[dict[str, Any]], str | None, bool]:
    """Calls from ``<tool_call>[...]</tool_call>`` (or a bare list); any other text is an
    answer without a call."""
    text = content.strip()
    start = text.find("<tool_call>")
    if start >= 0:
        body = text[start + len("<tool_call>"):].split("</tool_call>")[0]
    elif text.startswith("["):
        body = text
    else:
        return [], content, True
    try:
        calls = json.loads(body)
    except ValueError:
        return [], content, False
    if not isinstance(calls, list):
        return [], content, False
    ok = all(isinstance(c, dict) and isinstance(c.get("arguments"), dict) for c in calls)
    return [c for c in calls if isinstance(c, dict)], None, ok


def envelope_request(tools: list[dict[str, Any]], messages: list[dict[str, Any]],
                     tool_choice: Any, max_tokens: int
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """edgeagent's own tools system prompt and envelope schema for these tools, as the
    messages and ``response_format`` any server can be sent."""
    from edgeagent import protocol
    from edgeagent.settings import LimitsSettings

    req = protocol.ChatCompletionRequest.model_validate(
        {"model": "x", "messages": messages, "tools": tools, "tool_choice": tool_choice})
    guidance = protocol.tool_guidance(req, LimitsSettings(), max_tokens)
    assert guidance is not None  # tools are offered
    schema, offered, may_answer = guidance
    note = protocol._tools_system_prompt(offered, may_answer)
    fmt = {"type": "json_schema", "json_schema": {"name": "tool_envelope", "schema": schema}}
    return [{"role": "system", "content": note}, *messages], fmt


def parse_answer(choice: dict[str, Any], mode: str
                 ) -> tuple[list[dict[str, Any]], str | None, bool]:
    """(calls as {name, arguments}, content, valid JSON) from one choice."""
    msg = choice.get("message") or {}
    content = msg.get("content")
    if mode.startswith("trained"):
        return parse_trained(content or "")
    if mode == "response_format":
        try:
            doc = json.loads(content or "")
        except ValueError:
            return [], content, False
        if not isinstance(doc, dict):
            return [], content, False
        calls = doc.get("tool_calls")
        if isinstance(calls, list):
            ok = all(isinstance(c, dict) and isinstance(c.get("arguments"), dict)
                     for c in calls)
            return [c for c in calls if isinstance(c, dict)], None, ok
        return [], str(doc.get("content", "")), "content" in doc
    calls, valid = [], True
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "")
        except ValueError:
            args, valid = fn.get("arguments"), False
        valid = valid and isinstance(args, dict)
        calls.append({"name": fn.get("name"), "arguments": args})
    return calls, content, valid


def request_body(case: dict[str, Any], tools: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Any]:
    """The chat completion request for one case in ``args.mode``: OpenAI's ``tools`` and
    ``tool_choice`` in ``tools`` mode only (after ``args.system`` as a system message, if
    given); the other modes carry their own system prompt (and schema) and no ``tools``."""
    offered = [tools[name] for name in case["tools"]]
    messages = case["messages"]
    choice = case.get("tool_choice", "auto")
    body: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.mode == "response_format":
        body["messages"], body["response_format"] = envelope_request(offered, messages, choice,
                                                                args.max_tokens)
    elif args.mode.startswith("trained"):
        if isinstance(choice, dict):  # a named function: the prompt offers it alone
            offered = [t for t in offered if t["function"]["name"] == choice["function"]["name"]]
        body["messages"], fmt = trained_request(offered, messages, args.mode == "trained_guided")
        if fmt is not None:
            body["response_format"] = fmt
    else:
        if args.system is not None:
            messages = [{"role": "system", "content": args.system}, *messages]
        body.update(messages=messages, tools=offered, tool_choice=choice)
    if args.schema_as_json_object and "response_format" in body:
        # llama-cpp-python's server takes a schema only as {"type": "json_object", "schema"}
        body["response_format"] = {"type": "json_object",
                                   "schema": body["response_format"]["json_schema"]["schema"]}
    return body


def ask(client: httpx.Client, case: dict[str, Any], tools: dict[str, Any],
        args: argparse.Namespace) -> Outcome:
    body = request_body(case, tools, args)
    start = time.perf_counter()
    try:
        r = client.post("chat/completions", json=body)
        latency = time.perf_counter() - start
        r.raise_for_status()
        data = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        detail = getattr(getattr(exc, "response", None), "text", "")
        return judge(case, Outcome(case["id"], case["category"], [], None, None, False,
                                   time.perf_counter() - start, 0,
                                   error=f"{exc} {detail}"[:300]))
    first = data["choices"][0]
    calls, content, valid = parse_answer(first, args.mode)
    tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    return judge(case, Outcome(case["id"], case["category"], calls, content,
                               first.get("finish_reason"), valid, latency, tokens))


# -------------------------------------------------------------- reporting
def rate(rows: list[Outcome], flag: str) -> float | None:
    return round(sum(bool(getattr(r, flag)) for r in rows) / len(rows), 3) if rows else None


def summary(rows: list[Outcome]) -> dict[str, Any]:
    """The figures for a set of answers. Valid JSON counts the answers not cut by
    ``max_tokens`` (a cut answer cannot be whole); the call rates count the cases where a
    tool fits, irrelevance those where none does."""
    fits = [r for r in rows if r.category != "irrelevance"]
    none_fits = [r for r in rows if r.category == "irrelevance"]
    whole = [r for r in rows if r.finish_reason != "length" and r.error is None]
    wall = sum(r.latency_s for r in rows)
    return {
        "cases": len(rows),
        "right_function": rate(fits, "right_function"),
        "right_first_call": rate(fits, "right_first_call"),
        "all_right": rate(rows, "all_right"),
        "irrelevance": rate(none_fits, "no_call"),
        "valid_json": rate(whole, "valid_json"),
        "duplicates": rate(rows, "duplicates"),
        "truncated": round(sum(r.finish_reason == "length" for r in rows) / len(rows), 3)
        if rows else None,
        "leaks": sum(r.leak for r in rows),
        "errors": sum(r.error is not None for r in rows),
        "latency_p50_s": round(statistics.median(r.latency_s for r in rows), 3)
        if rows else None,
        "tokens_per_s": round(sum(r.completion_tokens for r in rows) / wall, 1)
        if wall else None,
    }


def report(rows: list[Outcome]) -> dict[str, Any]:
    groups = {c: [r for r in rows if r.category == c] for c in CATEGORIES}
    return {"all": summary(rows),
            **{c: summary(g) for c, g in groups.items() if g}}


METRICS = ("right_function", "right_first_call", "all_right", "irrelevance", "valid_json",
           "duplicates", "truncated", "leaks", "errors", "latency_p50_s", "tokens_per_s")


def markdown(results: list[dict[str, Any]]) -> str:
    """One table per category: a row per metric, a column per run."""
    out = []
    for group in ("all", *CATEGORIES):
        present = [r for r in results if group in r["summary"]]
        if not present:
            continue
        n = present[0]["summary"][group]["cases"]
        out.append(f"### {group} ({n} cases)\n")
        out.append("| metric | " + " | ".join(r["label"] for r in present) + " |")
        out.append("|---|" + "---|" * len(present))
        for m in METRICS:
            cells = [r["summary"][group].get(m) for r in present]
            if all(c is None for c in cells):
                continue
            out.append(f"| {m} | " + " | ".join("-" if c is None else str(c)
                                                for c in cells) + " |")
        out.append("")
    return "\n".join(out)


# -------------------------------------------------------------- endpoints
@contextmanager
def endpoint(args: argparse.Namespace) -> Iterator[httpx.Client]:
    """A client of the endpoint: our socket, a base URL, or a daemon started for the run."""
    timeout = httpx.Timeout(args.timeout)
    if args.base_url:
        with httpx.Client(base_url=args.base_url.rstrip("/") + "/", timeout=timeout) as c:
            yield c
        return
    if args.socket:
        with httpx.Client(transport=httpx.HTTPTransport(uds=args.socket),
                          base_url="http://localhost/v1/", timeout=timeout) as c:
            yield c
        return
    from edgeagent.settings import DEFAULT_MODEL_NAME, Settings
    from edgeagent.testing.daemon import running_daemon

    model = args.model_path or Settings().models_dir / DEFAULT_MODEL_NAME
    with tempfile.TemporaryDirectory(prefix="ea-eval-", dir="/tmp") as work, \
            running_daemon(Path(work), model, args.daemon_toml) as d, \
            httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                         base_url="http://localhost/v1/", timeout=timeout) as c:
        yield c


def load_cases(path: Path, ids: list[str] | None, limit: int | None,
               every: int = 1) -> list[dict[str, Any]]:
    cases = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cases = cases[::every]
    if ids:
        cases = [c for c in cases if c["id"] in ids]
    return cases[:limit] if limit else cases


def run(args: argparse.Namespace) -> dict[str, Any]:
    tools = json.loads(args.tools.read_text())
    cases = load_cases(args.cases, args.ids, args.limit, args.every)
    rows: list[Outcome] = []
    with endpoint(args) as client:
        for case in cases:
            rows.append(ask(client, case, tools, args))
            if args.verbose:
                r = rows[-1]
                print(f"{r.id}: {'ok ' if r.all_right else 'BAD'} {r.finish_reason} "
                      f"{json.dumps(r.calls)[:160]} {(r.content or '')[:60]!r} "
                      f"{r.error or ''}", file=sys.stderr)
    return {"label": args.label, "mode": args.mode, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "endpoint": args.base_url or args.socket
            or str(args.model_path or "default model"), "every": args.every,
            "schema_as_json_object": args.schema_as_json_object, "system": args.system,
            "summary": report(rows),
            "cases": [asdict(r) for r in rows]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--socket", help="edgeagent's Unix socket")
    where.add_argument("--base-url", help="an OpenAI-compatible base URL, e.g. "
                       "http://127.0.0.1:8088/v1")
    where.add_argument("--compare", nargs="+", type=Path, metavar="JSON",
                       help="no run: put earlier results side by side (--markdown)")
    ap.add_argument("--model-path", type=Path, help="without --socket or --base-url: the "
                    "model the daemon started for the run serves (default: the default model)")
    ap.add_argument("--daemon-toml", default="", help="extra TOML for that daemon")
    ap.add_argument("--mode", choices=MODES, default="tools")
    ap.add_argument("--model", default="edgeagent", help="the request's model field")
    ap.add_argument("--schema-as-json-object", action="store_true", help="send a schema as "
                    "{type: json_object, schema} (llama-cpp-python's server)")
    ap.add_argument("--system", help="in tools mode, a system message before each case's "
                    "messages (llama-cpp-python's chatml-function-calling lists the tools "
                    "only inside a system message)")
    ap.add_argument("--cases", type=Path, default=CASES)
    ap.add_argument("--tools", type=Path, default=TOOLS)
    ap.add_argument("--ids", nargs="+", help="only these case ids")
    ap.add_argument("--limit", type=int, help="only the first N cases")
    ap.add_argument("--every", type=int, default=1, help="every Nth case (a quick sample "
                    "that keeps each category's share)")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=lambda s: None if s == "server" else float(s),
                    default=0.0, help="a number, or 'server' to send none (its default)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--label", default=None, help="the run's name in the tables")
    ap.add_argument("--json", type=Path, help="write the results (and every answer) here")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per case")
    args = ap.parse_args(argv)
    if args.label is None:
        args.label = f"{args.base_url or 'edgeagent'} {args.mode}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from edgeagent.testing.daemon import exit_on_sigterm

    exit_on_sigterm()  # the daemon started for the run is stopped on the way out
    if args.compare:
        results = [json.loads(p.read_text()) for p in args.compare]
    else:
        results = [run(args)]
        if args.json:
            args.json.write_text(json.dumps(results[0], indent=1) + "\n")
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
