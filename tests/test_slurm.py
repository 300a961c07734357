"""The DAG on a real SLURM cluster: slurmctld + slurmd (one node, count-only ``npu`` gres of 8) and
slurmdbd started by tests/slurm_cluster.py, driven by ``snakemake --profile profiles/slurm`` through
the pinned snakemake-executor-plugin-slurm.

- the cpu DAG (its default target) through the NPU profile with only the cpu settings overridden
  (partition, memory, runtime): one SLURM job in ``sacct`` per job with cards (job comment ``rule_<name>``) and per
  group job of the light rules (``rule_<group>_<its rules>``), exactly what the dry-run planned,
  fewer than the rules, COMPLETED, and the profile's per-rule gres reached SLURM (``gres/npu=8``
  for sft, 1 for merge/export/predict, none for a group job);
- a failing job inside a group job: its log reaches the terminal, and sacct says FAILED;
- ``sbatch --test-only`` accepts each per-rule request of profiles/slurm/config.yaml (read from the
  file) on the generated cluster, and refuses one card more than the node has;
- bench/slurm_overhead.py --quick on the same cluster;
- without a cluster: the profile's slurm_extra holds no option the plugin refuses, its gres
  match the npu resources the rules declare on the npu target (variants too), and its groups
  batch the light rules (one SLURM job for download_data, prepare_data and init_model, one for
  evaluate and the report rules) and are valid on cpu, npu, the rehearsal and with variants.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
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
GROUP_JOB = re.compile(r"Group job (\S+) \(jobs in lexicogr\. order\):")
# The light rules of the plain run (no cards, seconds of work): profiles/slurm's `groups` batch
# them (and their `_variant` rules) with their neighbours, never one SLURM job each.
LIGHT = {"preflight", "download_data", "prepare_data", "init_model", "evaluate", "plots", "report_tables",
         "provenance"}
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


@dataclass(frozen=True)
class Submission:
    """One SLURM job the profile submits: a group job of the light rules or one rule's job."""
    group: str | None
    rules: tuple[str, ...]  # the rules of its jobs, sorted (a group job's name is built from them)

    @property
    def comment(self) -> str:
        """The job comment snakemake-executor-plugin-slurm 2.6.1 gives it (``rule_<job name>``; a
        group job's name is ``<group>_<its rules, sorted, at most 5>``, Snakemake 9.27.1; a job
        with wildcards, a variant's, gets ``_wildcards_<values>`` after it, not modelled here)."""
        if self.group is None:
            return f"rule_{self.rules[0]}"
        names = sorted(set(self.rules))
        return f"rule_{self.group}_{'_'.join(names[:5] + (['...'] if len(names) > 5 else []))}"


def planned_submissions(project: Path, *args: str) -> list[Submission]:
    """The SLURM jobs ``snakemake --profile profiles/slurm`` submits for the DAG, read from its
    dry-run (which applies the profile's groups): one per group job, one per ungrouped job."""
    out = snakemake(project, "-n", "--profile", "profiles/slurm", *args).stdout
    units: list[tuple[str | None, list[str]]] = []
    for line in out.splitlines():
        m = GROUP_JOB.search(line)
        if m:
            units.append((m.group(1), []))
            continue
        m = re.match(r"^(    )?rule (\w+):$", line)
        if m and m.group(2) == "all":  # no command (norun): Snakemake finishes it itself
            continue
        if m and m.group(1):
            assert units and units[-1][0] is not None, line
            units[-1][1].append(m.group(2))
        elif m:
            units.append((None, [m.group(2)]))
    return [Submission(group, tuple(sorted(rules))) for group, rules in units]


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
    """The cpu DAG's default target (metrics, plots, report tables, provenance) as `snakemake
    --profile profiles/slurm`: each job with cards a SLURM job, the light rules in group jobs."""
    project = copy_project(tmp_path_factory.mktemp("slurm") / "project")
    _write_small(project)
    args = ("--configfile", "config.yaml", "small.yaml")
    expected = planned_jobs(project, *args)
    submissions = planned_submissions(project, *cpu_settings(slurm_cluster), *args)
    start = time.monotonic()
    proc = snakemake(project, "--profile", "profiles/slurm", *cpu_settings(slurm_cluster), *args,
                     check=False, timeout=1500, env=slurm_cluster.env())
    wall = time.monotonic() - start
    if proc.returncode != 0:  # the SLURM logs hold what failed before a rule's own log was written
        raise AssertionError(f"snakemake --profile profiles/slurm failed:\n{proc.stderr[-5000:]}"
                             f"{slurm_logs(project)}\n{slurm_cluster.log_tails()}")
    job_ids = SUBMITTED.findall(proc.stdout + proc.stderr)
    print(f"[slurm run] {len(job_ids)} SLURM jobs for {len(expected)} rules, {wall:.0f} s", flush=True)
    return {"project": project, "proc": proc, "expected": expected, "submissions": submissions,
            "job_ids": job_ids, "jobs": sacct_jobs(slurm_cluster, job_ids)}


@pytest.mark.slurm
@pytest.mark.e2e
def test_every_rule_ran_in_a_completed_slurm_job(slurm_run):
    jobs, submissions = slurm_run["jobs"], slurm_run["submissions"]
    # the rules the dry-run without the profile plans, each in exactly one planned SLURM job
    assert sorted(r for s in submissions for r in s.rules) == sorted(slurm_run["expected"]), submissions
    assert len(slurm_run["job_ids"]) == len(submissions), (slurm_run["job_ids"], submissions)
    assert set(jobs) == set(slurm_run["job_ids"]), jobs
    assert sorted(r["Comment"] for r in jobs.values()) == sorted(s.comment for s in submissions), jobs
    assert {r["State"] for r in jobs.values()} == {"COMPLETED"}, jobs
    assert len({r["JobName"] for r in jobs.values()}) == 1  # the plugin names every job by the run's id
    metrics = slurm_run["project"] / "results" / "metrics.json"
    assert metrics.exists() and "bleu-4" in metrics.read_text()


@pytest.mark.slurm
@pytest.mark.e2e
def test_light_rules_shared_slurm_jobs(slurm_run):
    """The light rules went to SLURM batched, not one sbatch each (bench/RESULTS.md: 16-28 s of
    scheduling per SLURM job): download_data, prepare_data and init_model in one job, evaluate and
    the report's rules in another, that one on one CPU (its rules one after another: `serial`;
    side by side they asked for 3 CPUs, and the test node's 2 never started it)."""
    jobs = {r["Comment"]: r for r in slurm_run["jobs"].values()}
    assert len(slurm_run["job_ids"]) < len(slurm_run["expected"]), (slurm_run["job_ids"], slurm_run["expected"])
    assert "rule_prep_download_data_init_model_prepare_data" in jobs, jobs
    assert jobs["rule_report_evaluate_plots_provenance_report_tables"]["AllocCPUS"] == "1", jobs
    assert not set(jobs) & {f"rule_{r}" for r in LIGHT}, jobs


@pytest.mark.slurm
@pytest.mark.e2e
def test_profile_requests_reached_slurm(slurm_run, slurm_cluster):
    """The NPU profile's per-rule gres were part of the real submissions (cpu target, same profile);
    no group job of light rules holds cards."""
    by_comment = {s.comment: s for s in slurm_run["submissions"]}
    wanted = {rule: _unquote(res["gres"]) for rule, res in _profile()["set-resources"].items() if "gres" in res}
    for rec in slurm_run["jobs"].values():
        assert rec["Partition"] == slurm_cluster.cpu_partition
        sub = by_comment[rec["Comment"]]
        rule = sub.rules[0] if sub.group is None else None
        if rule in wanted:
            name, count = wanted[rule].split(":")
            assert f"gres/{name}={count}" in rec["AllocTRES"].split(","), (rule, rec)
        else:
            assert "gres/npu" not in rec["AllocTRES"], (rule, rec)


@pytest.mark.slurm
@pytest.mark.e2e
def test_failing_job_log_reaches_the_terminal(slurm_cluster, tmp_path):
    """download_data fails inside the group job it shares with prepare_data (profiles/slurm)."""
    project = copy_project(tmp_path / "project")
    (project / "bad.yaml").write_text("data: {sha256: '" + "0" * 64 + "'}\n")  # the archive will not match
    args = ("--configfile", "config.yaml", "bad.yaml", "--", "results/data/train.json")
    group = [s for s in planned_submissions(project, *cpu_settings(slurm_cluster), *args) if "download_data" in s.rules]
    assert [(s.group, s.rules) for s in group] == [("prep", ("download_data", "prepare_data"))], group
    proc = snakemake(project, "--profile", "profiles/slurm", *cpu_settings(slurm_cluster), *args,
                     check=False, timeout=600, env=slurm_cluster.env())
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    log = (project / "results/logs/download_data.log").read_text()
    assert "sha256" in log, log
    assert f"Error in group {group[0].group}" in out, out[-4000:]  # Snakemake's verdict on the group job
    ids = SUBMITTED.findall(out)
    jobs = sacct_jobs(slurm_cluster, ids)
    failed = [(i, r) for i, r in jobs.items() if r["Comment"] == group[0].comment]
    assert [r["State"] for _, r in failed] == ["FAILED"], jobs
    # profiles/default's show-failed-logs prints, for a failed group job, the job's SLURM log (the
    # jobstep's snakemake), then each rule's log (Snakemake 9.27.1: a missing one is named and
    # skipped; prepare_data never ran), under these headers
    slurm_log = project / ".snakemake" / "slurm_logs" / f"group_{group[0].comment.removeprefix('rule_')}" / \
        f"{failed[0][0]}.log"
    assert f"Logfile {slurm_log}:" in out, out[-4000:]
    header = "Logfile results/logs/download_data.log:"
    assert header in out.split(f"Logfile {slurm_log}:", 1)[1], out[-4000:]
    shown = out.split(header, 1)[1]
    last_line = [line for line in log.splitlines() if line.strip()][-1].strip()
    assert last_line in shown, (last_line, shown[:3000])


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


VARIANTS = "variants={a: {}, b: {seed: 7, data: {max_train: 100}}}"  # b: its own data, model, sft ...
VARIANT_TARGETS = ("results/variants/comparison.html", "results/metrics.json")


def test_profile_gres_match_the_rules_npu_resources(tmp_path):
    """Every rule that declares npu=<cards> on the npu target asks SLURM for those cards, and no
    other rule asks for any (the default config: 8 cards; a variant's rules too)."""
    project = copy_project(tmp_path / "project")
    out = snakemake(project, "-n", "--config", "target=npu", VARIANTS, "--", *VARIANT_TARGETS).stdout
    declared = {}
    rule = None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.search(r"resources: .*\bnpu=(\d+)", line)
        if m and rule:
            declared[rule] = int(m.group(1))
    assert declared.get("sft") == 8 and declared.get("sft_variant") == 8, declared
    profile = {r: _unquote(res["gres"]) for r, res in _profile()["set-resources"].items() if "gres" in res}
    wanted = {r: f"npu:{n}" for r, n in declared.items() if n > 0}
    assert profile == wanted


def test_grouped_rules_run_one_after_another():
    """Every grouped rule takes the group job's one `serial` slot (scope local: per group job, not
    across the cluster), so a group job asks SLURM for its largest rule's CPUs and memory, not the
    sum over rules that could run side by side."""
    prof = _profile()
    assert "serial=1" in prof["resources"] and prof["set-resource-scopes"] == {"serial": "local"}
    for rule in prof["groups"]:
        assert prof["set-resources"].get(rule, {}).get("serial") == 1, rule
        assert {"runtime", "mem_mb"} <= set(prof["set-resources"][rule]), rule  # summed over a group job


# (dry-run arguments, the SLURM jobs the profile must make of that DAG, or None: fewer than its jobs)
GROUPED_DAGS = [
    # bench/slurm_overhead.py's DAG: 9 rules, 7 SLURM jobs (was 9, one a rule)
    (("--configfile", "config.yaml", "small.yaml", "--", "results/metrics.json"),
     [(None, ("export",)), (None, ("merge",)), (None, ("predict",)), (None, ("sft",)),
      ("prep", ("download_data", "init_model", "prepare_data")), ("report", ("evaluate",)),
      ("setup", ("preflight",))]),
    # the default target: evaluate and the report's rules in one job
    (("--configfile", "config.yaml", "small.yaml"),
     [(None, ("export",)), (None, ("merge",)), (None, ("predict",)), (None, ("sft",)),
      ("prep", ("download_data", "init_model", "prepare_data")),
      ("report", ("evaluate", "plots", "provenance", "report_tables")), ("setup", ("preflight",))]),
    (("--config", "target=npu"), None),
    (("--config", "target=npu", "npu={image: {build: false}}"), None),
    (("--config", "target=npu", "rehearsal=cpu"), None),
    (("--config", VARIANTS, "--", *VARIANT_TARGETS), None),
    (("--config", "target=npu", VARIANTS, "--", *VARIANT_TARGETS), None),
]


@pytest.mark.parametrize("args,wanted", GROUPED_DAGS, ids=["cpu-metrics", "cpu-default", "npu", "npu-prebuilt",
                                                           "rehearsal", "cpu-variants", "npu-variants"])
def test_profile_groups_batch_the_light_rules(tmp_path, args, wanted):
    """profiles/slurm's groups, dry-run: valid on each target (a group left and re-entered, or a
    string resource that differs inside a group job, is a WorkflowError here), every light rule
    shares a group job, every rule with cards is a SLURM job of its own. Fails if the light rules
    go back to one sbatch each."""
    project = copy_project(tmp_path / "project")
    _write_small(project)
    subs = planned_submissions(project, *args)
    rules = [r for s in subs for r in s.rules]
    assert len(subs) < len(rules), subs
    if wanted is not None:
        key = lambda unit: (unit[0] or "", unit[1])  # noqa: E731
        assert sorted(((s.group, s.rules) for s in subs), key=key) == sorted(wanted, key=key), subs
    carded = {rule for rule, res in _profile()["set-resources"].items() if "gres" in res}
    for sub in subs:
        light = {r.removesuffix("_variant") for r in sub.rules} & LIGHT
        assert not light or sub.group, sub  # a light rule never alone outside a group
        assert not (set(sub.rules) & carded) or sub.group is None, sub
    groups = {s.group for s in subs if s.group}
    assert "prep" in groups and any(len(s.rules) > 1 for s in subs if s.group == "prep"), subs


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
    assert 1 <= result["slurm_jobs_per_run"] < result["jobs_per_run"]  # the light rules batched
    assert result["overhead_per_job_seconds"]["runs"] == 1
    assert {r["jobs"] for r in result["runs"]["slurm"] + result["runs"]["local"]} == {result["jobs_per_run"]}
