"""Turn upstream PaddleNLP outputs (NPU target) into this pipeline's contracts."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from llamapipe.core import checkpoint_io
from llamapipe.core.atomic import atomic_dir, write_json
from llamapipe.core.errors import PipelineError

log = logging.getLogger("llamapipe.collect")


WEIGHT_SUFFIXES = (".safetensors", ".pdparams")
# PaddleNLP Trainer's log line: "loss: 7.66448736, learning_rate: 0.0006, global_step: 1, ..."
_TRAINER_LOG = re.compile(r"\bloss: ([-+0-9.eE]+), learning_rate: ([-+0-9.eE]+), global_step: (\d+)")


def _weights(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.stat().st_size > 0]


def parse_trainer_log(lines: Any) -> list[dict[str, Any]]:
    """Loss entries of the Trainer's log lines (its state.log_history is emptied after each log,
    so the launcher's worker log is the record), one per step; a resumed run's repeats replace
    the earlier ones."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in lines:
        m = _TRAINER_LOG.search(line)
        if m:
            step = int(m.group(3))
            by_step[step] = {"step": step, "loss": float(m.group(1)), "learning_rate": float(m.group(2))}
    return [by_step[k] for k in sorted(by_step)]


def collect_sft(ckpt_dir: str, out_dir: str, launch_logs: str = "", save_total_limit: int = 0) -> dict:
    """run_finetune.py's final save (top-level files of its output_dir, TP ranks already merged
    by save_model(merge_tensor_parallel=True)) -> results/sft; checkpoint-N dirs stay behind,
    at most ``save_total_limit`` of them (the Trainer rotates them only with several processes)."""
    src = Path(ckpt_dir)
    files = [p for p in src.iterdir() if p.is_file()] if src.is_dir() else []
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
    removed = checkpoint_io.prune_checkpoints(src, save_total_limit)
    if removed:
        log.info("save_total_limit %d: removed %s", save_total_limit, ", ".join(removed))
    return summary


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
    """predictor.py writes ``{"src","tgt","output"}`` lines; we write the ``prediction`` list."""
    with open(dev_file, encoding="utf-8") as f:
        dev = [json.loads(line) for line in f if line.strip()]
    if not Path(upstream_file).is_file():
        raise PipelineError(f"{upstream_file}: the predictor wrote no output")
    with open(upstream_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != len(dev):
        raise PipelineError(f"{upstream_file}: {len(rows)} predictions for {len(dev)} dev records")
    predictions = [{"src": d["src"], "tgt": d["tgt"], "prediction": r.get("output", "")} for d, r in zip(dev, rows)]
    write_json(out_file, predictions)
    return {"records": len(predictions)}
