"""Help Snakemake with three things users expect, applied when execution starts.

1. `--forcerun export results/predictions.json` redoes export and what follows for that
   target (see ``split_swallowed_targets``).
2. Rebuilding from a deleted intermediate:

Snakemake does not rebuild a missing intermediate output while the outputs after it exist
(its needs-run logic starts from the requested targets). Users expect "delete results/merged,
ask for the metrics" to redo merge and everything after it. At the start of execution we find
the first missing output of the stage chain that lies before an existing one the request
depends on, and add it to ``--forcerun``.

3. The rerun after a killed snakemake: its stale lock is cleared when nothing of it is left
   (``llamapipe.snakemake_hooks.stale_lock``); orphaned jobs still running stop the rerun with their pids.

The targets reach the workflow object only after the Snakefile is parsed, so the check wraps
``workflow.execute``. It lives in a package module, not a .smk file, so Snakemake does not
report its own job failures as happening "in" this code.

All of this rests on Snakemake internals that are no public API (``SNAKEMAKE_WORKFLOW_API``,
``SNAKEMAKE_CLASS_API``). ``install_execution_hooks`` checks them first: a Snakemake that lacks one
stops at parse time with a WorkflowError naming it, its version and ``TESTED_SNAKEMAKE``, instead
of an AttributeError deep inside a run. They are present from Snakemake 9.0.0 (the Snakefile's
``min_version``) through the pinned version; tests/test_workflow_glue.py checks them on the
installed Snakemake.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import os
from collections.abc import Iterable
from typing import Any, Callable

from snakemake.exceptions import WorkflowError

log = logging.getLogger("llamapipe.workflow")

# The Snakemake this glue is tested with: the pin in envs/constraints.txt (a test keeps them equal).
TESTED_SNAKEMAKE = "9.27.1"

# What the glue uses of the Workflow object: it replaces ``execute`` (called with the executor
# plugin as ``executor_plugin``, by keyword or first) and reads the rest when execution starts.
SNAKEMAKE_WORKFLOW_API = ("execute", "dag_settings", "execution_settings", "is_main_process", "rules")

# (module, class, attributes, reassigned): what it reads of the objects behind them; ``forcerun``
# and ``targets`` of the DAG settings it also reassigns, so those must not be frozen.
SNAKEMAKE_CLASS_API = (
    ("snakemake.settings.types", "DAGSettings", ("forcerun", "targets"), True),
    ("snakemake.settings.types", "ExecutionSettings", ("lock",), False),
    ("snakemake_interface_executor_plugins.settings", "CommonSettings", ("dryrun_exec",), False),
    ("snakemake.rules", "Rule", ("name",), False),
)

_ABSENT = object()
ClassApi = tuple[str, Any, tuple[str, ...], bool]  # (label, class or None, attributes, reassigned)


def chain_gaps(chain: list[str], requested: Iterable[str], default_target: str,
               exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """The first missing chain output that lies before an existing output the request needs."""
    requested = {r.rstrip("/") for r in requested}
    wanted = [i for i, path in enumerate(chain) if path in requested] or [chain.index(default_target)]
    last = max(wanted)
    for i, path in enumerate(chain[:last]):
        if not exists(path) and any(exists(p) for p in chain[i + 1 : last + 1]):
            return [path]
    return []


def variant_chain_gaps(chains: dict[str, list[str]], requested: Iterable[str], variants_dir: str,
                       exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """``chain_gaps`` for each variant whose outputs the request needs: a target under its
    directory (``results/variants/<name>/...``) or one that needs every variant (anything else
    under ``variants_dir``, e.g. the comparison)."""
    requested = [r.rstrip("/") for r in requested]
    gaps: list[str] = []
    for name, chain in chains.items():
        home = f"{variants_dir}/{name}"
        mine = [r for r in requested if r == home or r.startswith(home + "/")]
        every = [r for r in requested if r.startswith(variants_dir + "/") and not
                 any(r.startswith(f"{variants_dir}/{other}/") for other in chains)]
        if mine or every:
            gaps += chain_gaps(chain, mine, chain[-1], exists)
    return gaps


def split_swallowed_targets(forcerun: Iterable[str], targets: Iterable[str], rule_names: Iterable[str]) -> tuple:
    """``snakemake --forcerun export results/predictions.json``: argparse hands both words to
    ``--forcerun`` (it takes several values) and leaves no target, so the default target would
    be built. When no target was given and ``--forcerun`` holds rule names and paths, the paths
    are what the user asked for: make them the targets."""
    forcerun, targets, rules = list(forcerun), list(targets), set(rule_names)
    named_rules = [f for f in forcerun if f in rules]
    paths = [f for f in forcerun if f not in rules]
    if targets or not named_rules or not paths:
        return forcerun, targets
    return named_rules, paths


def _has_attribute(cls: Any, name: str) -> bool:
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    return inspect.getattr_static(cls, name, _ABSENT) is not _ABSENT


def _snakemake_classes() -> list[ClassApi]:
    """``SNAKEMAKE_CLASS_API`` with its classes imported (None where the installed Snakemake has none)."""
    found = []
    for module, name, attributes, reassigned in SNAKEMAKE_CLASS_API:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            cls = None
        found.append((f"{module}.{name}" if cls is None else name, cls, attributes, reassigned))
    return found


def missing_snakemake_api(workflow: Any, classes: Iterable[ClassApi] | None = None) -> list[str]:
    """What the glue uses that ``workflow`` (and the Snakemake behind it) lacks; [] when all is there.

    Looked up without running properties: at parse time the settings are not set yet."""
    missing = [f"Workflow.{name}" for name in SNAKEMAKE_WORKFLOW_API
               if inspect.getattr_static(workflow, name, _ABSENT) is _ABSENT]
    if "Workflow.execute" not in missing:
        try:
            params = list(inspect.signature(workflow.execute).parameters.values())
        except (TypeError, ValueError):
            params = []
        first = params[0] if params else None
        if first is None or first.name != "executor_plugin" or first.kind is not first.POSITIONAL_OR_KEYWORD:
            missing.append("Workflow.execute(executor_plugin, ...) (its first parameter)")
    for label, cls, attributes, reassigned in _snakemake_classes() if classes is None else classes:
        if cls is None:
            missing.append(label)
            continue
        missing += [f"{label}.{name}" for name in attributes if not _has_attribute(cls, name)]
        params = getattr(cls, "__dataclass_params__", None)
        if reassigned and params is not None and params.frozen:
            missing.append(f"{label} (frozen: {', '.join(attributes)} cannot be reassigned)")
    return missing


def check_snakemake_api(workflow: Any, classes: Iterable[ClassApi] | None = None) -> None:
    """A WorkflowError naming what is missing, the installed and the tested Snakemake."""
    missing = missing_snakemake_api(workflow, classes)
    if not missing:
        return
    import snakemake

    installed = getattr(snakemake, "__version__", "of unknown version")
    raise WorkflowError(
        f"the installed Snakemake {installed} lacks Snakemake internals this pipeline's execution hooks "
        f"(llamapipe.snakemake_hooks.workflow_glue) use: {', '.join(missing)}. This pipeline is tested "
        f"with snakemake=={TESTED_SNAKEMAKE} (envs/constraints.txt): install that version, e.g. "
        f"`pip install -c envs/constraints.txt snakemake`."
    )


def install_execution_hooks(workflow: Any, chain: list[str], default_target: str,
                            variant_chains: dict[str, list[str]] | None = None,
                            variants_dir: str | None = None) -> None:
    """``chain``: the plain run's stage outputs in DAG order; ``variant_chains``: each variant's
    (with variants, a bare ``snakemake`` builds their comparison, under ``variants_dir``)."""
    check_snakemake_api(workflow)
    execute = workflow.execute

    @functools.wraps(execute)  # keeps its signature visible to a second check
    def execute_after_gap_check(*args: Any, **kwargs: Any) -> Any:
        plugin = kwargs.get("executor_plugin", args[0] if args else None)
        dryrun = getattr(getattr(plugin, "common_settings", None), "dryrun_exec", False)
        if workflow.is_main_process and workflow.execution_settings.lock and not dryrun:
            from llamapipe.snakemake_hooks import stale_lock

            if stale_lock.check(say=lambda line: print(line, flush=True)) == "leftover":
                # unlocking would let a second run write where the orphans write
                raise WorkflowError("not started: jobs of the killed run still run here (listed above)")
        settings = workflow.dag_settings
        if settings is not None:
            forcerun, targets = split_swallowed_targets(
                settings.forcerun, settings.targets, (r.name for r in workflow.rules))
            if list(targets) != list(settings.targets):
                print(f"reading --forcerun {' '.join(sorted(settings.forcerun))} as --forcerun "
                      f"{' '.join(forcerun)} with target(s) {' '.join(targets)}", flush=True)
                settings.forcerun, settings.targets = frozenset(forcerun), frozenset(targets)
            requested = [str(t) for t in settings.targets]
            gaps: list[str] = []
            if variant_chains and variants_dir:
                if not requested:
                    requested = [variants_dir + "/"]  # the default target: the comparison
                gaps += variant_chain_gaps(variant_chains, requested, variants_dir)
                plain = [r for r in requested if not r.startswith(variants_dir + "/")]
                gaps += chain_gaps(chain, plain, default_target) if plain else []
            else:
                gaps += chain_gaps(chain, requested, default_target)
            for gap in gaps:
                print(f"{gap} is missing while later outputs exist: rebuilding it and what follows", flush=True)
            if gaps:
                settings.forcerun = frozenset(settings.forcerun) | set(gaps)
        return execute(*args, **kwargs)

    workflow.execute = execute_after_gap_check
