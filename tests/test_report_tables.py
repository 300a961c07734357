"""The report's tables hold the run's numbers and rows, escaped (read back with pandas)."""

from __future__ import annotations

import io
import json

import pandas as pd

from llamapipe.stages import report


def test_tables_carry_the_metrics_and_the_first_predictions(tmp_path):
    metrics = {"bleu-4": 24.9929, "rouge-l": 40.5595, "samples": 3}
    preds = [{"src": f"类型#裙*颜色#{c}", "tgt": f"{c}色<b>连衣裙</b>", "prediction": f"{c}色裙"} for c in "红黄蓝"]
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    (tmp_path / "p.json").write_text(json.dumps(preds, ensure_ascii=False))
    assert report.write_tables(str(tmp_path / "m.json"), str(tmp_path / "p.json"), str(tmp_path / "out"),
                               samples=2) == {"metrics": 3, "samples": 2}
    (m,) = pd.read_html(io.StringIO((tmp_path / "out/metrics.html").read_text()))
    assert dict(zip(m["metric"], m["value"])) == {"bleu-4": 24.9929, "rouge-l": 40.5595, "samples": 3}
    html = (tmp_path / "out/predictions.html").read_text()
    assert "<b>" not in html  # reference text is escaped, not rendered
    (p,) = pd.read_html(io.StringIO(html))
    assert list(p.columns) == ["prompt (src)", "reference (tgt)", "prediction"]
    assert p.values.tolist() == [[r["src"], r["tgt"], r["prediction"]] for r in preds[:2]]
