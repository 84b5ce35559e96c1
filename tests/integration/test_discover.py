#!/usr/bin/env python3
"""rpc.discover and daemon.info, against the real vhubd.

- The document is OpenRPC-shaped (a subset of OpenRPC 1.2's required shape,
  written here), info.version is the API version daemon.info reports, and
  every schema in it is a valid JSON Schema (draft 7).
- It lists exactly the methods the daemon implements: each method of the
  contract's table is called with {} and answers anything but -32601, except
  those in NOT_YET_IMPLEMENTED, which answer -32601.  Adding a method to the
  daemon means moving it out of NOT_YET_IMPLEMENTED here, and then every check
  below covers it.  docs/control-api.md's method table lists the same set.
- For params objects generated from each method's schemas -- valid ones, and
  for every member: left out, replaced by values of every JSON type and by
  values around its bounds, plus unknown members at every level -- "the
  schema (x-vhub-params) rejects" == "the daemon answers -32602".  Targets
  are VMs that do not exist, so nothing else is checked first (the daemon
  decides -32602 from the params alone) and valid params answer -32001
  (vm.create's are created and destroyed again).  Not generated: what JSON
  Schema cannot tell apart from the daemon's reading and the document's
  description states instead -- 1.0 for 1 (the daemon wants integers without
  a fraction), integers beyond 2^63-1 (a parse error), strings ending in a
  newline (Python's `$` matches before it), non-ASCII strings against a byte
  limit, fd indexes reused or beyond the fds sent.
- Every error code an answer carried is listed in that method's errors, and
  every method lists -32011 (any call can be in flight at a crash-restart:
  alone if it waits on back-ends or carries fds, else inside a batch).
- contract/vhub-contract.h's event names are the contract's, daemon.restarted
  included.
- The contract's codes are the same three times: contract/vhub-contract.h
  (daemon, C client library -- which installs it -- and vhubctl), this
  test's CONTRACT_ERRORS and the Python package's constants
  (python/vhub/errors.py, which the tests' vhubtest.client re-exports); the
  package's messages (vhub.errors.CODE_NAMES) are the header's.
- Methods marked x-vhub-answers-with-fds are refused inside a batch (-32602),
  the others are not.
- Results of real calls (a qemu-storage-daemon device started and stopped,
  memory, dirty log, shared objects; a test back-end device with shmem, a
  ring without a kick fd kicked with device.kick, stopped without draining)
  validate against the result schemas.  (vm.postcopy.listen's with
  backend_regions: test_postcopy.py; crypto sessions: test_crypto_dpdk.py.)
- daemon.info: api_version "2", started_at (RFC 3339 UTC, microseconds) close
  to when the daemon started, restarts 0, capabilities.
- The daemon's fd count is back to its baseline after all of it.

Needs Debian's python3-jsonschema.
"""

import base64
import datetime
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                                    # noqa: E402
from vhubtest.backends import QsdNullBackend                           # noqa: E402
from vhubtest.client import (INVALID_PARAMS, METHOD_NOT_FOUND,          # noqa: E402
                             NO_SUCH_VM, RpcError, encode, u64)
from vhubtest.daemon import Daemon                                     # noqa: E402
from vhubtest.memory import GuestMemory                                # noqa: E402
from vhubtest.testbackend import TestBackend                           # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run    # noqa: E402
from vhubtest.vmm import Vmm                                           # noqa: E402
from vhub import errors as python_errors   # noqa: E402  (python/, put on sys.path by vhubtest.client)

try:
    import jsonschema
except ImportError:
    sys.stdout.write("FAILED: this test needs python3-jsonschema (apt-get install python3-jsonschema)\n")
    sys.exit(1)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The contract's method table ("Methods"), in its order.
CONTRACT_METHODS = [
    "daemon.info", "vm.create", "vm.attach", "vm.destroy", "vm.list", "vm.memory.add",
    "vm.memory.remove", "vm.memory.list", "device.add", "device.remove", "device.list",
    "device.config.get", "device.config.set", "device.start", "device.stop", "device.reset",
    "device.net.rarp", "device.net.mtu", "vm.dirty_log.start", "vm.dirty_log.stop",
    "device.state.save", "device.state.load", "device.state.check", "shared_object.add",
    "shared_object.remove", "shared_object.list", "device.backend_reply", "events.subscribe",
    "rpc.discover", "device.stats", "device.crypto.session.create", "device.crypto.session.close",
    "device.gpu.set_socket", "device.iotlb.update", "device.iotlb.invalidate", "device.kick",
    "vm.postcopy.advise", "vm.postcopy.listen", "vm.postcopy.end",
]

# Contract methods the daemon does not implement yet: the one place to update.
NOT_YET_IMPLEMENTED = set()

# The contract's error codes ("Errors").
CONTRACT_ERRORS = {-32700, -32600, -32601, -32602, -32603} | set(range(-32011, -32000))
RESTARTED = -32011

# The contract's events ("Events").
CONTRACT_EVENTS = {
    "device.config_changed", "device.disconnected", "device.reconnected", "device.failed",
    "vm.lingering", "vm.created", "vm.destroyed", "device.added", "device.removed",
    "device.started", "device.stopped", "device.vmm_connected", "device.vmm_disconnected",
    "daemon.restarted", "device.backend_request",
}

# The shape OpenRPC 1.2 requires of what this document uses (written from the
# specification's object definitions; extensions are "x-" members).
X = {"^x-": {}}
OPENRPC_SHAPE = {
    "type": "object",
    "required": ["openrpc", "info", "methods"],
    "properties": {
        "openrpc": {"type": "string", "pattern": "^1\\.2\\.[0-9]+$"},
        "info": {
            "type": "object", "required": ["title", "version"],
            "properties": {"title": {"type": "string"}, "version": {"type": "string"},
                           "description": {"type": "string"}},
            "patternProperties": X, "additionalProperties": False,
        },
        "methods": {"type": "array", "items": {"$ref": "#/definitions/method"}},
        "components": {"type": "object"},
    },
    "patternProperties": X,
    "additionalProperties": False,
    "definitions": {
        "method": {
            "type": "object", "required": ["name", "params", "result"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "paramStructure": {"enum": ["by-name", "by-position", "either"]},
                "params": {"type": "array", "items": {"$ref": "#/definitions/content"}},
                "result": {"$ref": "#/definitions/content"},
                "errors": {"type": "array", "items": {"$ref": "#/definitions/error"}},
                "deprecated": {"type": "boolean"},
            },
            "patternProperties": X, "additionalProperties": False,
        },
        "content": {
            "type": "object", "required": ["name", "schema"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "summary": {"type": "string"},
                "description": {"type": "string"},
                "required": {"type": "boolean"},
                "schema": {"type": "object"},
                "deprecated": {"type": "boolean"},
            },
            "patternProperties": X, "additionalProperties": False,
        },
        "error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"}, "data": {}},
            "additionalProperties": False,
        },
    },
}

V = jsonschema.Draft7Validator


# ------------------------------------------------------------ the document

def check_shape(doc, info):
    V.check_schema(OPENRPC_SHAPE)
    errors = sorted(V(OPENRPC_SHAPE).iter_errors(doc), key=lambda e: list(e.path))
    check(not errors, "the document has OpenRPC 1.2's shape",
          "; ".join("%s: %s" % (list(e.path), e.message) for e in errors[:5]))
    check_eq(doc["info"]["version"], "2", "info.version (the API version)")
    check_eq(doc["info"]["version"], info["api_version"], "info.version == daemon.info's api_version")
    names = [m["name"] for m in doc["methods"]]
    check_eq(len(names), len(set(names)), "method names are unique")
    problems = []
    for m in doc["methods"]:
        for p in m["params"]:
            V.check_schema(p["schema"])
        V.check_schema(m["result"]["schema"])
        V.check_schema(m["x-vhub-params"])
        if not all(e["code"] in CONTRACT_ERRORS for e in m["errors"]):
            problems.append("%s: an error code outside the contract" % m["name"])
        # any call can be in flight at a crash-restart (alone, or in a batch
        # still running): the next process answers it -32011
        if RESTARTED not in {e["code"] for e in m["errors"]}:
            problems.append("%s: -32011 is not among its errors" % m["name"])
        # the params list and the whole-object schema say the same
        whole = m["x-vhub-params"]
        if whole.get("additionalProperties") is not False:
            problems.append("%s: x-vhub-params takes unknown members" % m["name"])
        if list(whole["properties"]) != [p["name"] for p in m["params"]]:
            problems.append("%s: x-vhub-params has other members than params" % m["name"])
        if sorted(whole["required"]) != sorted(p["name"] for p in m["params"] if p["required"]):
            problems.append("%s: x-vhub-params requires other members than params" % m["name"])
        for p in m["params"]:
            inner = dict(whole["properties"][p["name"]])
            inner.pop("description", None)
            if inner != p["schema"]:
                problems.append("%s.%s: params and x-vhub-params differ" % (m["name"], p["name"]))
    check(not problems, "every method's params list and x-vhub-params agree; errors are the contract's",
          problems)
    log("ok: every schema in the document is a valid draft-7 JSON Schema")


def check_vocabulary():
    with open(os.path.join(REPO, "contract", "vhub-contract.h")) as f:
        header = {int(code): message for code, message in
                  re.findall(r'X\([A-Z_]+, (-\d+), "([^"]*)"\)', f.read())}
    check_eq(set(header), CONTRACT_ERRORS, "contract/vhub-contract.h defines the contract's codes")
    with open(os.path.join(REPO, "contract", "vhub-contract.h")) as f:
        events = set(re.findall(r'X\([A-Z_]+, "([a-z_]+\.[a-z_.]+)"\)', f.read()))
    check_eq(sorted(events), sorted(CONTRACT_EVENTS), "contract/vhub-contract.h names the contract's events")
    source = os.path.join(REPO, "python", "vhub", "errors.py")
    check_eq(os.path.realpath(python_errors.__file__), os.path.realpath(source),
             "vhub.errors is the source tree's python/vhub/errors.py")
    python = {v for k, v in vars(python_errors).items()
              if k.isupper() and isinstance(v, int) and -32768 <= v <= -32000}
    check_eq(python, CONTRACT_ERRORS, "the Python package (python/vhub/errors.py) has a constant for each")
    names = python_errors.CODE_NAMES
    differ = {code: (names.get(code), header.get(code)) for code in set(names) | set(header)
              if names.get(code) != header.get(code)}
    check(not differ, "the Python package's messages (vhub.errors.CODE_NAMES) are the header's",
          "code: (python, header) %s" % differ)
    return header


def check_methods(c, doc):
    implemented = set()
    for name in CONTRACT_METHODS:
        try:
            c.call(name, {})
            implemented.add(name)
        except RpcError as e:
            if e.code != METHOD_NOT_FOUND:
                implemented.add(name)
    c.call("vm.list")   # events.subscribe {} above changed nothing else
    expected = set(CONTRACT_METHODS) - NOT_YET_IMPLEMENTED
    check(implemented == expected, "the daemon implements the contract's methods but NOT_YET_IMPLEMENTED "
          "(%d)" % len(expected), set_diff(implemented, expected))
    listed = {m["name"] for m in doc["methods"]}
    check(listed == implemented, "rpc.discover lists exactly the methods the daemon implements",
          set_diff(listed, implemented))
    with open(os.path.join(REPO, "docs", "control-api.md")) as f:
        documented = set(re.findall(r"^\| \[`([a-z_.]+)`\]", f.read(), re.M))
    check(documented == implemented, "docs/control-api.md's method table lists the same methods",
          set_diff(documented, implemented))


def set_diff(got, want):
    return "extra %s, missing %s" % (sorted(got - want), sorted(want - got))


# ------------------------------------------------------ generated params

SAMPLE_STRINGS = ["nosuchvm", "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978", "52:54:00:12:34:56", "AQID",
                  "/run/vhost-user/none.sock"]


def is_fd(schema):
    """fd indexes are plain integers; u64s are integer-or-hex (anyOf)."""
    return schema.get("type") == "integer"


def valid(schema, value):
    return V(schema).is_valid(value)


class Fds:
    """Assigns fd indexes 0, 1, ... to the fd members of one params object."""

    def __init__(self):
        self.n = 0

    def take(self):
        self.n += 1
        return self.n - 1


def sample(schema, fds):
    """A value the schema accepts, every optional member included."""
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        ints = schema["anyOf"][0]
        return max(ints["minimum"], min(1, ints["maximum"]))
    t = schema["type"]
    if t == "integer":
        return fds.take()
    if t == "boolean":
        return True
    if t == "string":
        for s in SAMPLE_STRINGS:
            if valid(schema, s):
                return s
        raise TestFailure("FAILED: no sample string fits %s" % json.dumps(schema))
    if t == "array":
        return [sample(schema["items"], fds) for _ in range(max(1, schema.get("minItems", 0)))]
    if t == "object":
        return {k: sample(v, fds) for k, v in schema.get("properties", {}).items()}
    raise TestFailure("FAILED: cannot sample %s" % json.dumps(schema))


def b64(n):
    return base64.b64encode((bytes(range(256)) * 2)[:n]).decode()


# Values of every JSON type and the usual troublemakers; schemas decide.
GENERIC = [
    None, True, False, [], {}, [1], {"a": 1}, 1.5, -1, 0, 1, 7, 67, 68, 255, 256, 32768, 32769,
    65535, 65536, 3600000, 3600001, 604800000, 604800001, 2**32 - 2, 2**32 - 1, 2**32, 2**53,
    2**63 - 1,
    "", "a", "vm-0", "a b", "a/b", "a:b", "a\nb", "\u00e9", "a\u0000b", "a" * 31, "a" * 32,
    "a" * 64, "a" * 65, "/" + "a" * 106, "/" + "a" * 107,
    "0x", "0x0", "0x10", "0X1F", "0xg", "0x-1", " 0x1", "0x1 ", "4096", "1e3", "0x" + "f" * 16,
    "0x1" + "0" * 16, "0x" + "0" * 15 + "1", "0x" + "0" * 16 + "1", "0xfffffffe", "0xffffffff",
    "0x100000000", "0x8000", "0x8001", "0x44", "0x43",
    "client", "server", "peer", "CLIENT",
    "AQID", "AQ==", "AQI=", "AQ=", "A===", "====", "AQ==AQ==", b64(255), b64(256), b64(257),
    "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978", "6F1C9E52-4B7A-4F0E-9A51-2D3C4B5A6978",
    "6f1c9e524b7a4f0e9a512d3c4b5a6978", "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a697",
    "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a697g", "{6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978}",
    "52:54:00:12:34:56", "52:54:00:AB:cd:EF", "52-54-00-12-34-56", "52:54:00:12:34",
    "52:54:00:12:34:5g", "52:54:00:12:34:56:78", " 2:54:00:12:34:56", "+2:54:00:12:34:56",
]


def bound_values(schema):
    """Around a u64's bounds, in both forms."""
    if "anyOf" not in schema:
        return []
    lo, hi = schema["anyOf"][0]["minimum"], schema["anyOf"][0]["maximum"]
    out = [lo, hi, "0x%x" % lo, "0x%X" % hi, "0x%016x" % hi]
    if lo > 0:
        out += [lo - 1, "0x%x" % (lo - 1)]
    if hi < 2**63 - 1:
        out += [hi + 1, "0x%x" % (hi + 1)]
    return out


def probes(schema, fds_used):
    if is_fd(schema):
        # any index no other member of this object uses: "used twice" is not a schema rule
        return [v for v in GENERIC if not isinstance(v, int) or isinstance(v, bool)] + \
            [fds_used, fds_used + 3, 252, 253, -1]
    return GENERIC + bound_values(schema)


def cases(method):
    """(what, params) for one method: the valid object, then one change each."""
    whole = method["x-vhub-params"]
    fds = Fds()
    base = sample(whole, fds)
    yield "valid", base
    yield "an unknown member", dict(base, bogus=1)

    def variants(schema, obj, path, used):
        for key, sub in schema.get("properties", {}).items():
            where = path + [key]
            without = dict(obj)
            del without[key]
            yield where, "without it", without
            for v in probes(sub, used):
                yield where, "= %s" % json.dumps(v)[:40], dict(obj, **{key: v})
            if sub.get("type") == "array" and sub["items"].get("type") == "object":
                item = obj[key][0]
                yield where, "two elements", dict(obj, **{key: [item, renumber_fds(sub["items"], item, used)]})
                yield where, "[0] with an unknown member", dict(obj, **{key: [dict(item, bogus=1)]})
                for w, what, changed in variants(sub["items"], item, where + ["0"], used):
                    yield w, what, dict(obj, **{key: [changed]})

    for where, what, params in variants(whole, base, [], fds.n):
        yield "%s %s" % (".".join(where), what), params


def renumber_fds(schema, item, first):
    """The same element with fd indexes of its own."""
    out = dict(item)
    n = first
    for key, sub in schema["properties"].items():
        if is_fd(sub):
            out[key] = n
            n += 1
    return out


def fds_needed(method, params):
    """How many fds to send: one past the highest valid index the params name."""
    top = 0

    def walk(schema, obj):
        nonlocal top
        if not isinstance(obj, dict):
            return
        for key, sub in schema.get("properties", {}).items():
            v = obj.get(key)
            if is_fd(sub) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 253:
                top = max(top, v + 1)
            elif sub.get("type") == "array" and isinstance(v, list):
                for e in v:
                    walk(sub["items"], e)

    walk(method["x-vhub-params"], params)
    return top


def equivalence(c, doc):
    """The schema rejects exactly what the daemon answers -32602."""
    seen_codes = {}
    n = rejected = 0
    for m in doc["methods"]:
        validator = V(m["x-vhub-params"])
        for what, params in cases(m):
            want_reject = not validator.is_valid(params)
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(fds_needed(m, params))]
            detail = None
            try:
                c.call(m["name"], params, fds=fds)
                code = None
            except RpcError as e:
                code = e.code
                detail = (e.data or {}).get("detail")
            finally:
                for fd in fds:
                    os.close(fd)
            if code is None and m["name"] == "vm.create":
                c.call("vm.destroy", {k: v for k, v in params.items() if k in ("vm", "uid")})
            if (code == INVALID_PARAMS) != want_reject:
                errs = [e.message for e in validator.iter_errors(params)]
                raise TestFailure("FAILED: %s %s: the schema %s it, the daemon answered %s\n  params %s\n  schema: %s"
                                  % (m["name"], what, "rejects" if want_reject else "accepts",
                                     "%s (%s)" % (code, detail) if code else "a result",
                                     json.dumps(params)[:400], errs[:3]))
            check_code_listed(m, code, what)
            seen_codes.setdefault(m["name"], set()).add(code)
            n += 1
            rejected += want_reject
    log("ok: %d params objects over %d methods: the schema rejected %d, exactly those the daemon "
        "answered -32602" % (n, len(doc["methods"]), rejected))
    for name in ("vm.memory.list", "device.start", "device.backend_reply"):
        check(NO_SUCH_VM in seen_codes[name], "%s: valid params reached the VM lookup (-32001)" % name)


def check_code_listed(m, code, what):
    if code is not None and code not in {e["code"] for e in m["errors"]}:
        raise TestFailure("FAILED: %s %s: answered %d, which its errors do not list" % (m["name"], what, code))


# -------------------------------------------------------------- batches

def batches(c, doc):
    refused, accepted = set(), set()
    for m in doc["methods"]:
        if m["name"] == "vm.create":
            continue    # would create a VM: nothing the others do not show
        fds = Fds()
        params = sample(m["x-vhub-params"], fds)
        req = {"jsonrpc": "2.0", "id": 1, "method": m["name"], "params": params}
        if fds.n:
            req["fds"] = fds.n
        efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(fds.n)]
        c.send_raw(encode([req, {"jsonrpc": "2.0", "id": 2, "method": "daemon.info"}]), efds)
        for fd in efds:
            os.close(fd)
        arr = c._wait(lambda: c._batches.pop(0) if c._batches else None, 5, "a batch answer")
        first = [r for r in arr if r.get("id") == 1][0]
        error = first.get("error") or {}
        if error.get("code") == INVALID_PARAMS and "batch" in error["data"]["detail"]:
            refused.add(m["name"])
        elif error.get("code") != INVALID_PARAMS:
            accepted.add(m["name"])
        check_code_listed(m, error.get("code"), "inside a batch")
    with_fds = {m["name"] for m in doc["methods"] if m.get("x-vhub-answers-with-fds")}
    check(refused == with_fds and with_fds, "inside a batch, exactly the methods marked "
          "x-vhub-answers-with-fds are refused (-32602): %s" % sorted(with_fds), set_diff(refused, with_fds))
    others = {m["name"] for m in doc["methods"]} - with_fds - {"vm.create"}
    check(accepted == others, "the other %d methods are accepted inside a batch" % len(others),
          set_diff(accepted, others))


# -------------------------------------------------------------- results

def result_checker(doc):
    by_name = {m["name"]: m for m in doc["methods"]}

    def checked(c, method, params=None, fds=()):
        res = c.call(method, params, fds=fds)
        schema = by_name[method]["result"]["schema"]
        errors = [e.message for e in V(schema).iter_errors(res)]
        check(not errors, "%s's result matches its schema" % method, (errors[:3], res))
        return res
    return checked


def results(t, daemon, c, doc, d):
    call = result_checker(doc)
    call(c, "daemon.info")
    call(c, "rpc.discover")
    call(c, "vm.create", {"vm": "r"})
    mem = t.enter(GuestMemory(4 << 20, base=0x40000000))
    vmm = Vmm(c, "r")
    r = mem.regions[0]
    call(c, "vm.memory.add", {"vm": "r", "gpa": r.gpa, "size": r.size, "fd": 0, "offset": r.offset,
                              "uaddr": r.uaddr}, fds=[r.fd])
    call(c, "vm.memory.list", {"vm": "r"})
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    call(c, "shared_object.add", {"vm": "r", "uuid": "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978", "fd": 0}, fds=[efd])
    os.close(efd)
    call(c, "shared_object.list", {"vm": "r"})
    call(c, "shared_object.remove", {"vm": "r", "uuid": "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978"})
    log_res, log_fds = c.call_fds("vm.dirty_log.start", {"vm": "r"})
    for fd in log_fds:
        os.close(fd)
    errors = [e.message for e in V(result_schema(doc, "vm.dirty_log.start")).iter_errors(log_res)]
    check(not errors, "vm.dirty_log.start's result (with its fd) matches its schema", errors)
    call(c, "vm.dirty_log.stop", {"vm": "r"})

    sock = daemon.backend_socket("null0.sock")
    t.enter(QsdNullBackend([sock], size=8 << 20, num_queues=1, log_dir=d))
    dev = call(c, "device.add", {"vm": "r", "device": "b0", "socket": sock, "type": "blk"})
    call(c, "device.list", {"vm": "r"})
    call(c, "vm.list")
    call(c, "device.config.get", {"vm": "r", "device": "b0", "offset": 0, "size": 8})
    q = blk.BlkQueue(mem, index=0, size=64)
    params, fds = vmm.start_params("b0", scenarios.BLK_FEATURES & u64(dev["features"]), [q.vq])
    call(c, "device.start", params, fds=fds)
    check_eq(len(q.read_sectors(0, 8)), 4096, "the started device reads")
    call(c, "device.list", {"vm": "r"})
    call(c, "device.stats", {"vm": "r", "device": "b0"})
    call(c, "device.stop", {"vm": "r", "device": "b0"})
    call(c, "device.reset", {"vm": "r", "device": "b0"})
    call(c, "events.subscribe", {"vm": "r"})
    call(c, "device.remove", {"vm": "r", "device": "b0"})
    q.vq.close()
    protocol_results(t, daemon, c, d, call, vmm, mem)
    call(c, "vm.destroy", {"vm": "r"})


# the test back-end's default offer plus INBAND_NOTIFICATIONS (14),
# GET_VRING_BASE_INFLIGHT (20), SHMEM (22), GET_VRING_BASE_SKIP_DRAIN (23)
TB_PROTOCOL_FEATURES = 0xdbe2b | 1 << 14 | 1 << 20 | 1 << 22 | 1 << 23


def protocol_results(t, daemon, c, d, call, vmm, mem):
    """The members only newer back-ends bring: shmem, kick-less rings, inflight."""
    sock = daemon.backend_socket("tb0.sock")
    t.enter(TestBackend([sock], args=["--protocol-features", "%x" % TB_PROTOCOL_FEATURES,
                                      "--shmem", "64K,0"], log_dir=d))
    dev = call(c, "device.add", {"vm": "r", "device": "t0", "socket": sock, "type": "blk"})
    check_eq([u64(x) for x in dev.get("shmem", [])], [64 << 10, 0], "device.add's shmem")
    q = blk.BlkQueue(mem, index=0, size=64)
    params, fds = vmm.start_params("t0", scenarios.BLK_FEATURES & u64(dev["features"]), [q.vq])
    del params["vrings"][0]["kick"]         # in-band kicks only
    call(c, "device.start", params, fds=fds)
    req = q.submit(blk.VIRTIO_BLK_T_IN, 0, length=4096)
    check_eq(call(c, "device.kick", {"vm": "r", "device": "t0", "index": 0}), {}, "device.kick")
    check_eq(q.wait(1, 5.0), [req], "the kicked request completed")
    res = call(c, "device.stop", {"vm": "r", "device": "t0", "drain": False})
    check_eq(res["vrings"], [{"index": 0, "base": 1, "inflight": 0}],
             "device.stop drain:false: base and inflight per ring")
    call(c, "device.stats", {"vm": "r", "device": "t0"})
    call(c, "device.remove", {"vm": "r", "device": "t0"})
    q.vq.close()


def result_schema(doc, name):
    return [m for m in doc["methods"] if m["name"] == name][0]["result"]["schema"]


# ------------------------------------------------------------ daemon.info

def daemon_info(c, started_before, started_after):
    info = c.call("daemon.info")
    check_eq(info["api_version"], "2", "daemon.info api_version")
    check_eq(info["restarts"], 0, "daemon.info restarts (no restart yet)")
    check(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", info["started_at"]) is not None,
          "started_at is RFC 3339 UTC with microseconds", info["started_at"])
    at = datetime.datetime.strptime(info["started_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    check(started_before - 1e-3 <= at <= started_after + 1e-3,
          "started_at lies between launching the daemon and its first answer",
          (started_before, at, started_after))
    check(isinstance(info["capabilities"], list) and all(isinstance(x, str) for x in info["capabilities"])
          and len(set(info["capabilities"])) == len(info["capabilities"]),
          "capabilities: distinct names", info["capabilities"])
    check("reconnect" in info["capabilities"], "capabilities name what this build has (reconnect)")
    check_eq(c.call("daemon.info")["started_at"], info["started_at"], "started_at does not move")
    return info


# ---------------------------------------------------------------- main

def main(t):
    d = t.tmpdir()
    before = time.time()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    after = time.time()
    info = daemon_info(c, before, after)
    base = daemon.settled_fd_count(c)
    doc = c.call("rpc.discover")
    check(c.call("rpc.discover") == doc, "rpc.discover answers the same document again")
    check_shape(doc, info)
    messages = check_vocabulary()
    wrong = [(m["name"], e) for m in doc["methods"] for e in m["errors"]
             if messages[e["code"]] != e["message"]]
    check(not wrong, "every method's errors carry the header's messages", wrong[:3])
    check_methods(c, doc)
    equivalence(c, doc)
    batches(c, doc)
    check_eq(c.call("vm.list")["vms"], [], "no VM left behind by the generated calls")
    daemon.check_fd_baseline(base, "the daemon's fd count is back to its baseline")
    results(t, daemon, c, doc, d)
    daemon.check_fd_baseline(base, "the daemon's fd count is back to its baseline after the results")
    daemon.stop()


if __name__ == "__main__":
    run(main)
