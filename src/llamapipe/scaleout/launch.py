"""``paddle.distributed.launch`` command lines for both targets, one builder.

A layout is processes per node (npu: one per visible card; cpu: ``sft.processes``) times nodes.
``node_launcher`` says who starts each node's launcher:

- ``local`` (default): this job; with several nodes, all of them on this host under
  ``llamapipe.scaleout.local_nodes`` (the stand-in for N nodes: what ``--nnodes/--master`` do on a
  cluster, over 127.0.0.1);
- ``srun``: inside a SLURM job, ``srun`` starts one launcher per node of the job with
  ``--nnodes $SLURM_NNODES``; the node that runs the job step (SLURM's first node) is the master.

Each node's launcher logs under ``<log_dir>/node<K>``: the launcher names worker logs by local
rank (``workerlog.0`` on every node), so nodes sharing a filesystem would overwrite each other.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from llamapipe.core.cards import parse_cards

NODE_ID = "@NODE@"  # in argv for local_nodes, which puts each node's index there (no braces: Snakemake formats params)
SRUN_MASTER_PORT = 36677  # srun without a configured master: <first node>:this
# What the node running the job step calls its own address: what the launcher compares --master
# with (launch/context/node.py: gethostbyname(getfqdn(hostname))) to decide who serves the rendezvous.
SRUN_MASTER_HOST = "$(python3 -c \"print(__import__('socket').gethostbyname(__import__('socket').getfqdn()))\")"


@dataclass(frozen=True)
class LaunchLayout:
    device: str  # "cpu": --nproc_per_node; otherwise --devices over the visible cards
    procs: int  # processes per node
    nodes: int = 1
    master: str | None = None  # host:port of the rendezvous
    ips: str | None = None
    node_launcher: str = "local"

    @property
    def world(self) -> int:
        return self.procs * self.nodes


def npu_layout(cfg: dict) -> LaunchLayout:
    """One process per card in ``devices``, ``npu.nodes`` nodes."""
    npu = cfg["npu"]
    return LaunchLayout(npu["device"], len(parse_cards(cfg["devices"])), npu.get("nodes", 1), npu.get("master"),
                  npu.get("ips"), npu.get("node_launcher", "local"))


def cpu_layout(cfg: dict) -> LaunchLayout:
    """``sft.processes`` per node, ``sft.nodes`` nodes."""
    sft = cfg["sft"]
    return LaunchLayout("cpu", sft.get("processes", 1), sft.get("nodes", 1), sft.get("master"), None,
                  sft.get("node_launcher", "local"))


def layout_of(cfg: dict) -> LaunchLayout:
    return npu_layout(cfg) if cfg["target"] == "npu" else cpu_layout(cfg)


def launched(cfg: dict) -> bool:
    """Whether the cpu sft stage runs under the launcher (one plain process otherwise)."""
    layout = cpu_layout(cfg)
    return layout.world > 1 or layout.node_launcher == "srun"


def by_srun(layout: LaunchLayout) -> bool:
    return layout.node_launcher == "srun"


def processes_on_one_host(layout: LaunchLayout) -> int:
    """How many processes share one host's cores (the local stand-in puts every node here)."""
    return layout.procs * (layout.nodes if layout.node_launcher == "local" else 1)


def slurm_nodes(layout: LaunchLayout) -> int:
    """Nodes the SLURM job must hold: srun starts a launcher on each (local: one host)."""
    return layout.nodes if layout.node_launcher == "srun" else 1


def launch_argv(layout: LaunchLayout, entry: list[str], log_dir: str) -> list[str]:
    """``python -u -m paddle.distributed.launch ... <entry>`` for one node's launcher."""
    argv = ["python", "-u", "-m", "paddle.distributed.launch"]
    if layout.device == "cpu":  # a CPU build has no device labels: --devices raises ValueError
        argv += ["--nproc_per_node", str(layout.procs)]
    else:
        # The ids as the runtime numbers the cards, not the host's: ASCEND_RT_VISIBLE_DEVICES (the
        # cards) leaves the runtime n cards, 0..n-1, and the launcher looks each --devices id up
        # in that list (launch/context/device.py, get_selected_devices: labels.index): host ids
        # 4,5,6,7 raise ValueError there ('4' is not in list ['0', '1', '2', '3']).
        argv += ["--devices", ",".join(str(i) for i in range(layout.procs))]
    if layout.nodes == 1 and not by_srun(layout):
        return argv + ["--log_dir", log_dir, *entry]
    if by_srun(layout):
        argv += ["--log_dir", f"{log_dir}/node$SLURM_NODEID", "--nnodes", "$SLURM_NNODES",
                 "--master", "$LLAMAPIPE_MASTER"]
    else:
        argv += ["--log_dir", f"{log_dir}/node{NODE_ID}", "--nnodes", str(layout.nodes)]
        if layout.master:
            argv += ["--master", layout.master]
    if layout.ips:
        argv += ["--ips", layout.ips]
    return argv + entry


def node_command(layout: LaunchLayout, launch: list[str]) -> list[str]:
    """How the launch argv starts on every node: as is (one node), under local_nodes, or the
    per-node script srun runs (see ``srun_script``)."""
    if by_srun(layout):
        return ["bash", "-c", shell_line(launch)]
    if layout.nodes == 1:
        return launch
    return ["python", "-m", "llamapipe.scaleout.local_nodes", "--nodes", str(layout.nodes), "--", *launch]


def srun_script(layout: LaunchLayout, per_node: str, after: list[str], before: list[str] = ()) -> list[str]:
    """The job step's script: the master's address, ``before`` (preparing, once), srun over the
    allocation's nodes (one task each: one launcher per node), then ``after`` (collecting, once).
    ``per_node`` is the shell command each task runs, with ``$SLURM_NODEID``/``$SLURM_NNODES``/
    ``$LLAMAPIPE_MASTER`` unexpanded. No braces anywhere: Snakemake formats the rule's params as a template."""
    master = layout.master or f"{SRUN_MASTER_HOST}:{SRUN_MASTER_PORT}"
    lines = [
        "set -eo pipefail",
        '[ -n "$SLURM_JOB_ID" ] || (echo "node_launcher srun: not inside a SLURM job (run it through a slurm '
        'profile, or set node_launcher: local)" >&2 && exit 2)',
        f'[ "$SLURM_NNODES" = {layout.nodes} ] || (echo "node_launcher srun: the job has $SLURM_NNODES node(s), '
        f'the layout {layout.nodes}: ask for --nodes={layout.nodes}" >&2 && exit 2)',
        f"export LLAMAPIPE_MASTER={master}",
        'echo "sft: $SLURM_NNODES nodes ($SLURM_JOB_NODELIST), master $LLAMAPIPE_MASTER"',
        *before,
        # --overlap: the rule itself may run inside a step holding the job's CPUs (the jobstep plugin's)
        f"srun --nodes={layout.nodes} --ntasks={layout.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 --overlap "
        f"{per_node}",
        *after,
    ]
    return ["bash", "-c", "; ".join(lines)]


_EXPANDED = re.compile(r"^[\w./:@-]*(\$[A-Z_]+[\w./:@-]*)+$")


def shell_line(argv: list[str]) -> str:
    """``shlex.join``, but the tokens that name our own shell variables (``$SLURM_NODEID``, ...)
    stay expandable: double-quoted rather than single-quoted."""
    return " ".join(f'"{a}"' if _EXPANDED.match(a) else shlex.quote(a) for a in argv)
