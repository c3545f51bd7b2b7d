# The two set-up commands of the README:
#   make reproduce   -- builds everything, then runs `fastmask reproduce`
#   make test        -- builds everything, then runs the whole test suite
VENV ?= .venv
ARGS ?=
STAMP := $(VENV)/.fastmask-built
# every file under csrc/ (headers and .inc fragments included: editing any of them rebuilds)
SOURCES := $(wildcard CMakeLists.txt pyproject.toml) $(shell find csrc -type f)

.PHONY: reproduce test test-fast bench mutation clean

$(STAMP): $(SOURCES) scripts/bootstrap.sh
	scripts/bootstrap.sh $(VENV)
	touch $@

reproduce: $(STAMP)
	$(VENV)/bin/fastmask reproduce $(ARGS)

# -rs: the skipped tests with their reasons (e.g. the AVX-512 cases on an AVX2-only CPU)
test: $(STAMP)
	FASTMASK_REQUIRE_EXT=1 $(VENV)/bin/python -m pytest -q -rs $(ARGS)

test-fast: $(STAMP)
	FASTMASK_REQUIRE_EXT=1 $(VENV)/bin/python -m pytest -q -rs -m "not slow" $(ARGS)

# mutation testing (mutmut) of attacks, reference, evaluate, stats against their focused
# tests; slow (tens of minutes on 2 cores), not part of `make test`. MODULES="stats" runs one.
mutation: $(STAMP)
	nice -n 5 $(VENV)/bin/python scripts/mutation.py $(MODULES)

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks $(ARGS)

clean:
	rm -rf build $(VENV)
