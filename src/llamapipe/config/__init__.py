"""Resolve the validated config.yaml into what the stages of the chosen target read.

One config, two targets: ``target: npu`` overlays the ``npu.sft`` / ``npu.export`` /
``npu.predict`` sections onto the shared ones, so a knob (``max_steps``, ``src_length``...)
means the same thing on both targets, and the npu section holds what only the NPU run has
(image, cards, parallel degrees, fused ops, environment).
"""

from __future__ import annotations

import copy
from typing import Any

from llamapipe.config import rules as config_rules
from llamapipe.core.errors import PipelineError

OVERLAID_SECTIONS = ("sft", "export", "predict")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(config: dict) -> dict:
    """The effective config: the target's overlays applied, every cross-field rule checked
    (``llamapipe.config.rules``, all problems in one error), then the parallel layout planned."""
    cfg = copy.deepcopy(config)
    # a rehearsal of the cpu target has no npu settings to replace: nothing else can be resolved
    _stop_on(config_rules.rehearsal_needs_npu_target(cfg))
    if cfg.get("rehearsal"):
        from llamapipe.config import rehearsal

        rehearsal.apply(cfg)  # the listed differences from a real NPU run, nothing else
    if cfg["target"] == "npu":
        _overlay_npu(cfg)
    _stop_on(config_rules.check(cfg))
    if cfg["target"] == "npu":
        from llamapipe.config.parallel import apply_plan

        # after the rules: its verdict (a layout that cannot fit the cards) is about the layout alone
        apply_plan(cfg)
    return cfg


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


def schema_path() -> str:
    """workflow/schemas/config.schema.yaml of the checkout this package runs from."""
    import os

    return os.path.join(os.path.dirname(__file__), "..", "..", "..", "workflow", "schemas", "config.schema.yaml")


SCALAR_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def coerce_cli_scalars(config: Any, schema: dict, root: dict | None = None) -> Any:
    """Nested values given as ``--config 'sft={processes: 2}'`` reach the config as strings
    (Snakemake parses them with YAML's BaseLoader): read each such string as YAML where the
    schema wants a number, boolean or null there. Anything else is left for validation."""
    import yaml

    root = root or schema
    if "$ref" in schema:  # local refs only ("#/$defs/npu"), as the schema uses
        node: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    if isinstance(config, dict):
        props = schema.get("properties", {})
        return {k: coerce_cli_scalars(v, props[k], root) if k in props else v for k, v in config.items()}
    if not isinstance(config, str):
        return config
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    wanted = tuple(SCALAR_TYPES[t] for t in types if t in SCALAR_TYPES)
    if not wanted or "string" in types:
        return config
    for read in (int, float, yaml.safe_load):  # float: "3e-3", which YAML 1.1 reads as a string
        try:
            value = read(config)
        except (ValueError, yaml.YAMLError):
            continue
        if isinstance(value, wanted) and not (isinstance(value, bool) and bool not in wanted):
            return value
    return config


def load(path: str, schema: str | None = None) -> dict:
    """config.yaml validated with defaults filled in, as Snakemake's ``validate`` does, then
    resolved: for tools and tests that work without Snakemake."""
    import jsonschema
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    with open(schema or schema_path(), encoding="utf-8") as f:
        schema_doc = yaml.safe_load(f)
    return resolve(validate_with_defaults(raw, schema_doc, jsonschema))


def validate_with_defaults(config: dict, schema: dict, jsonschema: Any) -> dict:
    base = jsonschema.Draft202012Validator

    def set_defaults(validator, properties, instance, schema):
        for name, sub in properties.items():
            if isinstance(instance, dict) and "default" in sub and name not in instance:
                instance[name] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    filling = jsonschema.validators.extend(base, {"properties": set_defaults})
    config = copy.deepcopy(config)
    errors = sorted(filling(schema).iter_errors(config), key=lambda e: list(e.path))
    if errors:
        where = "/".join(map(str, errors[0].path)) or "(top level)"
        raise PipelineError(f"config {where}: {errors[0].message}")
    return config
