"""Parse the dry-run's NPU commands into comparable pieces: container spec, script steps, flags.

A rule's command on the npu target is ``llamapipe container-run --spec JSON -- bash -c SCRIPT``
(the rehearsal's local runtime: ``bash -c SCRIPT``); SCRIPT is "; "-joined steps. Tests compare
these pieces whole, never as substrings: ``--max_steps 100`` must not match ``--max_steps 1000``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field

from llamapipe.runners import commands

UPSTREAM_SCRIPTS = ("run_finetune.py", "run_pretrain.py", "predict/export_model.py", "predict/predictor.py",
                    "tools/merge_lora_params.py", "tools/merge_tp_and_pp_params.py")
# the collective smoke test's per-rank script, as the launcher gets it (an absolute path)
SMOKE_SCRIPT = os.path.join(commands.package_src_dir(), commands.SMOKE_SCRIPT)
COLLECTIVE_CHECK = ["python", "-m", "llamapipe.scaleout.collective_check"]


@dataclass
class Command:
    spec: dict | None  # the container spec, None when not containerized
    argv: list[str]  # what runs (in the container, or on the host)
    steps: list[list[str]] = field(default_factory=list)  # bash -c steps, each as an argv


def shell_commands(out: str) -> dict[str, str]:
    """rule name -> its printed shell command (``snakemake -n -p`` output), log redirect removed."""
    cmds = {}
    for block in re.split(r"\n(?=\[)", out):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        c = re.search(r"^Shell command: (.*?)(?=\n\S|\Z)", block, re.M | re.S)
        if m and c and c.group(1).strip() != "None":
            # "> log 2>&1", or "2>&1 | tee log" (download_data shows its lines on the terminal)
            cmds[m.group(1)] = re.split(r" (?:>|2>&1 \| tee) results/logs/", c.group(1).strip())[0]
    return cmds


def parse(command: str) -> Command:
    argv = shlex.split(command)
    spec = None
    if argv[:3] == ["llamapipe", "container-run", "--spec"]:
        spec = json.loads(argv[3])
        assert argv[4] == "--", argv[:5]
        argv = argv[5:]
    steps = []
    if argv[:2] == ["bash", "-c"]:
        assert len(argv) == 3, argv
        steps = [shlex.split(step) for step in argv[2].split("; ")]
    return Command(spec, argv, steps)


def flags(argv: list[str]) -> dict[str, str | None]:
    """``--name value`` pairs of an argv (a flag followed by another flag has value None).
    A repeated flag is an error: the dict would hide it."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        name = argv[i]
        assert name.startswith("--"), f"positional {name!r} among flags: {argv}"
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        assert name not in out, f"{name} given twice in {argv}"
        out[name] = value
        i += 1 if value is None else 2
    return out


def sft_only(step: list[str]) -> bool:
    """The steps of sft's script that smoke_collective's has not: plain logs, the checkpoints prepared."""
    return step == ["export", "NO_COLOR=1"] or step[:4] == ["python", "-m", "llamapipe.stages.collect", "prepare-sft"]


def find_step(cmd: Command, script: str) -> list[str]:
    """The step that runs an upstream script (``python [-m llamapipe.npu.cpu_shims] SCRIPT ...``)."""
    found = [s for s in cmd.steps if script in s]
    assert len(found) == 1, f"{script}: {len(found)} steps in {cmd.steps}"
    return found[0]


def script_flags(step: list[str], script: str) -> dict[str, str | None]:
    return flags(step[step.index(script) + 1:])


def launcher(step: list[str], script: str) -> tuple[list[str], dict[str, str | None]]:
    """(the argv before the launcher's flags, the launcher's flags) of a paddle.distributed.launch step."""
    head = step.index("paddle.distributed.launch") + 1
    # its flags end at its entry: the script, or the rehearsal's shim script that runs it
    entry = next((i for i, w in enumerate(step) if w.endswith("cpu_shims_script.py")), step.index(script))
    return step[:head], flags(step[head:entry])


def collective_check(step: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """(the supervisor's flags, the launcher step it runs) of smoke_collective's step."""
    assert step[:3] == COLLECTIVE_CHECK, step
    cut = step.index("--")
    return flags(step[3:cut]), step[cut + 1:]
