"""sft's progress on the terminal (step/total, loss, rate, elapsed, time left), its plain-text log,
and what asking for sft again does: retrain after a finished run, resume after a crash.

Unit tests of the progress lines and the terminal filter (``llamapipe.stages.progress``), the
rule's shell line run by bash as Snakemake runs it, then real runs of the cpu target's sft.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llamapipe.core.logs import OUR_LINE, format_line
from llamapipe.stages import progress
from llamapipe.stages.progress import Progress, TerminalFilter, duration, parse_plan, plan_message

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_duration_is_hours_minutes_seconds():
    assert [duration(s) for s in (0, 59.6, 61, 3725, 90000)] == ["0:00:00", "0:01:00", "0:01:01", "1:02:05",
                                                                 "25:00:00"]


def test_progress_line_has_rate_eta_and_is_throttled_but_first_and_last_always_show():
    clock = Clock()
    p = Progress(100, interval_s=30, clock=clock)
    clock.now += 10  # model loading: elapsed counts it, the rate does not
    p.begin(0)
    clock.now += 2
    assert p.update(1, 2.5, tokens_per_step=1000) == (
        "step 1/100 (1%) | loss 2.5000 | 500 tokens/s | 2.00 s/step | elapsed 0:00:12 | left 0:03:18")
    clock.now += 2
    assert p.update(2, 2.4, tokens_per_step=1000) is None  # 2 s after the last line shown
    clock.now += 28  # 30 s after it, step 16: 16 steps in 32 s
    assert p.update(16, 2.0, tokens_per_step=1000) == (
        "step 16/100 (16%) | loss 2.0000 | 500 tokens/s | 2.00 s/step | elapsed 0:00:42 | left 0:02:48")
    clock.now += 1
    line = p.update(100, 1.0, tokens_per_step=1000)  # the last step, 1 s later
    assert line is not None and line.startswith("step 100/100 (100%) | loss 1.0000 |")
    assert line.endswith("| left 0:00:00")
    assert p.update(100, 1.0) is None  # never twice


def test_a_resumed_run_measures_its_rate_from_the_step_it_resumed_at():
    clock = Clock()
    p = Progress(1000, clock=clock)
    p.begin(600)
    clock.now += 40
    assert p.update(610, 1.5, tokens_per_step=2000) == (
        "step 610/1000 (61%) | loss 1.5000 | 500 tokens/s | 4.00 s/step | elapsed 0:00:40 | left 0:26:00")


def test_without_a_baseline_the_first_line_has_no_rate_yet():
    clock = Clock()
    p = Progress(10, clock=clock)
    assert p.update(1, 3.0, samples_per_second=12.5) == (
        "step 1/10 (10%) | loss 3.0000 | 12.50 samples/s | elapsed 0:00:00 | left ?")
    clock.now += 60
    assert p.update(4, 2.0).endswith("| 20.00 s/step | elapsed 0:01:00 | left 0:02:00")


def test_plan_lines_read_back():
    assert plan_message(0, 6) == "training from scratch: 6 steps"
    assert plan_message(300, 1000) == "resuming from checkpoint-300 of 1000 steps"
    assert parse_plan(format_line("llamapipe.sft", plan_message(300, 1000))) == (300, 1000, False)
    assert plan_message(6, 6) == "resuming from checkpoint-6 of 6 steps, none left to train"
    assert parse_plan(plan_message(6, 6, "run_finetune.py")) == (6, 6, True)
    upstream = plan_message(0, 100, "run_finetune.py")
    assert upstream == "training from scratch: 100 steps (upstream's run_finetune.py)"
    assert parse_plan(upstream) == (0, 100, True)
    assert parse_plan("loss: 1.0, learning_rate: 0.1, global_step: 3") is None


# launcher output on the npu target: worker 0's log (colorlog in colour) among the launcher's own lines
PLAN = "2026-12-06 10:00:00,000 INFO llamapipe.sft: training from scratch: 3 steps (upstream's run_finetune.py)"
UPSTREAM_OUTPUT = [
    "LAUNCH INFO 2026-12-06 10:00:00,500 -----------  Configuration  ----------------------",
    "\x1b[32m[2026-12-06 10:00:10,000] [    INFO]\x1b[0m - loss: 7.66448736, learning_rate: 0.0006, global_step: 1, "
    "interval_runtime: 0.2, interval_samples_per_second: 40.5",
    "[2026-12-06 10:00:12,000] [    INFO] - loss: 7.1, learning_rate: 0.0012, global_step: 2, interval_runtime: 0.2",
    "[2026-12-06 10:00:50,000] [    INFO] - loss: 6.5, learning_rate: 0.0018, global_step: 3, interval_runtime: 0.2",
]


def test_terminal_filter_shows_our_lines_and_turns_upstreams_loss_lines_into_progress():
    """Timed by the lines' own stamps: they all arrive at once here, as the launcher relays them."""
    keep = TerminalFilter(interval_s=30, clock=lambda: 0.0)
    shown = [x for line in [PLAN, *UPSTREAM_OUTPUT, "\x1b[31mTraceback ...\x1b[0m"] for x in keep.feed(line + "\n")]
    assert shown[0] == PLAN
    assert all(OUR_LINE.match(x) for x in shown) and not any("\x1b" in x for x in shown)
    # step 1 (first), step 2 dropped (2 s later), step 3 (the last): rate measured from step 1
    assert [x.split("llamapipe.sft: ")[1] for x in shown[1:]] == [
        "step 1/3 (33%) | loss 7.6645 | 40.50 samples/s | elapsed 0:00:10 | left ?",
        "step 3/3 (100%) | loss 6.5000 | 20.00 s/step | elapsed 0:00:50 | left 0:00:00",
    ]


def test_terminal_filter_times_unstamped_lines_by_their_arrival():
    clock = Clock()
    keep = TerminalFilter(interval_s=30, clock=clock)
    assert keep.feed("training from scratch: 100 steps (upstream's run_finetune.py)") == []  # not ours: no plan
    plan = PLAN.replace("3 steps", "100 steps")
    clock.now = progress.written_at(plan)  # the plan line's stamp, on this clock
    assert keep.feed(plan) == [plan]
    shown = []
    for step in (1, 2, 11):
        clock.now += 3 if step < 11 else 30
        shown += keep.feed(f"loss: 1.0, learning_rate: 0.1, global_step: {step}")
    assert [x.split("llamapipe.sft: ")[1] for x in shown] == [
        "step 1/100 (1%) | loss 1.0000 | elapsed 0:00:03 | left ?",
        "step 11/100 (11%) | loss 1.0000 | 3.30 s/step | elapsed 0:00:36 | left 0:04:54",
    ]


def test_terminal_filter_leaves_trainer_lines_alone_when_our_stage_reports_itself():
    plan = format_line("llamapipe.sft", plan_message(0, 3))  # cpu: our stage's own plan line
    ours = format_line("llamapipe.sft", "step 1/3 (33%) | loss 7.6645 | elapsed 0:00:01 | left 0:00:02")
    keep = TerminalFilter()
    assert [x for line in [plan, ours, *UPSTREAM_OUTPUT] for x in keep.feed(line)] == [plan, ours]


def test_filter_main_drains_all_input_and_prints_only_what_it_keeps():
    ours = format_line("llamapipe", "sft finished")
    source = io.BytesIO(("noise\n" * 1000 + ours + "\n" + "more noise\n").encode())
    out = io.StringIO()
    assert progress.main(source, out) == 0
    assert out.getvalue() == ours + "\n"
    assert source.read() == b""


def _rule_shell(rule: str) -> str:
    text = (ROOT / "workflow/rules/train.smk").read_text()
    block = re.search(rf"^rule {rule}:\n((?:[ \t]+.*\n|\n)*)", text, re.M).group(1)
    return re.search(r"shell:\n\s+\"(.*)\"", block).group(1)


@pytest.mark.parametrize("status", [0, 3])
def test_sft_rule_tees_its_output_into_the_log_shows_our_lines_and_keeps_the_exit_status(tmp_path, status):
    """The rule's shell line as Snakemake runs it (bash, ``set -euo pipefail``), with a stand-in
    command: the log gets every line, the terminal our own, and the command's status survives."""
    shell = _rule_shell("sft")
    assert "2>&1 | tee {log}" in shell
    ours = format_line("llamapipe.sft", "step 1/2 (50%) | loss 1.0000 | elapsed 0:00:01 | left 0:00:01")
    stand_in = tmp_path / "stage.py"
    stand_in.write_text(f"import sys\nprint('[    INFO] - loss: 1.0, learning_rate: 0.1, global_step: 1')\n"
                        f"print({ours!r}, file=sys.stderr)\nprint('a traceback', file=sys.stderr)\n"
                        f"sys.exit({status})\n")
    log = tmp_path / "sft.log"
    line = shell.replace("{params.cmd}", f"{sys.executable} {stand_in}").replace("{log}", str(log))
    bin_dir = str(Path(sys.executable).parent)  # common.smk puts Snakemake's venv first on PATH
    proc = subprocess.run(["bash", "-c", f"set -euo pipefail; {line}"], capture_output=True, text=True,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == ours + "\n"
    # (stdout and stderr reach the pipe in their own buffering order)
    assert sorted(log.read_text().splitlines()) == sorted(
        ["[    INFO] - loss: 1.0, learning_rate: 0.1, global_step: 1", ours, "a traceback"])


# --- the cpu target's sft, for real -------------------------------------------------------------

OVERLAY = "sft:\n  max_steps: 6\n  save_steps: 3\n  warmup_steps: 1\n  logging_steps: 1\n"
ARGS = ("results/sft", "--cores", "2", "--configfile", "overlay.yaml")


def _summary(project: Path) -> dict:
    return json.loads((project / "results/sft/train_summary.json").read_text())


def _stale(project: Path) -> list[Path]:
    return sorted((project / "results/checkpoints").glob("sft.stale-*"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from conftest import copy_project, snakemake

    project = copy_project(tmp_path_factory.mktemp("progress") / "project")
    (project / "overlay.yaml").write_text(OVERLAY)
    return project, snakemake(project, *ARGS)


@pytest.mark.e2e
def test_sft_shows_progress_on_the_terminal_and_writes_a_plain_log(first_run):
    project, proc = first_run
    terminal = proc.stdout + proc.stderr
    assert "INFO llamapipe.sft: training from scratch: 6 steps" in terminal
    assert re.search(r"llamapipe\.sft: step 1/6 \(17%\) \| loss \d+\.\d{4} \| [\d,]+ tokens/s \| \d+\.\d\d s/step "
                     r"\| elapsed \d:\d\d:\d\d \| left \d:\d\d:\d\d", terminal), terminal
    assert re.search(r"llamapipe\.sft: step 6/6 \(100%\) \| loss .* \| left 0:00:00", terminal)
    assert "global_step: 3" not in terminal  # PaddleNLP's own lines stay in the log
    log = (project / "results/logs/sft.log").read_text()
    assert "\x1b[" not in log
    assert "step 6/6 (100%)" in log and "global_step: 3" in log and "training from scratch: 6 steps" in log


@pytest.mark.e2e
def test_sft_asked_again_retrains_after_a_finished_run_and_resumes_after_a_crash(first_run):
    from conftest import snakemake
    from test_exact_resume import KILL_HOOK

    project, _ = first_run
    assert not _stale(project)
    # a finished run, asked for again: its checkpoints moved aside, training from scratch
    again = snakemake(project, *ARGS, "--forcerun", "sft")
    terminal = again.stdout + again.stderr
    (aside,) = _stale(project)
    assert f"results/checkpoints/sft holds a finished run (all 6 of 6 steps done): moved to " \
           f"results/checkpoints/{aside.name}" in terminal
    assert "training from scratch: 6 steps" in terminal
    assert (aside / "checkpoint-6").is_dir()
    assert (_summary(project)["resumed_from"], _summary(project)["steps_this_run"]) == (None, 6)

    # a crash after step 4 (checkpoint-3 complete): the rule fails through the tee pipeline ...
    hook = project.parent / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    crashed = snakemake(project, *ARGS, "--forcerun", "sft", check=False,
                        env={"PYTHONPATH": str(hook), "KILL_AFTER_STEP": "4"})
    assert crashed.returncode != 0
    assert len(_stale(project)) == 2  # the second finished run set aside as it started
    assert not (project / "results/sft").exists()
    # ... and the rerun resumes, saying so
    resumed = snakemake(project, *ARGS)
    assert "resuming from checkpoint-3 of 6 steps" in resumed.stdout + resumed.stderr
    assert _summary(project)["resumed_from"].endswith("checkpoint-3")
    assert _summary(project)["steps_this_run"] == 3
    assert len(_stale(project)) == 2

    # the output deleted, the same config: a finished run again, so from scratch
    import shutil

    shutil.rmtree(project / "results/sft")
    fresh = snakemake(project, *ARGS)
    assert "holds a finished run" in fresh.stdout + fresh.stderr
    assert len(_stale(project)) == 3
    assert _summary(project)["resumed_from"] is None


@pytest.mark.e2e
def test_a_finished_run_from_before_run_state_is_used_as_is_not_trained_past_max_steps(first_run):
    """Checkpoints from before run_state.json (the first run after upgrading) resume; when the last
    one is at max_steps nothing is trained: PaddleNLP's Trainer would run step 7 of 6 (at LR 0)."""
    import shutil

    from conftest import snakemake

    project, _ = first_run
    weights = (project / "results/sft/model_state.pdparams").read_bytes()
    shutil.rmtree(project / "results/sft")
    (project / "results/checkpoints/sft/run_state.json").unlink()  # as written before this change
    again = snakemake(project, *ARGS)
    assert "resuming from checkpoint-6 of 6 steps, none left to train" in again.stdout + again.stderr
    summary = _summary(project)
    assert (summary["global_step"], summary["steps_this_run"]) == (6, 0)
    assert (project / "results/sft/model_state.pdparams").read_bytes() == weights
    steps = [json.loads(x)["step"] for x in (project / "results/sft/train_log.jsonl").read_text().splitlines()]
    assert max(steps) == 6


def test_paddlenlps_logger_writes_no_colour_codes_under_no_color():
    """What the npu script's ``export NO_COLOR=1`` relies on in upstream's own processes (the cpu
    stage also swaps the formatter: ``core.paddle_env.quiet_paddlenlp``)."""
    code = "from paddlenlp.utils.log import logger; logger.info('loss: 1.0')"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "NO_COLOR": "1"})
    coloured = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "loss: 1.0" in plain.stderr and "\x1b[" not in plain.stderr
    assert "\x1b[" in coloured.stderr  # what a rule log held before


# --- the npu target's sft script, rehearsed: the real launcher around a stand-in trainer ------------

# Behaves as run_finetune.py does where our plumbing meets it: resumes from the newest complete
# checkpoint of --output_dir, logs the Trainer's loss line per step through colorlog's colours
# (unless NO_COLOR), saves checkpoints with .checkpoint_done, then the final model.
STAND_IN_TRAINER = """\
import argparse, json, os, sys, time
from pathlib import Path
if os.environ.get("PADDLE_TRAINER_ID", "0") != "0":
    sys.exit(0)  # one writer: the rehearsal's default layout starts two ranks, rank 0 logs and saves
p = argparse.ArgumentParser()
for flag in ("--output_dir", "--max_steps", "--save_steps"):
    p.add_argument(flag)
a, _ = p.parse_known_args()
out, total, every = Path(a.output_dir), int(a.max_steps), int(a.save_steps)
out.mkdir(parents=True, exist_ok=True)
done = sorted(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*") if (d / ".checkpoint_done").exists())
start = done[-1] if done else 0
def info(msg):
    now = time.time()
    head = time.strftime("[%Y-%m-%d %H:%M:%S", time.localtime(now)) + ",%03d] [    INFO]" % (now % 1 * 1000)
    print(head + " - " + msg if "NO_COLOR" in os.environ else "\\x1b[32m" + head + "\\x1b[0m - " + msg,
          file=sys.stderr, flush=True)
info("stand-in trainer: resuming after step %d" % start)
for step in range(start + 1, total + 1):
    time.sleep(0.5)
    info("loss: %s, learning_rate: 0.0001, global_step: %d, interval_runtime: 0.2, "
         "interval_samples_per_second: 40.0, progress_or_epoch: 0.1" % (8 - step / 10, step))
    if step % every == 0:
        (out / ("checkpoint-%d" % step)).mkdir()
        (out / ("checkpoint-%d" % step) / ".checkpoint_done").write_text("")
(out / "config.json").write_text('{"model_type": "llama"}')
(out / "model_state.pdparams").write_bytes(b"weights")
(out / "trainer_state.json").write_text(json.dumps({"global_step": total}))
"""


@pytest.mark.e2e
def test_npu_sft_script_shows_upstreams_progress_and_retrains_a_finished_run(tmp_path):
    from conftest import copy_project, snakemake
    from llamapipe.config import rehearsal
    from test_rehearsal import fake_checkout

    project = copy_project(tmp_path / "project")
    checkout = fake_checkout(tmp_path / "PaddleNLP")
    (checkout / "llm/run_finetune.py").write_text(STAND_IN_TRAINER)
    (project / "overlay.yaml").write_text(OVERLAY)
    args = ["results/sft", "--cores", "2", "--configfile", "overlay.yaml", "--config", "target=npu", "rehearsal=cpu"]
    env = {rehearsal.CHECKOUT_ENV: str(checkout)}
    first = snakemake(project, *args, env=env)
    terminal = first.stdout + first.stderr
    assert "INFO llamapipe.sft: training from scratch: 6 steps (upstream's run_finetune.py)" in terminal
    assert re.search(r"llamapipe\.sft: step 1/6 \(17%\) \| loss 7\.9000 \| 40\.00 samples/s \| elapsed "
                     r"\d:\d\d:\d\d \| left \?", terminal), terminal
    last = re.search(r"llamapipe\.sft: step 6/6 \(100%\) \| loss 7\.4000 \| 40\.00 samples/s \| (\d+\.\d\d) s/step "
                     r"\| elapsed \d:\d\d:\d\d \| left 0:00:00", terminal)
    assert last and 0.4 <= float(last.group(1)) < 1.5, terminal  # timed by the lines' stamps: 0.5 s a step
    assert "global_step: 3" not in terminal
    for log in (project / "results/logs/sft.log", project / "results/logs/sft_launch/workerlog.0"):
        text = log.read_text()
        assert "global_step: 6" in text and "\x1b[" not in text, log
    assert json.loads((project / "results/sft/train_summary.json").read_text())["logged_steps"] == 6

    again = snakemake(project, *args, "--forcerun", "sft", env=env)
    terminal = again.stdout + again.stderr
    (aside,) = _stale(project)
    assert "results/checkpoints/sft holds a finished run (all 6 of 6 steps done)" in terminal
    assert "training from scratch: 6 steps (upstream's run_finetune.py)" in terminal
    assert sorted(p.name for p in aside.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert "stand-in trainer: resuming after step 0" in (project / "results/logs/sft.log").read_text()
