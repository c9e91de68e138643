# lxd-vsock: every target goes through `deno task` (deno.json holds the tasks and
# the permission sets). Deno comes from npm (package.json pins it); a system
# `deno` on PATH is used when present and DENO is not set. `npm ci`: an exact
# install from package-lock.json, which lists every platform's optional `@deno/*`
# package (npm installs only this machine's), so installing never changes the tree.
# `--no-bin-links`: a node_modules/.bin/deno link makes `deno task` run the
# native binary as an npm script; without it, `deno` in a task is Deno itself.
DENO ?= $(shell command -v deno 2>/dev/null || echo node_modules/deno/deno)
export DENO_NO_UPDATE_CHECK := 1
DENO_VERSION := $(shell node -p 'require("./package.json").devDependencies.deno' 2>/dev/null)

.PHONY: install run test check unit bench bench-vm build build-check e2e demo clean

install: node_modules/.installed

node_modules/.installed: package.json package-lock.json
	npm ci --no-bin-links --no-audit --no-fund --loglevel=error
	@touch $@

## run: install, then start the host daemon with state in ./state (no config file needed)
run: install
	$(DENO) task host daemon --state-dir ./state $(ARGS)

## test: install, then format/lint/type checks and every unit and process test
test: install check unit

check: install
	$(DENO) task check

unit: install
	$(DENO) task test

bench: install
	$(DENO) task bench $(ARGS)

## build: the real `deno compile`; needs the denort runtime (DENORT_BIN or Deno's cache)
build: install
	@if [ -n "$$DENORT_BIN" ] && [ ! -x "$$DENORT_BIN" ]; then \
	  echo "make build: DENORT_BIN=$$DENORT_BIN is not an executable denort runtime." >&2; exit 1; fi
	@dir="$${DENO_DIR:-$$HOME/.cache/deno}/dl/release/v$(DENO_VERSION)"; \
	if [ -z "$$DENORT_BIN" ] && [ ! -f "$$dir/denort-x86_64-unknown-linux-gnu.zip" ]; then \
	  echo "make build: the denort runtime for Deno $(DENO_VERSION) is not available and cannot be downloaded here; set DENORT_BIN=/path/to/denort (or put denort-x86_64-unknown-linux-gnu.zip in $$dir) and run make build again." >&2; \
	  exit 1; fi
	@mkdir -p dist
	$(DENO) task compile:host
	$(DENO) task compile:agent

## build-check: the real `deno compile` of both binaries with the Deno CLI standing in for
## denort; fails if a payload embeds anything outside its module graph or is over budget
build-check: install
	$(DENO) task build-check

e2e: install
	bash tests/vm/run-e2e

## bench-vm: GET /1.0 through /dev/lxd/sock over real vsock in L2, our agent then the stock
## lxd-agent, same python client, a new connection each: a table (tests/vm/bench_vm_table.py)
## of sequential p50/p99, req/s (p50/p99, failed) at concurrency 1/8/64, and stock p50 / ours p50
bench-vm: install
	@mkdir -p .cache
	TOPOLOGY_ARGS="--concurrency 1,8,64" bash -o pipefail -c 'bash tests/vm/run-e2e l2-topology-ours l2-topology-stock | tee .cache/bench-vm.log'
	@/usr/bin/python3 tests/vm/bench_vm_table.py .cache/bench-vm.log

## demo: one real VM topology, narrated; ARGS=--lxd: the real LXD 5.0.2 drives our agent
demo: install
	bash tests/vm/demo $(ARGS)

clean:
	rm -rf dist .cache
