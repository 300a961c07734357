"""Helpers the benchmark scripts share: timing, summaries, thread settings, throw-away workspaces.

Every script under bench/ takes ``--quick`` (tiny settings, one run: what tests/test_bench_quick.py
runs so the benchmarks cannot rot), ``--runs N`` and ``--json-out FILE``, and prints its result as
JSON. Heavy measurements run in child processes with the thread variables set before Paddle or
PyTorch is imported; the parent only orchestrates, so its own imports never skew a number.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# What a fresh clone holds that a run needs (results/, data/ and .snakemake/ are left behind).
PROJECT_FILES = ("Snakefile", "config.yaml", "workflow", "assets", "envs", "Dockerfile.npu", ".dockerignore")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def load_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((ROOT / "config.yaml").read_text())


def summary(values: list[float], digits: int = 3) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": len(values)}


def paired_ratio(numer: list[float], denom: list[float]) -> dict[str, Any]:
    """Ratios of measurements taken side by side in the same round, summarised."""
    return summary([a / b for a, b in zip(numer, denom)])


def thread_env(threads: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}, "GLOG_minloglevel": "2",
           "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **extra}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def run_measured(cmd: list[str], cwd: Any = None, env: dict | None = None, log: Any = None) -> dict[str, float]:
    """Run a command to completion; its wall seconds and the child's peak RSS (MiB, from wait4)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()
    if proc.returncode != 0:
        tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n{tail}")
    return {"seconds": seconds, "max_rss_mib": usage.ru_maxrss / 1024}


def run_worker(script: Path, args: list[str], env: dict, log: Path) -> dict[str, Any]:
    """Run ``script --worker ...`` in a child process; it writes its result to a JSON file."""
    result_file = Path(tempfile.mkstemp(prefix="worker-", suffix=".json", dir=log.parent)[1])
    run_measured([PYTHON, str(script), *args, "--result", str(result_file)], env=env, log=log)
    return json.loads(result_file.read_text())


def llamapipe(stage: str, params: dict, *args: Any, threads: int = 1, log: Path, cwd: Any = None) -> dict:
    """One stage through the CLI, exactly as its Snakemake rule calls it."""
    cmd = [PYTHON, "-m", "llamapipe", stage, "--params", json.dumps(params), "--threads", str(threads),
           *map(str, args)]
    return run_measured(cmd, cwd=cwd, env=thread_env(threads), log=log)


def stage_params(cfg: dict) -> dict[str, dict]:
    """The parameters each cpu stage gets from config.yaml (as workflow/rules/common.smk derives them)."""
    data = cfg["data"]
    url = data["url"]
    if url.startswith("file:") and not url.startswith("file:/"):  # relative to the project root
        url = "file:" + str(ROOT / url[len("file:"):])
    return {
        "download-data": {"url": url, "sha256": data["sha256"], "retries": data["retries"]},
        "prepare-data": {k: data[k] for k in ("on_error", "max_train", "max_dev")},
        "init-model": cfg["model"],
        "sft": cfg["sft"],
        "merge": {"dtype": cfg["export"]["dtype"]},
        "export": {**cfg["export"], "src_length": cfg["sft"]["src_length"]},
        "predict": cfg["predict"],
    }


def build_workspace(work: Path, threads: int = 2, until: str = "init-model", sft_steps: int = 100,
                    model: dict | None = None) -> dict[str, Path]:
    """The default pipeline's stages through the CLI into ``work``: data, base model (``model``:
    another shape than config.yaml's) and, if asked, sft (``sft_steps`` steps) -> merge -> export.
    Returns the paths."""
    cfg = load_config()
    params = stage_params(cfg)
    if model:
        params["init-model"] = model
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    p = {"raw": work / "raw", "data": work / "data", "train": work / "data/train.json",
         "dev": work / "data/dev.json", "base": work / "model/base", "sft": work / "sft",
         "merged": work / "merged", "inference": work / "inference", "logs": logs}
    llamapipe("download-data", params["download-data"], "--out", p["raw"], "--cache-dir", work / "downloads",
              log=logs / "download.log")
    llamapipe("prepare-data", params["prepare-data"], "--src", p["raw"], "--out", p["data"],
              log=logs / "prepare_data.log")
    llamapipe("init-model", params["init-model"], "--train", p["train"], "--out", p["base"], threads=threads,
              log=logs / "init_model.log")
    if until == "init-model":
        return p
    sft = {**params["sft"], "max_steps": sft_steps}
    llamapipe("sft", sft, "--train", p["train"], "--base", p["base"], "--out", p["sft"],
              "--ckpt-dir", work / "checkpoints", threads=threads, log=logs / "sft.log")
    llamapipe("merge", params["merge"], "--sft", p["sft"], "--base", p["base"], "--out", p["merged"],
              log=logs / "merge.log")
    llamapipe("export", params["export"], "--merged", p["merged"], "--out", p["inference"], log=logs / "export.log")
    return p


def fresh_copy(base: Path, root: Path = ROOT) -> Path:
    """A copy of the project (``root``: another tree, e.g. ``git archive`` of an older commit) as a
    fresh clone has it, for a real Snakemake run."""
    dest = Path(tempfile.mkdtemp(prefix="project-", dir=base))
    for name in PROJECT_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def machine() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.date.today().isoformat(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "versions": {d: version(d) for d in ("paddlepaddle", "paddlenlp", "snakemake", "torch", "transformers")},
    }


def parser(doc: str, runs: int = 5) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--quick", action="store_true", help="tiny settings, one run (what the tests run)")
    ap.add_argument("--runs", type=int, default=runs, help=f"repetitions (default {runs}; --quick: 1)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the compute (default 2)")
    ap.add_argument("--json-out", help="also write the result JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    return ap


def workdir(keep: bool, prefix: str) -> Any:
    """A temporary directory, removed afterwards unless ``keep`` (then its path is printed)."""
    if keep:
        path = tempfile.mkdtemp(prefix=prefix)
        print(f"work directory kept: {path}", file=sys.stderr)
        return _Kept(path)
    return tempfile.TemporaryDirectory(prefix=prefix)


class _Kept:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        return None


def emit(result: dict[str, Any], json_out: str | None) -> dict[str, Any]:
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
    return result
