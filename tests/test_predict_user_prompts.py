"""`llamapipe predict` on a user's own prompts (issue 23 item 6): JSON lines without `tgt`, no
`--params` (config.yaml's predict section, else the schema's defaults and the export's own
max_new_tokens), a partial `--params`; a bad line is one message naming the file and line.

The first part needs no Paddle (record reading, where the settings come from, the CLI's errors,
collect-predictions); the e2e part predicts for real with the session's finished run, through the
CLI as users type it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, ROOT, copy_project
from llamapipe.core.errors import PipelineError
from llamapipe.core.manifest import sha256_json
from llamapipe.stages import collect
from llamapipe.stages.predict import PREDICT_KEYS, prediction_record, read_records, resolve_params

LLAMAPIPE = str(Path(PYTHON).parent / "llamapipe")  # the venv's entry point, as a user runs it
SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())["properties"]["predict"]
SCHEMA_DEFAULTS = {k: v["default"] for k, v in SCHEMA["properties"].items()}


def _lines(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.fixture
def export_dir(tmp_path):
    """What predict reads of an export before it loads the model: its export_config.json."""
    d = tmp_path / "inference"
    d.mkdir()
    (d / "export_config.json").write_text(json.dumps({"max_new_tokens": 24, "src_length": 48}))
    return d


# --- records ---------------------------------------------------------------------------------


def test_records_with_and_without_tgt_blank_lines_and_a_bom(tmp_path):
    path = _lines(tmp_path / "p.jsonl", b'\xef\xbb\xbf{"src": "a"}', "", "  ", '{"src": ["x", "y"], "tgt": "b"}',
                  '{"src": "c", "tgt": "C", "id": 7}')
    records = read_records(str(path))
    assert records == [{"src": "a"}, {"src": ["x", "y"], "tgt": "b"}, {"src": "c", "tgt": "C", "id": 7}]
    assert [list(prediction_record(r, "p")) for r in records] == [
        ["src", "prediction"], ["src", "tgt", "prediction"], ["src", "tgt", "prediction"]]
    assert prediction_record(records[1], "p") == {"src": ["x", "y"], "tgt": "b", "prediction": "p"}


@pytest.mark.parametrize("line, reason", [
    ('{"tgt": "b", "id": 3}', 'no "src" (its keys: "tgt", "id")'),
    ("{}", 'no "src" (its keys: none)'),
    ('["a", "b"]', "an array, not a JSON object"),
    ('"just text"', "a string, not a JSON object"),
    ('{"src": "a"', "not valid JSON"),
    ("src: a", "not valid JSON"),
    ('{"src": 5}', '"src" is a number'),
    ('{"src": null}', '"src" is null'),
    ('{"src": []}', '"src" is an empty list'),
    ('{"src": ["a", 2]}', '"src" is a list with an item that is not a string'),
    (b'{"src": "\xff"}', "not valid UTF-8 (byte 0xff at offset 9)"),
])
def test_a_bad_line_is_one_message_naming_the_file_and_line(tmp_path, line, reason):
    path = _lines(tmp_path / "prompts.jsonl", '{"src": "fine"}', "", line)
    with pytest.raises(PipelineError) as err:
        read_records(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} line 3: {reason}"), message
    assert "\n" not in message and '"tgt" optional' in message


def test_a_missing_prompts_file_is_a_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match=r"nope\.jsonl: cannot read the prompts: No such file"):
        read_records(str(tmp_path / "nope.jsonl"))


# --- where the settings come from ------------------------------------------------------------


def test_predict_keys_are_the_schemas_predict_section():
    assert set(PREDICT_KEYS) == set(SCHEMA["properties"])


def test_a_complete_params_is_used_as_given_and_nothing_is_read(tmp_path, caplog):
    given = {**SCHEMA_DEFAULTS, "batch_size": 3, "max_new_tokens": 5}
    with caplog.at_level(logging.INFO, logger="llamapipe.predict"):
        params, source = resolve_params(given, str(tmp_path / "no-such-export"), str(tmp_path / "no-config.yaml"))
    assert params == given and source == "--params"
    assert "predict settings from --params" in caplog.text


def test_without_config_yaml_the_schema_defaults_and_the_exports_limit(tmp_path, export_dir, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="llamapipe.predict"):
        params, source = resolve_params({}, str(export_dir))
    assert params == {**SCHEMA_DEFAULTS, "max_new_tokens": 24}
    assert "schema's predict defaults (no config.yaml in" in source and "max_new_tokens 24 from" in source
    assert str(export_dir / "export_config.json") in caplog.text
    partial, source = resolve_params({"batch_size": 2}, str(export_dir))
    assert partial == {**params, "batch_size": 2}
    assert source.startswith("--params (batch_size), the rest from the schema's predict defaults")


def test_without_config_yaml_or_an_export_the_error_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"no-export: no export_config.json; --inference takes"):
        resolve_params({}, str(tmp_path / "no-export"))


def test_config_yamls_predict_section_fills_what_params_lack(tmp_path, export_dir, monkeypatch, caplog):
    project = copy_project(tmp_path / "project")
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["predict"].update(batch_size=5, onednn=True)  # read from this file, not from the defaults
    (project / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
    monkeypatch.chdir(project)
    with caplog.at_level(logging.INFO, logger="llamapipe.predict"):
        params, source = resolve_params(None, str(export_dir))
    assert params == config["predict"]  # the export's 24 does not override the config's choice
    assert source == f"{project / 'config.yaml'}'s predict section" and source in caplog.text
    params, source = resolve_params({"batch_size": 2, "limit": 3}, str(export_dir))
    assert params == {**config["predict"], "batch_size": 2, "limit": 3}
    assert source.startswith("--params (batch_size, limit), the rest from ")


def test_an_invalid_config_yaml_stops_with_its_own_message(tmp_path, export_dir, monkeypatch):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"predict": {"batch_sise": 2}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"config.yaml gives the predict settings --params lacks(.|\n)*batch_sise"):
        resolve_params({}, str(export_dir))


# --- the CLI's errors, before any model is loaded ----------------------------------------------


def test_cli_names_the_bad_line_in_one_message_exit_2(tmp_path, export_dir):
    prompts = _lines(tmp_path / "prompts.jsonl", '{"src": "a"}', '{"prompt": "b"}')
    proc = subprocess.run([LLAMAPIPE, "predict", "--inference", str(export_dir), "--dev", str(prompts),
                           "--out", str(tmp_path / "out.json")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "predict failed" in line]
    assert len(errors) == 1 and f'{prompts} line 2: no "src" (its keys: "prompt")' in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.json").exists()


# --- collect-predictions (the npu target's predict) --------------------------------------------


def test_collect_predictions_of_prompts_without_tgt(tmp_path):
    dev = _lines(tmp_path / "dev.json", '{"src": "a"}', '{"src": "b", "tgt": "B"}')
    raw = _lines(tmp_path / "raw.jsonl", '{"src": "a", "tgt": "", "output": "x"}',
                 '{"src": "b", "tgt": "B", "output": "y"}')
    collect.collect_predictions(str(raw), str(dev), str(tmp_path / "p.json"))
    assert json.loads((tmp_path / "p.json").read_text()) == [
        {"src": "a", "prediction": "x"}, {"src": "b", "tgt": "B", "prediction": "y"}]
    _lines(dev, '{"src": "a"}', '{"tgt": "B"}')
    with pytest.raises(PipelineError, match=r'dev\.json line 2: no "src"'):
        collect.collect_predictions(str(raw), str(dev), str(tmp_path / "p.json"))


# --- for real: the session's finished run (conftest.py), the CLI as users type it ---------------
# Everything a test writes goes to its tmp_path: the shared run stays as it was.


def _predict(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([LLAMAPIPE, "predict", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.e2e
def test_without_params_predict_writes_what_the_pipeline_wrote(finished_run, tmp_path):
    """No --params in the project: config.yaml's predict section, so the dev split's predictions
    are the pipeline's predictions.json byte for byte; in a directory without config.yaml the
    schema's defaults and the export's max_new_tokens, which are the same settings here."""
    pipeline = (finished_run / "results/predictions.json").read_bytes()
    out = tmp_path / "in_project.json"
    proc = _predict(finished_run, "--inference", "results/inference", "--dev", "results/data/dev.json",
                    "--out", str(out))
    assert f"predict settings from {finished_run / 'config.yaml'}'s predict section" in proc.stderr
    assert out.read_bytes() == pipeline

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _predict(elsewhere, "--inference", str(finished_run / "results/inference"),
                    "--dev", str(finished_run / "results/data/dev.json"), "--out", "out.json")
    assert "predict settings from the schema's predict defaults (no config.yaml in" in proc.stderr
    assert f"max_new_tokens 96 from {finished_run / 'results/inference/export_config.json'}" in proc.stderr
    assert (elsewhere / "out.json").read_bytes() == pipeline


@pytest.mark.e2e
def test_user_prompts_without_tgt_and_a_partial_params(finished_run, tmp_path):
    """A user's own prompts (no tgt, one with) and --params '{"batch_size": 2}': the rest from
    config.yaml, the manifest records the settings used."""
    prompts = _lines(tmp_path / "prompts.jsonl", '{"src": "类型#裤*材质#牛仔布*裤型#直筒裤"}', "",
                     '{"src": ["类型#裙", "风格#复古"]}', '{"src": "类型#鞋*颜色#灰色", "tgt": "灰色小白鞋"}')
    manifest = tmp_path / "manifest.json"
    proc = _predict(finished_run, "--params", '{"batch_size": 2}', "--inference", "results/inference",
                    "--dev", str(prompts), "--out", str(tmp_path / "out.json"), "--manifest", str(manifest))
    assert "predict settings from --params (batch_size), the rest from" in proc.stderr
    preds = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert [list(p) for p in preds] == [["src", "prediction"]] * 2 + [["src", "tgt", "prediction"]]
    assert [p["src"] for p in preds] == [r["src"] for r in read_records(str(prompts))]
    assert preds[2]["tgt"] == "灰色小白鞋"
    assert all(isinstance(p["prediction"], str) for p in preds) and any(p["prediction"].strip() for p in preds)
    used = {**yaml.safe_load((finished_run / "config.yaml").read_text())["predict"], "batch_size": 2}
    assert json.loads(manifest.read_text())["params_sha256"] == sha256_json(used)
