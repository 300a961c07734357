"""The rerun after a killed snakemake: stale locks cleared, live ones and orphaned jobs respected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import SNAKEMAKE, copy_project, snakemake
from llamapipe.snakemake_hooks import stale_lock


def _locked(workdir: Path, owner: dict | None) -> Path:
    locks = workdir / stale_lock.LOCK_DIR
    locks.mkdir(parents=True)
    (locks / "0.output.lock").write_text(str(workdir / "results/sft"))
    if owner is not None:
        (workdir / stale_lock.OWNER).write_text(json.dumps(owner))
    return locks


def _owner_of(proc: subprocess.Popen) -> dict:
    return {"host": os.uname().nodename, "pid": proc.pid, "start": stale_lock.process_start(proc.pid),
            "pgid": os.getpgid(proc.pid)}


def _dead_owner() -> dict:
    proc = subprocess.Popen(["true"], start_new_session=True)
    owner = _owner_of(proc)
    proc.wait()
    return owner


def _check(workdir: Path) -> tuple[str, str]:
    said: list[str] = []
    return stale_lock.check(workdir, say=said.append), "\n".join(said)


def test_no_lock_is_free(tmp_path):
    assert _check(tmp_path) == ("free", "")


def test_lock_of_a_dead_snakemake_is_cleared(tmp_path):
    locks = _locked(tmp_path, _dead_owner())
    verdict, said = _check(tmp_path)
    assert verdict == "cleared" and "was killed" in said
    assert not list(locks.glob("*.lock")) and not (tmp_path / stale_lock.OWNER).exists()


def test_lock_of_a_live_snakemake_is_kept(tmp_path):
    live = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        locks = _locked(tmp_path, _owner_of(live))
        verdict, said = _check(tmp_path)
        assert verdict == "live" and f"pid {live.pid}" in said
        assert list(locks.glob("*.lock"))
    finally:
        live.kill()
        live.wait()


def test_reused_pid_is_not_taken_for_the_holder(tmp_path):
    me = stale_lock.this_process()
    _locked(tmp_path, {**me, "start": str(int(me["start"]) - 1)})  # same pid, another process
    assert _check(tmp_path)[0] == "cleared"


def test_orphaned_jobs_of_a_killed_snakemake_keep_the_lock(tmp_path):
    # A job left behind: same process group as the dead holder, working in the directory.
    job = subprocess.Popen(["sleep", "30"], cwd=tmp_path, start_new_session=True)
    try:
        owner = {**_dead_owner(), "pgid": os.getpgid(job.pid)}
        locks = _locked(tmp_path, owner)
        verdict, said = _check(tmp_path)
        assert verdict == "leftover" and f"pid {job.pid}: sleep 30" in said and f"kill {job.pid}" in said
        assert list(locks.glob("*.lock"))
    finally:
        job.kill()
        job.wait()


def test_holder_on_another_host_or_unknown_names_the_unlock_command(tmp_path):
    _locked(tmp_path, {**_dead_owner(), "host": "elsewhere"})
    verdict, said = _check(tmp_path)
    assert verdict == "unknown" and "snakemake --unlock" in said and "elsewhere" in said
    (tmp_path / stale_lock.OWNER).unlink()
    verdict, said = _check(tmp_path)
    assert verdict == "unknown" and "snakemake --unlock" in said


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None
        assert time.time() < deadline
        time.sleep(0.2)


@pytest.mark.e2e
def test_rerun_after_snakemake_itself_was_killed(tmp_path):
    """kill -9 of snakemake alone: its sft job runs on, and the rerun must not start a second
    sft beside it; once that job is gone, the same command just works."""
    project = copy_project(tmp_path / "killed")
    (project / "overlay.yaml").write_text("sft:\n  max_steps: 200\n  save_steps: 50\n")
    args = ["results/sft", "--cores", "2", "--configfile", "overlay.yaml"]
    # Its own session, as a shell with job control starts it: snakemake leads its process group.
    with open(tmp_path / "first-run.out", "wb") as out:  # a file, as a terminal: never fills up
        runner = subprocess.Popen([*SNAKEMAKE, *args], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    _wait_for(project / "results/checkpoints/sft/checkpoint-50/.checkpoint_done", runner)
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait()

    refused = snakemake(project, *args, check=False)
    assert refused.returncode != 0
    assert "was killed, but its jobs still run" in refused.stdout + refused.stderr

    os.killpg(runner.pid, signal.SIGKILL)  # what the message asks for
    deadline = time.time() + 30
    while stale_lock.leftover_jobs({"pgid": runner.pid}, project):
        assert time.time() < deadline
        time.sleep(0.2)
    rerun = snakemake(project, *args)
    assert "Removed the lock left by snakemake" in rerun.stdout + rerun.stderr
    summary = json.loads((project / "results/sft/train_summary.json").read_text())
    assert summary["global_step"] == 200 and summary["resumed_from"]


def test_owner_record_names_the_running_process(tmp_path):
    (tmp_path / ".snakemake").mkdir()
    stale_lock.record_owner(tmp_path)
    owner = json.loads((tmp_path / stale_lock.OWNER).read_text())
    assert owner["pid"] == os.getpid() and owner["start"] == stale_lock.process_start(os.getpid())
