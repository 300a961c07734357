"""llamapipe compare over fake finished runs (real-shaped files, no Paddle): best marks, config
differences, TSV, sample alignment, the HTML page, and refusals of missing or unfinished runs."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from llamapipe.core.errors import PipelineError
from llamapipe.stages import compare

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "llamapipe", "compare"]
# Snakemake's benchmark TSV header (snakemake.benchmark.BenchmarkRecord.get_header)
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"

CONFIG = {"target": "cpu", "seed": 42,
          "sft": {"lora": False, "lora_rank": 8, "learning_rate": 0.003, "max_steps": 4},
          "predict": {"batch_size": 8, "limit": None}}
PROMPTS = [f"类型#裙*颜色#<色{i}>&" for i in range(12)]  # <, > and & must come out escaped

# rouge-2 and rouge-l have ties, samples is the same everywhere (never ranked)
METRICS = {
    "results": {"bleu-4": 10.5, "rouge-1": 30.1, "rouge-2": 9.0, "rouge-l": 25.0, "samples": 12,
                "empty_predictions": 1},
    "lora": {"bleu-4": 12.25, "rouge-1": 29.0, "rouge-2": 9.0, "rouge-l": 24.0, "samples": 12,
             "empty_predictions": 0},
    "fast": {"bleu-4": 8.0, "rouge-1": 31.5, "rouge-2": 7.5, "rouge-l": 25.0, "samples": 12,
             "empty_predictions": 2},
}
SECONDS = {"results": {"preflight": 1.25, "sft": 80.5, "predict": 12.0}, "lora": {"sft": 60.75, "predict": 11.5},
           "fast": {"sft": 40.0, "predict": 12.5}}


def _bench_line(s: float) -> str:
    return f"{s:.4f}\t0:00:{int(s):02d}\t350.12\t1200.40\t340.00\t342.10\t0.50\t10.20\t95.31\t{s * 0.9:.2f}"


def make_run(results: Path, name: str, config: dict, prompts: list[str], json_lines: bool = False) -> Path:
    """A finished run's files as the stages write them."""
    (results / "sft").mkdir(parents=True)
    (results / "benchmarks").mkdir()
    (results / "metrics.json").write_text(json.dumps(METRICS[name], indent=2))
    preds = [{"src": src, "tgt": f"ref of {src}", "prediction": f"{name} says {src}"} for src in prompts]
    if json_lines:
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
    else:  # what predict writes (core.atomic.write_json)
        text = json.dumps(preds, ensure_ascii=False, indent=2)
    (results / "predictions.json").write_text(text, encoding="utf-8")
    (results / "provenance.json").write_text(json.dumps({"created": "x", "config": config}))
    start = METRICS[name]["bleu-4"]  # a curve of its own per run
    log = [{"step": s, "loss": start / s, "learning_rate": 0.003, "epoch": s / 4} for s in range(1, 5)]
    log.append({"step": 4, "train_runtime": 3.2})  # the Trainer's last entry has no loss
    (results / "sft/train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    for rule, s in SECONDS[name].items():
        (results / "benchmarks" / f"{rule}.tsv").write_text(f"{BENCH_HEADER}\n{_bench_line(s)}\n")
    return results


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    """The plain run and two variants: lora (sft.lora) and fast (sft.learning_rate, plus a key the
    others lack); fast misses prompt 1 and has one of its own, lora lists them in another order."""
    lora = json.loads(json.dumps(CONFIG))
    lora["sft"]["lora"] = True
    fast = json.loads(json.dumps(CONFIG))
    fast["sft"].update(learning_rate=0.01, warmup_steps=50)
    return [
        make_run(tmp_path / "results", "results", CONFIG, PROMPTS),
        make_run(tmp_path / "results/variants/lora", "lora", lora, PROMPTS[::-1]),
        make_run(tmp_path / "results/variants/fast", "fast", fast, [p for p in PROMPTS if p != PROMPTS[1]] + ["其他"],
                 json_lines=True),
    ]


def _load(dirs: list[Path]) -> list[compare.Run]:
    return compare.load_runs([str(d) for d in dirs], ["results", "lora", "fast"])


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_default_labels(runs):
    # the plain run keeps the path as given, a variant is its name
    assert [r.label for r in compare.load_runs([str(d) for d in runs])] == [str(runs[0]), "lora", "fast"]
    assert compare.default_label("results/variants/lr-high") == "lr-high"
    assert compare.default_label("/x/results/variants/lr-high/") == "lr-high"
    assert compare.default_label("results") == "results"
    assert compare.default_label("../other/results") == "../other/results"


def test_best_is_marked_per_column_in_its_direction(runs):
    table = compare.comparison(_load(runs))
    assert table.best == {
        "bleu-4": ["lora"],  # higher is better
        "rouge-1": ["fast"],
        "rouge-2": ["results", "lora"],  # a tie marks both
        "rouge-l": ["results", "fast"],
        "empty_predictions": ["lora"],  # lower is better
    }  # samples: not ranked
    shown = compare.metrics_display(table)
    marked = {(run, m) for run in shown.index for m in shown.columns if shown.loc[run, m].endswith("★")}
    assert marked == {(run, m) for m, labels in table.best.items() for run in labels}
    assert shown.loc["lora", "bleu-4"] == "12.25 ★" and shown.loc["results", "samples"] == "12"


def test_only_the_differing_config_keys_are_shown(runs):
    table = compare.comparison(_load(runs))
    assert list(table.config.columns) == ["results", "lora", "fast"]
    assert table.config.to_dict("index") == {
        "sft.lora": {"results": "false", "lora": "true", "fast": "false"},
        "sft.learning_rate": {"results": "0.003", "lora": "0.003", "fast": "0.01"},
        "sft.warmup_steps": {"results": None, "lora": None, "fast": "50"},  # absent in two runs: differs
    }
    same = compare.comparison(compare.load_runs([str(runs[0]), str(runs[0])], ["a", "b"]))
    assert same.config.empty and same.best == {}  # identical runs: nothing differs, nothing is best


def test_tsv_has_each_runs_metrics_config_and_stage_seconds(runs, tmp_path):
    loaded = _load(runs)
    compare.write_page(loaded, None, tmp_path / "out/comparison.tsv")
    with open(tmp_path / "out/comparison.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    metric_names = list(METRICS["results"])
    assert list(rows[0]) == ["run", "results_dir", *metric_names, "config.sft.lora", "config.sft.learning_rate",
                             "config.sft.warmup_steps", "seconds.predict", "seconds.preflight", "seconds.sft"]
    assert [r["run"] for r in rows] == ["results", "lora", "fast"]
    assert [r["results_dir"] for r in rows] == [str(d) for d in runs]
    for row, d in zip(rows, runs):
        on_disk = json.loads((d / "metrics.json").read_text())
        assert {k: json.loads(row[k]) for k in metric_names} == on_disk  # same numbers, same types (12, not 12.0)
        assert {k: float(row[f"seconds.{k}"]) for k in SECONDS[row["run"]]} == SECONDS[row["run"]]
    assert rows[1]["seconds.preflight"] == ""  # a variant shares the plain run's preflight: no time of its own
    assert [r["config.sft.lora"] for r in rows] == ["false", "true", "false"]
    assert [r["config.sft.warmup_steps"] for r in rows] == ["", "", "50"]


def test_sample_table_aligns_predictions_on_src(runs):
    table = compare.comparison(_load(runs))
    samples = table.samples
    assert list(samples.columns) == [compare.SRC, compare.TGT, "results", "lora", "fast"]
    expected = [p for p in PROMPTS if p != PROMPTS[1]][: compare.SAMPLES]  # in all three, the first run's order
    assert samples[compare.SRC].tolist() == expected
    assert samples[compare.TGT].tolist() == [f"ref of {p}" for p in expected]
    for label in ("results", "lora", "fast"):
        assert samples[label].tolist() == [f"{label} says {p}" for p in expected]


class _Tags(HTMLParser):
    """Every start tag, and an error for an end tag that closes something not open."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.starts: list[tuple[str, dict]] = []
        self.cells: dict[str, str] = {}  # td id -> its text
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "td" and dict(attrs).get("id"):
            self._cell = dict(attrs)["id"]
            self.cells[self._cell] = ""

    def handle_data(self, data):
        if self._cell:
            self.cells[self._cell] += data

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()
        self._cell = None


def test_page_is_one_html_file_with_the_plot_and_escaped_tables(runs, tmp_path):
    loaded = _load(runs)
    out = compare.write_page(loaded, tmp_path / "c.html", tmp_path / "c.tsv", loss_png_path=tmp_path / "loss.png")
    assert out["html"] == str(tmp_path / "c.html") and out["loss_png"] == str(tmp_path / "loss.png")
    page = (tmp_path / "c.html").read_text(encoding="utf-8")
    parser = _Tags()
    parser.feed(page)
    parser.close()
    assert parser.open == []  # every element closed, in order
    (img,) = [attrs for tag, attrs in parser.starts if tag == "img"]
    assert '<img src="data:image/png;base64,' in page
    png = base64.b64decode(img["src"].split(",", 1)[1])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == (tmp_path / "loss.png").read_bytes()
    assert not [attrs for tag, attrs in parser.starts if tag in ("script", "link")]  # nothing fetched
    assert "<色" not in page and "&lt;色0&gt;&amp;" in page  # prompts are escaped, not rendered

    tables = pd.read_html(io.StringIO(page))
    runs_table, metrics, seconds, config, samples = tables
    assert metrics.iloc[:, 0].tolist()[-3:] == ["results", "lora", "fast"]
    assert "12.25 ★" in metrics.to_string() and "higher for bleu-4" in page and "lower for empty_predictions" in page
    # the cells a CSS rule makes bold are exactly the starred ones
    css = "".join(re.findall(r"<style[^>]*>(.*?)</style>", page, re.S))
    bold_ids = [i for rule in re.findall(r"([^{}]*)\{\s*font-weight: bold;", css) for i in re.findall(r"#(\w+)", rule)]
    starred = [text for text in parser.cells.values() if text.endswith("★")]
    assert sorted(parser.cells[i] for i in bold_ids) == sorted(starred) and len(starred) == 7
    assert "sft.learning_rate" in config.to_string() and "sft.max_steps" not in config.to_string()
    assert len(samples) == compare.SAMPLES and "fast says 类型#裙*颜色#<色0>&" in samples.to_string()
    assert "80.5" in seconds.to_string()


def test_cli_prints_metrics_and_config_and_writes_page_and_tsv(runs, tmp_path):
    proc = _cli(*runs, "--labels", "base, lora ,fast", "--html", tmp_path / "p/c.html", "--tsv", tmp_path / "p/c.tsv")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^lora\s+12\.25 ★", out, re.M) and re.search(r"^base\s+10\.5 ", out, re.M)
    assert re.search(r"^sft\.learning_rate\s+0\.003\s+0\.003\s+0\.01$", out, re.M)
    assert "sft.max_steps" not in out
    assert (tmp_path / "p/c.html").is_file() and (tmp_path / "p/c.tsv").is_file()
    assert [p.name for p in (tmp_path / "p").iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_cli_compares_a_single_run(runs):
    proc = _cli(runs[0])
    assert proc.returncode == 0, proc.stderr
    assert "bleu-4" in proc.stdout and "★" not in proc.stdout.split("★ bold")[0]  # nothing to be best against


@pytest.mark.parametrize("broken", ["missing", "unfinished"])
def test_cli_refuses_a_missing_or_unfinished_dir_and_names_it(runs, tmp_path, broken):
    bad = tmp_path / "results/variants/bad"
    if broken == "unfinished":  # predict ran, evaluate did not
        bad.mkdir(parents=True)
        (bad / "predictions.json").write_text("[]")
    proc = _cli(runs[0], bad)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr
    assert ("no such directory" if broken == "missing" else "no metrics.json") in proc.stderr
    assert proc.stdout == ""


def test_every_problem_of_every_dir_in_one_error(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError) as exc:
        compare.load_runs([str(runs[0]), str(tmp_path / "gone"), str(empty)])
    message = str(exc.value)
    assert f"{tmp_path / 'gone'}: no such directory" in message
    assert f"{empty}: no metrics.json" in message and f"{empty}: no predictions.json" in message
    with pytest.raises(PipelineError, match="no predictions.json"):
        compare.load_run("e", str(empty))


def test_duplicate_labels_are_refused(runs, tmp_path):
    with pytest.raises(PipelineError, match="unique.*: x"):
        compare.load_runs([str(runs[0]), str(runs[1])], ["x", "x"])
    with pytest.raises(PipelineError, match="2 labels"):
        compare.load_runs([str(d) for d in runs], ["a", "b"])
    other = make_run(tmp_path / "elsewhere/variants/lora", "lora", CONFIG, PROMPTS)
    with pytest.raises(PipelineError, match="unique.*: lora"):  # two variants of one name in two projects
        compare.load_runs([str(runs[1]), str(other)])
    with pytest.raises(PipelineError, match="unique"):
        compare.comparison([compare.load_run("r", str(runs[0])), compare.load_run("r", str(runs[1]))])
    proc = _cli(runs[0], runs[1], "--labels", "a,a")
    assert proc.returncode == 2 and "given more than once: a" in proc.stderr
