"""A fake Ascend host (and image) in a temp tree, for llamapipe.npu.ascend_checks: no NPU needed.

``build(root, **changes)`` writes a healthy 8-card Ascend 910B host with the CANN 8.0.0 stack of
config.yaml's pairing table; each keyword changes one thing (the injected failures of
tests/test_ascend_checks.py). What it writes mirrors real output:

- ``npu-smi info``: the layout of npu-smi 24.1.0 as printed in vllm-project/vllm-ascend#336
  (8 x 910B3, "No running processes found in NPU n") and a busy card as in
  vllm-project/vllm-ascend#5144 (``| 5       0 | 2865645 | VLLMEngineCor | 56131 |``);
  the dcmi error as in vllm-project/vllm-ascend#2698.
- ``ascend_toolkit_install.info``: the keys of CANN 8.0.0's (vllm-ascend#336);
  ``opp_kernel/version.info``: the keys CANN's kernels package writes (``version_dir`` = the
  toolkit's version; the ``Version`` value here is made up).
- ATB under ``nnal/atb/latest/atb/cxx_abi_0`` (ATB_HOME_PATH in vllm-ascend#5144).
- lspci: ``Processing accelerators: Huawei Technologies Co., Ltd. Device d802 (rev 20)``.
- ldd: prints ``lib => path (0x...)`` or ``lib => not found`` for the libraries the fake plugin
  lists, searched on LD_LIBRARY_PATH, as the real one resolves them.
- Python packages (paddle, paddlenlp, numpy, paddle_custom_device) as tiny modules with
  dist-info metadata, imported by the real interpreter.
"""

from __future__ import annotations

import http.server
import json
import os
import stat
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from llamapipe.npu.ascend_checks import Host

BUS = ["0000:C1:00.0", "0000:C2:00.0", "0000:81:00.0", "0000:82:00.0", "0000:01:00.0", "0000:02:00.0",
       "0000:41:00.0", "0000:42:00.0"]
PAIRING = {  # config.yaml's npu.pairing (the test checks they agree)
    "base": "ccr-2vdh3abv-pub.cnc.bj.baidubce.com/device/paddle-npu:3.0.0-cann800-ubuntu20-npu-910b-x86_64-gcc84-py310",
    "paddle_version": "3.0.0", "paddle_custom_npu_version": "3.0.0", "cann": "8.0.0", "chip": "ascend910b",
    "driver_min": "23.0.3", "drivers": ["23.0.3", "24.1.rc1", "24.1.rc2", "24.1.rc3", "24.1.0"],
}
PLUGIN_NEEDS = ["libascendcl.so", "libhccl.so", "libascend_hal.so", "libatb.so"]


@dataclass
class Spec:
    """One fake host; every field is one thing a test can break."""

    cards: int = 8
    pci: str = "d802"  # lspci device id of every card ("" = no Ascend card on the bus)
    lspci: bool = True
    missing_nodes: tuple = ()  # device nodes not created (davinci3, devmm_svm ...)
    driver: str | None = "24.1.0"
    npu_smi_dir: str | None = "/usr/local/sbin"  # where the driver installs it; None: nowhere
    npu_smi_error: str | None = None  # e.g. the dcmi -8005 lines: npu-smi prints them and fails
    card_name: str = "910B3"
    health: dict = field(default_factory=dict)  # npu -> Health ("Alarm" ...)
    hbm_total_mb: int = 65536
    hbm_used_mb: dict = field(default_factory=dict)  # npu -> MB in use (default: 3386, idle)
    processes: list = field(default_factory=list)  # (npu, pid, name, memory MB)
    mem_total_kb: int = 2113254808
    cann: str = "8.0.0"  # the toolkit's version (its directory, install.info, latest ->)
    latest: str | None = None  # another CANN installed beside it, and ascend-toolkit/latest -> it
    cann_set_env: bool = True
    kernels_chip: str | None = "ascend910b"  # the kernel directory installed (None: no kernels package)
    kernels_version: str | None = None  # opp_kernel version_dir (default: cann)
    atb_dir: str | None = "nnal/atb"  # where ATB's set_env.sh is (atb or nnal/atb; None: not installed)
    atb_home: bool = True  # its set_env.sh exports ATB_HOME_PATH
    libatb: bool = True  # libatb.so is in ATB_HOME_PATH/lib
    paddle: str = "3.0.0"
    custom_npu: str | None = "3.0.0"  # None: not installed
    plugin_so: bool = True
    numpy: str = "1.26.4"
    paddlenlp_error: str | None = None  # paddlenlp's import raises this
    shm_kb: int = 134217728  # /dev/shm size df reports (128 GiB)
    wheel_error: str | None = None  # a built paddlenlp_ops wheel whose import raises this


@dataclass
class FakeAscend:
    root: Path
    spec: Spec
    site: Path
    bin: Path

    def host(self, **kw) -> Host:
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "PYTHONPATH": str(self.site), "HOME": str(self.root)}
        return Host(root=str(self.root), lspci=str(self.bin / "lspci"), ldd=str(self.bin / "ldd"),
                    df=str(self.bin / "df"), python=sys.executable, env=env, site_dirs=[str(self.site)], **kw)

    def host_params(self, **over) -> dict:
        return {"cards": list(range(8)), "dev_root": "/dev", "ascend_root": "/usr/local/Ascend",
                "control_devices": ["davinci_manager", "devmm_svm", "hisi_hdc"], "pairing": PAIRING,
                "shm_size": "128g", "sft_dtype": "bfloat16", "model_name_or_path": "meta-llama/Llama-2-13b",
                "model_cache": str(self.root / "cache/models"), "model_built": False, **over}

    def image_params(self, **over) -> dict:
        return {"ascend_root": "/usr/local/Ascend", "env_scripts": ["ascend-toolkit/set_env.sh"],
                "atb_scripts": ["atb/set_env.sh", "nnal/atb/set_env.sh"], "ascend_env": True, "device": "npu",
                "pairing": PAIRING, "shm_size": "128g", "inference_model": True,
                "wheels": str(self.root / "wheels"), **over}


def _write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if mode is not None:
        path.chmod(path.stat().st_mode | mode)
    return path


def _script(path: Path, body: str) -> Path:
    return _write(path, "#!/bin/sh\n" + body, stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def npu_smi_info(s: Spec) -> str:
    """``npu-smi info`` as npu-smi 24.1.0 prints it (column widths as in vllm-ascend#336)."""
    rule, double = ("+" + "-" * 27 + "+" + "-" * 15 + "+" + "-" * 52 + "+",
                    "+" + "=" * 27 + "+" + "=" * 15 + "+" + "=" * 52 + "+")

    def row(*cells: str, widths=(27, 15, 52)) -> str:
        return "|" + "|".join(c.ljust(w) for c, w in zip(cells, widths)) + "|"

    lines = ["+" + "-" * 96 + "+", "|" + " npu-smi 24.1.0".ljust(34) + "Version: 24.1.0".ljust(62) + "|", rule,
             row(" NPU   Name", " Health", " Power(W)    Temp(C)           Hugepages-Usage(page)"),
             row(" Chip", " Bus-Id", " AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)"), double]
    for n in range(s.cards):
        used = s.hbm_used_mb.get(n, 3386)
        lines += [row(f" {n:<6}{s.card_name}", f" {s.health.get(n, 'OK')}", f" {'98.1':<12}{'38':<18}0    / 0"),
                  row(" 0", f" {BUS[n % 8]}", f" {'0':<12}{'0    / 0':<18}{used:<5}/ {s.hbm_total_mb}"), double]
    lines += [rule, row(" NPU     Chip", " Process id", " Process name", " Process memory(MB)",
                        widths=(27, 15, 26, 25)), double]
    for n in range(s.cards):
        procs = [p for p in s.processes if p[0] == n]
        for npu, pid, name, mem in procs:
            lines.append(row(f" {npu:<8}0", f" {pid}", f" {name}", f" {mem}", widths=(27, 15, 26, 25)))
        if not procs:
            lines.append("|" + f" No running processes found in NPU {n}".ljust(96) + "|")
        lines.append(double)
    return "\n".join(lines) + "\n"


LDD = r"""so="$1"
[ -f "$so" ] || { echo "ldd: $so: No such file or directory" >&2; exit 1; }
printf '\tlinux-vdso.so.1 (0x00007ffc8a5f1000)\n'
while read -r lib; do
  [ -n "$lib" ] || continue
  found=""
  old_ifs="$IFS"; IFS=:
  for d in $LD_LIBRARY_PATH; do
    if [ -n "$d" ] && [ -e "$d/$lib" ]; then found="$d/$lib"; break; fi
  done
  IFS="$old_ifs"
  if [ -n "$found" ]; then printf '\t%s => %s (0x00007f3a1c000000)\n' "$lib" "$found"
  else printf '\t%s => not found\n' "$lib"; fi
done < "$so"
printf '\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3a1b800000)\n'
"""


def _dist(site: Path, name: str, version: str) -> None:
    _write(site / f"{name.replace('-', '_')}-{version}.dist-info" / "METADATA",
           f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _toolkit(version_dir: Path, version: str, kernels_chip: str | None, kernels_version: str) -> None:
    """One CANN version's directory: install info, libraries, the kernels package."""
    _write(version_dir / "x86_64-linux/ascend_toolkit_install.info",
           f"package_name=Ascend-cann-toolkit\nversion={version}\ninnerversion=V100R001C20SPC001B251\n"
           "compatible_version=[V100R001C15],[V100R001C17],[V100R001C18],[V100R001C19],[V100R001C20]\n"
           f"arch=x86_64\nos=linux\npath=/usr/local/Ascend/ascend-toolkit/{version}/x86_64-linux\n")
    for lib in ("libascendcl.so", "libhccl.so"):
        _write(version_dir / "lib64" / lib, "")
    if kernels_chip:
        (version_dir / "opp/built-in/op_impl/ai_core/tbe/kernel" / kernels_chip).mkdir(parents=True, exist_ok=True)
        _write(version_dir / "opp_kernel/version.info", f"Version=8.0.T63.0.B251\nversion_dir={kernels_version}\n"
               "timestamp=20241218_162135000\n")


def build(root: Path, **changes) -> FakeAscend:
    s = replace(Spec(), **changes)
    root.mkdir(parents=True, exist_ok=True)
    bindir, site, ascend = root / "fakebin", root / "site-packages", root / "usr/local/Ascend"
    # host: PCI bus, device nodes, driver, npu-smi, memory
    if s.lspci:
        pci = "".join(f"{BUS[n][5:].lower()} Processing accelerators: Huawei Technologies Co., Ltd. Device {s.pci} "
                      "(rev 20)\n" for n in range(s.cards)) if s.pci else ""
        _script(bindir / "lspci", "cat <<'EOF'\n00:00.0 Host bridge: Intel Corporation Device 09a2 (rev 04)\n"
                f"{pci}EOF\n")
    for name in [f"davinci{n}" for n in range(s.cards)] + ["davinci_manager", "devmm_svm", "hisi_hdc"]:
        if name not in s.missing_nodes:
            _write(root / "dev" / name, "")
    (root / "dev/shm").mkdir(parents=True, exist_ok=True)
    _write(ascend / "driver/lib64/driver/libascend_hal.so", "")
    if s.driver:
        _write(ascend / "driver/version.info", f"Version={s.driver}\nascendhal_version=7.35.23\naicpu_version=1.0\n"
               "tdt_version=1.0\nlog_version=1.0\nprof_version=2.0\ndvppkernels_version=1.1\ntsfw_version=1.0\n")
    if s.npu_smi_dir:
        body = (f"cat >&2 <<'EOF'\n{s.npu_smi_error}\nEOF\nexit 1\n" if s.npu_smi_error else
                f'[ "$1" = info ] || exit 1\ncat <<\'EOF\'\n{npu_smi_info(s)}EOF\n')
        _script(root / s.npu_smi_dir.lstrip("/") / "npu-smi", body)
    _write(root / "proc/meminfo", f"MemTotal:       {s.mem_total_kb} kB\nMemFree:        {s.mem_total_kb // 2} kB\n")
    # image: CANN toolkit(s) and kernels, ATB
    tk = ascend / "ascend-toolkit"
    for version in {s.cann, s.latest or s.cann}:
        _toolkit(tk / version, version, s.kernels_chip, s.kernels_version or version)
    os.symlink(s.latest or s.cann, tk / "latest")
    if s.cann_set_env:
        _write(tk / "set_env.sh", '_tk="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
               'export ASCEND_TOOLKIT_HOME="$_tk/latest"\nexport ASCEND_OPP_PATH="$ASCEND_TOOLKIT_HOME/opp"\n'
               'export LD_LIBRARY_PATH="$ASCEND_TOOLKIT_HOME/lib64:$_tk/../driver/lib64/driver:${LD_LIBRARY_PATH}"\n')
    if s.atb_dir:
        atb_home = ascend / s.atb_dir / "latest/atb/cxx_abi_0"
        (atb_home / "lib").mkdir(parents=True, exist_ok=True)
        if s.libatb:
            _write(atb_home / "lib/libatb.so", "")
        home = 'export ATB_HOME_PATH="$_atb/latest/atb/cxx_abi_0"\n' if s.atb_home else ""
        _write(ascend / s.atb_dir / "set_env.sh", '_atb="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n' + home +
               'export LD_LIBRARY_PATH="$_atb/latest/atb/cxx_abi_0/lib:${LD_LIBRARY_PATH}"\n')
    # image: Python packages
    _write(site / "paddle/__init__.py", f"__version__ = '{s.paddle}'\n")
    _dist(site, "paddlepaddle", s.paddle)
    _write(site / "numpy/__init__.py", f"__version__ = '{s.numpy}'\n")
    _dist(site, "numpy", s.numpy)
    _write(site / "paddlenlp/__init__.py", f"raise ImportError({s.paddlenlp_error!r})\n" if s.paddlenlp_error else
           "__version__ = '3.0.0b4'\n")
    if s.custom_npu:
        _dist(site, "paddle-custom-npu", s.custom_npu)
        _write(site / "paddle_custom_device/__init__.py", "")
        _write(site / "paddle_custom_device/npu/__init__.py",
               f"full_version  = '{s.custom_npu}'\ncann_version  = '{s.cann}'\n")
        if s.plugin_so:
            _write(site / "paddle_custom_device/libpaddle-custom-npu.so", "\n".join(PLUGIN_NEEDS) + "\n")
    if s.wheel_error:
        import zipfile

        (root / "wheels").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(root / "wheels/paddlenlp_ops-0.0.0-py3-none-any.whl", "w") as zf:
            zf.writestr("paddlenlp_ops/__init__.py", f"raise ImportError({s.wheel_error!r})\n")
    # commands
    _script(bindir / "ldd", LDD)
    _script(bindir / "df", "cat <<'EOF'\nFilesystem     1K-blocks  Used Available Use% Mounted on\n"
            f"shm            {s.shm_kb:>9}     0 {s.shm_kb:>9}   0% /dev/shm\nEOF\n")
    (root / "cache/models").mkdir(parents=True, exist_ok=True)
    return FakeAscend(root, s, site, bindir)


class _Hub(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        known = self.path.endswith("/models/community/meta-llama/Llama-2-13b/config.json")
        self.send_response(200 if known else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):  # noqa: N802 (the docker SDK's version probe, when this stands in for an engine)
        body = json.dumps({"Version": "26.1.4", "ApiVersion": "1.45", "MinAPIVersion": "1.24"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def fake_hub():
    """A PaddleNLP model hub (HEAD of meta-llama/Llama-2-13b's config.json answers 200) that is
    also enough of a Docker engine for ``docker.from_env().version()``: its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    """A URL nothing listens on (connection refused at once)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
