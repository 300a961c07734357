"""Turn upstream PaddleNLP outputs (NPU target) into this pipeline's contracts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from llamapipe.core import checkpoint_io
from llamapipe.core.atomic import atomic_dir, write_json
from llamapipe.core.errors import PipelineError
from llamapipe.stages.progress import plan_message, trainer_entry

log = logging.getLogger("llamapipe.collect")


WEIGHT_SUFFIXES = (".safetensors", ".pdparams")


def _weights(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.stat().st_size > 0]


def parse_trainer_log(lines: Any) -> list[dict[str, Any]]:
    """Loss entries of the Trainer's log lines (its state.log_history is emptied after each log,
    so the launcher's worker log is the record), one per step; a resumed run's repeats replace
    the earlier ones."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in lines:
        entry = trainer_entry(line)
        if entry:
            by_step[entry["step"]] = {k: entry[k] for k in ("step", "loss", "learning_rate")}
    return [by_step[k] for k in sorted(by_step)]


def collect_sft(ckpt_dir: str, out_dir: str, launch_logs: str = "", save_total_limit: int = 0) -> dict:
    """run_finetune.py's final save (top-level files of its output_dir, TP ranks already merged
    by save_model(merge_tensor_parallel=True)) -> results/sft; checkpoint-N dirs stay behind,
    at most ``save_total_limit`` of them (the Trainer rotates them only with several processes)."""
    src = Path(ckpt_dir)
    files = [p for p in src.iterdir() if p.is_file() and p.name != checkpoint_io.RUN_STATE] if src.is_dir() else []
    has_config = any((src / name).is_file() for name in ("config.json", "lora_config.json"))
    if not src.is_dir() or not _weights(src) or not has_config:
        raise PipelineError(f"{ckpt_dir} holds no final model (weights and config.json): did training finish?")
    # local rank 0 logs the losses (the mean over all ranks); several nodes: each node's launcher
    # logs under node<K>/ (llamapipe.scaleout.launch), and node 0's first process is as good as any
    worker_log = Path(launch_logs) / "workerlog.0"
    if not worker_log.is_file() and (Path(launch_logs) / "node0" / "workerlog.0").is_file():
        worker_log = Path(launch_logs) / "node0" / "workerlog.0"
    history = parse_trainer_log(worker_log.read_text(errors="replace").splitlines()) if worker_log.is_file() else []
    if launch_logs and not history:
        raise PipelineError(f"{worker_log}: no loss lines (\"loss: ..., global_step: N\") from the trainer")
    with atomic_dir(out_dir) as tmp:
        for p in files:
            shutil.copy2(p, tmp / p.name)
        with open(tmp / "train_log.jsonl", "w", encoding="utf-8") as f:
            for entry in history:
                f.write(json.dumps(entry) + "\n")
        summary = {"source": str(src), "files": sorted(p.name for p in files), "logged_steps": len(history),
                   "first_loss": history[0]["loss"] if history else None,
                   "final_loss": history[-1]["loss"] if history else None}
        write_json(tmp / "train_summary.json", summary)
    checkpoint_io.mark_completed(src, _final_step(src, history))
    removed = checkpoint_io.prune_checkpoints(src, save_total_limit)
    if removed:
        log.info("save_total_limit %d: removed %s", save_total_limit, ", ".join(removed))
    return summary


def _final_step(src: Path, history: list[dict[str, Any]]) -> Any:
    """The final save's step: its trainer_state.json (upstream's save_state), else the last logged one."""
    try:
        return json.loads((src / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return history[-1]["step"] if history else None


def prepare_sft(ckpt_dir: str, max_steps: int, script: str = "run_finetune.py") -> dict:
    """npu, before the launcher starts upstream's script, which resumes from its output_dir by
    itself: a finished run's checkpoints are moved aside (so asking for sft again trains from
    scratch), a crashed run's stay (it resumes, from the newest complete checkpoint as upstream
    picks it under ``checkpoint_io.COMPLETE_CHECKPOINTS_ENV``). Says which, with the plan line the
    rule's terminal filter turns upstream's loss lines into progress with."""
    d = Path(ckpt_dir)
    aside = checkpoint_io.set_aside_finished(d)
    d.mkdir(parents=True, exist_ok=True)
    steps = checkpoint_io.complete_checkpoint_steps(d)
    start = steps[-1] if steps else 0
    checkpoint_io.mark_started(d, max_steps)
    checkpoint_io.log.info(plan_message(start, max_steps, script))  # the sft job's own logger, as on cpu
    return {"resume_step": start, "max_steps": max_steps, "set_aside": str(aside) if aside else None}


def main(argv: Any = None) -> int:
    """``python -m llamapipe.stages.collect prepare-sft --ckpt-dir D --max-steps N [--script S]``
    (the npu sft script's step before the launcher)."""
    import argparse

    from llamapipe.core.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m llamapipe.stages.collect")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-sft", help="before upstream's trainer: a finished run's checkpoints aside")
    prep.add_argument("--ckpt-dir", required=True)
    prep.add_argument("--max-steps", required=True, type=int)
    prep.add_argument("--script", default="run_finetune.py")
    a = parser.parse_args(argv)
    configure_logging()
    prepare_sft(a.ckpt_dir, a.max_steps, a.script)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def check_outputs(kind: str, path: str) -> dict:
    """Fail loudly when an upstream step exits 0 having written nothing (export and predictor do
    when paddlenlp_ops cannot be imported)."""
    d = Path(path)
    if kind == "wheels":
        found = [p.name for p in d.glob("*.whl") if p.stat().st_size > 0] if d.is_dir() else []
        if not found:
            raise PipelineError(f"{path}: no wheel was built")
        return {"wheels": found}
    if not d.is_dir():
        raise PipelineError(f"{path}: the upstream step wrote no directory")
    needed = {"model": ["config.json"], "export": ["config.json", "model.pdiparams"]}[kind]
    missing = [n for n in needed if not (d / n).is_file() or (d / n).stat().st_size == 0]
    if kind == "model" and not _weights(d):
        missing.append("model weights (*.pdparams / *.safetensors)")
    if kind == "export" and not any((d / n).is_file() for n in ("model.json", "model.pdmodel")):
        missing.append("model.json or model.pdmodel (the static graph)")
    if missing:
        raise PipelineError(f"{path}: the upstream step wrote no {', '.join(missing)}")
    return {"checked": kind, "files": sorted(p.name for p in d.iterdir())}


def collect_predictions(upstream_file: str, dev_file: str, out_file: str) -> dict:
    """predictor.py writes ``{"src","tgt","output"}`` lines; we write the ``prediction`` list, each
    entry as the cpu target's predict writes it (``tgt`` only where the dev record has one)."""
    from llamapipe.stages.predict import prediction_record, read_records

    dev = read_records(dev_file)
    if not Path(upstream_file).is_file():
        raise PipelineError(f"{upstream_file}: the predictor wrote no output")
    with open(upstream_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != len(dev):
        raise PipelineError(f"{upstream_file}: {len(rows)} predictions for {len(dev)} dev records")
    predictions = [prediction_record(d, r.get("output", "")) for d, r in zip(dev, rows)]
    write_json(out_file, predictions)
    return {"records": len(predictions)}
