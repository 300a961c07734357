from __future__ import annotations

import json

from llamapipe.stages import evaluate


def test_identical_text_scores_100_and_unrelated_scores_0():
    refs = ["这款连衣裙采用蓝色设计，清新自然，蝴蝶结点缀更显甜美可爱。", "黑色休闲裤，宽松版型穿着舒适。"]
    perfect = evaluate.score(refs, refs)
    assert perfect["bleu-4"] == 100.0
    assert perfect["rouge-1"] == perfect["rouge-2"] == perfect["rouge-l"] == 100.0
    unrelated = evaluate.score(["abc", "xyz"], refs)
    assert unrelated["bleu-4"] == 0.0 and unrelated["rouge-1"] == 0.0


def test_partial_overlap_is_between_and_empty_predictions_count_as_zero():
    refs = ["这款连衣裙采用蓝色设计，清新自然，蝴蝶结点缀更显甜美可爱。", "黑色休闲裤，宽松版型穿着舒适。"]
    partial = evaluate.score(["这款连衣裙采用蓝色设计，清新自然", ""], refs)
    assert 0 < partial["rouge-1"] < 100 and 0 < partial["bleu-4"] < 100
    assert partial["empty_predictions"] == 1
    alone = evaluate.score(["这款连衣裙采用蓝色设计，清新自然"], refs[:1])
    assert partial["rouge-1"] < alone["rouge-1"]  # the empty one pulls the mean down


def test_run_scores_the_file_against_its_references(tmp_path):
    """predictions.json in, metrics.json out: a perfect record and an empty one average to 50."""
    preds = [{"src": "类型#裙", "tgt": "蓝色连衣裙清新甜美", "prediction": "蓝色连衣裙清新甜美"},
             {"src": "类型#裤", "tgt": ["黑色休闲裤", "宽松舒适"], "prediction": ""}]
    (tmp_path / "p.json").write_text(json.dumps(preds, ensure_ascii=False))
    evaluate.run(str(tmp_path / "p.json"), str(tmp_path / "m.json"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["rouge-1"] == metrics["rouge-2"] == metrics["rouge-l"] == 50.0
    assert (metrics["samples"], metrics["empty_predictions"]) == (2, 1)
    assert 0 < metrics["bleu-4"] < 100
