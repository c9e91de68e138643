#!/usr/bin/env bash
# tests/host_stock_agent_check.sh: run inside L1 (tests/vm/l1 -- bash tests/host_stock_agent_check.sh).
# Our host daemon in L1 and Debian's stock lxd-agent 5.0.2 in L2, set up as LXD does it:
#   1. lxd-vsock-host daemon listens on AF_VSOCK; `instance add l2 --cid 3 --qmp …` writes
#      the config drive (9p tag "config", copied to /run/lxd_agent by lxd-agent-setup);
#   2. the stock agent writes STARTED to its ring buffer; our monitor reads it over QMP and
#      announces the host (PUT /1.0 to 3:8443, mutual TLS with the per-instance client cert);
#   3. a guest process asks /dev/lxd/sock for GET /1.0/config/user.foo: the stock agent
#      proxies it to our daemon over vsock 2:<port>, which must find the instance by peer
#      CID 3 + agent.crt and answer "bar";
#   4. the monitor saw the agent CONNECTED, and STOPPED once L2 powered off (registry too).
# Prints timings; exit 0 when it all worked. Needs tests/vm/setup's lxd-agent.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DENO=node_modules/deno/deno
AGENT_DIR=$PWD/.cache/vm/lxd-agent
base=/run/host-stock-agent
mkdir -p "$base"
state=$base/state ctl=$base/ctl qmp=$base/qmp.sock config=$base/config
host() { "$DENO" run -q -P=host host/main.ts "$@" --state-dir "$state"; }
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 ))s"; }
fail() { echo "host-stock-agent: FAIL: $*"; cleanup; exit 1; }
daemon_pid="" qemu_pid=""
cleanup() {
  [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
  [ -n "$daemon_pid" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid"
  echo "--- daemon log (last 30 lines)"; tail -n 30 "$base/daemon.log" 2>/dev/null
  echo "--- l2 console (devlxd tries, errors, last 20 lines)"
  grep -a -E "DEVLXD|rror|level=error" "$ctl/console.log" 2>/dev/null | head -n 20
  tail -n 20 "$ctl/console.log" 2>/dev/null
}

"$DENO" run -q -P=host host/main.ts daemon --state-dir "$state" --log-level debug >"$base/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 600); do grep -q 'msg="listening"' "$base/daemon.log" 2>/dev/null && break; sleep 0.5; done
grep 'msg="listening"' "$base/daemon.log" || fail "the daemon did not start"
echo "host-stock-agent: daemon listening after $(elapsed)"

host instance add l2 --cid 3 --qmp "$qmp" --chardev vserial --config-drive "$config" -c user.foo=bar \
  || fail "instance add"
echo "host-stock-agent: config drive: $(ls "$config" | tr '\n' ' ')"

# The guest: the stock agent in the background, then a devlxd client until it answers.
guest_cmd="$AGENT_DIR/lib/systemd/lxd-agent-setup && cd /run/lxd_agent && \
  ($AGENT_DIR/usr/bin/lxd-agent --debug &) && \
  for i in \$(seq 300); do \
    out=\$(curl -sS --max-time 10 --unix-socket /dev/lxd/sock http://lxd/1.0/config/user.foo 2>&1); \
    echo DEVLXD-TRY-\$i=\"\$out\"; [ \"\$out\" = bar ] && echo DEVLXD-ANSWER=\$out && exit 0; sleep 1; done; exit 1"
qemu_pid=$(tests/vm/l2 --detach --ctl "$ctl" --qmp "$qmp" --config-drive "$config" --timeout 420 \
  -- sh -c "$guest_cmd") || fail "cannot start L2"
echo "host-stock-agent: L2 started (qemu pid $qemu_pid)"

for _ in $(seq 800); do [ -e "$ctl/rc" ] && break; sleep 0.5; done
rc=$(cat "$ctl/rc" 2>/dev/null || echo none)
grep -q "DEVLXD-ANSWER=bar" "$ctl/console.log" || fail "no devlxd answer in L2 (rc $rc)"
echo "host-stock-agent: guest read user.foo=bar through the stock lxd-agent after $(elapsed)"

grep -q 'msg="agent state" .*instance=l2 state=CONNECTED' "$base/daemon.log" || fail "no CONNECTED log line"
echo "host-stock-agent: the monitor saw the agent CONNECTED"
# The guest command has ended, so L2 powers off: the monitor must notice (QMP gone → STOPPED).
for _ in $(seq 120); do grep -q 'instance=l2 state=STOPPED' "$base/daemon.log" && break; sleep 0.5; done
list=$(host instance list --format json)
echo "$list" | grep -q '"agentState": "STOPPED"' || fail "the registry does not show STOPPED after L2 ended: $list"
echo "$list" | grep -q '"lastSeen": "' || fail "the registry has no lastSeen: $list"
echo "host-stock-agent: registry shows STOPPED after L2 powered off, with lastSeen"
cleanup
echo "host-stock-agent: ok ($(elapsed))"
