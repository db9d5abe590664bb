# The README's two commands. Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test install lint models clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch is pinned first so that no other package pulls an unpinned (multi-GB CUDA) build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

DIGITS := .cache/models/digits-cnn

demo: $(STAMP)
	$(BIN)/python -m models build digits-cnn
	$(BIN)/onnxlr optimize $(DIGITS)/model.onnx out/digits-cnn-lr.onnx --rank-ratio 0.25 --min-params 4096 \
		--inputs $(DIGITS)/eval.npz --report out/digits-cnn-lr.json --html out/digits-cnn-lr.html
	$(BIN)/python scripts/digits_accuracy.py $(DIGITS)/model.onnx out/digits-cnn-lr.onnx

# The exported-folder checks with sentence-transformers and Optimum run in their own environment (pyproject's
# `folders` extra pins transformers < 4.58, the main one has transformers 5).
FOLDERS_VENV := .venv-folders
FOLDERS_STAMP := $(FOLDERS_VENV)/.installed-folders

$(FOLDERS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FOLDERS_VENV)
	$(FOLDERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(FOLDERS_VENV)/bin/python -m pip install -q torch==2.13.0
	$(FOLDERS_VENV)/bin/python -m pip install -q -e '.[folders]'
	touch $(FOLDERS_STAMP)

test: $(STAMP) $(FOLDERS_STAMP)
	$(BIN)/python -m pytest -q -n 2 tests
	$(FOLDERS_VENV)/bin/python -m pytest -q -p no:cacheprovider -m libraries tests/test_folders.py

# ruff, then mypy on the library as installed (onnxlr, passes/ as onnxlr.passes: scripts/typecheck.py).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/typecheck.py

# The documentation site (docs/, mkdocs.yml): the generated reference pages first, then a strict build.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python scripts/gen_docs.py && $(BIN)/python -m mkdocs build --strict -q -d out/site

models: $(STAMP)
	$(BIN)/python -m models build all

clean:
	rm -rf out .cache/models .pytest_cache
