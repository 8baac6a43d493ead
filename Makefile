# One-command set-up: every target creates/uses the virtual environment and installs
# what it needs. TORCH_SPEC is installed first so that pip does not pull a multi-GB CUDA
# build on CPU machines; on GPU clusters set it to your site's CUDA build of torch.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIPELINE := $(VENV)/bin/pipeline

.PHONY: install test demo bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# demo data, preprocess, train, evaluate; report in runs/demo/eval/report.html
demo: install
	$(PIPELINE) run configs/demo.yaml

bench: install
	$(PY) bench/preprocess.py --months 6 --out bench/results/preprocess.json
	$(PY) -m bench.loader --out bench/results/loader.json
	$(PY) -m bench.ddp --out bench/results/ddp.json
	$(PY) -m bench.train_gpu --steps 6 --out bench/results/train_cpu.json

lint: install
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/mypy pipeline

clean:
	rm -rf data/demo runs registry .pytest_cache
