"""merge: one plain checkpoint for export.

LoRA weights are folded into the base (PaddleNLP's ``LoRAModel.merge``); full fine-tunes in
any layout (sharded, safetensors, tensor-parallel ranks) become one ``model_state.pdparams``;
config.json gets the guide's fix-up.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llamapipe.core import checkpoint_io
from llamapipe.core.atomic import atomic_dir, write_json
from llamapipe.core.tokenizer_io import copy_tokenizer_files

log = logging.getLogger("llamapipe.merge")



def merge_lora(base_dir: str, lora_dir: str) -> dict[str, Any]:
    from llamapipe.core.paddle_env import quiet_paddlenlp

    quiet_paddlenlp()  # the CLI leaves PaddleNLP unimported for merge: a full fine-tune needs only Paddle
    from paddlenlp.peft import LoRAModel
    from paddlenlp.transformers import AutoModelForCausalLM

    pointer = Path(base_dir) / checkpoint_io.BASE_MODEL_POINTER  # npu: a named hub model, weights not stored locally
    source = json.loads(pointer.read_text())["model_name_or_path"] if pointer.exists() else base_dir
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    base_keys = set(model.state_dict())
    lora_model = LoRAModel.from_pretrained(model, lora_path=lora_dir)
    lora_model.merge()
    merged = lora_model.restore_original_model().state_dict()
    # Restored LoRA layers carry zero biases the base LLaMA has no slot for: keep the base's keys.
    extra = [k for k in merged if k not in base_keys and bool(merged[k].abs().max() > 0)]
    if extra:
        log.warning("dropping non-zero tensors absent from the base model: %s", extra[:5])
    return {k: v.numpy() for k, v in merged.items() if k in base_keys}


def run(params: dict[str, Any], sft_dir: str, base_dir: str, out_dir: str) -> dict[str, Any]:
    sft = Path(sft_dir)
    is_lora = (sft / "lora_config.json").exists()
    state = merge_lora(base_dir, sft_dir) if is_lora else checkpoint_io.load_state_dict(sft_dir)
    config_src = Path(base_dir if is_lora else sft_dir) / "config.json"
    config = json.loads(config_src.read_text())
    fixed = checkpoint_io.fix_config(config, params["dtype"])
    changed = sorted(k for k in fixed if config.get(k) != fixed[k])

    with atomic_dir(out_dir) as tmp:
        checkpoint_io.save_merged(state, tmp)
        write_json(tmp / "config.json", fixed)
        copy_tokenizer_files(sft, tmp)
        summary = {
            "source": "lora" if is_lora else "full",
            "tensors": len(state),
            "parameters": int(sum(v.size for v in state.values())),
            "config_fixed_fields": changed,
        }
        write_json(tmp / "merge_summary.json", summary)
    log.info("merged %s checkpoint: %d tensors -> %s", summary["source"], len(state), out_dir)
    return summary
