"""The config section each stage reads (``llamapipe <stage> --params JSON``), from the resolved config.

Params are a rerun trigger: a stage reruns when its own section changes, and nothing before it.
``src_length`` is sft's in export, so export and predict agree with what sft trained on.
"""

from __future__ import annotations

import json

from llamapipe.config.paths import MODEL_CACHE, builds_base_model
from llamapipe.config.rehearsal import host_checkout

# what preflight's host checks read of the npu section
NPU_PREFLIGHT_KEYS = ("ascend_root", "dev_root", "device", "pairing", "shm_size", "model_name_or_path")


def _preflight(cfg: dict) -> dict:
    npu = cfg["npu"]
    params = {**cfg["preflight"], "target": cfg["target"], "devices": cfg["devices"]}
    if cfg["target"] == "npu":
        params.update({k: npu[k] for k in NPU_PREFLIGHT_KEYS})
        params.update({"sft_dtype": cfg["sft"]["dtype"], "model_cache": MODEL_CACHE,
                       "model_built": builds_base_model(cfg)})
    params.update({"runtime": cfg["runtime"], "paddlenlp_commit": npu["image"]["paddlenlp_commit"],
                   "paddlenlp_checkout": host_checkout(cfg)})
    return params


def _download(cfg: dict) -> dict:
    """md5 and sha256_key only when set, so the cpu default's command (a rerun trigger) is unchanged."""
    data = cfg["data"]
    params = {k: data[k] for k in ("url", "sha256", "retries", "connect_timeout", "read_timeout")}
    if data.get("md5"):
        params["md5"] = data["md5"]
    if cfg["target"] == "npu" and "sha256" in (cfg["npu"].get("data") or {}):
        params["sha256_key"] = "npu.data.sha256"  # where the printed pin line puts the hash
    return params


def stage_params(stage: str, cfg: dict) -> dict:
    data = cfg["data"]
    sections = {
        "preflight": lambda: _preflight(cfg),
        "download_data": lambda: _download(cfg),
        "prepare_data": lambda: {k: data[k] for k in ("on_error", "max_train", "max_dev")},
        # the model init_model builds, or (npu) the named base model it records
        "init_model": lambda: (cfg["model"] if builds_base_model(cfg)
                               else {"model_name_or_path": cfg["npu"]["model_name_or_path"]}),
        "sft": lambda: cfg["sft"],
        "merge": lambda: {"dtype": cfg["export"]["dtype"]},
        "export": lambda: {**cfg["export"], "src_length": cfg["sft"]["src_length"]},
        "predict": lambda: cfg["predict"],
        "evaluate": lambda: {},
    }
    return sections[stage]()


def stage_params_json(stage: str, cfg: dict) -> str:
    return json.dumps(stage_params(stage, cfg), sort_keys=True)


