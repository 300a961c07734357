"""download_data: fetch the AdvertiseGen archive, verify its sha256, extract it safely.

The archive lands in ``cache_dir`` (``.part`` while incomplete, the final name only once the
sha256 matched) and is extracted into a temp dir beside ``out_dir`` that replaces ``out_dir``
only when every member passed the safety checks, ``train.json``/``dev.json`` are there and the
extracted files have the md5s the config names (if any).

An http(s) archive without a sha256 (``sha256: null``) is trusted on first use: the hash of what
arrived is printed with the exact line that pins it, and recorded with everything else the stage
verified in ``out_dir/download.json`` (read by provenance). A ``file:`` archive is on this host,
so there is no first download to trust: it must be pinned (the error names its sha256). A
relative ``file:`` path is the project directory's (the working directory) or, if not there, the
workflow's (``llamapipe.config.paths.file_url_path``): the log and the record say which file was read.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
import os
import posixpath
import shutil
import sys
import tarfile
import time
import zlib
from pathlib import Path
from urllib.parse import urlparse

from llamapipe.config.paths import LocalFile, locate_file_url
from llamapipe.core.atomic import atomic_dir, atomic_path, write_json
from llamapipe.core.errors import PipelineError
from llamapipe.core.hashing import sha256_file

log = logging.getLogger("llamapipe.download")

CHUNK = 1 << 16
BACKOFF_SECONDS = 1.0  # first retry delay, doubled each attempt; tests set it to 0
MAX_BACKOFF_SECONDS = 60.0
REQUIRED = ("train.json", "dev.json")
RECORD = "download.json"  # in out_dir: what was fetched and verified, for provenance


class _Retryable(Exception):
    """A transient HTTP failure (5xx, short body) worth another attempt."""


def run(url: str, sha256: str | None, out_dir: str, cache_dir: str, retries: int = 5,
        connect_timeout: float = 10.0, read_timeout: float = 30.0, md5: dict[str, str] | None = None,
        sha256_key: str = "data.sha256") -> dict:
    """``retries``: attempts after the first; ``read_timeout``: seconds without a byte before an
    attempt counts as stalled (http only). ``sha256``: the archive's pin; None: trust on first use
    (http(s) only). ``md5``: extracted file (relative to ``out_dir``) -> its md5. ``sha256_key``:
    the config key a pin goes to (``npu.data.sha256`` where the npu overlay sets it), for the
    messages."""
    scheme = urlparse(url).scheme.lower()
    expected = _expected_sha256(url, scheme, sha256, sha256_key)
    want_md5 = _expected_md5(md5)
    name = posixpath.basename(urlparse(url).path)
    if not name:
        raise PipelineError(f"cannot derive a file name from url {url!r}")
    cache = Path(cache_dir) / name
    if scheme not in ("file", "http", "https"):
        raise PipelineError(f"unsupported url scheme {scheme!r} in {url!r} (use http(s):// or file:)")
    local = _local_file(url) if scheme == "file" else None
    if local is not None:
        log.info("%s resolves to %s (%s)", url, local.path, local.where())

    if local is not None and cache.exists() and Path(local.path).resolve() == cache.resolve():
        _verify(cache, expected, url, remove=False)  # the cache is the user's file: check, never delete
    elif cache.is_file() and expected is None:
        log.info("using cached %s (not pinned), skipping the download", cache)
    elif cache.is_file() and sha256_file(cache) == expected:
        log.info("using cached %s (sha256 ok), skipping the download", cache)
    else:
        if cache.exists():
            log.warning("cached %s has the wrong sha256; fetching it again", cache)
            cache.unlink()
        if local is not None:
            _copy_local(local, cache, expected)
        else:
            _fetch_http(url, cache, expected, retries, (connect_timeout, read_timeout))

    actual = expected or sha256_file(cache)
    record = {"url": url, "sha256": actual, "pinned": expected is not None, "sha256_key": sha256_key,
              "bytes": cache.stat().st_size, "md5_expected": want_md5}
    if local is not None:  # the file a relative path resolved to, and from which directory
        record.update(path=local.path, path_base=local.base)
    files = extract(cache, out_dir, md5=want_md5, record=record)
    log.info("extracted %d file(s) into %s", len(files), out_dir)
    if want_md5:
        log.info("md5 ok: %s", ", ".join(sorted(want_md5)))
    if expected is None:
        log.warning("%s", pin_notice(url, actual, sha256_key))
    return {"url": url, "sha256": actual, "pinned": expected is not None, "archive": str(cache),
            "bytes": record["bytes"], "out_dir": str(out_dir), "files": files,
            "md5_verified": sorted(want_md5 or {})}


def pin_line(sha256_key: str, digest: str) -> str:
    """``--config`` for Snakemake setting the dotted ``sha256_key``: ``'npu={data: {sha256: <hex>}}'``."""
    top, *rest = sha256_key.split(".")
    value = digest
    for part in reversed(rest):
        value = f"{{{part}: {value}}}"
    return f"--config '{top}={value}'"


def pin_yaml(sha256_key: str, digest: str) -> str:
    """Where the pin goes in config.yaml: ``in the npu: -> data: section:  sha256: "<hex>"``."""
    *section, last = sha256_key.split(".")
    return f"in the {' -> '.join(f'{s}:' for s in section)} section:  {last}: \"{digest}\""


def pin_notice(url: str, digest: str, sha256_key: str) -> str:
    """What an unpinned download prints: the hash of what arrived and the exact lines that pin it.
    config.yaml first: a pin given on one run's command line and not the next changes the params."""
    return (f"{sha256_key} is null: {url} was trusted on first use; its sha256 is {digest}. Pin it now, "
            f"before training, and every later run checks these bytes. In config.yaml, {pin_yaml(sha256_key, digest)}\n"
            f"  (or on every run, in the same --config as your other values: {pin_line(sha256_key, digest)}; "
            f"adding or dropping the pin changes download_data's params, so it and every stage after it rerun)")


def _expected_sha256(url: str, scheme: str, sha256: str | None, sha256_key: str) -> str | None:
    """The lowercase pin, or None (trust on first use, http(s) only)."""
    if sha256 is None or not str(sha256).strip():
        if scheme != "file":
            return None
        path = _local_file(url).path
        try:
            digest = sha256_file(path)
            how = f"its sha256 is {digest}; in config.yaml, {pin_yaml(sha256_key, digest)}"
        except OSError as e:
            how = f"it cannot be read now ({e.strerror or e}); sha256sum {path} prints the hash"
        raise PipelineError(f"{sha256_key} is null, but {url} is a local file: there is no download to trust on "
                            f"first use, so pin it: {how}")
    expected = str(sha256).strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise PipelineError(f"sha256 for {url} must be 64 hex digits, got {sha256!r}")
    return expected


def _expected_md5(md5: dict[str, str] | None) -> dict[str, str] | None:
    if not md5:
        return None
    if not isinstance(md5, dict):
        raise PipelineError(f"md5 must map extracted file names to md5 hex digests, got {md5!r}")
    out = {}
    for name, digest in md5.items():
        value = str(digest).strip().lower()
        if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
            raise PipelineError(f"md5 of {name} must be 32 hex digits, got {digest!r}")
        out[posixpath.normpath(str(name))] = value
    return out


def _verify(path: Path, expected: str, url: str, remove: bool = True) -> None:
    """Raise (and remove ``path``) unless its sha256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        if remove:
            path.unlink()
        raise PipelineError(f"sha256 mismatch for {url}: expected {expected}, got {actual} "
                            f"({'the file was removed; ' if remove else ''}fix the url or the sha256 in the config)")


def _local_file(url: str) -> LocalFile:
    """``file:///abs/path``, or ``file:relative/path``: the current directory's (the project's),
    else the workflow's (``llamapipe.config.paths.default_workflow_dir``), as the config check
    resolved it."""
    local = locate_file_url(url)
    assert local is not None, url  # a file: url
    return local


def _copy_local(local: LocalFile, cache: Path, expected: str) -> None:
    url, src = local.url, Path(local.path)
    if not src.exists():
        raise PipelineError(f"{url}: {local.missing()}")
    if not src.is_file():
        raise PipelineError(f"{url}: {src} is not a regular file")
    log.info("copying %s to %s", src, cache)
    # Verify the copy under a temp name: the final cache name only ever holds a good archive,
    # and the user's source file is never removed.
    with atomic_path(cache, suffix=".part") as tmp:
        shutil.copyfile(src, tmp)
        _verify(tmp, expected, url)
    log.info("sha256 ok: %s", expected)


def _fetch_http(url: str, cache: Path, expected: str | None, retries: int, timeouts: tuple[float, float]) -> None:
    import requests  # lazily: stages that never download should not pay for it

    transient = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                 _Retryable)
    cache.parent.mkdir(parents=True, exist_ok=True)
    part = cache.with_name(cache.name + ".part")
    log.info("fetching %s (connect timeout %g s, read timeout %g s, retries %d)%s",
             url, *timeouts, retries, _resume_note(part))
    with requests.Session() as session:
        for attempt in range(1, retries + 2):
            try:
                sized = _http_attempt(session, url, part, timeouts)
                # Without a Content-Length only the archive itself can tell a cut-off body.
                if not sized and sha256_file(part) != expected and _cut_short(part):
                    raise _Retryable(f"body ended after {part.stat().st_size} bytes without Content-Length; "
                                     "the archive is cut short")
                break
            except transient as e:
                why = _reason(e, timeouts)
                if attempt > retries:
                    raise PipelineError(f"download of {url} failed after {attempt} attempts; "
                                        f"the last: {why}") from None
                delay = min(BACKOFF_SECONDS * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
                log.warning("attempt %d/%d failed: %s; next attempt in %.1f s%s",
                            attempt, retries + 1, why, delay, _resume_note(part))
                time.sleep(delay)
            except requests.RequestException as e:  # a bad url, too many redirects: retrying won't help
                raise PipelineError(f"download of {url} failed: {e}") from None
    if expected is None:  # trust on first use: the archive checks below (stream, members) still run
        os.replace(part, cache)
        log.info("saved %s (not pinned)", cache)
        return
    _verify(part, expected, url)
    os.replace(part, cache)
    log.info("sha256 ok: %s; saved %s", expected, cache)


def _resume_note(part: Path) -> str:
    size = part.stat().st_size if part.exists() else 0
    return f", resuming from byte {size}" if size else ""


def _reason(e: Exception, timeouts: tuple[float, float]) -> str:
    """One short cause for the retry line: the timeout that fired, the socket error, or the
    exception's own text."""
    import requests
    from urllib3.exceptions import ReadTimeoutError

    inner = e.args[0] if e.args else None  # what requests wrapped
    if isinstance(e, requests.ConnectTimeout):
        return f"no connection within the {timeouts[0]:g} s connect timeout"
    # A stall in the body surfaces as a ConnectionError wrapping urllib3's ReadTimeoutError.
    if isinstance(e, requests.ReadTimeout) or isinstance(inner, ReadTimeoutError):
        return f"no data within the {timeouts[1]:g} s read timeout"
    if isinstance(e, requests.exceptions.ChunkedEncodingError) and isinstance(inner, Exception) and inner.args:
        return str(inner.args[0])  # urllib3's "Connection broken: IncompleteRead(...)"
    if isinstance(e, requests.ConnectionError):
        cause = e.__context__
        while cause is not None:  # down to the socket's error: "Connection refused", ...
            if isinstance(cause, OSError) and cause.strerror:
                return f"connection failed: {cause.strerror}"
            cause = cause.__context__
    return str(e)


def _http_attempt(session, url: str, part: Path, timeouts: tuple[float, float]) -> bool:
    """One GET, resuming from ``part`` if it exists; returns once the body is on disk, True if
    its full size was known (False: the server sent no Content-Length)."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    # identity: a .tar.gz served with Content-Encoding: gzip must not be unpacked by requests.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"

    with session.get(url, headers=headers, stream=True, timeout=timeouts) as r:
        if r.status_code == 416 and have:
            # The server has nothing past our size: either the .part is complete or it is stale.
            total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return True
            part.unlink()
            raise _Retryable("server refused the resume range (416); restarting from zero")
        if r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code} {r.reason}")
        if r.status_code == 206 and have:
            start = r.headers.get("Content-Range", "").partition(" ")[2].partition("-")[0]
            if start != str(have):
                part.unlink()
                raise _Retryable(f"server resumed at an unexpected offset ({r.headers.get('Content-Range')})")
            mode = "ab"
        elif r.status_code == 200:
            if have:
                log.info("server ignored the Range request; restarting from zero")
            have, mode = 0, "wb"
        else:
            raise PipelineError(f"download of {url} failed: HTTP {r.status_code} {r.reason}")

        length = r.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=part.name[:-5], file=sys.stderr,
                                          mininterval=1.0) as bar:
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))

    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")
    return total is not None


def _cut_short(archive: Path) -> bool:
    """Whether the archive stops early: a gzip/bz2/xz stream before its end marker, or a tar
    inside a member or before its end-of-archive block. Not an archive at all: False."""
    try:
        _check_stream(archive)
        with tarfile.open(archive, "r:*") as tf:
            try:
                tf.getmembers()
            except tarfile.ReadError:  # "unexpected end of data": the last member is incomplete
                return True
            tf.fileobj.seek(tf.offset)  # where the members end: two zero blocks must follow
            return tf.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE)
    except EOFError:  # the compressed stream ended before its end-of-stream marker
        return True
    except (OSError, tarfile.TarError, zlib.error, lzma.LZMAError):  # corrupt, or no archive
        return False


# --- safe extraction ---------------------------------------------------------------------------

def extract(archive: str | os.PathLike, out_dir: str | os.PathLike, md5: dict[str, str] | None = None,
            record: dict | None = None) -> list[str]:
    """Extract ``archive`` into ``out_dir`` (its single top-level directory stripped).

    Refuses the whole archive if any member is unsafe or an extracted file's md5 is not the one
    ``md5`` names; ``out_dir`` is replaced only on success. ``record``: written as ``download.json``
    into ``out_dir`` with the files and their md5s. Returns the extracted file paths relative to
    ``out_dir`` (the record not among them).
    """
    archive = Path(archive)
    try:
        _check_stream(archive)
        with tarfile.open(archive, "r:*") as tf:
            members = tf.getmembers()
            stored = {id(m): m.name for m in members}  # names as in the archive, for messages
            _check_members(members)
            members = _strip_top_dir(members, stored)
            _check_links(members, stored)
            # The stdlib's own "data" filter as a second line of defence where Python has it
            # (3.12+, backported to security releases of 3.9-3.11).
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with atomic_dir(out_dir) as tmp:
                tf.extractall(tmp, members=members, **kwargs)
                missing = [n for n in REQUIRED if not (tmp / n).is_file()]
                if missing:
                    raise PipelineError(f"{archive}: no {' or '.join(missing)} in the archive "
                                        "(expected train.json and dev.json, optionally under one top directory)")
                files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
                sums = {f: _md5_file(tmp / f) for f in files}
                _check_md5(archive, sums, md5 or {}, out_dir)
                if record is not None:
                    if RECORD in files:
                        raise PipelineError(f"{archive}: holds a file named {RECORD}, the name of the download's "
                                            "own record; nothing was extracted")
                    write_json(tmp / RECORD, {**record, "files": files, "md5": sums})
                return files
    except (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, lzma.LZMAError,
            gzip.BadGzipFile) as e:
        raise PipelineError(f"{archive}: the archive is truncated or corrupt ({e})") from None
    except (tarfile.TarError, KeyError) as e:  # the data filter's refusals, unresolvable hard links
        raise PipelineError(f"{archive}: refused, nothing was extracted: {e}") from None


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # matching published checksums; the sha256 pin is the security
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_md5(archive: Path, sums: dict[str, str], want: dict[str, str], out_dir: str | os.PathLike) -> None:
    """Every file ``want`` names is extracted with that md5; else nothing replaces ``out_dir``."""
    problems = []
    for name, digest in sorted(want.items()):
        if name not in sums:
            problems.append(f"{name} is not in the archive (it holds {', '.join(sorted(sums))})")
        elif sums[name] != digest:
            problems.append(f"{name} has md5 {sums[name]}, expected {digest}")
    if problems:
        raise PipelineError(
            f"{archive}: the extracted files are not the ones data.md5 names: {'; '.join(problems)}. "
            f"Nothing was extracted ({out_dir} is as it was). If this archive holds other data on purpose, "
            f"set data.md5 to its files' md5s or to null; else the archive is not what the md5s describe: "
            f"find out why before training on it")


def _check_stream(archive: Path) -> None:
    """Decompress the whole file once: tarfile stops at the end-of-archive blocks and would not
    notice a missing tail or a bad CRC."""
    with open(archive, "rb") as f:
        magic = f.read(6)
    opener = None
    if magic[:2] == b"\x1f\x8b":
        opener = gzip.open
    elif magic[:3] == b"BZh":
        opener = bz2.open
    elif magic == b"\xfd7zXZ\x00":
        opener = lzma.open
    if opener is not None:
        with opener(archive, "rb") as f:
            while f.read(1 << 20):
                pass


def _refuse(name: str, why: str) -> PipelineError:
    return PipelineError(f"unsafe archive member {name!r}: {why}; nothing was extracted")


def _check_members(members: list[tarfile.TarInfo]) -> None:
    """Checks on the names as stored, so the messages name the member as the archive does."""
    for m in members:
        if posixpath.isabs(m.name) or m.name.startswith("\\"):
            raise _refuse(m.name, "absolute path")
        if ".." in m.name.replace("\\", "/").split("/"):
            raise _refuse(m.name, "'..' path component")
        if m.ischr() or m.isblk() or m.isfifo():
            kind = "character device" if m.ischr() else "block device" if m.isblk() else "fifo"
            raise _refuse(m.name, f"{kind} (special files are not allowed)")
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise _refuse(m.name, f"unsupported member type {m.type!r}")


def _strip_top_dir(members: list[tarfile.TarInfo], stored: dict[int, str]) -> list[tarfile.TarInfo]:
    """Normalize names and drop a single top-level directory shared by every member."""
    kept = []
    for m in members:
        m.name = posixpath.normpath(m.name)
        if m.islnk():
            m.linkname = posixpath.normpath(m.linkname)
        if m.name != ".":  # the "./" entry of archives made with ``tar -C dir .``
            kept.append(m)
    tops = {m.name.split("/", 1)[0] for m in kept}
    if len(tops) != 1 or not any("/" in m.name for m in kept):
        return kept
    top = tops.pop()
    if any(m.name == top and not m.isdir() for m in kept):
        return kept  # a symlink or file named like the "directory": leave it to the link checks
    prefix = top + "/"
    stripped = []
    for m in kept:
        if m.name == top:
            continue
        m.name = m.name[len(prefix):]
        if m.islnk():  # hard link targets are archive paths, so they lose the prefix too
            if not m.linkname.startswith(prefix):
                raise _refuse(stored[id(m)], f"hard link to {m.linkname!r} outside the extraction directory")
            m.linkname = m.linkname[len(prefix):]
        stripped.append(m)
    return stripped


def _check_links(members: list[tarfile.TarInfo], stored: dict[int, str]) -> None:
    """Resolve every path through the archive's own symlinks: nothing may land or point outside."""
    links = {m.name: m.linkname for m in members if m.issym()}
    for m in members:
        if _resolve(posixpath.dirname(m.name), links) is None:
            raise _refuse(stored[id(m)], "its directory is a symlink pointing outside the extraction directory")
        if m.issym():
            if posixpath.isabs(m.linkname):
                raise _refuse(stored[id(m)], f"symlink to absolute path {m.linkname!r}")
            if _resolve(posixpath.join(posixpath.dirname(m.name), m.linkname), links) is None:
                raise _refuse(stored[id(m)], f"symlink to {m.linkname!r} points outside the extraction directory")
        elif m.islnk():
            if posixpath.isabs(m.linkname) or _resolve(m.linkname, links) is None:
                raise _refuse(stored[id(m)], f"hard link to {m.linkname!r} outside the extraction directory")


def _resolve(path: str, links: dict[str, str], depth: int = 0) -> str | None:
    """``path`` (relative to the extraction dir) with symlinks followed; None if it escapes or loops."""
    parts: list[str] = []
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(comp)
        here = "/".join(parts)
        if here in links:
            target = links[here]
            if posixpath.isabs(target) or depth > 32:
                return None
            resolved = _resolve(posixpath.join(posixpath.dirname(here), target), links, depth + 1)
            if resolved is None:
                return None
            parts = resolved.split("/") if resolved else []
    return "/".join(parts)
