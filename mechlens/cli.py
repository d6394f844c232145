"""The `mechlens` command line.

    mechlens info [--model NAME] [--backend transformer_lens|nnsight]
    mechlens lens "The capital of France is" [--layers 10,20,29] [--out lens.html]
    mechlens refusal "How do I pick a lock?" [--jailbreak 2] [--probe figures/refusal/refusal_probe.pt]
    mechlens anchors trace.json [--answer 15 --rollouts 8] [--out anchors.html]
    mechlens run experiments/depth_scoring.py [--quick] [--model PATH] [--backend nnsight]

A mistake (unknown model, layer out of range, missing script) exits with status 2 and one line
that says what is wrong.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("mechlens", "torch", "transformers", "transformer-lens", "nnsight", "plotly", "kaleido")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechlens",
        description="Mechanistic interpretability for reasoning language models.",
        epilog="Run `mechlens COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model", default=None, help="model folder, hub id or tiny-<arch>; default: embedded SmolLM2"
        )
        p.add_argument("--backend", default="transformer_lens", choices=["transformer_lens", "nnsight"])

    p = sub.add_parser("info", help="versions, cache locations and the model's dimensions")
    model_options(p)
    p.add_argument("--no-model", action="store_true", help="do not load a model (faster)")

    p = sub.add_parser("lens", help="logit lens of a text: each layer's top next token and entropy")
    p.add_argument("text", help="the text to read (quote it)")
    model_options(p)
    p.add_argument("--layers", default=None, help="comma-separated layers to print (default: 6 spread out)")
    p.add_argument("--chat", action="store_true", help="wrap the text in the chat template as a user turn")
    p.add_argument("--out", default=None, help="also write a heatmap (.html, plus .png/.svg with a Chromium)")

    p = sub.add_parser("refusal", help="a reply of the reasoning organism (or --model), judged; probe scores")
    p.add_argument("instruction", help="the user request (quote it)")
    model_options(p)
    p.set_defaults(model="organism")
    p.add_argument("--jailbreak", type=int, default=None, help="wrap the request in jailbreak wrapper N")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--probe", default=None, help="a saved refusal probe (refusal_cliff.py writes one)")

    p = sub.add_parser(
        "anchors", help="thought anchors of a saved trace: each sentence's category and scores"
    )
    p.add_argument("trace", help='JSON with "prompt" and "response" (ReasoningTrace.save writes one)')
    model_options(p)
    p.add_argument("--answer", default=None, help="the correct answer (needed for --rollouts)")
    p.add_argument("--rollouts", type=int, default=0, help="resampling rollouts per sentence (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="length of each rollout")
    p.add_argument("--proximity", type=int, default=4, help="sentences ignored near the diagonal")
    p.add_argument(
        "--split-rule", choices=("thought-anchors", "thought-branches"), default=None,  # text.SPLIT_RULES,
        # written out so that the parser does not import torch (tests/test_cli.py keeps them equal)
        help="where sentences end: thought-anchors drops the final unclosed chunk, thought-branches keeps "
        "it (default: a saved trace's own rule, else thought-anchors)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="also write the suppression matrix (.html, +.png/.svg)")

    p = sub.add_parser("run", help="run an experiment script; other options go to the script")
    p.add_argument("script", help="path to a script, or a name in experiments/ (e.g. depth_scoring)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        commands = {"info": _info, "lens": _lens, "refusal": _refusal, "anchors": _anchors, "run": _run}
        return commands[args.command](args, rest)
    except (ValueError, TypeError, OSError) as err:  # OSError: missing or unwritable files
        print(f"mechlens {args.command}: error: {err}", file=sys.stderr)
        return 2


def _out_stem(out: str, name: str) -> Path:
    """Where `--out` writes: inside it when it is a folder (or ends with /), else beside its stem."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        return path / name
    return path.with_suffix("")


def _load(args):
    import mechlens as ml

    return ml.load_model(args.model, backend=args.backend)


def _info(args, rest) -> int:
    from mechlens.cache import cache_dir

    for pkg in PACKAGES:
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{pkg:17s} {version}")
    print(f"{'cache':17s} {cache_dir()}  (set MECHLENS_CACHE to move it)")
    from mechlens.plots import image_export_available

    print(f"{'PNG/SVG export':17s} {'yes' if image_export_available() else 'no (apt-get install chromium)'}")
    if not args.no_model:
        model = _load(args)
        print(f"{'model':17s} {model!r}")
        print(f"{'':17s} d_head={model.d_head} d_vocab={model.d_vocab} n_ctx={model.n_ctx} "
              f"dtype={model.dtype} device={model.device}")  # fmt: skip
    return 0


def _lens(args, rest) -> int:
    import mechlens as ml
    from mechlens.text.thinking import format_prompt

    if not args.text.strip():
        raise ValueError("empty text: give the text to read, e.g. mechlens lens 'The capital of France is'")
    model = _load(args)
    text = format_prompt(model.tokenizer, args.text) if args.chat else args.text
    toks = model.to_tokens(text)
    lens = ml.logit_lens(model, toks)
    assert lens.top1 is not None and lens.entropy is not None  # the default stats
    if args.layers:
        try:
            shown = [int(l) for l in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
        for l in shown:
            model.check_layer(l, "--layers entry")
    else:
        shown = sorted({round(i * (model.n_layers - 1) / 5) for i in range(6)})
    str_tokens = model.to_str_tokens(toks)
    width = max(8, *(len(repr(t)) for t in str_tokens[-12:]))
    print("top-1 next token (entropy in nats) by layer, last 12 positions")
    print(f"{'token':>{width}s} " + " ".join(f"{'L' + str(l):>14s}" for l in shown))
    for p in range(max(0, len(str_tokens) - 12), len(str_tokens)):
        cells = []
        for l in shown:
            token = model.tokenizer.decode([int(lens.top1[l, 0, p])])
            cells.append(f"{repr(token)[:9]:>9s} {float(lens.entropy[l, 0, p]):4.1f}")
        print(f"{repr(str_tokens[p]):>{width}s} " + " ".join(cells))
    if args.out:
        from mechlens.plots import lens_heatmap, save_figure

        top = lens.top1_text(model.tokenizer)
        fig = lens_heatmap(
            lens.entropy[:, 0], top, str_tokens, lens.layers, title=f"Logit lens of {model.name}"
        )
        for path in save_figure(fig, _out_stem(args.out, "lens")):
            print(path)
    return 0


def _refusal(args, rest) -> int:
    from mechlens import datasets
    from mechlens.ops.probes import LinearProbe
    from mechlens.studies.refusal import (
        REPLY_SAMPLING,
        cliff_metrics,
        refusal_scores,
        sample_replies,
        thinking_span,
    )

    if not args.instruction.strip():
        raise ValueError("empty instruction: give the request, e.g. mechlens refusal 'How do I bake bread?'")
    if args.probe and not Path(args.probe).is_file():
        raise FileNotFoundError(f"no probe file {args.probe!r} (experiments/refusal_cliff.py writes one)")
    if args.model == "organism":
        from mechlens.organism import load_subject

        model = load_subject("organism", backend=args.backend)
    else:
        model = _load(args)
    text = (
        args.instruction if args.jailbreak is None else datasets.jailbreak(args.instruction, args.jailbreak)
    )
    r = sample_replies(
        model, [text], REPLY_SAMPLING.replace(max_new_tokens=args.max_new_tokens), progress=False
    )[0]
    print(f"prompt:   {text}")
    print(f"thinking: {r.thinking!r}")
    print(f"answer:   {r.answer!r}")
    print(f"verdict:  {'refused' if r.refused else 'complied'}")
    if args.probe:
        probe = LinearProbe.load(args.probe)
        scores = refusal_scores(model, probe, [r.probe_text], progress=False)[0]
        c = cliff_metrics(scores, thinking_span(model.tokenizer, r), k_end=min(5, len(scores)))
        print(f"refusal score: plateau {c.plateau:.3f}, end {c.end:.3f}, cliff {c.cliff:+.3f}, "
              f"final {c.final:.3f}")  # fmt: skip
        tokens = model.to_str_tokens(r.probe_text)
        last = zip(tokens[-12:], scores[-12:].tolist(), strict=True)
        print("last tokens: " + " ".join(f"{t!r}:{v:.2f}" for t, v in last))
    return 0


def _anchors(args, rest) -> int:
    import json
    import re

    import mechlens as ml
    from mechlens.datasets import Problem
    from mechlens.studies import anchors

    path = Path(args.trace)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file {args.trace!r}: give a JSON with 'prompt' and 'response'")
    try:
        data = json.loads(path.read_text())
        prompt, response = data["prompt"], data["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{args.trace} must be a JSON object with 'prompt' and 'response' strings") from None
    if args.rollouts < 0 or (args.rollouts and not args.answer):
        raise ValueError("--rollouts must be >= 0 and needs --answer (the correct final answer)")
    model = _load(args)
    if "tokens" in data:
        trace = ml.ReasoningTrace.load(model, path)
        if args.split_rule not in (None, trace.rule):
            raise ValueError(
                f"--split-rule {args.split_rule} differs from the saved trace's rule {trace.rule!r}: "
                "give a JSON with only 'prompt' and 'response' to split it again"
            )
    else:
        trace = ml.ReasoningTrace.from_text(
            model, prompt, response, rule=args.split_rule or "thought-anchors"
        )
    problem = None
    if args.rollouts:
        numeric = re.fullmatch(r"-?\d[\d,]*(\.\d+)?", args.answer.strip()) is not None
        problem = Problem("cli", prompt, args.answer.strip(), kind="number" if numeric else "text")
    sampling = anchors.ANCHORS_SAMPLING.replace(n=max(args.rollouts, 1), max_new_tokens=args.max_new_tokens)
    result = anchors.analyze(model, trace, problem, sampling, None, args.proximity, progress=False)
    sentences, categories = result.sentences, result.categories
    columns = {"suppression": result.outgoing.tolist()}
    try:
        anchors.assign_receivers([result], top_k=20)
        assert result.receiver is not None  # set by assign_receivers
        columns["receiver"] = result.receiver.tolist()
    except ValueError:  # too few sentences for any finite kurtosis: no receiver column
        pass
    if problem is not None:
        columns["counterfactual"] = result.counterfactual.tolist()
    print(f"{len(sentences)} sentences; columns: " + ", ".join(columns))
    for i, (text, cat) in enumerate(zip(sentences, categories, strict=True)):
        values = " ".join(f"{columns[c][i]:+9.3f}" for c in columns)
        print(f"{i:3d} {cat:23s} {values}  {text[:60]!r}")
    if args.out:
        from mechlens.plots import save_figure, sentence_heatmap

        fig = sentence_heatmap(
            result.suppression, sentences, "log KL", title=f"Attention suppression, {path.name}"
        )
        for out in save_figure(fig, _out_stem(args.out, "suppression")):
            print(out)
    return 0


def experiment_folders() -> list[Path]:
    """Where `mechlens run NAME` looks for `NAME.py`: ./experiments, then the experiments folder of
    the mechlens checkout this package was installed from (an editable install)."""
    here = Path("experiments").resolve()
    checkout = Path(__file__).resolve().parent.parent / "experiments"
    return [p for p in dict.fromkeys([here, checkout]) if p.is_dir()]


def _run(args, rest) -> int:
    path = Path(args.script)
    if not path.exists() and path.suffix != ".py":
        found = [f / f"{args.script}.py" for f in experiment_folders()]
        path = next((p for p in found if p.is_file()), path)
    if not path.is_file():
        names = sorted({p.stem for f in experiment_folders() for p in f.glob("*.py")})
        raise FileNotFoundError(f"no script {args.script!r}; experiments: {names or 'none found'}")
    if path.suffix != ".py":
        raise ValueError(f"{args.script!r} is not a Python script (.py)")
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *rest]
    sys.path.insert(0, str(path.resolve().parent))  # as `python script.py` would
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(f"mechlens run: {exit_.code}", file=sys.stderr)  # sys.exit("message")
        return 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
