"""download_data: fetch the AdvertiseGen archive, verify its sha256, extract it safely.

The archive lands in ``cache_dir`` (``.part`` while incomplete, the final name only once the
sha256 matched) and is extracted into a temp dir beside ``out_dir`` that replaces ``out_dir``
only when every member passed the safety checks and ``train.json``/``dev.json`` are there.
"""

from __future__ import annotations

import bz2
import gzip
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
from urllib.parse import unquote, urlparse

from llamapipe.core.atomic import atomic_dir, atomic_path
from llamapipe.core.errors import PipelineError
from llamapipe.core.hashing import sha256_file

log = logging.getLogger("llamapipe.download")

CHUNK = 1 << 16
BACKOFF_SECONDS = 1.0  # first retry delay, doubled each attempt; tests set it to 0
MAX_BACKOFF_SECONDS = 60.0
REQUIRED = ("train.json", "dev.json")


class _Retryable(Exception):
    """A transient HTTP failure (5xx, short body) worth another attempt."""


def run(url: str, sha256: str, out_dir: str, cache_dir: str, retries: int = 5,
        connect_timeout: float = 10.0, read_timeout: float = 30.0) -> dict:
    """``retries``: attempts after the first; ``read_timeout``: seconds without a byte before an
    attempt counts as stalled (http only)."""
    expected = sha256.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise PipelineError(f"sha256 for {url} must be 64 hex digits, got {sha256!r}")
    name = posixpath.basename(urlparse(url).path)
    if not name:
        raise PipelineError(f"cannot derive a file name from url {url!r}")
    cache = Path(cache_dir) / name
    scheme = urlparse(url).scheme.lower()
    if scheme not in ("file", "http", "https"):
        raise PipelineError(f"unsupported url scheme {scheme!r} in {url!r} (use http(s):// or file:)")

    if scheme == "file" and cache.exists() and _local_path(url).resolve() == cache.resolve():
        _verify(cache, expected, url, remove=False)  # the cache is the user's file: check, never delete
    elif cache.is_file() and sha256_file(cache) == expected:
        log.info("using cached %s (sha256 ok), skipping the download", cache)
    else:
        if cache.exists():
            log.warning("cached %s has the wrong sha256; fetching it again", cache)
            cache.unlink()
        if scheme == "file":
            _copy_local(url, cache, expected)
        else:
            _fetch_http(url, cache, expected, retries, (connect_timeout, read_timeout))

    files = extract(cache, out_dir)
    log.info("extracted %d file(s) into %s", len(files), out_dir)
    return {"url": url, "sha256": expected, "archive": str(cache), "bytes": cache.stat().st_size,
            "out_dir": str(out_dir), "files": files}


def _verify(path: Path, expected: str, url: str, remove: bool = True) -> None:
    """Raise (and remove ``path``) unless its sha256 is ``expected``."""
    actual = sha256_file(path)
    if actual != expected:
        if remove:
            path.unlink()
        raise PipelineError(f"sha256 mismatch for {url}: expected {expected}, got {actual} "
                            f"({'the file was removed; ' if remove else ''}fix the url or the sha256 in the config)")


def _local_path(url: str) -> Path:
    """``file:///abs/path`` or ``file:relative/path`` (relative to the current directory)."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise PipelineError(f"file url {url!r} names host {parsed.netloc!r}; "
                            "use file:///absolute/path or file:relative/path")
    path = unquote(parsed.path)
    if not path:
        raise PipelineError(f"file url {url!r} has no path")
    return Path(path)


def _copy_local(url: str, cache: Path, expected: str) -> None:
    src = _local_path(url)
    if not src.is_file():
        raise PipelineError(f"{url}: no such file {src.resolve()}")
    log.info("copying %s to %s", src, cache)
    # Verify the copy under a temp name: the final cache name only ever holds a good archive,
    # and the user's source file is never removed.
    with atomic_path(cache, suffix=".part") as tmp:
        shutil.copyfile(src, tmp)
        _verify(tmp, expected, url)
    log.info("sha256 ok: %s", expected)


def _fetch_http(url: str, cache: Path, expected: str, retries: int, timeouts: tuple[float, float]) -> None:
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

def extract(archive: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Extract ``archive`` into ``out_dir`` (its single top-level directory stripped).

    Refuses the whole archive if any member is unsafe; ``out_dir`` is replaced only on success.
    Returns the extracted file paths relative to ``out_dir``.
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
                return sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    except (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, lzma.LZMAError,
            gzip.BadGzipFile) as e:
        raise PipelineError(f"{archive}: the archive is truncated or corrupt ({e})") from None
    except (tarfile.TarError, KeyError) as e:  # the data filter's refusals, unresolvable hard links
        raise PipelineError(f"{archive}: refused, nothing was extracted: {e}") from None


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
