"""The Ascend preflight checks on a fake host (tests/fake_ascend.py): no NPU, no CANN, no engine.

A healthy fake host and image pass every check; each failure injected alone is named by exactly
one check, whose verdict says what to do; the CLI writes preflight.json and prints the table.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fake_ascend import PAIRING, Spec, build, closed_port_url, fake_hub, npu_smi_info
from llamapipe.core.errors import PipelineError
from llamapipe.npu import ascend_checks as ac

ROOT = Path(__file__).resolve().parents[1]
DCMI_8005 = "DrvMngGetConsoleLogLevel failed. (g_conLogLevel=3)\ndcmi module initialize failed. ret is -8005"


@pytest.fixture(scope="module")
def hub():
    with fake_hub() as url:
        yield url


def host_run(tmp_path, hub, params=None, host=None, **changes):
    fake = build(tmp_path / "host", **changes)
    return ac.host_checks(fake.host(hub_endpoint=hub, **(host or {})), fake.host_params(**(params or {})))


def image_run(tmp_path, params=None, **changes):
    fake = build(tmp_path / "image", **changes)
    return ac.image_checks(fake.host(), fake.image_params(**(params or {})))


def names(records, ok=False):
    return [r["name"] for r in records if r["ok"] is ok]


# --- healthy ---------------------------------------------------------------------------------------


def test_healthy_fake_host_passes_every_host_check(tmp_path, hub):
    records, facts = host_run(tmp_path, hub)
    assert names(records) == [] and not any(r["skipped"] for r in records)
    assert names(records, ok=True) == ["chip", "devices", "driver", "npu_smi", "cards_idle", "shm_host", "model"]
    assert facts["chip"] == "910B" and facts["pci"] == {"d802": 8} and facts["driver_version"] == "24.1.0"
    assert facts["hbm_gib_per_card"] == 64.0
    assert facts["npu_smi_path"] == "/usr/local/sbin/npu-smi"  # where driver installs put it
    assert facts["npu_smi"]["version"] == "24.1.0" and sorted(facts["npu_smi"]["idle"]) == list(range(8))
    assert facts["pairing"]["driver_ok"] and facts["pairing"]["cann"] == "8.0.0"


def test_healthy_fake_image_passes_every_image_check(tmp_path):
    records, facts = image_run(tmp_path)
    assert names(records) == [] and not any(r["skipped"] for r in records)
    assert names(records, ok=True) == ["toolkit", "kernels", "atb_env", "pip_versions", "plugin_ldd", "numpy",
                                       "import_gate", "shm"]
    assert facts["cann_version"] == "8.0.0" and facts["toolkit_latest"] == "8.0.0"
    assert facts["versions"] == {"paddlepaddle": "3.0.0", "paddle-custom-npu": "3.0.0"}


def test_the_fake_pairing_is_config_yamls():
    assert yaml.safe_load((ROOT / "config.yaml").read_text())["npu"]["pairing"] == PAIRING


# --- one injected failure, one failing check ----------------------------------------------------------

HOST_FAILURES = {
    # id: (changes to the fake host, changes to the params, failing check, words of its verdict)
    "no-ascend-card": ({"pci": ""}, {}, "chip", "no Ascend 910 card on the PCI bus"),
    "910a-with-bf16": ({"pci": "d801"}, {}, "chip", "no bf16"),
    "no-lspci": ({"lspci": False}, {}, "chip", "install pciutils"),
    "card-node-missing": ({"missing_nodes": ("davinci3",)}, {}, "devices", "cards [3] requested"),
    "control-node-missing": ({"missing_nodes": ("devmm_svm",)}, {}, "devices", "/dev/devmm_svm missing"),
    "driver-missing": ({"driver": None}, {}, "driver", "install the Ascend driver"),
    "driver-too-old": ({"driver": "23.0.1"}, {}, "driver", "older than 23.0.3"),
    "driver-not-paired": ({"driver": "25.2.0"}, {}, "driver", "not in the pairing table"),
    "npu-smi-nowhere": ({"npu_smi_dir": None}, {}, "npu_smi", "npu-smi not found"),
    "npu-smi-dcmi-8005": ({"npu_smi_error": DCMI_8005}, {}, "npu_smi", "ret is -8005"),
    "card-unhealthy": ({"health": {2: "Alarm"}}, {}, "npu_smi", "NPU 2 Alarm"),
    "card-busy": ({"processes": [(5, 2865645, "VLLMEngineCor", 56131)], "hbm_used_mb": {5: 59499}}, {},
                  "cards_idle", "2865645 (VLLMEngineCor"),
    "hbm-held-elsewhere": ({"hbm_used_mb": {1: 59351}}, {}, "cards_idle", "NPU 1 59351/65536"),
    "host-memory-below-shm": ({"mem_total_kb": 64 * 2**20}, {}, "shm_host", "lower npu.shm_size"),
    "hub-unreachable": ({}, {"hub": "closed"}, "model", "cannot reach"),
    "hub-lacks-model": ({}, {"model_name_or_path": "meta-llama/Llama-9-13b"}, "model", "answers 404"),
    "local-model-incomplete": ({}, {"model_name_or_path": "local-model"}, "model", "lacks weights"),
}


@pytest.mark.parametrize("changes, over, check, words", HOST_FAILURES.values(), ids=HOST_FAILURES.keys())
def test_each_host_failure_is_named_by_one_check(tmp_path, hub, changes, over, check, words):
    over = dict(over)
    if over.get("model_name_or_path") == "local-model":  # a local copy without weights, in the host's tree
        model = tmp_path / "host/models/llama-2-13b"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        (model / "tokenizer_config.json").write_text("{}")
        over["model_name_or_path"] = "/models/llama-2-13b"
    endpoint = closed_port_url() if over.pop("hub", None) == "closed" else hub
    records, _ = host_run(tmp_path, endpoint, params=over, **changes)
    bad = [r for r in records if not r["ok"]]
    assert [r["name"] for r in bad] == [check], ac.format_table(records)
    assert words in bad[0]["verdict"], bad[0]["verdict"]
    assert ":" in bad[0]["verdict"]  # "what is wrong: what to do"


IMAGE_FAILURES = {
    "atb-not-installed": ({"atb_dir": None}, {}, "atb_env", "no ATB set_env.sh"),
    "atb-home-unset": ({"atb_home": False}, {}, "atb_env", "ATB_HOME_PATH is not set"),
    "libatb-missing": ({"libatb": False}, {}, "plugin_ldd", "libatb.so"),
    "atb-under-old-dir": ({"atb_dir": "atb"}, {"atb_scripts": ["nnal/atb/set_env.sh"]}, "atb_env", "no ATB"),
    "image-of-another-cann": ({"cann": "8.0.RC1"}, {}, "toolkit", "the pairing table pins 8.0.0"),
    "latest-points-at-another": ({"latest": "8.0.RC1"}, {}, "toolkit", "the image's CANN toolkit is 8.0.RC1"),
    "cann-set-env-missing": ({"cann_set_env": False}, {}, "toolkit", "set_env.sh missing"),
    "kernels-not-installed": ({"kernels_chip": None}, {}, "kernels", "Ascend-cann-kernels-910b_8.0.0"),
    "kernels-of-another-chip": ({"kernels_chip": "ascend910"}, {}, "kernels", "no opp/built-in"),
    "kernels-of-another-cann": ({"kernels_version": "8.0.RC1"}, {}, "kernels", "install the kernels of CANN 8.0.0"),
    "paddle-not-pinned": ({"paddle": "3.0.0rc1"}, {}, "pip_versions", "paddlepaddle 3.0.0rc1 (pinned 3.0.0)"),
    "plugin-not-pinned": ({"custom_npu": "3.0.0b2"}, {}, "pip_versions", "paddle-custom-npu 3.0.0b2"),
    "plugin-not-installed": ({"custom_npu": None}, {}, "pip_versions", "not installed"),
    "plugin-without-so": ({"plugin_so": False}, {}, "plugin_ldd", "holds no libpaddle-custom-npu.so"),
    "numpy-2": ({"numpy": "2.0.2"}, {}, "numpy", "numpy<2"),
    "aistudio-drift": ({"paddlenlp_error": "cannot import name 'download' from 'aistudio_sdk.hub'"}, {},
                       "import_gate", "aistudio"),
    "ops-wheel-broken": ({"wheel_error": "No module named 'paddle_custom_device.npu.ops'"}, {}, "import_gate",
                         "paddle_custom_device.npu.ops"),
    "shm-default-64m": ({"shm_kb": 65536}, {}, "shm", "did not get --shm-size"),
}


@pytest.mark.parametrize("changes, over, check, words", IMAGE_FAILURES.values(), ids=IMAGE_FAILURES.keys())
def test_each_image_failure_is_named_by_one_check(tmp_path, changes, over, check, words):
    records, _ = image_run(tmp_path, params=over, **changes)
    bad = [r for r in records if not r["ok"]]
    assert [r["name"] for r in bad] == [check], ac.format_table(records)
    assert words in bad[0]["verdict"], bad[0]["verdict"]


def test_a_check_explained_by_another_is_skipped_not_failed(tmp_path, hub):
    records, facts = host_run(tmp_path, hub, npu_smi_dir=None)
    assert {r["name"]: r["verdict"] for r in records if r["skipped"]} == {"cards_idle": "skipped: needs npu_smi"}
    assert facts["hbm_gib_per_card"] is None
    records, _ = image_run(tmp_path, atb_dir=None)
    assert {r["name"]: r["verdict"] for r in records if r["skipped"]} == {"plugin_ldd": "skipped: needs atb_env"}


def test_the_rehearsal_runs_what_it_can_and_says_what_it_skips(tmp_path):
    """npu.ascend_env false and npu.device cpu (the rehearsal's list): no CANN tree at all."""
    fake = build(tmp_path / "image", cann_set_env=False, atb_dir=None, kernels_chip=None, custom_npu=None)
    records, facts = ac.image_checks(fake.host(), fake.image_params(ascend_env=False, device="cpu",
                                                                    inference_model=False))
    assert names(records) == []
    skipped = {r["name"]: r["verdict"] for r in records if r["skipped"]}
    assert set(skipped) == {"toolkit", "kernels", "atb_env", "plugin_ldd", "shm"}
    assert all(v.startswith("skipped: rehearsal") for v in skipped.values())
    ran = {r["name"]: r["verdict"] for r in records if not r["skipped"]}
    assert set(ran) == {"pip_versions", "numpy", "import_gate"}
    assert "paddle-custom-npu not checked: rehearsal" in ran["pip_versions"]
    assert facts["versions"] == {"paddlepaddle": "3.0.0"}


# --- what the checks read ---------------------------------------------------------------------------


def test_npu_smi_table_is_parsed_as_printed():
    """The busy host of vllm-project/vllm-ascend#5144, verbatim: NPU 5 runs a process, 7 is idle."""
    text = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.0.3                 Version: 24.1.0.3                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 5     910B1               | OK            | 97.0        49                0    / 0             |
| 0                         | 0000:41:00.0  | 0           0    / 0          59499/ 65536         |
+===========================+===============+====================================================+
| 7     910B1               | OK            | 94.4        50                0    / 0             |
| 0                         | 0000:42:00.0  | 0           0    / 0          3422 / 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 5       0                 | 2865645       | VLLMEngineCor            | 56131                   |
+===========================+===============+====================================================+
| No running processes found in NPU 7                                                            |
+===========================+===============+====================================================+
"""
    state = ac.parse_npu_smi(text)
    assert state["version"] == "24.1.0.3"
    assert state["cards"][5] == {"name": "910B1", "health": "OK", "bus": "0000:41:00.0", "hbm_used_mb": 59499,
                                 "hbm_total_mb": 65536}
    assert state["processes"] == [{"npu": 5, "chip": 0, "pid": 2865645, "name": "VLLMEngineCor", "memory_mb": 56131}]
    assert state["idle"] == [7]
    assert ac.check_cards_idle(state, [7])["ok"] and not ac.check_cards_idle(state, [5, 7])["ok"]
    assert ac.hbm_gib_per_card(state, [5, 7]) == 64.0


def test_the_fake_npu_smi_prints_the_real_layout():
    lines = npu_smi_info(Spec()).splitlines()
    assert {len(line) for line in lines} == {98}  # npu-smi 24.1.0's width (vllm-ascend#336)


def test_32gb_cards_are_measured(tmp_path, hub):
    _, facts = host_run(tmp_path, hub, card_name="910B4", hbm_total_mb=32768, hbm_used_mb=dict.fromkeys(range(8), 2828))
    assert facts["hbm_gib_per_card"] == 32.0


@pytest.mark.parametrize("version, listed", [("24.1.0", "24.1.0"), ("24.1.0.3", "24.1.0"), ("24.1.RC3", "24.1.rc3"),
                                             ("24.1.rc3.b999", "24.1.rc3"), ("24.1.1", None), ("23.0.30", None)])
def test_driver_versions_match_the_table(version, listed):
    assert ac.listed_version(version, PAIRING["drivers"]) == listed


def test_driver_version_order():
    order = ["23.0.1", "23.0.3", "24.1.rc1", "24.1.rc3", "24.1.0", "24.1.0.3", "25.0.rc1"]
    assert sorted(order, key=ac.version_key) == order


def test_npu_smi_is_looked_for_on_path_then_sbin_then_bin(tmp_path):
    fake = build(tmp_path / "h", npu_smi_dir="/usr/local/bin")
    assert ac.find_npu_smi(fake.host()) == "/usr/local/bin/npu-smi"
    (tmp_path / "h/usr/local/sbin").mkdir(parents=True)
    os.replace(tmp_path / "h/usr/local/bin/npu-smi", tmp_path / "h/usr/local/sbin/npu-smi")
    assert ac.find_npu_smi(fake.host()) == "/usr/local/sbin/npu-smi"
    assert ac.find_npu_smi(ac.Host(root=str(tmp_path / "h"), env={"PATH": "/opt/ascend/bin"})) == \
        "/usr/local/sbin/npu-smi"


def test_containers_mount_npu_smi_from_where_the_host_has_it(tmp_path, monkeypatch):
    from llamapipe.config import resolve
    from llamapipe.runners import commands
    from test_npu_target import _cfg

    sbin = tmp_path / "sbin"
    sbin.mkdir()
    (sbin / "npu-smi").write_text("#!/bin/sh\n")
    (sbin / "npu-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{sbin}:{os.environ['PATH']}")
    spec = commands.container_spec("sft", resolve(_cfg()), str(tmp_path))
    assert {"source": str(sbin / "npu-smi"), "target": "/usr/local/bin/npu-smi", "read_only": True} in spec["mounts"]


def test_the_module_runs_in_the_image_stdlib_only():
    tree = ast.parse((ROOT / "src/llamapipe/npu/ascend_checks.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - set(sys.stdlib_module_names) <= {"llamapipe"}, imported


# --- the CLIs ----------------------------------------------------------------------------------------


def _cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "llamapipe", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def preflight_params(fake, hub, **over):
    return {"target": "npu", "device": "npu", "devices": "0,1,2,3,4,5,6,7", "min_free_disk_gb": 0,
            "runtime": "container", "host_root": str(fake.root), "lspci": str(fake.bin / "lspci"),
            "hub_endpoint": hub, "dev_root": "/dev", "ascend_root": "/usr/local/Ascend", "pairing": PAIRING,
            "shm_size": "128g", "sft_dtype": "bfloat16", "model_name_or_path": "meta-llama/Llama-2-13b",
            "model_cache": str(fake.root / "cache/models"), "paddlenlp_checkout": None, **over}


def test_llamapipe_preflight_on_a_fake_host_writes_the_report_and_the_table(tmp_path, hub):
    fake = build(tmp_path / "host")
    out = tmp_path / "results/preflight.json"
    engine = {"DOCKER_HOST": hub.replace("http://", "tcp://")}  # the fake hub answers /version too
    proc = _cli("preflight", "--params", json.dumps(preflight_params(fake, hub)), "--out", str(out), env=engine)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["hbm_gib_per_card"] == 64.0 and report["npu_smi_path"] == "/usr/local/sbin/npu-smi"
    assert report["driver_version"] == "24.1.0" and report["chip"] == "910B" and report["engine_version"] == "26.1.4"
    assert report["pairing"]["driver_ok"] is True and report["shm"]["shm_size"] == "128g"
    assert report["problems"] == [] and [c["name"] for c in report["checks"]] == [
        "chip", "devices", "driver", "npu_smi", "cards_idle", "shm_host", "model", "engine", "disk"]
    table = proc.stderr[proc.stderr.index("host checks:\n") + len("host checks:\n"):]
    lines = table.splitlines()
    assert lines[0].split() == ["check", "where", "result", "verdict"]
    assert [ln.split()[:3] for ln in lines[1:10]] == [[c["name"], "host", "ok"] for c in report["checks"]]
    print(table[:table.index("\n20")])  # the README shows this table


def test_llamapipe_preflight_lists_every_failure_and_exits_non_zero(tmp_path, hub):
    fake = build(tmp_path / "host", driver="23.0.1", processes=[(0, 4242, "python", 30000)])
    out = tmp_path / "preflight.json"
    proc = _cli("preflight", "--params", json.dumps(preflight_params(fake, closed_port_url())), "--out", str(out),
                env={"DOCKER_HOST": closed_port_url().replace("http://", "tcp://")})
    assert proc.returncode == 2 and not out.exists()
    for line in ("driver: driver 23.0.1 is older than 23.0.3", "cards_idle: processes 4242 (python",
                 "model: meta-llama/Llama-2-13b is a hub id and this host cannot reach",
                 "engine: cannot reach the Docker engine"):
        assert line in proc.stderr, line
    assert "FAIL" in proc.stderr


def test_llamapipe_preflight_image_on_a_fake_image(tmp_path):
    fake = build(tmp_path / "image")
    host = {"root": str(fake.root), "ldd": str(fake.bin / "ldd"), "df": str(fake.bin / "df"),
            "python": sys.executable, "env": fake.host().env, "site_dirs": [str(fake.site)]}
    out = tmp_path / "results/image/preflight.json"
    proc = _cli("preflight-image", "--params", json.dumps({**fake.image_params(), "host": host}), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["where"] == "image" and report["cann_version"] == "8.0.0" and report["problems"] == []
    assert "plugin_ldd    image  ok" in proc.stderr
    broken = build(tmp_path / "broken", kernels_chip=None, numpy="2.1.0")
    host.update(root=str(broken.root), site_dirs=[str(broken.site)], env=broken.host().env)
    proc = _cli("preflight-image", "--params", json.dumps({**broken.image_params(), "host": host}),
                "--out", str(tmp_path / "broken.json"))
    assert proc.returncode == 2 and not (tmp_path / "broken.json").exists()
    assert "kernels: no opp/built-in/op_impl/ai_core/tbe/kernel/ascend910b" in proc.stderr
    assert "numpy: numpy 2.1.0" in proc.stderr


# --- the planner uses the measured HBM -----------------------------------------------------------------


@pytest.mark.parametrize("measured, fits", [(None, True), (64.0, True), (32.0, False)])
def test_plan_uses_the_hbm_preflight_measured(tmp_path, measured, fits):
    from llamapipe.config import resolve
    from llamapipe.config.parallel import plan_argv
    from llamapipe.scaleout.plan_cli import parse_plan_args, run_plan
    from test_npu_target import _cfg

    pre = tmp_path / "preflight.json"
    pre.write_text(json.dumps({"target": "npu"} if measured is None else {"hbm_gib_per_card": measured}))
    args = parse_plan_args([*plan_argv(resolve(_cfg())), "--measured-memory", str(pre), "--out",
                            str(tmp_path / "plan.json")])
    if fits:
        run_plan(args)
        assert json.loads((tmp_path / "plan.json").read_text())["setup"]["memory_per_card_gb"] == (measured or 64)
    else:
        with pytest.raises(PipelineError, match="90% of 32 GB"):
            run_plan(args)


def test_auto_layout_chosen_at_parse_time_must_fit_the_measured_hbm(tmp_path):
    from llamapipe.config import resolve
    from llamapipe.config.parallel import plan_argv
    from llamapipe.scaleout.plan_cli import parse_plan_args, run_plan
    from test_npu_target import _cfg

    cfg = resolve(_cfg(model_name_or_path="meta-llama/Llama-2-7b", parallel="auto"))
    argv = plan_argv(cfg, pin=False)
    assert argv[argv.index("--expect-layout") + 1] == "{tensor_parallel_degree},{pipeline_parallel_degree},1".format(
        **cfg["npu"]["parallel"])
    pre = tmp_path / "preflight.json"
    pre.write_text(json.dumps({"hbm_gib_per_card": 64.0}))
    run_plan(parse_plan_args([*argv, "--measured-memory", str(pre)]))
    # a layout chosen for 64 GB (tp 2, sharding 4: 51.6 GB) on cards measured at 48 GiB, where others fit
    at = argv.index("--expect-layout") + 1
    argv[at] = "2,1,4"
    pre.write_text(json.dumps({"hbm_gib_per_card": 48.0}))
    with pytest.raises(PipelineError, match=r"auto chose tp 2, pp 1, sharding 4 .* set npu.memory_per_card_gb: 48 "
                                            r"and rerun \(the planner then picks tp 8"):
        run_plan(parse_plan_args([*argv, "--measured-memory", str(pre)]))


def test_pairing_table_changes_with_the_image(tmp_path):
    from llamapipe.config import resolve
    from llamapipe.config import rules as config_rules
    from test_npu_target import _cfg

    raw = _cfg()
    raw["npu"]["image"]["base"] = "registry.example/paddle-npu:cann81"
    with pytest.raises(PipelineError, match=r"npu.pairing.base \(.*cann800.*\) is not npu.image.base"):
        resolve(raw)
    assert config_rules.check(resolve(_cfg())) == []
