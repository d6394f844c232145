"""The endpoint engine against a real vLLM server (vLLM's CPU build, `make vllm`), started here on
127.0.0.1 serving the embedded model's Hugging Face folder, and stopped at the end."""

from __future__ import annotations

import threading
import time

import pytest

import mechlens as ml
from mechlens import Sampling
from mechlens.models.loading import embedded_weights_dir
from mechlens.rollouts import EndpointEngine, EndpointError, LocalEngine, VLLMServer, vllm_python
from mechlens.studies.anchors.resampling import sample_from_prefixes

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["What is 2 + 2?", "Name a colour of the sky.", "Write one word about cats."]


@pytest.fixture(scope="module")
def server():
    try:
        python = vllm_python()
    except FileNotFoundError as err:
        pytest.skip(f"vLLM's CPU build is not installed here ({err})")
    with VLLMServer(embedded_weights_dir(), name="smollm2", python=python) as running:
        yield running


@pytest.fixture(scope="module")
def model():
    return ml.load_model()


def prompt_ids(model, text: str) -> list[int]:
    return model.tokenizer.encode(ml.format_prompt(model.tokenizer, text), add_special_tokens=False)


def test_greedy_continuations_equal_the_hooked_engine(server, model):
    engine = EndpointEngine(server.url, "smollm2", tokenizer=model.tokenizer)
    ids = [prompt_ids(model, p) for p in PROMPTS]
    greedy = Sampling(max_new_tokens=12, temperature=0)
    assert engine.sample(ids, greedy) == LocalEngine(model, path="hooked").sample(ids, greedy)


def test_sampled_first_tokens_are_statistically_compatible(server, model):
    """Chi-square test of homogeneity over the first sampled token (T 0.6, 300 draws each)."""
    from scipy.stats import chi2_contingency

    ids = [prompt_ids(model, "Pick a random animal and name it.")]
    sampling = Sampling(max_new_tokens=1, temperature=0.6, n=300, seed=1)
    ours = [r[0] for r in LocalEngine(model, batch_size=300).sample(ids, sampling)[0]]
    theirs = [r[0] for r in EndpointEngine(server.url, "smollm2").sample(ids, sampling)[0]]
    tokens = sorted(set(ours) | set(theirs))
    table = [[ours.count(t) for t in tokens], [theirs.count(t) for t in tokens]]
    keep = [k for k in range(len(tokens)) if table[0][k] + table[1][k] >= 10]
    rest = [sum(row) - sum(row[k] for k in keep) for row in table]
    counts = [[row[k] for k in keep] + ([r] if sum(rest) else []) for row, r in zip(table, rest, strict=True)]
    assert len(counts[0]) >= 2, "the prompt should have more than one likely first token"
    assert chi2_contingency(counts).pvalue > 0.001, counts


def test_seeded_samples_repeat_and_n_samples_differ(server, model):
    engine = EndpointEngine(server.url, "smollm2", tokenizer=model.tokenizer, concurrency=3)
    ids = [prompt_ids(model, p) for p in PROMPTS]
    sampling = Sampling(max_new_tokens=8, temperature=1.0, n=4, seed=3)
    first, again = engine.sample(ids, sampling), engine.sample(ids, sampling)
    assert first == again
    assert all(len({tuple(r) for r in rows}) > 1 for rows in first)


def test_server_stopped_mid_run_fails_clearly_and_the_run_resumes(server, model, tmp_path):
    """Runs last in this module: it stops the server while prefixes are being sampled."""
    text = " ".join(f"Step {k} adds {k} to the total." for k in range(1, 9)) + " Done."
    trace = ml.ReasoningTrace.from_text(model, "Add the numbers 1 to 8.", text)
    ends = [s.start for s in trace.sentences]
    sampling = Sampling(max_new_tokens=24, temperature=0.6, n=4, stop_at_eos=False)
    engine = EndpointEngine(server.url, "smollm2", concurrency=1, retries=1, backoff=0.2)
    engine.prompts_per_call = 1  # one prefix per call, so some finish before the server stops

    def stop_after_first_entry() -> None:
        while not list((tmp_path / "rollouts").glob("*.safetensors")):
            time.sleep(0.05)
        server.stop()

    threading.Thread(target=stop_after_first_entry, daemon=True).start()
    with pytest.raises(EndpointError, match="is the server running"):
        sample_from_prefixes(model, trace, ends, sampling, cache=tmp_path, engine=engine, progress=False)
    done = sorted((tmp_path / "rollouts").glob("*.safetensors"))
    assert 1 <= len(done) < len(ends)
    for path in done:  # every file is a complete entry: n texts
        assert len(ml.DiskCache._read(path, path.stem)) == sampling.n

    class Recorder:  # stands in for the restarted server: records which prefixes it is asked for
        name, prompts_per_call, asked = "endpoint", 4, []

        def describe(self):
            return engine.describe()

        def sample(self, prompts, sampling, seeds=None, stop=()):
            self.asked.extend(prompts)
            return [[[1]] * sampling.n for _ in prompts]

    recorder = Recorder()
    out = sample_from_prefixes(model, trace, ends, sampling, cache=tmp_path, engine=recorder, progress=False)
    assert len(recorder.asked) == len(ends) - len(done)  # only the missing prefixes
    filler = [model.tokenizer.decode([1])] * sampling.n
    assert sum(rows != filler for rows in out) == len(done)  # the stored ones read back


IN_PROCESS = """
import json, sys, types
pkg = types.ModuleType("mechlens"); pkg.__path__ = [sys.argv[1]]; sys.modules["mechlens"] = pkg
from mechlens.models.sampling import Sampling
from mechlens.rollouts.inprocess import VLLMEngine

if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    engine = VLLMEngine(sys.argv[2], dtype="float32", max_model_len=512, enable_chunked_prefill=False,
                        max_num_batched_tokens=8192)
    ids = json.loads(sys.argv[3])
    greedy = engine.sample(ids, Sampling(max_new_tokens=12, temperature=0))
    sampled = [engine.sample(ids, Sampling(max_new_tokens=6, temperature=1.0, n=3, seed=2)) for _ in range(2)]
    print("RESULT" + json.dumps({"greedy": greedy, "sampled": sampled, "describe": engine.describe()}))
"""


def test_in_process_engine_equals_the_hooked_engine(model, tmp_path):
    """`VLLMEngine` runs in vLLM's environment (which lacks mechlens's other dependencies, so only
    the engine's modules are imported there); greedy tokens equal ours, seeded samples repeat."""
    import json
    import os
    import subprocess
    from pathlib import Path

    try:
        python = vllm_python()
    except FileNotFoundError as err:
        pytest.skip(f"vLLM's CPU build is not installed here ({err})")
    ids = [prompt_ids(model, p) for p in PROMPTS]
    package = str(Path(ml.__file__).parent)
    script = tmp_path / "in_process.py"
    script.write_text(IN_PROCESS)
    args = [str(python), str(script), package, str(embedded_weights_dir()), json.dumps(ids)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, done.stderr[-3000:]
    out = json.loads(lines[0][len("RESULT") :])
    assert out["greedy"] == LocalEngine(model, path="hooked").sample(
        ids, Sampling(max_new_tokens=12, temperature=0)
    )
    assert out["sampled"][0] == out["sampled"][1]
    assert out["describe"]["engine"] == "vllm"
