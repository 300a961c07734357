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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, Callable

from snakemake.exceptions import WorkflowError

log = logging.getLogger("llamapipe.workflow")


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


def install_execution_hooks(workflow: Any, chain: list[str], default_target: str) -> None:
    execute = workflow.execute

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
            gaps = chain_gaps(chain, (str(t) for t in settings.targets), default_target)
            if gaps:
                print(f"{gaps[0]} is missing while later outputs exist: rebuilding it and what follows",
                      flush=True)
                settings.forcerun = frozenset(settings.forcerun) | set(gaps)
        return execute(*args, **kwargs)

    workflow.execute = execute_after_gap_check
