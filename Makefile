# scaling_abs: `make demo` and `make test` are the whole quick start.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test lint format install data clean

# The venv is (re)built when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	# stock Debian's python3 makes no venv without the python3-venv package: installed when missing
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "$(PY) -m venv failed: installing Debian's python3-venv"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq python3-venv && $(PY) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	# --isolated: the registry's matched torch/torchvision pair, not the local CPU-only torch wheel
	# (that one breaks torchvision's import: "operator torchvision::nms does not exist").
	$(BIN)/python -m pip install --isolated --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST is the embedded default and the test data: Debian's package, installed once.
data: $(FMNIST)
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

demo: $(STAMP) data
	$(BIN)/scaling-abs train --config demo

test: $(STAMP) data
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check scaling_abs tests benchmarks
	$(BIN)/ruff format --check scaling_abs tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format scaling_abs tests benchmarks
	$(BIN)/ruff check --fix scaling_abs tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
