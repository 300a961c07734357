"""`make dry-run`: CI's check of every target's DAG without the Paddle stack (issue 21, item 9).

It plans the default target for config.yaml as is (target cpu), for target=npu and for the
rehearsal (target=npu rehearsal=cpu), in the light venv .venv-dry (envs/dry-run-requirements.txt)
and in a copy of the checkout's files, so existing results never make it say "Nothing to be done".
The Makefile creates the venv the first time (~1.5 min) and reuses it while its requirements are
unchanged (.venv-dry/.installed); these tests run the real `make`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DRY_VENV = ROOT / ".venv-dry"

CPU_RULES = {"preflight", "download_data", "prepare_data", "init_model", "sft", "merge", "export", "predict",
             "evaluate", "plots", "report_tables", "provenance"}
NPU_RULES = CPU_RULES | {"plan", "pull_image", "build_image", "preflight_image", "build_ops", "smoke_collective"}
# the rehearsal: no image of its own; the PaddleNLP clone, since LLAMAPIPE_PADDLENLP_SRC is unset
REHEARSAL_RULES = CPU_RULES | {"plan", "preflight_image", "build_ops", "smoke_collective", "paddlenlp_checkout"}
SECTIONS = ["(config.yaml as is: target cpu)", "--config target=npu", "--config target=npu rehearsal=cpu"]


def make(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    # A make variable set outside (DRY_RUN_CONFIGFILE=... in the environment) must not leak in.
    clean = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN_CONFIGFILE", "MAKEFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "--no-print-directory", "-C", str(cwd), *args], capture_output=True, text=True,
                          timeout=1800, env={**clean, **(env or {})})


def planned(stdout: str) -> dict:
    """Each dry-run's header (what follows `snakemake -n -p `) -> the rules it would run."""
    sections, rules = {}, None
    for line in stdout.splitlines():
        if line.startswith("=== make dry-run: snakemake -n -p "):
            rules = sections.setdefault(line.removeprefix("=== make dry-run: snakemake -n -p "), set())
        elif rules is not None and (m := re.match(r"(?:local)?rule (\w+):$", line)):
            rules.add(m.group(1))
    return sections


def assert_every_target_planned(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Nothing to be done" not in out
    sections = planned(proc.stdout)
    assert list(sections) == SECTIONS, out[-3000:]
    cpu, npu, rehearsal = (sections[s] for s in SECTIONS)
    assert cpu >= CPU_RULES and not cpu & (NPU_RULES - CPU_RULES), sorted(cpu)
    assert npu >= NPU_RULES, sorted(npu)
    assert rehearsal >= REHEARSAL_RULES, sorted(rehearsal)
    # -p: the commands are printed (the npu sft line is upstream's run_finetune.py in the image)
    npu_out = proc.stdout.split("=== make dry-run: snakemake -n -p --config target=npu\n")[1].split("=== make")[0]
    sft = re.search(r"^rule sft:\n(?:.*\n)*?Shell command: (.*)$", npu_out, re.M)
    assert sft and "run_finetune.py" in sft.group(1), npu_out[-3000:]


@pytest.fixture(scope="module")
def light_venv() -> Path:
    """.venv-dry, made by the Makefile (or reused); its creation time is printed with -s."""
    start = time.monotonic()
    proc = make(".venv-dry/.installed")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    print(f"\n.venv-dry ready in {time.monotonic() - start:.0f} s")
    return DRY_VENV


def test_light_venv_has_no_paddle_stack(light_venv):
    site = next(light_venv.glob("lib/python*/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert {"snakemake", "pyyaml", "jsonschema", "llamapipe"} <= installed
    assert not installed & {"paddlepaddle", "paddlenlp", "numpy", "pandas", "matplotlib", "docker", "datasets"}


def test_make_dry_run_plans_cpu_npu_and_rehearsal(light_venv):
    # set here to prove the Makefile unsets it: with it the rehearsal would not plan the clone
    start = time.monotonic()
    proc = make("dry-run", env={"LLAMAPIPE_PADDLENLP_SRC": str(ROOT)})
    print(f"\nmake dry-run: {time.monotonic() - start:.1f} s")
    assert_every_target_planned(proc)
    # printed as the checkout's paths, not the throw-away copy's
    assert not re.search(r"/tmp\.\w+/project", proc.stdout)


def test_make_dry_run_fails_when_one_target_fails(light_venv, tmp_path):
    """A config that breaks only the first dry-run (the two npu ones override its target): make
    fails, names that one, and the two after it still ran."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: bogus\n")
    proc = make("dry-run", f"DRY_RUN_CONFIGFILE={bad}")
    assert proc.returncode != 0
    assert "=== make dry-run FAILED: [config.yaml]\n" in proc.stderr, proc.stderr[-3000:]
    assert "bogus" in proc.stdout
    sections = planned(proc.stdout)
    assert sections[SECTIONS[0]] == set()
    assert sections[SECTIONS[1]] >= NPU_RULES and sections[SECTIONS[2]] >= REHEARSAL_RULES


def test_make_dry_run_lists_every_job_where_results_exist(light_venv, tmp_path):
    """A checkout (copied, git-initialised) whose whole cpu DAG is built and up to date: a plain
    `snakemake -n` there says "Nothing to be done"; `make dry-run` there still plans every job."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    tree = tmp_path / "checkout"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    snakemake = str(light_venv / "bin/snakemake")
    env = {k: v for k, v in os.environ.items() if k != "LLAMAPIPE_PADDLENLP_SRC"}
    plan = subprocess.run([snakemake, "-n"], cwd=tree, capture_output=True, text=True, env=env, check=True).stdout
    outputs = [p.strip() for line in re.findall(r"^\s+output: (.*)$", plan, re.M) for p in line.split(",")]
    assert "results/metrics.json" in outputs
    now = time.time()
    for out in outputs:  # the rule outputs with no suffix are directory() outputs
        path = tree / out
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    for out in outputs:  # all equally new: none older than its inputs
        os.utime(tree / out, (now, now))
    again = subprocess.run([snakemake, "-n"], cwd=tree, capture_output=True, text=True, env=env)
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]

    # that checkout's own Makefile, with this checkout's light venv (-o: used as it is)
    proc = make("dry-run", f"DRY_VENV={light_venv}", "-o", f"{light_venv}/.installed", cwd=tree)
    assert_every_target_planned(proc)
