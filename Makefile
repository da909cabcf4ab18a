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
