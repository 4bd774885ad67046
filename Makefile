# Each target installs what it needs into .venv by itself; `make demo` and `make test` are the two
# commands a newcomer runs. TORCH is the torch requirement installed first (CPU wheel by default).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test bench clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

DEMO_OUT ?= runs/demo

demo: $(INSTALLED)
	$(BIN)/python -m data_tools prepare \
	    --input 'examples/corpora/*.warc.gz' --input examples/corpora/enwiki-sample.xml.bz2 \
	    --output $(DEMO_OUT)/data --train-tokenizer 8192 --seq-len 512 --valid-fraction 0.05 --workers 2
	$(BIN)/python -m data_tools inspect $(DEMO_OUT)/data --chars 300

test: $(INSTALLED)
	$(BIN)/python -m pytest -q tests

BENCH_DATATROVE := bench/.venv-datatrove/.installed

$(BENCH_DATATROVE):
	test -x bench/.venv-datatrove/bin/python || $(PYTHON) -m venv bench/.venv-datatrove
	bench/.venv-datatrove/bin/pip install --quiet "datatrove[processing]==0.10.*" warcio faust-cchardet python-magic spacy lxml_html_clean
	touch $@

bench: $(INSTALLED) $(BENCH_DATATROVE)
	$(BIN)/python bench/data_tools_bench.py

clean:
	rm -rf runs bench/out
