"""Turn upstream PaddleNLP outputs (NPU target) into this pipeline's contracts."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from llamapipe.atomic import atomic_dir, write_json
from llamapipe.errors import PipelineError

log = logging.getLogger("llamapipe.collect")


def collect_sft(ckpt_dir: str, out_dir: str) -> dict:
    """run_finetune.py's final save (top-level files of its output_dir, TP ranks already merged
    by save_model(merge_tensor_parallel=True)) -> results/sft; checkpoint-N dirs stay behind."""
    src = Path(ckpt_dir)
    files = [p for p in src.iterdir() if p.is_file()] if src.is_dir() else []
    if not any(p.name.endswith((".safetensors", ".pdparams", ".json")) and "config" not in p.name for p in files):
        raise PipelineError(f"{ckpt_dir} holds no final model (did training finish?)")
    with atomic_dir(out_dir) as tmp:
        for p in files:
            shutil.copy2(p, tmp / p.name)
        state = src / "trainer_state.json"
        summary = {"source": str(src), "files": sorted(p.name for p in files)}
        if state.exists():
            history = json.loads(state.read_text()).get("log_history", [])
            with open(tmp / "train_log.jsonl", "w", encoding="utf-8") as f:
                for entry in history:
                    f.write(json.dumps(entry) + "\n")
            summary["logged_steps"] = len(history)
        write_json(tmp / "train_summary.json", summary)
    return summary


def collect_predictions(upstream_file: str, dev_file: str, out_file: str) -> dict:
    """predictor.py writes ``{"src","tgt","output"}`` lines; we write the ``prediction`` list."""
    with open(dev_file, encoding="utf-8") as f:
        dev = [json.loads(line) for line in f if line.strip()]
    with open(upstream_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != len(dev):
        raise PipelineError(f"{upstream_file}: {len(rows)} predictions for {len(dev)} dev records")
    predictions = [{"src": d["src"], "tgt": d["tgt"], "prediction": r.get("output", "")} for d, r in zip(dev, rows)]
    write_json(out_file, predictions)
    return {"records": len(predictions)}
