"""What a person looks at after a run: plots and tables for the Snakemake report (several runs: compare.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from llamapipe.core.atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no screen on build machines
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training(train_log: str, out_png: str) -> dict:
    """Training loss per step with the learning rate on a second axis (and eval loss if logged)."""
    plt = _pyplot()
    log = read_jsonl(train_log)
    steps = [e for e in log if "loss" in e]
    evals = [e for e in log if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], label="train loss", color="tab:blue")
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if any("learning_rate" in e for e in steps):
        lr = ax.twinx()
        lr.plot([e["step"] for e in steps], [e.get("learning_rate") for e in steps], color="tab:gray",
                alpha=0.6, label="learning rate")
        lr.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title("SFT training loss")
    fig.tight_layout()
    _save(fig, out_png, plt)
    return {"steps": len(steps), "first_loss": steps[0]["loss"] if steps else None,
            "last_loss": steps[-1]["loss"] if steps else None}


def stage_seconds(bench_files: list[str]) -> dict[str, float]:
    out = {}
    for path in bench_files:
        with open(path) as f:
            out[Path(path).stem] = float(next(csv.DictReader(f, delimiter="\t"))["s"])
    return out


def plot_stage_times(bench_files: list[str], out_png: str) -> dict:
    plt = _pyplot()
    seconds = stage_seconds(bench_files)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(seconds) + 1.2), dpi=100)
    names = list(seconds)
    ax.barh(names, [seconds[n] for n in names], color="tab:green")
    ax.invert_yaxis()
    ax.set_xlim(0, max(seconds.values(), default=1) * 1.15)  # room for the labels
    ax.set_xlabel("wall time (s)")
    ax.set_title("time per stage")
    for i, n in enumerate(names):
        ax.text(seconds[n], i, f" {seconds[n]:.1f}s", va="center")
    fig.tight_layout()
    _save(fig, out_png, plt)
    return seconds


def _save(fig: Any, out_png: str, plt: Any) -> None:
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_tables(metrics_file: str, predictions_file: str, out_dir: str, samples: int = 12) -> dict:
    """metrics.html and predictions.html (pandas), shown inline by `snakemake --report`."""
    import pandas as pd

    metrics = json.loads(Path(metrics_file).read_text(encoding="utf-8"))
    preds = json.loads(Path(predictions_file).read_text(encoding="utf-8"))
    table = pd.DataFrame([{"metric": k, "value": v} for k, v in metrics.items()], dtype=object)  # 60, not 60.0000
    sample = pd.DataFrame(preds[:samples])[["src", "tgt", "prediction"]]
    sample.columns = ["prompt (src)", "reference (tgt)", "prediction"]
    outputs = {"metrics.html": _html("Metrics", table), "predictions.html": _html("Predictions vs references", sample)}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, html in outputs.items():
        with atomic_path(Path(out_dir) / name) as tmp:
            tmp.write_text(html, encoding="utf-8")
    return {"metrics": len(table), "samples": len(sample)}


def _html(title: str, frame: Any) -> str:
    body = frame.to_html(index=False, classes="llamapipe-table", border=0, escape=True)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font-family:sans-serif} table{border-collapse:collapse} "
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}</style>"
            f"</head><body><h2>{title}</h2>{body}</body></html>")

