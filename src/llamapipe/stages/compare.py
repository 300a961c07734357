"""compare: several finished runs side by side, as one HTML page, a TSV and a text summary.

A run is a results directory: ``results`` for the plain run, ``results/variants/<name>`` for a
variant. Its metrics.json and predictions.json must be there (a run without them has not
finished); provenance.json (the resolved config), sft/train_log.jsonl (loss per step) and
benchmarks/*.tsv (Snakemake's time per rule) are shown when present.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from llamapipe.core.atomic import atomic_path
from llamapipe.core.errors import PipelineError
from llamapipe.stages.report import _pyplot, read_jsonl, stage_seconds

# Which way is better for each key evaluate.py writes. BLEU-4 and ROUGE-1/2/L measure overlap
# with the reference (x100): higher is better. empty_predictions counts predictions with no text,
# each of which scores 0: lower is better. samples is how many dev records were scored; runs that
# differ there were scored on different sets, which is neither better nor worse, so it (like any
# key not listed) is never marked.
HIGHER_IS_BETTER = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
LOWER_IS_BETTER = ("empty_predictions",)
BEST_NOTE = ("★ bold: the best value of its column among these runs, higher for " + ", ".join(HIGHER_IS_BETTER)
             + ", lower for " + ", ".join(LOWER_IS_BETTER) + "; other columns are not ranked, and a column "
             "where every run has the same value marks none (ties mark every tied run)")
SAMPLES = 8  # dev prompts in the sample table
ABSENT = "(not set)"  # a config key the run's config does not have
NO_VALUE = "—"  # a metric or stage time the run does not have

SRC, TGT = "prompt (src)", "reference (tgt)"


@dataclass
class Run:
    """One results directory, read."""

    label: str
    results_dir: str
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    config: dict[str, Any] | None  # flattened (dotted keys); None: no provenance.json
    losses: list[tuple[float, float]] = field(default_factory=list)  # (step, train loss)
    seconds: dict[str, float] = field(default_factory=dict)  # benchmark name (the rule) -> wall seconds


@dataclass
class Comparison:
    """The tables of a comparison, rows or columns in the order the runs were given."""

    metrics: pd.DataFrame  # one row per run (index: label), one column per metric, values as in metrics.json
    best: dict[str, list[str]]  # metric -> labels of the runs with its best value (ranked metrics only)
    seconds: pd.DataFrame  # one row per run, one column per benchmark (stage)
    config: pd.DataFrame  # one row per differing key, one column per run that has a config; text, None: not set
    no_config: list[str]  # labels of runs without provenance.json (left out of the config table)
    samples: pd.DataFrame  # SRC, TGT, then one prediction column per run


def default_label(results_dir: str) -> str:
    """``<name>`` for ``.../variants/<name>``, else the directory as given."""
    path = Path(results_dir)
    return path.name if path.parent.name == "variants" and path.name else results_dir


def load_run(label: str, results_dir: str) -> Run:
    """The run in ``results_dir``; a missing directory or a missing or unreadable file raises
    PipelineError naming them all."""
    run, problems = _read(label, results_dir)
    if problems:
        raise PipelineError(_problem_text(problems))
    return run


def load_runs(results_dirs: list[str], labels: list[str] | None = None) -> list[Run]:
    """Every run, labelled ``labels`` or by ``default_label``; one PipelineError lists the problems of
    every directory."""
    if labels is None:
        labels = [default_label(d) for d in results_dirs]
    elif len(labels) != len(results_dirs):
        raise PipelineError(f"{len(labels)} labels ({', '.join(labels)}) for {len(results_dirs)} results dirs: "
                            f"give one label per directory")
    check_labels(labels)
    runs, problems = [], []
    for label, results_dir in zip(labels, results_dirs):
        run, found = _read(label, results_dir)
        runs.append(run)
        problems += found
    if problems:
        raise PipelineError(_problem_text(problems))
    return runs


def check_labels(labels: list[str]) -> None:
    """Labels name table rows and columns: each must be non-empty and unique."""
    if any(not label.strip() for label in labels):
        raise PipelineError(f"an empty run label in {labels}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise PipelineError(f"run labels must be unique; given more than once: {', '.join(repeated)} "
                            f"(name the runs with --labels)")


def _problem_text(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"cannot compare: {problems[0]}"
    return "cannot compare:\n" + "\n".join(f"  {p}" for p in problems)


def _read(label: str, results_dir: str) -> tuple[Run | None, list[str]]:
    """The run, or None and what is wrong (every problem of this directory)."""
    root = Path(results_dir)
    if not root.is_dir():
        return None, [f"{results_dir}: {'not a directory' if root.exists() else 'no such directory'}"]
    problems: list[str] = []

    def load(name: str, parse: Callable[[Path], Any], required_by: str | None = None) -> Any:
        path = root / name
        if not path.is_file():
            if required_by:
                problems.append(f"{results_dir}: no {name} (the run has not finished: {required_by} writes it)")
            return None
        try:
            return parse(path)
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
            problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
            return None

    metrics = load("metrics.json", _metrics, "evaluate")
    predictions = load("predictions.json", _predictions, "predict")
    config = load("provenance.json", _config)
    log = load("sft/train_log.jsonl", read_jsonl) or []
    seconds = {}
    for bench in sorted((root / "benchmarks").glob("*.tsv")):
        seconds.update(load(str(bench.relative_to(root)), lambda p: stage_seconds([str(p)])) or {})
    if problems:
        return None, problems
    losses = [(e["step"], e["loss"]) for e in log if "loss" in e and "step" in e]
    return Run(label, str(results_dir), metrics, predictions, config, losses, seconds), []


def _metrics(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _predictions(path: Path) -> list[dict[str, Any]]:
    """predict (and collect-predictions) write one JSON list; JSON lines are read too."""
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(records, list) or not all(isinstance(r, dict) and "src" in r for r in records):
        raise ValueError('not a list of {"src", "tgt", "prediction"} records')
    return records


def _config(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text(encoding="utf-8"))["config"]
    # dotted keys (sft.learning_rate): what a --config override or a variant names
    return pd.json_normalize([config], sep=".").to_dict("records")[0]


def comparison(runs: list[Run]) -> Comparison:
    if not runs:
        raise PipelineError("nothing to compare: no results dir given")
    labels = [r.label for r in runs]
    check_labels(labels)
    metric_names = _union(r.metrics for r in runs)
    metrics = pd.DataFrame([[r.metrics.get(m) for m in metric_names] for r in runs], index=pd.Index(labels, name="run"),
                           columns=metric_names, dtype=object)  # object: 60 stays 60, not 60.0
    seconds = pd.DataFrame([r.seconds for r in runs], index=pd.Index(labels, name="run"),
                           columns=_union(r.seconds for r in runs), dtype=float)
    with_config = [r for r in runs if r.config is not None]
    return Comparison(metrics=metrics, best=best_runs(runs), seconds=seconds, config=_config_diff(with_config),
                      no_config=[r.label for r in runs if r.config is None], samples=_samples(runs))


def _union(dicts: Any) -> list[str]:
    """Every key, in the order first seen (the order evaluate and the config give them)."""
    return list(dict.fromkeys(k for d in dicts for k in d))


def best_runs(runs: list[Run]) -> dict[str, list[str]]:
    """For each ranked metric, the labels of the runs with the best value; none when fewer than two
    values differ (nothing to choose between)."""
    best = {}
    for metric in _union(r.metrics for r in runs):
        if metric not in HIGHER_IS_BETTER + LOWER_IS_BETTER:
            continue
        values = {r.label: r.metrics[metric] for r in runs if _is_number(r.metrics.get(metric))}
        if len(set(values.values())) < 2:
            continue
        target = (max if metric in HIGHER_IS_BETTER else min)(values.values())
        best[metric] = [label for label, v in values.items() if v == target]
    return best


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _config_diff(runs: list[Run]) -> pd.DataFrame:
    """The flattened config keys whose values are not the same in every run (absent in one counts)."""
    rows = {}
    for key in _union(r.config for r in runs):
        seen = {json.dumps(r.config[key], sort_keys=True) if key in r.config else None for r in runs}
        if len(seen) > 1:
            rows[key] = [_config_text(r.config[key]) if key in r.config else None for r in runs]
    return pd.DataFrame.from_dict(rows, orient="index", columns=[r.label for r in runs]).rename_axis("key")


def _config_text(value: Any) -> str:
    """A config value as its YAML/JSON spelling (true, null, [1, 2]); strings as they are."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _text(value: Any) -> str:
    """src / tgt may be a list of turns: one per line."""
    return "\n".join(value) if isinstance(value, list) else ("" if value is None else str(value))


def _samples(runs: list[Run], n: int = SAMPLES) -> pd.DataFrame:
    """The first ``n`` dev prompts (the first run's order) that every run predicted, joined on src."""
    by_src = []
    for r in runs:
        first: dict[str, dict] = {}
        for record in r.predictions:
            # JSON text: a src that is a list of turns can key a dict too; a repeated prompt: its first answer
            first.setdefault(json.dumps(record["src"], ensure_ascii=False), record)
        by_src.append(first)
    rows = []
    for key, record in by_src[0].items():
        if len(rows) == n:
            break
        if all(key in seen for seen in by_src):
            rows.append([_text(record["src"]), _text(record.get("tgt")),
                         *(_text(seen[key].get("prediction")) for seen in by_src)])
    return pd.DataFrame(rows, columns=[SRC, TGT, *(r.label for r in runs)])


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return NO_VALUE
    return str(value)


def metrics_display(table: Comparison, mark: str = " ★") -> pd.DataFrame:
    """The metrics as text, ``mark`` after each best value."""
    shown = table.metrics.map(_number)
    for metric, labels in table.best.items():
        for label in labels:
            shown.loc[label, metric] += mark
    return shown


def summary_text(table: Comparison) -> str:
    """What the CLI prints: the metrics (best marked) and the config keys that differ."""
    parts = ["metrics:", metrics_display(table).to_string(), BEST_NOTE, ""]
    if table.config.empty:
        parts.append("config: no key differs between the runs" + (" with a provenance.json" if table.no_config else ""))
    else:
        parts += ["config keys that differ:", table.config.fillna(ABSENT).to_string()]
    if table.no_config:
        parts.append(f"no provenance.json (config unknown): {', '.join(table.no_config)}")
    return "\n".join(parts)


def tsv_frame(runs: list[Run], table: Comparison | None = None) -> pd.DataFrame:
    """One row per run: run, results_dir, every metric, config.<key> per differing key,
    seconds.<stage> per stage."""
    table = table or comparison(runs)
    frame = pd.DataFrame({"run": [r.label for r in runs], "results_dir": [r.results_dir for r in runs]})
    metrics = table.metrics.reset_index(drop=True)
    config = table.config.T.reindex([r.label for r in runs]).add_prefix("config.").reset_index(drop=True)
    seconds = table.seconds.add_prefix("seconds.").reset_index(drop=True)
    return pd.concat([frame, metrics, config, seconds], axis=1)


def loss_png(runs: list[Run]) -> bytes | None:
    """Every run's training loss on one plot (PNG bytes); None when no run has a train log."""
    curves = [r for r in runs if r.losses]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    colors = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for i, r in enumerate(curves):
        steps, losses = zip(*r.losses)
        ax.plot(steps, losses, label=r.label, color=colors(i % colors.N), linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    ax.set_title("SFT training loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_page(runs: list[Run], html_path: str | None, tsv_path: str | None,
               loss_png_path: str | None = None) -> dict[str, Any]:
    """The comparison page (self-contained HTML), the TSV and the loss plot PNG; each only when
    given a path, each written atomically."""
    table = comparison(runs)
    written: dict[str, Any] = {"runs": len(runs), "differing_config_keys": len(table.config)}
    if tsv_path:
        with atomic_path(tsv_path, suffix=".tsv") as tmp:
            tsv_frame(runs, table).to_csv(tmp, sep="\t", index=False, na_rep="")
        written["tsv"] = str(tsv_path)
    png = loss_png(runs) if html_path or loss_png_path else None
    if loss_png_path and png:
        with atomic_path(loss_png_path, suffix=".png") as tmp:
            tmp.write_bytes(png)
        written["loss_png"] = str(loss_png_path)
    if html_path:
        with atomic_path(html_path, suffix=".html") as tmp:
            tmp.write_text(page_html(runs, table, png), encoding="utf-8")
        written["html"] = str(html_path)
    return written


def _table_html(frame: pd.DataFrame, bold: pd.DataFrame | None = None, index: bool = True) -> str:
    """``frame`` (text cells) as an HTML table, every cell and header escaped; ``bold``: where to
    embolden (a frame of booleans shaped like ``frame``). The index, if shown, is the first column
    (a named index would get a header row of its own)."""
    if index:
        frame = frame.reset_index()
        if bold is not None:
            bold = bold.reset_index(drop=True).reindex(columns=frame.columns, fill_value=False)
    styler = (frame.style.format(escape="html").format_index(escape="html", axis=1).hide(axis="index")
              .set_table_attributes('class="llamapipe-table"'))
    if bold is not None:
        styler = styler.apply(lambda _: bold.replace({True: "font-weight: bold", False: ""}), axis=None)
    return styler.to_html()


def page_html(runs: list[Run], table: Comparison, png: bytes | None) -> str:
    shown = metrics_display(table)
    bold = pd.DataFrame(False, index=shown.index, columns=shown.columns)
    for metric, labels in table.best.items():
        bold.loc[labels, metric] = True
    dirs = pd.DataFrame({"results dir": [r.results_dir for r in runs],
                         "config": ["provenance.json" if r.config is not None else "no provenance.json" for r in runs]},
                        index=pd.Index([r.label for r in runs], name="run"))
    sections = [("Runs", _table_html(dirs)),
                ("Metrics", _table_html(shown, bold) + f"<p class='note'>{html.escape(BEST_NOTE)}</p>")]
    if png:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        sections.append(("Training loss", f'<img src="{uri}" alt="training loss of every run">'))
    else:
        sections.append(("Training loss", "<p>no run has an sft/train_log.jsonl</p>"))
    if table.seconds.empty:
        sections.append(("Time per stage (s)", "<p>no run has benchmarks/*.tsv</p>"))
    else:
        by_stage = table.seconds.T.map(_seconds).rename_axis(index="stage", columns=None)
        sections.append(("Time per stage (s)", _table_html(by_stage)))
    if table.config.empty:
        config = "<p>no config key differs between the runs</p>"
    else:
        config = _table_html(table.config.fillna(ABSENT))
    if table.no_config:
        config += f"<p class='note'>no provenance.json, config unknown: {html.escape(', '.join(table.no_config))}</p>"
    sections.append(("Config keys that differ", config))
    samples = (_table_html(table.samples, index=False) if not table.samples.empty
               else "<p>no dev prompt is in every run's predictions</p>")
    sections.append((f"Predictions on the same dev prompts (first {SAMPLES} in every run)", samples))
    title = f"Comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}: " + ", ".join(r.label for r in runs)
    body = "".join(f"<h2>{html.escape(name)}</h2>{content}" for name, content in sections)
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:1em 2em} table{border-collapse:collapse} "
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;white-space:pre-wrap} "
            ".note{color:#555;font-size:90%} img{max-width:100%}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _seconds(value: float) -> str:
    return NO_VALUE if value != value else f"{value:.1f}"
