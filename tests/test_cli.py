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
    assert "experiments: ['demo'" in capsys.readouterr().err


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
        json.dumps({"prompt": "What is 2+3?", "response": "Let me add them. 2 + 3 = 5. The answer is 5."})
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
