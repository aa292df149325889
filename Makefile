# The two commands of the README. Each makes its own virtual environment (.venv) from scratch
# when it is missing or pyproject.toml changed; PARAMS picks the parameter file of the report.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PARAMS ?= parameters/seed.yaml
BIN := $(VENV)/bin

.PHONY: report test clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[workbook,test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

report: $(BIN)/.installed
	$(BIN)/python -m poc report --params $(PARAMS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
