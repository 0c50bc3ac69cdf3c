"""The hardware probe against fake /proc and /sys trees, and against this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgeagent.probe import (
    Hardware,
    available_memory,
    format_cpu_list,
    parse_cpu_list,
    probe,
)

MB = 2**20
V1_UNLIMITED = "9223372036854771712"


def tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (path relative to root -> content) below root; return root."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def meminfo(total_mb: int, available_mb: int | None) -> str:
    lines = [f"MemTotal:       {total_mb * 1024} kB", f"MemFree:        {total_mb * 256} kB"]
    if available_mb is not None:
        lines.append(f"MemAvailable:   {available_mb * 1024} kB")
    lines += ["Buffers:          1024 kB", "Cached:          2048 kB", "HugePages_Total: 0"]
    return "\n".join(lines) + "\n"


def cpuinfo(cores: list[tuple[int, int]] | int) -> str:
    """x86-style cpuinfo from (physical id, core id) per CPU, or ARM-style from a count."""
    blocks = []
    if isinstance(cores, int):
        for cpu in range(cores):
            blocks.append(f"processor\t: {cpu}\nBogoMIPS\t: 48.00\nCPU part\t: 0xd08\n")
    else:
        for cpu, (phys, core) in enumerate(cores):
            blocks.append(
                f"processor\t: {cpu}\nmodel name\t: Fake CPU\nphysical id\t: {phys}\n"
                f"siblings\t: {len(cores)}\ncore id\t\t: {core}\n"
            )
    return "\n".join(blocks) + "\n"


def machine(
    root: Path,
    *,
    total_mb: int = 4096,
    available_mb: int | None = 3000,
    cores: list[tuple[int, int]] | int = 4,
    allowed: str | None = None,
    cgroup: str = "0::/\n",
) -> Path:
    n = cores if isinstance(cores, int) else len(cores)
    files = {
        "proc/meminfo": meminfo(total_mb, available_mb),
        "proc/cpuinfo": cpuinfo(cores),
        "proc/self/status": f"Name:\tpython\nCpus_allowed_list:\t{allowed or f'0-{n - 1}'}\n",
        "proc/self/cgroup": cgroup,
    }
    return tree(root, files)


# --------------------------------------------------------------------------- CPU lists


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("0-3,6", (0, 1, 2, 3, 6)),
        ("0", (0,)),
        ("0-1\n", (0, 1)),
        ("4,0-1", (0, 1, 4)),
        ("", ()),
        ("a-b", None),
        ("3-1", None),
    ],
)
def test_parse_cpu_list(text: str, cpus: tuple[int, ...] | None) -> None:
    assert parse_cpu_list(text) == cpus


def test_format_cpu_list_round_trips() -> None:
    assert format_cpu_list((0, 1, 2, 3, 6, 8, 9)) == "0-3,6,8-9"
    assert parse_cpu_list(format_cpu_list((5, 0, 1))) == (0, 1, 5)


# --------------------------------------------------------------------------- memory


def test_meminfo_without_cgroup(tmp_path: Path) -> None:
    hw = probe(machine(tmp_path, total_mb=4096, available_mb=3000))
    assert hw.mem_total_bytes == 4096 * MB
    assert hw.mem_available_bytes == 3000 * MB
    assert hw.cgroup_version is None
    assert hw.cgroup_memory_limit_bytes is None
    assert hw.effective_available_bytes == 3000 * MB


def test_old_kernel_without_memavailable(tmp_path: Path) -> None:
    hw = probe(machine(tmp_path, total_mb=4096, available_mb=None))
    # MemFree + Buffers + Cached
    assert hw.mem_available_bytes == 4096 * 256 * 1024 + 3 * 1024 * 1024


def test_cgroup_v1_limit(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="4:memory:/gw/agent\n3:cpu,cpuacct:/gw/agent\n0::/\n")
    base = "sys/fs/cgroup/memory"
    tree(root, {
        f"{base}/memory.limit_in_bytes": V1_UNLIMITED + "\n",
        f"{base}/gw/memory.limit_in_bytes": V1_UNLIMITED + "\n",
        f"{base}/gw/agent/memory.limit_in_bytes": f"{1024 * MB}\n",
        f"{base}/gw/agent/memory.usage_in_bytes": f"{400 * MB}\n",
        f"{base}/gw/agent/memory.stat": (
            f"cache 1\ninactive_file 1\ntotal_inactive_file {100 * MB}\n"
        ),
    })
    hw = probe(root)
    assert hw.cgroup_version == 1
    assert hw.cgroup_memory_limit_bytes == 1024 * MB
    assert hw.cgroup_memory_usage_bytes == 400 * MB
    assert hw.cgroup_inactive_file_bytes == 100 * MB
    # 1024 - (400 - 100) = 724 < MemAvailable 3000
    assert hw.effective_available_bytes == 724 * MB
    assert available_memory(root) == 724 * MB


def test_cgroup_v1_unlimited_root_file_only(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="4:memory:/\n")
    tree(root, {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(50 * MB),
    })
    hw = probe(root)
    assert hw.cgroup_version == 1
    assert hw.cgroup_memory_limit_bytes is None
    assert hw.cgroup_memory_usage_bytes == 50 * MB
    assert hw.effective_available_bytes == 3000 * MB


def v2_root(root: Path) -> None:
    tree(root, {"sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n"})


def test_cgroup_v2_own_path_and_parent_limit(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="0::/system.slice/edgeagent.service\n")
    v2_root(root)
    base = "sys/fs/cgroup"
    tree(root, {
        # the parent's limit is tighter than the service's own
        f"{base}/system.slice/memory.max": f"{800 * MB}\n",
        f"{base}/system.slice/memory.current": f"{500 * MB}\n",
        f"{base}/system.slice/memory.stat": f"anon 1\ninactive_file {200 * MB}\n",
        f"{base}/system.slice/edgeagent.service/memory.max": f"{2048 * MB}\n",
        f"{base}/system.slice/edgeagent.service/memory.current": f"{100 * MB}\n",
    })
    hw = probe(root)
    assert hw.cgroup_version == 2
    assert hw.cgroup_memory_limit_bytes == 800 * MB
    assert hw.cgroup_memory_usage_bytes == 500 * MB
    # 800 - (500 - 200) = 500
    assert hw.effective_available_bytes == 500 * MB


def test_cgroup_v2_own_limit(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="0::/system.slice/edgeagent.service\n")
    v2_root(root)
    base = "sys/fs/cgroup/system.slice"
    tree(root, {
        f"{base}/memory.max": "max\n",
        f"{base}/edgeagent.service/memory.max": f"{1024 * MB}\n",
        f"{base}/edgeagent.service/memory.current": f"{24 * MB}\n",
    })
    hw = probe(root)
    assert hw.cgroup_memory_limit_bytes == 1024 * MB
    assert hw.effective_available_bytes == 1000 * MB


def test_cgroup_v2_container_root_layout(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host path, but /sys/fs/cgroup is the container's own cgroup
    root = machine(tmp_path, cgroup="0::/kubepods/burstable/pod1234/abcdef\n")
    v2_root(root)
    tree(root, {
        "sys/fs/cgroup/memory.max": f"{512 * MB}\n",
        "sys/fs/cgroup/memory.current": f"{112 * MB}\n",
        "sys/fs/cgroup/memory.stat": f"inactive_file {12 * MB}\n",
        "sys/fs/cgroup/cpu.max": "150000 100000\n",
    })
    hw = probe(root)
    assert hw.cgroup_memory_limit_bytes == 512 * MB
    assert hw.effective_available_bytes == 412 * MB
    assert hw.cpu_quota_cores == 1.5


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="0::/user.slice\n")
    v2_root(root)
    tree(root, {
        "sys/fs/cgroup/user.slice/memory.max": "max\n",
        "sys/fs/cgroup/user.slice/memory.current": f"{300 * MB}\n",
        "sys/fs/cgroup/user.slice/cpu.max": "max 100000\n",
    })
    hw = probe(root)
    assert hw.cgroup_version == 2
    assert hw.cgroup_memory_limit_bytes is None
    assert hw.cgroup_memory_usage_bytes == 300 * MB
    assert hw.cpu_quota_cores is None
    assert hw.effective_available_bytes == 3000 * MB


def test_cgroup_limit_above_memavailable_does_not_bind(tmp_path: Path) -> None:
    root = machine(tmp_path, available_mb=1000)
    v2_root(root)
    tree(root, {"sys/fs/cgroup/memory.max": f"{8192 * MB}\n"})
    assert probe(root).effective_available_bytes == 1000 * MB


# --------------------------------------------------------------------------- CPUs


def test_cpu_quota_v2(tmp_path: Path) -> None:
    root = machine(tmp_path, cores=[(0, i) for i in range(4)], cgroup="0::/svc\n")
    v2_root(root)
    tree(root, {"sys/fs/cgroup/svc/cpu.max": "150000 100000\n"})
    hw = probe(root)
    assert hw.cpu_quota_cores == 1.5
    assert hw.cpu_quota_threads == 2
    assert hw.physical_cores == 4


def test_cpu_quota_v1(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="3:cpu,cpuacct:/gw\n4:memory:/gw\n")
    tree(root, {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/cpu,cpuacct/gw/cpu.cfs_quota_us": "250000\n",
        "sys/fs/cgroup/cpu,cpuacct/gw/cpu.cfs_period_us": "100000\n",
    })
    hw = probe(root)
    assert hw.cgroup_version == 1
    assert hw.cpu_quota_cores == 2.5
    assert hw.cpu_quota_threads == 3


def test_cpu_quota_v1_unlimited(tmp_path: Path) -> None:
    root = machine(tmp_path, cgroup="3:cpu,cpuacct:/\n")
    tree(root, {
        "sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
        "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n",
    })
    assert probe(root).cpu_quota_cores is None


def test_hyperthreads_and_affinity(tmp_path: Path) -> None:
    # 4 cores x 2 threads; Linux numbers the siblings n apart: CPU i and i+4 share core i
    cores = [(0, i) for i in range(4)] * 2
    root = machine(tmp_path, cores=cores, allowed="0-1")
    hw = probe(root)
    assert hw.logical_cpus == 8
    assert hw.physical_cores == 4
    assert hw.topology_known
    assert hw.affinity == (0, 1)
    assert hw.affinity_cores == 2


def test_affinity_on_siblings_counts_cores(tmp_path: Path) -> None:
    cores = [(0, i) for i in range(4)] * 2
    hw = probe(machine(tmp_path, cores=cores, allowed="0,4"))
    assert hw.affinity == (0, 4)
    assert hw.affinity_cores == 1


def test_two_sockets(tmp_path: Path) -> None:
    cores = [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert probe(machine(tmp_path, cores=cores)).physical_cores == 4


def test_arm_cpuinfo_without_core_ids(tmp_path: Path) -> None:
    hw = probe(machine(tmp_path, cores=4))
    assert hw.logical_cpus == 4
    assert hw.physical_cores == 4
    assert not hw.topology_known
    assert hw.affinity_cores is None


def test_arm_sysfs_topology(tmp_path: Path) -> None:
    root = machine(tmp_path, cores=4)
    for cpu in range(4):
        tree(root, {
            f"sys/devices/system/cpu/cpu{cpu}/topology/core_id": f"{cpu}\n",
            f"sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id": "0\n",
        })
    hw = probe(root)
    assert hw.physical_cores == 4
    assert hw.topology_known


def test_logical_count_from_sysfs_when_no_cpuinfo(tmp_path: Path) -> None:
    root = tree(tmp_path, {"sys/devices/system/cpu/online": "0-5\n"})
    hw = probe(root)
    assert hw.logical_cpus == 6
    assert hw.physical_cores == 6


# --------------------------------------------------------------------------- thermal


def test_temperatures_and_throttling(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "sys/class/thermal/thermal_zone0/type": "cpu-thermal\n",
        "sys/class/thermal/thermal_zone0/temp": "48312\n",
        "sys/class/thermal/thermal_zone1/type": "cpu-thermal\n",
        "sys/class/thermal/thermal_zone1/temp": "50000\n",
        "sys/class/thermal/thermal_zone2/type": "broken\n",
        "sys/class/thermal/thermal_zone2/temp": "\n",
        "sys/devices/system/cpu/cpu0/thermal_throttle/core_throttle_count": "3\n",
        "sys/devices/system/cpu/cpu1/thermal_throttle/core_throttle_count": "2\n",
        "sys/devices/system/cpu/cpu0/thermal_throttle/package_throttle_count": "7\n",
        "sys/devices/system/cpu/cpu1/thermal_throttle/package_throttle_count": "7\n",
    })
    hw = probe(root)
    assert hw.temperatures_c == {"cpu-thermal": 48.312, "cpu-thermal@thermal_zone1": 50.0}
    assert hw.thermal_throttle_count == 12


# --------------------------------------------------------------------------- robustness


def test_empty_root_gives_unknowns(tmp_path: Path) -> None:
    hw = probe(tmp_path)
    assert hw == Hardware()
    assert hw.effective_available_bytes is None
    assert available_memory(tmp_path) is None
    json.dumps(hw.to_dict())


def test_garbage_files_give_unknowns(tmp_path: Path) -> None:
    root = tree(tmp_path, {
        "proc/meminfo": "nonsense\nMemTotal: lots kB\n",
        "proc/cpuinfo": "processor : x\n",
        "proc/self/status": "Cpus_allowed_list:\tzero\n",
        "proc/self/cgroup": "garbage\n0::/../../escape\n",
        "sys/fs/cgroup/cgroup.controllers": "",
        "sys/fs/cgroup/memory.max": "lots\n",
        "sys/fs/cgroup/memory.current": "\n",
        "sys/fs/cgroup/cpu.max": "x y\n",
        "sys/class/thermal/thermal_zone0/temp": "hot\n",
    })
    # a folder where a file is expected is unreadable too
    (root / "sys/fs/cgroup/memory.stat").mkdir()
    hw = probe(root)
    assert hw.mem_total_bytes is None
    assert hw.affinity is None
    assert hw.cgroup_version == 2
    assert hw.cgroup_memory_limit_bytes is None
    assert hw.cpu_quota_cores is None
    assert hw.temperatures_c == {}


def test_to_dict_is_json(tmp_path: Path) -> None:
    root = machine(tmp_path, allowed="0-1")
    tree(root, {"sys/class/thermal/thermal_zone0/temp": "40000", })
    doc = json.loads(json.dumps(probe(root).to_dict()))
    assert doc["affinity"] == [0, 1]
    assert doc["effective_available_bytes"] == 3000 * MB
    assert doc["temperatures_c"] == {"thermal_zone0": 40.0}


# --------------------------------------------------------------------------- this machine


def test_real_probe_is_sane() -> None:
    hw = probe()
    assert hw.mem_total_bytes is not None and hw.mem_total_bytes > 64 * MB
    assert hw.mem_available_bytes is not None
    assert 0 < hw.mem_available_bytes <= hw.mem_total_bytes
    eff = hw.effective_available_bytes
    assert eff is not None and 0 <= eff <= hw.mem_available_bytes
    assert hw.logical_cpus is not None and hw.logical_cpus >= 1
    assert hw.physical_cores is not None and 1 <= hw.physical_cores <= hw.logical_cpus
    assert hw.affinity == tuple(sorted(os.sched_getaffinity(0)))
    assert hw.cgroup_version in (None, 1, 2)
    if hw.cpu_quota_cores is not None:
        assert hw.cpu_quota_cores > 0
    for celsius in hw.temperatures_c.values():
        assert -50 < celsius < 150
    json.dumps(hw.to_dict())
    now = available_memory()
    assert now is not None and 0 < now <= hw.mem_total_bytes
