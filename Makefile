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

# Two worker processes of one torch thread each (the machine has 2 cores), then the tests that time
# ONNX Runtime and assert a speed-up, alone (marker `serial`, pyproject.toml). --dist loadfile: one
# worker runs a whole test module, so a module's costly fixture (a CLI run) is made once. (loadgroup
# would be finer, but under pytest 9 xdist's group suffix never reaches the scheduler: groups split.)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses 2 --dist loadfile -m "not serial"
	$(VENV)/bin/python -m pytest -q -m serial

clean:
	rm -rf $(VENV) build *.egg-info
