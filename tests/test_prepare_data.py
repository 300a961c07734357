from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llamapipe.core.errors import PipelineError
from llamapipe.stages import prepare_data


def line(src="类型#裙*颜色#蓝色", tgt="这条裙子蓝色清爽。", **extra) -> bytes:
    return (json.dumps({"src": src, "tgt": tgt, **extra}, ensure_ascii=False) + "\n").encode()


def make_src(tmp_path: Path, train: bytes, dev: bytes | None = None) -> Path:
    src = tmp_path / "AdvertiseGen"
    src.mkdir(parents=True)
    (src / "train.json").write_bytes(train)
    (src / "dev.json").write_bytes(dev if dev is not None else line() * 2)
    return src


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_good_files(tmp_path):
    multi = line(src=["你好", "颜色呢"], tgt=["您好", "蓝色"])
    src = make_src(tmp_path, line() + line(tgt="第二条。", context={"x": 1}) + multi)
    out = tmp_path / "results" / "data"
    report = prepare_data.run(str(src), str(out))
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", "report.json", "train.json"]
    train = read_jsonl(out / "train.json")
    assert train[1] == {"src": "类型#裙*颜色#蓝色", "tgt": "第二条。"}  # extra keys dropped
    assert train[2] == {"src": ["你好", "颜色呢"], "tgt": ["您好", "蓝色"]}  # lists stay lists
    assert "类型" in (out / "train.json").read_text(encoding="utf-8")  # not \\u-escaped
    assert report["splits"]["train"] == json.loads((out / "report.json").read_text())["splits"]["train"]
    assert report["splits"]["train"]["lines_read"] == 3 and report["splits"]["train"]["written"] == 3
    assert report["splits"]["dev"]["written"] == 2


BAD_LINES = {
    "not_json": (b'{"src": "a", "tgt": \n', "not valid JSON"),
    "missing_src": (b'{"tgt": "t"}\n', "missing 'src'"),
    "missing_tgt": (b'{"src": "s"}\n', "missing 'tgt'"),
    "not_utf8": ('{"src": "类型", "tgt": "好"}\n'.encode("gbk"), "not valid UTF-8"),
    "empty": (b"\n", "empty line"),
    "blank": (b"   \t\r\n", "empty line"),
    "int_tgt": (b'{"src": "s", "tgt": 3}\n', "'tgt' must be a string or a list of strings, got int"),
    "list_of_int": (b'{"src": ["s"], "tgt": [1]}\n', "'tgt' item 0 is int"),
    "empty_src": (b'{"src": " ", "tgt": "t"}\n', "'src' is empty"),
    "empty_list": (b'{"src": [], "tgt": []}\n', "'src' is an empty list"),
    "not_object": (b'["s", "t"]\n', "not a JSON object (got list)"),
    "turns_differ": (b'{"src": ["a", "b"], "tgt": ["c"]}\n', "2 turn(s) but 'tgt' has 1"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_line_named_in_fail_mode(tmp_path, kind):
    bad, reason = BAD_LINES[kind]
    src = make_src(tmp_path, line() + line() + bad + line())
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as e:
        prepare_data.run(str(src), str(out))
    msg = str(e.value)
    assert "train.json" in msg and "line 3:" in msg and reason in msg, msg
    assert "line 1:" not in msg and "line 4:" not in msg
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # nothing written, no temp dir


def test_fail_mode_lists_all_problems_of_both_files_capped(tmp_path):
    src = make_src(tmp_path, line() + b"x\n" * 30, dev=line() + b"{}\n")
    with pytest.raises(PipelineError) as e:
        prepare_data.run(str(src), str(tmp_path / "out"))
    msg = str(e.value)
    assert "30 bad line(s)" in msg and "line 2:" in msg and "line 21:" in msg and "line 22:" not in msg
    assert "and 10 more" in msg
    assert "dev.json: 1 bad line(s)" in msg and "missing 'src'" in msg


def test_skip_mode_counts_and_reports(tmp_path, caplog):
    src = make_src(tmp_path, line() + b"\n" + b"nope\n" + line(tgt="好。") + b'{"src": "s"}\n')
    out = tmp_path / "out"
    caplog.set_level("WARNING", logger="llamapipe.prepare_data")
    report = prepare_data.run(str(src), str(out), on_error="skip")
    train = report["splits"]["train"]
    assert (train["lines_read"], train["valid"], train["written"], train["skipped"]) == (5, 2, 2, 3)
    assert [s["line"] for s in train["skipped_lines"]] == [2, 3, 5]
    assert train["skipped_lines"][0]["reason"] == "empty line"
    assert len(read_jsonl(out / "train.json")) == 2
    assert json.loads((out / "report.json").read_text())["splits"]["train"]["skipped"] == 3
    assert "train.json" in caplog.text and "line 3" in caplog.text


def test_zero_valid_records_is_an_error_even_when_skipping(tmp_path):
    src = make_src(tmp_path, line(), dev=b"garbage\n\n")
    with pytest.raises(PipelineError, match="dev.json: no valid records"):
        prepare_data.run(str(src), str(tmp_path / "out"), on_error="skip")
    assert not (tmp_path / "out").exists()
    empty = make_src(tmp_path / "e", b"")
    with pytest.raises(PipelineError, match="train.json: no valid records"):
        prepare_data.run(str(empty), str(tmp_path / "out"))


def test_bad_options_and_missing_files(tmp_path):
    src = make_src(tmp_path, line())
    with pytest.raises(PipelineError, match="on_error"):
        prepare_data.run(str(src), str(tmp_path / "out"), on_error="ignore")
    with pytest.raises(PipelineError, match="max_train"):
        prepare_data.run(str(src), str(tmp_path / "out"), max_train=0)
    (src / "dev.json").unlink()
    with pytest.raises(PipelineError, match="dev.json: not found"):
        prepare_data.run(str(src), str(tmp_path / "out"))


def test_max_train_and_max_dev(tmp_path):
    train = b"".join(line(tgt=f"第{i}条。") for i in range(10))
    src = make_src(tmp_path, b"bad\n" + train, dev=line() * 5)
    out = tmp_path / "out"
    report = prepare_data.run(str(src), str(out), on_error="skip", max_train=3, max_dev=10)
    assert [r["tgt"] for r in read_jsonl(out / "train.json")] == ["第0条。", "第1条。", "第2条。"]
    assert len(read_jsonl(out / "dev.json")) == 5
    assert (report["splits"]["train"]["valid"], report["splits"]["train"]["written"]) == (10, 3)


def test_bom_and_crlf_accepted(tmp_path):
    src = make_src(tmp_path, b"\xef\xbb\xbf" + line().replace(b"\n", b"\r\n") + line())
    report = prepare_data.run(str(src), str(tmp_path / "out"))
    assert report["splits"]["train"]["written"] == 2


def test_rerun_replaces_previous_output(tmp_path):
    src = make_src(tmp_path, line() * 4)
    out = tmp_path / "out"
    prepare_data.run(str(src), str(out))
    (out / "stale.txt").write_text("old")
    prepare_data.run(str(src), str(out), max_train=1)
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", "report.json", "train.json"]
    assert len(read_jsonl(out / "train.json")) == 1


def test_full_size_is_fast(tmp_path):
    # ADGEN's size: 114k train records must take well under the 30 s budget.
    rec = line(src="类型#裙*颜色#蓝色*风格#清新*图案#蝴蝶结",
               tgt="这条裙子选用清爽的蓝色，清新的风格搭配蝴蝶结元素，俏皮又减龄，让你轻松穿出好气色。")
    src = make_src(tmp_path, rec * 114_000, dev=rec * 1_000)
    started = time.perf_counter()
    report = prepare_data.run(str(src), str(tmp_path / "out"))
    assert report["splits"]["train"]["written"] == 114_000
    assert time.perf_counter() - started < 10
