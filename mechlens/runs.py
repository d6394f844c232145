"""Experiment runner (for scripts in `experiments/`): seeds, provenance beside each output, a
resumable on-disk cache per experiment, figures, and typed command-line configuration.

The cache itself (`DiskCache`, hashing, atomic writes) is `mechlens.cache`.

Example:
    >>> import tempfile, mechlens as ml
    >>> run = Run("doc", {"n": 3}, out_dir=tempfile.mkdtemp(), cache_root=tempfile.mkdtemp())
    >>> run.cached("square", lambda: 3 ** 2, n=3)   # computed once, then read from disk
    9
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from mechlens.cache import (
    DiskCache,
    atomic_write_text,
    cache_dir,
    model_fingerprint,
    write_json,
)

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

_PACKAGES = ("mechlens", "torch", "transformers", "transformer-lens", "nnsight", "numpy", "plotly")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def provenance(
    config: Any = None, model: HookedModel | None = None, wall_time_s: float | None = None
) -> dict:
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
    versions: dict[str, str | None] = {}
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
        "config": _describe(config),
        "wall_time_s": None if wall_time_s is None else round(wall_time_s, 2),
    }


class Run:
    """One experiment run: fixed seed, an output folder, a cache, provenance beside each output.

    Args:
        name: experiment name (cache namespace).
        config: a dataclass or dict; part of every cache key and of the provenance.
        out_dir: where figures go.
        model: the HookedModel used (its id and weight hash join the cache keys).
        cache_root: defaults to `<mechlens cache dir>/runs`.
        images: also write PNG and SVG beside each figure's HTML (when a Chromium is present;
            about 3 s per image).
    """

    def __init__(
        self,
        name: str,
        config: Any,
        out_dir: str | Path,
        model: HookedModel | None = None,
        seed: int = 0,
        cache_root: str | Path | None = None,
        images: bool = True,
    ):
        self.name, self.config, self.model, self.seed = name, config, model, seed
        self.images = images
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

    def save_json(self, name: str, obj: Any) -> Path:
        """Write `obj` as strict JSON to `<out_dir>/<name>` (NaN as null), atomically."""
        path = self.out_dir / name
        write_json(path, obj)
        self.outputs.append(path)
        return path

    def summarize(self, title: str, lines: Sequence[str]) -> Path:
        """Print the run's headline results under `title` to stdout (one line each: a number with
        its n and interval), and write them with the paths of the run's figures to
        `<out_dir>/summary.json`, which `python -m mechlens.gallery DIR --report` gathers."""
        lines = [lines] if isinstance(lines, str) else list(lines)  # a generator is read once
        if not isinstance(title, str) or not all(isinstance(x, str) for x in lines):
            raise TypeError("title must be a string and lines a list of strings")
        figures = [p.as_posix() for p in self.outputs if p.suffix == ".html"]
        print(f"\n{title}\n" + "\n".join(f"  {line}" for line in lines))
        return self.save_json("summary.json", {"title": title, "lines": list(lines), "figures": figures})

    def save_figure(self, fig, stem: str, caption: str = "") -> list[Path]:
        """Write `fig` as HTML (+ PNG/SVG when `images` and a Chromium is present) with provenance
        beside it."""
        from mechlens.plots import save_figure

        paths = save_figure(fig, self.out_dir / stem, images=self.images)
        info = {**self.provenance(), "caption": caption, "command": " ".join(sys.argv)}
        atomic_write_text(self.out_dir / f"{stem}.provenance.json", json.dumps(info, indent=1))
        self.outputs.extend(paths)
        return paths


def _describe(config: Any) -> Any:
    """A JSON-able copy of a config (dataclass or dict) for the provenance."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(config, default=str))


def _option_type(hint: Any) -> tuple[Callable[[str], Any] | None, list | None, bool]:
    """`(converter, choices, optional)` of a config field's type hint: `int`, `float`, `str`,
    `Literal[...]`, and any of them `| None` (the word "none" then gives None)."""
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) != 1:
            raise TypeError(f"config fields take one type (optionally | None), got {hint}")
        hint = rest[0]
    if typing.get_origin(hint) is Literal:
        choices = list(typing.get_args(hint))
        kind = type(choices[0])
        return kind, choices, optional
    if hint in (int, float, str):
        return hint, None, optional
    raise TypeError(f"unsupported config field type {hint}: use bool, int, float, str or Literal[...]")


def parse_config(config_cls: type, argv: list[str] | None = None, description: str = ""):
    """Build a config dataclass from command-line flags named after its fields, typed by its
    annotations (`int | None` takes a number or `none`; `Literal[...]` lists its choices).

    >>> @dataclasses.dataclass
    ... class C:
    ...     n: int = 2
    ...     limit: int | None = None
    ...     quick: bool = False
    >>> parse_config(C, ["--n", "5", "--limit", "40", "--quick"])
    C(n=5, limit=40, quick=True)
    """
    hints = typing.get_type_hints(config_cls)
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        kind, choices, optional = _option_type(hint)

        def convert(text: str, kind=kind, optional=optional):
            return None if optional and text.lower() == "none" else kind(text)

        convert.__name__ = getattr(kind, "__name__", "value")  # argparse names it in errors
        parser.add_argument(
            flag, type=convert, choices=choices, default=f.default, help=f"default: {f.default}"
        )
    args = parser.parse_args(argv)
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})
