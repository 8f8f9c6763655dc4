# Everything bootstraps its own virtual environment: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: install lock services test test-fast demo bench clean

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. Then exactly the tested environment
# (requirements.lock), then drugprot itself without letting pip re-resolve anything.
$(STAMP): pyproject.toml constraints.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -r requirements.lock
	$(BIN)/pip install -q --no-deps -e ".[test,plots]"
	$(BIN)/pip check
	touch $(STAMP)

# Refresh requirements.lock from the environment the tests just passed in (after changing pyproject.toml:
# `.venv/bin/pip install -c constraints.txt -e ".[test,plots]"`, `make test`, then `make lock`).
lock:
	{ echo "# The exact tested environment (every package, pinned): \`make lock\` writes it, \`make install\` installs it."; \
	  $(BIN)/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+cpu$$/\1/'; } > requirements.lock

# Debian packages the tests start as real servers on 127.0.0.1: PostgreSQL (tracking database), Prometheus (serving
# metrics) and headless Chromium (the service's page). Installed when missing and root; otherwise those tests skip.
services:
	@missing=""; \
	  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "installing Debian packages for the tests:$$missing"; \
	      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    else echo "note: not installed and not root ($$missing): their tests will be skipped"; fi; fi

test: $(STAMP) services
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m drugprot.demo

bench: $(STAMP)
	$(BIN)/python bench/preprocess.py

clean:
	rm -rf $(VENV) runs mlruns mlflow.db .pytest_cache
