# fastcolor developer entry points.
#   make test   - create .venv if needed, install, run the fast test suite
#   make demo   - same install, then `python -m fastcolor demo`
#   make bench  - same install, then pytest-benchmark over bench/
#   make lint   - ruff check (rules in pyproject.toml); make test runs it first
#   make docs   - the API reference (pdoc) into build/docs/ (ignored by git)
#   make install (alias: venv) - just the install
# Installing is idempotent: stamp files under .venv/ record what was done.
# Changing setup.py/pyproject.toml/CMakeLists.txt reinstalls the package;
# changing csrc/ or kernels/ only rebuilds the extension (incremental CMake).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
# Keep in sync with [build-system].requires in pyproject.toml; installed into
# the venv so builds can run --no-build-isolation (fast, incremental).
BUILD_REQS  ?= "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja
PYTEST_ARGS ?=

TORCH_STAMP := $(VENV)/.stamp-torch
DEPS_STAMP  := $(VENV)/.stamp-install
EXT_STAMP   := $(VENV)/.stamp-ext
EXT_SOURCES := CMakeLists.txt $(wildcard csrc kernels csrc/* kernels/*)

.PHONY: test lint docs demo bench install venv clean-ext build-info

# pip hides setup.py's output on success, so say loudly whether _C was built.
SHOW_EXT := $(PY) -c "from fastcolor._ext import build_info as b; i = b(); \
  print('fastcolor._C: built,', 'CUDA ' + str(i.get('cuda_archs')) if i.get('cuda') else 'CPU only', \
        '| OpenMP' if i.get('openmp') else '') if i['extension'] else \
  print('!' * 70 + '\nWARNING fastcolor._C NOT available:', i['reason'], '\n' + '!' * 70)"

# make turns any failing recipe into exit status 2; keep pytest's own status
# (1 failures, 5 no tests ran, ...) in $(PYTEST_RC) for .ci/run.
PYTEST_RC := $(VENV)/.pytest-exit

# Lint first (about a second): a lint failure stops make test before pytest, with make's status.
test: $(EXT_STAMP) lint
	@rm -f $(PYTEST_RC)
	$(PY) -m pytest -q tests fastcolor --doctest-modules -m "not slow" $(PYTEST_ARGS) \
	  || { rc=$$?; echo $$rc > $(PYTEST_RC); echo "pytest exited with $$rc"; exit $$rc; }

LINT_PATHS ?= fastcolor tests bench docs setup.py

lint: $(DEPS_STAMP)
	$(PY) -m ruff check $(LINT_PATHS)

# The API reference of the public modules (not the application fastcolor.app, not the entry
# points, not the backends' internals), built by docs/api.py, which tests/test_docs.py checks;
# it needs only the docs extra (pdoc); a pdoc warning fails it.
DOCS_DIR ?= build/docs

docs: $(EXT_STAMP)
	rm -rf $(DOCS_DIR)
	$(PY) docs/api.py $(DOCS_DIR)

demo: $(EXT_STAMP)
	$(PY) -m fastcolor demo

bench: $(EXT_STAMP)
	$(PY) -m pytest bench --benchmark-only $(PYTEST_ARGS)

install venv: $(EXT_STAMP)

$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	echo "$(TORCH_SPEC)" > $@

$(DEPS_STAMP): setup.py pyproject.toml CMakeLists.txt fastcolor/_version.py $(TORCH_STAMP)
	$(PIP) install $(BUILD_REQS)
	$(PIP) install --no-build-isolation -e '.[dev]'
	@$(SHOW_EXT)
	touch $@ $(EXT_STAMP)

# Rebuild the extension when a C++/CUDA source is newer than the last build,
# or when the module vanished (e.g. git clean) and no failure was recorded.
$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	@if [ ! -f $@ ] || [ -n "$$(find $(EXT_SOURCES) -newer $@ 2>/dev/null | head -1)" ] \
	    || { ! ls fastcolor/_C.*.so >/dev/null 2>&1 && [ ! -f fastcolor/_build_failure.txt ]; }; then \
	  echo "rebuilding fastcolor._C"; \
	  $(PIP) install --no-deps --no-build-isolation -e . && $(SHOW_EXT); \
	fi
	@touch $@

build-info: $(EXT_STAMP)
	$(PY) -c "import pprint, fastcolor._ext as e; pprint.pprint(e.build_info())"

clean-ext:
	rm -rf build/cmake-* fastcolor/_C.*.so fastcolor/_build_failure.txt $(EXT_STAMP)
