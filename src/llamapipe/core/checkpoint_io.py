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
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[str]:
    """``save_total_limit`` after a run: keep the newest ``keep`` complete ``checkpoint-N`` dirs,
    remove older ones and every incomplete one older than the newest complete (it can never be
    resumed from). Returns what was removed. PaddleNLP's Trainer rotates only under the launcher
    with several processes (``local_rank == 0``); one card or one process keeps every checkpoint."""
    import shutil

    found = sorted((p for p in Path(ckpt_dir).glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=_step)
    complete = [p for p in found if (p / CHECKPOINT_DONE).is_file()]
    if keep <= 0 or not complete:
        return []
    kept = set(complete[-keep:])
    newest = _step(complete[-1])
    doomed = [p for p in found if p not in kept and _step(p) < newest]
    for p in doomed:
        shutil.rmtree(p)
    return [p.name for p in doomed]
