#!/bin/sh
# One link of deepfleet's image relay (orchestrator/deepfleet/relay.py runs it):
#   relay.sh SRC [NEXT_HOST NEXT_PORT]
# SRC is "-" (the archive arrives on stdin, from the operator) or a port to take one
# TCP connection on (from the machine before this one). Every byte read goes to stdout
# (this machine's `docker load`) and, with NEXT, on to the next machine, so the image
# crosses each link once and every machine loads while the stream passes through.
# stderr carries what the operator reads: "ready", "bytes N" each second, "end", or
# "fail <why>", and "refused <addr>: <why>" for a connection that is not the neighbour's.
# RELAY_IN / RELAY_OUT name files (the host's fifos, mounted) to use for stdin / stdout:
# the engine's attach stream would copy every byte twice more.
# RELAY_SECRET is what the machine before must send first (a line) for its bytes to be
# taken, RELAY_NEXT_SECRET what this one sends the next: random, made by the operator for
# each hop of each transfer and given through the environment, never on a command line.
set -u
[ -n "${RELAY_OUT:-}" ] && exec >"$RELAY_OUT"
src=$1
next_host=${2:-}
next_port=${3:-}
LINK_TIMEOUT=${LINK_TIMEOUT:-10}
RELAY_DIR=$(mktemp -d)
export RELAY_DIR LINK_TIMEOUT

fail() { echo "fail $*" >&2; exit 3; }

listening() { netstat -ltn 2>/dev/null | grep -q "[:.]$1 "; }
# the connection to the next machine, by its port: netstat shows numbers, not names
linked() {
  netstat -tn 2>/dev/null | awk -v p=":$next_port" '
    $6 == "ESTABLISHED" && substr($5, length($5) - length(p) + 1) == p { f = 1 }
    END { exit !f }'
}

# The sockets are handled by nc -e: once connected it runs relay-take / relay-send with
# the socket as their stdin / stdout, and they are dd moving 256 KB blocks through the
# fifos here (nc's own copy loop moves 1 KB per select over every descriptor, which is
# what bounded the relay). dd re-blocks the stdout too: each write there is one frame of
# the engine's attach stream. The last dd is the pipeline's own last process, so $!
# is the one to count bytes of.
block="dd bs=256k iflag=fullblock"
# a downstream that fails mid-stream must not stop this machine's own load: tee keeps
# writing stdout when a write to the next machine fails
trap '' PIPE
if [ -n "$next_host" ]; then
  mkfifo "$RELAY_DIR/down" || fail "mkfifo"
  nc -w "$LINK_TIMEOUT" "$next_host" "$next_port" -e /relay-send 2>"$RELAY_DIR/nc.err" &
  forward=$!
  copy="tee $RELAY_DIR/down"
else
  copy=cat
fi
if [ "$src" = - ]; then
  exec 3<"${RELAY_IN:-/dev/stdin}"  # an asynchronous list's stdin is /dev/null otherwise
  $copy <&3 2>/dev/null | $block 2>/dev/null &
else
  # a listener that takes anyone is what this must never be
  [ -n "${RELAY_SECRET:-}" ] || fail "no secret for port $src"
  mkfifo "$RELAY_DIR/up" || fail "mkfifo"
  # -ll: a relay-take for each connection, so a stranger connecting first (refused there,
  # without a byte reaching the fifo) leaves the port open for the neighbour; the one
  # with the secret ends the listener
  nc -ll -p "$src" -e /relay-take &
  echo $! >"$RELAY_DIR/listener"
  $copy <"$RELAY_DIR/up" 2>/dev/null | $block 2>/dev/null &
fi
reader=$!
if [ "$src" != - ]; then
  waited=0
  until listening "$src"; do
    sleep 0.1
    waited=$((waited + 1))
    [ "$waited" -lt 100 ] || fail "port $src did not open (in use?)"
  done
fi
if [ -n "$next_host" ]; then
  waited=0
  until linked; do
    kill -0 "$forward" 2>/dev/null || fail "cannot reach $next_host:$next_port: $(head -c 200 "$RELAY_DIR/nc.err")"
    sleep 0.1
    waited=$((waited + 1))
    [ "$waited" -lt $((LINK_TIMEOUT * 10)) ] || fail "cannot reach $next_host:$next_port: no answer in ${LINK_TIMEOUT} s"
  done
fi
echo ready >&2

count() { sed -n 's/^rchar: //p' "/proc/$reader/io" 2>/dev/null; }
while kill -0 "$reader" 2>/dev/null; do
  now=$(count)
  [ -n "$now" ] && echo "bytes $now" >&2
  sleep 1
done
wait "$reader"
[ -s "$RELAY_DIR/listener" ] && kill "$(cat "$RELAY_DIR/listener")" 2>/dev/null
echo "end" >&2
