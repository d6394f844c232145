"""Experiment runner: seeds, provenance, a resumable on-disk cache with atomic writes, figures.

Example:
    >>> import tempfile, mechlens as ml
    >>> run = Run("doc", {"n": 3}, out_dir=tempfile.mkdtemp(), cache_root=tempfile.mkdtemp())
    >>> run.cached("square", lambda: 3 ** 2, n=3)   # computed once, then read from disk
    9
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

_PACKAGES = ("mechlens", "torch", "transformers", "transformer-lens", "nnsight", "numpy", "plotly")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-able description (dataclasses, tensors and paths allowed)."""
    return hashlib.sha256(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return {"tensor": hashlib.sha256(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest()}
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


def model_fingerprint(model) -> dict:
    """Model id, backend, dtype and a hash of its weights (cached on the model object)."""
    if not hasattr(model, "_fingerprint"):
        digest = hashlib.sha256()
        for name, p in sorted(model.hf_model.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        model._fingerprint = {
            "model": model.name,
            "backend": model.backend,
            "dtype": str(model.dtype),
            "weights_sha256": digest.hexdigest()[:16],
        }
    return model._fingerprint


def provenance(config: Any = None, model=None, wall_time_s: float | None = None) -> dict:
    """What produced an output: git commit, package versions, machine, model, config, time."""
    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_commit": commit or None,
        "git_dirty": dirty,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "model": model_fingerprint(model) if model is not None else None,
        "config": _jsonable(config),
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 2),
    }


class DiskCache:
    """Results on disk keyed by everything that affects them; writes are atomic.

    An interrupted run that is started again reads every finished entry and recomputes only
    the missing ones.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str, key: dict) -> Path:
        return self.root / name / f"{stable_hash(key)}.pt"

    def get(self, name: str, key: dict) -> Any | None:
        path = self.path(name, key)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=False)

    def put(self, name: str, key: dict, value: Any) -> None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        atomic_write_bytes(self.path(name, key), buffer.getvalue())

    def cached(self, name: str, compute: Callable[[], Any], **key: Any) -> Any:
        """`compute()` once per distinct key; later calls read the stored value."""
        value = self.get(name, key)
        if value is None:
            value = compute()
            self.put(name, key, value)
        return value


class Run:
    """One experiment run: fixed seed, an output folder, a cache, provenance beside each output.

    Args:
        name: experiment name (cache namespace).
        config: a dataclass or dict; part of every cache key and of the provenance.
        out_dir: where figures go.
        model: the HookedModel used (its id and weight hash join the cache keys).
        cache_root: defaults to `<mechlens cache dir>/runs`.
    """

    def __init__(
        self,
        name: str,
        config: Any,
        out_dir: str | Path,
        model=None,
        seed: int = 0,
        cache_root: str | Path | None = None,
    ):
        from mechlens.models.loading import cache_dir

        self.name, self.config, self.model, self.seed = name, config, model, seed
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cache = DiskCache(Path(cache_root or cache_dir() / "runs") / name)
        self.started = time.perf_counter()
        self.outputs: list[Path] = []
        seed_everything(seed)

    def cached(self, step: str, compute: Callable[[], Any], config: bool = True, **key: Any) -> Any:
        """Cache `compute()` under the step name, the model, the seed and `key`, and the whole
        config unless `config=False` (then `key` must name every setting the step depends on,
        so that changing an unrelated setting keeps the stored result)."""
        full_key = {"seed": self.seed, **key}
        if config:
            full_key["config"] = self.config
        if self.model is not None:
            full_key["model"] = model_fingerprint(self.model)
        return self.cache.cached(step, compute, **full_key)

    def provenance(self) -> dict:
        return provenance(self.config, self.model, time.perf_counter() - self.started)

    def save_figure(self, fig, stem: str, caption: str = "") -> list[Path]:
        """Write `fig` as HTML (+ PNG/SVG when a Chromium is present) with provenance beside it."""
        from mechlens.plots import save_figure

        paths = save_figure(fig, self.out_dir / stem)
        info = {**self.provenance(), "caption": caption, "command": " ".join(sys.argv)}
        atomic_write_text(self.out_dir / f"{stem}.provenance.json", json.dumps(info, indent=1))
        self.outputs.extend(paths)
        return paths


def parse_config(config_cls: type, argv: list[str] | None = None, description: str = ""):
    """Build a config dataclass from command-line flags named after its fields.

    >>> @dataclasses.dataclass
    ... class C:
    ...     n: int = 2
    ...     quick: bool = False
    >>> parse_config(C, ["--n", "5", "--quick"])
    C(n=5, quick=True)
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type))
            kind = kind or (f.type if f.type in (int, float) else str)
            parser.add_argument(flag, type=kind, default=f.default, help=f"default: {f.default}")
    args = parser.parse_args(argv)
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
