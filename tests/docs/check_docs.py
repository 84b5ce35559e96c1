#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""docs-reference: what the documentation names exists, and what the code
has is documented -- the part of "the docs say what the code does" that a
machine can check.

- Every method rpc.discover lists (the daemon built here, run for the test)
  appears in docs/control-api.md, and so do every event and error code of
  contract/vhub-contract.h and every capability daemon.info reports.
- Every option `vhubd --help` prints appears in docs/vhubd.8, and every
  option of vhubd.8's SYNOPSIS is one --help prints.
- Every command `vhubctl --help` lists has its entry in docs/vhubctl.1
  (a .TP entry starting with the command's words), and every global option
  appears there.
- docs/architecture.md: every .c/.h file it names exists (globs match at
  least one), and every .c file under daemon/ control/ protocol/ frontdoor/
  (tests aside) is named there.
- Every test name the docs cite -- a backticked word of a test family
  (`restart-...`, `frontdoor-guest-...`; the families are the first words
  of the tests meson knows) or a name on a `meson test` command line --
  is a test or a benchmark meson knows; every `--suite` named exists.
- docs/performance.md: every "benchmark `NAME`" and every name on a
  `meson test --benchmark` line is a benchmark, every tests/bench/ file it
  names exists, every benchmark is named there.
- docs/protocol-coverage.md: every request of protocol/'s tables (front-end
  and back-end) has its row, under its number, and every protocol feature
  of protocol/vhost-user.h under its bit.
- docs/fuzzing.md and tests/fuzz/fuzz-campaign.sh: every fuzz target
  (a source defining LLVMFuzzerTestOneInput) is in fuzzing.md's table and
  in the campaign script, and the corpus directories both name exist.

    check_docs.py --source-root DIR --build-root DIR --vhubd PATH --vhubctl PATH

Prints every problem found and exits 1 if there is one.
"""

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DOC_FILES = ["README.md", "protocol/README.md"]     # besides docs/*.md and the man pages
SOURCE_DIRS = ["daemon", "control", "protocol", "frontdoor"]

problems = []
checked = [0]       # how many problems there were when the last check began


def problem(what):
    problems.append(what)
    print("PROBLEM: " + what, flush=True)


def ok(what):
    """What a check found right, said only if it found nothing wrong."""
    if len(problems) == checked[0]:
        print("ok: " + what, flush=True)
    checked[0] = len(problems)


def read(root, rel):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


def roff_text(s):
    """A man page's text with roff's escapes taken out: \\- is -, fonts go."""
    s = s.replace("\\-", "-").replace("\\(dq", '"').replace("\\&", "")
    return re.sub(r"\\f[BIRP]", "", s)


def repo_files(root):
    out = subprocess.run(["git", "-C", root, "ls-files"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout:
        return out.stdout.split()
    files = []          # a tarball: walk the tree
    for d, dirs, names in os.walk(root):
        # no hidden directories, no build directories (meson's, whatever their name)
        dirs[:] = [x for x in dirs if not x.startswith(".")
                   and not os.path.isdir(os.path.join(d, x, "meson-info"))]
        files += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return files


# ------------------------------------------------------------ the daemon

def daemon_answers(vhubd, methods):
    """Run vhubd on a private socket and call each of methods with no
    params; their results, in order."""
    tmp = tempfile.mkdtemp(prefix="vhub-docs-")
    sock_path = os.path.join(tmp, "control.sock")
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC")}
    proc = subprocess.Popen([vhubd, "--control", sock_path, "--backend-dir", tmp,
                             "--vmm-dir", os.path.join(tmp, "vmm"), "--no-fd-store"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 60     # a give-up, not a measurement
        while True:
            try:
                c.connect(sock_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("vhubd did not come up: %s" % proc.stderr.read().decode()[-2000:])
                time.sleep(0.05)
        c.settimeout(60)
        for i, m in enumerate(methods):
            c.sendall((json.dumps({"jsonrpc": "2.0", "id": i, "method": m}) + "\n").encode())
        answers, buf = {}, b""
        while len(answers) < len(methods):
            chunk = c.recv(1 << 16)
            if not chunk:
                raise RuntimeError("vhubd closed the connection")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "id" in msg:
                    if "result" not in msg:
                        raise RuntimeError("%s answered %s" % (methods[msg["id"]], msg))
                    answers[msg["id"]] = msg["result"]
        c.close()
        return [answers[i] for i in range(len(methods))]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        shutil.rmtree(tmp, ignore_errors=True)


def check_control_api(root, discover, info):
    doc = read(root, "docs/control-api.md")
    ticked = set(re.findall(r"`([^`\n]+)`", doc))
    headings = " ".join(re.findall(r"^#+ (.*)$", doc, re.M))
    names = [m["name"] for m in discover["methods"]]
    missing = [n for n in names if n not in ticked and n not in headings]
    for n in missing:
        problem("docs/control-api.md does not name method %s (rpc.discover lists it)" % n)
    header = read(root, "contract/vhub-contract.h")
    events = re.findall(r'X\([A-Z_]+, "([a-z_]+\.[a-z_.]+)"\)', header)
    codes = re.findall(r"X\([A-Z_]+, (-\d+), \"", header)
    for e in events:
        if e not in ticked and e not in headings:
            problem("docs/control-api.md does not name event %s (contract/vhub-contract.h has it)" % e)
    for code in codes:
        if not re.search(r"(?<![\d])%s(?!\d)" % re.escape(code), doc):
            problem("docs/control-api.md does not name error %s (contract/vhub-contract.h has it)" % code)
    for cap in info["capabilities"]:
        if cap not in ticked and '"%s"' % cap not in doc:
            problem("docs/control-api.md does not name capability %s (daemon.info reports it)" % cap)
    ok("docs/control-api.md names the %d methods of rpc.discover, %d events, %d error codes, %d capabilities"
       % (len(names), len(events), len(codes), len(info["capabilities"])))


# ------------------------------------------------------------ the man pages

def help_text(exe):
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError("%s --help exited %d" % (exe, out.returncode))
    return out.stdout


def check_vhubd_8(root, vhubd):
    helptext = help_text(vhubd)
    options = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", helptext)))
    page = roff_text(read(root, "docs/vhubd.8"))
    for o in options:
        if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(o), page):
            problem("docs/vhubd.8 does not describe %s (vhubd --help prints it)" % o)
    synopsis = page[page.index(".SH SYNOPSIS"):page.index(".SH DESCRIPTION")]
    for o in re.findall(r"^\.OP (--[a-z0-9-]+)", synopsis, re.M):
        if o not in options:
            problem("docs/vhubd.8's SYNOPSIS names %s, which vhubd --help does not" % o)
    ok("docs/vhubd.8 describes the %d options of vhubd --help" % len(options))


def check_vhubctl_1(root, vhubctl):
    helptext = help_text(vhubctl)
    body = helptext.split("Commands:", 1)[1].split("\n\n", 1)[0]
    commands = [re.split(r"\s{2,}", line.strip())[0] for line in body.splitlines() if line.strip()]
    globals_ = helptext.split("Commands:", 1)[0]
    options = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", globals_)))
    page = roff_text(read(root, "docs/vhubctl.1"))
    lines = page.splitlines()
    entries = [re.sub(r'["]', "", lines[i + 1]) for i in range(len(lines) - 1) if lines[i].startswith(".TP")]
    entries = [re.sub(r"^\.B[I]?\s+", "", e) for e in entries if e.startswith(".B")]
    for cmd in commands:
        if not any(e == cmd or e.startswith(cmd + " ") for e in entries):
            problem("docs/vhubctl.1 has no entry for command '%s' (vhubctl --help lists it)" % cmd)
    for o in options:
        if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(o), page):
            problem("docs/vhubctl.1 does not describe %s (vhubctl --help prints it)" % o)
    if len(commands) < 10:
        problem("vhubctl --help: read only %d commands (%s); has its layout changed?" % (len(commands), commands))
    ok("docs/vhubctl.1 has an entry for each of the %d commands and %d options of vhubctl --help"
       % (len(commands), len(options)))


# ------------------------------------------------------------ architecture.md

def check_architecture(root, files):
    doc = read(root, "docs/architecture.md")
    named = set(re.findall(r"(?<![\w./*{}<-])([\w./*-]*[\w*]\.[ch])\b", doc))
    for name in sorted(named):
        if not any(fnmatch.fnmatchcase(f, name) or fnmatch.fnmatchcase(f, "*/" + name) for f in files):
            problem("docs/architecture.md names %s, which is not in the tree" % name)
    sources = [f for f in files if f.endswith(".c") and f.split("/")[0] in SOURCE_DIRS
               and "/tests/" not in f and not os.path.basename(f).startswith("test-")]
    literal = {n for n in named if "*" not in n}
    for f in sorted(sources):
        if f not in literal and os.path.basename(f) not in literal:
            problem("docs/architecture.md does not name %s" % f)
    ok("docs/architecture.md: %d file names, all in the tree; it names each of the %d sources of %s"
       % (len(named), len(sources), ", ".join(d + "/" for d in SOURCE_DIRS)))


# ------------------------------------------------------------ tests and benchmarks

def meson_intro(build, what):
    with open(os.path.join(build, "meson-info", "intro-%s.json" % what)) as f:
        return json.load(f)


def meson_names(root, files):
    """Names meson.build files give targets (executables, libraries): a
    backticked target name is not a test's."""
    names = set()
    for f in files:
        if os.path.basename(f) == "meson.build":
            names |= set(re.findall(r"(?:executable|library|static_library|shared_library)\(\s*'([^']+)'",
                                    read(root, f)))
    return names


def meson_test_lines(text):
    """The names on each `meson test` command line of text: (benchmark?, [names], [suites])."""
    for m in re.finditer(r"meson test([^\n`#|)$]*)", text):
        words = m.group(1).split()
        names, suites, i = [], [], 0
        while i < len(words):
            w = words[i]
            if w in ("-C", "--setup", "--num-processes", "--repeat", "--wrapper", "-t", "--timeout-multiplier"):
                i += 2
                continue
            if w == "--suite":
                if i + 1 < len(words):
                    suites.append(words[i + 1])
                i += 2
                continue
            if not w.startswith("-") and re.fullmatch(r"[a-z][a-z0-9-]*", w) and w not in ("build", "benchmark"):
                names.append(w)
            i += 1
        yield "--benchmark" in words, names, suites


def doc_files(root, files):
    return sorted(f for f in files if (f.startswith("docs/") and f.endswith((".md", ".1", ".8")))
                  or f in DOC_FILES or re.fullmatch(r"tests/[^/]+/README\.md", f))


def check_test_names(root, build, files, capabilities):
    tests = {t["name"] for t in meson_intro(build, "tests")}
    benches = {b["name"] for b in meson_intro(build, "benchmarks")}
    suites = {s.split(":")[-1] for t in meson_intro(build, "tests") + meson_intro(build, "benchmarks")
              for s in t["suite"]}
    # a family is a first word two tests or more share (`restart-...`)
    firsts = [t.split("-")[0] for t in tests if "-" in t]
    families = {w for w in firsts if firsts.count(w) >= 2}
    stems = {os.path.splitext(os.path.basename(f))[0] for f in files}
    # "fd-store" is reported only with the fd store, which the test's vhubd runs without
    not_tests = stems | meson_names(root, files) | set(capabilities) | {"fd-store"}
    cited = 0
    for f in doc_files(root, files):
        text = read(root, f)
        # tests/*/README.md: only their meson test lines (their tables name
        # the harness's own commands)
        ticked = [] if f.startswith("tests/") else re.findall(r"`([a-z][a-z0-9]*(?:-[a-z0-9]+)+)`", text)
        for tok in sorted(set(ticked)):
            if tok.split("-")[0] not in families or tok in not_tests:
                continue
            cited += 1
            if tok not in tests and tok not in benches:
                problem("%s cites `%s`, which is no test or benchmark in any meson.build" % (f, tok))
        for bench, names, named_suites in meson_test_lines(text):
            for n in names:
                cited += 1
                if n not in (benches if bench else tests):
                    problem("%s: `meson test%s ... %s`: no such %s" % (f, " --benchmark" if bench else "", n,
                                                                     "benchmark" if bench else "test"))
            for s in named_suites:
                if s not in suites:
                    problem("%s: `meson test --suite %s`: no such suite" % (f, s))
    ok("%d test names cited in the docs are tests meson knows" % cited)


def check_performance(root, build, files):
    doc = read(root, "docs/performance.md")
    benches = {b["name"] for b in meson_intro(build, "benchmarks")}
    named = set(re.findall(r"[Bb]enchmark `([^`]+)`", doc))
    for _, names, _ in (x for x in meson_test_lines(doc) if x[0]):
        named |= set(names)
    for n in sorted(named - benches):
        problem("docs/performance.md names benchmark %s, which tests/bench/meson.build does not define" % n)
    for n in sorted(benches - named):
        problem("docs/performance.md does not name benchmark %s (tests/bench/meson.build defines it)" % n)
    paths = set(re.findall(r"(tests/bench/[\w.-]+\.(?:c|h|py))", doc))
    for p in sorted(paths):
        if p not in files:
            problem("docs/performance.md names %s, which is not in the tree" % p)
    bench_stems = {os.path.splitext(os.path.basename(f))[0].replace("_", "-")
                   for f in files if f.startswith("tests/bench/")}
    for tok in sorted(set(re.findall(r"`(bench[-_][a-z_-]+)(?:\.py|\.c)?`", doc))):
        if tok.replace("_", "-") not in bench_stems:
            problem("docs/performance.md names `%s`, which is no file of tests/bench/" % tok)
    ok("docs/performance.md names the %d benchmarks, all defined; its %d tests/bench/ paths exist"
       % (len(benches), len(paths)))


# ------------------------------------------------------------ protocol coverage

def check_protocol_coverage(root):
    doc = read(root, "docs/protocol-coverage.md")
    header = read(root, "protocol/vhost-user.h")
    table = read(root, "protocol/vhu-request-table.c")
    sections = re.split(r"^## ", doc, flags=re.M)
    front = next((x for x in sections if x.startswith("Front-end requests")), "")
    back = next((x for x in sections if x.startswith("Back-end requests")), "")
    feats = next((x for x in sections if x.startswith("Protocol features")), "")
    numbers = {m.group(1): int(m.group(2)) for m in re.finditer(r"\b(VHU_B?REQ_\w+)\s*=\s*(\d+)", header)}
    split = table.index("backend_requests[")
    n = 0
    for part, section, what in ((table[:split], front, "front-end"), (table[split:], back, "back-end")):
        for enum, name in re.findall(r'ENTRY\((VHU_B?REQ_\w+), "([A-Z_]+)"', part):
            n += 1
            if not re.search(r"^\| %d \| %s \|" % (numbers.get(enum, -1), name), section, re.M):
                problem("docs/protocol-coverage.md has no %s request row '| %s | %s |'"
                        % (what, numbers.get(enum, "?"), name))
    bits = re.findall(r"\bVHU_PF_(\w+)\s*=\s*(\d+)", header)
    for name, bit in bits:
        if not re.search(r"^\| %s \| %s \|" % (bit, name), feats, re.M):
            problem("docs/protocol-coverage.md has no protocol feature row '| %s | %s |'" % (bit, name))
    ok("docs/protocol-coverage.md has a row for each of protocol/'s %d requests and %d protocol features"
       % (n, len(bits)))


# ------------------------------------------------------------ fuzzing

def check_fuzzing(root, files):
    doc = read(root, "docs/fuzzing.md")
    campaign = read(root, "tests/fuzz/fuzz-campaign.sh")
    targets = [f for f in files if f.endswith(".c") and
               re.search(r"^int LLVMFuzzerTestOneInput\([^;{]*\)\s*\{", read(root, f), re.M)]
    rows = re.findall(r"^(\|[^\n]*\|)$", doc, re.M)
    entries = re.findall(r'^\s*"([^"|]+)\|([^"|]+)\|([^"|]+)\|[^"]*"', campaign, re.M)
    for t in targets:
        if not any("`%s`" % t in row for row in rows):
            problem("docs/fuzzing.md's table has no row for %s (it defines LLVMFuzzerTestOneInput)" % t)
        stem = os.path.splitext(t)[0]
        if not any(binary in (stem, stem + "-libfuzzer") for _, binary, _ in entries):
            problem("tests/fuzz/fuzz-campaign.sh does not run %s (nor %s-libfuzzer)" % (stem, stem))
    for name, binary, corpus in entries:
        if not any(f.startswith(corpus.rstrip("/") + "/") for f in files):
            problem("tests/fuzz/fuzz-campaign.sh: %s's corpus %s is not in the tree" % (name, corpus))
    for corpus in set(re.findall(r"`([\w/-]+/corpus[\w-]*)/`", doc)):
        if not any(f.startswith(corpus + "/") for f in files):
            problem("docs/fuzzing.md names corpus %s/, which is not in the tree" % corpus)
    ok("%d fuzz targets: each in docs/fuzzing.md's table and in tests/fuzz/fuzz-campaign.sh" % len(targets))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-root", required=True)
    ap.add_argument("--build-root", required=True)
    ap.add_argument("--vhubd", required=True)
    ap.add_argument("--vhubctl", required=True)
    a = ap.parse_args()
    root = a.source_root
    files = repo_files(root)

    discover, info = daemon_answers(a.vhubd, ["rpc.discover", "daemon.info"])
    check_control_api(root, discover, info)
    check_vhubd_8(root, a.vhubd)
    check_vhubctl_1(root, a.vhubctl)
    check_architecture(root, files)
    check_test_names(root, a.build_root, files, info["capabilities"])
    check_performance(root, a.build_root, files)
    check_protocol_coverage(root)
    check_fuzzing(root, files)
    if problems:
        print("FAIL: %d problems in the docs (above)" % len(problems))
        return 1
    print("PASS: the docs name what the code has")
    return 0


if __name__ == "__main__":
    sys.exit(main())
