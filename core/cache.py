"""The project's disk cache: one folder for what is expensive to build and cheap to rebuild.

``$CLIP_CURATION_CACHE`` (default ``~/.cache/clip-curation``), one subfolder per user:
``decontaminate/`` (eval sets' hashes and embeddings), ``ocr/`` (CRAFT exported to ONNX and its
int8 model). Here, below ``models/`` and ``stages/``, so both can use it. Everything in it is keyed
by what it was built from and checked before use: deleting the folder only costs rebuild time.
Writes are atomic (a temporary name in the same folder, then a rename), so two processes building
the same entry at once (two actors starting together) each leave a whole file, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

CACHE_ENV = "CLIP_CURATION_CACHE"  # the cache folder; tests point it at a temporary one


def cache_dir(subfolder: str) -> Path:
    """``$CLIP_CURATION_CACHE/<subfolder>`` (default root ``~/.cache/clip-curation``); not created."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "clip-curation")
    return Path(root) / subfolder


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


def file_sha256(path: Path, subfolder: str) -> str:
    """The sha256 of a (large, rarely changing) file, hashed once: remembered by (path, size,
    mtime) in this process and in ``<subfolder>/file-hashes/``, so later processes only stat it."""
    stat = path.stat()
    resolved = str(path.resolve())
    memo_key = (resolved, stat.st_size, stat.st_mtime_ns)
    if memo_key in _FILE_HASHES:
        return _FILE_HASHES[memo_key]
    record_path = cache_dir(subfolder) / "file-hashes" / f"{hashlib.sha256(resolved.encode()).hexdigest()[:32]}.json"
    try:
        record = json.loads(record_path.read_text())
        if (record["path"], record["size"], record["mtime_ns"]) == memo_key and len(record["sha256"]) == 64:
            _FILE_HASHES[memo_key] = record["sha256"]
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, stale or unreadable: hash the file again
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    record = {"path": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    try:
        write_atomic(record_path, lambda f: f.write(json.dumps(record).encode()))
    except OSError:
        pass  # a read-only cache: hash again next time
    _FILE_HASHES[memo_key] = sha
    return sha


__all__ = ["CACHE_ENV", "cache_dir", "file_sha256", "write_atomic"]
