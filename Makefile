# The two set-up commands of the README:
#   make reproduce   -- builds everything, then runs `fastmask reproduce`
#   make test        -- builds everything, then runs the whole test suite
VENV ?= .venv
ARGS ?=
STAMP := $(VENV)/.fastmask-built
SOURCES := $(wildcard CMakeLists.txt pyproject.toml csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.inc csrc/*/*.cu csrc/*/*.cuh csrc/include/fastmask/*.h)

.PHONY: reproduce test test-fast bench clean

$(STAMP): $(SOURCES) scripts/bootstrap.sh
	scripts/bootstrap.sh $(VENV)
	touch $@

reproduce: $(STAMP)
	$(VENV)/bin/fastmask reproduce $(ARGS)

test: $(STAMP)
	FASTMASK_REQUIRE_EXT=1 $(VENV)/bin/python -m pytest -q $(ARGS)

test-fast: $(STAMP)
	FASTMASK_REQUIRE_EXT=1 $(VENV)/bin/python -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks $(ARGS)

clean:
	rm -rf build $(VENV)
