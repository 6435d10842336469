"""Where er_ray keeps its files: a local path or a filesystem URI, behind one small API.

A *location* is a string: a local path (`caches/x`, `/data/x`, `file:///data/x`) or any URI that
`pyarrow.fs.FileSystem.from_uri` takes (`s3://bucket/prefix`, `gs://bucket/prefix`, `abfs://...`, `hdfs://...`).
Options of the filesystem ride in the URI's query and `join` keeps them, so a whole tree is named by one string:

    s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&scheme=http&region=us-east-1

Credentials are not er_ray's business: pyarrow finds them as the cloud's SDK does (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, an instance profile; a local Ray's workers inherit the
driver's environment, a cluster's nodes use their instance profile). Hand locations (strings) to Ray tasks and
actors and let each process resolve them; do not ship filesystem objects around.

Writes are atomic where the filesystem allows: on a local disk (and HDFS) a temporary file next to the target,
then a rename; on object stores (S3, GCS, Azure) one upload straight to the final name, which readers see whole
or not at all (there is no rename there). A writer that dies mid-upload can leave an object nobody committed:
a format built on this names its committed files in a manifest written last (as the cache does) and ignores
or removes the rest. `read_bytes` checks that an object did not change under it (pyarrow reads one in two
requests), so a reader polling a manifest never sees half of one.

    fs, path = resolve(location)          # a pyarrow FileSystem and the path on it (for pyarrow / Ray Data calls)
    join(location, "a", "b.json")         # child location, query kept
    absolute(location)                    # local paths made absolute (before handing them to other processes)
    read_bytes / write_bytes / read_json / write_json / exists / size / listdir / delete / sha256
    read_parquet / write_parquet          # a whole table, written atomically like write_bytes
    write_parquet_stream(location, tables)  # one Parquet file from a stream of tables, never all in memory
    upload(local_folder, location)        # a folder made on this machine (plots, a model) copied to a location
    ray_storage(location)                 # (storage_path, storage_filesystem) for Ray Train's and Tune's RunConfig
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import OptionsError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow `FileSystem.type_name`s without an atomic rename
_TORN_READ_RETRIES = 20


def is_local(location: str | os.PathLike) -> bool:
    """A path on this machine's disk (no scheme, or file://)."""
    s = os.fspath(location)
    return not _URI.match(s) or s.startswith("file://")


def absolute(location: str | os.PathLike) -> str:
    """The location as a string other processes can use: local paths made absolute, URIs unchanged."""
    s = os.fspath(location)
    return os.path.abspath(s) if not _URI.match(s) else s


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...`; a URI keeps its query (the filesystem's options) at the end."""
    s = os.fspath(location)
    if not _URI.match(s):
        return os.path.join(s, *parts)
    u = urlsplit(s)
    path = "/".join([u.path.rstrip("/")] + [p.strip("/") for p in parts])
    return f"{u.scheme}://{u.netloc}{path}" + (f"?{u.query}" if u.query else "")


@functools.lru_cache(maxsize=None)
def _filesystem(scheme: str, netloc: str, query: str) -> tuple[pafs.FileSystem, str]:
    """One filesystem per (scheme, bucket or host, options) and process, and the path of its root `/`.

    Built once: for S3 without a region, `from_uri` asks the bucket's region over the network."""
    fs, root = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/" + (f"?{query}" if query else ""))
    return fs, root.rstrip("/")


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a location: pass both to pyarrow (`filesystem=`) and Ray Data."""
    s = os.fspath(location)
    if not _URI.match(s):
        return pafs.LocalFileSystem(), os.path.abspath(s)
    u = urlsplit(s)
    fs, root = _filesystem(u.scheme, u.netloc, u.query)
    return fs, root + unquote(u.path).rstrip("/")


def exists(location: str | os.PathLike) -> bool:
    """A file or directory (on object stores: an object, or a prefix with objects under it) is there."""
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(location: str | os.PathLike) -> int:
    """Size in bytes of a file; FileNotFoundError if there is none."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    return info.size


def version(location: str | os.PathLike) -> tuple[int, int]:
    """(size, modification time in ns) of a file; FileNotFoundError if there is none."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    return info.size, info.mtime_ns or 0


def writable_folder(location: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse, before any work, a local output that is a file or cannot be created (a URI is checked on use)."""
    if not is_local(location):
        return
    target = Path(os.path.abspath(os.fspath(location).removeprefix("file://")))
    for p in [target, *target.parents]:  # the nearest that exists must be a folder we may write in
        if p.exists():
            if not p.is_dir():
                raise OptionsError(f"{flag} {location}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise OptionsError(f"{flag} {location}: {p} is not writable")
            return


@contextlib.contextmanager
def exclusive(location: str | os.PathLike, waiting: Callable[[str], None] | None = None):
    """Hold `location` for the block: a second process on the same location waits for the first, then sees what
    it committed (a cache build: nobody encodes a document twice). `waiting(holder)` is called once if it waits.

    On a local disk: an flock on `location/.lock` (released by the kernel if the holder dies). On object stores,
    where there is no lock: a lease, `location/.lease` (see `_lease`)."""
    if not is_local(location):
        with _lease(location, waiting):
            yield
        return
    import fcntl

    path = os.path.join(absolute(location), ".lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            if waiting:
                waiting(f.read().strip() or "another process")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(_holder())
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


LEASE_SECONDS = 120.0  # a lease not renewed for this long is a dead holder's: the next builder takes it over
_LEASE_SETTLE = 2.0  # seconds between writing a lease and reading it back (two writers: the last one wins)


def _holder() -> str:
    return f"pid {os.getpid()} on {os.uname().nodename}"


@contextlib.contextmanager
def _lease(location: str | os.PathLike, waiting: Callable[[str], None] | None, seconds: float = LEASE_SECONDS):
    """A lease on an object store: `location/.lease` names its holder and an expiry, renewed every third of its
    term by a thread while the block runs, deleted at the end. To take it, a process waits while a live lease of
    someone else's is there, writes its own, waits `_LEASE_SETTLE` and reads it back: of two that wrote at once,
    the one whose lease it reads goes on, the other waits. Trap: S3-like stores have no create-if-absent that
    pyarrow can use, so this is not airtight (a writer stalled for longer than the settle time between its check
    and its write can still overlap); the cost of an overlap is work done twice, never a wrong cache (shards
    are committed through the manifest). Expiry is judged by wall clocks, so hosts need synchronised clocks
    (seconds of skew are fine against a two-minute term)."""
    import threading
    import time

    path, me, told = join(location, ".lease"), uuid.uuid4().hex, False

    def current() -> dict[str, Any] | None:
        try:
            return json.loads(read_bytes(path))
        except (FileNotFoundError, ValueError):
            return None

    def write() -> None:
        write_json(path, {"owner": me, "holder": _holder(), "expires": time.time() + seconds})

    while True:
        lease = current()
        if lease and lease["owner"] != me and lease["expires"] > time.time():
            if waiting and not told:
                waiting(lease["holder"])
                told = True
            time.sleep(min(5.0, seconds / 6))
            continue
        write()
        time.sleep(_LEASE_SETTLE)
        if (lease := current()) and lease["owner"] == me:
            break
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            try:
                if (lease := current()) is None or lease["owner"] == me:  # never over another's (ours had expired)
                    write()
            except OSError:  # a failed request: the next renewal, a third of the term later, tries again
                pass

    renewer = threading.Thread(target=renew, name="er_ray lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        if (lease := current()) and lease["owner"] == me:
            delete(path)


def listdir(location: str | os.PathLike) -> list[str]:
    """Sorted names of the files and directories directly under a directory ([] if it does not exist)."""
    fs, path = resolve(location)
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def read_bytes(location: str | os.PathLike) -> bytes:
    """A whole file's bytes; FileNotFoundError if there is none. Never a torn read of a file being replaced."""
    fs, path = resolve(location)
    if fs.type_name not in _OBJECT_STORES:  # a rename replaces a file whole; an open file keeps its old bytes
        with fs.open_input_stream(path) as f:
            return f.read()
    # Trap: pyarrow reads an object as a HEAD (its size) and then ranged GETs of that many bytes. An object
    # replaced in between (a manifest committing its next shard) comes back as the first `old size` bytes of
    # the new version. Read again while the size found after the read differs from the bytes read.
    for _ in range(_TORN_READ_RETRIES):
        with fs.open_input_stream(path) as f:
            data = f.read()
        if fs.get_file_info(path).size == len(data):
            return data
    raise OSError(f"{location}: changed while being read, {_TORN_READ_RETRIES} times in a row")


def write_bytes(location: str | os.PathLike, data) -> None:
    """Write a whole file atomically (readers see the old file or the new one, never a part); `data` is bytes or
    any buffer (a pyarrow Buffer is written without a copy). Local parent directories are created."""
    fs, path = resolve(location)
    if fs.type_name in _OBJECT_STORES:  # one upload: the object appears when it is complete
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)  # a rename: atomic on POSIX, replaces the target
    except BaseException:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
        raise


def read_json(location: str | os.PathLike) -> Any:
    return json.loads(read_bytes(location))


def write_json(location: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """`obj` as JSON (and a final newline), written atomically."""
    write_bytes(location, (json.dumps(obj, indent=indent) + "\n").encode())


def delete(location: str | os.PathLike) -> None:
    """Remove a file, or a directory with everything under it; nothing to remove is not an error."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        fs.delete_file(path)
    elif kind == pafs.FileType.Directory:
        fs.delete_dir(path)


def sha256(location: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed."""
    fs, path = resolve(location)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_parquet(location: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(location)
    return pq.read_table(path, columns=columns, filesystem=fs)


def write_parquet(location: str | os.PathLike, table: pa.Table, **options) -> None:
    """A table as one Parquet file (`options` go to `pq.write_table`), written atomically (`write_bytes`)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    write_bytes(location, sink.getvalue())


def write_parquet_stream(location: str | os.PathLike, tables, **options) -> int:
    """Tables (same schema) from an iterator into one Parquet file, holding one at a time; returns the rows written
    (0 for an empty iterator, which writes no file).
    The file appears only when complete: it is written under a temporary name and then moved (a rename on a local
    disk, a server-side copy on object stores, where a streamed upload cut short would otherwise be committed
    half-written when its stream closes)."""
    return write_parquet_streams([location], ((t,) for t in tables), **options)[0]


def write_parquet_streams(locations: list, tables, **options) -> list[int]:
    """write_parquet_stream into several files at once: `tables` yields a tuple of one table per location (each
    file has its own schema). No file appears before the iterator is exhausted; returns the rows per file."""
    targets, made = [], []  # made: the folders this call creates, removed again if it fails
    for location in locations:
        fs, path = resolve(location)
        parent, name = path.rsplit("/", 1)
        # (object stores have no folders, but pyarrow leaves an empty marker object for the parent of an object
        # it deletes: the same clean-up removes it)
        made += [(fs, d) for d in _missing_folders(fs, parent) if (fs, d) not in made]
        if fs.type_name not in _OBJECT_STORES:
            fs.create_dir(parent, recursive=True)
        targets.append((fs, path, f"{parent}/.tmp-{name}-{uuid.uuid4().hex[:8]}"))
    rows, writers = [0] * len(targets), [None] * len(targets)
    try:
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(fs.open_output_stream(tmp)) for fs, _, tmp in targets]
            for group in tables:
                for i, t in enumerate(group):
                    if writers[i] is None:
                        # on the stack: closed before its stream (last in, first out), after an error or Ctrl-C
                        # too. Trap: a writer left open met its closed stream in __del__, and an interrupted
                        # `er-ray predict` printed "Exception ignored ... Invalid operation on closed file".
                        writers[i] = stack.enter_context(pq.ParquetWriter(streams[i], t.schema, **options))
                    writers[i].write_table(t.cast(writers[i].schema))
                    rows[i] += t.num_rows
        for (fs, path, tmp), w in zip(targets, writers):
            if w is None:
                fs.delete_file(tmp)
            else:
                fs.move(tmp, path)
    except BaseException:
        for fs, _, tmp in targets:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
        # an interrupted `er-ray predict --output new/` left `new/` behind, empty: the deepest first, and only
        # while empty (another writer may have put something there meanwhile)
        for fs, d in sorted(made, key=lambda m: -len(m[1])):
            if fs.get_file_info(d).type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(d)):
                fs.delete_dir(d)
        raise
    return rows


def _missing_folders(fs: pafs.FileSystem, folder: str) -> list[str]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while folder and fs.get_file_info(folder).type == pafs.FileType.NotFound:
        missing.append(folder)
        folder = folder.rsplit("/", 1)[0]
    return missing


def upload(folder: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy every file under a local folder to the same relative names under a location (local or remote),
    replacing files of the same names. Each file appears whole on an object store; the set of files does not
    appear at once: write a commit-point file after it (as a run's metrics.json)."""
    fs, path = resolve(location)
    if fs.type_name not in _OBJECT_STORES:  # pyarrow creates the subfolders only
        fs.create_dir(path, recursive=True)
    pafs.copy_files(os.path.abspath(os.fspath(folder)), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def ray_storage(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train's and Tune's `RunConfig` and `Tuner.can_restore/restore`:
    a local path made absolute and no filesystem (Ray's default); for a URI, its path on the filesystem built
    from it, so that the options in its query (an endpoint_override, ...) reach Ray too."""
    if is_local(location):
        return absolute(location), None
    fs, path = resolve(location)
    return path, fs
