"""Every rule's command comes from one helper (``llamapipe.runners.commands.rule_command``), and
each stage's params from ``llamapipe.config.stage_params``: both reachable without Snakemake."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from llamapipe.config import deep_merge, load
from llamapipe.config.paths import PATHS
from llamapipe.config.stage_params import stage_params
from llamapipe.runners.commands import rule_command

ROOT = Path(__file__).resolve().parents[1]


def _rules() -> dict[str, str]:
    """rule name -> its block, from workflow/rules/*.smk."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk")))
    return dict(re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.M))


def _cfg(tmp_path, **over) -> dict:
    raw = deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text()), over)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(str(path))


def test_every_rule_takes_its_command_from_the_one_helper():
    rules = _rules()
    assert len(rules) >= 19, sorted(rules)
    for name, block in rules.items():
        calls = re.findall(r"cmd=rule_cmd\(\s*\"(\w+)\"", block)
        assert calls == [name], f"rule {name}: params.cmd must be rule_cmd({name!r}, ...), found {calls}"
        shell = re.search(r"shell:\n(?:\s+#.*\n)*\s+(\".*\")", block)
        assert shell and shell.group(1) in ('"{params.cmd} > {log} 2>&1"', '"{params.cmd} 2>&1 | tee {log}"',
                                            # sft: progress lines on the terminal (llamapipe.stages.progress)
                                            '"{params.cmd} 2>&1 | tee {log} | python -m llamapipe.stages.progress"'
                                            ), name


@pytest.mark.parametrize("over", [{}, {"target": "npu"}, {"target": "npu", "rehearsal": "cpu"},
                                  {"runtime": "container"}], ids=["cpu", "npu", "rehearsal", "cpu-container"])
def test_rule_command_builds_every_rule(tmp_path, over, monkeypatch):
    monkeypatch.delenv("LLAMAPIPE_PADDLENLP_SRC", raising=False)
    cfg = _cfg(tmp_path, **over)
    npu_only = {"preflight_image", "build_ops", "smoke_collective"}
    for name in _rules():
        cmd = rule_command(name, cfg, str(tmp_path))
        if cfg["target"] != "npu" and name in npu_only:
            assert cmd == f"echo '{name}: target npu only' && false"
            continue
        argv = shlex.split(cmd)
        assert argv and "{" not in argv[0], (name, cmd)


def test_stage_commands_carry_params_paths_and_manifest(tmp_path):
    cfg = _cfg(tmp_path)
    argv = shlex.split(rule_command("predict", cfg, str(tmp_path), threads=3))
    assert argv[:2] == ["llamapipe", "predict"]
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert json.loads(flags["--params"]) == cfg["predict"]
    assert (flags["--threads"], flags["--seed"]) == ("3", str(cfg["seed"]))
    assert (flags["--inference"], flags["--dev"], flags["--out"]) == (PATHS["inference"], PATHS["dev"],
                                                                     PATHS["predictions"])
    assert flags["--manifest"] == "results/manifests/predict.json"


def test_stage_params_follow_the_base_model_and_the_shared_lengths(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAPIPE_PADDLENLP_SRC", raising=False)
    cpu = _cfg(tmp_path)
    assert stage_params("init_model", cpu) == cpu["model"]
    assert stage_params("export", cpu)["src_length"] == cpu["sft"]["src_length"]
    assert "model_built" not in stage_params("preflight", cpu)
    npu = _cfg(tmp_path, target="npu")
    assert stage_params("init_model", npu) == {"model_name_or_path": "meta-llama/Llama-2-13b"}
    assert stage_params("preflight", npu)["model_built"] is False
    assert stage_params("export", npu)["src_length"] == npu["sft"]["src_length"] == 1024  # npu.sft's
    # the rehearsal: init_model builds the npu base model (npu.model_name_or_path is its directory)
    own = _cfg(tmp_path, target="npu", rehearsal="cpu")
    assert stage_params("init_model", own) == own["model"]
    assert stage_params("preflight", own)["model_built"] is True
