"""Variants: several fine-tunes in one DAG (``variants:``, llamapipe.config.variants,
workflow/rules/variants.smk). Fast: validation, what a variant shares, its commands, the dry-run's
job list. e2e: two variants (full, LoRA) through the comparison, against plain runs of the same
configs, and a change to one variant reruns that variant only."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import copy_project, planned_jobs, snakemake
from llamapipe.config import deep_merge, resolve
from llamapipe.config.paths import PATHS
from llamapipe.config.validation import checked, coerce, config_schema, validate
from llamapipe.config.variants import resolve_variants, variant_run
from llamapipe.core.errors import PipelineError
from llamapipe.runners.commands import rule_command

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "config.yaml").read_text())


def _resolved(variants: dict, **top) -> tuple[dict, dict]:
    """(the plain run's resolved config, each variant's), as common.smk builds them."""
    schema = config_schema()
    config = checked(coerce(deep_merge(deep_merge(SHIPPED, top), {"variants": variants}), schema), schema)
    shipped, _ = validate(SHIPPED, schema)
    plain = resolve({k: v for k, v in config.items() if k != "variants"}, shipped)
    return plain, resolve_variants(config, shipped, schema)


@pytest.fixture(autouse=True)
def _in_project(monkeypatch):
    monkeypatch.chdir(ROOT)  # the bundled sample's file: url is project-relative
    monkeypatch.delenv("LLAMAPIPE_PADDLENLP_SRC", raising=False)


BAD = [
    ("name", {"a b": {}}, ["variants.a b", "a directory under results/variants/"]),
    ("name, path", {"../up": {}}, ["variants.../up"]),
    ("name, the comparison's", {"comparison.html": {}}, ["variants.comparison.html", "the comparison's"]),
    ("project key", {"v": {"target": "npu"}}, ["variants.v.target", "the project's"]),
    ("project key, npu", {"v": {"npu": {"parallel": {"tensor_parallel_degree": 2}}}}, ["variants.v.npu.parallel"]),
    ("unknown key", {"v": {"sft": {"lorra": True}}}, ["variants.v:", "sft.lorra", "did you mean sft.lora"]),
    ("wrong type", {"v": {"sft": {"max_steps": "many"}}}, ["variants.v:", "sft.max_steps", "whole number"]),
    ("cross-field", {"v": {"sft": {"max_steps": 40}}}, ["variants.v:", "sft.save_steps (100)", "sft.max_steps (40)"]),
    ("not a mapping", {"v": 3}, ["variants.v"]),
]


@pytest.mark.parametrize("what,variants,named", BAD, ids=[b[0] for b in BAD])
def test_a_bad_variant_is_refused_naming_the_variant_and_the_key(what, variants, named):
    with pytest.raises(PipelineError) as err:
        _resolved(variants)
    for text in named:
        assert text in str(err.value), (what, str(err.value))


def test_every_bad_variant_is_listed_in_one_error():
    with pytest.raises(PipelineError) as err:
        _resolved({"ok": {"sft": {"lora": True}}, "a": {"seed": "x"}, "b": {"devices": "0"},
                   "c": {"sft": {"warmup_steps": 5000}}})
    message = str(err.value)
    assert "3 problem(s) in variants" in message or message.count("- variants.") >= 3, message
    for name in ("variants.a", "variants.b.devices", "variants.c"):
        assert name in message, message
    assert "variants.ok" not in message


def test_a_variant_typed_from_command_line_strings_is_its_plain_config():
    # --config 'variants={lora: {sft: {lora: true, learning_rate: 3.0e-4}}}' gives strings
    plain, variants = _resolved({"lora": {"sft": {"lora": "true", "learning_rate": "3.0e-4"}}})
    lora = variants["lora"]
    assert lora["sft"]["lora"] is True and lora["sft"]["learning_rate"] == 3.0e-4
    alone, _ = _resolved({}, sft={"lora": True, "learning_rate": 3.0e-4})
    assert lora == alone  # what a plain run with the same overrides resolves to
    assert "variants" not in lora and "variants" not in plain


@pytest.mark.parametrize("overrides,shared", [
    ({"sft": {"lora": True}}, ("download_data", "prepare_data", "init_model")),
    ({"export": {"max_new_tokens": 64}, "predict": {"batch_size": 4, "max_new_tokens": 64}},
     ("download_data", "prepare_data", "init_model")),
    ({"data": {"max_train": 100}}, ("download_data",)),
    ({"model": {"hidden_size": 64}}, ("download_data", "prepare_data")),
    ({"seed": 7}, ()),  # every stage draws from the seed
], ids=["sft", "export+predict", "data", "model", "seed"])
def test_a_variant_shares_the_upstream_stages_whose_command_is_the_plain_runs(overrides, shared):
    plain, variants = _resolved({"v": overrides})
    run = variant_run("v", variants["v"], plain)
    assert run.shared == shared
    own = {"download_data": "raw_data", "prepare_data": "train", "init_model": "base_model"}
    for stage, key in own.items():
        expected = PATHS[key] if stage in shared else None
        assert (run.paths[key] == PATHS[key]) == (expected is not None), (stage, run.paths[key])
    for key in ("sft", "sft_checkpoints", "merged", "inference", "predictions", "metrics", "provenance"):
        assert run.paths[key].startswith("results/variants/v/"), key
    for key in ("preflight", "plan", "image", "wheels", "smoke_collective"):
        assert run.paths[key] == PATHS[key], key


def test_a_variants_commands_are_the_plain_commands_on_its_own_paths(tmp_path):
    plain, variants = _resolved({"lora": {"sft": {"lora": True}}})
    run = variant_run("lora", variants["lora"], plain)
    for rule in ("sft", "merge", "export", "predict", "evaluate"):
        mine = shlex.split(rule_command(rule, variants["lora"], str(tmp_path), run=run))
        if rule == "sft":  # its progress lines name the variant
            assert mine[:3] == ["export", "LLAMAPIPE_VARIANT=lora;", "llamapipe"], mine[:3]
            mine = mine[2:]
        # the plain run of the variant's config, its results/ paths moved under the variant
        alone = rule_command(rule, variants["lora"], str(tmp_path))
        moved = [a if a.startswith(("results/data", "results/model")) else
                 a.replace("results/", "results/variants/lora/", 1) for a in shlex.split(alone)]
        assert mine == moved, rule
    argv = shlex.split(rule_command("provenance", variants["lora"], str(tmp_path), run=run))
    flags = dict(zip(argv[2::2], argv[3::2]))
    assert flags["--manifests"] == "results/manifests,results/variants/lora/manifests"
    assert flags["--out"] == "results/variants/lora/provenance.json"
    plots = shlex.split(rule_command("plots", variants["lora"], str(tmp_path), run=run))
    benchmarks = plots[plots.index("--benchmarks") + 1].split(",")
    assert "results/benchmarks/prepare_data.tsv" in benchmarks
    assert "results/variants/lora/benchmarks/sft.tsv" in benchmarks


def test_two_variants_in_a_container_runtime_never_share_a_container_label(tmp_path):
    plain, variants = _resolved({"a": {"sft": {"lora": True}}, "b": {}}, runtime="container")
    labels = set()
    for name in ("a", "b"):
        argv = shlex.split(rule_command("sft", variants[name], str(tmp_path), run=variant_run(name, variants[name],
                                                                                                 plain)))
        labels.add(json.loads(argv[argv.index("--spec") + 1])["rule"])
    argv = shlex.split(rule_command("sft", plain, str(tmp_path)))
    labels.add(json.loads(argv[argv.index("--spec") + 1])["rule"])
    assert labels == {"sft", "sft.a", "sft.b"}


TWO = "variants={full: {}, lora: {sft: {lora: true, learning_rate: 1.0e-2}}}"


def test_the_comparison_plans_the_shared_stages_once_and_each_variant_once(tmp_path):
    project = copy_project(tmp_path / "project")
    out = snakemake(project, "-n", "results/variants/comparison.html", "--config", TWO).stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    assert {k: int(v) for k, v in counts.items()} == {
        "preflight": 1, "download_data": 1, "prepare_data": 1, "init_model": 1,
        "sft_variant": 2, "merge_variant": 2, "export_variant": 2, "predict_variant": 2, "evaluate_variant": 2,
        "plots_variant": 2, "provenance_variant": 2, "comparison": 1, "total": 19}, out
    # a bare `snakemake` with variants builds their comparison, not the plain run
    assert "sft" not in planned_jobs(project, "--config", TWO)
    one = planned_jobs(project, "results/variants/lora/predictions.json", "--config", TWO)
    assert one == {"preflight", "download_data", "prepare_data", "init_model", "sft_variant", "merge_variant",
                   "export_variant", "predict_variant"}


def test_the_comparison_without_variants_says_how_to_add_them(tmp_path):
    project = copy_project(tmp_path / "project")
    proc = snakemake(project, "-n", "results/variants/comparison.html", check=False)
    assert proc.returncode != 0
    assert "has none: add some" in proc.stdout + proc.stderr


def test_a_bad_variant_stops_the_dry_run_before_any_job(tmp_path):
    project = copy_project(tmp_path / "project")
    proc = snakemake(project, "-n", "--config", "variants={ok: {}, 'x/y': {}, t: {threads: 4}}", check=False)
    message = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "variants.x/y" in message and "variants.t.threads" in message, message


# --- real runs -------------------------------------------------------------------------------

SMALL = {"sft": {"max_steps": 40, "save_steps": 20, "warmup_steps": 5}, "predict": {"limit": 8}}
LORA = {"sft": {"lora": True, "learning_rate": 1.0e-2}}


def _jobs_run(stdout: str) -> list[str]:
    return re.findall(r"^(?:local)?rule (\w+):", stdout, re.M)


@pytest.mark.e2e
def test_two_variants_run_side_by_side_and_equal_their_plain_runs(tmp_path):
    project = copy_project(tmp_path / "project")
    (project / "small.yaml").write_text(yaml.safe_dump({**SMALL, "variants": {"full": {}, "lora": LORA}}))
    run = snakemake(project, "--cores", "2", "--configfile", "small.yaml")  # the default target: the comparison
    jobs = _jobs_run(run.stdout + run.stderr)
    for shared in ("preflight", "download_data", "prepare_data", "init_model", "comparison"):
        assert jobs.count(shared) == 1, (shared, jobs)
    for own in ("sft_variant", "merge_variant", "export_variant", "predict_variant", "evaluate_variant"):
        assert jobs.count(own) == 2, (own, jobs)
    assert "sft" not in jobs
    variants = project / "results/variants"

    # each variant's predictions are those of a plain run of its config (the same shared stages)
    for name, extra in (("full", []), ("lora", ["--config", "sft={lora: true, learning_rate: 1.0e-2}"])):
        plain = snakemake(project, "--cores", "2", "results/predictions.json", "--configfile", "small.yaml", *extra)
        assert not {"download_data", "prepare_data", "init_model"} & set(_jobs_run(plain.stdout + plain.stderr))
        plain_predictions = (project / "results/predictions.json").read_bytes()
        assert plain_predictions == (variants / name / "predictions.json").read_bytes(), name
    assert (variants / "full/predictions.json").read_bytes() != (variants / "lora/predictions.json").read_bytes()

    # the comparison's values are each variant's metrics.json
    rows = {r["run"]: r for r in csv.DictReader((variants / "comparison.tsv").open(), delimiter="\t")}
    assert set(rows) == {"full", "lora"}
    for name, row in rows.items():
        metrics = json.loads((variants / name / "metrics.json").read_text())
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                assert float(row[key]) == pytest.approx(value), (name, key)
    html = (variants / "comparison.html").read_text()
    assert "sft.lora" in html and "data:image/png;base64," in html
    prov = json.loads((variants / "lora/provenance.json").read_text())
    assert prov["config"]["sft"]["lora"] is True and "prepare-data" in prov["stages"]

    # a change to one variant reruns that variant's jobs only (and the comparison)
    changed = {**SMALL, "variants": {"full": {}, "lora": {"sft": {**LORA["sft"], "learning_rate": 5.0e-3}}}}
    (project / "changed.yaml").write_text(yaml.safe_dump(changed))
    dry = snakemake(project, "-n", "--configfile", "changed.yaml").stdout
    assert set(re.findall(r"wildcards: variant=(\w+)", dry)) == {"lora"}, dry
    assert planned_jobs(project, "--configfile", "changed.yaml") == {
        "sft_variant", "merge_variant", "export_variant", "predict_variant", "evaluate_variant", "plots_variant",
        "provenance_variant", "comparison"}


def test_a_variant_value_that_the_npu_overlay_would_replace_is_refused():
    # on npu, npu.sft overlays sft: a variant's sft.learning_rate would do nothing
    with pytest.raises(PipelineError) as err:
        _resolved({"lr": {"sft": {"learning_rate": 1.0e-4}}}, target="npu")
    assert "variants.lr.sft.learning_rate is not used on target npu" in str(err.value)
    assert "variants.lr.npu.sft.learning_rate" in str(err.value)
    _, variants = _resolved({"lr": {"npu": {"sft": {"learning_rate": 1.0e-4}}}}, target="npu")
    assert variants["lr"]["sft"]["learning_rate"] == 1.0e-4


def test_a_variants_sft_progress_lines_name_it(monkeypatch):
    import io

    from llamapipe.config.variants import VARIANT_ENV
    from llamapipe.stages import progress

    assert progress.VARIANT_ENV == VARIANT_ENV
    line = "2026-12-07 11:45:01,851 INFO llamapipe.sft: step 1/1000 (0%) | loss 7.6350\n"
    for env, prefix in ((None, ""), ("lora", "[lora] ")):
        if env:
            monkeypatch.setenv(VARIANT_ENV, env)
        out = io.StringIO()
        progress.main(io.BytesIO(line.encode()), out)
        assert out.getvalue() == prefix + line, out.getvalue()
