"""prepare_data: validate AdvertiseGen-style ``{"src","tgt"}`` JSON lines and write the splits.

Each line must be UTF-8 JSON holding an object whose ``src`` and ``tgt`` are a non-empty string
or a non-empty list of strings (PaddleNLP's multi-turn form; then both have the same number of
turns, as PaddleNLP asserts). Every line is checked, also past ``max_train``/``max_dev``: the
limits choose what is written, not what is validated.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llamapipe.core.atomic import atomic_dir, write_json, write_json_lines
from llamapipe.core.errors import PipelineError
from llamapipe.core.jsonl import BLANK, BadLine, json_value, numbered_lines

log = logging.getLogger("llamapipe.prepare_data")

SPLITS = ("train", "dev")
MAX_LISTED = 20  # problems listed in an error message or warning; the report keeps all of them


def run(src_dir: str, out_dir: str, on_error: str = "fail", max_train: int | None = None,
        max_dev: int | None = None) -> dict:
    if on_error not in ("fail", "skip"):
        raise PipelineError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    limits = {"train": max_train, "dev": max_dev}
    for split, limit in limits.items():
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise PipelineError(f"max_{split} must be a positive integer or None, got {limit!r}")

    records: dict[str, list[dict]] = {}
    report: dict = {"src_dir": str(src_dir), "on_error": on_error, "splits": {}}
    failures = []
    for split in SPLITS:
        path = Path(src_dir) / f"{split}.json"
        if not path.is_file():
            raise PipelineError(f"{path}: not found (expected {split}.json in {src_dir})")
        recs, problems, lines = read_jsonl(path)
        # Collect the problems of both files before failing, so one run shows everything to fix.
        if problems and on_error == "fail":
            failures.append(_describe(path, problems))
            continue
        if not recs:
            failures.append(f"{path}: no valid records ({lines} line(s) read, {len(problems)} bad)")
            continue
        if problems:
            log.warning("%s", _describe(path, problems, verb="skipped"))
        kept = recs if limits[split] is None else recs[: limits[split]]
        records[split] = kept
        report["splits"][split] = {
            "source": str(path), "lines_read": lines, "valid": len(recs), "written": len(kept),
            "skipped": len(problems), "skipped_lines": [{"line": n, "reason": r} for n, r in problems],
        }
    if failures:
        hint = "\n(fix the data, or set on_error: skip to drop bad lines)" if on_error == "fail" else ""
        raise PipelineError("\n".join(failures) + hint)

    with atomic_dir(out_dir) as tmp:  # all three files appear together or not at all
        for split in SPLITS:
            write_json_lines(tmp / f"{split}.json", records[split])
        write_json(tmp / "report.json", report)
    for split, info in report["splits"].items():
        log.info("%s: %d lines read, %d written, %d skipped", split, info["lines_read"], info["written"],
                 info["skipped"])
    return report


def read_jsonl(path: Path) -> tuple[list[dict], list[tuple[int, str]], int]:
    """Valid ``{"src","tgt"}`` records, ``(line number, reason)`` problems, and lines read."""
    records, problems = [], []
    n = 0
    with open(path, "rb") as f:
        for n, raw in numbered_lines(f):
            rec = _parse(raw)
            if isinstance(rec, str):
                problems.append((n, rec))
            else:
                records.append(rec)
    return records, problems, n


def _parse(raw: bytes) -> dict | str:
    """The cleaned record, or the reason the line is bad."""
    try:
        obj = json_value(raw)
    except BadLine as e:
        return str(e)
    if obj is BLANK:
        return "empty line"
    if not isinstance(obj, dict):
        return f"not a JSON object (got {type(obj).__name__})"
    for key in ("src", "tgt"):
        if key not in obj:
            return f"missing {key!r}"
        problem = _check_text(obj[key])
        if problem:
            return f"{key!r} {problem}"
    src, tgt = obj["src"], obj["tgt"]
    if isinstance(src, list) or isinstance(tgt, list):
        turns_src = len(src) if isinstance(src, list) else 1
        turns_tgt = len(tgt) if isinstance(tgt, list) else 1
        if turns_src != turns_tgt:
            return f"'src' has {turns_src} turn(s) but 'tgt' has {turns_tgt}"
    return {"src": src, "tgt": tgt}


def _check_text(value: object) -> str | None:
    if isinstance(value, str):
        return None if value.strip() else "is empty"
    if isinstance(value, list):
        if not value:
            return "is an empty list"
        for i, item in enumerate(value):
            if not isinstance(item, str):
                return f"item {i} is {type(item).__name__}, not a string"
            if not item.strip():
                return f"item {i} is empty"
        return None
    return f"must be a string or a list of strings, got {type(value).__name__}"


def _describe(path: Path, problems: list[tuple[int, str]], verb: str = "bad") -> str:
    shown = [f"  line {n}: {reason}" for n, reason in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        shown.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return f"{path}: {len(problems)} {verb} line(s):\n" + "\n".join(shown)
