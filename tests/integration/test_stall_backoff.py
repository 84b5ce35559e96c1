#!/usr/bin/env python3
"""The reconnect backoff grows for a back-end that fails every handshake
(issue 15, "Backoff never grows").

vhubd runs at --log-level info with --reconnect-max-ms 1600.  Device A is a
vhub-test-backend; a small listener of the test's own that accepts each
connection and closes it at once is renamed over A's socket path, and the
test back-end is SIGKILLed: A is lost, and every restore attempt from then on
connects and fails its handshake.  For OBSERVE_S seconds the listener
records when each connection arrives:

- the gaps between attempts follow the documented backoff: reconnect_ms
  (100) doubling up to the cap (each gap at least 90 % of its step; one
  attempt every 100 ms, or a burst of quick retries, fails);
- the daemon keeps trying (at least 5 attempts where the schedule makes 10);
- the daemon's log over the outage holds a handful of lines, not several per
  attempt: the first failure is logged, the rest are counted and summarized
  (a summary line names how many attempts failed).

Then the test back-end comes back on the path: A is restored (one
device.disconnected and one device.reconnected for the whole outage), and
the log says after how many failed attempts.  After the restore has lasted
longer than the 5 s that make it count as stable, a new loss starts again
from reconnect_ms: the first attempt of the second outage comes well before
the cap.  Last, the socket disappears and is created again by the listener:
the daemon tries at once (inotify), and after that failed handshake goes
back to the backoff instead of retrying every millisecond.
"""

import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.events import no_event, wait_event               # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

RECONNECT_MS = 100
CAP_MS = 1600
OBSERVE_S = 12.0              # past the 10 s log rate-limit interval
STABLE_S = 5.0                 # a restore that lasted this long resets the backoff
MAX_LOG_LINES = 8


class AcceptAndClose:
    """A unix socket listener that accepts every connection and closes it at
    once, recording when each one came."""

    def __init__(self, path):
        self.path = path
        self.times = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.times.append(time.monotonic())
            conn.close()

    def close(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


def log_lines(daemon):
    with open(daemon.log_path, errors="replace") as f:
        return [ln.rstrip("\n") for ln in f if ln.startswith("vhubd[")]


def outage_with_listener(daemon, tb, sock, observe_s):
    """Swap an accept-and-close listener onto sock, kill the test back-end:
    (listener, time of the kill, log lines before).  The caller closes it."""
    tmp = sock + ".new"
    lst = AcceptAndClose(tmp)
    os.rename(tmp, sock)      # the path now names our listener
    lst.path = sock
    before = len(log_lines(daemon))
    t0 = time.monotonic()
    tb.kill()
    time.sleep(observe_s)
    return lst, t0, before


def bring_back(t, daemon, c, lst, tb):
    lst.close()
    os.unlink(lst.path)
    tb.start()
    ev = wait_event(c, "device.reconnected", "A", timeout=CAP_MS / 1000 * 2 + 10)
    return ev


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, log_level="info",
                            extra_args=["--reconnect-max-ms", str(CAP_MS),
                                        "--backend-timeout-ms", "2000"]))
    c = daemon.client()
    sock = daemon.backend_socket("a.sock")
    tb = t.enter(TestBackend([sock], log_dir=d))
    mem, vmm = vm_with_memory(t, c, 4 << 20)
    vmm.add_device("A", sock, reconnect_ms=RECONNECT_MS)

    # ---- outage 1: every attempt connects and fails its handshake ----
    lst, t0, before = outage_with_listener(daemon, tb, sock, OBSERVE_S)
    times = list(lst.times)
    lines = log_lines(daemon)[before:]
    log("%d attempts in %.1f s, at (ms after the loss): %s"
        % (len(times), OBSERVE_S, [round((x - t0) * 1000) for x in times]))
    for ln in lines:
        log("daemon: %s" % ln)
    check(len(times) >= 5, "the daemon keeps trying (%d attempts in %.0f s)"
          % (len(times), OBSERVE_S))
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    log("gaps (ms): %s" % [round(g) for g in gaps])
    # the first attempt comes reconnect_ms after the loss, each failed one
    # doubles the delay, up to the cap
    step = RECONNECT_MS
    for i, g in enumerate(gaps):
        step = min(step * 2, CAP_MS)
        if g < 0.9 * step:
            check(False, "gap %d between attempts is at least 90%% of the backoff step %d ms"
                  % (i, step), "%.0f ms; gaps %s" % (g, [round(x) for x in gaps]))
    log("ok: every gap follows the backoff (100 ms doubling up to %d ms)" % CAP_MS)
    check(len(lines) <= MAX_LOG_LINES, "%d log lines for %d attempts (at most %d)"
          % (len(lines), len(times), MAX_LOG_LINES))
    summary = [ln for ln in lines if re.search(r"\b\d+ failed attempts\b", ln)]
    check(summary, "a log line summarizes the failed attempts with a count")

    ev = bring_back(t, daemon, c, lst, tb)
    log("restored: %s" % ev)
    wait_event(c, "device.disconnected", "A", timeout=1)
    no_event(c, "device.disconnected", "A")
    no_event(c, "device.reconnected", "A")
    log("ok: one device.disconnected and one device.reconnected for the outage")
    check_eq(vmm.device_state("A")["state"], "ready", "A is ready again")
    restored = [ln for ln in log_lines(daemon)[before:] if "restored" in ln]
    check(restored and re.search(r"after \d+ failed attempts?", restored[-1]),
          "the restore's log line counts the failed attempts", restored)
    log("daemon: %s" % restored[-1])

    # ---- outage 2, after a restore that lasted: from reconnect_ms again ----
    time.sleep(STABLE_S + 0.5)
    lst, t0, before = outage_with_listener(daemon, tb, sock, 1.5)
    times = list(lst.times)
    log("second outage: attempts at %s ms" % [round((x - t0) * 1000) for x in times])
    check(times and times[0] - t0 < CAP_MS / 1000 / 2,
          "after a stable restore the first attempt comes after reconnect_ms, not the cap")
    bring_back(t, daemon, c, lst, tb)

    # ---- outage 3: the socket reappears (inotify) and fails every handshake ----
    # The daemon tries at once when the name is created, and quickly again
    # while connect() is refused -- but a connection that fails its handshake
    # goes back to the backoff, not to 1 ms retries.
    tb.kill()
    os.unlink(sock)
    time.sleep(0.5)
    lst = AcceptAndClose(sock)
    t0 = time.monotonic()
    time.sleep(3.0)
    times = list(lst.times)
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    log("socket re-created: attempts at %s ms, gaps %s"
        % ([round((x - t0) * 1000) for x in times], [round(g) for g in gaps]))
    check(times and times[0] - t0 < 0.5, "the re-created socket is tried at once")
    check(len(gaps) >= 1 and min(gaps) >= 0.9 * 2 * RECONNECT_MS,
          "then the failed handshakes back off (%d attempts in 3 s, no quick retries)" % len(times))
    bring_back(t, daemon, c, lst, tb)
    vmm.remove_device("A")
    vmm.destroy()


run(main)
