"""A rolled-out model's canary: health prompts answered by the new engine before it serves.

The root runs :func:`check` on the engine it just loaded, beside the one serving, and swaps
only when it passes (``fleet.canary``): every answer matches its regex, or is complete JSON
generated under its JSON schema (the engine's guidance does the shaping: no JSON-schema
validator at runtime), at a decode speed of at least ``min_relative_speed`` times the
serving model's recent figure.
"""

from __future__ import annotations

import json
import re
import time

from edgeagent.engine import Delta, Engine, Finish, Sampling
from edgeagent.settings import CanarySettings


def check(engine: Engine, settings: CanarySettings, baseline_tps: float | None) -> str | None:
    """Run the canary prompts on ``engine`` (a new one, not yet serving): None when every
    answer matches and its decode speed is at least ``min_relative_speed`` times
    ``baseline_tps`` (the serving model's recent figure; None or 0: no speed check), else
    why not."""
    speeds: list[float] = []
    for i, prompt in enumerate(settings.prompts):
        text, tps = _answer(engine, prompt.prompt, prompt.max_tokens,
                            ("json_schema", json.dumps(prompt.json_schema))
                            if prompt.json_schema is not None else None)
        if tps is not None:
            speeds.append(tps)
        if prompt.regex is not None and not re.search(prompt.regex, text):
            return f"prompt {i}: the answer {text[:200]!r} does not match {prompt.regex!r}"
        if prompt.json_schema is not None:
            try:  # the grammar shaped it; an answer cut short by max_tokens is not JSON
                json.loads(text)
            except ValueError:
                return f"prompt {i}: the answer {text[:200]!r} is not complete JSON"
    if baseline_tps and speeds and settings.min_relative_speed > 0:
        speed = sum(speeds) / len(speeds)
        if speed < settings.min_relative_speed * baseline_tps:
            return (f"decode speed {speed:.1f} tokens/s is below {settings.min_relative_speed}"
                    f" x the serving model's {baseline_tps:.1f} tokens/s")
    return None


def _answer(engine: Engine, prompt: str, max_tokens: int,
            guidance: tuple[str, str] | None) -> tuple[str, float | None]:
    """The greedy answer and its decode tokens/s (after the first token, as the scheduler
    measures it)."""
    tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
    parts: list[str] = []
    first: float | None = None
    for item in engine.generate(tokens, Sampling(max_tokens=max_tokens), guidance=guidance):
        if isinstance(item, Delta):
            parts.append(item.text)
            first = first or time.monotonic()
        elif isinstance(item, Finish):
            if item.reason == "error":
                raise RuntimeError(item.error)
            parts.append(item.tail)
            elapsed = time.monotonic() - first if first else 0.0
            tps = (item.completion_tokens - 1) / elapsed \
                if item.completion_tokens > 1 and elapsed > 0 else None
            return "".join(parts), tps
    return "".join(parts), None
