"""On-disk checkpoint formats, in one place: read any PaddleNLP layout, write one pdparams.

The Ascend dynamic-to-static export reads neither safetensors nor shards, which is why the
guide "merges parameters" first. Layouts read here:
  model_state.pdparams                                  single file
  model_state.pdparams.index.json + shards             sharded pdparams
  model.safetensors / model.safetensors.index.json     (sharded) safetensors
  model_state.tpXX.pdparams                             tensor-parallel ranks (merged by the
                                                        model class's own TP mappings)
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from llamapipe.core.atomic import write_json
from llamapipe.core.errors import PipelineError

if TYPE_CHECKING:  # numpy at run time only where arrays are made: the npu scripts read this
    import numpy as np  # module's constants while Snakemake parses, where only Snakemake is installed

MERGED_WEIGHTS = "model_state.pdparams"
# PaddleNLP's own checkpoint-integrity switch: with it the Trainer writes `.checkpoint_done` as the
# last file of every checkpoint-N, and get_last_checkpoint resumes from the newest *complete* one
# (without it, a kill during a save leaves a newest checkpoint that every rerun fails to load).
COMPLETE_CHECKPOINTS_ENV = {"FLAG_LLM_PDC": "True"}
CHECKPOINT_DONE = ".checkpoint_done"  # what the Trainer writes last into a checkpoint under that switch
BASE_MODEL_POINTER = "base_model.json"  # npu: names the hub model whose weights are not stored here
TP_SHARD = re.compile(r"^model_state\.tp(\d+)\.pdparams$")

# The guide's config.json fix-up (llama2-13b on NPU, "Inference" step): the fields that must
# hold for the export/predict scripts whatever the model's shape.
CONFIG_FIXUP = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "use_cache": False,
}


def _to_numpy(value: Any) -> np.ndarray:
    import numpy

    return value.numpy() if hasattr(value, "numpy") else numpy.asarray(value)


def _load_pdparams(path: Path) -> dict[str, np.ndarray]:
    import paddle

    return {k: _to_numpy(v) for k, v in paddle.load(str(path), return_numpy=True).items()}


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _load_indexed(index_file: Path, loader: Callable[[Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    weight_map = json.loads(index_file.read_text())["weight_map"]
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if not (index_file.parent / shard).is_file():
            raise PipelineError(f"{index_file} names shard {shard}, which is not in {index_file.parent}")
        state.update(loader(index_file.parent / shard))
    missing = set(weight_map) - set(state)
    if missing:
        raise PipelineError(f"{index_file}: {len(missing)} tensors listed but absent, e.g. {sorted(missing)[:3]}")
    return state


def merge_tensor_parallel(shards: list[dict[str, np.ndarray]], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Concatenate TP ranks with the LLaMA class's own split/merge rules (column vs row)."""
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**config, "tensor_parallel_degree": len(shards), "tensor_parallel_rank": 0})
    actions = LlamaForCausalLM._get_tensor_parallel_mappings(cfg, is_split=False)
    merged = {}
    for name in shards[0]:
        key = name.split(".", 1)[1] if name.startswith("llama.") else name
        parts = [s[name] for s in shards]
        merged[name] = _to_numpy(actions[key](parts)) if key in actions else parts[0]
    return merged


def load_state_dict(ckpt: str) -> dict[str, np.ndarray]:
    """Read the model weights of a checkpoint directory in any supported layout."""
    d = Path(ckpt)
    if not d.is_dir():
        raise PipelineError(f"checkpoint directory {ckpt} does not exist")
    tp = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := TP_SHARD.match(p.name)))
    if tp:
        config = json.loads((d / "config.json").read_text())
        return merge_tensor_parallel([_load_pdparams(p) for _, p in tp], config)
    for name, loader, indexed in (
        ("model_state.pdparams", _load_pdparams, False),
        ("model_state.pdparams.index.json", _load_pdparams, True),
        ("model.safetensors", _load_safetensors, False),
        ("model.safetensors.index.json", _load_safetensors, True),
    ):
        if (d / name).exists():
            return _load_indexed(d / name, loader) if indexed else loader(d / name)
    raise PipelineError(f"{ckpt}: no model weights found (looked for pdparams, safetensors, tp shards)")


def save_merged(state: dict[str, np.ndarray], out_dir: Path) -> Path:
    import paddle

    path = out_dir / MERGED_WEIGHTS
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(path))
    return path


def fix_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Apply the guide's config.json fix-up; ``dtype`` is what export will run in."""
    fixed = dict(config)
    fixed.update(CONFIG_FIXUP)
    fixed["torch_dtype"] = dtype
    fixed["dtype"] = dtype
    return fixed


def _step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` directories, by step."""
    return sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()), key=_step)


def _complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Those holding upstream's ``.checkpoint_done`` (written last under ``COMPLETE_CHECKPOINTS_ENV``)."""
    return [p for p in _checkpoints(ckpt_dir) if (p / CHECKPOINT_DONE).is_file()]


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[str]:
    """``save_total_limit`` after a run: keep the newest ``keep`` complete ``checkpoint-N`` dirs,
    remove older ones and every incomplete one older than the newest complete (it can never be
    resumed from). Returns what was removed. PaddleNLP's Trainer rotates only under the launcher
    with several processes (``local_rank == 0``); one card or one process keeps every checkpoint."""
    import shutil

    found, complete = _checkpoints(Path(ckpt_dir)), _complete_checkpoints(Path(ckpt_dir))
    if keep <= 0 or not complete:
        return []
    kept = set(complete[-keep:])
    newest = _step(complete[-1])
    doomed = [p for p in found if p not in kept and _step(p) < newest]
    for p in doomed:
        shutil.rmtree(p)
    return [p.name for p in doomed]


# --- the run a checkpoint directory belongs to (sft on cpu, collect.prepare_sft on npu) ----------
# run_state.json: {"max_steps", "completed", "global_step"}, written when a run starts and marked
# completed once its output is written: asking for sft again after that trains from scratch.
RUN_STATE = "run_state.json"
log = logging.getLogger("llamapipe.sft")  # these lines are about sft's checkpoints: its job's logger


def set_aside(ckpt_dir: Path) -> Path:
    """Move a checkpoint directory to ``<name>.stale-<time>`` (kept, not deleted)."""
    import shutil
    import time

    stamp = f"{ckpt_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    aside, n = ckpt_dir.with_name(stamp), 1
    while aside.exists():  # two in one second
        n += 1
        aside = ckpt_dir.with_name(f"{stamp}-{n}")
    shutil.move(str(ckpt_dir), str(aside))
    return aside


def complete_checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (``checkpoint-N`` holding upstream's ``.checkpoint_done``)."""
    if not ckpt_dir.is_dir():
        return []
    return [_step(p) for p in _complete_checkpoints(ckpt_dir)]


def _run_state(ckpt_dir: Path) -> dict[str, Any] | None:
    path = ckpt_dir / RUN_STATE
    return json.loads(path.read_text()) if path.is_file() else None


def finished_run(ckpt_dir: Path) -> str | None:
    """Why the checkpoints in ``ckpt_dir`` are of a finished run, or None (none, or a crashed run).

    ``run_state.json`` decides: written when a run starts, marked completed once its output is
    written (all its max_steps trained). A run killed after its last checkpoint but before its
    output resumes (and trains what is left, maybe nothing). A directory without one (written
    before it existed) resumes too, as it always did: the first rerun after an upgrade (Snakemake
    reruns sft once: its command changed) costs no training, and marks the run completed."""
    state = _run_state(ckpt_dir)
    if not state or not state.get("completed"):
        return None
    return f"all {state.get('global_step', state.get('max_steps'))} of {state.get('max_steps')} steps done"


def set_aside_finished(ckpt_dir: Path) -> Path | None:
    """A finished run's checkpoints moved aside, saying so: the run asked for now starts from scratch."""
    why = finished_run(ckpt_dir) if ckpt_dir.is_dir() else None
    if not why:
        return None
    aside = set_aside(ckpt_dir)
    log.warning("%s holds a finished run (%s): moved to %s (delete it when no longer needed); "
                "training again from scratch", ckpt_dir, why, aside)
    return aside


def mark_started(ckpt_dir: Path, max_steps: int) -> None:
    write_json(ckpt_dir / RUN_STATE, {"max_steps": max_steps, "completed": False})


def mark_completed(ckpt_dir: Path, global_step: int | None) -> None:
    """The run's output is written: asking for it again trains from scratch (``finished_run``)."""
    state = _run_state(ckpt_dir) or {}
    state.update(completed=True, global_step=global_step)
    write_json(ckpt_dir / RUN_STATE, state)
