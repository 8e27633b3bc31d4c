# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv on first use
# (Python 3.11 and the package registries are all it needs) and reuses it afterwards.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/cbpt-guard demo

clean-venv:
	rm -rf $(VENV)
