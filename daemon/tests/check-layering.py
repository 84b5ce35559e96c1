#!/usr/bin/env python3
"""The layering rules, checked on the sources (docs/architecture.md, "Layers"):

- the model (daemon/ but the composition root) includes no header of a face
  (control/'s, frontdoor/'s);
- a face includes none of the model's private headers (*-internal.h);
- the front door's transport (frontdoor/vhub-vmm-{conn,channel,listener},
  vmm-stream: what a hostile VMM talks to) includes nothing of the model;
- protocol/ includes nothing of the project outside itself;
- loop/ (libevent helpers every layer shares) includes nothing of the project.

Usage: check-layering.py SOURCE_ROOT.  Prints each violation; exit 1 if any.
"""
import os
import re
import sys

# the process: main, the systemd glue, signals, and the wiring of the faces
COMPOSITION_ROOT = {"main.c", "vhubd.c", "vhubd.h", "vhub-restart.c", "vhub-restart.h", "vhub-sd.c", "vhub-sd.h",
                    "vhub-signals.c", "vhub-signals.h"}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def sources(d):
    return sorted(f for f in os.listdir(d) if f.endswith((".c", ".h")))


def includes(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return INCLUDE.findall(f.read())


def main(root):
    bad = []
    daemon = os.path.join(root, "daemon")
    control = os.path.join(root, "control")
    frontdoor = os.path.join(root, "frontdoor")
    protocol = os.path.join(root, "protocol")
    face_headers = set(f for d in (control, frontdoor) for f in sources(d) if f.endswith(".h"))
    model_headers = set(f for f in sources(daemon) if f.endswith(".h"))
    model_private = set(f for f in sources(daemon) if f.endswith("-internal.h"))
    protocol_headers = set(f for f in sources(protocol) if f.endswith(".h"))
    if not face_headers or not model_private or not protocol_headers:
        bad.append("found nothing to check under %s" % root)
    for f in sources(daemon):
        if f in COMPOSITION_ROOT:
            continue
        for h in includes(os.path.join(daemon, f)):
            if h in face_headers:
                bad.append("daemon/%s (the model) includes %s, a face's header" % (f, h))
    for face, d in (("control", control), ("frontdoor", frontdoor)):
        for f in sources(d):
            for h in includes(os.path.join(d, f)):
                if h in model_private:
                    bad.append("%s/%s (a face) includes %s, the model's private header" % (face, f, h))
    transport = ("vhub-vmm-conn", "vhub-vmm-channel", "vhub-vmm-listener", "vmm-stream", "vmm-clock")
    for f in sources(frontdoor):
        if not f.startswith(transport):
            continue
        for h in includes(os.path.join(frontdoor, f)):
            if h in model_headers:
                bad.append("frontdoor/%s (the VMM transport, a leaf) includes %s, the model's" % (f, h))
    for f in sources(protocol):
        for h in includes(os.path.join(protocol, f)):
            if h not in protocol_headers:
                bad.append("protocol/%s includes %s, which is not protocol/'s" % (f, h))
    loop = os.path.join(root, "loop")
    for f in sources(loop):
        for h in includes(os.path.join(loop, f)):
            bad.append("loop/%s includes %s: it must include nothing of the project" % (f, h))
    for b in bad:
        print(b)
    print("%d violations" % len(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
