# Each target installs what it needs into .venv by itself; `make demo` and `make test` are the two
# commands a newcomer runs. TORCH is the torch requirement installed first (CPU wheel by default).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test finetune bench bench-data bench-compress bench-dp clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,models]"
	touch $@

# examples/demo.yaml reads its data from here
DEMO_OUT := runs/demo

demo: $(INSTALLED)
	$(BIN)/python -m data_tools prepare \
	    --input 'examples/corpora/*.warc.gz' --input examples/corpora/enwiki-sample.xml.bz2 \
	    --output $(DEMO_OUT)/data --train-tokenizer 4096 --seq-len 256 --valid-fraction 0.05 --workers 2
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(BIN)/deepspeed --num_gpus 2 --module trainer --config examples/demo.yaml

test: $(INSTALLED)
	$(BIN)/python -m pytest -q tests

# every recipe in examples/finetune (mlm reads the demo's token shards: run `make demo` first)
finetune: $(INSTALLED)
	PYTHON=$(BIN)/python examples/finetune/run.sh all

BENCH_DATATROVE := bench/.venv-datatrove/.installed

$(BENCH_DATATROVE):
	test -x bench/.venv-datatrove/bin/python || $(PYTHON) -m venv bench/.venv-datatrove
	bench/.venv-datatrove/bin/pip install --quiet "datatrove[processing]==0.10.*" warcio faust-cchardet python-magic spacy lxml_html_clean orjson
	touch $@

bench: $(INSTALLED) $(BENCH_DATATROVE)
	$(BIN)/python bench/data_tools_bench.py
	$(BIN)/python bench/loader_bench.py
	$(BIN)/python bench/mixture_bench.py
	$(BIN)/python bench/trainer_bench.py
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/step_knobs_bench.py

# the dedup-at-scale table of the README (10k, 40k, 160k documents; long: run it alone)
bench-data: $(INSTALLED) $(BENCH_DATATROVE)
	$(BIN)/python bench/data_scale_bench.py

# the compression table of the README: the sentiment recipe's run is the teacher
bench-compress: $(INSTALLED)
	test -f runs/finetune/sentiment-minilm/export/config.json || PYTHON=$(BIN)/python examples/finetune/run.sh sentiment
	OMP_NUM_THREADS=2 $(BIN)/python bench/compress_bench.py

# dstrain in 1 and 2 processes (both engines) against a plain PyTorch loop: the finetune recipe and a pretraining step
bench-dp: $(INSTALLED)
	$(BIN)/python bench/dp_bench.py

clean:
	rm -rf runs bench/out
