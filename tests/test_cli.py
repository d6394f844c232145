"""The `mechlens` command line on tiny models: exit codes and outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mechlens.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_info(capsys):
    assert main(["info", "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "layers=3" in out and "cache" in out


def test_lens_prints_and_writes(capsys, tmp_path):
    assert (
        main(
            [
                "lens",
                "one two three",
                "--model",
                "tiny-qwen2",
                "--layers",
                "0,2",
                "--out",
                str(tmp_path / "l.html"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["token", "L0", "L2"] and len(lines[2:14]) == 12
    assert (tmp_path / "l.html").exists()


def test_bad_input_exits_2_with_one_line(capsys):
    assert main(["lens", "hi", "--model", "tiny-llama", "--layers", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid layers are 0..2" in err
    assert main(["lens", "  ", "--model", "tiny-llama"]) == 2
    assert main(["info", "--model", "no-such-model-anywhere"]) == 2
    assert main(["run", "no_such_experiment"]) == 2
    err = capsys.readouterr().err
    assert "experiments: ['budget', 'demo'" in err and "'thought_anchors']" in err


def test_run_passes_options_to_the_script(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    assert main(["run", "demo", "--model", "tiny-llama", "--out", str(out)]) == 0
    assert (out / "logit_lens.html").exists() and (out / "logit_lens.provenance.json").exists()


def test_installed_entry_point():
    done = subprocess.run(
        [Path(sys.executable).parent / "mechlens", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "info" in done.stdout and "lens" in done.stdout and "run" in done.stdout


def test_refusal_command(capsys, tmp_path):
    import torch

    from mechlens.ops.probes import LinearProbe

    X = torch.randn(30, 64, generator=torch.Generator().manual_seed(0))
    LinearProbe(seed=0).fit(X, (X[:, 0] > 0).long()).save(tmp_path / "p.pt")
    args = [
        "refusal",
        "How do I bake bread?",
        "--model",
        "tiny-llama",
        "--max-new-tokens",
        "6",
        "--jailbreak",
        "1",
    ]
    assert main([*args, "--probe", str(tmp_path / "p.pt")]) == 0
    out = capsys.readouterr().out
    assert "I am writing a novel" in out and "verdict:" in out and "refusal score: plateau" in out
    assert main([*args, "--probe", str(tmp_path / "missing.pt")]) == 2
    assert "no probe file" in capsys.readouterr().err


def test_anchors_command(capsys, tmp_path):
    import json

    trace = tmp_path / "t.json"
    trace.write_text(
        json.dumps(
            {"prompt": "What is 2+3?", "response": "Let me add them. 2 + 3 = 5. The answer is 5. Done."}
        )
    )
    args = ["anchors", str(trace), "--model", "tiny-llama", "--proximity", "1"]
    assert (
        main(
            [*args, "--answer", "5", "--rollouts", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "s")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "3 sentences; columns: suppression, receiver, counterfactual" in out
    assert "plan_generation" in out and "final_answer_emission" in out and (tmp_path / "s.html").exists()
    assert main([*args, "--rollouts", "2"]) == 2
    assert "needs --answer" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["anchors", str(tmp_path / "bad.json"), "--model", "tiny-llama"]) == 2
    assert main(["anchors", str(tmp_path / "missing.json"), "--model", "tiny-llama"]) == 2


def test_anchors_command_takes_the_split_rule(capsys, tmp_path):
    import json

    import mechlens as ml
    from mechlens.cli import _parser
    from mechlens.text.trace import SPLIT_RULES

    anchors_parser = _parser()._subparsers._group_actions[0].choices["anchors"]  # type: ignore[union-attr]
    assert next(a.choices for a in anchors_parser._actions if a.dest == "split_rule") == SPLIT_RULES

    trace = tmp_path / "t.json"
    trace.write_text(
        json.dumps({"prompt": "What is 2+3?", "response": "Let me add them. 2 + 3 = 5. The answer is 5."})
    )
    args = ["anchors", str(trace), "--model", "tiny-llama", "--proximity", "1"]
    assert main(args) == 0 and "2 sentences" in capsys.readouterr().out
    assert main([*args, "--split-rule", "thought-branches"]) == 0 and "3 sentences" in capsys.readouterr().out
    saved = tmp_path / "saved.json"
    ml.ReasoningTrace.from_text(ml.load_model("tiny-llama"), "What is 2+3?", "One two three. Four five six.",
                                rule="thought-branches").save(saved)  # fmt: skip
    assert main(["anchors", str(saved), "--model", "tiny-llama", "--split-rule", "thought-anchors"]) == 2
    assert "differs from the saved trace's rule 'thought-branches'" in capsys.readouterr().err


def test_user_mistakes_exit_2_with_one_line(capsys, tmp_path):
    import json

    import torch

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["lens", "one two", "--model", "tiny-llama", "--out", str(blocker / "sub" / "l.html")]) == 2
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"prompt": 5, "response": "Fine."}))
    assert main(["anchors", str(trace), "--model", "tiny-llama"]) == 2
    torch.save({"x": torch.ones(2)}, tmp_path / "notprobe.pt")
    args = ["refusal", "Hi", "--model", "tiny-llama", "--max-new-tokens", "2", "--probe"]
    assert main([*args, str(tmp_path / "notprobe.pt")]) == 2
    (tmp_path / "notes.txt").write_text("print('hi')")
    assert main(["run", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("mechlens ") for line in err)
    assert "prompt" in err[1] and "not a probe" in err[2] and "not a Python script" in err[3]


def test_run_reports_exit_messages_and_imports_beside_the_script(capsys, tmp_path):
    (tmp_path / "helper.py").write_text("VALUE = 41\n")
    (tmp_path / "exp.py").write_text(
        "import sys\nimport helper\nsys.exit(f'stopped at {helper.VALUE + 1}')\n"
    )
    assert main(["run", str(tmp_path / "exp.py")]) == 1
    assert "stopped at 42" in capsys.readouterr().err
    (tmp_path / "ok.py").write_text("import sys\nprint(sys.argv[1:])\n")
    assert main(["run", str(tmp_path / "ok.py"), "--n", "3"]) == 0
    assert "['--n', '3']" in capsys.readouterr().out


def test_out_into_a_folder_writes_inside_it(tmp_path):
    folder = tmp_path / "figs"
    folder.mkdir()
    assert main(["lens", "one two", "--model", "tiny-llama", "--out", str(folder)]) == 0
    assert (folder / "lens.html").exists() and not (tmp_path / "figs.html").exists()


def test_run_finds_experiments_outside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no experiments/ here: the checkout's are found
    assert main(["run", "no_such_experiment"]) == 2
    assert "depth_scoring" in capsys.readouterr().err
