"""Resolve the validated config.yaml into what the stages of the chosen target read.

One config, two targets: ``target: npu`` overlays the ``npu.sft`` / ``npu.export`` /
``npu.predict`` sections onto the shared ones, so a knob (``max_steps``, ``src_length``...)
means the same thing on both targets, and the npu section holds what only the NPU run has
(image, cards, parallel degrees, fused ops, environment).
"""

from __future__ import annotations

import copy
import json
import os

from llamapipe.config import rules as config_rules
from llamapipe.config import validation
from llamapipe.config.validation import OVERLAID_SECTIONS
from llamapipe.core.errors import PipelineError


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(config: dict, shipped: dict | None = None) -> dict:
    """The effective config: the target's overlays applied, every cross-field rule checked
    (``llamapipe.config.rules``, all problems in one error), then the parallel layout planned.
    ``shipped``: config.yaml's values, defaults filled in (the rehearsal keeps an sft schedule the
    user changed from them)."""
    cfg = copy.deepcopy(config)
    # a rehearsal of the cpu target has no npu settings to replace: nothing else can be resolved
    _stop_on(config_rules.rehearsal_needs_npu_target(cfg))
    if cfg.get("rehearsal"):
        from llamapipe.config import rehearsal

        rehearsal.apply(cfg, shipped)  # the listed differences from a real NPU run, nothing else
    if cfg["target"] == "npu":
        _overlay_npu(cfg)
    _stop_on(config_rules.check(cfg))
    if cfg["target"] == "npu":
        from llamapipe.config.parallel import apply_plan

        # after the rules: its verdict (a layout that cannot fit the cards) is about the layout alone
        _stop_on(_plan_knows_the_model(cfg))
        apply_plan(cfg)
    return cfg


def _plan_knows_the_model(cfg: dict) -> list[str]:
    """The layout check needs the model's shape: a hub model the planner knows, ``npu.model_config``
    or a local model directory's config.json (the planner's own message would name its CLI flag)."""
    from llamapipe.config.paths import local_model_dir, model_config_file
    from llamapipe.scaleout.planner import KNOWN_MODELS

    name = cfg["npu"]["model_name_or_path"]
    if model_config_file(cfg) or name in KNOWN_MODELS:
        return []
    local = local_model_dir(cfg, os.getcwd())
    where = (f"{os.path.join(local, 'config.json')} does not exist" if local
             else f"it is not a model the layout check knows ({', '.join(KNOWN_MODELS)})")
    example = os.path.join(local, "config.json") if local else "/path/to/config.json"
    return [f"npu.model_name_or_path ({name}): the layout check needs the model's shape and {where}: set "
            f"npu.model_config to the model's config.json (a path, or the JSON itself), e.g. "
            f"--config 'npu={{model_config: {example}}}'"]


def _overlay_npu(cfg: dict) -> None:
    npu = cfg["npu"]
    for section in OVERLAID_SECTIONS:
        cfg[section] = deep_merge(cfg[section], npu.get(section, {}))
    if cfg.get("runtime", "local") == "local" and not cfg.get("rehearsal"):
        cfg["runtime"] = "container"  # the guide: every NPU stage runs in the paddle-npu container
    if not cfg.get("devices"):
        cfg["devices"] = npu["devices"]


def _stop_on(problems: list[str]) -> None:
    if problems:
        raise PipelineError("\n".join(problems))






def npu_overrides(config: dict, defaults: dict) -> list[str]:
    """On target npu, ``npu.sft`` / ``npu.export`` / ``npu.predict`` overlay the shared sections:
    a value the user gave in ``sft`` (one that differs from ``defaults``, config.yaml's) under a
    key the overlay also sets is not used. One line each, naming both keys, their values, which
    wins and how to set it. The rehearsal empties the overlays (its sections are the cpu ones)."""
    if config.get("target") != "npu" or config.get("rehearsal"):
        return []
    lines = []
    for section in OVERLAID_SECTIONS:
        given, shipped = config.get(section) or {}, (defaults.get(section) or {})
        overlay = (config.get("npu") or {}).get(section) or {}
        for key, used in overlay.items():
            if key not in given or given[key] == shipped.get(key) or given[key] == used:
                continue
            value = json.dumps(given[key])
            lines.append(f"{section}.{key} = {value} is not used on target npu: npu.{section}.{key} = "
                         f"{json.dumps(used)} overlays it and wins. To use {value} on npu, set npu.{section}.{key} "
                         f"(--config 'npu={{{section}: {{{key}: {value}}}}}')")
    return lines


def load(path: str, schema: str | None = None, overrides: list[str] | None = None,
         configfiles: list[str] | None = None) -> dict:
    """config.yaml checked and resolved as common.smk does it, for tools that work without
    Snakemake (``llamapipe serve``, ``chat``, ``predict`` without ``--params``): ``configfiles``
    (``--configfile``) merged over it, then ``overrides`` (``--config key=value`` entries, read
    by Snakemake's own parser), the strings typed by the schema, defaults filled in."""
    import yaml

    with open(path, encoding="utf-8") as f:
        shipped_raw = yaml.safe_load(f)
    raw = copy.deepcopy(shipped_raw)
    for extra in configfiles or []:
        with open(extra, encoding="utf-8") as f:
            raw = deep_merge(raw, yaml.safe_load(f) or {})
    root = validation.config_schema(schema)
    if overrides:  # nested --config values are strings, typed by the schema as the workflow types them
        raw = deep_merge(raw, validation.coerce(_parse_overrides(overrides), root))
    shipped, _ = validation.validate(shipped_raw, root)
    return resolve(validation.checked(raw, root), shipped)


def _parse_overrides(entries: list[str]) -> dict:
    """``key=value`` entries exactly as ``snakemake --config`` reads them."""
    from snakemake.cli import parse_config

    try:
        return parse_config(entries)
    except ValueError as err:
        raise PipelineError(f"--config: {err}") from err
