"""Fewer cards than the guide's 8 (issue 21, item 3), without Ascend hardware: the layout is chosen
when the workflow is parsed, so real ``snakemake -n`` runs in a copy of the project show it.

* the default ``npu.parallel: auto`` is the guide's tp 8 where it fits, else the planner's choice,
  said in one line and recorded in results/plan.json;
* LoRA is planned as LoRA (frozen base), so llama2-13b LoRA fits 4 cards of 64 GB;
* full fine-tuning of 13b does not fit 4 cards (model states alone are 18 bytes x 13.0B = 234 GB,
  4 x 57.6 GB are usable): refused with the LoRA override, checked to fit;
* a pinned layout that cannot fit is refused with the exact overrides that do, each checked here.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import copy_project, snakemake
from test_npu_target import script_of, shell_commands

FOUR = ["--config", "target=npu", "devices=0,1,2,3"]
LORA = "sft={lora: true}"
CHOSEN_LINE = ("npu.parallel: tp 8, pp 1, sharding 1 does not fit the 4 cards (8 x 1 x 1 = 8 does not divide 4); "
               "using the planner's choice tp 4, pp 1, sharding 1, dp 1, 24.7 GB per card "
               "(set npu.parallel to pin a layout)")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("fewer_cards") / "project")


def _refused(project, *args: str) -> str:
    proc = snakemake(project, "-n", *args, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    return proc.stdout + proc.stderr


def _overrides(message: str) -> list[list[str]]:
    """The KEY=VALUE words of every ``fix: ... --config '...' ...`` line."""
    return [shlex.split(m) for m in re.findall(r"^fix: .*?--config (.*)$", message, re.M)]


def test_four_cards_with_lora_take_the_planners_layout_and_say_so(project):
    proc = snakemake(project, "-n", "-p", "results/metrics.json", *FOUR, LORA)
    assert CHOSEN_LINE in proc.stderr
    cmds = shell_commands(proc.stdout)
    sft = script_of(cmds["sft"])
    assert "--tensor_parallel_degree 4 " in sft and "--pipeline_parallel_degree 1 " in sft
    assert "--lora true --lora_rank 32" in sft and "--devices 0,1,2,3 " in sft
    assert "--sharding " not in sft  # the LoRA command runs without sharding, as upstream's LoRA script
    plan = cmds["plan"]
    assert "--cards 4 " in plan and "--sharding-stage 0 " in plan and "--lora --lora-rank 32 " in plan
    assert "--expect-layout 4,1,1 --prefer 8,1,1 " in plan


def test_eight_cards_keep_the_guides_layout_without_a_word(project):
    proc = snakemake(project, "-n", "-p", "results/metrics.json", "--config", "target=npu", LORA)
    assert "npu.parallel:" not in proc.stdout + proc.stderr
    assert "--tensor_parallel_degree 8 " in script_of(shell_commands(proc.stdout)["sft"])


def test_four_cards_full_fine_tuning_is_refused_with_the_lora_override_that_fits(project):
    message = _refused(project, *FOUR)
    assert "does not divide the 4 cards" not in message  # the old dead end
    assert ("npu.parallel: full fine-tuning (sft.lora false) of meta-llama/Llama-2-13b on 4 cards: nothing fits "
            "in 57.6 GB usable per card (90% of 64 GB); the smallest, tp 4, pp 1, sharding 1, dp 1, needs 75.6 GB"
            ) in message
    assert ("fix: LoRA fits (tp 4, pp 1, sharding 1, dp 1, 24.7 GB per card; the base frozen, no gradients or "
            "optimizer state for it): --config 'sft={lora: true}'") in message
    assert _overrides(message) == [[LORA]]
    proc = snakemake(project, "-n", *FOUR, *_overrides(message)[0])  # the printed override works as printed
    assert CHOSEN_LINE in proc.stderr


def test_a_pinned_layout_that_cannot_fit_is_refused_with_the_exact_overrides(project):
    pin = "npu={parallel: {tensor_parallel_degree: 1, sequence_parallel: false}}"
    message = _refused(project, *FOUR, LORA, pin)
    assert ("npu.parallel: tp 1, pp 1, sharding 1, dp 4 does not fit: it needs 88.9 GB per card, 57.6 GB are usable"
            in message)
    assert ("fix: pin the planner's choice for the 4 cards (tp 4, pp 1, sharding 1, dp 1, 37.3 GB per card): "
            "--config 'npu={parallel: {tensor_parallel_degree: 4, pipeline_parallel_degree: 1, "
            "sharding_parallel_degree: 1, sequence_parallel: false}}'") in message
    assert ("fix: or let the planner choose at every run (tp 4, pp 1, sharding 1, dp 1, 24.7 GB per card now): "
            "--config 'npu={parallel: auto}'") in message
    pinned, auto = _overrides(message)
    proc = snakemake(project, "-n", "-p", "results/metrics.json", *FOUR, LORA, *pinned)
    sft = script_of(shell_commands(proc.stdout)["sft"])
    assert "--tensor_parallel_degree 4 " in sft and "--sequence_parallel false" in sft
    assert "npu.parallel:" not in proc.stderr  # pinned: taken as given, nothing to say
    assert CHOSEN_LINE in snakemake(project, "-n", *FOUR, LORA, *auto).stderr


def test_a_pinned_full_fine_tuning_layout_on_four_cards_is_offered_lora(project):
    message = _refused(project, *FOUR, "npu={parallel: {tensor_parallel_degree: 4}}")
    assert "tp 4, pp 1, sharding 1, dp 1 does not fit: it needs 75.6 GB per card" in message
    assert _overrides(message) == [[LORA, "npu={parallel: auto}"]]
    snakemake(project, "-n", *FOUR, *_overrides(message)[0])


def test_the_plan_rule_records_the_planners_choice_in_plan_json(tmp_path):
    project = copy_project(tmp_path / "project")
    # the plan rule runs after preflight (its measured HBM caps the memory); one that measured nothing,
    # as on a host without cards, leaves the configured 64 GB
    (project / "results").mkdir()
    (project / "results/preflight.json").write_text('{"target": "npu", "problems": []}')
    snakemake(project, "results/plan.json", "--cores", "1", *FOUR, LORA)
    plan = json.loads((project / "results/plan.json").read_text())
    assert [plan["chosen"][k] for k in ("tp", "pp", "sharding", "dp")] == [4, 1, 1, 1]
    assert plan["run_layout"] == {"tp": 4, "pp": 1, "sharding": 1, "fits": True}
    assert plan["preferred"] == {"tp": 8, "pp": 1, "sharding": 1}
    assert plan["preferred_note"] == "does not fit the 4 cards (8 x 1 x 1 = 8 does not divide 4)"
    assert plan["setup"]["lora"] is True and plan["setup"]["lora_rank"] == 32
    assert plan["chosen"]["memory_gb"]["total_gb"] == pytest.approx(24.7, abs=0.05)
