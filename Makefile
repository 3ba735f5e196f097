# Two commands do all set-up: `make demo` and `make test`. Each creates .venv when it is missing or
# older than pyproject.toml, with python3 -m venv and pip install -e .[dev].
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hyperflux-compile examples/digits_cnn.py --out runs/demo --force

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
