"""Prompts the tests and scripts share."""

from __future__ import annotations


def system_prompt(topic: str, sensors: int) -> str:
    """Gateway instructions: sensors and what to do with them (28 sensors: about 1,000
    tokens; 40: about 1,500), distinct per ``topic``."""
    lines = [f"You are the {topic} assistant of an industrial gateway. Sensors:"]
    for i in range(sensors):
        lines.append(f"- sensor {topic}-{i}: temperature probe on line {i % 7}, range "
                     f"{-20 + i} to {80 + 3 * i} C, alarm above {60 + i} C, report hourly.")
    return "\n".join(lines)
