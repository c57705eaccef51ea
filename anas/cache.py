"""On-disk caches that outlive a launch: extracted archives, decoded images, statistics, weights.

Every entry lives under one cache folder and is named by a key that hashes everything that
changes its content. Writers hold a file lock on the entry while they build it and publish it
with one rename, so a reader sees either nothing or the complete entry, and two processes that
miss at once build it only once.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock

from anas.errors import ConfigError

log = logging.getLogger(__name__)

# Bump when the layout of any cached file changes, so old entries are no longer matched.
CACHE_VERSION = 2


def cache_key(fields: Mapping[str, Any]) -> str:
    """Return 16 hex characters hashing `fields` (JSON-serialisable values), order-independent."""
    text = json.dumps({"cache_version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a file or folder by resolved path, size and modification time.

    A folder is described by the relative path, size and mtime of every file below it, hashed,
    so adding, removing or rewriting any image changes the fingerprint.
    """
    path = Path(path).resolve()
    if path.is_file():
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    digest = hashlib.sha256()
    count = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file_path = os.path.join(root, name)
            stat = os.stat(file_path)
            relative = os.path.relpath(file_path, path)
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
    return {"path": str(path), "files": count, "tree": digest.hexdigest()[:16]}


_sha256_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 of a file's bytes, remembered per (path, size, mtime) in this process."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _sha256_memo:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        _sha256_memo[memo_key] = digest.hexdigest()
    return _sha256_memo[memo_key]


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive file lock named after the cache entry `path` (a sibling `.lock` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Call `write(temp_path)` on a temporary file next to `path`, then rename it onto `path`.

    `suffix` is the temporary file's extension, for writers such as `numpy.savez` that append
    one when it is missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    finally:
        if os.path.exists(temp_path):
            os.remove(temp_path)


def extract_zip(zip_path: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """Extract a zip file once into `<cache_dir>/extracted/` and return the extracted folder.

    The folder name carries a key of the zip's path, size and mtime, so a changed zip is
    extracted again. Extraction goes to a temporary folder that is renamed when complete.
    """
    zip_path = Path(zip_path).resolve()
    key = cache_key({"zip": source_fingerprint(zip_path)})
    target = Path(cache_dir) / "extracted" / f"{zip_path.stem}-{key}"
    if target.is_dir():
        return target
    with locked(target):
        if target.is_dir():
            return target
        log.info("extracting %s into %s", zip_path, target)
        temp_dir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            try:
                with zipfile.ZipFile(zip_path) as archive:
                    _check_member_names(archive, zip_path)
                    archive.extractall(temp_dir)
            except zipfile.BadZipFile as error:
                raise ConfigError(
                    f"data.root: {zip_path} is not a readable zip file ({error})"
                ) from error
            os.rename(temp_dir, target)
        finally:
            if temp_dir.exists():
                shutil.rmtree(temp_dir)
    return target


def _check_member_names(archive: zipfile.ZipFile, zip_path: Path) -> None:
    # zipfile already strips ".." and leading slashes, but a member that needs stripping
    # means the archive was not built as a plain image folder.
    for name in archive.namelist():
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or ".." in parts:
            raise ConfigError(
                f"data.root: {zip_path} contains a member outside its folder: {name!r}"
            )
