#!/usr/bin/env bash
# `make autobahn`: the Autobahn TestSuite's fuzzingclient against wm-host's
# echo plugin on two websocket:// listeners, one plain and one with
# ws_deflate = true; fails on any FAILED, NON-STRICT or UNIMPLEMENTED case.
#
# The suite is Python 2 code: it is installed, when missing, into a
# virtualenv under target/autobahn/venv made with pyenv's 2.7.18
# (AUTOBAHN_PYTHON to use another Python 2.7). The report goes to
# target/autobahn/report (index.html), the summary to
# target/autobahn/summary.md.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
work="$root/target/autobahn"
venv="$work/venv"
profile=${AUTOBAHN_PROFILE:-release}
bin="$root/target/$profile"
python2=${AUTOBAHN_PYTHON:-$HOME/.pyenv/versions/2.7.18/bin/python}

mkdir -p "$work"
if [ ! -x "$venv/bin/wstest" ]; then
    echo "== installing the Autobahn TestSuite into $venv"
    if [ ! -x "$python2" ]; then
        echo "no Python 2.7 at $python2 (pyenv install 2.7.18, or set AUTOBAHN_PYTHON)" >&2
        exit 1
    fi
    "$python2" -m pip install -q 'virtualenv<20.22'
    rm -rf "$venv"
    "$python2" -m virtualenv -q "$venv"
    "$venv/bin/pip" install -q autobahntestsuite
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
plain=$(free_port)
deflate=$(free_port)
while [ "$deflate" = "$plain" ]; do deflate=$(free_port); done

# 9.x sends messages of up to 16 MiB.
cat > "$work/wm.toml" <<TOML
[host]
runtime_dir = "run"
strict_modes = false

[[worker]]
name = "plain"
listen = "websocket://127.0.0.1:$plain"
plugin = "$bin/libecho_plugin.so"
max_package_size = 67108864
max_buffered_input = "256MiB"

[[worker]]
name = "deflate"
listen = "websocket://127.0.0.1:$deflate"
plugin = "$bin/libecho_plugin.so"
max_package_size = 67108864
max_buffered_input = "256MiB"
ws_deflate = true
TOML

# permessage-deflate cases (12.x, 13.x) only against the deflate listener.
cat > "$work/spec.json" <<JSON
{
  "outdir": "$work/report",
  "servers": [
    {"agent": "wm-host", "url": "ws://127.0.0.1:$plain"},
    {"agent": "wm-host-deflate", "url": "ws://127.0.0.1:$deflate"}
  ],
  "cases": ["*"],
  "exclude-cases": [],
  "exclude-agent-cases": {"wm-host": ["12.*", "13.*"]}
}
JSON

rm -rf "$work/report" "$work/run"
host="$bin/wm-host"
"$host" start -d -c "$work/wm.toml"
trap '"$host" stop -c "$work/wm.toml" >/dev/null 2>&1 || true' EXIT

echo "== wstest -m fuzzingclient (plain :$plain, deflate :$deflate); several minutes"
(cd "$work" && "$venv/bin/wstest" -m fuzzingclient -s spec.json > wstest.log 2>&1) || {
    tail -20 "$work/wstest.log" >&2
    exit 1
}
python3 "$root/tests/autobahn/summary.py" "$work/report/index.json" "$work/summary.md"
