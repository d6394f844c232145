"""The figure gallery: `figures/README.md` with every figure, its caption and the command that
made it, read from the provenance JSON written beside each figure; and for a run such as
`make demo`, `index.html` (a page that opens offline and links every figure with its caption)
and a report of each study's summary (`Run.summarize`) with the path of every figure.

    python -m mechlens.gallery [figures]            # figures/README.md
    python -m mechlens.gallery figures/demo --report   # figures/demo/index.html and the report

Example:
    >>> import json, tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "depth").mkdir()
    >>> _ = (root / "depth" / "roc.png").write_bytes(b"")
    >>> _ = (root / "depth" / "roc.provenance.json").write_text(json.dumps(
    ...     {"caption": "ROC curves.", "command": "experiments/depth_scoring.py", "git_commit": "abc"}))
    >>> print(write_gallery(root).read_text().splitlines()[-1])
    ![ROC curves.](depth/roc.png)
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

from mechlens.cache import atomic_write_text


def _figures(root: Path) -> list[tuple[Path, dict]]:
    entries = sorted(root.rglob("*.provenance.json"))
    if not entries:
        raise ValueError(f"no figures with provenance under {root}: run an experiment first")
    return [
        (path.with_name(path.name[: -len(".provenance.json")]), json.loads(path.read_text()))
        for path in entries
    ]


def write_gallery(root: str | Path = "figures") -> Path:
    """Write `root/README.md` listing every figure that has a provenance file, folder by folder."""
    root = Path(root)
    figures = _figures(root)
    lines = [
        "# Figures",
        "",
        "Made by the experiments in `experiments/` (`make figures`, or `make demo` for `demo/`). "
        "Each figure has an interactive `.html` beside it and a `.provenance.json` with the commit, "
        "package versions, model hash, config and wall time. This page is written by "
        "`python -m mechlens.gallery figures`.",
    ]
    folder = None
    for path, info in figures:
        stem = path.name
        rel = path.parent.relative_to(root)
        if rel != folder:
            folder = rel
            lines += ["", f"## {rel.as_posix() if str(rel) != '.' else 'figures'}"]
        caption = info.get("caption") or stem
        command = info.get("command") or "?"
        commit = (info.get("git_commit") or "")[:10]
        png = path.with_name(f"{stem}.png")
        target = (rel / (png.name if png.exists() else f"{stem}.html")).as_posix()
        lines += ["", f"**{stem}**: {caption} (`python {command}`, commit {commit or '?'})", ""]
        lines.append(f"![{caption}]({target})" if png.exists() else f"[{stem} (interactive HTML)]({target})")
    out = root / "README.md"
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def write_index(root: str | Path, figures: list[tuple[Path, dict]] | None = None) -> Path:
    """Write `root/index.html`: every figure under `root`, folder by folder, as a link to its
    interactive HTML (and its PNG inline when there is one) with its caption and command
    (`figures`: `_figures(root)` when the caller has read them already).

        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "roc.html").write_text("<html></html>")
        >>> _ = (root / "roc.provenance.json").write_text(json.dumps({"caption": "ROC <curves>."}))
        >>> "ROC &lt;curves&gt;." in write_index(root).read_text()
        True
    """
    root = Path(root)
    body, folder = [], None
    for stem, info in _figures(root) if figures is None else figures:
        rel = stem.parent.relative_to(root)
        if rel != folder:
            folder = rel
            body.append(f"<h2>{html.escape(rel.as_posix() if str(rel) != '.' else root.name)}</h2>")
        caption = html.escape(info.get("caption") or stem.name)
        link = html.escape((rel / f"{stem.name}.html").as_posix())
        png = stem.with_name(f"{stem.name}.png")
        image = (
            f'<br><img src="{html.escape((rel / png.name).as_posix())}" width="640">' if png.exists() else ""
        )
        command = html.escape(info.get("command") or "")
        body.append(
            f'<p><a href="{link}"><b>{html.escape(stem.name)}</b></a>: {caption}'
            f"<br><small><code>python {command}</code></small>{image}</p>"
        )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>mechlens figures</title>'
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}</style></head><body>"
        f"<h1>Figures in {html.escape(root.as_posix())}</h1>" + "\n".join(body) + "</body></html>\n"
    )
    out = root / "index.html"
    atomic_write_text(out, page)
    return out


def report(root: str | Path) -> str:
    """Each study's summary under `root` (the `summary.json` files `Run.summarize` writes; the
    folder's own first), the path of every figure, and the gallery page (written by
    `write_index`)."""
    root = Path(root)
    figures = _figures(root)  # the provenance files, read once for the page and the list
    index = write_index(root, figures)
    lines = []
    for path in sorted(root.rglob("summary.json"), key=lambda p: (len(p.relative_to(root).parts), p)):
        summary = json.loads(path.read_text())
        lines += [summary.get("title", path.parent.name), *[f"  {x}" for x in summary.get("lines", [])], ""]
    lines.append("Figures:")
    lines += [f"  {stem.as_posix()}.html  {info.get('caption', '')}" for stem, info in figures]
    lines += ["", f"Open {index.as_posix()} for every figure with its caption."]
    return "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--report"]
    folder = args[0] if args else "figures"
    print(report(folder) if "--report" in sys.argv[1:] else write_gallery(folder))
