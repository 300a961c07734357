"""Upstream outputs -> our contracts, and the checks that turn upstream's silent exit 0 into a
failure: on files shaped as upstream writes them (layouts seen in the rehearsal's runs)."""

from __future__ import annotations

import json
import os

import pytest

from ci_policy import unavailable
from llamapipe.core.errors import PipelineError
from llamapipe.runners import commands
from llamapipe.stages import collect

WORKER_LOG = """\
[2026-11-27 14:37:20,195] [    INFO] - loss: 7.66448736, learning_rate: 0.0006, global_step: 1, interval_runtime: 0.2
[2026-11-27 14:37:20,300] [    INFO] - scale_loss                    : 32768
[2026-11-27 14:37:20,395] [    INFO] - loss: 7.1, learning_rate: 0.0012, global_step: 2, interval_runtime: 0.2
[2026-11-27 14:37:21,000] [    INFO] - loss: 6.5, learning_rate: 0.0018, global_step: 3, ppl: 665.1
[2026-11-27 14:37:30,000] [    INFO] - loss: 6.4, learning_rate: 0.0018, global_step: 3, ppl: 601.8
"""


def test_trainer_log_lines_become_one_entry_per_step_the_resumed_one_winning():
    entries = collect.parse_trainer_log(WORKER_LOG.splitlines())
    assert entries == [
        {"step": 1, "loss": 7.66448736, "learning_rate": 0.0006},
        {"step": 2, "loss": 7.1, "learning_rate": 0.0012},
        {"step": 3, "loss": 6.4, "learning_rate": 0.0018},  # a resumed run logged step 3 again
    ]


def _upstream_output(d, weights="model_state.pdparams"):
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / weights).write_bytes(b"weights")
    (d / "trainer_state.json").write_text('{"global_step": 3, "log_history": []}')
    (d / "checkpoint-2").mkdir()
    return d


def test_collect_sft_copies_the_final_save_and_the_loss_log(tmp_path):
    ckpt = _upstream_output(tmp_path / "ckpt")
    logs = tmp_path / "launch"
    logs.mkdir()
    (logs / "workerlog.0").write_text(WORKER_LOG)
    summary = collect.collect_sft(str(ckpt), str(tmp_path / "sft"), str(logs))
    out = tmp_path / "sft"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model_state.pdparams", "train_log.jsonl",
                                                      "train_summary.json", "trainer_state.json"]
    assert [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [7.66448736, 7.1, 6.4]
    assert (summary["logged_steps"], summary["first_loss"], summary["final_loss"]) == (3, 7.66448736, 6.4)


def test_collect_sft_accepts_lora_output(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "lora_config.json").write_text("{}")
    (d / "lora_model_state.pdparams").write_bytes(b"w")
    collect.collect_sft(str(d), str(tmp_path / "sft"))
    assert (tmp_path / "sft/lora_model_state.pdparams").read_bytes() == b"w"


@pytest.mark.parametrize("broken", ["no dir", "no weights", "empty weights", "no config"])
def test_collect_sft_refuses_an_output_without_a_final_model(tmp_path, broken):
    ckpt = tmp_path / "ckpt"
    if broken != "no dir":
        _upstream_output(ckpt)
        if broken == "no weights":
            (ckpt / "model_state.pdparams").unlink()
        if broken == "empty weights":
            (ckpt / "model_state.pdparams").write_bytes(b"")
        if broken == "no config":
            (ckpt / "config.json").unlink()
    with pytest.raises(PipelineError, match="holds no final model"):
        collect.collect_sft(str(ckpt), str(tmp_path / "sft"))
    assert not (tmp_path / "sft").exists()


def test_collect_sft_refuses_a_worker_log_without_losses(tmp_path):
    ckpt = _upstream_output(tmp_path / "ckpt")
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch/workerlog.0").write_text("Traceback ...\n")
    with pytest.raises(PipelineError, match="no loss lines"):
        collect.collect_sft(str(ckpt), str(tmp_path / "sft"), str(tmp_path / "launch"))


def test_collect_predictions_keeps_upstreams_outputs_in_dev_order(tmp_path):
    dev = tmp_path / "dev.json"
    dev.write_text('{"src": "a", "tgt": "A"}\n{"src": "b", "tgt": "B"}\n')
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"src": "a", "tgt": "A", "output": "x"}\n{"src": "b", "tgt": "B", "output": "y"}\n')
    collect.collect_predictions(str(raw), str(dev), str(tmp_path / "p.json"))
    assert json.loads((tmp_path / "p.json").read_text()) == [
        {"src": "a", "tgt": "A", "prediction": "x"}, {"src": "b", "tgt": "B", "prediction": "y"}]


def test_collect_predictions_fails_on_missing_or_short_output(tmp_path):
    dev = tmp_path / "dev.json"
    dev.write_text('{"src": "a", "tgt": "A"}\n{"src": "b", "tgt": "B"}\n')
    with pytest.raises(PipelineError, match="wrote no output"):
        collect.collect_predictions(str(tmp_path / "missing.jsonl"), str(dev), str(tmp_path / "p.json"))
    (tmp_path / "short.jsonl").write_text('{"output": "x"}\n')
    with pytest.raises(PipelineError, match="1 predictions for 2 dev records"):
        collect.collect_predictions(str(tmp_path / "short.jsonl"), str(dev), str(tmp_path / "p.json"))


def test_check_outputs_per_kind(tmp_path):
    with pytest.raises(PipelineError, match="no wheel"):
        collect.check_outputs("wheels", str(tmp_path))
    (tmp_path / "paddlenlp_ops-0.0.0-cp311-cp311-linux_x86_64.whl").write_bytes(b"zip")
    assert (collect.check_outputs("wheels", str(tmp_path))["wheels"]
            == ["paddlenlp_ops-0.0.0-cp311-cp311-linux_x86_64.whl"])
    export = tmp_path / "inference"
    with pytest.raises(PipelineError, match="wrote no directory"):
        collect.check_outputs("export", str(export))
    export.mkdir()
    (export / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match=r"model.pdiparams, model.json or model.pdmodel"):
        collect.check_outputs("export", str(export))
    (export / "model.pdiparams").write_bytes(b"p")
    (export / "model.json").write_text("{}")
    assert collect.check_outputs("export", str(export))["checked"] == "export"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="model weights"):
        collect.check_outputs("model", str(merged))


def test_container_gets_the_device_nodes_group(tmp_path):
    """A non-root caller needs the group that owns /dev/davinci* (HwHiAiUser) inside the container."""
    from conftest import ROOT
    from llamapipe.config import load

    cfg = load(str(ROOT / "config.yaml"))
    cfg.update(target="npu", devices="0")
    cfg["npu"].update(dev_root=str(tmp_path), device="npu")
    for node in ("davinci0", "davinci_manager", "devmm_svm", "hisi_hdc"):
        (tmp_path / node).write_text("")
    other = next(g for g in (os.getgid() + 1, 1000, 1234) if g != os.getgid())
    if os.geteuid() != 0:
        unavailable("giving a file another group needs root")
    os.chown(tmp_path / "davinci0", -1, other)
    spec = commands.container_spec("predict", cfg, str(tmp_path))
    assert spec["devices"][0] == str(tmp_path / "davinci0")
    assert spec["group_add"] == [str(other)]
    assert spec["env"]["HOME"] == "/tmp" and spec["user"] == f"{os.getuid()}:{os.getgid()}"


# --- npu: before upstream's trainer starts (it resumes from its output_dir by itself) -------------


def _checkpoint(d, step, complete=True):
    (d / f"checkpoint-{step}").mkdir(parents=True)
    (d / f"checkpoint-{step}/model_state.pdparams").write_bytes(b"w")
    if complete:
        (d / f"checkpoint-{step}/.checkpoint_done").write_bytes(b"")


def _upstream_trains(d, steps, final=True):
    """What run_finetune.py leaves in its output_dir: checkpoints, then (finished) the final save."""
    for step in steps:
        _checkpoint(d, step)
    if final:
        (d / "config.json").write_text('{"model_type": "llama"}')
        (d / "model_state.pdparams").write_bytes(b"weights")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": steps[-1]}))


def test_prepare_sft_sets_a_collected_run_aside_so_asking_again_trains_from_scratch(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints/sft"
    assert collect.prepare_sft(str(ckpt), 100)["resume_step"] == 0  # the first run
    _upstream_trains(ckpt, [50, 100])
    collect.collect_sft(str(ckpt), str(tmp_path / "sft"))
    assert "run_state.json" not in {p.name for p in (tmp_path / "sft").iterdir()}  # ours, not the model's
    assert json.loads((ckpt / "run_state.json").read_text()) == {"max_steps": 100, "completed": True,
                                                                 "global_step": 100}
    with caplog.at_level("INFO", logger="llamapipe"):
        logging_to_caplog()
        again = collect.prepare_sft(str(ckpt), 100)
    (aside,) = (tmp_path / "checkpoints").glob("sft.stale-*")
    assert again == {"resume_step": 0, "max_steps": 100, "set_aside": str(aside)}
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-100", "checkpoint-50", "config.json",
                                                        "model_state.pdparams", "run_state.json",
                                                        "trainer_state.json"]
    assert [p.name for p in ckpt.iterdir()] == ["run_state.json"]  # upstream finds no checkpoint: from scratch
    assert [r.getMessage() for r in caplog.records][-1] == (
        "training from scratch: 100 steps (upstream's run_finetune.py)")
    assert "holds a finished run (all 100 of 100 steps done)" in caplog.text


def test_prepare_sft_keeps_a_crashed_run_which_upstream_resumes(tmp_path, caplog):
    ckpt = tmp_path / "sft"
    collect.prepare_sft(str(ckpt), 100)
    _upstream_trains(ckpt, [50], final=False)
    _checkpoint(ckpt, 100, complete=False)  # killed while saving its last checkpoint
    caplog.clear()  # the first call's line, recorded when an earlier test left the logger at INFO
    with caplog.at_level("INFO", logger="llamapipe"):
        logging_to_caplog()
        assert collect.prepare_sft(str(ckpt), 100, "run_pretrain.py")["resume_step"] == 50
    assert not list(tmp_path.glob("sft.stale-*"))
    assert [r.getMessage() for r in caplog.records] == [
        "resuming from checkpoint-50 of 100 steps (upstream's run_pretrain.py)"]


def test_prepare_sft_resumes_a_finished_run_from_before_run_state_existed(tmp_path, caplog):
    """The first rerun after the upgrade (the sft command changed) costs no training; the one
    after it, once collect-sft marked the run completed, trains from scratch."""
    ckpt = tmp_path / "sft"
    _upstream_trains(ckpt, [50, 100])
    with caplog.at_level("INFO", logger="llamapipe"):
        logging_to_caplog()
        assert collect.prepare_sft(str(ckpt), 100) == {"resume_step": 100, "max_steps": 100, "set_aside": None}
    assert caplog.records[-1].getMessage() == ("resuming from checkpoint-100 of 100 steps, none left to train "
                                               "(upstream's run_finetune.py)")
    collect.collect_sft(str(ckpt), str(tmp_path / "out"))
    assert collect.prepare_sft(str(ckpt), 100)["set_aside"]


def logging_to_caplog():
    """Our ``llamapipe`` logger stops propagating once the CLI configured it (another test may have)."""
    import logging

    logging.getLogger("llamapipe").propagate = True


def test_npu_sft_terminal_shows_the_prepare_steps_plan_then_upstreams_progress(tmp_path):
    """The prepare step as the npu script runs it (its own process), then upstream's loss lines as
    the launcher prints them: what the sft rule's terminal filter shows."""
    import subprocess
    import sys

    from llamapipe.stages.progress import TerminalFilter

    proc = subprocess.run([sys.executable, "-m", "llamapipe.stages.collect", "prepare-sft", "--ckpt-dir",
                           str(tmp_path / "sft"), "--max-steps", "3"], capture_output=True, text=True, check=True)
    keep = TerminalFilter()
    shown = [x for line in (proc.stdout + proc.stderr + WORKER_LOG).splitlines() for x in keep.feed(line)]
    assert shown[0].endswith("INFO llamapipe.sft: training from scratch: 3 steps (upstream's run_finetune.py)")
    assert [x.split("llamapipe.sft: ")[1].split(" | ")[:2] for x in shown[1:]] == [
        ["step 1/3 (33%)", "loss 7.6645"], ["step 3/3 (100%)", "loss 6.5000"]]


def test_npu_sft_script_prepares_the_checkpoints_before_the_launcher_and_asks_for_plain_logs(tmp_path):
    import shlex

    from conftest import ROOT
    from llamapipe.config import load
    from llamapipe.config.paths import PATHS
    from llamapipe.npu import scripts
    from llamapipe.scaleout import launch

    raw = (ROOT / "config.yaml").read_text().replace("target: cpu", "target: npu")
    (tmp_path / "config.yaml").write_text(raw)
    cfg = load(str(tmp_path / "config.yaml"))
    argv = scripts.sft_script(cfg, PATHS, "/p", launch.layout_of(cfg))
    steps = argv[2].split("; ")
    launcher = next(i for i, s in enumerate(steps) if "paddle.distributed.launch" in s)
    prepare = [i for i, s in enumerate(steps) if "prepare-sft" in s]
    assert prepare and prepare[0] < launcher and "export NO_COLOR=1" in steps[:launcher]
    assert shlex.split(steps[prepare[0]]) == [
        "python", "-m", "llamapipe.stages.collect", "prepare-sft", "--ckpt-dir", "/p/results/checkpoints/sft",
        "--max-steps", str(cfg["sft"]["max_steps"]), "--script=run_finetune.py"]
