"""The Ascend failure modes that are visible before training starts, one small check each.

Every check returns a record ``{name, where, read, ok, verdict, skipped}``: ``where`` is ``host``
(the machine the containers run on) or ``image`` (inside the stage image, with the stages'
environment), ``read`` is what it looked at (a command's output, a file, a version string,
shortened), ``verdict`` one line, and when not ok: what to do. A check whose input another failed
check already explains is ``skipped`` ("needs ..."), so one cause is reported once.

Host (``llamapipe preflight`` on target npu):
  chip         lspci: Ascend 910B (d802); 910A (d801) has no bf16 and no 910B kernels
  devices      /dev/davinciN for the cards asked for, and the driver's control nodes
  driver       driver/version.info against the pairing table (npu.pairing): error 507033
  npu_smi      found (PATH, /usr/local/sbin, /usr/local/bin), runs (dcmi -8005/-8020), cards healthy
  cards_idle   no processes and HBM nearly unused on the cards asked for
  shm_host     host memory can back npu.shm_size
  model        npu.model_name_or_path: a complete local directory, the cache, or a reachable hub
Image (``llamapipe preflight-image``, rule preflight_image):
  toolkit      ascend_toolkit_install.info = the pairing's CANN, ascend-toolkit/latest points at it
  kernels      the chip's kernel directory, installed at the toolkit's version (opp_kernel)
  atb_env      ATB's set_env.sh (atb/ or nnal/atb/) exists, ATB_HOME_PATH set after sourcing
  pip_versions paddlepaddle and paddle-custom-npu = the pins (undefined symbols otherwise)
  plugin_ldd   ldd libpaddle-custom-npu.so after the stages' env scripts: nothing "not found"
  numpy        numpy < 2
  import_gate  python -c "import paddle, paddlenlp" (and paddlenlp_ops once built)
  shm          /dev/shm at least npu.shm_size

Everything read goes through :class:`Host` (a root prefix for files, the commands to run, the
environment), so tests point it at a fake tree. Runs on the host and inside the paddle-npu image:
stdlib only, Python 3.9 compatible.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Any

# lspci device ids of Huawei's Ascend 910 parts (PaddleCustomDevice backends/npu/README.md:
# `lspci | grep d801` is 910A, `lspci | grep d802` is 910B).
PCI_CHIPS = {"d801": "910A", "d802": "910B"}
CHIP_PCI = {"ascend910": "d801", "ascend910b": "d802"}  # npu.pairing.chip -> lspci device id
# npu-smi's places: the driver installs it into /usr/local/sbin; the guide mounts /usr/local/bin.
NPU_SMI_DIRS = ("/usr/local/sbin", "/usr/local/bin")
NPU_SMI_GUIDE_PATH = "/usr/local/bin/npu-smi"
# An idle 910B shows ~3.3 GB of 64 GB HBM used (firmware reserve), a 32 GB 910B4 ~2.8 GB: a
# card with more in use holds another job's memory.
HBM_IDLE_FRACTION = 0.15
HUB_ENDPOINT = "https://bj.bcebos.com/paddlenlp"  # paddlenlp.utils.download.bos_download.ENDPOINT
HUB_TIMEOUT = 5.0
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model", "sentencepiece.bpe.model", "tokenizer.json",
                   "vocab.json")
WEIGHT_PATTERNS = ("*.pdparams", "*.safetensors", "*.pdparams.index.json", "*.safetensors.index.json")
PLUGIN = "libpaddle-custom-npu.so"
READ_MAX = 240

Record = dict[str, Any]


def record(name: str, where: str, read: str, ok: bool, verdict: str, skipped: bool = False) -> Record:
    read = " ".join(str(read).split())
    return {"name": name, "where": where, "read": read if len(read) <= READ_MAX else read[:READ_MAX - 3] + "...",
            "ok": bool(ok), "verdict": verdict, "skipped": skipped}


def skip(name: str, where: str, why: str) -> Record:
    return record(name, where, "", True, f"skipped: {why}", skipped=True)


def failed(records: list[Record]) -> list[Record]:
    return [r for r in records if not r["ok"]]


class Host:
    """What the checks read: files under ``root``, the commands, the environment.

    ``npu_smi``: an explicit command, else found on PATH, in /usr/local/sbin or /usr/local/bin
    (under ``root``). ``site_dirs``: where Python packages are looked up (default: sys.path).
    ``python``: the interpreter the import checks start (default: this one)."""

    def __init__(self, root: str = "/", lspci: str = "lspci", npu_smi: str | None = None, ldd: str = "ldd",
                 df: str = "df", python: str | None = None, env: dict[str, str] | None = None,
                 site_dirs: list[str] | None = None, hub_endpoint: str | None = None,
                 timeout: float = 60.0) -> None:
        self.root = root or "/"
        self.lspci, self.npu_smi, self.ldd, self.df = lspci, npu_smi, ldd, df
        self.python = python or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.site_dirs = site_dirs if site_dirs is not None else [p for p in sys.path if p and os.path.isdir(p)]
        self.hub_endpoint = (hub_endpoint or self.env.get("PPNLP_ENDPOINT") or HUB_ENDPOINT).rstrip("/")
        self.timeout = timeout

    def path(self, p: str) -> str:
        return p if self.root == "/" else os.path.join(self.root, p.lstrip("/"))

    def read(self, p: str) -> str | None:
        try:
            with open(self.path(p), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[int | None, str]:
        """(exit code, stdout + stderr); exit code None when the command cannot start or hangs."""
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout,
                                  env=self.env if env is None else env)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, str(exc)
        return proc.returncode, (proc.stdout or "") + (proc.stderr or "")

    def find(self, name: str, dirs: tuple[str, ...] = ()) -> str | None:
        """The first executable ``name`` on PATH, then in ``dirs``: its path as the host sees it."""
        for d in [*self.env.get("PATH", "").split(os.pathsep), *dirs]:
            if d and os.access(self.path(os.path.join(d, name)), os.X_OK):
                return os.path.join(d, name)
        return None


def find_npu_smi(host: Host) -> str | None:
    """Where npu-smi is on this host: PATH, /usr/local/sbin (driver installs), /usr/local/bin (the guide)."""
    return host.find("npu-smi", NPU_SMI_DIRS)


def read_kv(text: str | None) -> dict[str, str]:
    """``key=value`` lines (version.info, *_install.info), keys lower-cased."""
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key.strip().lower(), value.strip().strip('"'))
    return out


def size_bytes(size: str) -> int:
    """Docker's size strings (``128g``, ``512m``, ``1024``): 1024-based units."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([bkmg]?)b?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"not a size: {size!r}")
    return int(float(m.group(1)) * 1024 ** "bkmg".index((m.group(2) or "b").lower()))


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def version_key(version: str) -> tuple:
    """Ascend versions: ``23.0.3`` < ``24.1.rc1`` < ``24.1.rc3`` < ``24.1.0`` < ``24.1.0.3``."""
    key = []
    for part in version.lower().split("."):
        m = re.fullmatch(r"(rc|t|b|alpha|beta)?(\d+)\w*", part)
        if not m:
            key.append((-2, 0))
        else:
            key.append((-1 if m.group(1) else 0, int(m.group(2))))
    return tuple(key)


def listed_version(version: str, listed: list[str]) -> str | None:
    """The entry of ``listed`` that ``version`` is (``24.1.0.3`` is a 24.1.0 patch)."""
    v = version.lower()
    for entry in listed:
        e = str(entry).lower()
        if v == e or v.startswith(e + "."):
            return str(entry)
    return None


# --- host ----------------------------------------------------------------------------------------


def parse_lspci(text: str) -> dict[str, int]:
    """Huawei Ascend 910 devices on the bus by device id (``Device d802`` or ``19e5:d802``)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = re.search(r"(?:Device |19e5:)(d80[0-9a-f])\b", line, re.I)
        if m:
            counts[m.group(1).lower()] = counts.get(m.group(1).lower(), 0) + 1
    return counts


def check_chip(host: Host, pairing: dict[str, Any], dtype: str) -> tuple[Record, dict[str, Any]]:
    want_chip = str(pairing.get("chip", "ascend910b"))
    want = CHIP_PCI.get(want_chip, "d802")
    rc, out = host.run([host.lspci])
    if rc is None:
        return record("chip", "host", out, False, f"cannot run {host.lspci}: install pciutils (lspci)"), {}
    pci = parse_lspci(out)
    facts = {"pci": pci, "chip": ",".join(sorted({PCI_CHIPS.get(d, d) for d in pci})) or None}
    read = ", ".join(f"{n} x {d}" for d, n in sorted(pci.items())) or "no Huawei d80x device"
    if not pci:
        return record("chip", "host", read, False, f"no Ascend 910 card on the PCI bus (`lspci | grep {want}` finds "
                      "none): is this the NPU host, are the cards seated and powered?"), facts
    other = sorted(d for d in pci if d != want)
    if other:
        names = ", ".join(f"{PCI_CHIPS.get(d, 'Ascend ' + d)} ({d})" for d in other)
        why = f"the pinned set is for {want_chip} ({want}; npu.pairing.chip), this host has {names}"
        if "d801" in other:
            why += ": 910A has no binary kernels of the 910B set"
            if dtype == "bfloat16":
                why += " and no bf16 (sft.dtype bfloat16)"
        return record("chip", "host", read, False, why + ": run on 910B cards (or a 910A set with float16)"), facts
    return record("chip", "host", read, True, f"{pci[want]} x Ascend {PCI_CHIPS.get(want, want)} ({want})"), facts


def check_devices(host: Host, dev_root: str, cards: list[int], control: tuple[str, ...]) -> tuple[Record, dict]:
    found = sorted(int(m.group(1)) for m in (re.fullmatch(r"davinci(\d+)", os.path.basename(p))
                                             for p in glob.glob(os.path.join(host.path(dev_root), "davinci*"))) if m)
    missing = [c for c in cards if c not in found]
    nodes = [n for n in control if not os.path.exists(os.path.join(host.path(dev_root), n))]
    facts = {"davinci_cards": found}
    read = f"{dev_root}/davinci{found}" + (f", missing {nodes}" if nodes else "")
    problems = []
    if missing:
        problems.append(f"cards {missing} requested (devices) but {dev_root}/davinci{{N}} missing; found {found}: "
                        "ask only for the cards this host has (npu.devices / --config devices=...)")
    if nodes:
        problems.append(f"{', '.join(f'{dev_root}/{n}' for n in nodes)} missing: is the Ascend driver installed "
                        "and loaded (lsmod | grep drv_davinci)?")
    if problems:
        return record("devices", "host", read, False, "; ".join(problems)), facts
    return record("devices", "host", read, True, f"{dev_root}/davinci{cards} and {', '.join(control)}"), facts


def check_driver(host: Host, ascend_root: str, pairing: dict[str, Any]) -> tuple[Record, dict]:
    path = f"{ascend_root}/driver/version.info"
    info = read_kv(host.read(path))
    version = info.get("version")
    facts = {"driver_version": version, "driver_innerversion": info.get("innerversion")}
    listed = [str(v) for v in pairing.get("drivers", [])]
    cann, minimum = pairing.get("cann", "?"), pairing.get("driver_min")
    if not version:
        return record("driver", "host", f"{path}: missing", False, f"no driver version at {path}: install the Ascend "
                      f"driver (CANN {cann} is paired with {', '.join(listed)}; npu.pairing.drivers)"), facts
    read = f"Version={version}" + (f" Innerversion={info['innerversion']}" if info.get("innerversion") else "")
    if minimum and version_key(version) < version_key(str(minimum)):
        return record("driver", "host", read, False,
                      f"driver {version} is older than {minimum}, the oldest paired with "
                      f"CANN {cann} (error 507033 at the first kernel launch): upgrade the driver and firmware to "
                      f"one of {', '.join(listed)}"), facts
    entry = listed_version(version, listed)
    if listed and not entry:
        return record("driver", "host", read, False, f"driver {version} is not in the pairing table for CANN {cann} "
                      f"({', '.join(listed)}; npu.pairing.drivers): install one of those, or validate this one and "
                      "add it with its source (docs/npu-pins.md)"), facts
    return record("driver", "host", read, True, f"driver {version} is paired with CANN {cann}"), facts


def parse_npu_smi(text: str) -> dict[str, Any]:
    """``npu-smi info``: the version, each NPU (name, health, HBM used/total MB), its processes."""
    out: dict[str, Any] = {"version": None, "cards": {}, "processes": [], "idle": []}
    m = re.search(r"npu-smi\s+(\S+)\s+Version:\s*(\S+)", text)
    if m:
        out["version"] = m.group(2)
    current, in_processes = None, False
    for line in text.splitlines():
        if "Process id" in line:
            in_processes = True
            continue
        if in_processes:
            m = re.match(r"\|\s*No running processes found in NPU (\d+)", line)
            if m:
                out["idle"].append(int(m.group(1)))
                continue
            m = re.match(r"\|\s*(\d+)\s+(\d+)\s*\|\s*(\d+)\s*\|\s*(.*?)\s*\|\s*(\d+)", line)
            if m:
                out["processes"].append({"npu": int(m.group(1)), "chip": int(m.group(2)), "pid": int(m.group(3)),
                                         "name": m.group(4), "memory_mb": int(m.group(5))})
            continue
        m = re.match(r"\|\s*(\d+)\s+(\S+)\s*\|\s*([A-Za-z][\w-]*)\s*\|", line)
        if m:
            current = int(m.group(1))
            out["cards"][current] = {"name": m.group(2), "health": m.group(3)}
            continue
        m = re.match(r"\|\s*\d+\s*\|\s*(\S+)\s*\|\s*\S+\s+\d+\s*/\s*\d+\s+(\d+)\s*/\s*(\d+)", line)
        if m and current is not None and "bus" not in out["cards"][current]:
            out["cards"][current].update(bus=m.group(1), hbm_used_mb=int(m.group(2)), hbm_total_mb=int(m.group(3)))
    return out


def check_npu_smi(host: Host, cards: list[int]) -> tuple[Record, dict[str, Any]]:
    found = host.npu_smi or find_npu_smi(host)
    facts: dict[str, Any] = {"npu_smi_path": found}
    if not found:
        dirs = "PATH, " + ", ".join(NPU_SMI_DIRS)
        return record("npu_smi", "host", f"not in {dirs}", False, f"npu-smi not found ({dirs}): install the Ascend "
                      "driver package (it installs npu-smi), or put its directory on PATH"), facts
    cmd = found if host.npu_smi else host.path(found)
    rc, out = host.run([cmd, "info"])
    dcmi = re.search(r"dcmi module initiali[sz]ed? failed.*|dcmi model initiali[sz]ed failed.*", out)
    if rc != 0 or dcmi:
        line = dcmi.group(0) if dcmi else (out.strip().splitlines() or ["no output"])[-1]
        return record("npu_smi", "host", f"{found} info: {line}", False, f"npu-smi info failed ({line}): -8005/-8020 "
                      "mean the cards are held by another process or container, or this user cannot open "
                      "/dev/davinci_manager (HwHiAiUser group, root): free the cards, "
                      "check the driver is loaded"), facts
    state = parse_npu_smi(out)
    facts["npu_smi"] = state
    listed = state["cards"]
    missing = [c for c in cards if c not in listed]
    sick = {c: listed[c]["health"] for c in cards if c in listed and listed[c]["health"].upper() != "OK"}
    read = f"{found}: npu-smi {state['version']}, NPU {sorted(listed)}"
    if missing or sick:
        why = []
        if missing:
            why.append(f"cards {missing} asked for (devices) are not listed by npu-smi (it shows {sorted(listed)})")
        if sick:
            why.append("health " + ", ".join(f"NPU {c} {h}" for c, h in sorted(sick.items())))
        return record("npu_smi", "host", read, False, "; ".join(why) + ": ask for healthy cards only, or reset "
                      "them (npu-smi set -t reset) and check the driver log"), facts
    where = "" if found == NPU_SMI_GUIDE_PATH else f" (the stage containers mount it from {found})"
    return record("npu_smi", "host", read, True, f"{len(cards)} cards listed, health OK{where}"), facts


def check_cards_idle(state: dict[str, Any] | None, cards: list[int]) -> Record:
    if state is None:
        return skip("cards_idle", "host", "needs npu_smi")
    busy = [p for p in state["processes"] if p["npu"] in cards]
    full = {c: state["cards"][c] for c in cards if c in state["cards"] and "hbm_total_mb" in state["cards"][c]
            and state["cards"][c]["hbm_used_mb"] > HBM_IDLE_FRACTION * state["cards"][c]["hbm_total_mb"]}
    read = ", ".join(f"NPU {c}: {state['cards'][c].get('hbm_used_mb', '?')}/"
                     f"{state['cards'][c].get('hbm_total_mb', '?')} MB"
                     for c in cards if c in state["cards"])
    if busy or full:
        why = []
        if busy:
            why.append("processes " + ", ".join(f"{p['pid']} ({p['name']}, {p['memory_mb']} MB) on NPU {p['npu']}"
                                                for p in busy))
        if full:
            why.append("HBM in use " + ", ".join(f"NPU {c} {v['hbm_used_mb']}/{v['hbm_total_mb']} MB"
                                                 for c, v in sorted(full.items())))
        return record("cards_idle", "host", read, False, "; ".join(why) + ": the cards are busy (a run on them fails "
                      "with -8005/-8020 or out of memory): stop those jobs or ask for other cards (devices)")
    return record("cards_idle", "host", read, True, f"no processes, HBM below {HBM_IDLE_FRACTION:.0%} on NPU {cards}")


def hbm_gib_per_card(state: dict[str, Any] | None, cards: list[int]) -> float | None:
    """The smallest HBM of the cards asked for, GiB (npu-smi's MB are MiB: 65536 = 64 GiB)."""
    totals = [state["cards"][c]["hbm_total_mb"] for c in cards
              if state and c in state["cards"] and "hbm_total_mb" in state["cards"][c]]
    return round(min(totals) / 1024, 1) if totals else None


def check_shm_host(host: Host, shm_size: str) -> tuple[Record, dict]:
    info = host.read("/proc/meminfo") or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", info, re.M)
    want = size_bytes(shm_size)
    if not m:
        return record("shm_host", "host", "/proc/meminfo: no MemTotal", False, "cannot read /proc/meminfo"), {}
    total = int(m.group(1)) * 1024
    facts = {"memory_gib": round(total / 2**30, 1), "shm_size": shm_size}
    read = f"MemTotal {gib(total)}"
    if total < want:
        return record("shm_host", "host", read, False, f"npu.shm_size {shm_size} ({gib(want)}) is more than this "
                      f"host's memory ({gib(total)}): the container's /dev/shm cannot be backed; lower "
                      "npu.shm_size"), facts
    return record("shm_host", "host", read, True, f"{gib(total)} of memory backs the {shm_size} /dev/shm"), facts


def _model_files(path: str) -> list[str]:
    missing = []
    if not os.path.isfile(os.path.join(path, "config.json")):
        missing.append("config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        missing.append("tokenizer files (" + " or ".join(TOKENIZER_FILES[:3]) + ")")
    if not any(glob.glob(os.path.join(path, p)) for p in WEIGHT_PATTERNS):
        missing.append("weights (*.pdparams / *.safetensors)")
    return missing


def _unreadable(path: str) -> list[str]:
    """Files and directories under ``path`` this process cannot read: the stage containers run
    as the same uid:gid, so they could not either."""
    bad = []
    for root, dirs, files in os.walk(path):
        bad += [os.path.join(root, d) for d in dirs if not os.access(os.path.join(root, d), os.R_OK | os.X_OK)]
        bad += [os.path.join(root, f) for f in files if not os.access(os.path.join(root, f), os.R_OK)]
    return bad


def hub_head(url: str, timeout: float) -> tuple[int | None, str]:
    """HTTP status of a HEAD request (None: no answer, with the reason)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:
            return resp.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, str(exc)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", exc))


def check_model(host: Host, name: str, cache_dir: str | None = None, built: bool = False) -> Record:
    """npu.model_name_or_path: a complete local directory, a cached hub model, or a hub the host reaches."""
    if built:
        return record("model", "host", name, True, "built by init_model (no download)")
    local = host.path(name) if os.path.isabs(name) else os.path.abspath(name)
    if os.path.isdir(local):
        missing = _model_files(local)
        if missing:
            return record("model", "host", local, False, f"local model {name} lacks {', '.join(missing)}: copy the "
                          "whole model directory (config.json, tokenizer files, weights)")
        unreadable = _unreadable(local)
        if unreadable or not os.access(local, os.R_OK | os.X_OK):
            more = f" (+{len(unreadable) - 3} more)" if len(unreadable) > 3 else ""
            shown = ", ".join(unreadable[:3] or [local]) + more
            return record("model", "host", local, False, f"local model {name}: {shown} not readable by uid "
                          f"{os.getuid()}, which the stage containers run as: chmod -R a+rX (or chown) it")
        return record("model", "host", local, True, f"local directory {name}: config, tokenizer and weights present")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", name):
        return record("model", "host", name, False, f"npu.model_name_or_path {name} is neither a directory here nor "
                      "a hub id (org/name): fix the path")
    cached = os.path.join(cache_dir, name) if cache_dir else None
    if cached and os.path.isdir(cached) and not _model_files(cached):
        return record("model", "host", cached, True, f"{name} cached in {cache_dir} (used without the hub)")
    url = f"{host.hub_endpoint}/models/community/{name}/config.json"
    status, why = hub_head(url, HUB_TIMEOUT)
    read = f"HEAD {url}: {status if status is not None else why}"
    if status is None:
        return record("model", "host", read, False, f"{name} is a hub id and this host cannot reach "
                      f"{host.hub_endpoint} ({why}): download it where the hub is reachable and set "
                      "npu.model_name_or_path to that directory (config.json, tokenizer files, weights)")
    if status >= 400:
        return record("model", "host", read, False, f"the hub answers {status} for {name}: check "
                      "npu.model_name_or_path (PaddleNLP's name), or point it at a local directory")
    return record("model", "host", read, True, f"{name} on the hub ({host.hub_endpoint}), reachable")


def host_checks(host: Host, p: dict[str, Any]) -> tuple[list[Record], dict[str, Any]]:
    """The host's checks for the npu target. ``p``: cards, dev_root, ascend_root, control_devices,
    pairing, shm_size, sft_dtype, model_name_or_path, model_cache, model_built."""
    cards, pairing = [int(c) for c in p["cards"]], p.get("pairing") or {}
    records, facts = [], {}
    for rec, found in (check_chip(host, pairing, p.get("sft_dtype", "")),
                       check_devices(host, p["dev_root"], cards, tuple(p["control_devices"])),
                       check_driver(host, p["ascend_root"], pairing)):
        records.append(rec)
        facts.update(found)
    smi, found = check_npu_smi(host, cards)
    records.append(smi)
    facts.update(found)
    state = found.get("npu_smi")  # None when npu-smi did not run (an unhealthy card still shows its use)
    records.append(check_cards_idle(state, cards))
    facts["hbm_gib_per_card"] = hbm_gib_per_card(state, cards)
    shm, found = check_shm_host(host, p["shm_size"])
    records.append(shm)
    facts["shm"] = found
    records.append(check_model(host, p["model_name_or_path"], p.get("model_cache"), bool(p.get("model_built"))))
    driver = next(r for r in records if r["name"] == "driver")
    facts["pairing"] = {**pairing, "driver_ok": driver["ok"], "verdict": driver["verdict"]}
    return records, facts


# --- image ---------------------------------------------------------------------------------------


def sourced_env(host: Host, scripts: list[str]) -> tuple[dict[str, str] | None, str]:
    """The environment after ``source``-ing ``scripts`` in order, as the stage scripts do."""
    code = 'for s in "$@"; do source "$s" || exit 3; done; env -0'
    rc, out = host.run(["bash", "-c", code, "bash", *scripts])
    if rc != 0:
        return None, out.strip()[-300:]
    env = {}
    for item in out.split("\0"):
        key, sep, value = item.partition("=")
        if sep and key and "\n" not in key:
            env[key] = value
    return env, ""


def toolkit_info(host: Host, ascend_root: str) -> tuple[str | None, dict[str, str]]:
    """(the install info's path, its keys) of ascend-toolkit/latest (the path varies by arch)."""
    for pattern in ("ascend-toolkit/latest/*/ascend_toolkit_install.info",
                    "ascend-toolkit/latest/ascend_toolkit_install.info"):
        for path in sorted(glob.glob(os.path.join(host.path(ascend_root), pattern))):
            info = read_kv(_read_file(path))
            if info.get("version"):
                return path, info
    return None, {}


def check_toolkit(host: Host, ascend_root: str, cann: str) -> tuple[Record, dict[str, Any]]:
    base = os.path.join(host.path(ascend_root), "ascend-toolkit")
    set_env = os.path.isfile(os.path.join(base, "set_env.sh"))
    path, info = toolkit_info(host, ascend_root)
    facts: dict[str, Any] = {"cann_version": info.get("version"), "cann_set_env": set_env}
    if not path:
        return record("toolkit", "image", f"{ascend_root}/ascend-toolkit/latest: no ascend_toolkit_install.info", False,
                      f"no CANN toolkit in the image under {ascend_root}/ascend-toolkit: use the pinned base image "
                      f"(npu.image.base, CANN {cann})"), facts
    version = info["version"]
    target = os.path.relpath(os.path.realpath(os.path.dirname(path)), os.path.realpath(base)).split(os.sep)[0]
    facts["toolkit_latest"] = target
    read = f"version={version} latest -> {target}"
    problems = []
    if version != cann:
        problems.append(f"the image's CANN toolkit is {version}, the pairing table pins {cann} (npu.pairing.cann): "
                        "paddle-custom-npu built for one fails on the other (undefined symbol); use the base image "
                        "of the pinned set (npu.image.base)")
    if target != version:
        problems.append(f"ascend-toolkit/latest points at {target}, not {version}: "
                        f"relink it (ln -sfn {version} latest)")
    if not set_env:
        problems.append(f"{ascend_root}/ascend-toolkit/set_env.sh missing: the stage scripts source it")
    if problems:
        return record("toolkit", "image", read, False, "; ".join(problems)), facts
    return record("toolkit", "image", read, True, f"CANN {version}, latest -> {target}, set_env.sh present"), facts


def check_kernels(host: Host, ascend_root: str, chip: str, toolkit: str | None) -> Record:
    if not toolkit:
        return skip("kernels", "image", "needs toolkit")
    latest = os.path.join(host.path(ascend_root), "ascend-toolkit", "latest")
    kernel_dir = os.path.join(latest, "opp", "built-in", "op_impl", "ai_core", "tbe", "kernel", chip)
    info = read_kv(_read_file(os.path.join(latest, "opp_kernel", "version.info")))
    installed = info.get("version_dir") or info.get("version")
    rel = f"opp/built-in/op_impl/ai_core/tbe/kernel/{chip}"
    read = f"{rel}: {'present' if os.path.isdir(kernel_dir) else 'missing'}; opp_kernel version_dir={installed}"
    if not os.path.isdir(kernel_dir):
        return record("kernels", "image", read, False,
                      f"no {rel} under ascend-toolkit/latest: the CANN kernels package "
                      f"for {chip} is not installed ('Op Cast does not has any binary', EZ9999): install "
                      f"Ascend-cann-kernels-{chip.replace('ascend', '')}_{toolkit} or use the pinned base image")
    if installed != toolkit:
        return record("kernels", "image", read, False, f"the kernels package is {installed or 'of unknown version'} "
                      f"(opp_kernel/version.info), the toolkit {toolkit}: install the kernels of CANN {toolkit}")
    return record("kernels", "image", read, True, f"{chip} kernels of CANN {toolkit}")


def _read_file(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def check_atb(host: Host, ascend_root: str, env_scripts: list[str], atb_scripts: list[str]
              ) -> tuple[Record, dict[str, str] | None]:
    found = [s for s in atb_scripts if os.path.isfile(host.path(f"{ascend_root}/{s}"))]
    if not found:
        return record("atb_env", "image", f"none of {', '.join(atb_scripts)} under {ascend_root}", False,
                      f"no ATB set_env.sh under {ascend_root} (atb/ or nnal/atb/): install the NNAL/ATB package of "
                      "the pinned CANN (libpaddle-custom-npu.so needs libatb.so)"), None
    cann = [host.path(f"{ascend_root}/{s}") for s in env_scripts if os.path.isfile(host.path(f"{ascend_root}/{s}"))]
    env, err = sourced_env(host, [*cann, host.path(f"{ascend_root}/{found[0]}")])
    if env is None:
        return record("atb_env", "image", f"source {found[0]}: {err}", False,
                      f"sourcing {ascend_root}/{found[0]} failed: {err or 'non-zero exit'}"), None
    home = env.get("ATB_HOME_PATH")
    read = f"{found[0]}; ATB_HOME_PATH={home}"
    if not home or not os.path.isdir(home):
        return record("atb_env", "image", read, False,
                      f"ATB_HOME_PATH is {'not set' if not home else home + ' (missing)'} "
                      f"after sourcing {ascend_root}/{found[0]}: reinstall NNAL/ATB for this CANN"), env
    return record("atb_env", "image", read, True, f"{found[0]} sets ATB_HOME_PATH"), env


def distributions(site_dirs: list[str]) -> dict[str, str]:
    """name -> version of the installed distributions, first on the path wins (as imports do)."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in metadata.distributions(path=list(site_dirs)):
        name = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "")).lower()
        if name and name not in out:
            out[name] = dist.version
    return out


def find_plugin(site_dirs: list[str]) -> str | None:
    for d in site_dirs:
        hits = sorted(glob.glob(os.path.join(d, "paddle_custom_device", "**", PLUGIN), recursive=True))
        if hits:
            return hits[0]
    return None


def check_pip(host: Host, pairing: dict[str, Any], ascend: bool) -> tuple[Record, dict[str, Any]]:
    dists = distributions(host.site_dirs)
    wanted = {"paddlepaddle": str(pairing.get("paddle_version"))}
    if ascend:
        wanted["paddle-custom-npu"] = str(pairing.get("paddle_custom_npu_version"))
    have = {k: dists.get(k) for k in wanted}
    facts = {"versions": have}
    plugin = find_plugin(host.site_dirs)
    built_for = None
    if plugin:
        m = re.search(r"cann_version\s*=\s*['\"]([^'\"]+)", _read_file(os.path.join(os.path.dirname(plugin), "npu",
                                                                                    "__init__.py")) or "")
        built_for = m.group(1) if m else None
        facts["plugin_cann_version"] = built_for
    read = ", ".join(f"{k}=={v}" for k, v in have.items()) + (f" (built for CANN {built_for})" if built_for else "")
    wrong = {k: v for k, v in have.items() if v != wanted[k]}
    if wrong:
        fix = " ".join(f"{k}=={wanted[k]}" for k in wrong)
        what = ", ".join(f"{k} {v or 'not installed'} (pinned {wanted[k]})" for k, v in wrong.items())
        return record("pip_versions", "image", read, False, f"{what}: the framework, its NPU plugin and CANN are one "
                      f"set (undefined symbol otherwise): rebuild the image (build_image) or pip install {fix}"), facts
    note = "" if ascend else "; paddle-custom-npu not checked: rehearsal (npu.ascend_env: false)"
    return record("pip_versions", "image", read, True, " and ".join(f"{k} {v}" for k, v in have.items()) + " as pinned"
                  + note), facts


def check_plugin_ldd(host: Host, env: dict[str, str] | None) -> Record:
    plugin = find_plugin(host.site_dirs)
    if not plugin:
        return record("plugin_ldd", "image", f"no {PLUGIN} under paddle_custom_device", False,
                      f"paddle-custom-npu is installed but holds no {PLUGIN}: reinstall it")
    rc, out = host.run([host.ldd, plugin], env=env)
    if rc is None:
        return record("plugin_ldd", "image", out, False, f"cannot run {host.ldd}: install libc-bin")
    missing = re.findall(r"^\s*(\S+)\s+=>\s+not found", out, re.M)
    if missing:
        why = ("libatb.so: ATB/NNAL is not installed for this CANN, or its set_env.sh is not sourced"
               if any(m.startswith("libatb") for m in missing) else
               "the CANN toolkit's libraries are not on LD_LIBRARY_PATH (set_env.sh) or of another CANN")
        return record("plugin_ldd", "image", "not found: " + ", ".join(missing), False,
                      f"{PLUGIN} cannot load ({why}): install the missing libraries of the pinned CANN")
    return record("plugin_ldd", "image", f"ldd {PLUGIN}: all resolved", True,
                  f"every library of {PLUGIN} resolves after the stages' set_env.sh scripts")


def check_numpy(host: Host, env: dict[str, str] | None) -> Record:
    rc, out = host.run([host.python, "-c", "import numpy; print(numpy.__version__)"], env=env)
    version = out.strip().splitlines()[-1] if rc == 0 and out.strip() else None
    if not version:
        return record("numpy", "image", out.strip()[-200:], False, "numpy does not import: reinstall numpy<2")
    if version_key(version) >= version_key("2"):
        return record("numpy", "image", f"numpy {version}", False, f"numpy {version}: the pinned stack runs on "
                      "numpy 1.x (the cpu target pins 1.26.4, envs/constraints.txt): pip install 'numpy<2'")
    return record("numpy", "image", f"numpy {version}", True, f"numpy {version} (< 2)")


def check_imports(host: Host, env: dict[str, str] | None, inference_model: bool, wheels: str | None) -> Record:
    env = dict(host.env if env is None else env)
    modules = ["paddle", "paddlenlp"]
    wheel = sorted(glob.glob(os.path.join(wheels, "paddlenlp_ops-*.whl"))) if wheels and inference_model else []
    tmp = None
    try:
        if wheel:  # a pure-Python wheel: importable from its extracted files
            tmp = tempfile.mkdtemp(prefix="paddlenlp_ops-")
            with zipfile.ZipFile(wheel[-1]) as zf:
                zf.extractall(tmp)
            env["PYTHONPATH"] = tmp + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            modules.append("paddlenlp_ops")
        code = f"import {', '.join(modules)}"
        rc, out = host.run([host.python, "-c", code], env=env)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    ops = "" if wheel else ("; paddlenlp_ops not built yet (export/predict gate its import)" if inference_model else "")
    if rc != 0:
        last = (out.strip().splitlines() or ["no output"])[-1]
        hint = (": aistudio-sdk drifted past PaddleNLP 3.0.0b4 (pip install 'aistudio-sdk<0.2', as "
                "envs/requirements.txt pins it)" if "aistudio" in out else
                ": reinstall the pinned stack (rebuild the image)")
        return record("import_gate", "image", f"python -c '{code}': {last}", False, f"{last}{hint}")
    return record("import_gate", "image", f"python -c '{code}': ok", True, f"{', '.join(modules)} import{ops}")


def check_shm(host: Host, shm_size: str) -> Record:
    rc, out = host.run([host.df, "-k", host.path("/dev/shm")])
    lines = [ln.split() for ln in out.strip().splitlines()]
    size = (int(lines[-1][1]) * 1024
            if rc == 0 and len(lines) >= 2 and len(lines[-1]) > 1 and lines[-1][1].isdigit() else None)
    want = size_bytes(shm_size)
    if size is None:
        return record("shm", "image", out.strip()[-200:], False, "cannot read the size of /dev/shm (df -k /dev/shm)")
    if size < 0.99 * want:
        return record("shm", "image", f"/dev/shm {gib(size)}", False, f"/dev/shm is {gib(size)}, npu.shm_size asks "
                      f"{shm_size}: the container did not get --shm-size (DataLoader workers and HCCL fail): check "
                      "the container runtime honours shm_size")
    return record("shm", "image", f"/dev/shm {gib(size)}", True, f"/dev/shm {gib(size)} >= {shm_size}")


def image_checks(host: Host, p: dict[str, Any]) -> tuple[list[Record], dict[str, Any]]:
    """Inside the stage image. ``p``: ascend_root, env_scripts, atb_scripts, ascend_env, device,
    pairing, shm_size, inference_model, wheels. Without ``ascend_env`` (the rehearsal) the checks
    that need CANN are skipped, saying so; on ``device: cpu`` so is /dev/shm."""
    pairing, root = p.get("pairing") or {}, p["ascend_root"]
    rehearsal = "rehearsal (npu.ascend_env: false): no CANN/ATB on CPU"
    records, facts = [], {}
    env = None
    if p.get("ascend_env", True):
        tk, found = check_toolkit(host, root, str(pairing.get("cann")))
        facts.update(found)
        records.append(tk)
        records.append(check_kernels(host, root, str(pairing.get("chip", "ascend910b")), found.get("cann_version")))
        atb, env = check_atb(host, root, list(p["env_scripts"]), list(p["atb_scripts"]))
        records.append(atb)
    else:
        records += [skip(n, "image", rehearsal) for n in ("toolkit", "kernels", "atb_env")]
    pip, found = check_pip(host, pairing, bool(p.get("ascend_env", True)))
    facts.update(found)
    records.append(pip)
    if not p.get("ascend_env", True):
        records.append(skip("plugin_ldd", "image", rehearsal))
    elif not records[2]["ok"]:
        records.append(skip("plugin_ldd", "image", "needs atb_env"))
    elif not records[0]["ok"]:  # its libraries come from the toolkit set_env.sh points at
        records.append(skip("plugin_ldd", "image", "needs toolkit"))
    elif not found["versions"].get("paddle-custom-npu"):
        records.append(skip("plugin_ldd", "image", "needs paddle-custom-npu (pip_versions)"))
    else:
        records.append(check_plugin_ldd(host, env))
    records.append(check_numpy(host, env))
    records.append(check_imports(host, env, bool(p.get("inference_model")), p.get("wheels")))
    if p.get("device", "npu") == "npu":
        records.append(check_shm(host, p["shm_size"]))
    else:
        records.append(skip("shm", "image", "rehearsal (npu.device: cpu): one CPU process, no shared-memory "
                            "collectives"))
    return records, facts


# --- the report ----------------------------------------------------------------------------------


def format_table(records: list[Record]) -> str:
    """One line per check: name, where, ok/FAIL/skip, verdict."""
    width = max([len(r["name"]) for r in records] + [5])
    lines = [f"{'check':<{width}}  where  result  verdict"]
    for r in records:
        result = "skip" if r.get("skipped") else ("ok" if r["ok"] else "FAIL")
        lines.append(f"{r['name']:<{width}}  {r['where']:<5}  {result:<6}  {r['verdict']}")
    return "\n".join(lines)
