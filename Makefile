# The README's two commands are `make run` and `make test`; both build .venv first if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test bench clean

$(BIN)/edgellm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/edgellm

setup: $(BIN)/edgellm

# The main job: the unit manager plus the echo unit, in the foreground (Ctrl-C stops both).
run: setup
	$(BIN)/edgellm up

# The whole suite. redis-server is a real dependency of the Redis backend tests.
test: setup
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null)
	$(BIN)/python -m pytest -q

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
