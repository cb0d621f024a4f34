"""CPU time and resident memory of a process tree, read from /proc.

Why a tree: a proxy may be one process (trio-tproxy, haproxy with -db), one
process with many threads (stunnel's thread per connection), or a parent with
workers. /proc/<pid>/stat of a process already sums all its threads; we add
every live descendant, and the parent's cutime/cstime for children it has
already reaped, so that nothing it spent escapes the count.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields after the ``(comm)`` of /proc/<pid>/stat, which may itself hold spaces."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree(roots: Iterable[int], children: dict[int, list[int]] | None = None) -> list[int]:
    """The given PIDs and all their live descendants."""
    if children is None:
        children = _children_map()
    seen: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


#: After "(comm)": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
_USER, _SYSTEM = (11, 13), (12, 14)


def _ticks(pids: Iterable[int], fields_wanted: tuple[int, ...] = _USER + _SYSTEM) -> int:
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        ticks += sum(int(fields[i]) for i in fields_wanted)
    return ticks


def cpu_seconds(roots: Iterable[int]) -> float:
    """utime + stime of every process in the trees (all threads), plus reaped children."""
    return _ticks(tree(roots)) / _TICK


def user_cpu_seconds(roots: Iterable[int]) -> float:
    """The user-space part of :func:`cpu_seconds` (the rest is the kernel's: system
    calls, and the network stack's softirq work done in the process's context)."""
    return _ticks(tree(roots), _USER) / _TICK


def foreign_cpu_seconds() -> float:
    """CPU of every user-space process that is not this one or its descendants.

    Why: the machine may be shared (someone running the test suite meanwhile).
    What those processes take during a test is CPU the proxies did not get, so
    the harness reports it next to the figures. Kernel threads (children of
    kthreadd, PID 2) are left out: ksoftirqd's networking work is ours.
    """
    children = _children_map()
    ours = set(tree([os.getpid()], children)) | set(tree([2], children))
    return _ticks(pid for pid in _all_pids(children) if pid not in ours) / _TICK


def _all_pids(children: dict[int, list[int]]) -> set[int]:
    return {pid for kids in children.values() for pid in kids}


def rss_kib(roots: Iterable[int]) -> int:
    """Sum of VmRSS over every process in the trees (threads share their process's)."""
    total = 0
    for pid in tree(roots):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in kB: Rss, Pss, Private_Dirty, Anonymous, ..."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            value = rest.split()
            if value and value[0].isdigit() and " " not in name:
                fields[name] = int(value[0])
    return fields
