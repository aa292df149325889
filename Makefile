# The two commands of the README. Each makes its own virtual environment (.venv) from scratch
# when it is missing or pyproject.toml changed; PARAMS picks the parameter file of the report.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PARAMS ?= parameters/seed.yaml
BIN := $(VENV)/bin

.PHONY: report test clean-venv system

# Programs from Debian that the tests and notebooks start themselves (a real Redis for the gateway replicas'
# registry, Chromium for the browser tests, Node.js and npm for the page's JavaScript packages, PostgreSQL for
# the connectors on databases, whose server Debian keeps off PATH; tc and ss for the emulated links and the
# tunnel sockets' buffers; squid, as squid-openssl, the build with TLS inspection (ssl_bump), for the corporate
# proxy: checked by package, since plain squid has the same program without it); installed with apt-get when
# missing (as root, as CI runs), skipped when present.
# program:package pairs.
SYSTEM_PROGRAMS := redis-server:redis-server chromium:chromium node:nodejs npm:npm tc:iproute2 ss:iproute2 openssl:openssl

system:
	@missing=""; for pair in $(SYSTEM_PROGRAMS); do command -v $${pair%%:*} > /dev/null || missing="$$missing $${pair##*:}"; done; \
	ls /usr/lib/postgresql/*/bin/postgres > /dev/null 2>&1 || missing="$$missing postgresql"; \
	dpkg-query -W -f='$${Status}' squid-openssl 2> /dev/null | grep -q 'ok installed' || missing="$$missing squid-openssl"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: needs$$missing: run 'apt-get install$$missing' as root" >&2; exit 1; fi; \
	  echo "installing$$missing from Debian"; \
	  case "$$missing" in *postgresql*) mkdir -p /etc/postgresql-common; \
	    [ -e /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" \
	      > /etc/postgresql-common/createcluster.conf;; esac; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold$$missing > /dev/null; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[workbook,test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

# The page's JavaScript packages (DuckDB-WASM, Arrow JS), from the npm registry at the versions of
# ui/package-lock.json; the gateway serves them at /ui/vendor/.
ui/node_modules/.installed: ui/package.json ui/package-lock.json
	npm ci --prefix ui --no-audit --no-fund --loglevel=error
	touch $@

report: system $(BIN)/.installed ui/node_modules/.installed
	$(BIN)/python -m poc report --params $(PARAMS)

test: system $(BIN)/.installed ui/node_modules/.installed
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
