# make demo | make test | make lint -- each creates .venv itself on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: venv chromium test demo lint

venv: $(STAMP)

# torch==2.13.0 first: that exact pin takes the CPU wheel on this machine's disk; a looser
# spec would let pip download a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e '.[all]'
	touch $@

# Debian's chromium for the browser tests of the chat app (Playwright cannot download browsers here).
chromium:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)

test: venv chromium
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python -m hf_deepseek.cli demo

lint: venv
	$(BIN)/ruff check .

# The compiled FP8 training tests under torch 2.11, the GPU machines' torch, on the CPU: its Dynamo twice dropped
# gradients that CI's torch 2.13 computes (docs/PERF.md, Training). Opt-in: torch 2.11 comes here only as a CUDA build
# (about 5 GB with its libraries), so it gets a venv of its own, in front of .venv's packages.
VENV_211 := .venv-torch211
SITE = $$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.PHONY: test-torch211
test-torch211: venv
	test -x $(VENV_211)/bin/python || $(PYTHON) -m venv $(VENV_211)
	$(VENV_211)/bin/pip install -q torch==2.11.0 'numpy<2.4'
	PYTHONPATH=$(call SITE,$(VENV_211)):$(CURDIR):$(call SITE,$(VENV)) $(VENV_211)/bin/python -m pytest -q \
	  tests/test_fp8_compile.py tests/test_fp8_moe.py tests/test_fp8_mlp.py tests/test_compile_regions.py \
	  tests/test_output_loss.py

# The chat app on the embedded default checkpoint (another: make chat CHAT_MODEL=DIR); serves 127.0.0.1 only.
# The model directory is checked before anything is installed.
CHAT_MODEL ?= checkpoints/hf-deepseek-r1-add-sub
.PHONY: chat chat-model
chat: chat-model venv
	$(BIN)/python -m hf_deepseek.cli chat --model "$(CHAT_MODEL)"

chat-model:
	@test -f "$(CHAT_MODEL)/config.json" || { echo "make chat: no model at $(CHAT_MODEL)/ (no config.json): \
	run 'make chat' for the embedded default, or 'make chat CHAT_MODEL=DIR' with a saved model's directory \
	('make demo' saves one in outputs/demo/grpo)" >&2; exit 2; }
