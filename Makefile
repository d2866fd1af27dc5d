# wm-host: build, run the demo, test.
CARGO ?= cargo
HOST  := target/debug/wm-host

.PHONY: build run test test-deps test-builds lint fmt clean

build:
	$(CARGO) build --workspace

## Run the chat demo in the foreground (Ctrl+C stops it): open the URL it prints.
run: build
	@echo "chat page: http://127.0.0.1:8080/  (websocket on port 7272)"
	$(HOST) start -c examples/chat/wm.toml

## Everything CI runs: formatting, lints, unit and end-to-end tests.
test: test-deps lint test-builds
	$(CARGO) test --workspace

# What the tests need, installed when missing (Debian, as root): headless
# Chromium and its WebDriver for the browser test, redis-server for the
# cross-host bus tests (private instances on free ports; the package's own
# service is not needed), openssl (s_client) and curl for the TLS tests,
# systemd-analyze to check examples/systemd/wm-host.service.
test-deps:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing chromium and chromium-driver"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi
	@if [ ! -x /usr/bin/redis-server ]; then \
		echo "installing redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	fi
	@if ! command -v systemd-analyze >/dev/null 2>&1; then \
		echo "installing systemd (systemd-analyze checks the example unit)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; \
	fi
	@if ! command -v openssl >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then \
		echo "installing openssl and curl"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl curl >/dev/null; \
	fi

# Two builds of the test plugin that answer `build` differently, for the
# reload tests; then the default build again. And a plugin built against
# plugin-api before live handover (fixtures/old-api, its own workspace), on
# the workspace's target dir so it reuses its abi_stable (seconds, not 40 s).
test-builds: build
	WM_TEST_BUILD=a $(CARGO) build -p test-plugin
	cp target/debug/libtest_plugin.so target/debug/libtest_plugin_a.so
	WM_TEST_BUILD=b $(CARGO) build -p test-plugin
	cp target/debug/libtest_plugin.so target/debug/libtest_plugin_b.so
	$(CARGO) build -p test-plugin
	CARGO_TARGET_DIR=target $(CARGO) build --locked -p old-api-echo \
		--manifest-path fixtures/old-api/Cargo.toml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf run

.PHONY: bench

## Benchmark suite: wm-host against a native mio baseline, the plugin ABI against direct
## calls (criterion), cold start and broadcast fan-out, live handover on reload
## (its own section, see bench-handover) and TLS (wss, https, handshakes)
## against a mio + rustls baseline, written to bench/RESULTS.md
## (about 15 minutes), then UDP echo and the Redis bus across two hosts against
## the local bus. Installs wrk and valgrind (heap allocations per message,
## by dhat) and redis-server when missing (Debian, as root).
bench:
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@command -v valgrind >/dev/null 2>&1 || { echo "installing valgrind"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { echo "installing redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	$(CARGO) build --release --workspace
	$(CARGO) bench -p plugin-api --bench abi --no-run
	CARGO=$(CARGO) target/release/wm-bench suite --out bench/RESULTS.md
	target/release/wm-bench tls --out bench/RESULTS.md
	target/release/wm-bench udp --out bench/RESULTS.md
	target/release/wm-bench redis --out bench/RESULTS.md

.PHONY: bench-handover

## Live handover on reload alone (also part of `make bench`): handover time for
## 1,000 and 10,000 idle websocket connections, echo latency under reloads every
## 200 ms, wrk errors over 100 reloads; replaces only the `## Handover` section of
## bench/RESULTS.md (about a minute).
bench-handover:
	@command -v wrk >/dev/null 2>&1 || { echo "installing wrk"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(CARGO) build --release --workspace
	target/release/wm-bench handover --out bench/RESULTS.md

.PHONY: autobahn

## The Autobahn TestSuite (fuzzingclient, every case) against the echo plugin on
## a plain and a ws_deflate websocket:// listener (release build); fails on any
## FAILED, NON-STRICT or UNIMPLEMENTED case. Installs the suite when missing into
## target/autobahn/venv (Python 2.7 from pyenv). Report: target/autobahn/report/.
autobahn:
	$(CARGO) build --release -p wm-host -p echo-plugin
	tests/autobahn/run.sh

.PHONY: fuzz

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := text frame custom http websocket_server websocket_client

## Fuzz every codec for FUZZ_SECONDS each (cargo-fuzz on nightly, installed
## when missing); fails if any target crashes. Seeds are fuzz/corpus/<target>;
## what a run finds goes to fuzz/work/<target>, crashes to fuzz/artifacts/.
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || { echo "installing cargo-fuzz"; cargo install --locked cargo-fuzz; }
	cargo +nightly fuzz build
	@failed=""; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/work/$$t; \
		echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
		cargo +nightly fuzz run $$t fuzz/work/$$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=10 -print_final_stats=1 \
			|| failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed (see fuzz/artifacts/)"; exit 1; fi

.PHONY: bench-udp

## UDP echo alone: wm-host udp:// (bench-hello-plugin) against `wm-baseline
## --proto udp`, msgs/s and per server CPU-second; replaces only the
## `## UDP echo` section of bench/RESULTS.md (about 30 s).
bench-udp:
	$(CARGO) build --release --workspace
	target/release/wm-bench udp --out bench/RESULTS.md

.PHONY: bench-redis

## The Redis bus alone (also part of `make bench`): broadcast to 10,000 members
## over two hosts sharing a private redis-server, and a cross-host message
## stream (msgs/s and per master CPU-second), each against one host on the
## `local` bus in the same run; replaces only its section of bench/RESULTS.md
## (about a minute). Installs redis-server when missing (Debian, as root).
bench-redis:
	@command -v redis-server >/dev/null 2>&1 || { echo "installing redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	$(CARGO) build --release --workspace
	target/release/wm-bench redis --out bench/RESULTS.md
