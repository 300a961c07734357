"""Variants: several fine-tunes of one project in one DAG (``variants:`` in config.yaml).

A variant is a name and the keys it overrides in the project's config. Its outputs live under
``results/variants/<name>/`` with the plain run's names; the stages whose command would be the
plain run's (preflight, the images, download, prepare, init_model when the variant leaves data,
model and seed alone) are shared: they run once, at the plain run's paths. So a variant's
predictions are those of a plain run of its config, and a change to one variant reruns its jobs
only (each rule's params carry its own variant's values).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamapipe.config.paths import PATHS, RESULTS, builds_base_model, stage_benchmark_names
from llamapipe.config.stage_params import stage_params_json
from llamapipe.core.errors import PipelineError

VARIANTS_DIR = f"{RESULTS}/variants"
VARIANT_ENV = "LLAMAPIPE_VARIANT"  # a variant's sft exports its name: its progress lines show it
COMPARISON_HTML = f"{VARIANTS_DIR}/comparison.html"
COMPARISON_TSV = f"{VARIANTS_DIR}/comparison.tsv"
# a path part on every filesystem, and no wildcard or shell trouble in a Snakemake target
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_WORDS = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"

# What a variant may override: the sections downstream of the base model, and data / model / seed
# (which give it its own download, prepare and init_model when they change those stages). The rest
# (target, cards, images, parallel layout, runtime) is the project's: one per DAG.
OVERRIDABLE = ("seed", "data", "model", "sft", "export", "predict", "npu")
NPU_OVERRIDABLE = ("sft", "export", "predict", "data")

# The stages a variant may share with the plain run, in DAG order, and the PATHS keys each writes.
UPSTREAM = (
    ("download_data", ("raw_data",)),
    ("prepare_data", ("data", "train", "dev")),
    ("init_model", ("base_model",)),
)
# Always the project's, whatever the variant: host checks, images, the plan, the smoke test.
PROJECT_KEYS = ("preflight", "base_image", "image_preflight", "plan", "image", "wheels", "smoke_collective",
                "smoke_launch_logs", "download_cache")


@dataclass(frozen=True)
class Run:
    """One run's paths: the plain run (``name`` None, ``results/``) or a variant. ``home`` of a
    stage: the results directory its log, benchmark and manifest go to (a shared stage's are the
    plain run's)."""

    name: str | None
    paths: dict
    shared: tuple = ()
    home_dir: str = RESULTS

    def home(self, stage: str) -> str:
        return RESULTS if stage in self.shared or stage in _PROJECT_STAGES else self.home_dir

    def bench(self, stage: str) -> str:
        return f"{self.home(stage)}/benchmarks/{stage}.tsv"

    def manifest(self, stage: str) -> str:
        return f"{self.home(stage)}/manifests/{stage}.json"

    def manifest_dirs(self) -> list[str]:
        """Where provenance finds this run's stage manifests: the plain run's (shared stages) first."""
        own = f"{self.home_dir}/manifests"
        return [own] if self.name is None else [f"{RESULTS}/manifests", own]

    def chain(self) -> list[str]:
        """Its stage outputs in DAG order (the rebuild-from-a-deleted-intermediate check)."""
        p = self.paths
        return [p["preflight"], f"{p['raw_data']}/train.json", p["train"], p["base_model"], p["sft"], p["merged"],
                p["inference"], p["predictions"], p["metrics"]]

    def benchmarks(self, cfg: dict) -> list[str]:
        return [self.bench(s) for s in stage_benchmark_names(cfg)]


# the stages that always run once per project
_PROJECT_STAGES = ("preflight", "pull_image", "build_image", "preflight_image", "build_ops", "smoke_collective", "plan",
                   "paddlenlp_checkout")
PLAIN = Run(None, dict(PATHS))


def variant_dir(name: str) -> str:
    return f"{VARIANTS_DIR}/{name}"


def own_upstream(cfg: dict, plain: dict) -> list[str]:
    """The upstream stages a variant runs itself: each whose params or seed differ from the plain
    run's, and every one after it (its input differs)."""
    own: list[str] = []
    for stage, _ in UPSTREAM:
        if stage == "init_model" and not builds_base_model(cfg):
            continue  # the npu target's named model: init_model only records it
        differs = (stage_params_json(stage, cfg) != stage_params_json(stage, plain) or cfg["seed"] != plain["seed"])
        if own or differs:
            own.append(stage)
    return own


def variant_run(name: str, cfg: dict, plain: dict) -> Run:
    """The paths of variant ``name`` whose resolved config is ``cfg`` (``plain``: the plain run's)."""
    home = variant_dir(name)
    own = own_upstream(cfg, plain)
    shared_keys = set(PROJECT_KEYS)
    for stage, keys in UPSTREAM:
        if stage not in own:
            shared_keys.update(keys)
    paths = {}
    for key, path in PATHS.items():
        if key in shared_keys:
            paths[key] = path
        elif key == "raw_data":  # the plain run's lies outside results/ (data/AdvertiseGen)
            paths[key] = f"{home}/raw_data"
        else:
            paths[key] = home + path[len(RESULTS):]
    shared = tuple(stage for stage, _ in UPSTREAM if stage not in own)
    return Run(name, paths, shared, home)


# what results/variants/ holds besides the variants: the comparison and its log
RESERVED = ("comparison.html", "comparison.tsv", "logs")


def _name_problems(variants: dict) -> list[str]:
    problems = []
    for name in variants:
        if not NAME.fullmatch(str(name)):
            problems.append(f"variants.{name}: a variant's name is a directory under {VARIANTS_DIR}/: {NAME_WORDS}")
        elif name in RESERVED:
            problems.append(f"variants.{name}: {VARIANTS_DIR}/{name} is the comparison's; name the variant otherwise")
    return problems


def _key_problems(name: str, overrides: object) -> list[str]:
    if not isinstance(overrides, dict):
        return [f"variants.{name}: the keys it overrides, a mapping (e.g. {{sft: {{lora: true}}}}), not "
                f"{type(overrides).__name__}"]
    problems = []
    for key, value in overrides.items():
        if key not in OVERRIDABLE:
            problems.append(f"variants.{name}.{key}: a variant may override {', '.join(OVERRIDABLE)}; {key} is the "
                            "project's (one per DAG: set it at the top level, or use another project directory)")
        elif key == "npu":
            if not isinstance(value, dict):
                problems.append(f"variants.{name}.npu: a mapping of {', '.join(NPU_OVERRIDABLE)}")
                continue
            for sub in value:
                if sub not in NPU_OVERRIDABLE:
                    problems.append(f"variants.{name}.npu.{sub}: a variant may override npu."
                                    f"{{{','.join(NPU_OVERRIDABLE)}}}; npu.{sub} is the project's")
    return problems


def _overlaid_problems(name: str, overrides: dict, config: dict) -> list[str]:
    """On target npu ``npu.<section>`` overlays ``<section>`` (``config.npu_overrides``): a
    variant's ``sft``/``export``/``predict``/``data`` value under a key the overlay sets would do
    nothing, and the variant would silently be the plain run."""
    from llamapipe.config.validation import OVERLAID_SECTIONS

    if config.get("target") != "npu" or config.get("rehearsal"):
        return []
    problems = []
    for section in OVERLAID_SECTIONS:
        overlay = (config.get("npu") or {}).get(section) or {}
        for key, value in (overrides.get(section) or {}).items():
            if key in overlay and overlay[key] != value:
                problems.append(f"variants.{name}.{section}.{key} is not used on target npu: npu.{section}.{key} "
                                f"({overlay[key]!r}) overlays it; set variants.{name}.npu.{section}.{key} instead")
    return problems


def _prefixed(name: str, problems: list[str]) -> list[str]:
    out = []
    for p in problems:
        text = p[2:] if p.startswith("- ") else p
        out.append(f"variants.{name}: {text}")
    return out


def resolve_variants(config: dict, shipped: dict, schema: dict) -> dict[str, dict]:
    """Every variant's resolved config: the project's config (``variants`` left out) with its
    overrides merged in, typed by the schema like ``--config`` values, checked, resolved and
    checked again as the plain config is. Every problem of every variant in one error."""
    from llamapipe.config import deep_merge, resolve
    from llamapipe.config.validation import coerce, validate

    variants = config.get("variants") or {}
    problems = _name_problems(variants)
    resolved: dict[str, dict] = {}
    base = {k: v for k, v in config.items() if k != "variants"}
    for name, overrides in variants.items():
        key_problems = _key_problems(name, overrides)
        if key_problems:
            problems += key_problems
            continue
        merged = coerce(deep_merge(base, overrides), schema)
        checked, errors = validate(merged, schema)
        if errors:
            problems += _prefixed(name, errors)
            continue
        checked.pop("variants", None)  # a variant's config is its plain run's: no variants in it
        overlaid = _overlaid_problems(name, overrides, checked)
        if overlaid:
            problems += overlaid
            continue
        try:
            cfg = resolve(checked, shipped)
        except PipelineError as err:
            problems += [f"variants.{name}: {line}" for line in str(err).splitlines() if line.strip()]
            continue
        _, errors = validate(cfg, schema, defaults=False)
        cfg.pop("variants", None)
        if errors:
            problems += _prefixed(name, errors)
            continue
        resolved[name] = cfg
    if problems:
        raise PipelineError(f"{len(problems)} problem(s) in variants:\n" + "\n".join(f"- {p}" for p in problems))
    return resolved

