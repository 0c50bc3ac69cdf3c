"""edgeagent/oga.py: onnxruntime-genai through its C API, the model run without the GIL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeagent import oga

ONE_THREAD = {"model": {"decoder": {"session_options": {"intra_op_num_threads": 1}}}}


def test_a_refused_call_raises_with_the_library_s_message(tmp_path: Path) -> None:
    with pytest.raises(oga.OgaError, match=r"genai_config\.json"):
        oga.Model(tmp_path)


@pytest.mark.model
def test_another_thread_runs_while_the_model_runs(default_model: Path) -> None:
    """A prefill of 512 tokens on this thread (about a second of one core); another thread,
    released just before it, makes 50 system calls, each of which gives the GIL up and must
    take it back. With the GIL held for the whole call, as the package's binding holds it,
    the other thread could not finish before the call returns."""
    model = oga.Model(default_model, ONE_THREAD)
    params = oga.GeneratorParams(model)
    params.set_search_options(max_length=600, batch_size=1, do_sample=False)
    generator = oga.Generator(model, params)
    go, done = threading.Event(), threading.Event()

    def other() -> None:
        assert go.wait(60)
        for _ in range(50):
            os.stat("/")
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    go.set()
    generator.append_tokens(np.arange(1000, 1512, dtype=np.int32)[None, :])
    finished_during_the_call = done.is_set()
    thread.join(60)
    assert finished_during_the_call
    generator.generate_next_token()  # the generator is whole after it
    assert len(generator.get_sequence(0)) == 513
    assert generator.get_logits().shape == (1, 1, 49152)


EXIT_MID_STEP = """
import sys, threading
import numpy as np
from edgeagent import oga
model = oga.Model(sys.argv[1], {ONE_THREAD!r})
params = oga.GeneratorParams(model)
params.set_search_options(max_length=4000, batch_size=1, do_sample=False)
generator = oga.Generator(model, params)
running = threading.Event()

def decode() -> None:
    generator.append_tokens(np.arange(1000, 1100, dtype=np.int32)[None, :])
    while True:
        running.set()
        generator.generate_next_token()

threading.Thread(target=decode, daemon=True).start()
assert running.wait(60)
print("exiting", flush=True)
"""


@pytest.mark.model
def test_exiting_while_a_daemon_thread_decodes_frees_nothing_under_it(
        default_model: Path) -> None:
    """The interpreter exits while another thread is inside a model call (the GIL released,
    so nothing waits for it): the handles are freed once that call has returned, no new one
    starts, and the process ends cleanly with nothing reported leaked."""
    code = EXIT_MID_STEP.replace("{ONE_THREAD!r}", repr(ONE_THREAD))
    done = subprocess.run([sys.executable, "-c", code, str(default_model)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "exiting" in done.stdout
    assert "Leaked" not in done.stderr and "leak" not in done.stderr.lower(), done.stderr
