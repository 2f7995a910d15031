# FaceSense: `make train DATA=/path/to/fer2013` runs the main job; `make test` runs the tests.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= ../shared/fer2013
SHARDS ?= data/shards
# Not model/: train refuses to replace the shipped model there (OUT=DIR for another run).
OUT    ?= runs/train
STAMP  := $(VENV)/.installed

# The recipe: recipes/gpu.toml where CUDA is present, recipes/cpu.toml otherwise (RECIPE=FILE for another).
RECIPE ?= $(shell $(BIN)/python -c "import torch; print('recipes/gpu.toml' if torch.cuda.is_available() else 'recipes/cpu.toml')" 2>/dev/null || echo recipes/cpu.toml)
# make gpu-check: the Python that holds torch (on a GPU machine with preinstalled packages, PY=python3).
PY     ?= $(BIN)/python

.PHONY: install test pack train bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds this machine keeps on disk (no multi-GB download).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

pack: $(STAMP)
	$(BIN)/facesense pack $(DATA) --out $(SHARDS)
	$(BIN)/facesense verify $(SHARDS)

# Selection is on val (PublicTest); the report is on test (PrivateTest) when the data has it.
train: pack
	$(BIN)/facesense train --config $(RECIPE) --data $(SHARDS) --out $(OUT) $(TRAIN_ARGS)
	if $(BIN)/python -c "import json,sys; sys.exit(json.load(open('$(SHARDS)/manifest.json'))['splits']['test']['count'] == 0)"; \
	then $(BIN)/facesense eval $(OUT)/best.pt --data $(SHARDS) --split test --out $(OUT); \
	else echo "no PrivateTest images in $(SHARDS): reporting on val (PublicTest), which selected the model"; \
	     $(BIN)/facesense eval $(OUT)/best.pt --data $(SHARDS) --split val --out $(OUT); fi

# One unattended, time-boxed proof of every GPU path (benchmarks/gpu_check.py); no install step, so it
# runs on a GPU machine that has the packages but reaches no registry: make gpu-check PY=python3 DATA=...
# Here DATA and OUT name the shards and the results folder (defaults: $(SHARDS), runs/gpu-check).
gpu-check:
	PYTHONPATH=. $(PY) -m benchmarks.gpu_check \
	  --data $(if $(filter command line,$(origin DATA)),$(DATA),$(SHARDS)) \
	  --out $(if $(filter command line,$(origin OUT)),$(OUT),runs/gpu-check) $(GPU_CHECK_ARGS)

bench: $(STAMP)
	$(BIN)/facesense bench pack --data $(DATA)

clean:
	rm -rf $(VENV) data build *.egg-info
