"""edgeagent/oga.py: onnxruntime-genai through its C API, the model run without the GIL."""

from __future__ import annotations

import os
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
