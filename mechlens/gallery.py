"""The figure gallery: `figures/README.md` with every figure, its caption and the command that
made it, read from the provenance JSON written beside each figure.

    python -m mechlens.gallery [figures]

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

import json
import sys
from pathlib import Path

from mechlens.cache import atomic_write_text


def write_gallery(root: str | Path = "figures") -> Path:
    """Write `root/README.md` listing every figure that has a provenance file, folder by folder."""
    root = Path(root)
    entries = sorted(root.rglob("*.provenance.json"))
    if not entries:
        raise ValueError(f"no figures with provenance under {root}: run an experiment first")
    lines = [
        "# Figures",
        "",
        "Made by the experiments in `experiments/` (`make figures`, or `make demo` for `demo/`). "
        "Each figure has an interactive `.html` beside it and a `.provenance.json` with the commit, "
        "package versions, model hash, config and wall time. This page is written by "
        "`python -m mechlens.gallery figures`.",
    ]
    folder = None
    for path in entries:
        info = json.loads(path.read_text())
        stem = path.name[: -len(".provenance.json")]
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


if __name__ == "__main__":
    print(write_gallery(sys.argv[1] if len(sys.argv) > 1 else "figures"))
