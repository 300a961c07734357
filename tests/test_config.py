"""Bad config stops Snakemake before any job, with a message that names the key."""

from __future__ import annotations

import pytest
import yaml

from conftest import snakemake


def _write(project, overlay: dict):
    path = project / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay, allow_unicode=True))
    return path


def test_default_config_dry_run_plans_every_stage(project_copy):
    from conftest import planned_jobs

    assert planned_jobs(project_copy, "results/predictions.json", "results/metrics.json") == {
        "preflight", "download_data", "prepare_data", "init_model", "sft", "merge", "export", "predict", "evaluate",
    }


@pytest.mark.parametrize(
    "overlay, named",
    [
        ({"sft": {"max_steps": "many"}}, "max_steps"),
        ({"sft": {"max_steps": -5}}, "max_steps"),
        ({"sft": {"learning_rte": 0.1}}, "learning_rte"),
        ({"unknown_section": 1}, "unknown_section"),
        ({"target": "tpu"}, "target"),
        ({"data": {"url": ""}}, "url"),
        ({"data": {"sha256": "abc"}}, "sha256"),
        ({"data": {"on_error": "ignore"}}, "on_error"),
        ({"predict": {"batch_size": 0}}, "batch_size"),
    ],
)
def test_bad_config_fails_before_any_job_naming_the_key(project_copy, overlay, named):
    proc = snakemake(project_copy, "-n", "--configfile", str(_write(project_copy, overlay)), check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "checked against workflow/schemas/config.schema.yaml" in message  # the schema's verdict, not a rule's
    assert named in message
    assert not (project_copy / "results").exists()


def test_missing_data_url_is_named(project_copy):
    config = yaml.safe_load((project_copy / "config.yaml").read_text())
    del config["data"]["url"]
    (project_copy / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    proc = snakemake(project_copy, "-n", check=False)
    assert proc.returncode != 0
    assert "data.url: required and missing" in proc.stdout + proc.stderr
