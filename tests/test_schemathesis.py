"""Property-based requests generated from the daemon's own /openapi.json (bounded)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.broker import free_port
from tests.conftest import DaemonProc, _reap, launch_daemon

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tcp_daemon(tmp_path_factory: pytest.TempPathFactory, default_model: Path
               ) -> Iterator[tuple[DaemonProc, int]]:
    """A daemon with the optional loopback TCP listener on, for schemathesis' HTTP client."""
    sockdir = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    port = free_port()
    d = launch_daemon(tmp_path_factory.mktemp("st"), sockdir, default_model,
                      "[runtime]\ncontext_length = 1024\n"
                      "[limits]\nrequest_timeout_s = 2\ndefault_max_tokens = 8\n",
                      socket_toml=f'tcp_port = {port}\n')
    d.wait_ready()
    yield d, port
    _reap(d)
    shutil.rmtree(sockdir, ignore_errors=True)


def test_generated_requests_get_no_server_error(tcp_daemon: tuple[DaemonProc, int]) -> None:
    d, port = tcp_daemon
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        check()
        assert d.proc.poll() is None, f"the daemon died on {op.path}"
