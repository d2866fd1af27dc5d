# wm-host: build, run the demo, test.
CARGO ?= cargo
HOST  := target/debug/wm-host

.PHONY: build run test test-deps lint fmt clean

build:
	$(CARGO) build --workspace

## Run the echo example in the foreground (Ctrl+C stops it).
run: build
	@echo "echo server on text://127.0.0.1:2347 — try: printf 'hi\\n' | python3 -c 'import socket,sys;s=socket.create_connection((\"127.0.0.1\",2347));s.sendall(sys.stdin.buffer.read());print(s.recv(99))'"
	$(HOST) start -c examples/echo/wm.toml

## Everything CI runs: formatting, lints, unit and end-to-end tests.
test: test-deps lint
	$(CARGO) build --workspace
	$(CARGO) test --workspace

# Tools the tests need, installed when missing (Debian, as root).
test-deps:
	@true

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf run
