"""Hardware probe: memory, CPUs, cgroup limits and temperatures of this machine.

Every fact is read from ``/proc`` and ``/sys`` below ``root`` by one parser, so tests point
``root`` at a fake tree and exercise the same code the daemon runs. With the real root, two
facts come from the OS instead: the CPU affinity (``os.sched_getaffinity``, the source of
truth for this process) and, only when ``/proc/meminfo`` cannot be read (not Linux), memory
from psutil.

Nothing here raises on a missing or unreadable file: a gateway kernel may lack any of them,
and an absent fact is ``None`` (unknown), an empty dict or an empty tuple.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path("/")

#: cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712);
#: anything this large is no limit.
_V1_UNLIMITED = 2**60

_CGROUP_MOUNT = ("sys", "fs", "cgroup")


# --------------------------------------------------------------------------- small readers


def _read(path: Path) -> str | None:
    """The text of ``path``, or None when it cannot be read for any reason."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except (OSError, ValueError):
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read_kv(path: Path) -> dict[str, int]:
    """``key value`` lines (cgroup ``memory.stat``) as a dict; unreadable: empty."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_cpu_list(text: str) -> tuple[int, ...] | None:
    """The kernel's CPU list syntax, ``"0-3,6"`` -> ``(0, 1, 2, 3, 6)``; invalid: None."""
    cpus: set[int] = set()
    text = text.strip()
    if not text:
        return ()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                first, last = int(lo), int(hi)
                if first < 0 or last < first:
                    return None
                cpus.update(range(first, last + 1))
            else:
                cpu = int(part)
                if cpu < 0:
                    return None
                cpus.add(cpu)
        except ValueError:
            return None
    return tuple(sorted(cpus))


def format_cpu_list(cpus: tuple[int, ...] | list[int]) -> str:
    """The inverse of :func:`parse_cpu_list`: ``(0, 1, 2, 3, 6)`` -> ``"0-3,6"``."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


# --------------------------------------------------------------------------- memory


def _meminfo(root: Path) -> dict[str, int] | None:
    """``/proc/meminfo`` in bytes; None when unreadable."""
    text = _read(root / "proc" / "meminfo")
    if text is None:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        unit = parts[1].lower() if len(parts) > 1 else ""
        out[key.strip()] = value * 1024 if unit == "kb" else value
    return out


def _system_memory(root: Path) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes.

    MemAvailable counts reclaimable page cache as available, which is right: cache is not
    memory in use. Kernels before 3.14 lack it; MemFree + Buffers + Cached stands in.
    """
    info = _meminfo(root)
    if info is None:
        if root == ROOT:
            try:
                import psutil

                vm = psutil.virtual_memory()
                return int(vm.total), int(vm.available)
            except Exception:  # pragma: no cover - psutil unsupported platform
                return None, None
        return None, None
    total = info.get("MemTotal")
    available = info.get("MemAvailable")
    if available is None and "MemFree" in info:
        available = info["MemFree"] + info.get("Buffers", 0) + info.get("Cached", 0)
    return total, available


def _cgroup_membership(root: Path) -> dict[str, str]:
    """``/proc/self/cgroup``: controller -> path; the v2 unified entry is under ``""``."""
    out: dict[str, str] = {}
    for line in (_read(root / "proc" / "self" / "cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            out[""] = path
        else:
            for controller in controllers.split(","):
                if controller:
                    out[controller] = path
    return out


def _cgroup_version(root: Path) -> int | None:
    mount = root.joinpath(*_CGROUP_MOUNT)
    if (mount / "cgroup.controllers").is_file():
        return 2
    if any((mount / name).is_dir() for name in ("memory", "cpu", "cpu,cpuacct", "cpuacct,cpu")):
        return 1
    return None


def _cgroup_dirs(mount: Path, rel: str | None) -> list[Path]:
    """The process's cgroup folder and its ancestors up to ``mount``, leaf first.

    A parent's limit applies to its children, so every level is read. When the process's own
    path does not exist in the mounted tree (a container, whose /sys/fs/cgroup is its own
    cgroup, while /proc/self/cgroup shows the host's path), only the mount's root files are
    the process's.
    """
    if rel:
        rel = rel.strip().strip("/")
        if rel and ".." not in rel.split("/"):
            leaf = mount / rel
            if leaf.is_dir():
                dirs = [leaf]
                current = leaf
                while current != mount:
                    current = current.parent
                    dirs.append(current)
                return dirs
    return [mount]


def _v1_mount(root: Path, controller: str) -> Path | None:
    base = root.joinpath(*_CGROUP_MOUNT)
    names = [controller] + (["cpu,cpuacct", "cpuacct,cpu"] if controller == "cpu" else [])
    for name in names:
        if (base / name).is_dir():
            return base / name
    return None


@dataclass(frozen=True)
class _CgroupMemory:
    limit: int | None
    usage: int | None
    inactive_file: int | None


def _cgroup_memory(root: Path, version: int | None) -> _CgroupMemory:
    """The binding memory limit over the cgroup and its ancestors, with that level's usage.

    The binding level is the one with the least room left: limit - (usage - inactive file
    cache). With no limit anywhere, the own cgroup's usage is still reported.
    """
    membership = _cgroup_membership(root)
    inactive_keys: tuple[str, ...]
    if version == 2:
        mount: Path | None = root.joinpath(*_CGROUP_MOUNT)
        rel = membership.get("")
        limit_file, usage_file, inactive_keys = "memory.max", "memory.current", ("inactive_file",)
    elif version == 1:
        mount = _v1_mount(root, "memory")
        rel = membership.get("memory")
        limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        inactive_keys = ("total_inactive_file", "inactive_file")
    else:
        return _CgroupMemory(None, None, None)
    if mount is None:
        return _CgroupMemory(None, None, None)

    best: _CgroupMemory | None = None
    best_room: int | None = None
    leaf: _CgroupMemory | None = None
    for level in _cgroup_dirs(mount, rel):
        usage = _read_int(level / usage_file)
        stat = _read_kv(level / "memory.stat")
        inactive = next((stat[k] for k in inactive_keys if k in stat), None)
        limit = _parse_memory_limit(_read(level / limit_file))
        facts = _CgroupMemory(limit, usage, inactive)
        if leaf is None:
            leaf = _CgroupMemory(None, usage, inactive)
        if limit is None:
            continue
        room = limit - _working_set(usage, inactive)
        if best_room is None or room < best_room:
            best, best_room = facts, room
    if best is not None:
        return best
    return leaf or _CgroupMemory(None, None, None)


def _parse_memory_limit(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _V1_UNLIMITED or value < 0 else value


def _working_set(usage: int | None, inactive_file: int | None) -> int:
    """Memory in use in a cgroup: its usage less the inactive page cache the kernel can drop."""
    if usage is None:
        return 0
    return max(0, usage - (inactive_file or 0))


def effective_available(
    mem_available: int | None,
    cgroup_limit: int | None,
    cgroup_usage: int | None,
    cgroup_inactive_file: int | None,
) -> int | None:
    """min(MemAvailable, cgroup limit - (usage - inactive file cache)); None when unknown."""
    candidates: list[int] = []
    if mem_available is not None:
        candidates.append(mem_available)
    if cgroup_limit is not None:
        candidates.append(max(0, cgroup_limit - _working_set(cgroup_usage, cgroup_inactive_file)))
    return min(candidates) if candidates else None


def available_memory(root: Path = ROOT) -> int | None:
    """Effective available memory in bytes now (cgroup-aware), cheap enough for every request."""
    _total, available = _system_memory(root)
    cg = _cgroup_memory(root, _cgroup_version(root))
    return effective_available(available, cg.limit, cg.usage, cg.inactive_file)


# --------------------------------------------------------------------------- CPUs


def _cpuinfo_topology(root: Path) -> tuple[int | None, dict[int, tuple[int, int]]]:
    """(logical CPUs, processor -> (physical id, core id)) from /proc/cpuinfo.

    The map is empty when cpuinfo has no core ids (many ARM boards).
    """
    text = _read(root / "proc" / "cpuinfo")
    if text is None:
        return None, {}
    count = 0
    cores: dict[int, tuple[int, int]] = {}
    complete = True
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if "processor" not in fields:
            continue
        try:
            cpu = int(fields["processor"])
        except ValueError:
            continue
        count += 1
        try:
            cores[cpu] = (int(fields.get("physical id", "0")), int(fields["core id"]))
        except (KeyError, ValueError):
            complete = False
    return (count or None), (cores if complete else {})


def _sysfs_topology(root: Path) -> dict[int, tuple[int, int]]:
    """processor -> (package id, core id) from /sys/devices/system/cpu/cpu*/topology."""
    cores: dict[int, tuple[int, int]] = {}
    base = root / "sys" / "devices" / "system" / "cpu"
    try:
        entries = list(base.glob("cpu[0-9]*"))
    except OSError:
        return {}
    for entry in entries:
        try:
            cpu = int(entry.name[3:])
        except ValueError:
            continue
        core = _read_int(entry / "topology" / "core_id")
        if core is None:
            continue
        package = _read_int(entry / "topology" / "physical_package_id")
        cores[cpu] = (package if package is not None else 0, core)
    return cores


def _affinity(root: Path) -> tuple[int, ...] | None:
    if root == ROOT and hasattr(os, "sched_getaffinity"):
        try:
            return tuple(sorted(os.sched_getaffinity(0)))
        except OSError:  # pragma: no cover - defensive
            pass
    for line in (_read(root / "proc" / "self" / "status") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Cpus_allowed_list":
            return parse_cpu_list(value)
    return None


def _cpu_quota(root: Path, version: int | None) -> float | None:
    """The tightest CFS quota over the cgroup and its ancestors, in cores; None: no quota."""
    membership = _cgroup_membership(root)
    quotas: list[float] = []
    if version == 2:
        mount = root.joinpath(*_CGROUP_MOUNT)
        for level in _cgroup_dirs(mount, membership.get("")):
            parts = (_read(level / "cpu.max") or "").split()
            if len(parts) >= 1 and parts[0] != "max":
                try:
                    quota = int(parts[0])
                    period = int(parts[1]) if len(parts) > 1 else 100_000
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    quotas.append(quota / period)
    elif version == 1:
        v1 = _v1_mount(root, "cpu")
        if v1 is not None:
            for level in _cgroup_dirs(v1, membership.get("cpu")):
                v1_quota = _read_int(level / "cpu.cfs_quota_us")
                v1_period = _read_int(level / "cpu.cfs_period_us")
                if v1_quota is not None and v1_quota > 0 and v1_period and v1_period > 0:
                    quotas.append(v1_quota / v1_period)
    return min(quotas) if quotas else None


# --------------------------------------------------------------------------- thermal


def _temperatures(root: Path) -> dict[str, float]:
    """Thermal zone type -> degrees Celsius; zones that fail to read are left out."""
    out: dict[str, float] = {}
    base = root / "sys" / "class" / "thermal"
    try:
        zones = list(base.glob("thermal_zone*"))
    except OSError:
        return out

    def zone_number(p: Path) -> int:
        digits = p.name.removeprefix("thermal_zone")
        return int(digits) if digits.isdigit() else 1 << 30

    for zone in sorted(zones, key=zone_number):
        milli = _read_int(zone / "temp")
        if milli is None:
            continue
        kind = (_read(zone / "type") or "").strip() or zone.name
        key = kind if kind not in out else f"{kind}@{zone.name}"
        out[key] = milli / 1000.0
    return out


def _throttle_count(root: Path) -> int | None:
    """Thermal throttling events (x86): core counts summed, plus the package count.

    ``package_throttle_count`` repeats for every CPU of a package, so its maximum is taken
    (exact on single-package machines). None when the kernel does not expose them.
    """
    base = root / "sys" / "devices" / "system" / "cpu"
    try:
        core_files = list(base.glob("cpu[0-9]*/thermal_throttle/core_throttle_count"))
        package_files = list(base.glob("cpu[0-9]*/thermal_throttle/package_throttle_count"))
    except OSError:
        return None
    core = [v for v in (_read_int(p) for p in core_files) if v is not None]
    package = [v for v in (_read_int(p) for p in package_files) if v is not None]
    if not core and not package:
        return None
    return sum(core) + (max(package) if package else 0)


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class Hardware:
    """What the planner needs to know about this machine; ``None`` means unknown."""

    mem_total_bytes: int | None = None
    #: MemAvailable: free memory plus reclaimable page cache.
    mem_available_bytes: int | None = None
    cgroup_version: int | None = None
    #: The binding cgroup memory limit (own cgroup or an ancestor); None: no limit.
    cgroup_memory_limit_bytes: int | None = None
    #: Usage of the cgroup level whose limit binds (the own cgroup when there is no limit).
    cgroup_memory_usage_bytes: int | None = None
    #: Inactive file cache of that level, reclaimable, so not counted as in use.
    cgroup_inactive_file_bytes: int | None = None
    logical_cpus: int | None = None
    #: Distinct (physical id, core id) pairs; the logical count when topology is unknown.
    physical_cores: int | None = None
    #: Whether physical_cores comes from a real core topology.
    topology_known: bool = False
    #: CPUs this process may run on.
    affinity: tuple[int, ...] | None = None
    #: Distinct physical cores among the affinity CPUs, when the topology is known.
    affinity_cores: int | None = None
    #: cgroup CFS quota in cores (1.5 = one and a half CPUs); None: no quota.
    cpu_quota_cores: float | None = None
    #: Thermal zone type -> degrees Celsius.
    temperatures_c: dict[str, float] = field(default_factory=dict)
    thermal_throttle_count: int | None = None

    @property
    def effective_available_bytes(self) -> int | None:
        """min(MemAvailable, cgroup limit - (usage - inactive file cache)); None: unknown."""
        return effective_available(
            self.mem_available_bytes,
            self.cgroup_memory_limit_bytes,
            self.cgroup_memory_usage_bytes,
            self.cgroup_inactive_file_bytes,
        )

    @property
    def cpu_quota_threads(self) -> int | None:
        """The quota rounded up to whole threads (1.5 cores -> 2), at least 1."""
        if self.cpu_quota_cores is None:
            return None
        return max(1, math.ceil(self.cpu_quota_cores - 1e-9))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field plus ``effective_available_bytes``."""
        out = asdict(self)
        out["affinity"] = list(self.affinity) if self.affinity is not None else None
        out["temperatures_c"] = dict(self.temperatures_c)
        out["effective_available_bytes"] = self.effective_available_bytes
        return out


def probe(root: Path = ROOT) -> Hardware:
    """Probe the machine whose /proc and /sys are below ``root``; never raises on I/O."""
    total, available = _system_memory(root)
    version = _cgroup_version(root)
    cg = _cgroup_memory(root, version)

    logical, cores = _cpuinfo_topology(root)
    if not cores:
        cores = _sysfs_topology(root)
    if logical is None:
        online = _read(root / "sys" / "devices" / "system" / "cpu" / "online")
        parsed = parse_cpu_list(online) if online is not None else None
        logical = len(parsed) if parsed else None
    if logical is None and root == ROOT:
        logical = os.cpu_count()
    physical = len(set(cores.values())) if cores else logical
    affinity = _affinity(root)
    affinity_cores: int | None = None
    if cores and affinity:
        allowed = [cores[c] for c in affinity if c in cores]
        affinity_cores = len(set(allowed)) if len(allowed) == len(affinity) else None

    return Hardware(
        mem_total_bytes=total,
        mem_available_bytes=available,
        cgroup_version=version,
        cgroup_memory_limit_bytes=cg.limit,
        cgroup_memory_usage_bytes=cg.usage,
        cgroup_inactive_file_bytes=cg.inactive_file,
        logical_cpus=logical,
        physical_cores=physical,
        topology_known=bool(cores),
        affinity=affinity,
        affinity_cores=affinity_cores,
        cpu_quota_cores=_cpu_quota(root, version),
        temperatures_c=_temperatures(root),
        thermal_throttle_count=_throttle_count(root),
    )
