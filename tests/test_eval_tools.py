"""scripts/eval_tools.py: its judging over plain data, then the script itself, run as a user
runs it, against the daemon as a subprocess on the real default model over its socket."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from scripts.eval_tools import CASES, TOOLS, Outcome, judge, load_cases, parse_args, request_body
from tests.conftest import REPO, DaemonProc


def outcome(calls: list[dict[str, Any]], category: str = "single",
            content: str | None = None) -> Outcome:
    return Outcome("t", category, calls, content, "tool_calls", True, 0.1, 10)


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


VALVE = {"accepted": [[call("set_valve", valve_id="valve_3", position_percent=50)]]}


# ------------------------------------------------------------------ judging
def test_the_cases_are_enough_and_each_has_an_answer() -> None:
    cases = load_cases(CASES, None, None)
    assert len(cases) >= 150
    assert len({c["id"] for c in cases}) == len(cases)
    by = {c["category"] for c in cases}
    assert by == {"single", "multiple", "parallel", "irrelevance"}
    tools = json.loads((REPO / "scripts" / "eval_cases" / "tools.json").read_text())
    for c in cases:
        assert set(c["tools"]) <= set(tools), c["id"]
        assert (c["accepted"] == []) == (c["category"] == "irrelevance"), c["id"]
        for answer in c["accepted"]:
            assert {x["name"] for x in answer} <= set(c["tools"]), c["id"]


def test_a_call_is_right_only_with_its_arguments_and_nothing_more() -> None:
    right = judge(VALVE, outcome([call("set_valve", valve_id="VALVE_3 ", position_percent=50)]))
    assert right.right_first_call and right.all_right
    as_text = judge(VALVE, outcome([call("set_valve", valve_id="valve_3",
                                         position_percent="50")]))
    assert as_text.right_function and not as_text.right_first_call
    extra = judge(VALVE, outcome([call("set_valve", valve_id="valve_3", position_percent=50,
                                       speed=1)]))
    assert not extra.right_first_call
    wrong = judge(VALVE, outcome([call("set_actuator", device_id="valve_3", state="on")]))
    assert not wrong.right_function


def test_parallel_calls_in_any_order_and_repeats_flagged() -> None:
    case = {"accepted": [[call("read_sensor", sensor_id="a"), call("read_sensor", sensor_id="b")]]}
    swapped = judge(case, outcome([call("read_sensor", sensor_id="b"),
                                   call("read_sensor", sensor_id="a")], "parallel"))
    assert swapped.all_right and not swapped.duplicates
    repeated = judge(case, outcome([call("read_sensor", sensor_id="a")] * 2, "parallel"))
    assert repeated.duplicates and not repeated.all_right and repeated.right_first_call


def test_no_tool_fits_is_right_in_text_and_a_leak_is_seen() -> None:
    case: dict[str, Any] = {"accepted": []}
    assert judge(case, outcome([], "irrelevance", "Paris.")).all_right
    assert not judge(case, outcome([call("read_sensor", sensor_id="x")], "irrelevance")
                     ).all_right
    assert judge(case, outcome([], "irrelevance", '{"tool_calls":[{"na')).leak
    failed = outcome([], "irrelevance")
    failed.error = "timed out"
    assert not judge(case, failed).no_call and not judge(case, failed).all_right
    cut = Outcome("t", "irrelevance", [], '{"tool_calls": [{"name": "read_se', "length",
                  False, 0.1, 128)
    assert not judge(case, cut).no_call and not judge(case, cut).all_right


# ------------------------------------------------------------------ the requests
def test_each_mode_sends_its_own_prompt_and_only_tools_mode_sends_tools() -> None:
    case = next(c for c in load_cases(CASES, None, None) if c["id"] == "single-001")
    tools = json.loads(TOOLS.read_text())
    url = ["--base-url", "http://127.0.0.1:1/v1", "--max-tokens", "64"]

    native = request_body(case, tools, parse_args([*url, "--mode", "tools"]))
    assert native["messages"] == case["messages"]
    assert [t["function"]["name"] for t in native["tools"]] == case["tools"]
    assert "response_format" not in native and native["temperature"] == 0.0

    with_system = request_body(case, tools, parse_args([*url, "--system", "Be brief."]))
    assert with_system["messages"] == [{"role": "system", "content": "Be brief."},
                                       *case["messages"]]

    ours = request_body(case, tools, parse_args([*url, "--mode", "response_format"]))
    assert "tools" not in ours and "tool_choice" not in ours
    assert ours["messages"][0]["role"] == "system"
    assert "tool_calls" in ours["messages"][0]["content"]
    assert ours["messages"][1:] == case["messages"]
    assert ours["response_format"]["type"] == "json_schema"
    schema = ours["response_format"]["json_schema"]["schema"]

    as_object = request_body(case, tools, parse_args(
        [*url, "--mode", "response_format", "--schema-as-json-object",
         "--temperature", "server"]))
    assert as_object["response_format"] == {"type": "json_object", "schema": schema}
    assert "tools" not in as_object and "temperature" not in as_object

    trained = request_body(case, tools, parse_args([*url, "--mode", "trained"]))
    assert "tools" not in trained and "response_format" not in trained
    assert "<tools>" in trained["messages"][0]["content"]


# ------------------------------------------------------------------ the script, on the daemon
#: One of each kind, and a named tool_choice (the model once called it four times over).
IDS = ["single-001", "single-055", "multiple-002", "parallel-001", "irrelevance-001"]


def test_eval_script_against_the_daemon(start_daemon: Any, tmp_path: Path) -> None:
    d: DaemonProc = start_daemon()
    d.wait_ready()
    out = tmp_path / "eval.json"
    md = tmp_path / "eval.md"
    subprocess.run([sys.executable, str(REPO / "scripts" / "eval_tools.py"),
                    "--socket", str(d.socket_path), "--ids", *IDS, "--max-tokens", "96",
                    "--json", str(out), "--markdown", str(md)],
                   check=True, timeout=120, capture_output=True, text=True)
    result = json.loads(out.read_text())
    rows = {r["id"]: r for r in result["cases"]}
    assert set(rows) == set(IDS)
    assert all(r["error"] is None and r["latency_s"] > 0 and r["completion_tokens"] > 0
               for r in rows.values()), rows
    overall = result["summary"]["all"]
    # The targets of issue 15 that do not depend on the model's skill: every answer whole
    # and valid, no call twice, our envelope never in the content.
    assert overall["valid_json"] == 1.0, rows
    # no call cut (a text answer may run to the caller's max_tokens: prose, not an envelope)
    assert all(r["finish_reason"] != "length" for r in rows.values()
               if r["category"] != "irrelevance"), rows
    assert rows["irrelevance-001"]["no_call"], rows  # the relevance gate: a joke is text
    assert overall["duplicates"] == 0.0, rows
    assert overall["leaks"] == 0, rows
    named = rows["single-055"]["calls"]  # tool_choice names read_sensor: called once
    assert [c["name"] for c in named] == ["read_sensor"], named
    for group in ("single", "multiple", "parallel", "irrelevance"):
        assert result["summary"][group]["cases"] >= 1
    assert "| right_first_call |" in md.read_text()


@pytest.mark.timeout(300)
def test_a_terminated_eval_stops_the_daemon_it_started(default_model: Path) -> None:
    """SIGTERM (a CI timeout, ``kill``) to a run with a daemon of its own leaves no daemon
    behind."""
    with subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "eval_tools.py"), "-v", "--max-tokens",
             "8", "--model-path", str(default_model)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) as script:
        try:
            assert script.stderr is not None
            for line in script.stderr:  # a case answered: the daemon is up
                if line.startswith("single-001:"):
                    break
            daemons = psutil.Process(script.pid).children(recursive=True)
            assert daemons
            script.terminate()
            assert script.wait(120) == 128 + signal.SIGTERM
            _, alive = psutil.wait_procs(daemons, timeout=60)
            assert not alive
        finally:
            script.kill()
