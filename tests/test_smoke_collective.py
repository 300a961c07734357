"""The collective smoke test (rule smoke_collective, npu target, before sft).

- Its verdicts, with a stand-in launcher that writes the ranks' reports: a wrong all-reduce sum,
  fewer ranks than cards, a rank that hangs past the timeout, and the report of a good run.
- For real in the rehearsal (``--config target=npu rehearsal=cpu``): two gloo processes through
  ``paddle.distributed.launch`` in sft's environment, and a rank that hangs failing the rule
  within the timeout, naming it. The rule reads nothing of upstream's checkout (its script only
  ``cd``s into it, as sft's does), so a stand-in checkout serves and these run in CI too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_project, snakemake
from llamapipe.config import rehearsal
from llamapipe.core.errors import PipelineError
from llamapipe.scaleout import collective_check
from test_npu_commands import NPU_ENV
from test_rehearsal import fake_checkout

# --- the supervisor's verdicts (a stand-in launcher; no paddle) ---------------------------------

FAKE_LAUNCHER = """
import json, os, sys, time
reports, ranks, sleep = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
for r in ranks:
    with open(os.path.join(reports, f"rank{r['rank']}.json"), "w") as f:
        json.dump(r, f)
time.sleep(sleep)
"""


def rank_report(rank: int, world: int = 2, got: float = 3.0, phase: str = "done") -> dict:
    expected = world * (world + 1) / 2
    return {"rank": rank, "pid": 0, "host": "h", "phase": phase, "elapsed_s": 1.5, "world_size": world,
            "device": "cpu", "card": None, "visible_devices": None, "seconds": {},
            "env": {"HCCL_X": "1", "PADDLE_TRAINER_ID": str(rank)},
            "all_reduce": {"expected": expected, "got": got, "wrong_elements": 0 if got == expected else 8,
                           "elements": 8, "ok": got == expected},
            "matmul": {"shape": [64, 64], "max_abs_error": 0.0, "ok": True}}


def supervise(tmp_path: Path, ranks: list[dict], cards: str = "0,1", sleep: float = 0, timeout: float = 30):
    reports, out = tmp_path / "logs/ranks", tmp_path / "smoke.json"
    launch = [sys.executable, "-c", FAKE_LAUNCHER, str(reports), json.dumps(ranks), str(sleep)]
    return collective_check.run(launch, cards.split(","), timeout, str(reports), str(tmp_path / "logs"), str(out))


def test_a_good_run_is_reported_with_the_environment_split_common_and_per_rank(tmp_path):
    result = supervise(tmp_path, [rank_report(0), rank_report(1)])
    written = json.loads((tmp_path / "smoke.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["ok"] and written["world_size"] == 2 and written["devices"] == [0, 1]
    assert [r["all_reduce"]["got"] for r in written["ranks"]] == [3.0, 3.0]
    assert written["environment"] == {"common": {"HCCL_X": "1"},
                                      "per_rank": {"0": {"PADDLE_TRAINER_ID": "0"}, "1": {"PADDLE_TRAINER_ID": "1"}}}


def test_a_wrong_all_reduce_sum_fails(tmp_path):
    with pytest.raises(PipelineError, match=r"rank 1: all-reduce sum 2.0 \(8 of 8 elements wrong\), expected 3.0"):
        supervise(tmp_path, [rank_report(0), rank_report(1, got=2.0)])
    assert not (tmp_path / "smoke.json").exists()


def test_fewer_ranks_than_cards_fail_naming_the_missing_ones(tmp_path):
    with pytest.raises(PipelineError) as err:
        supervise(tmp_path, [rank_report(0, world=1)], cards="4,5")
    message = str(err.value)
    assert "1 of the 2 ranks asked for reported; did not report: rank 1: no sign of life" in message
    assert "rank 0: world size 1, not the 2 cards asked for" in message


def test_a_hang_past_the_timeout_stops_the_launcher_and_names_where_each_rank_stopped(tmp_path):
    started = time.monotonic()
    with pytest.raises(PipelineError) as err:
        supervise(tmp_path, [rank_report(0, phase="all_reduce")], sleep=600, timeout=2)
    assert time.monotonic() - started < 10  # the stand-in launcher dies on the SIGTERM
    assert str(err.value) == (
        "timed out after 2 s (npu.smoke_timeout_s): 0 of the 2 ranks reported; did not report: "
        "rank 0: stuck in all_reduce (entered 1.5 s after it started); "
        "rank 1: no sign of life (its script never started or wrote nothing)")


# --- for real: the rehearsal's rule ---------------------------------------------------------------

SMOKE = ["results/smoke_collective.json", "--config", "target=npu", "rehearsal=cpu"]
# sitecustomize: the rank named by HANG_RANK sleeps before the smoke script starts
HANG = """
import os, sys, time
if sys.argv and sys.argv[0].endswith("smoke_collective.py") and \\
        os.environ.get("PADDLE_TRAINER_ID") == os.environ.get("HANG_RANK"):
    time.sleep(3600)
"""


def _project(tmp_path: Path) -> tuple[Path, dict]:
    project = copy_project(tmp_path / "project")
    return project, {rehearsal.CHECKOUT_ENV: str(fake_checkout(tmp_path / "PaddleNLP"))}


def _processes_running(marker: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text and "smoke_collective" in text:
            found.append(text)
    return found


@pytest.mark.e2e
def test_two_launched_ranks_sum_in_sfts_environment(tmp_path):
    project, env = _project(tmp_path)
    snakemake(project, "--cores", "2", *SMOKE, env=env, timeout=600)
    report = json.loads((project / "results/smoke_collective.json").read_text())
    assert report["ok"] and report["world_size"] == 2 and report["devices"] == [0, 1]
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    for rank in report["ranks"]:
        assert rank["all_reduce"] == {"expected": 3.0, "got": 3.0, "wrong_elements": 0, "elements": 1 << 20,
                                      "ok": True}
        assert rank["matmul"] == {"shape": [64, 64], "max_abs_error": 0.0, "ok": True}
        assert (rank["world_size"], rank["device"]) == (2, "cpu")
    common, per_rank = report["environment"]["common"], report["environment"]["per_rank"]
    assert {k: common[k] for k in NPU_ENV} == NPU_ENV  # config.yaml's npu.env, exported as sft does
    assert (common["PADDLE_TRAINERS_NUM"], common["PADDLE_DISTRI_BACKEND"]) == ("2", "gloo")
    assert [per_rank[r]["PADDLE_TRAINER_ID"] for r in ("0", "1")] == ["0", "1"]
    assert 0 < report["elapsed_s"] < report["timeout_s"] == 300
    assert report["launcher"][:6] == ["python", "-u", "-m", "paddle.distributed.launch", "--nproc_per_node", "2"]
    log = (project / "results/logs/smoke_collective.log").read_text()
    assert "HCCL_INTRA_ROCE_ENABLE=1" in log and "smoke_collective: ok: 2 rank(s)" in log


@pytest.mark.e2e
def test_a_rank_that_hangs_fails_the_rule_within_the_timeout_naming_it(tmp_path):
    project, env = _project(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG)
    (project / "smoke.yaml").write_text("npu:\n  smoke_timeout_s: 20\n")
    started = time.monotonic()
    proc = snakemake(project, "--cores", "2", SMOKE[0], "--configfile", "smoke.yaml", *SMOKE[1:], check=False,
                     env={**env, "PYTHONPATH": str(hook), "HANG_RANK": "1"}, timeout=600)
    took = time.monotonic() - started
    assert proc.returncode != 0
    message = ("timed out after 20 s (npu.smoke_timeout_s): 0 of the 2 ranks reported; did not report: "
               "rank 0: stuck in ")
    assert message in (project / "results/logs/smoke_collective.log").read_text()
    shown = proc.stdout + proc.stderr  # the failed log, on the terminal
    assert message in shown and "rank 1: no sign of life" in shown
    assert took < 20 + collective_check.STOP_GRACE_S + 60, took
    assert not (project / "results/smoke_collective.json").exists()
    assert not _processes_running(str(project.resolve())), "ranks left running"
    assert os.path.isdir(project / "results/logs/smoke_collective_launch")  # workerlogs kept for a look
