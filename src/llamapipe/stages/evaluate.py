"""evaluate: BLEU-4 and ROUGE-1/2/L of predictions against references, Chinese-aware.

BLEU-4 is sacrebleu's corpus BLEU with its Chinese tokenizer; ROUGE is rouge-chinese on jieba
words, averaged over samples (an empty prediction scores 0), all x100. The ADGEN reference
numbers in DESIGN.md (ChatGLM recipe) use sentence-level NLTK BLEU on jieba words, so BLEU is
comparable in spirit, not digit for digit.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from llamapipe.core.atomic import write_json

log = logging.getLogger("llamapipe.evaluate")


def _words(text: str) -> str:
    import jieba

    return " ".join(w for w in jieba.cut(text) if w.strip())


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_chinese import Rouge

    rouge = Rouge()
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for pred, ref in zip(predictions, references):
        hyp, gold = _words(pred), _words(ref)
        if not hyp or not gold:
            continue  # rouge-chinese refuses empty text; it scores 0
        scores = rouge.get_scores(hyp, gold)[0]
        for key in totals:
            totals[key] += scores[key]["f"]
    n = max(len(predictions), 1)
    return {key: round(100 * total / n, 4) for key, total in totals.items()}


def bleu4(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return round(sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score, 4)


def score(predictions: list[str], references: list[str]) -> dict[str, Any]:
    rouge = rouge_scores(predictions, references)
    return {
        "bleu-4": bleu4(predictions, references),
        "rouge-1": rouge["rouge-1"],
        "rouge-2": rouge["rouge-2"],
        "rouge-l": rouge["rouge-l"],
        "samples": len(predictions),
        "empty_predictions": sum(1 for p in predictions if not p.strip()),
    }


def run(predictions_file: str, out_file: str) -> dict[str, Any]:
    import jieba

    jieba.setLogLevel(logging.WARNING)
    with open(predictions_file, encoding="utf-8") as f:
        records = json.load(f)
    preds = [r["prediction"] for r in records]
    refs = [r["tgt"] if isinstance(r["tgt"], str) else "\n".join(r["tgt"]) for r in records]
    metrics = score(preds, refs)
    write_json(out_file, metrics)
    log.info("metrics: %s", metrics)
    return metrics
