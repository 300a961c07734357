"""The rerun after a killed snakemake: tell a stale lock from a live one, and clear only the stale.

Snakemake locks the working directory (``.snakemake/locks``) for the length of a run. Killed with
SIGKILL (or by the OOM killer), it leaves the lock behind and every rerun refuses to start until
``snakemake --unlock``. Its lock files do not say who holds them, so the run that acquired them
records itself (``OWNER``: host, pid, process start time, process group) right after locking.

On the next run, before Snakemake looks at the lock:
- holder alive (same pid and start time on this host): a real concurrent run, left alone;
- holder dead, but processes of its group still run in this directory (its jobs, orphaned by
  a SIGKILL of snakemake alone): not cleared, the message lists them;
- holder dead, nothing of it left: the lock is stale and is removed, with one line saying so;
- holder on another host, or unknown: cannot be checked here, the message names the command.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

LOCK_DIR = Path(".snakemake/locks")
OWNER = Path(".snakemake/llamapipe-lock-owner.json")


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 on (the name in (...) may hold spaces); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): with the pid, names one process."""
    fields = _stat(pid)
    return fields[19] if fields else None  # field 22


def this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid), "pgid": os.getpgid(0)}


def record_owner(workdir: Path = Path(".")) -> None:
    """Called once the lock is held (Snakemake's onstart)."""
    path = workdir / OWNER
    path.write_text(json.dumps(this_process()))


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        fields = _stat(pid)
        if not fields:
            break
        pid = int(fields[1])  # field 4: the parent
    return seen


def leftover_jobs(owner: dict[str, Any], workdir: Path) -> list[tuple[int, str]]:
    """Live processes of the dead holder's process group working in ``workdir``."""
    here = workdir.resolve()
    mine = _ancestors(os.getpid())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        pid = int(entry.name)
        try:
            if os.getpgid(pid) != owner.get("pgid") or Path(os.readlink(entry / "cwd")).resolve() != here:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        found.append((pid, cmd))
    return sorted(found)


def check(workdir: Path = Path("."), say: Callable[[str], None] = print) -> str:
    """Inspect the lock before a run; returns the verdict (``free``, ``live``, ``leftover``,
    ``cleared``, ``unknown``) after saying what it found when that is not ``free``."""
    locks = sorted((workdir / LOCK_DIR).glob("*.lock"))
    if not locks:
        return "free"
    try:
        owner = json.loads((workdir / OWNER).read_text())
    except (OSError, ValueError):
        say("This directory holds a Snakemake lock of unknown origin. If no snakemake runs here, "
            "type `snakemake --unlock`, then the same command again.")
        return "unknown"
    who = f"snakemake pid {owner['pid']} on {owner['host']}"
    if owner["host"] != socket.gethostname():
        say(f"This directory is locked by {who}, which cannot be checked from here. If it is no "
            "longer running, type `snakemake --unlock`, then the same command again.")
        return "unknown"
    if process_start(owner["pid"]) == owner["start"]:
        say(f"{who} is running in this directory: wait for it to finish (its lock stays).")
        return "live"
    jobs = leftover_jobs(owner, workdir)
    if jobs:
        listed = "; ".join(f"pid {pid}: {cmd[:120]}" for pid, cmd in jobs)
        say(f"{who} was killed, but its jobs still run: {listed}. Let them finish or stop them "
            f"(kill {' '.join(str(p) for p, _ in jobs)}), then type the same command again.")
        return "leftover"
    for lock in locks:
        lock.unlink(missing_ok=True)
    (workdir / OWNER).unlink(missing_ok=True)
    say(f"Removed the lock left by {who}, which was killed (none of its processes remain).")
    return "cleared"
