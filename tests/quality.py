"""Model quality over fixed prose, shared by the model build's tests: perplexity of a
model folder with onnxruntime-genai, one token a step."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Fixed English prose for the perplexity checks (the repository's docs change).
GATEWAY_TEXT = (
    'A gateway sits between the sensors of a building and the network that reaches the rest '
    'of the world. Every few seconds it reads the temperature of the boiler, the pressure in '
    'the pipes, the level of water in the tanks and the amount of carbon dioxide in the '
    'offices. It keeps the last values in memory, sends a summary upstream once a minute, and '
    'raises an alarm when a value crosses a threshold that the operator has set. When the '
    'connection to the cloud is lost, the gateway goes on working on its own: it stores what '
    'it could not send and sends it later, in order, once the link is back. The people who '
    'run thousands of such devices care about a few simple things. The device must start by '
    'itself after a power cut. It must never fill its disk, never run out of memory, and '
    'never stop answering because one request was malformed. An update must be safe to roll '
    'out to every site at once, and easy to roll back when something goes wrong. Logs must '
    'say what happened without drowning the operator in noise. A small language model on the '
    'gateway changes what the device can do. Instead of a fixed set of rules, a technician '
    'can ask in plain words why the pump in the basement started three times in the last '
    'hour, and the model can read the recent values, call the right functions and answer in a '
    'sentence. The model must be small enough to run on two cores and a few hundred megabytes '
    'of memory, and fast enough that an answer arrives before the technician loses patience.'
)


def perplexity(folder: Path, text: str = GATEWAY_TEXT, tokens: int = 256) -> float:
    """Perplexity of the model in ``folder`` on the first ``tokens`` tokens of ``text``."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    ids = np.array(og.Tokenizer(model).encode(text)[:tokens], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(model, params)
    nll = 0.0
    for i, token in enumerate(ids[:-1]):
        generator.append_tokens(np.array([token], dtype=np.int32))
        logits = np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1)
        logits -= logits.max()
        nll -= logits[ids[i + 1]] - np.log(np.exp(logits).sum())
    return float(np.exp(nll / (len(ids) - 1)))
