"""The cache layer under every method: where results live, how they are keyed, how they are written.

- `cache_dir()`: `$MECHLENS_CACHE` or `~/.cache/mechlens`.
- `stable_hash(obj)`: a digest of a description made of JSON-like values, tensors and arrays
  (dtype, shape and every element), dataclasses and paths; anything else raises `TypeError`,
  because a key that hashes differently per process (a lambda, an object's `repr`) would never hit.
- `model_fingerprint(model)`: the model's id, backend, dtype, a hash of its weights *as they
  are now* (read afresh on every call, so no in-place edit, through `.data` or a NumPy view
  included, goes unseen) and the interventions in force.
- `DiskCache`: values stored as safetensors (tensors) plus JSON (structure), never pickle, so
  reading a cache folder that someone else can write runs no code. Each entry records its key
  digest and is checked on read; files are owner-only; writes are atomic; a corrupt or foreign
  file is reported with its path and recomputed. Step names stay inside the root, and only
  regular files are opened (never through a link, never a FIFO or device).
- `atomic_write_bytes` / `atomic_write_text` / `write_json` / `atomic_folder`: readers see the old
  file (or folder) or the new one, never half of it.

Example:
    >>> import tempfile, torch
    >>> store = DiskCache(tempfile.mkdtemp())
    >>> store.cached("square", lambda: {"x": torch.arange(3) ** 2, "note": None}, n=3)
    {'x': tensor([0, 1, 4]), 'note': None}
    >>> stable_hash(torch.zeros(4)) == stable_hash(torch.zeros(2, 2))
    False
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

FORMAT = "mechlens-cache-1"


def cache_dir() -> Path:
    """Where mechlens keeps converted weights and results: $MECHLENS_CACHE or ~/.cache/mechlens."""
    return Path(os.environ.get("MECHLENS_CACHE", Path.home() / ".cache" / "mechlens"))


# ---------------------------------------------------------------------------- atomic writes
STALE_AFTER_S = 24 * 3600
"""A temporary file of another host (whose writer cannot be asked) is swept after this long."""


def _host() -> str:
    """This machine's name as it goes into temporary names (letters, digits, '_' and '.')."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_prefix(name: str) -> str:
    """`.{name}.tmp-{host}-{pid}-`: the writer's host and process, so a sweep knows whose it is."""
    return f".{name}.tmp-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files and folders that a killed writer left in `folder`; returns how many.

    A temporary of this host is stale when its writer's process no longer runs; one of another
    host (a cache folder shared between machines) only after `STALE_AFTER_S`, since a process id
    means nothing elsewhere."""
    removed = 0
    if not folder.is_dir():
        return 0
    for tmp in folder.glob(".*.tmp-*"):
        match = re.search(r"\.tmp-(.+)-(\d+)-[^-]*$", tmp.name)
        if match is None:
            continue
        host, pid = match.group(1), int(match.group(2))
        try:
            age = time.time() - tmp.lstat().st_mtime
        except OSError:
            continue
        stale = pid != os.getpid() and not _pid_alive(pid) if host == _host() else age > STALE_AFTER_S
        if stale:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_regular_file(path: str | Path) -> bytes:
    """The bytes of `path` if it is a regular file, opened without following a link and without
    blocking (a FIFO or device planted there raises `OSError` instead of hanging the reader)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as strict JSON (NaN -> null), atomically.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "r.json"
    >>> write_json(p, {"a": [1.0, float("nan")]}); p.read_text().split()
    ['{', '"a":', '[', '1.0,', 'null', ']', '}']
    """

    def finite(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [finite(v) for v in x]
        return None if isinstance(x, float) and math.isnan(x) else x

    atomic_write_text(path, json.dumps(finite(obj), indent=1, allow_nan=False))


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Context yielding a temporary folder beside `path`; on success it replaces `path` whole.

    >>> import tempfile; target = Path(tempfile.mkdtemp()) / "model"
    >>> with atomic_folder(target) as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in target.iterdir())
    ['config.json']
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path.name)))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- hashing
def stable_hash(obj: Any, length: int = 16) -> str:
    """A hex digest of `obj`, identical across processes and machines.

    Tensors and NumPy arrays hash by dtype, shape and every element; dict keys keep their type
    (`{1: x}` and `{"1": x}` differ); sets hash in sorted order of their elements' digests.
    Raises `TypeError` for anything without a stable description (functions, arbitrary objects).

        >>> stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
        True
        >>> stable_hash({1: "x"}) == stable_hash({"1": "x"})
        False
    """
    digest = hashlib.sha256()
    try:
        _feed(digest, obj)
    except RecursionError:
        raise TypeError("cannot hash a value nested this deeply for a cache key") from None
    return digest.hexdigest()[:length]


def _feed(digest, obj: Any) -> None:
    """Feed a typed, unambiguous encoding of `obj` into `digest`."""

    def tag(kind: str, payload: bytes = b"") -> None:
        digest.update(kind.encode() + b":" + str(len(payload)).encode() + b":" + payload)

    if obj is None or isinstance(obj, bool | np.bool_):  # NumPy scalars hash as the Python ones
        tag(repr(None if obj is None else bool(obj)))
    elif isinstance(obj, int | np.integer):
        tag("int", str(int(obj)).encode())
    elif isinstance(obj, float | np.floating):
        tag("float", float(obj).hex().encode())
    elif isinstance(obj, str):
        tag("str", obj.encode())
    elif isinstance(obj, bytes):
        tag("bytes", obj)
    elif isinstance(obj, Path):
        tag("path", str(obj).encode())
    elif isinstance(obj, torch.dtype):
        tag("dtype", str(obj).encode())
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        tag("tensor", f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        if obj.dtype == object:
            tag("object-array", str(obj.shape).encode())
            for item in obj.reshape(-1):
                _feed(digest, item)
        else:
            a = np.ascontiguousarray(obj)
            tag("ndarray", f"{a.dtype.str}{a.shape}".encode())
            digest.update(a.tobytes())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        tag("dataclass", f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
        _feed(digest, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    elif isinstance(obj, dict):
        items = sorted((stable_hash(k, 64), k, v) for k, v in obj.items())
        tag("dict", str(len(items)).encode())
        for _, k, v in items:
            _feed(digest, k)
            _feed(digest, v)
    elif isinstance(obj, list | tuple):
        tag(type(obj).__name__, str(len(obj)).encode())
        for item in obj:
            _feed(digest, item)
    elif isinstance(obj, set | frozenset):
        tag("set", str(len(obj)).encode())
        for h in sorted(stable_hash(item, 64) for item in obj):
            digest.update(h.encode())
    else:
        raise TypeError(
            f"cannot hash a {type(obj).__name__} stably for a cache key: use numbers, strings, "
            "tensors, arrays, lists, dicts, sets or dataclasses of them"
        )


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) of a state dict's names and raw values, in name order."""
    digest = hashlib.sha256()
    for name, p in sorted(state.items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_weights_digest(model: HookedModel) -> str:
    """`weights_digest` of a HookedModel's Hugging Face weights (names and values, each name once:
    `plain_model`), the same under every backend."""
    return weights_digest(model.plain_model.state_dict())


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 (16 hex digits) of what makes a tokenizer tokenise as it does: its vocabulary,
    merges, normaliser and pre-tokeniser (the fast tokenizer's JSON, else its vocabulary), its
    special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the padding and truncation that each call sets for itself
        body = re.sub(r'"(padding|truncation)":(null|\{[^{}]*\})', "", backend.to_str(), count=2)
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
    return stable_hash([type(tokenizer).__name__, body, special, getattr(tokenizer, "chat_template", None)])


def model_fingerprint(model: HookedModel) -> dict:
    """Model id, backend, dtype, a hash of its weights as they are now, its tokenizer
    (`tokenizer_digest`) and the interventions in force (`model.active_interventions`): what a
    cached result of this model depends on.

    The weights are hashed afresh on every call (about 0.4 s for 135M float32 parameters here):
    an edit through `.data`, a NumPy view or `load_state_dict` changes the key, as a fine-tune
    does. Results computed inside `ablate_heads(...)` and friends are keyed apart from clean ones.
    """
    return {
        "model": model.name,
        "backend": model.backend.name,
        "dtype": str(model.dtype),
        "weights_sha256": model_weights_digest(model),
        "tokenizer": tokenizer_digest(model.tokenizer),
        "interventions": stable_hash(list(model.active_interventions), 32),
    }


# ---------------------------------------------------------------------------- safe encoding
def encode(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`(json-able structure, tensors)` for `value`: nested dicts, lists, tuples, strings, numbers,
    None, tensors, NumPy arrays and dataclasses' dicts. Raises `TypeError` for anything else."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if x is None or isinstance(x, bool | str):
            return x
        if isinstance(x, np.bool_):
            return bool(x)
        if isinstance(x, int | np.integer):
            return int(x)
        if isinstance(x, float | np.floating):
            f = float(x)
            return f if math.isfinite(f) else {"__float__": repr(f)}
        if isinstance(x, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": name}
        if isinstance(x, np.ndarray) and x.dtype != object:
            name = f"t{len(tensors)}"
            tensors[name] = torch.from_numpy(np.ascontiguousarray(x).copy())
            return {"__ndarray__": name}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v) for k, v in x.items()}
            return {"__items__": [[walk(k), walk(v)] for k, v in x.items()]}
        raise TypeError(
            f"cannot store a {type(x).__name__} in the cache safely: return tensors, arrays, numbers, "
            "strings, None, or lists / tuples / dicts of them (e.g. dataclasses.asdict(...))"
        )

    try:
        return walk(value), tensors
    except RecursionError:
        raise TypeError("cannot store a value nested this deeply in the cache") from None


def decode(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode`."""
    if isinstance(structure, list):
        return [decode(v, tensors) for v in structure]
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__ndarray__" in structure:
            return tensors[structure["__ndarray__"]].numpy()
        if "__float__" in structure:
            return float(structure["__float__"])
        if "__tuple__" in structure:
            return tuple(decode(v, tensors) for v in structure["__tuple__"])
        if "__items__" in structure:
            return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in structure["__items__"]}
        return {k: decode(v, tensors) for k, v in structure.items()}
    return structure


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


class CacheFileError(ValueError):
    """A cache file that is not a complete mechlens entry for the key it was read for."""


class DiskCache:
    """Results on disk keyed by everything that affects them.

    Each entry is one safetensors file (`<root>/<step>/<digest>.safetensors`, owner-only) whose
    metadata holds the value's structure as JSON and the digest of its key; loading it executes no
    code. Writes are atomic, so an interrupted run that is started again reads every finished
    entry and recomputes only the missing ones. A file that cannot be read, or that belongs to
    another key, is reported (with its path) and recomputed; a read-only cache keeps the computed
    value and warns.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def of(cls, cache: DiskCache | str | Path | bool | None, default: str) -> DiskCache | None:
        """A `DiskCache` from a method's `cache=` argument: None/False (no cache), True (the folder
        `default` under `cache_dir()`), a folder, or a `DiskCache`."""
        if cache is None or cache is False:
            return None
        if cache is True:
            return cls(cache_dir() / default)
        if isinstance(cache, DiskCache):
            return cache
        if isinstance(cache, str | Path):
            return cls(cache)
        raise TypeError(
            f"cache must be None, True/False, a folder or a DiskCache, got {type(cache).__name__}"
        )

    @staticmethod
    def digest(step: str, key: dict) -> str:
        return stable_hash({"step": step, "key": key}, 32)

    @staticmethod
    def check_step(step: str) -> str:
        """`step` as a folder name inside the root: one or more '/'-separated parts, none empty,
        '.', '..' or hidden, no backslash; `ValueError`/`TypeError` otherwise."""
        if not isinstance(step, str):
            raise TypeError(f"step must be a string, got {type(step).__name__}")
        parts = step.split("/")
        if (
            not step
            or "\\" in step
            or "\0" in step
            or any(not p or p in (".", "..") or p.startswith(".") for p in parts)
        ):
            raise ValueError(
                f"step {step!r} must be a relative folder name inside the cache root "
                "(no '..', no leading '/' or '.', no empty parts)"
            )
        return step

    def path(self, step: str, key: dict) -> Path:
        return self.root / self.check_step(step) / f"{self.digest(step, key)}.safetensors"

    def lookup(self, step: str, key: dict) -> tuple[bool, Any]:
        """`(found, value)`; a damaged or foreign file counts as not found (with a warning)."""
        path = self.path(step, key)
        if not path.exists() and not path.is_symlink():
            return False, None
        try:
            return True, self._read(path, self.digest(step, key))
        except (CacheFileError, OSError) as err:
            warnings.warn(f"ignoring cache file {path}: {err}; recomputing it", stacklevel=3)
            return False, None

    def get(self, step: str, key: dict) -> Any | None:
        """The stored value, or None when there is none."""
        return self.lookup(step, key)[1]

    @staticmethod
    def _read(path: Path, digest: str) -> Any:
        from safetensors import SafetensorError
        from safetensors.torch import load

        data = read_regular_file(path)
        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
        except (SafetensorError, ValueError, UnicodeDecodeError, RuntimeError, RecursionError) as err:
            raise CacheFileError(f"not a safetensors file ({err})") from None
        if meta.get("format") != FORMAT:
            raise CacheFileError(f"not a mechlens cache entry (format {meta.get('format')!r})")
        if meta.get("key") != digest:
            raise CacheFileError("entry belongs to another key")
        try:
            return decode(json.loads(meta["value"]), tensors)
        except (KeyError, ValueError, TypeError, RecursionError) as err:
            raise CacheFileError(f"malformed value ({err})") from None

    def put(self, step: str, key: dict, value: Any) -> None:
        """Store `value` (see `encode` for what it may hold); warns instead of failing when the
        folder cannot be written."""
        from safetensors.torch import save

        structure, tensors = encode(value)
        meta = {"format": FORMAT, "key": self.digest(step, key), "value": json.dumps(structure)}
        path = self.path(step, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            remove_stale_temporaries(path.parent)
            atomic_write_bytes(path, save(tensors, metadata=meta), mode=0o600)
        except OSError as err:
            warnings.warn(f"could not write cache file {path} ({err}); keeping the result in memory only",
                          stacklevel=3)  # fmt: skip

    def cached(self, step: str, compute: Callable[[], Any], **key: Any) -> Any:
        """`compute()` once per distinct key; later calls read the stored value (None included)."""
        found, value = self.lookup(step, key)
        if not found:
            value = compute()
            self.put(step, key, value)
        return value
