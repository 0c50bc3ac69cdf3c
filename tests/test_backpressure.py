"""Backpressure that clients can follow: 429 (queue full) and 503 (memory guard) carry
``Retry-After``, whole seconds from the queue's recent drain rate and the position a new
request would have, and the official ``openai`` client, which honours it, gets every call
through a small queue with its default retries. The daemon as a subprocess."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from edgeagent.testing.fake_proc import fake_machine
from tests.broker import Broker, requester
from tests.conftest import DaemonProc
from tests.test_api_limits import _wait

pytestmark = pytest.mark.model

#: One sequence at a time and one waiting: the third concurrent request is refused.
TIGHT = "[runtime]\nmax_batch = 1\ncontext_length = 1024\n[limits]\nmax_queue = 1\n"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def _sdk(d: DaemonProc, **kw: Any) -> openai.OpenAI:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)), timeout=120)
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http,
                         **kw)


def _retry_after(headers: Mapping[str, str]) -> int:
    value = headers.get("retry-after")
    assert value is not None and value.isdigit(), f"no Retry-After in {dict(headers)}"
    return int(value)


def _post(d: DaemonProc, body: dict[str, Any]) -> None:
    with d.client() as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_queue_full_429_carries_retry_after(start_daemon: Any) -> None:
    d: DaemonProc = start_daemon(extra_toml=TIGHT)
    d.wait_ready()
    long = {"messages": HI, "max_tokens": 900, "min_tokens": 900, "stream": True}
    with d.client() as client, d.client() as other, client.stream(
            "POST", "/v1/chat/completions", json=long) as running:
        # Kept: a discarded line iterator closes the connection, which cancels.
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        _wait(other, "active_sequences", 1)  # it runs: the one batch slot is taken
        waiting = threading.Thread(target=_post, args=(d, {"messages": HI, "max_tokens": 2}))
        waiting.start()
        _wait(client, "queue_depth", 1)  # and the one place in the queue
        with _sdk(d, max_retries=0) as sdk, pytest.raises(openai.RateLimitError) as refused:
            sdk.chat.completions.create(model="edgeagent", messages=HI, max_tokens=2)
        assert 1 <= _retry_after(refused.value.response.headers) <= 60
    waiting.join(120)  # closing the stream cancelled the long one: the waiting one ran


def test_sdk_default_retries_get_every_call_through(start_daemon: Any) -> None:
    """Ten concurrent calls, room for two: the refused ones come back when told to, spread
    out (each refusal counts the ones told to come back before it), and all succeed."""
    d: DaemonProc = start_daemon(extra_toml=TIGHT)
    d.wait_ready()

    def call(sdk: openai.OpenAI) -> str:
        done = sdk.chat.completions.create(model="edgeagent", messages=HI, max_tokens=24,
                                           extra_body={"min_tokens": 24})
        return done.choices[0].finish_reason

    with _sdk(d) as sdk, ThreadPoolExecutor(10) as pool:  # the SDK's default: 2 retries
        reasons = list(pool.map(call, [sdk] * 10))
    assert reasons == ["length"] * 10
    with d.client() as client:
        serving = client.get("/health").json()["serving"]
    assert serving["rejected"].get("queue_full", 0) > 0  # the retries were needed
    assert serving["completed"] == 10


def test_memory_guard_503_carries_retry_after(start_daemon: Any, tmp_path: Path) -> None:
    root = tmp_path / "machine"
    fake_machine(root, 4096 * 2**20)
    d: DaemonProc = start_daemon(extra_toml=(
        f'[runtime]\nprobe_root = "{root}"\ncontext_length = 1024\nmemory_headroom_mb = 256\n'))
    d.wait_ready()
    fake_machine(root, 100 * 2**20)  # below the 256 MB headroom
    with _sdk(d, max_retries=0) as sdk, pytest.raises(openai.InternalServerError) as refused:
        sdk.chat.completions.create(model="edgeagent", messages=HI, max_tokens=2)
    assert refused.value.status_code == 503
    assert 1 <= _retry_after(refused.value.response.headers) <= 60


@pytest.mark.broker
def test_mqtt_queue_full_reply_carries_retry_after(start_daemon: Any, broker: Broker) -> None:
    """MQTT has no headers: the error object of the reply carries ``retry_after``."""
    d: DaemonProc = start_daemon(extra_toml=f'{TIGHT}[mqtt]\nurl = "{broker.url}"\n')
    d.wait_ready()
    body = {"messages": HI, "max_tokens": 200, "min_tokens": 200}
    with requester(broker) as r, d.client() as client:
        # One runs, one waits, one is refused.
        for i, (key, value) in enumerate((("active_sequences", 1), ("queue_depth", 1))):
            r.request(f"edgeagent/{d.device_id}/request", body, correlation=b"%d" % i)
            _wait(client, key, value)
        r.request(f"edgeagent/{d.device_id}/request", body, correlation=b"2")
        errors = [doc["error"] for doc in (r.get()[1] for _ in range(3)) if "error" in doc]
    assert [e["code"] for e in errors] == ["queue_full"]
    assert 1 <= errors[0]["retry_after"] <= 60
