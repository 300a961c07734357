from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

import pytest

from http_fixtures import ServerScript, serve
from llamapipe.core.errors import PipelineError
from llamapipe.stages import download

GOOD_FILES = {
    "train.json": '{"src": "类型#裙*颜色#蓝色", "tgt": "这条裙子蓝色清爽。"}\n'.encode(),
    "dev.json": '{"src": "类型#裤*颜色#黑色", "tgt": "这条裤子黑色显瘦。"}\n'.encode(),
}


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_SECONDS", 0.0)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def good_members(prefix: str = "AdvertiseGen/") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    if prefix:
        d = tarfile.TarInfo(prefix.rstrip("/"))
        d.type = tarfile.DIRTYPE
        out.append((d, None))
    out += [(tarfile.TarInfo(prefix + name), data) for name, data in GOOD_FILES.items()]
    return out


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def write_archive(tmp_path: Path, data: bytes, name: str = "data.tar.gz") -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_file(tmp_path: Path, data: bytes, sha256: str | None = None) -> dict:
    path = write_archive(tmp_path, data)
    return download.run(path.as_uri(), sha256 or sha(data), str(tmp_path / "data" / "AdvertiseGen"),
                        str(tmp_path / "cache"))


# --- checksums and local urls ------------------------------------------------------------------

def test_file_url_abs_extracts_and_strips_top_dir(tmp_path):
    data = make_tar(good_members())
    summary = run_file(tmp_path, data)
    out = tmp_path / "data" / "AdvertiseGen"
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", download.RECORD, "train.json"]  # the record: ours
    assert (out / "train.json").read_bytes() == GOOD_FILES["train.json"]
    assert summary["files"] == ["dev.json", "train.json"]
    assert summary["sha256"] == sha(data) and summary["bytes"] == len(data)
    assert (tmp_path / "cache" / "data.tar.gz").read_bytes() == data
    assert sorted(os.listdir(tmp_path / "data")) == ["AdvertiseGen"]  # no temp dirs left


def test_archive_without_top_dir(tmp_path):
    run_file(tmp_path, make_tar(good_members(prefix="")))
    out = tmp_path / "data" / "AdvertiseGen"
    assert sorted(p.name for p in out.iterdir()) == ["dev.json", download.RECORD, "train.json"]


def test_archive_with_dot_slash_names(tmp_path):
    members = [(tarfile.TarInfo("./" + n), d) for n, d in GOOD_FILES.items()]
    run_file(tmp_path, make_tar(members))
    assert (tmp_path / "data" / "AdvertiseGen" / "dev.json").is_file()


def test_file_url_relative(tmp_path, monkeypatch):
    data = make_tar(good_members())
    write_archive(tmp_path, data)
    monkeypatch.chdir(tmp_path)
    download.run("file:src/data.tar.gz", sha(data).upper(), "out", "cache")
    assert (tmp_path / "out" / "train.json").is_file()


def test_file_url_record_and_log_say_which_file_was_read(tmp_path, monkeypatch, caplog):
    """The path a file: url resolved to (llamapipe.config.paths.file_url_path), in the log and in
    download.json: an absolute one as given, a relative one in the project (the current directory)."""
    caplog.set_level("INFO", logger="llamapipe.download")
    data = make_tar(good_members())
    src = write_archive(tmp_path, data)
    run_file(tmp_path, data)
    record = json.loads((tmp_path / "data" / "AdvertiseGen" / download.RECORD).read_text())
    assert (record["url"], record["path"], record["path_base"]) == (src.as_uri(), str(src), "absolute")
    assert f"{src.as_uri()} resolves to {src} (an absolute path)" in caplog.text
    monkeypatch.chdir(tmp_path)
    download.run("file:src/data.tar.gz", sha(data), "out", "cache")
    assert json.loads((tmp_path / "out" / download.RECORD).read_text())["path"] == str(src)
    assert f"file:src/data.tar.gz resolves to {src} (in the project directory {tmp_path})" in caplog.text


def test_file_url_relative_falls_back_to_the_workflow_directory(tmp_path, monkeypatch):
    """Not in the project (the current directory): the workflow's directory ($LLAMAPIPE_WORKFLOW_DIR,
    which common.smk sets to the checkout); in neither: both are named."""
    data = make_tar(good_members())
    write_archive(tmp_path / "workflow", data)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    monkeypatch.setenv("LLAMAPIPE_WORKFLOW_DIR", str(tmp_path / "workflow"))
    summary = download.run("file:src/data.tar.gz", sha(data), "out", "cache")
    assert summary["files"] == ["dev.json", "train.json"]
    record = json.loads((tmp_path / "project" / "out" / download.RECORD).read_text())
    assert (record["path"], record["path_base"]) == (str(tmp_path / "workflow" / "src" / "data.tar.gz"), "workflow")
    with pytest.raises(PipelineError) as e:
        download.run("file:src/other.tar.gz", sha(data), "out2", "cache")
    assert (f"no such file {tmp_path}/project/src/other.tar.gz, nor {tmp_path}/workflow/src/other.tar.gz"
            in str(e.value))


def test_sha_mismatch_names_both_hashes_and_leaves_nothing(tmp_path):
    data = make_tar(good_members())
    wrong = "0" * 64
    with pytest.raises(PipelineError) as e:
        run_file(tmp_path, data, sha256=wrong)
    msg = str(e.value)
    assert wrong in msg and sha(data) in msg and "file://" in msg
    assert not (tmp_path / "cache" / "data.tar.gz").exists()
    assert list((tmp_path / "cache").iterdir()) == []
    assert not (tmp_path / "data" / "AdvertiseGen").exists()
    assert (tmp_path / "src" / "data.tar.gz").exists()  # the user's own file is never removed


def test_cached_archive_is_reused(tmp_path, caplog):
    data = make_tar(good_members())
    src = write_archive(tmp_path, data)
    args = (src.as_uri(), sha(data), str(tmp_path / "out"), str(tmp_path / "cache"))
    download.run(*args)
    src.unlink()  # a second fetch would now fail
    caplog.set_level("INFO", logger="llamapipe.download")
    assert download.run(*args)["files"] == ["dev.json", "train.json"]
    assert "skipping the download" in caplog.text


def test_cache_dir_holding_the_source_file_is_never_deleted(tmp_path, monkeypatch):
    data = make_tar(good_members())
    write_archive(tmp_path, data)
    monkeypatch.chdir(tmp_path)
    download.run("file:src/data.tar.gz", sha(data), "out", "src")
    with pytest.raises(PipelineError, match="sha256 mismatch"):
        download.run("file:src/data.tar.gz", "0" * 64, "out2", "src")
    assert (tmp_path / "src" / "data.tar.gz").read_bytes() == data


def test_bad_sha_format_and_missing_file(tmp_path):
    with pytest.raises(PipelineError, match="64 hex digits"):
        download.run("file:/x.tar.gz", "abc", str(tmp_path / "o"), str(tmp_path / "c"))
    with pytest.raises(PipelineError, match="no such file"):
        download.run((tmp_path / "nope.tar.gz").as_uri(), "0" * 64, str(tmp_path / "o"), str(tmp_path / "c"))
    with pytest.raises(PipelineError, match="unsupported url scheme"):
        download.run("ftp://host/x.tar.gz", "0" * 64, str(tmp_path / "o"), str(tmp_path / "c"))


# --- http ----------------------------------------------------------------------------------------

def http_run(tmp_path: Path, script: ServerScript, sha256: str | None = None, retries: int = 5) -> dict:
    with serve(script) as base:
        return download.run(f"{base}/AdvertiseGen.tar.gz", sha256 or sha(script.body),
                            str(tmp_path / "out"), str(tmp_path / "cache"), retries=retries, read_timeout=5)


def test_http_plain(tmp_path):
    script = ServerScript(body=make_tar(good_members()))
    summary = http_run(tmp_path, script)
    assert script.requests == [None]
    assert summary["files"] == ["dev.json", "train.json"]
    assert sorted(os.listdir(tmp_path / "cache")) == ["AdvertiseGen.tar.gz"]


def resumed_from(script: ServerScript) -> int:
    """The offset of the second request's Range (the bytes that reached disk before the drop)."""
    assert len(script.requests) == 2 and script.requests[0] is None, script.requests
    m = re.fullmatch(r"bytes=(\d+)-", script.requests[1] or "")
    assert m, script.requests
    return int(m.group(1))


def padded_archive() -> bytes:
    # Bigger than a few download chunks, so some whole chunks reach disk before the drop.
    return make_tar(good_members() + [(tarfile.TarInfo("AdvertiseGen/pad.bin"), os.urandom(300_000))])


def test_http_resumes_after_drop_with_range(tmp_path):
    body = padded_archive()
    script = ServerScript(body=body, drop_after=200_000)
    http_run(tmp_path, script)
    assert 0 < resumed_from(script) <= 200_000
    assert (tmp_path / "cache" / "AdvertiseGen.tar.gz").read_bytes() == body
    assert (tmp_path / "out" / "pad.bin").stat().st_size == 300_000


def test_http_restarts_when_server_ignores_range(tmp_path):
    body = padded_archive()
    script = ServerScript(body=body, drop_after=200_000, ignore_range=True)
    http_run(tmp_path, script)
    assert resumed_from(script) > 0  # asked to resume, got 200: started over
    assert (tmp_path / "cache" / "AdvertiseGen.tar.gz").read_bytes() == body


def test_http_complete_part_file_is_finished_not_refetched(tmp_path):
    script = ServerScript(body=make_tar(good_members()))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "AdvertiseGen.tar.gz.part").write_bytes(script.body)  # crashed before rename
    http_run(tmp_path, script)
    assert script.requests == [f"bytes={len(script.body)}-"]  # answered 416: nothing left to fetch
    assert sorted(os.listdir(tmp_path / "cache")) == ["AdvertiseGen.tar.gz"]


def test_http_retries_after_503(tmp_path):
    script = ServerScript(body=make_tar(good_members()), fail_503=1)
    http_run(tmp_path, script)
    assert script.requests == [None, None]


def test_http_gives_up_after_retries(tmp_path):
    script = ServerScript(body=make_tar(good_members()), fail_503=10)
    with pytest.raises(PipelineError, match="failed after 3 attempts.*503"):
        http_run(tmp_path, script, retries=2)
    assert len(script.requests) == 3


def test_http_404_is_not_retried(tmp_path):
    script = ServerScript(status=404)
    with pytest.raises(PipelineError, match="HTTP 404"):
        http_run(tmp_path, script, sha256="0" * 64)
    assert script.requests == [None]


def test_http_connection_refused_gives_up(tmp_path):
    with serve(ServerScript()) as base:
        pass  # the port is closed again: connection refused on every attempt
    with pytest.raises(PipelineError, match="failed after 2 attempts"):
        download.run(f"{base}/x.tar.gz", "0" * 64, str(tmp_path / "o"), str(tmp_path / "c"), retries=1)


def test_http_checksum_failure_leaves_no_cache_file(tmp_path):
    script = ServerScript(body=make_tar(good_members()))
    with pytest.raises(PipelineError, match="sha256 mismatch") as e:
        http_run(tmp_path, script, sha256="f" * 64)
    assert "http://127.0.0.1" in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []  # neither the final name nor a .part
    assert not (tmp_path / "out").exists()


# --- bounds and what the user sees: timeouts, retry lines, bodies without Content-Length ----------

def retry_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("attempt ")]


def test_http_stall_is_bounded_and_told(tmp_path, caplog):
    caplog.set_level("INFO", logger="llamapipe.download")
    script = ServerScript(body=make_tar(good_members()), stall_seconds=60)  # accepts, never answers
    started = time.monotonic()
    with serve(script) as base, pytest.raises(PipelineError) as e:
        download.run(f"{base}/AdvertiseGen.tar.gz", sha(script.body), str(tmp_path / "out"),
                     str(tmp_path / "cache"), retries=1, connect_timeout=2, read_timeout=0.5)
    assert time.monotonic() - started < 3  # two attempts of 0.5 s, no backoff in tests
    url = f"{base}/AdvertiseGen.tar.gz"
    assert caplog.records[0].getMessage() == f"fetching {url} (connect timeout 2 s, read timeout 0.5 s, retries 1)"
    assert retry_lines(caplog) == ["attempt 1/2 failed: no data within the 0.5 s read timeout; next attempt in 0.0 s"]
    assert str(e.value) == f"download of {url} failed after 2 attempts; the last: no data within the 0.5 s read timeout"
    assert len(script.requests) == 2


def test_http_connection_refused_reason_is_short(tmp_path, caplog):
    with serve(ServerScript()) as base:
        pass  # closed again
    with pytest.raises(PipelineError, match="the last: connection failed: Connection refused$"):
        download.run(f"{base}/x.tar.gz", "0" * 64, str(tmp_path / "o"), str(tmp_path / "c"), retries=1)
    assert retry_lines(caplog) == ["attempt 1/2 failed: connection failed: Connection refused; next attempt in 0.0 s"]


@pytest.mark.parametrize("ignore_range", [False, True], ids=["resumed", "refetched"])
def test_http_no_length_cut_short_is_a_network_fault(tmp_path, caplog, ignore_range):
    body = padded_archive()
    script = ServerScript(body=body, no_length=True, drop_after=200_000, ignore_range=ignore_range)
    http_run(tmp_path, script, retries=1)
    assert resumed_from(script) == 200_000  # the whole cut-off body was kept, then resumed (or refetched)
    assert retry_lines(caplog) == [
        "attempt 1/2 failed: body ended after 200000 bytes without Content-Length; the archive is cut short; "
        "next attempt in 0.0 s, resuming from byte 200000"]
    assert (tmp_path / "cache" / "AdvertiseGen.tar.gz").read_bytes() == body
    assert sorted(os.listdir(tmp_path / "cache")) == ["AdvertiseGen.tar.gz"]


def test_http_no_length_complete_but_wrong_sha_is_a_checksum_error(tmp_path, caplog):
    script = ServerScript(body=make_tar(good_members()), no_length=True)
    with pytest.raises(PipelineError, match="sha256 mismatch.*fix the url or the sha256"):
        http_run(tmp_path, script, sha256="f" * 64)
    assert script.requests == [None] and retry_lines(caplog) == []
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_cut_short_tells_a_cut_archive_from_a_whole_or_foreign_one(tmp_path, mode):
    data = make_tar(good_members() + [(tarfile.TarInfo("AdvertiseGen/pad.bin"), os.urandom(20_000))], mode=mode)
    path = tmp_path / "a"
    for cut, expected in [(len(data), False), (len(data) // 2, True), (2000, True)]:
        path.write_bytes(data[:cut])
        assert download._cut_short(path) is expected, (cut, len(data))
    path.write_bytes(b"<html>502 Bad Gateway</html>")  # no archive at all: a checksum error, not a retry
    assert download._cut_short(path) is False


def test_cli_passes_the_bounds_to_run(monkeypatch):
    from llamapipe import cli

    seen = {}
    monkeypatch.setattr(download, "run", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    params = {"url": "http://127.0.0.1:9/x.tar.gz", "sha256": "0" * 64, "retries": 2,
              "connect_timeout": 3, "read_timeout": 4.5}
    args = cli.build_parser().parse_args(
        ["download-data", "--params", json.dumps(params), "--out", "o", "--cache-dir", "c"])
    args.handler(args)
    assert seen["args"] == (params["url"], params["sha256"], "o", "c")
    assert seen["kwargs"] == {"retries": 2, "connect_timeout": 3, "read_timeout": 4.5}


# --- trust on first use, and md5s of the extracted files --------------------------------------------

def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def published_advertisegen_md5() -> dict[str, str]:
    """The md5s PaddleNLP's own AdvertiseGen builder publishes (the installed paddlenlp 3.0.0b4 =
    the pinned commit 4711e147a), read from its source without importing it."""
    import importlib.util

    builder = Path(importlib.util.find_spec("paddlenlp").origin).parent / "datasets" / "advertisegen.py"
    found = dict(re.findall(r'os\.path\.join\("(\w+\.json)"\),\s*"([0-9a-f]{32})"', builder.read_text()))
    assert found == {"train.json": "c0cc79f912099faa6175d28d3ddafafe", "dev.json": "5fda84828628a9722da5436485601df3"}
    return found


def test_http_unpinned_archive_is_trusted_on_first_use_and_verified_once_pinned(tmp_path, caplog):
    body = make_tar(good_members())
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    caplog.set_level("INFO", logger="llamapipe.download")
    script = ServerScript(body=body)
    with serve(script) as base:
        url = f"{base}/AdvertiseGen.tar.gz"
        first = download.run(url, None, out, cache, sha256_key="npu.data.sha256")
        assert first["sha256"] == sha(body) and first["pinned"] is False
        # the terminal line that pins it, exactly as Snakemake takes it
        assert f"--config 'npu={{data: {{sha256: {sha(body)}}}}}'" in caplog.text
        assert f'In config.yaml, in the npu: -> data: section:  sha256: "{sha(body)}"' in caplog.text
        record = json.loads((tmp_path / "out" / download.RECORD).read_text())
        assert record["sha256"] == sha(body) and record["pinned"] is False and record["url"] == url
        assert record["md5"] == {n: md5(d) for n, d in GOOD_FILES.items()}

        caplog.clear()
        pinned = download.run(url, sha(body), out, cache)  # the pin the first run printed
        assert pinned["pinned"] is True and "sha256 ok" in caplog.text and "trusted on first use" not in caplog.text
        assert json.loads((tmp_path / "out" / download.RECORD).read_text())["pinned"] is True
    assert script.requests == [None]  # the second run verified the cached archive against the pin

    other = make_tar(good_members()[:2] + [(tarfile.TarInfo("AdvertiseGen/dev.json"), b'{"src": "a", "tgt": "b"}\n')])
    os.unlink(tmp_path / "cache" / "AdvertiseGen.tar.gz")
    with serve(ServerScript(body=other)) as base:  # the archive changed upstream: the pin catches it
        with pytest.raises(PipelineError, match=f"sha256 mismatch .* expected {sha(body)}, got {sha(other)}"):
            download.run(f"{base}/AdvertiseGen.tar.gz", sha(body), out, cache)
    assert (tmp_path / "out" / "dev.json").read_bytes() == GOOD_FILES["dev.json"]  # the verified data stays


def test_unpinned_file_url_is_refused_with_its_sha256(tmp_path):
    data = make_tar(good_members())
    path = write_archive(tmp_path, data)
    with pytest.raises(PipelineError) as e:
        download.run(path.as_uri(), None, str(tmp_path / "out"), str(tmp_path / "cache"))
    msg = str(e.value)
    assert "data.sha256 is null" in msg and "local file" in msg
    assert f'its sha256 is {sha(data)}; in config.yaml, in the data: section:  sha256: "{sha(data)}"' in msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_md5_mismatch_names_each_file_and_keeps_the_previous_extraction(tmp_path):
    """The brief's fake AdvertiseGen: right names, other content, checked against the md5s PaddleNLP
    publishes for its builder's train.json/dev.json."""
    published = published_advertisegen_md5()
    body = make_tar(good_members())
    out = tmp_path / "out"
    with serve(ServerScript(body=body)) as base:
        download.run(f"{base}/AdvertiseGen.tar.gz", sha(body), str(out), str(tmp_path / "cache"))
        with pytest.raises(PipelineError) as e:
            download.run(f"{base}/AdvertiseGen.tar.gz", sha(body), str(out), str(tmp_path / "cache"), md5=published)
    msg = str(e.value)
    assert "the extracted files are not the ones data.md5 names" in msg
    assert f"train.json has md5 {md5(GOOD_FILES['train.json'])}, expected {published['train.json']}" in msg
    assert f"dev.json has md5 {md5(GOOD_FILES['dev.json'])}, expected {published['dev.json']}" in msg
    assert f"Nothing was extracted ({out} is as it was)" in msg and "set data.md5" in msg
    assert (out / "train.json").read_bytes() == GOOD_FILES["train.json"]
    assert json.loads((out / download.RECORD).read_text())["md5_expected"] is None  # still the first run's
    assert sorted(os.listdir(tmp_path)) == ["cache", "out"]  # no temp dir left beside it


def test_md5_of_the_extracted_files_match(tmp_path):
    body = make_tar(good_members())
    given = {n: md5(d).upper() for n, d in GOOD_FILES.items()}  # as md5sum prints them, or upper case
    with serve(ServerScript(body=body)) as base:
        summary = download.run(f"{base}/AdvertiseGen.tar.gz", None, str(tmp_path / "out"), str(tmp_path / "cache"),
                               md5=given)
    assert summary["md5_verified"] == ["dev.json", "train.json"]
    record = json.loads((tmp_path / "out" / download.RECORD).read_text())
    assert record["md5_expected"] == {n: v.lower() for n, v in given.items()} == record["md5"]


def test_md5_of_a_file_the_archive_lacks_or_of_a_bad_digest(tmp_path):
    body = make_tar(good_members())
    with serve(ServerScript(body=body)) as base:
        url = f"{base}/AdvertiseGen.tar.gz"
        with pytest.raises(PipelineError, match=r"test.json is not in the archive \(it holds dev.json, train.json\)"):
            download.run(url, sha(body), str(tmp_path / "out"), str(tmp_path / "cache"), md5={"test.json": "0" * 32})
        with pytest.raises(PipelineError, match="md5 of train.json must be 32 hex digits, got 'abc'"):
            download.run(url, sha(body), str(tmp_path / "out"), str(tmp_path / "cache"), md5={"train.json": "abc"})
    assert not (tmp_path / "out").exists()


def test_an_archive_member_named_like_the_record_is_refused(tmp_path):
    data = make_tar(good_members() + [(tarfile.TarInfo(f"AdvertiseGen/{download.RECORD}"), b"{}")])
    with pytest.raises(PipelineError, match=f"holds a file named {download.RECORD}"):
        run_file(tmp_path, data)
    assert not (tmp_path / "data" / "AdvertiseGen").exists()


def test_cli_passes_md5_and_the_pin_key_to_run(monkeypatch):
    from llamapipe import cli

    seen = {}
    monkeypatch.setattr(download, "run", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    params = {"url": "https://example.org/AdvertiseGen.tar.gz", "sha256": None, "retries": 2,
              "md5": {"train.json": "0" * 32}, "sha256_key": "npu.data.sha256"}
    args = cli.build_parser().parse_args(
        ["download-data", "--params", json.dumps(params), "--out", "o", "--cache-dir", "c"])
    args.handler(args)
    assert seen["args"] == (params["url"], None, "o", "c")
    assert seen["kwargs"] == {"retries": 2, "md5": {"train.json": "0" * 32}, "sha256_key": "npu.data.sha256"}


# --- tar safety ----------------------------------------------------------------------------------

def _dev(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info, _ = special(name, kind)
    info.devmajor, info.devminor = 1, 3
    return info, None


UNSAFE = {
    "absolute": ([(tarfile.TarInfo("/tmp/evil.json"), b"x")], "/tmp/evil.json", "absolute path"),
    "dotdot": ([(tarfile.TarInfo("AdvertiseGen/../../evil.json"), b"x")], "AdvertiseGen/../../evil.json", "'..'"),
    "symlink_abs": ([special("AdvertiseGen/passwd", tarfile.SYMTYPE, "/etc/passwd")], "AdvertiseGen/passwd",
                    "/etc/passwd"),
    "symlink_up": ([special("AdvertiseGen/up", tarfile.SYMTYPE, "../../x")], "AdvertiseGen/up", "outside"),
    "symlink_top_up": ([special("AdvertiseGen/up", tarfile.SYMTYPE, "../x")], "AdvertiseGen/up", "outside"),
    "symlink_chain": ([special("AdvertiseGen/d", tarfile.SYMTYPE, "."),
                       special("AdvertiseGen/s", tarfile.SYMTYPE, "d/..")], "AdvertiseGen/s", "outside"),
    "write_through_symlink": ([special("AdvertiseGen/d", tarfile.SYMTYPE, ".."),
                               (tarfile.TarInfo("AdvertiseGen/d/x.json"), b"x")], "AdvertiseGen/d", "outside"),
    "hardlink_out": ([special("AdvertiseGen/hl", tarfile.LNKTYPE, "../etc/passwd")], "AdvertiseGen/hl", "hard link"),
    "hardlink_abs": ([special("AdvertiseGen/hl", tarfile.LNKTYPE, "/etc/passwd")], "AdvertiseGen/hl", "hard link"),
    "chardev": ([_dev("AdvertiseGen/null", tarfile.CHRTYPE)], "AdvertiseGen/null", "character device"),
    "blockdev": ([_dev("AdvertiseGen/sda", tarfile.BLKTYPE)], "AdvertiseGen/sda", "block device"),
    "fifo": ([special("AdvertiseGen/pipe", tarfile.FIFOTYPE)], "AdvertiseGen/pipe", "fifo"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive_refused_whole(tmp_path, case):
    extra, member, why = UNSAFE[case]
    data = make_tar(good_members() + extra)
    with pytest.raises(PipelineError) as e:
        run_file(tmp_path, data)
    msg = str(e.value)
    assert repr(member) in msg and why in msg, msg
    assert not (tmp_path / "data" / "AdvertiseGen").exists()
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []  # no temp dir left
    assert not (tmp_path.parent / "evil.json").exists() and not Path("/tmp/evil.json").exists()


@pytest.mark.parametrize("case", ["symlink_chain", "hardlink_out", "fifo"])
def test_own_checks_work_without_stdlib_data_filter(tmp_path, monkeypatch, case):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)  # as on Python 3.9.0-3.9.16
    run_file(tmp_path / "good", make_tar(good_members()))
    assert (tmp_path / "good" / "data" / "AdvertiseGen" / "train.json").is_file()
    extra, member, _ = UNSAFE[case]
    with pytest.raises(PipelineError, match=re.escape(repr(member))):
        run_file(tmp_path, make_tar(good_members() + extra))
    assert not (tmp_path / "data" / "AdvertiseGen").exists()


def test_links_inside_are_allowed(tmp_path):
    extra = [special("AdvertiseGen/train-link.json", tarfile.SYMTYPE, "train.json"),
             special("AdvertiseGen/dev-copy.json", tarfile.LNKTYPE, "AdvertiseGen/dev.json")]
    run_file(tmp_path, make_tar(good_members() + extra))
    out = tmp_path / "data" / "AdvertiseGen"
    assert (out / "train-link.json").read_bytes() == GOOD_FILES["train.json"]
    assert (out / "dev-copy.json").read_bytes() == GOOD_FILES["dev.json"]


def test_refusal_keeps_previous_out_dir(tmp_path):
    run_file(tmp_path, make_tar(good_members()))
    bad = make_tar(good_members() + [special("AdvertiseGen/pipe", tarfile.FIFOTYPE)])
    with pytest.raises(PipelineError):
        run_file(tmp_path, bad)
    assert (tmp_path / "data" / "AdvertiseGen" / "train.json").read_bytes() == GOOD_FILES["train.json"]


@pytest.mark.parametrize("cut", [10, 300, "half"])
def test_truncated_archive_refused(tmp_path, cut):
    data = make_tar(good_members() + [(tarfile.TarInfo("AdvertiseGen/pad.bin"), os.urandom(20_000))])
    data = data[: len(data) // 2] if cut == "half" else data[:-cut]
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        run_file(tmp_path, data)  # the sha256 of the cut bytes: only the archive check can catch it
    assert not (tmp_path / "data" / "AdvertiseGen").exists()
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []


def test_not_an_archive_refused(tmp_path):
    with pytest.raises(PipelineError, match="truncated or corrupt"):
        run_file(tmp_path, b"<html>not found</html>")


def test_missing_dev_json_refused(tmp_path):
    data = make_tar([(tarfile.TarInfo("AdvertiseGen/train.json"), GOOD_FILES["train.json"])])
    with pytest.raises(PipelineError, match="no dev.json"):
        run_file(tmp_path, data)
    assert not (tmp_path / "data" / "AdvertiseGen").exists()


# --- the shipped sample ----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "AdvertiseGen-sample.tar.gz"


def test_shipped_sample_downloads_and_prepares(tmp_path, monkeypatch):
    from llamapipe.stages import prepare_data

    monkeypatch.chdir(ROOT)  # the config's form: a file: url relative to the project
    expected = hashlib.sha256(SAMPLE.read_bytes()).hexdigest()
    summary = download.run("file:assets/AdvertiseGen-sample.tar.gz", expected,
                           str(tmp_path / "data" / "AdvertiseGen"), str(tmp_path / "cache"))
    assert summary["files"] == ["dev.json", "train.json"]
    report = prepare_data.run(str(tmp_path / "data" / "AdvertiseGen"), str(tmp_path / "results" / "data"))
    assert report["splits"]["train"]["written"] == 480 and report["splits"]["train"]["skipped"] == 0
    assert report["splits"]["dev"]["written"] == 60 and report["splits"]["dev"]["skipped"] == 0
    with open(tmp_path / "results" / "data" / "train.json", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert first["src"].startswith("类型#") and 40 <= len(first["tgt"]) <= 100


def test_sample_generator_is_reproducible(tmp_path):
    import runpy

    gen = runpy.run_path(str(ROOT / "tools" / "make_sample_data.py"))
    assert gen["main"](["--out", str(tmp_path / "s.tar.gz")]) == 0
    fresh, shipped = (tmp_path / "s.tar.gz").read_bytes(), SAMPLE.read_bytes()
    # Same tar bytes and gzip header (no mtime); the deflate stream itself may differ with another
    # zlib build, so whole-file equality is only required where the archive was made.
    assert gzip.decompress(fresh) == gzip.decompress(shipped)
    assert fresh[:10] == shipped[:10] and fresh[4:8] == b"\0\0\0\0"


# --- through Snakemake: the rule's lines reach the terminal ----------------------------------------

def _overlay(project: Path, data: dict) -> str:
    import yaml

    (project / "overlay.yaml").write_text(yaml.safe_dump({"data": data}))
    return "overlay.yaml"


def test_rule_passes_the_bounds_with_schema_defaults(tmp_path):
    import yaml

    from conftest import copy_project, snakemake

    project = copy_project(tmp_path / "project")
    config = yaml.safe_load((project / "config.yaml").read_text())
    del config["data"]["connect_timeout"], config["data"]["read_timeout"]  # left to the schema's defaults
    (project / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    overlay = _overlay(project, {"url": "http://127.0.0.1:9/AdvertiseGen.tar.gz", "read_timeout": 4.5})
    out = snakemake(project, "-n", "-p", "data/AdvertiseGen/train.json", "--configfile", overlay).stdout
    assert '"connect_timeout": 10, "read_timeout": 4.5, "retries": 5' in out
    assert "2>&1 | tee results/logs/download_data.log" in out


@pytest.mark.e2e
def test_rule_shows_a_stalled_download_on_the_terminal(tmp_path):
    import subprocess
    import threading

    from conftest import SNAKEMAKE, copy_project

    project = copy_project(tmp_path / "project")
    script = ServerScript(stall_seconds=600)  # accepts the connection, never answers
    with serve(script) as base:
        url = f"{base}/AdvertiseGen.tar.gz"
        overlay = _overlay(project, {"url": url, "sha256": "0" * 64, "retries": 1, "connect_timeout": 2,
                                     "read_timeout": 1})
        started = time.monotonic()
        proc = subprocess.Popen([*SNAKEMAKE, "--cores", "1", "data/AdvertiseGen/train.json", "--configfile", overlay],
                                cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        seen: dict[str, float] = {}
        lines = []
        try:
            for line in proc.stdout:  # as Snakemake prints them: the terminal's view
                lines.append(line)
                for key, marker in (("job", "rule download_data:"), ("fetch", f"fetching {url}"),
                                    ("retry", "attempt 1/2 failed"), ("error", "Error in rule download_data")):
                    if marker in line:
                        seen.setdefault(key, time.monotonic() - started)
            proc.wait()
        finally:
            watchdog.cancel()
    output = "".join(lines)
    assert proc.returncode != 0, output  # pipefail: tee's success does not hide the stage's failure
    assert seen.keys() == {"job", "fetch", "retry", "error"}, output
    assert seen["job"] < seen["fetch"] < seen["retry"] < seen["error"]  # live, not only the log shown at the end
    assert "attempt 1/2 failed: no data within the 1 s read timeout; next attempt in 1.0 s" in output
    assert f"download of {url} failed after 2 attempts; the last: no data within the 1 s read timeout" in output
    log = (project / "results" / "logs" / "download_data.log").read_text()
    assert "attempt 1/2 failed" in log and len(log.splitlines()) < 20, log
    assert not (project / "data" / "AdvertiseGen" / "train.json").exists()
    print(f"\nfirst download line on the terminal {seen['fetch']:.2f} s after snakemake started "
          f"({seen['fetch'] - seen['job']:.2f} s after the job did); first retry line at {seen['retry']:.2f} s; "
          f"snakemake exited after {time.monotonic() - started:.2f} s")
