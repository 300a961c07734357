"""What an NPU stage's container gets from the host: the card nodes and the driver mounts of the
guide's ``docker run`` (explicit devices and read-only mounts instead of ``--privileged``).

Built at parse time, also where there are no cards (the dry-run in CI): a missing node is not an
error here. Preflight's ``devices`` and ``npu_smi`` checks (``llamapipe.npu.ascend_checks``) say
what is missing before any container starts. Python 3.9 compatible.
"""

from __future__ import annotations

import os

from llamapipe.npu.ascend_checks import NPU_SMI_GUIDE_PATH, Host, find_npu_smi

# The nodes the Ascend driver needs besides one /dev/davinciN per card (the guide's docker run).
NPU_CONTROL_DEVICES = ("davinci_manager", "devmm_svm", "hisi_hdc")
# The guide's -v mounts: driver libraries and tools the CANN runtime in the image loads from the host.
NPU_DRIVER_PATHS = ("/usr/local/Ascend/driver", NPU_SMI_GUIDE_PATH, "/usr/local/dcmi")


def device_nodes(cards: list[int], dev_root: str = "/dev") -> list[str]:
    """``davinciN`` for each card (the host's numbers) and the driver's control nodes."""
    return [f"{dev_root}/davinci{c}" for c in cards] + [f"{dev_root}/{name}" for name in NPU_CONTROL_DEVICES]


def driver_mounts(root: str = "/") -> list[dict]:
    """The driver paths, read-only at the guide's paths; npu-smi from where this host has it
    (driver installs put it in /usr/local/sbin). ``root``: a fake host tree in tests."""
    smi = find_npu_smi(Host(root=root)) or NPU_SMI_GUIDE_PATH
    return [{"source": os.path.join(root, (smi if m == NPU_SMI_GUIDE_PATH else m).lstrip("/")), "target": m,
             "read_only": True} for m in NPU_DRIVER_PATHS]
