"""A fake machine for the hardware probe (``runtime.probe_root``): the one fake the project
allows for it, since tests cannot change the host's memory or CPUs."""

from __future__ import annotations

from pathlib import Path


def fake_machine(root: Path, available_bytes: int, cpus: int = 2) -> None:
    """A /proc tree under ``root``: ``cpus`` cores, 8 GB, ``available_bytes`` available.
    meminfo is replaced atomically, so that a running daemon never reads half a file."""
    (root / "proc" / "self").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "cpuinfo").write_text("".join(
        f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i}\n\n" for i in range(cpus)))
    (root / "proc" / "self" / "status").write_text(f"Cpus_allowed_list:\t0-{cpus - 1}\n")
    meminfo = root / "proc" / "meminfo"
    tmp = meminfo.with_suffix(".tmp")
    tmp.write_text(f"MemTotal: {8 * 2**20} kB\nMemFree: {available_bytes // 1024} kB\n"
                   f"MemAvailable: {available_bytes // 1024} kB\n")
    tmp.replace(meminfo)
