"""The config as a user gives it on the command line (issue 21, items 2, 4 and 7).

- nested ``--config`` values reach the workflow as strings (Snakemake reads them with YAML's
  BaseLoader): they are typed by the schema at every depth, npu overlays included, so the
  cross-field rules only ever see typed values;
- on target npu, a value given in ``sft`` / ``export`` / ``predict`` that ``npu.<section>``
  overrides is named when the workflow is parsed;
- schema problems are listed all at once, one short line each, naming the dotted key, the value
  and what would be accepted (patterns in words, "did you mean" for misspelt keys).

The dry-runs are real ``snakemake -n`` runs in a copy of the project.
"""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import ROOT, copy_project, snakemake
from llamapipe.config import deep_merge, npu_overrides, validation
from llamapipe.core.errors import PipelineError

RAW = yaml.safe_load((ROOT / "config.yaml").read_text())
SCHEMA_FILE = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())


def _typed(**over) -> dict:
    """config.yaml with ``over`` merged in as Snakemake merges --config, then typed."""
    return validation.coerce(deep_merge(RAW, over), validation.with_overlays(SCHEMA_FILE))


def _problems(**over) -> list[str]:
    """The schema's problems with config.yaml + ``over``, one line each (after the header)."""
    try:
        validation.checked(deep_merge(RAW, over), validation.with_overlays(SCHEMA_FILE))
    except PipelineError as err:
        return [line.strip().removeprefix("- ") for line in str(err).splitlines()[1:]]
    return []


# --- typing the command line's strings ----------------------------------------------------------


def test_nested_cli_strings_are_typed_at_every_depth_npu_overlays_included():
    cfg = _typed(target="npu", rehearsal="null", devices="null",
                 npu={"sft": {"max_steps": "500", "learning_rate": "1.0e-4", "lora": "true"},
                      "export": {"max_new_tokens": "512"}, "predict": {"batch_size": "2"},
                      "parallel": {"tensor_parallel_degree": "4", "sequence_parallel": "false"},
                      "fused": {"pad_to_multiple_of": "2048"}, "memory_per_card_gb": "32.5",
                      "env": {"GLOG_v": "3"}, "pairing": {"drivers": ["24.1.0", "23.0.3"]}},
                 sft={"learning_rate": "3e-3"}, data={"max_train": "null"}, predict={"threads": "null"})
    npu = cfg["npu"]
    assert (npu["sft"]["max_steps"], npu["sft"]["learning_rate"], npu["sft"]["lora"]) == (500, 1.0e-4, True)
    assert type(npu["sft"]["max_steps"]) is int and type(npu["sft"]["learning_rate"]) is float
    assert npu["export"]["max_new_tokens"] == 512 and npu["predict"]["batch_size"] == 2
    assert npu["parallel"]["tensor_parallel_degree"] == 4 and npu["parallel"]["sequence_parallel"] is False
    assert npu["fused"]["pad_to_multiple_of"] == 2048 and npu["memory_per_card_gb"] == 32.5
    assert npu["env"]["GLOG_v"] == "3"  # the env map takes strings: it stays one
    assert npu["pairing"]["drivers"] == ["24.1.0", "23.0.3"]  # list items the schema wants as strings
    assert cfg["sft"]["learning_rate"] == 3e-3
    assert cfg["rehearsal"] is None and cfg["devices"] is None  # "null" is no card list and no rehearsal
    assert cfg["data"]["max_train"] is None and cfg["predict"]["threads"] is None
    # what the schema takes as a string stays one; what cannot be typed is left for the schema to report
    kept = _typed(target="npu", npu={"parallel": "auto", "master": "null", "network": "none",
                                     "sft": {"max_steps": "lots", "learning_rate": "inf", "warmup_steps": "true"}})
    assert kept["npu"]["parallel"] == "auto"
    assert kept["npu"]["master"] == "null"  # a string key keeps its string
    assert kept["npu"]["network"] == "none"  # an enum member, not YAML's null
    assert kept["npu"]["sft"] == {**RAW["npu"]["sft"], "max_steps": "lots", "learning_rate": "inf",
                                  "warmup_steps": "true"}


def test_a_top_level_number_where_the_schema_wants_a_string_becomes_the_string():
    # `--config devices=4`: Snakemake reads a top-level value as an int first
    assert _typed(devices=4)["devices"] == "4"
    assert _typed(seed=4)["seed"] == 4


def test_refs_all_of_any_of_one_of_and_list_items_are_followed():
    schema = {
        "$defs": {"count": {"type": "integer"}, "rate": {"allOf": [{"type": "number"}, {"minimum": 0}]}},
        "type": "object",
        "properties": {
            "counts": {"type": "array", "items": {"$ref": "#/$defs/count"}},
            "rate": {"$ref": "#/$defs/rate"},
            "either": {"anyOf": [{"type": "boolean"}, {"type": "integer"}]},
            "mode": {"oneOf": [{"const": "auto"}, {"type": "object", "properties": {"n": {"$ref": "#/$defs/count"}}}]},
            "maybe": {"type": ["integer", "null"]},
        },
    }
    given = {"counts": ["1", "2"], "rate": "1.0e-4", "either": "7", "mode": {"n": "3"}, "maybe": "null"}
    assert validation.coerce(given, schema) == {"counts": [1, 2], "rate": 1e-4, "either": 7, "mode": {"n": 3},
                                                "maybe": None}
    assert validation.coerce({"either": "false", "mode": "auto"}, schema) == {"either": False, "mode": "auto"}


# --- schema problems: all of them, each naming key, value and what is accepted -------------------


def test_every_schema_problem_is_listed_at_once():
    assert _problems(seed="abc", threads=0) == ['seed = "abc": must be a whole number',
                                                "threads = 0: must be at least 1"]


def test_misspelt_keys_are_answered_with_did_you_mean():
    found = _problems(seeds=7, sft={"max_step": 5}, container={"imag": "x"}, npu={"sft": {"max_stpes": 5}})
    assert "seeds: unknown key; did you mean seed?" in found
    assert "sft.max_step: unknown key; did you mean sft.max_steps?" in found
    assert "container.imag: unknown key; did you mean container.image?" in found
    assert "npu.sft.max_stpes: unknown key; did you mean npu.sft.max_steps?" in found
    # a key of another section: its full dotted name
    assert _problems(sft={"tensor_parallel_degree": 4}) == [
        "sft.tensor_parallel_degree: unknown key; did you mean npu.parallel.tensor_parallel_degree?"]


def test_patterns_users_hit_are_explained_in_words():
    found = _problems(devices="4, 5,6,7", container={"shm_size": "2G"},
                      npu={"image": {"paddlenlp_commit": "v3.0"}},
                      data={"sha256": "sha256:9c81"})
    assert 'devices = "4, 5,6,7": must be card ids separated by commas, without spaces (e.g. 0,1,2,3)' in found
    assert any(p.startswith('container.shm_size = "2G": must be a size') for p in found)
    assert any(p.startswith('npu.image.paddlenlp_commit = "v3.0": must be a git commit') for p in found)
    assert any(p.startswith("data.sha256 = ") and "64 lowercase hex digits" in p for p in found)
    assert not any("^" in p for p in found), found  # no regular expression


def test_every_pattern_of_the_schema_has_words():
    def patterns(node):
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                yield node["pattern"]
            for value in node.values():
                yield from patterns(value)
        elif isinstance(node, list):
            for value in node:
                yield from patterns(value)

    unexplained = sorted(set(patterns(SCHEMA_FILE)) - set(validation.PATTERN_WORDS))
    assert not unexplained, f"add these to llamapipe.config.validation.PATTERN_WORDS: {unexplained}"


def test_alternatives_report_the_branch_of_the_values_kind():
    assert _problems(npu={"parallel": {"tensor_parallel_degree": "four", "pipeline_parallel_degree": 0}}) == [
        'npu.parallel.tensor_parallel_degree = "four": must be a whole number',
        "npu.parallel.pipeline_parallel_degree = 0: must be at least 1"]
    [auto] = _problems(npu={"parallel": "automatic"})
    assert auto.startswith('npu.parallel = "automatic": must be "auto" or a mapping of tensor_parallel_degree')


def test_enum_type_and_missing_keys_name_what_is_accepted():
    found = _problems(target="gpu", sft={"lora": "yes please", "max_steps": None}, npu={"pairing": {"drivers": []}})
    assert 'target = "gpu": must be one of "cpu", "npu"' in found
    assert 'sft.lora = "yes please": must be true or false' in found
    assert "sft.max_steps = null: must be a whole number" in found
    assert 'npu.image.paddle_version = 3.0: must be a string (quote it: "3.0")' in _problems(
        npu={"image": {"paddle_version": 3.0}})
    assert "npu.pairing.drivers = []: must be a list of at least 1 item(s)" in found
    no_data = deep_merge(RAW, {})
    del no_data["data"]["sha256"]
    with pytest.raises(PipelineError, match=r"data\.sha256: required and missing; it takes 64 lowercase hex"):
        validation.checked(no_data, validation.with_overlays(SCHEMA_FILE))


# --- npu.<section> over the user's <section> ---------------------------------------------------


def _shipped() -> dict:
    return validation.validate(RAW, validation.with_overlays(SCHEMA_FILE))[0]


def test_values_npu_sections_override_are_named_with_both_keys_and_how_to_set_them():
    given = {"target": "npu", "sft": {"learning_rate": 1e-4, "max_steps": 500}, "predict": {"batch_size": 4}}
    cfg = validation.checked(deep_merge(RAW, given), validation.with_overlays(SCHEMA_FILE))
    lines = npu_overrides(cfg, _shipped())
    assert lines == [
        "sft.max_steps = 500 is not used on target npu: npu.sft.max_steps = 100 overlays it and wins. "
        "To use 500 on npu, set npu.sft.max_steps (--config 'npu={sft: {max_steps: 500}}')",
        "sft.learning_rate = 0.0001 is not used on target npu: npu.sft.learning_rate = 3e-06 overlays it and "
        "wins. To use 0.0001 on npu, set npu.sft.learning_rate (--config 'npu={sft: {learning_rate: 0.0001}}')",
        "predict.batch_size = 4 is not used on target npu: npu.predict.batch_size = 1 overlays it and wins. "
        "To use 4 on npu, set npu.predict.batch_size (--config 'npu={predict: {batch_size: 4}}')",
    ]


def test_nothing_is_named_when_no_given_value_is_overridden():
    given = {"sft": {"learning_rate": 1e-4, "weight_decay": 0.1}}  # weight_decay: npu.sft does not set it
    shipped = _shipped()
    for over in ({"target": "npu"}, {"target": "npu", "sft": {"weight_decay": 0.1}},
                 {"target": "cpu", **given}, {"target": "npu", "rehearsal": "cpu", **given},
                 {"target": "npu", "sft": {"learning_rate": 3e-6}}):  # the same value as npu.sft's
        cfg = validation.checked(deep_merge(RAW, over), validation.with_overlays(SCHEMA_FILE))
        assert npu_overrides(cfg, shipped) == [], over


# --- the real command line: snakemake -n in a copy of the project -------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("cli") / "project")


def _dry_run(project, *config):
    proc = snakemake(project, "-n", "-p", "results/sft", "--config", *config, check=False, timeout=180)
    return proc.returncode, proc.stdout + proc.stderr


def _sft_flags(out: str) -> dict:
    return dict(re.findall(r"--(learning_rate|max_steps|tensor_parallel_degree) (\S+)", out))


def _no_traceback(out: str) -> None:
    assert "Traceback" not in out and "TypeError" not in out and "is not of type" not in out, out[-3000:]


@pytest.mark.parametrize("override, flags", [
    ("npu={sft: {max_steps: 500}}", {"max_steps": "500"}),
    ("npu={sft: {learning_rate: 1.0e-4}}", {"learning_rate": "0.0001"}),
    ("npu={parallel: {tensor_parallel_degree: 4, sharding_parallel_degree: 2}}", {"tensor_parallel_degree": "4"}),
])
def test_nested_npu_overrides_on_the_command_line_reach_the_sft_command(project, override, flags):
    code, out = _dry_run(project, "target=npu", override)
    _no_traceback(out)
    assert code == 0, out[-3000:]
    assert flags.items() <= _sft_flags(out).items()


def test_a_nested_degree_reaches_the_layout_check_as_a_number(project):
    """The brief's exact command: tp 4 on 8 cards is checked (a number), not refused as the string '4'."""
    code, out = _dry_run(project, "target=npu", "npu={parallel: {tensor_parallel_degree: 4}}")
    _no_traceback(out)
    assert (code == 0 and _sft_flags(out).get("tensor_parallel_degree") == "4") or "tp 4," in out, out[-3000:]


def test_an_untypable_nested_value_is_a_schema_error_not_a_traceback(project):
    code, out = _dry_run(project, "target=npu", "npu={sft: {max_steps: lots}}")
    assert code != 0 and 'npu.sft.max_steps = "lots": must be a whole number' in out, out[-3000:]
    assert "Traceback" not in out and "TypeError" not in out


def test_a_shared_section_value_npu_overrides_is_named_in_the_dry_run(project):
    code, out = _dry_run(project, "target=npu", "sft={learning_rate: 1.0e-4, max_steps: 500}")
    assert code == 0, out[-3000:]
    assert "sft.learning_rate = 0.0001 is not used on target npu: npu.sft.learning_rate = 3e-06 overlays it" in out
    assert "sft.max_steps = 500 is not used on target npu: npu.sft.max_steps = 100 overlays it" in out
    assert _sft_flags(out)["learning_rate"] == "3e-06"  # the documented precedence: npu.sft wins


def _error_block(out: str) -> list[str]:
    """Snakemake's report of the error: from its WorkflowError line to its first file line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("WorkflowError"))
    end = next((i for i, line in enumerate(lines) if i > start and line.startswith('  File "')), len(lines) - 1)
    return lines[start:end + 1]


@pytest.mark.parametrize("config, expected", [
    (["seed=abc", "threads=0"], ['- seed = "abc": must be a whole number', "- threads = 0: must be at least 1"]),
    (["sft={max_step: 5}"], ["- sft.max_step: unknown key; did you mean sft.max_steps?"]),
    (["target=npu", "devices=4, 5,6,7"],
     ['- devices = "4, 5,6,7": must be card ids separated by commas, without spaces (e.g. 0,1,2,3)']),
])
def test_schema_errors_are_a_few_lines_each_all_at_once(project, config, expected):
    code, out = _dry_run(project, *config)
    assert code != 0
    block = _error_block(out)
    assert [line.strip() for line in block if line.strip().startswith("- ")] == expected, out[-3000:]
    assert len(block) == len(expected) + 3, block  # Snakemake's line, our header, the problems, the file line
    assert "Failed validating" not in out and "additionalProperties" not in out and "^[0-9]" not in out


def test_a_local_model_without_its_shape_is_told_to_set_npu_model_config(project):
    code, out = _dry_run(project, "target=npu", "npu={model_name_or_path: /models/my-llama}")
    assert code != 0
    assert "npu.model_name_or_path (/models/my-llama)" in out and "set npu.model_config" in out, out[-3000:]
    assert "--model-config" not in out
