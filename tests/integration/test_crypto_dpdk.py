#!/usr/bin/env python3
"""Crypto sessions through vhubd to DPDK's vhost_crypto example (a real
rte_vhost crypto back-end over a software crypto device).

- device.add: CRYPTO_SESSION negotiated; the back-end stays connected for
  the whole test (it closes on GET_CONFIG, which the daemon never sends
  unasked -- its log is checked too).  rte_vhost hands a device to the
  crypto library (which handles the session requests) only once its ring
  is ready, as a guest driver would have it: device.start with one ring.
- device.crypto.session.create with AES-CBC-128: a positive session id (the
  result matches rpc.discover's schema); a
  second session gets another id; device.crypto.session.close closes it;
  closing it again is refused by the back-end (-32006, nothing else breaks).
- An algorithm the crypto device rejects (ARC4): -32006 naming the request,
  with a detail; the device stays usable (another AES session works).
- Bad params (a 65-byte cipher key, a missing member): -32602.
- A back-end without CRYPTO_SESSION (qemu-storage-daemon): -32005.
- device.remove, vm.destroy, the daemon's fd count back to baseline.

Needs Debian's python3-jsonschema.
"""

import base64
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.backends import QsdNullBackend                       # noqa: E402
from vhubtest.client import (BACKEND_ERROR, INVALID_PARAMS, NOT_SUPPORTED,  # noqa: E402
                             RpcError, u64)
from vhubtest.daemon import Daemon                                 # noqa: E402
from vhubtest.events import wait_event                             # noqa: E402
from vhubtest.procs import wait_until                              # noqa: E402
from vhubtest.realpeers import CryptoBackend                       # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run  # noqa: E402
from vhubtest.virtq import Virtqueue                               # noqa: E402
from vhubtest.vmm import vm_with_memory                            # noqa: E402

try:
    import jsonschema
except ImportError:
    sys.stdout.write("FAILED: this test needs python3-jsonschema (apt-get install python3-jsonschema)\n")
    sys.exit(1)

PF_CRYPTO_SESSION = 1 << 7
# virtio-crypto values (include/uapi/linux/virtio_crypto.h)
CIPHER_CREATE_SESSION = 0x02        # VIRTIO_CRYPTO_OPCODE(CIPHER, 0x02)
CIPHER_ARC4 = 1
CIPHER_AES_CBC = 3
OP_ENCRYPT = 1
SYM_OP_CIPHER = 1
VERSION_1 = 1 << 32


def aes_cbc_params(key=bytes(range(16))):
    return {"op_code": CIPHER_CREATE_SESSION, "cipher_alg": CIPHER_AES_CBC,
            "cipher_key": base64.b64encode(key).decode(), "direction": OP_ENCRYPT,
            "op_type": SYM_OP_CIPHER}


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)

    sock = daemon.backend_socket("crypto0.sock")
    crypto = t.enter_logged("vhost-crypto", CryptoBackend(sock, log_dir=d))
    mem, vmm = vm_with_memory(t, c, 4 << 20)

    dev = vmm.add_device("crypto0", sock, type="crypto", queues=1)
    log("device.add: features %#x protocol_features %#x queues %r"
        % (dev["features"], dev["protocol_features"], dev["queues"]))
    check(dev["protocol_features"] & PF_CRYPTO_SESSION, "CRYPTO_SESSION protocol feature negotiated")
    e = expect_error(RpcError, c.call, "device.crypto.session.create",
                     dict({"vm": "vm0", "device": "crypto0"}, **aes_cbc_params()),
                     what="a session before the device runs")
    check_eq(e.code, BACKEND_ERROR, "rte_vhost refuses sessions before its device is ready")
    # (it closes the connection on a request it does not handle; the reconnect
    # may already be under way by now, so the event is the witness, not the state)
    ev = wait_event(c, "device.disconnected", "crypto0", 5.0)
    log("device.disconnected: %s" % ev.get("reason"))
    wait_until(lambda: vmm.device_state("crypto0")["state"] == "ready", 10.0,
               what="the device to be reconnected")
    vq = Virtqueue(mem, size=64, index=0)
    t.defer(vq.close)
    vmm.start_device("crypto0", VERSION_1, [vq])
    check_eq(vmm.device_state("crypto0")["state"], "running", "device running")

    result_schema = [m for m in c.call("rpc.discover")["methods"]
                     if m["name"] == "device.crypto.session.create"][0]["result"]["schema"]

    def create(params):
        p = dict({"vm": "vm0", "device": "crypto0"}, **params)
        res = c.call("device.crypto.session.create", p)
        errors = [e.message for e in jsonschema.Draft7Validator(result_schema).iter_errors(res)]
        check_eq(errors, [], "device.crypto.session.create's result matches rpc.discover's schema")
        return u64(res["session_id"])

    def close(sid):
        return c.call("device.crypto.session.close", {"vm": "vm0", "device": "crypto0", "session_id": sid})

    s1 = create(aes_cbc_params())
    check(s1 > 0, "AES-CBC-128 session created with a positive id (%d)" % s1)
    s2 = create(aes_cbc_params(bytes(16)))
    check(s2 > 0 and s2 != s1, "a second session gets its own id (%d)" % s2)
    check(crypto.alive and "Session %d created" % s1 in crypto.log_text(),
          "the back-end logged the session it created")
    check_eq(close(s1), {}, "device.crypto.session.close of the first session")
    e = expect_error(RpcError, close, s1, what="closing a closed session")
    check_eq(e.code, BACKEND_ERROR, "closing an unknown session: back-end error code")
    check_eq(e.data.get("request"), "CLOSE_CRYPTO_SESSION", "error names the request")

    bad = dict(aes_cbc_params(), cipher_alg=CIPHER_ARC4)
    e = expect_error(RpcError, create, bad, what="a cipher the crypto device rejects (ARC4)")
    check_eq(e.code, BACKEND_ERROR, "rejected algorithm: back-end error code")
    check_eq(e.data.get("request"), "CREATE_CRYPTO_SESSION", "error names the request")
    check_eq(e.data.get("device"), "crypto0", "error names the device")
    check("refused" in e.data.get("detail", ""), "error has a detail", e.data)
    check_eq(vmm.device_state("crypto0")["state"], "running", "device still running after the refusal")
    s3 = create(aes_cbc_params())
    check(s3 > 0 and s3 not in (s1, s2), "the device stays usable: another session (%d)" % s3)
    check_eq(close(s3), {}, "close it")
    check_eq(close(s2), {}, "close the second one")

    e = expect_error(RpcError, create, dict(aes_cbc_params(), cipher_key=base64.b64encode(bytes(65)).decode()),
                     what="a 65-byte cipher key")
    check_eq(e.code, INVALID_PARAMS, "over-long key: invalid params")
    no_key = aes_cbc_params()
    del no_key["cipher_key"]
    e = expect_error(RpcError, create, no_key, what="no cipher_key")
    check_eq(e.code, INVALID_PARAMS, "missing cipher_key: invalid params")
    e = expect_error(RpcError, create, dict(aes_cbc_params(), direction=256), what="direction 256")
    check_eq(e.code, INVALID_PARAMS, "direction out of range: invalid params")

    # A back-end without the protocol feature.
    blk_sock = daemon.backend_socket("blk0.sock")
    t.enter(QsdNullBackend([blk_sock], log_dir=d))
    vmm.add_device("blk0", blk_sock, type="blk")
    e = expect_error(RpcError, c.call, "device.crypto.session.create",
                     dict({"vm": "vm0", "device": "blk0"}, **aes_cbc_params()),
                     what="a session on qemu-storage-daemon")
    check_eq(e.code, NOT_SUPPORTED, "no CRYPTO_SESSION: not supported")
    e = expect_error(RpcError, c.call, "device.crypto.session.close",
                     {"vm": "vm0", "device": "blk0", "session_id": 1}, what="close on qemu-storage-daemon")
    check_eq(e.code, NOT_SUPPORTED, "close without CRYPTO_SESSION: not supported")

    check_eq(vmm.device_state("crypto0")["state"], "running", "crypto device connected since the start")
    check_eq(vmm.device_state("crypto0")["reconnects"], 1, "one reconnect (the early refusal) only")
    with open(daemon.log_path, errors="replace") as f:
        text = f.read()
    check("sent GET_CONFIG" not in text, "the daemon never sent GET_CONFIG (vhost_crypto closes on it)")

    vmm.remove_device("crypto0")
    vmm.remove_device("blk0")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)
    daemon.stop()
    check(crypto.alive, "vhost-crypto still runs after its front-end left")


if __name__ == "__main__":
    run(main)
