"""Files and object-store URLs behind one small interface: open, read, write, list, exists, size.

A location is a local path or an fsspec URL (`s3://bucket/key`, through s3fs). Local paths take
the standard library's fast path; URLs go through fsspec with one retry layer of our own:
a transient error (connection refused or reset, timeout, a 5xx) is retried with exponential
backoff and logged once per retry with the URL, while a missing bucket or key and denied access
fail at once with one line naming the URL. s3fs and botocore retries are turned off so that this
is the only layer that retries and every retry is visible.

Credentials and endpoint come from the usual AWS environment and config (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/config, AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for
servers other than AWS); with no credentials at all, requests are anonymous (public buckets).
This module imports only the standard library at import time, so the trainer can use it; fsspec
and s3fs load on the first URL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, TypeVar

from data_tools.common import DataError, first_line

log = logging.getLogger("data_tools")

RETRIES = int(os.environ.get("DSTRAIN_STORAGE_RETRIES", "6"))  # attempts after the first
BACKOFF_S = float(os.environ.get("DSTRAIN_STORAGE_BACKOFF_S", "0.5"))  # first wait; doubles each retry, at most 30 s
T = TypeVar("T")


class Url(str):
    """An object-store URL that joins and names like a Path, so code written for paths takes it unchanged."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Url:
        return Url(self.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, other: str | os.PathLike) -> Url:
        """Join and normalise `..` (object keys are not resolved by the server: `a/../b` would be its own key)."""
        protocol, _, path = self.partition("://")
        return Url(f"{protocol}://{posixpath.normpath(path.rstrip('/') + '/' + os.fspath(other))}")

    def exists(self) -> bool:
        return exists(self)

    def is_dir(self) -> bool:
        return is_dir(self)

    def read_bytes(self) -> bytes:
        return read_bytes(self)

    def read_text(self) -> str:
        return read_text(self)


Location = Path | Url


def is_url(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def location(value: str | os.PathLike) -> Location:
    """A `Url` for an object-store URL, else a `Path`."""
    return Url(value) if is_url(value) else Path(value)


AWS_SETTINGS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def _fs_path(url: str):
    protocol, _, rest = url.partition("://")
    return _filesystem(protocol, tuple(os.environ.get(name) for name in AWS_SETTINGS)), rest


@lru_cache(maxsize=8)
def _filesystem(protocol: str, settings: tuple):
    """One fsspec filesystem per protocol and AWS settings, with its own retries off (ours log every retry)."""
    import fsspec

    if protocol not in ("s3", "s3a"):
        return fsspec.filesystem(protocol)
    import botocore.session

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict = {
        "skip_instance_cache": True,
        "endpoint_url": endpoint,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 10, "read_timeout": 60},
    }
    if botocore.session.get_session().get_credentials() is None:
        options["anon"] = True  # no credentials anywhere: a public bucket
    fs = fsspec.filesystem("s3", **options)
    fs.retries = 1
    return fs


def _transient(err: BaseException) -> bool:
    """Worth retrying: the network or the server failed, not the request."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)) or type(err) is OSError:
        return True
    with contextlib.suppress(ImportError):
        import aiohttp
        import botocore.exceptions as boto

        return isinstance(err, (boto.ConnectionError, boto.HTTPClientError, aiohttp.ClientError))
    return False


def _what_failed(url: str, err: BaseException) -> DataError:
    """The one-line error for a request that will not succeed by retrying."""
    bucket = url.partition("://")[2].split("/", 1)[0]
    text = first_line(err, 200)
    if isinstance(err, PermissionError):
        return DataError(f"{url}: access denied ({text}); "
                         "check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket policy")
    if isinstance(err, FileNotFoundError):
        if "bucket" in text.lower():
            return DataError(f"{url}: no bucket {bucket!r} at this endpoint; create it or fix the URL (AWS_ENDPOINT_URL)")
        return DataError(f"{url}: no such key or prefix; fix the URL or write the data first")
    return DataError(f"{url}: {type(err).__name__}: {text}")


def retrying(url: str, what: str, call: Callable[[], T]) -> T:
    """`call()`, retried on transient errors with exponential backoff; other errors become one-line DataErrors."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except Exception as err:
            if not _transient(err):
                raise _what_failed(url, err) from None
            if attempt == RETRIES:
                raise DataError(
                    f"{url}: {what} failed {RETRIES + 1} times, last: {type(err).__name__}: {first_line(err, 200)}; "
                    "check the endpoint (AWS_ENDPOINT_URL) and the network"
                ) from None
            wait = min(BACKOFF_S * 2**attempt, 30.0)
            log.warning("%s: %s failed (%s: %s); retry %d of %d in %.1fs", url, what, type(err).__name__,
                        first_line(err, 120), attempt + 1, RETRIES, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _on_store(url: str, what: str, call: Callable[[Any, str], T]) -> T:
    """`call(filesystem, path)` for an object-store URL, through `retrying`: every URL request goes through here."""
    fs, path = _fs_path(url)
    return retrying(url, what, lambda: call(fs, path))


# ------------------------------------------------------------------------------------------ reading


def exists(loc: str | os.PathLike) -> bool:
    return _on_store(loc, "exists", lambda fs, path: fs.exists(path)) if is_url(loc) else Path(loc).exists()


def is_dir(loc: str | os.PathLike) -> bool:
    return _on_store(loc, "isdir", lambda fs, path: fs.isdir(path)) if is_url(loc) else Path(loc).is_dir()


def size(loc: str | os.PathLike) -> int:
    """Bytes in a file or object; FileNotFoundError for a local file that is not there (callers word it)."""
    return int(_on_store(loc, "size", lambda fs, path: fs.size(path))) if is_url(loc) else Path(loc).stat().st_size


def read_bytes(loc: str | os.PathLike) -> bytes:
    return _on_store(loc, "read", lambda fs, path: fs.cat_file(path)) if is_url(loc) else Path(loc).read_bytes()


def read_text(loc: str | os.PathLike) -> str:
    return read_bytes(loc).decode()


def read_range(loc: str | os.PathLike, offset: int, length: int) -> bytes:
    """`length` bytes from `offset` (fewer at the end of the file): one ranged GET for a URL."""
    if not is_url(loc):
        with open(loc, "rb") as f:
            return os.pread(f.fileno(), length, offset)
    return _on_store(loc, "ranged read", lambda fs, path: fs.cat_file(path, start=offset, end=offset + length))


class _RangedFile(IO[bytes]):
    """A read-only, seekable file over ranged reads, each retried; reads ahead in blocks."""

    def __init__(self, url: str, block: int = 4 << 20) -> None:
        self.url, self.block, self.pos = url, block, 0
        self.length = size(url)
        self._cache_start, self._cache = 0, b""

    def read(self, n: int = -1) -> bytes:
        end = self.length if n is None or n < 0 else min(self.pos + n, self.length)
        parts = []
        while self.pos < end:
            rel = self.pos - self._cache_start
            if not 0 <= rel < len(self._cache):
                self._cache_start, self._cache = self.pos, read_range(self.url, self.pos, max(self.block, end - self.pos))
                rel = 0
                if not self._cache:
                    break
            chunk = self._cache[rel : rel + end - self.pos]
            parts.append(chunk)
            self.pos += len(chunk)
        return b"".join(parts)

    def readline(self, limit: int = -1) -> bytes:
        parts = []
        while True:
            rel = self.pos - self._cache_start
            if not 0 <= rel < len(self._cache):
                if self.pos >= self.length:
                    break
                self._cache_start, self._cache, rel = self.pos, read_range(self.url, self.pos, self.block), 0
            newline = self._cache.find(b"\n", rel)
            stop = len(self._cache) if newline < 0 else newline + 1
            parts.append(self._cache[rel:stop])
            self.pos += stop - rel
            if newline >= 0:
                break
        return b"".join(parts)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._cache = b""

    def __enter__(self) -> _RangedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_read(loc: str | os.PathLike) -> IO[bytes]:
    """A seekable binary file: the local file, or ranged reads of the object (each retried)."""
    return _RangedFile(loc) if is_url(loc) else open(loc, "rb")


class RangedBytes:
    """The slicing, `find` and `len` of a bytes buffer over a file, for readers written against mmap."""

    def __init__(self, f: IO[bytes], length: int) -> None:
        self._f, self._len = f, length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self._len)
        self._f.seek(start)
        return self._f.read(max(stop - start, 0))

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:
        end, chunk = self._len if end is None else min(end, self._len), 1 << 20
        pos = start
        while pos < end:
            data = self[pos : min(pos + chunk + len(sub) - 1, end)]
            found = data.find(sub)
            if found >= 0:
                return pos + found
            pos += chunk
        return -1


@contextlib.contextmanager
def mapped(loc: str | os.PathLike) -> Iterator[bytes]:
    """The whole file as a bytes-like buffer: mmap for a local file, ranged reads for a URL."""
    if is_url(loc):
        with open_read(loc) as f:
            yield RangedBytes(f, f.length)
        return
    import mmap

    with open(loc, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def glob(pattern: str) -> list[Url]:
    """Sorted URLs that match a glob over an object store."""
    protocol = pattern.partition("://")[0]
    return [Url(f"{protocol}://{match}") for match in sorted(_on_store(pattern, "list", lambda fs, path: fs.glob(path)))]


def list_files(loc: str | os.PathLike) -> list[str]:
    """Relative paths of every file under a directory or prefix, sorted."""
    if not is_url(loc):
        root = Path(loc)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    prefix = len(str(loc).partition("://")[2].rstrip("/")) + 1  # the bucket/key part fsspec's paths start with
    return sorted(f[prefix:] for f in _on_store(loc, "list", lambda fs, path: fs.find(path)))


# ------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A local file written as `<path>.tmp`, synced to disk and renamed over `path` when the block ends.

    Why: a reader sees the old file or the whole new one, never half, and a killed or failed write
    (a full disk) leaves no file under `path`; the temporary one is removed, so the space comes back.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_bytes(loc: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: a local temp file renamed over the target, or one PUT (a reader never sees half an object)."""
    if is_url(loc):
        _on_store(loc, "write", lambda fs, path: fs.pipe_file(path, data))
        return
    Path(loc).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(loc) as f:
        f.write(data)


def upload(local: Path, loc: str | os.PathLike) -> None:
    """Copy one local file to a location, whole (multipart uploads too become visible only when complete)."""
    if is_url(loc):
        _on_store(loc, "upload", lambda fs, path: fs.put_file(str(local), path))
        return
    import shutil

    Path(loc).parent.mkdir(parents=True, exist_ok=True)
    with open(local, "rb") as source, atomic_file(loc) as target:
        shutil.copyfileobj(source, target)


def remove(loc: str | os.PathLike) -> None:
    if not is_url(loc):
        Path(loc).unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError):
        _on_store(loc, "delete", lambda fs, path: fs.rm_file(path))


# ------------------------------------------------------------------------------------------ checks at start


def _check_bucket(url: str) -> None:
    """Fail with one line for a missing bucket or denied access; the bucket listing needs the List right."""
    _on_store(url, "list", lambda fs, path: fs.ls(path.split("/", 1)[0], refresh=True))


def check_readable(loc: str | os.PathLike) -> None:
    """Stop at start, in one line naming the URL, when a file, key or prefix cannot be read."""
    if not is_url(loc):
        if not Path(loc).exists():
            raise DataError(f"{loc}: no such file or directory")
        return
    _check_bucket(loc)
    if not exists(loc):
        raise DataError(f"{loc}: no such key or prefix; fix the URL or write the data first")


def check_writable(loc: str | os.PathLike) -> None:
    """Stop at start, in one line naming the URL, when nothing can be written there (probe written and deleted)."""
    probe = location(loc) / f".write-probe-{os.getpid()}"
    if is_url(loc):
        _check_bucket(loc)
    try:
        write_bytes(probe, b"")
    except OSError as err:
        raise DataError(f"{loc}: not writable ({err.strerror or first_line(err)}); choose another location") from None
    remove(probe)
