# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on a fresh machine.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.mxdit-installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	# torch is pinned; on these machines 2.13.0 resolves to the local CPU wheel.
	$(VPY) -m pip install --quiet "torch==2.13.0"
	$(VPY) -m pip install --quiet -e ".[pipeline,triton,serve,cache,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mxdit demo

test: $(STAMP)
	TRITON_INTERPRET=1 TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 $(VPY) -m pytest -n 2 -q tests

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
