"""The DAG on a real SLURM cluster: slurmctld + slurmd (one node, count-only ``npu`` gres of 8) and
slurmdbd started by tests/slurm_cluster.py, driven by ``snakemake --profile profiles/slurm`` through
the pinned snakemake-executor-plugin-slurm.

- the cpu DAG through the NPU profile with only the cpu settings overridden (partition, memory,
  runtime): every rule is a SLURM job in ``sacct`` (job comment ``rule_<name>``), COMPLETED, and
  the profile's per-rule gres reached SLURM (``gres/npu=8`` for sft, 1 for merge/export/predict);
- a failing job: its log reaches the terminal, and sacct says FAILED;
- ``sbatch --test-only`` accepts each per-rule request of profiles/slurm/config.yaml (read from the
  file) on the generated cluster, and refuses one card more than the node has;
- bench/slurm_overhead.py --quick on the same cluster;
- without a cluster: the profile's slurm_extra holds no option the plugin refuses, and its gres
  match the npu resources the rules declare on the npu target.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, ROOT, copy_project, planned_jobs, snakemake

PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
SMALL = """\
# a short run for the SLURM tests (the cluster's per-job overhead dominates anyway)
sft: {max_steps: 20, save_steps: 10, warmup_steps: 5}
export: {max_new_tokens: 16}
predict: {limit: 8, max_new_tokens: 16}
"""
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _profile() -> dict:
    return yaml.safe_load(PROFILE.read_text())


def _unquote(value) -> str:
    """Profile resource strings are nested-quoted ("'npu:8'") so Snakemake parses them as strings."""
    value = str(value)
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def cpu_settings(cluster) -> list[str]:
    """What the cpu DAG needs on top of profiles/slurm: the cpu partition and cpu-sized jobs (this
    replaces the profile's default-resources; its per-rule gres stay), and a first status check
    after 1 s instead of the plugin's 40."""
    return ["--default-resources", f"slurm_partition={cluster.cpu_partition}", "runtime=30", "mem_mb=2000",
            "--slurm-init-seconds-before-status-checks", "1"]


def sacct_jobs(cluster, job_ids: list[str], timeout: float = 60) -> dict[str, dict]:
    """sacct's record of each job (slurmdbd gets them a few seconds after the fact), keyed by id."""
    fields = ["JobID", "JobName", "Comment", "State", "ExitCode", "AllocTRES", "AllocCPUS", "Partition"]
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.run("sacct", "-X", "-P", "-n", "-j", ",".join(job_ids), "-o", ",".join(fields)).stdout
        rows = {}
        for line in out.splitlines():
            rec = dict(zip(fields, line.split("|")))
            rows[rec["JobID"]] = rec
        done = set(rows) == set(job_ids) and all(r["State"].split()[0] in FINAL_STATES for r in rows.values())
        if done or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def slurm_logs(project: Path, chars: int = 2500) -> str:
    return "".join(f"\n--- {p.relative_to(project)}\n{p.read_text(errors='replace')[-chars:]}"
                   for p in sorted((project / ".snakemake" / "slurm_logs").rglob("*.log")))


def _write_small(project: Path) -> Path:
    path = project / "small.yaml"
    path.write_text(SMALL)
    return path


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):
    """The cpu DAG up to the metrics, every rule a SLURM job, as `snakemake --profile profiles/slurm`."""
    project = copy_project(tmp_path_factory.mktemp("slurm") / "project")
    _write_small(project)
    args = ("--configfile", "config.yaml", "small.yaml", "--", "results/metrics.json")
    expected = planned_jobs(project, *args)
    start = time.monotonic()
    proc = snakemake(project, "--profile", "profiles/slurm", *cpu_settings(slurm_cluster), *args,
                     check=False, timeout=1500, env=slurm_cluster.env())
    wall = time.monotonic() - start
    if proc.returncode != 0:  # the SLURM logs hold what failed before a rule's own log was written
        raise AssertionError(f"snakemake --profile profiles/slurm failed:\n{proc.stderr[-5000:]}"
                             f"{slurm_logs(project)}\n{slurm_cluster.log_tails()}")
    job_ids = SUBMITTED.findall(proc.stdout + proc.stderr)
    print(f"[slurm run] {len(job_ids)} SLURM jobs, {wall:.0f} s", flush=True)
    return {"project": project, "proc": proc, "expected": expected, "job_ids": job_ids,
            "jobs": sacct_jobs(slurm_cluster, job_ids)}


@pytest.mark.slurm
@pytest.mark.e2e
def test_every_rule_ran_as_a_completed_slurm_job(slurm_run):
    jobs = slurm_run["jobs"]
    assert len(slurm_run["job_ids"]) == len(slurm_run["expected"]), (slurm_run["job_ids"], slurm_run["expected"])
    assert set(jobs) == set(slurm_run["job_ids"]), jobs
    rules = sorted(r["Comment"].removeprefix("rule_") for r in jobs.values())
    assert rules == sorted(slurm_run["expected"])  # one job per rule, named by its comment
    assert {r["State"] for r in jobs.values()} == {"COMPLETED"}, jobs
    assert len({r["JobName"] for r in jobs.values()}) == 1  # the plugin names every job by the run's id
    metrics = slurm_run["project"] / "results" / "metrics.json"
    assert metrics.exists() and "bleu-4" in metrics.read_text()


@pytest.mark.slurm
@pytest.mark.e2e
def test_profile_requests_reached_slurm(slurm_run, slurm_cluster):
    """The NPU profile's per-rule gres were part of the real submissions (cpu target, same profile)."""
    by_rule = {r["Comment"].removeprefix("rule_"): r for r in slurm_run["jobs"].values()}
    wanted = {rule: _unquote(res["gres"]) for rule, res in _profile()["set-resources"].items() if "gres" in res}
    for rule, rec in by_rule.items():
        assert rec["Partition"] == slurm_cluster.cpu_partition
        if rule in wanted:
            name, count = wanted[rule].split(":")
            assert f"gres/{name}={count}" in rec["AllocTRES"].split(","), (rule, rec)
        else:
            assert "gres/npu" not in rec["AllocTRES"], (rule, rec)


@pytest.mark.slurm
@pytest.mark.e2e
def test_failing_job_log_reaches_the_terminal(slurm_cluster, tmp_path):
    project = copy_project(tmp_path / "project")
    (project / "bad.yaml").write_text("data: {sha256: '" + "0" * 64 + "'}\n")  # the archive will not match
    proc = snakemake(project, "--profile", "profiles/slurm", *cpu_settings(slurm_cluster),
                     "--configfile", "config.yaml", "bad.yaml", "--", "results/data/train.json",
                     check=False, timeout=600, env=slurm_cluster.env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    log = (project / "results/logs/download_data.log").read_text()
    assert "sha256" in log, log
    # profiles/default's show-failed-logs prints the rule's log after the error, under this header
    header = "Logfile results/logs/download_data.log:"
    assert header in out, out[-4000:]
    shown = out.split(header, 1)[1]
    last_line = [line for line in log.splitlines() if line.strip()][-1].strip()
    assert last_line in shown, (last_line, shown[:3000])
    assert "SLURM-job" in out and "FAILED" in out  # the plugin's own verdict
    ids = SUBMITTED.findall(out)
    jobs = sacct_jobs(slurm_cluster, ids)
    failed = [(i, r) for i, r in jobs.items() if r["Comment"] == "rule_download_data"]
    assert [r["State"] for _, r in failed] == ["FAILED"], jobs
    # ... and the job's SLURM log (the jobstep's snakemake) follows it. Snakemake 9.27.1 prints it
    # only after a non-empty rule log: show_logs stops at the first missing or empty file.
    slurm_log = project / ".snakemake" / "slurm_logs" / "rule_download_data" / f"{failed[0][0]}.log"
    assert f"Logfile {slurm_log}:" in shown, shown[:3000]


def _test_only(cluster, args: list[str]):
    return cluster.run("sbatch", "--test-only", *args, "--wrap", "true", check=False)


def profile_requests() -> dict[str, list[str]]:
    """sbatch options for each rule profiles/slurm sets resources for, as the plugin builds them
    (partition, runtime, memory from default-resources; gres; slurm_extra)."""
    prof = _profile()
    defaults = prof["default-resources"]
    requests = {}
    for rule, res in prof["set-resources"].items():
        merged = {**defaults, **res}
        args = ["-p", _unquote(merged["slurm_partition"]), "-t", str(merged["runtime"]), "--mem", str(merged["mem_mb"])]
        if "gres" in merged:
            args.append(f"--gres={_unquote(merged['gres'])}")
        if "slurm_extra" in merged:
            args += shlex.split(_unquote(merged["slurm_extra"]))
        requests[rule] = args
    return requests


@pytest.mark.slurm
@pytest.mark.e2e
def test_sbatch_test_only_accepts_the_npu_profile_requests(slurm_cluster):
    requests = profile_requests()
    assert {"sft", "merge", "export", "predict"} <= set(requests)
    assert "--exclusive" in requests["sft"] and "--gres=npu:8" in requests["sft"]
    for rule, args in requests.items():
        proc = _test_only(slurm_cluster, args)
        assert proc.returncode == 0 and "to start at" in proc.stderr, (rule, args, proc.stderr)
        gres = [a for a in args if a.startswith("--gres=npu:")]
        if gres:  # the check can fail: one card more than the node has is refused
            more = f"--gres=npu:{int(gres[0].rsplit(':', 1)[1]) + 8}"
            bad = _test_only(slurm_cluster, [more if a == gres[0] else a for a in args])
            assert bad.returncode != 0, (rule, bad.stderr)


def test_profile_slurm_extra_has_no_option_the_plugin_refuses():
    """The plugin raises on options it sets itself (--gres, --mem, ...) in slurm_extra; with
    `--gres=npu:8` there, snakemake 9.27.1 hung at sft instead of failing."""
    from snakemake_executor_plugin_slurm.validation import get_forbidden_slurm_options

    for rule, res in _profile()["set-resources"].items():
        extra = _unquote(res.get("slurm_extra", ""))
        refused = [name for pattern, name in get_forbidden_slurm_options().items() if re.search(pattern, extra)]
        assert not refused, (rule, extra, refused)


def test_profile_gres_match_the_rules_npu_resources(tmp_path):
    """Every rule that declares npu=<cards> on the npu target asks SLURM for those cards, and no
    other rule asks for any (the default config: 8 cards)."""
    project = copy_project(tmp_path / "project")
    out = snakemake(project, "-n", "--config", "target=npu", "--", "results/metrics.json").stdout
    declared = {}
    rule = None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.search(r"resources: .*\bnpu=(\d+)", line)
        if m and rule:
            declared[rule] = int(m.group(1))
    assert declared.get("sft") == 8, declared
    profile = {r: _unquote(res["gres"]) for r, res in _profile()["set-resources"].items() if "gres" in res}
    wanted = {r: f"npu:{n}" for r, n in declared.items() if n > 0}
    assert profile == wanted


@pytest.mark.slurm
@pytest.mark.e2e
def test_slurm_overhead_bench_quick(slurm_cluster, tmp_path):
    """bench/slurm_overhead.py --quick on this session's cluster, so the benchmark cannot rot."""
    out = tmp_path / "slurm_overhead.json"
    proc = subprocess.run(
        [PYTHON, str(ROOT / "bench" / "slurm_overhead.py"), "--quick", "--slurm-conf", str(slurm_cluster.conf),
         "--partition", slurm_cluster.cpu_partition, "--json-out", str(out)],
        capture_output=True, text=True, timeout=900, env=slurm_cluster.env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["jobs_per_run"] >= 2
    assert result["overhead_per_job_seconds"]["runs"] == 1
    assert {r["jobs"] for r in result["runs"]["slurm"] + result["runs"]["local"]} == {result["jobs_per_run"]}
