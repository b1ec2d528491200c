"""The on-disk kernel cache shared by the Triton sources (``triton_source``) and the CUDA binaries (``nvrtc``).

    cache_dir(kind)          <root>/<kind>, created. <root> is $RETENTION_COMPILE_CACHE, else
                             $XDG_CACHE_HOME/retention_compile, else ~/.cache/retention_compile (never the
                             package, which may sit on a read-only file system). A root that cannot be written
                             is replaced by a private temporary directory for the rest of the process, with one
                             warning.
    cache_key(*parts)        sha256 over the parts and the versions that change generated code and binaries
                             (torch, triton, CUDA driver), so an upgrade never reads a stale entry.
    store(path, data)        make ``path`` hold exactly ``data``: an entry whose bytes are known before it is
                             written (a rendered source) is rewritten when it differs (truncated, corrupt).
    store_checked(path, data) / load_checked(path)
                             an entry computed from its key (a compiled binary): an empty marker
                             ``<name>.<sha256 of the bytes>.ok`` is written after the entry; an entry without
                             the marker of its own bytes (missing, truncated, corrupt) reads as absent, so the
                             caller rebuilds it.
    code_keyed_entry(kind, stem, *parts) / load_json(path) / store_json(path, value)
                             a checked JSON entry of an answer the package computes itself (the planner's
                             printed model, a shared-memory fit): keyed by ``parts`` and the package's code too.

Every write goes to a temporary file in the entry's folder and is renamed into place (``os.replace``), so
processes sharing the cache see an old entry, no entry, or a whole new one. Two processes compiling the same
entry at once may produce different bytes (compilers embed temporary paths); whichever entry lands last,
its writer's marker names its bytes, so the cache ends consistent. A reader that comes between an entry and
its marker rebuilds it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

ENV_VAR = "RETENTION_COMPILE_CACHE"
MARKER_SUFFIX = ".ok"


def configured_root() -> Path:
    """The cache root the environment asks for (read on every call, so a changed variable takes effect)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "retention_compile"


@functools.cache
def _fallback_root() -> Path:
    """A private temporary directory, made once per process."""
    return Path(tempfile.mkdtemp(prefix="retention_compile_cache_"))


@functools.cache
def _usable_root(root: Path) -> Path:
    """``root`` if a file can be created in it, else the temporary fallback (warned once per root)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as error:
        fallback = _fallback_root()
        warnings.warn(
            f"retention_compile: the kernel cache {root} is not writable ({error}); using {fallback} for this "
            f"process, so kernels are rebuilt in the next one. Set {ENV_VAR} to a writable directory to keep them.",
            stacklevel=3,
        )
        return fallback
    return root


def cache_dir(kind: str) -> Path:
    """The folder of one kind of entry (``"triton"``, ``"cuda"``) under the usable root, created."""
    path = _usable_root(configured_root()) / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def driver_version() -> int | None:
    """The CUDA driver version (e.g. 13000), or None without cuda-python or a driver."""
    try:
        from cuda.bindings import driver

        err, version = driver.cuDriverGetVersion()
    except Exception:  # no cuda-python, or no libcuda on a CPU machine
        return None
    return version if err == driver.CUresult.CUDA_SUCCESS else None


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def versions() -> str:
    """The versions every key includes: ``torch=... triton=... driver=...``."""
    return f"torch={torch.__version__} triton={_distribution_version('triton')} driver={driver_version()}"


def cache_key(*parts: str) -> str:
    """sha256 (hex) over ``parts`` and ``versions()``."""
    return hashlib.sha256("\x1f".join((*parts, versions())).encode()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def store(path: Path, data: bytes) -> None:
    """Make ``path`` hold exactly ``data``, writing (atomically) only when it does not already."""
    if _read(path) != data:
        write_atomic(path, data)


def marker_path(path: Path, data: bytes) -> Path:
    """The marker that vouches for ``data`` as the bytes of entry ``path``."""
    return path.with_name(f"{path.name}.{hashlib.sha256(data).hexdigest()}{MARKER_SUFFIX}")


def store_checked(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, then its marker."""
    write_atomic(path, data)
    marker_path(path, data).touch()


def load_checked(path: Path) -> bytes | None:
    """The bytes of an entry written by ``store_checked``; None when it is missing, truncated or corrupt."""
    data = _read(path)
    return data if data is not None and marker_path(path, data).exists() else None


def code_keyed_entry(kind: str, stem: str, *parts: str) -> Path:
    """The path of a JSON entry of ``kind`` (name ``<stem><key>.json``) keyed by ``parts``, the package's code
    fingerprint and ``versions()``: another version of the code that computed it never reads it."""
    from ..backend import code_fingerprint  # the backend imports the codegen: resolved when first used

    return cache_dir(kind) / f"{stem}{cache_key(kind, *parts, code_fingerprint())[:32]}.json"


def load_json(path: Path) -> object | None:
    """The value of an entry written by ``store_json``; None when it is missing, damaged or not JSON."""
    data = load_checked(path)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def store_json(path: Path, value: object) -> None:
    """Keep ``value`` as a checked JSON entry; a cache that cannot be written only costs a later process the work."""
    with contextlib.suppress(OSError):
        store_checked(path, json.dumps(value).encode())
