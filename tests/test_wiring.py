"""End to end over the real model and socket: request fields that used to be accepted and
ignored now act (issue 11), through the serving interface and protocol's renderers."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from edgeagent.testing.daemon import uds_client
from tests.conftest import DaemonProc

pytestmark = pytest.mark.model

PROMPT = "The capital of France is"


@pytest.fixture
def http(api_daemon: DaemonProc) -> Iterator[httpx.Client]:
    with uds_client(api_daemon.socket_path) as client:
        yield client


def _complete(http: httpx.Client, **fields: object) -> httpx.Response:
    return http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3,
                                              "temperature": 0, **fields})


def test_echo_returns_the_prompt_then_the_completion(http: httpx.Client) -> None:
    plain = _complete(http).json()["choices"][0]["text"]
    echoed = _complete(http, echo=True).json()["choices"][0]["text"]
    assert echoed == PROMPT + plain


def test_echo_streams_the_prompt_first(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/completions",
                     json={"prompt": PROMPT, "max_tokens": 3, "echo": True,
                           "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert events[0]["choices"][0]["text"] == PROMPT
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
