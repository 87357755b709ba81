# The two commands of the README: `make demo` and `make test`.
# Each creates .venv on first use and reuses it afterwards.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# llama.cpp (pyproject's `llama` extra) runs the exported GGUF files in the tests. It
# builds from source, about 11 minutes on 2 cores, so it is installed once per .venv.
LLAMA_STAMP := $(VENV)/.llama-installed
LLAMA_CPP := llama-cpp-python==0.3.36

.PHONY: setup demo test bench

# pip compiles the installed files one at a time (~80 s here); compileall -j 0 uses every
# core (~55 s). A file that does not compile (torch ships one written for Python 3.12) is
# left to the interpreter, as pip leaves it: hence the `|| true`.
$(STAMP): pyproject.toml requirements.lock setup.py src/heron/compress/csrc/fused.c src/heron/core/csrc/*.c src/heron/core/csrc/*.h
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.lock
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

$(LLAMA_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install -q "$(LLAMA_CPP)"
	touch $(LLAMA_STAMP)

demo: setup
	$(VENV)/bin/heron demo

test: setup $(LLAMA_STAMP)
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_sparse.py
	$(PY) benchmarks/bench_moe.py
	$(PY) benchmarks/bench_long_context.py
	$(PY) benchmarks/bench_interop.py
	$(PY) benchmarks/bench_align.py
	$(PY) benchmarks/bench_logprobs.py
	$(PY) benchmarks/bench_compress.py
	$(PY) benchmarks/bench_distill.py
	$(PY) benchmarks/bench_interpret.py
	$(PY) benchmarks/bench_watermark.py
	$(PY) benchmarks/bench_pii.py
