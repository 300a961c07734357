"""Issue 12's fast paths: the predictor's settings come from config, predict tokenizes without
PaddleNLP (same ids and text as PaddleNLP's LlamaTokenizer), preflight imports no Paddle.

The static == dygraph token check on a trained model is tests/test_pipeline_e2e.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest
import yaml

from conftest import ROOT
from llamapipe.stages.predict import INFERENCE_SETTINGS, inference_config, inference_settings


def test_settings_defaults_match_the_schema_and_config_overrides_them():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["predict"]["properties"]
    assert {k: props[k]["default"] for k in INFERENCE_SETTINGS} == INFERENCE_SETTINGS
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())["predict"]
    assert {k: shipped[k] for k in INFERENCE_SETTINGS} == INFERENCE_SETTINGS  # config.yaml says it too
    flipped = {"threads": 3, "onednn": not INFERENCE_SETTINGS["onednn"], "onednn_cache_capacity": 7,
               "ir_optim": not INFERENCE_SETTINGS["ir_optim"], "new_executor": not INFERENCE_SETTINGS["new_executor"]}
    assert inference_settings({"batch_size": 8, **flipped}) == flipped
    assert inference_settings(None) == INFERENCE_SETTINGS


@pytest.mark.parametrize("onednn", [True, False])
def test_settings_reach_the_paddle_inference_config(onednn, tmp_path):
    for suffix in (".json", ".pdiparams"):  # Config checks that the files exist, nothing more
        (tmp_path / f"model{suffix}").touch()
    prefix = str(tmp_path / "model")
    settings = {"threads": None, "onednn": onednn, "onednn_cache_capacity": 5, "ir_optim": False,
                "new_executor": True}
    config = inference_config(prefix, settings, threads=3)
    assert config.cpu_math_library_num_threads() == 3  # threads None: the rule's
    assert config.mkldnn_enabled() is onednn
    assert config.ir_optim() is False
    config = inference_config(prefix, {**settings, "threads": 1, "ir_optim": True}, threads=3)
    assert config.cpu_math_library_num_threads() == 1 and config.ir_optim() is True


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The init_model stage's tokenizer, trained on the bundled sample, saved by PaddleNLP."""
    from paddlenlp.transformers import LlamaTokenizer

    from llamapipe.stages.init_model import SPECIAL_IDS, _write_corpus, train_sentencepiece

    work = tmp_path_factory.mktemp("tok")
    with tarfile.open(ROOT / "assets/AdvertiseGen-sample.tar.gz") as tar:
        tar.extractall(work, filter="data")
    _write_corpus(str(work / "AdvertiseGen/train.json"), work / "corpus.txt")
    vocab = train_sentencepiece(work / "corpus.txt", work / "spm", 2000, seed=42)
    tok = LlamaTokenizer(vocab_file=str(work / "spm.model"))
    tok.pad_token = tok.convert_ids_to_tokens(SPECIAL_IDS["pad_id"])
    tok.save_pretrained(str(work / "saved"))
    records = [json.loads(line) for name in ("train.json", "dev.json")
               for line in (work / "AdvertiseGen" / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return work / "saved", records, vocab


def test_sentencepiece_tokenizer_equals_paddlenlps(tokenizer_dir):
    import numpy as np

    from llamapipe.core.tokenizer_io import SentencePieceTokenizer, load_tokenizer

    path, records, vocab = tokenizer_dir
    lib, ours = load_tokenizer(str(path), padding_side="left"), SentencePieceTokenizer(str(path))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (lib.bos_token_id, lib.eos_token_id,
                                                                          lib.pad_token_id)
    texts = [r[k] for r in records for k in ("src", "tgt")]
    texts += ["", " ", "Hello , world . It 's fine !", "a <s> b </s> c", "<unk>", "半身裙 , 显瘦 ?", "☃ 𝄞 emoji 😀"]
    for text in texts:
        assert ours.encode(text)["input_ids"] == lib.encode(text, add_special_tokens=False)["input_ids"], text
        ids = lib.encode(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == lib.decode(ids, skip_special_tokens=True), text
    rng = np.random.default_rng(0)  # what a model may generate: any ids, special ones included
    for _ in range(300):
        ids = rng.integers(0, vocab, size=int(rng.integers(1, 40))).tolist()
        assert ours.decode(ids) == lib.decode(ids, skip_special_tokens=True), ids


def test_preflight_reads_versions_without_importing_the_stack(tmp_path):
    code = ("import json, sys; from llamapipe.stages import preflight; "
            f"r = preflight.run({{'target': 'cpu', 'min_free_disk_gb': 0}}, {str(tmp_path / 'p.json')!r}); "
            "print(json.dumps([r['versions'], sorted(m for m in ('paddle', 'paddlenlp') if m in sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    versions, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert imported == []
    assert versions["paddle"] == "3.0.0" and versions["paddlenlp"] == "3.0.0b4"


def test_preflight_names_a_missing_package(tmp_path, monkeypatch):
    from llamapipe.core.errors import PipelineError
    from llamapipe.stages import preflight

    monkeypatch.setitem(preflight.STACK, "no_such_module_xyz", "no-such-dist")
    with pytest.raises(PipelineError, match=r"no_such_module_xyz \(no-such-dist\) is not installed"):
        preflight.run({"target": "cpu", "min_free_disk_gb": 0}, str(tmp_path / "p.json"))


def test_predict_and_full_merge_stages_import_no_paddlenlp(tokenizer_dir, tmp_path):
    """predict's tokenizer and Paddle Inference, a full-fine-tune merge: no PaddleNLP import (the
    CLI lowers PaddleNLP's logger only for the stages that import it anyway)."""
    import numpy as np

    from llamapipe.cli import PADDLENLP_STAGES

    assert set(PADDLENLP_STAGES) == {"init-model", "sft", "export"}
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text(json.dumps({"hidden_size": 4}))
    import paddle

    paddle.save({"w": paddle.to_tensor(np.ones((2, 2), "float32"))}, str(sft / "model_state.pdparams"))
    code = ("import sys; from paddle import inference; "
            "from llamapipe.stages import merge, predict; "
            f"predict.SentencePieceTokenizer({str(tokenizer_dir[0])!r}).encode('abc'); "
            f"merge.run({{'dtype': 'float32'}}, {str(sft)!r}, {str(sft)!r}, {str(tmp_path / 'merged')!r}); "
            "print('paddlenlp' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "merged/model_state.pdparams").exists()


def test_a_paddle_stage_skips_only_the_teardown_exit_handlers_and_streams_still_finish(tmp_path):
    """cli._exit_after_paddle: exit code 0, the exit handlers ran, unflushed output reached the pipe."""
    probe = tmp_path / "handler_ran"
    code = ("import atexit, sys, paddle\n"
            f"atexit.register(lambda: open({str(probe)!r}, 'w').write('ran'))\n"
            "from llamapipe.cli import _exit_after_paddle\n"
            "print('no newline, not flushed', end='')\n"
            "sys.stderr.write('err')\n"
            "_exit_after_paddle()\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "no newline, not flushed"
    assert proc.stderr.endswith("err")
    assert probe.read_text() == "ran"


def test_only_the_process_entry_exits_early(tmp_path):
    """main(argv) called in-process returns (tests, tools); `python -m llamapipe` exits early after
    Paddle and still writes its manifest and its 'finished' line first."""
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "config.json").write_text(json.dumps({"hidden_size": 4}))
    import numpy as np
    import paddle

    paddle.save({"w": paddle.to_tensor(np.ones((2, 2), "float32"))}, str(sft / "model_state.pdparams"))
    args = ["merge", "--params", '{"dtype": "float32"}', "--sft", str(sft), "--base", str(sft),
            "--manifest", str(tmp_path / "manifest.json")]
    from llamapipe.cli import main

    main(args + ["--out", str(tmp_path / "in_process")])  # returns: pytest is still here
    assert (tmp_path / "in_process/model_state.pdparams").exists()
    proc = subprocess.run([sys.executable, "-m", "llamapipe", *args, "--out", str(tmp_path / "as_process")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merge finished in" in proc.stderr
    assert json.loads((tmp_path / "manifest.json").read_text())["stage"] == "merge"
