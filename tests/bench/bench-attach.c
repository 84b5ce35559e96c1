/* SPDX-License-Identifier: MIT */
/*
 * Attach at the floor: what a VMM pays to attach a device through vhubd
 * (device.add then device.start from a C client, control/client/) against
 * a blocking C front-end that sends the very same vhost-user messages
 * straight to the same back-end over one socket.
 *
 *   bench-attach VHUBD [--qsd PATH] [--runs N] [--warmup N] [--gap-ms N]
 *                      [--build-type T]
 *
 * The device: one qemu-storage-daemon null-co export with 2 queues; guest
 * memory one 1 MiB memfd region (the VM's, added once); 2 rings of 128 on
 * fresh kick/call eventfds per run (made before the clock starts, on both
 * paths: the VMM makes them either way).
 *
 * First a capture: a vhubd at --log-level debug attaches the device once
 * and its log ("sent REQUEST" lines) gives the exact sequence of requests
 * it sends; the raw front-end's own sequence must equal it (else the
 * benchmark stops), and it uses the features and protocol features vhubd
 * negotiated, so the payloads are the same too.
 *
 * Paths, run interleaved (round k starts with path k mod the number of
 * paths, so that none always follows another):
 *   vhubd    device.add + device.start through a vhubd at --log-level
 *            warning: the clock runs from sending device.add to reading
 *            device.start's answer
 *   needed   raw, waiting only for replies whose content decides what comes
 *            next: GET_FEATURES, GET_PROTOCOL_FEATURES, then GET_QUEUE_NUM and
 *            GET_MAX_MEM_SLOTS (the rings and regions must fit them), and
 *            every ack before the kicks (an enable must be acked before the
 *            first kick): 4 round trips -- the floor
 *   stages7  raw, waiting where vhubd's stages waited before they were
 *            pipelined (7 round trips: GET_FEATURES | GET_PROTOCOL_FEATURES |
 *            SET_PROTOCOL_FEATURES..GET_MAX_MEM_SLOTS | ADD_MEM_REG |
 *            SET_FEATURES | rings | enables)
 *   each     raw, waiting for every reply right after its request (QEMU's
 *            blocking way)
 *   batched  needed's waits, but requests go out together (one sendmsg()
 *            per run of requests, a new one at each request with fds, which
 *            ride with its first byte) and due replies are read in one go:
 *            whether fewer socket calls lower the floor
 * The raw clock runs from connect() to the kicks written; the connection
 * is closed after (vhubd's device is removed, untimed), then GAP ms pass so
 * that qsd has let go of the previous front-end.
 *
 * Per run it also reads the CPU time (schedstat) the client thread, vhubd
 * and qsd spent, so the wall time splits into work and waiting.
 *
 * --compare VHUBD2 adds a fifth path, "vhubd-B": another vhubd build
 * attaching the same device in the same rounds (before/after a change).
 *
 * BENCH_ATTACH_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=F"
 * runs the timed vhubd under that command (instruction counts: compare two
 * runs of different lengths; the times mean nothing then).
 *
 * Not a test: it prints figures and exits 0 unless something broke.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vhu-message.h"
#include "vhu-scm.h"
#include "bench-proc.h"
#include "vhub-client.h"

#define MEM_SIZE (1u << 20)
#define QUEUES 2
#define RING_SIZE 128
#define MAX_SEQ 64
#define MAX_ROUNDS 100000

static pid_t daemon_pid = -1, daemon2_pid = -1, qsd_pid = -1;

static uint64_t thread_cpu_ns(void) {
        struct timespec ts;

        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static FILE *proc_open(pid_t pid, const char *name) {
        char path[64];

        snprintf(path, sizeof(path), "/proc/%d/%s", (int)pid, name);
        return fopen(path, "r");
}

/* ns on a CPU of pid's main thread so far (schedstat's first field): in
 * vhubd and qsd it does the work; qsd's other threads (RCU, call_rcu) are
 * idle here, and reading them all per run would cost more than it tells */
static uint64_t proc_cpu_ns(pid_t pid) {
        FILE *f = proc_open(pid, "schedstat");
        char line[128];
        uint64_t ns = 0;

        if (f && fgets(line, sizeof(line), f))
                ns = strtoull(line, NULL, 10);
        if (f)
                fclose(f);
        return ns;
}

/* context switches of pid's main thread so far: how often it slept and woke */
static uint64_t proc_switches(pid_t pid) {
        FILE *f = proc_open(pid, "status");
        char line[128];
        uint64_t sum = 0;

        if (!f)
                return 0;
        while (fgets(line, sizeof(line), f))
                if (strncmp(line, "voluntary_ctxt_switches:", 24) == 0 ||
                    strncmp(line, "nonvoluntary_ctxt_switches:", 27) == 0)
                        sum += strtoull(strchr(line, ':') + 1, NULL, 10);
        fclose(f);
        return sum;
}

static uint64_t self_switches(void) {
        struct rusage ru;

        getrusage(RUSAGE_THREAD, &ru);
        return (uint64_t)ru.ru_nvcsw + (uint64_t)ru.ru_nivcsw;
}

/* ---- the guest: memory, rings, eventfds ---- */

struct guest {
        int memfd;
        void *map;
        uint64_t uaddr;          /* where this process mapped it: the VMM's address */
        int kick[QUEUES], call[QUEUES];
};

/* ring i: desc at gpa i*16K, avail at +2K, used at +4K (all inside the region) */
static uint64_t ring_desc(unsigned i) { return (uint64_t)i * 0x4000; }
static uint64_t ring_avail(unsigned i) { return ring_desc(i) + 0x800; }
static uint64_t ring_used(unsigned i) { return ring_desc(i) + 0x1000; }

static void guest_eventfds_new(struct guest *g) {
        for (unsigned i = 0; i < QUEUES; i++) {
                g->kick[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                g->call[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                if (g->kick[i] < 0 || g->call[i] < 0)
                        bench_die("eventfd: %s", strerror(errno));
        }
}

static void guest_eventfds_close(struct guest *g) {
        for (unsigned i = 0; i < QUEUES; i++) {
                close(g->kick[i]);
                close(g->call[i]);
                g->kick[i] = g->call[i] = -1;
        }
}

/* ---- the raw front-end ---- */

enum path { PATH_VHUBD, PATH_NEEDED, PATH_STAGES7, PATH_EACH, PATH_BATCHED, PATH_VHUBD2, _PATH_MAX };

static const char *const path_name[_PATH_MAX] = {
        [PATH_VHUBD] = "vhubd", [PATH_NEEDED] = "needed", [PATH_STAGES7] = "stages7", [PATH_EACH] = "each",
        [PATH_BATCHED] = "batched", [PATH_VHUBD2] = "vhubd-B",
};

/* a barrier honoured by these paths (each waits after every request anyway) */
#define W_NEEDED ((1u << PATH_NEEDED) | (1u << PATH_BATCHED))
#define W_STAGES7 (1u << PATH_STAGES7)

struct raw {
        enum path path;
        int fd;
        uint32_t expect[MAX_SEQ];   /* requests whose replies are due, in order */
        unsigned head, n_expect;
        unsigned round_trips;       /* waits that had something to wait for */
        const char *seq[MAX_SEQ];   /* what was sent, for the capture check */
        unsigned n_seq;
        uint64_t last_u64;
        /* batched: requests waiting to go out together (fds only with the first) */
        uint8_t out[4096];
        size_t out_len;
        int out_fds[VHU_MAX_FDS];
        unsigned out_n_fds;
        unsigned sends;             /* sendmsg() calls */
};

static void raw_sendmsg(struct raw *r, const void *buf, size_t len, const int *fds, unsigned n_fds) {
        VHU_SCM_BUF(cbuf, VHU_MAX_FDS);
        struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        ssize_t n;

        vhu_scm_attach(&mh, cbuf.buf, sizeof(cbuf.buf), fds, n_fds);
        n = sendmsg(r->fd, &mh, MSG_NOSIGNAL);
        if (n != (ssize_t)len)
                bench_die("raw: sendmsg: %s", n < 0 ? strerror(errno) : "short write");
        r->sends++;
}

static void raw_flush(struct raw *r) {
        if (r->out_len == 0)
                return;
        raw_sendmsg(r, r->out, r->out_len, r->out_fds, r->out_n_fds);
        r->out_len = 0;
        r->out_n_fds = 0;
}

static void raw_send(struct raw *r, const struct vhu_msg *m) {
        uint8_t buf[sizeof(struct vhu_header) + VHU_MAX_PAYLOAD];
        size_t len = vhu_msg_encode(m, buf, sizeof(buf));

        if (r->path != PATH_BATCHED) {
                raw_sendmsg(r, buf, len, m->fds, m->n_fds);
        } else {
                /* fds ride with a sendmsg()'s first byte: a message with fds
                 * starts a batch; the receiver reads message by message */
                if ((m->n_fds > 0 && r->out_len > 0) || r->out_len + len > sizeof(r->out))
                        raw_flush(r);
                memcpy(r->out + r->out_len, buf, len);
                r->out_len += len;
                for (unsigned i = 0; i < m->n_fds; i++)
                        r->out_fds[r->out_n_fds++] = m->fds[i];
        }
        if (r->n_seq < MAX_SEQ)
                r->seq[r->n_seq++] = vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request);
}

static void raw_read_reply(struct raw *r) {
        struct vhu_header h;
        uint8_t payload[VHU_MAX_PAYLOAD];
        uint32_t want = r->expect[r->head];
        ssize_t n;

        n = recv(r->fd, &h, sizeof(h), MSG_WAITALL);
        if (n != (ssize_t)sizeof(h))
                bench_die("raw: reading the reply to %s: %s", vhu_request_name(VHU_DIR_FRONTEND, want),
                    n < 0 ? strerror(errno) : "EOF");
        if (h.request != want || !(h.flags & VHU_FLAG_REPLY) || h.size > sizeof(payload))
                bench_die("raw: reply %u (flags 0x%x, %u bytes) where %s's was due", h.request, h.flags,
                    h.size, vhu_request_name(VHU_DIR_FRONTEND, want));
        if (h.size && recv(r->fd, payload, h.size, MSG_WAITALL) != (ssize_t)h.size)
                bench_die("raw: reading %s's payload: %s", vhu_request_name(VHU_DIR_FRONTEND, want),
                    strerror(errno));
        r->last_u64 = 0;
        if (h.size == sizeof(uint64_t))
                memcpy(&r->last_u64, payload, sizeof(uint64_t));
        r->head++;
        r->n_expect--;
}

/* batched: every due reply is a u64 (20 bytes, no fds): one read for all */
static void raw_read_replies_at_once(struct raw *r) {
        uint8_t buf[MAX_SEQ * 20];
        size_t len = (size_t)r->n_expect * 20;
        ssize_t n = recv(r->fd, buf, len, MSG_WAITALL);

        if (n != (ssize_t)len)
                bench_die("raw: reading %u replies: %s", r->n_expect, n < 0 ? strerror(errno) : "EOF");
        for (size_t off = 0; off < len; off += 20) {
                struct vhu_header h;

                memcpy(&h, buf + off, sizeof(h));
                if (h.request != r->expect[r->head] || !(h.flags & VHU_FLAG_REPLY) || h.size != 8)
                        bench_die("raw: reply %u (%u bytes) where %s's was due", h.request, h.size,
                            vhu_request_name(VHU_DIR_FRONTEND, r->expect[r->head]));
                memcpy(&r->last_u64, buf + off + sizeof(h), sizeof(uint64_t));
                r->head++;
                r->n_expect--;
        }
}

/* Wait for every due reply; the last one's u64 is in r->last_u64. */
static void raw_drain(struct raw *r) {
        raw_flush(r);
        if (r->n_expect == 0)
                return;
        r->round_trips++;
        if (r->path == PATH_BATCHED) {
                raw_read_replies_at_once(r);
                return;
        }
        while (r->n_expect > 0)
                raw_read_reply(r);
}

static void raw_barrier(struct raw *r, unsigned honoured_by) {
        if (honoured_by & (1u << r->path))
                raw_drain(r);
}

/* Send m; reply: whether one comes (an ack asked for, or a GET). */
static void raw_request(struct raw *r, struct vhu_msg *m, bool reply) {
        raw_send(r, m);
        if (!reply)
                return;
        if (r->head + r->n_expect >= MAX_SEQ)
                bench_die("raw: too many replies due");
        r->expect[r->head + r->n_expect++] = m->hdr.request;
        if (r->path == PATH_EACH)
                raw_drain(r);
}

/* An acked request that must say 0. */
static void raw_check_acks_zero(struct raw *r, const char *what) {
        if (r->last_u64 != 0)
                bench_die("raw: the back-end refused %s (%" PRIu64 ")", what, r->last_u64);
}

struct negotiated {
        uint64_t features;         /* the back-end's offer (device.add's result) */
        uint64_t protocol_features;/* negotiated (device.add's result) */
        uint64_t acked;            /* what the driver acks (device.start's features) */
};

static uint64_t raw_get_u64(struct raw *r, uint32_t request) {
        struct vhu_msg m;

        vhu_msg_build_none(&m, request, false);
        raw_request(r, &m, true);
        raw_drain(r);
        return r->last_u64;
}

/* Attach once over a fresh socket; returns the wall time (ns) and the time
 * the handshake part took in *ret_hs_ns (up to ADD_MEM_REG sent or acked). */
static uint64_t raw_attach(enum path path, const char *sock, const struct guest *g,
                           const struct negotiated *n, struct raw *r, uint64_t *ret_hs_ns) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        uint64_t t0, t_hs, features, pf = n->protocol_features;
        int chan[2];
        struct vhu_msg m;

        memset(r, 0, sizeof(*r));
        r->path = path;
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", sock);
        t0 = bench_now_ns();
        r->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (r->fd < 0 || connect(r->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                bench_die("raw: connect %s: %s", sock, strerror(errno));

        /* the handshake, as vhub-op-handshake.c sends it (REPLY_ACK: every
         * request without a reply of its own asks for an ack) */
        features = raw_get_u64(r, VHU_REQ_GET_FEATURES);
        if (features != n->features)
                bench_die("raw: GET_FEATURES 0x%" PRIx64 ", vhubd saw 0x%" PRIx64, features, n->features);
        (void)raw_get_u64(r, VHU_REQ_GET_PROTOCOL_FEATURES);
        vhu_msg_build_u64(&m, VHU_REQ_SET_PROTOCOL_FEATURES, false, pf);
        raw_request(r, &m, false);
        vhu_msg_build_none(&m, VHU_REQ_GET_QUEUE_NUM, false);
        raw_request(r, &m, true);
        vhu_msg_build_none(&m, VHU_REQ_SET_OWNER, true);
        raw_request(r, &m, true);
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, chan) < 0)
                bench_die("socketpair: %s", strerror(errno));
        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_BACKEND_REQ_FD, true, NULL, 0, &chan[1], 1);
        raw_request(r, &m, true);
        vhu_msg_build_none(&m, VHU_REQ_GET_MAX_MEM_SLOTS, false);
        raw_request(r, &m, true);
        raw_barrier(r, W_NEEDED | W_STAGES7);
        close(chan[1]);   /* sent by now (every path waited): the back-end has its own */
        {
                struct vhu_mem_region reg = { .gpa = 0, .size = MEM_SIZE, .uaddr = g->uaddr, .mmap_offset = 0 };

                vhu_msg_build_mem_single(&m, VHU_REQ_ADD_MEM_REG, true, &reg, g->memfd);
                raw_request(r, &m, true);
        }
        raw_barrier(r, W_STAGES7);
        t_hs = bench_now_ns();

        /* device.start, as vhub-op-rings.c sends it */
        vhu_msg_build_u64(&m, VHU_REQ_SET_FEATURES, true, n->acked | (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES));
        raw_request(r, &m, true);
        raw_barrier(r, W_STAGES7);
        for (unsigned i = 0; i < QUEUES; i++) {
                struct vhu_vring_addr a = {
                        .index = i,
                        .desc = g->uaddr + ring_desc(i),
                        .avail = g->uaddr + ring_avail(i),
                        .used = g->uaddr + ring_used(i),
                        .log = ring_used(i),
                };

                vhu_msg_build_state(&m, VHU_REQ_SET_VRING_NUM, true, i, RING_SIZE);
                raw_request(r, &m, true);
                vhu_msg_build_state(&m, VHU_REQ_SET_VRING_BASE, true, i, 0);
                raw_request(r, &m, true);
                vhu_msg_build_vring_addr(&m, true, &a);
                raw_request(r, &m, true);
                vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_CALL, true, i, g->call[i]);
                raw_request(r, &m, true);
                vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_KICK, true, i, g->kick[i]);
                raw_request(r, &m, true);
        }
        raw_barrier(r, W_STAGES7);
        for (unsigned i = 0; i < QUEUES; i++) {
                vhu_msg_build_state(&m, VHU_REQ_SET_VRING_ENABLE, true, i, 1);
                raw_request(r, &m, true);
        }
        raw_barrier(r, W_NEEDED | W_STAGES7);
        raw_check_acks_zero(r, "a request");
        for (unsigned i = 0; i < QUEUES; i++) {
                uint64_t one = 1;

                if (write(g->kick[i], &one, sizeof(one)) != sizeof(one))
                        bench_die("kick: %s", strerror(errno));
        }
        *ret_hs_ns = t_hs - t0;
        close(chan[0]);
        return bench_now_ns() - t0;
}

/* ---- through vhubd ---- */

static json_t *call_ok(struct vhub_client *c, const char *method, json_t *params, const int *fds,
                       unsigned n) {
        struct vhub_client_error err;
        json_t *res = NULL;
        int r = vhub_client_call(c, method, params, fds, n, 30000, &res, NULL, NULL, &err);

        if (r < 0)
                bench_die("%s failed: %s%s%s (%d %s)", method, strerror(-r), r == -EREMOTEIO ? ": " : "",
                    r == -EREMOTEIO ? err.detail : "", err.code, err.message);
        return res;
}

static json_t *device_add_params(const char *sock) {
        return json_pack("{s:s, s:s, s:s, s:s}", "vm", "vm0", "device", "blk0", "socket", sock,
                         "type", "blk");
}

static json_t *device_start_params(const struct guest *g, uint64_t acked) {
        json_t *vrings = json_array();

        for (unsigned i = 0; i < QUEUES; i++)
                json_array_append_new(vrings,
                                      json_pack("{s:i, s:i, s:I, s:I, s:I, s:i, s:i}", "index", (int)i,
                                                "size", RING_SIZE, "desc", (json_int_t)ring_desc(i),
                                                "avail", (json_int_t)ring_avail(i), "used",
                                                (json_int_t)ring_used(i), "kick", (int)(2 * i),
                                                "call", (int)(2 * i + 1)));
        return json_pack("{s:s, s:s, s:o, s:o}", "vm", "vm0", "device", "blk0", "features",
                         vhub_json_u64(acked), "vrings", vrings);
}

static void vm_setup(struct vhub_client *c, const struct guest *g) {
        json_decref(call_ok(c, "vm.create", json_pack("{s:s}", "vm", "vm0"), NULL, 0));
        json_decref(call_ok(c, "vm.memory.add",
                            json_pack("{s:s, s:i, s:i, s:i, s:o}", "vm", "vm0", "gpa", 0, "size", MEM_SIZE,
                                      "fd", 0, "uaddr", vhub_json_u64(g->uaddr)),
                            &g->memfd, 1));
}

static uint64_t vhubd_attach(struct vhub_client *c, const char *sock, const struct guest *g,
                             uint64_t acked, uint64_t *ret_add_ns, struct negotiated *ret_n) {
        int fds[2 * QUEUES];
        uint64_t t0, t1, t2;
        json_t *res;

        for (unsigned i = 0; i < QUEUES; i++) {
                fds[2 * i] = g->kick[i];
                fds[2 * i + 1] = g->call[i];
        }
        t0 = bench_now_ns();
        res = call_ok(c, "device.add", device_add_params(sock), NULL, 0);
        t1 = bench_now_ns();
        if (ret_n) {
                uint64_t v;

                if (vhub_json_get_u64(json_object_get(res, "features"), &v) < 0)
                        bench_die("device.add: no features");
                ret_n->features = v;
                if (vhub_json_get_u64(json_object_get(res, "protocol_features"), &v) < 0)
                        bench_die("device.add: no protocol_features");
                ret_n->protocol_features = v;
        }
        json_decref(res);
        json_decref(call_ok(c, "device.start", device_start_params(g, acked), fds, 2 * QUEUES));
        t2 = bench_now_ns();
        *ret_add_ns = t1 - t0;
        return t2 - t0;
}

static void vhubd_detach(struct vhub_client *c) {
        json_decref(call_ok(c, "device.remove", json_pack("{s:s, s:s}", "vm", "vm0", "device", "blk0"),
                            NULL, 0));
}

/* wrapper: NULL, or a command line (split at spaces) to run vhubd under,
 * e.g. "valgrind --tool=callgrind" for instruction counts */
static pid_t start_vhubd(const char *vhubd, const char *control, const char *bdir, const char *level,
                         const char *log, const char *wrapper) {
        char *argv[32], *words = wrapper ? strdup(wrapper) : NULL, *save = NULL;
        unsigned n = 0;
        pid_t pid;

        for (char *w = words ? strtok_r(words, " ", &save) : NULL; w && n < 20; w = strtok_r(NULL, " ", &save))
                argv[n++] = w;
        if (n > 0) {
                /* bench_spawn() execs without a PATH search */
                static char resolved[256];

                if (argv[0][0] != '/') {
                        snprintf(resolved, sizeof(resolved), "/usr/bin/%s", argv[0]);
                        argv[0] = resolved;
                }
        }
        argv[n++] = (char *)vhubd;
        argv[n++] = "--control";
        argv[n++] = (char *)control;
        argv[n++] = "--backend-dir";
        argv[n++] = (char *)bdir;
        argv[n++] = "--log-level";
        argv[n++] = (char *)level;
        argv[n] = NULL;
        unlink(control);
        pid = bench_spawn(argv, log);
        free(words);
        bench_wait_for_socket(control, pid, "vhubd", true);
        return pid;
}

/* The requests vhubd sent for blk0 between device.add and running, from its debug log. */
static unsigned capture_sequence(const char *log, char seq[][40], unsigned max) {
        char line[1024];
        unsigned n = 0;
        FILE *f = fopen(log, "r");

        if (!f)
                bench_die("open %s: %s", log, strerror(errno));
        while (fgets(line, sizeof(line), f)) {
                const char *p;

                if (!strstr(line, "device=blk0"))
                        continue;
                if (strstr(line, "-> running"))
                        break;
                p = strstr(line, " sent ");
                if (p && n < max) {
                        sscanf(p + 6, "%39s", seq[n]);
                        n++;
                }
        }
        fclose(f);
        return n;
}

/* ---- figures ---- */

struct samples {
        uint64_t wall[MAX_ROUNDS], part[MAX_ROUNDS];
        uint64_t cpu_client, cpu_vhubd, cpu_qsd;
        uint64_t sw_client, sw_vhubd, sw_qsd;
        unsigned n, round_trips, sends;
};

static int cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

        return x < y ? -1 : x > y;
}

static double pct_us(const uint64_t *v, unsigned n, double p) {
        uint64_t *s = malloc(n * sizeof(*s));
        double r;

        if (!s)
                bench_die("out of memory");
        memcpy(s, v, n * sizeof(*s));
        qsort(s, n, sizeof(*s), cmp_u64);
        r = (double)s[(unsigned)(p * (n - 1) + 0.5)] / 1e3;
        free(s);
        return r;
}

static double pct_d(double *v, unsigned n, double p) {
        for (unsigned i = 1; i < n; i++)
                for (unsigned k = i; k > 0 && v[k - 1] > v[k]; k--) {
                        double t = v[k];

                        v[k] = v[k - 1];
                        v[k - 1] = t;
                }
        return v[(unsigned)(p * (n - 1) + 0.5)];
}

static void machine_line(const char *build_type) {
        struct bench_machine m;

        bench_machine(&m);
        printf("# machine: %s, %ld CPUs, %s %s; vhubd build type %s; load average %s\n", m.cpu, m.n_cpus,
               m.un.sysname, m.un.release, build_type, m.load);
}

/* What the command line asks for. */
struct conf {
        const char *vhubd, *vhubd2, *qsd, *build_type;
        unsigned runs, warmup, gap_ms, n_paths;
};

/* The files in the bench's work directory. */
struct files {
        char control[128], control2[128], bdir[128], sock[160], log[160], log2[160], qsd_log[160], capture_log[160];
};

static int parse_conf(int argc, char **argv, struct conf *cf) {
        static const struct option opts[] = {
                { "qsd", required_argument, NULL, 'q' },
                { "runs", required_argument, NULL, 'n' },
                { "warmup", required_argument, NULL, 'w' },
                { "gap-ms", required_argument, NULL, 'g' },
                { "build-type", required_argument, NULL, 'b' },
                { "compare", required_argument, NULL, 'c' },
                {}
        };
        int o;

        *cf = (struct conf){ .qsd = "/usr/bin/qemu-storage-daemon", .build_type = "unknown",
                             .runs = 200, .warmup = 10, .gap_ms = 10 };
        while ((o = getopt_long(argc, argv, "", opts, NULL)) >= 0) {
                switch (o) {
                case 'q': cf->qsd = optarg; break;
                case 'n': cf->runs = (unsigned)strtoul(optarg, NULL, 0); break;
                case 'w': cf->warmup = (unsigned)strtoul(optarg, NULL, 0); break;
                case 'g': cf->gap_ms = (unsigned)strtoul(optarg, NULL, 0); break;
                case 'b': cf->build_type = optarg; break;
                case 'c': cf->vhubd2 = optarg; break;
                default:
                        fprintf(stderr, "usage: bench-attach VHUBD [--qsd PATH] [--runs N] [--warmup N] "
                                        "[--gap-ms N] [--build-type T] [--compare VHUBD2]\n");
                        return 2;
                }
        }
        if (optind + 1 != argc || cf->runs < 1 || cf->runs > MAX_ROUNDS) {
                fprintf(stderr, "usage: bench-attach VHUBD [--qsd PATH] [--runs 1..%u] [--warmup N] "
                                "[--gap-ms N] [--build-type T] [--compare VHUBD2]\n", MAX_ROUNDS);
                return 2;
        }
        cf->vhubd = argv[optind];
        cf->n_paths = cf->vhubd2 ? _PATH_MAX : PATH_VHUBD2;
        return 0;
}

static void files_name(struct files *f) {
        snprintf(f->control, sizeof(f->control), "%s/control.sock", bench_workdir);
        snprintf(f->bdir, sizeof(f->bdir), "%s/backends", bench_workdir);
        snprintf(f->sock, sizeof(f->sock), "%s/q0.sock", f->bdir);
        snprintf(f->log, sizeof(f->log), "%s/vhubd.log", bench_workdir);
        snprintf(f->control2, sizeof(f->control2), "%s/control2.sock", bench_workdir);
        snprintf(f->log2, sizeof(f->log2), "%s/vhubd2.log", bench_workdir);
        snprintf(f->capture_log, sizeof(f->capture_log), "%s/vhubd-capture.log", bench_workdir);
        snprintf(f->qsd_log, sizeof(f->qsd_log), "%s/qsd.log", bench_workdir);
}

/* The guest's RAM: one memfd, mapped here as a VMM would. */
static void guest_memory_map(struct guest *g) {
        g->memfd = memfd_create("bench-attach-ram", MFD_CLOEXEC);
        if (g->memfd < 0 || ftruncate(g->memfd, MEM_SIZE) < 0)
                bench_die("memfd: %s", strerror(errno));
        g->map = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, g->memfd, 0);
        if (g->map == MAP_FAILED)
                bench_die("mmap: %s", strerror(errno));
        g->uaddr = (uint64_t)(uintptr_t)g->map;
}

/* qemu-storage-daemon exporting a null block device at sock. */
static void qsd_start(const char *qsd, const char *sock, const char *log) {
        char exp[256];
        char *const qargv[] = { (char *)qsd, "--blockdev", "driver=null-co,node-name=n0,size=1048576",
                                "--export", exp, NULL };

        snprintf(exp, sizeof(exp),
                 "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=%s,writable=on,"
                 "num-queues=%d", sock, QUEUES);
        qsd_pid = bench_spawn(qargv, log);
        bench_wait_for_socket(sock, qsd_pid, "qemu-storage-daemon", false);
}

/*
 * The capture: vhubd's own request sequence at debug level, and what it
 * negotiated; the raw front-end must send the same requests in the same
 * order (raw->seq), or the comparison means nothing.  Returns their number.
 */
static unsigned capture_check(const struct conf *cf, const struct files *f, struct guest *g,
                              struct negotiated *neg, struct raw *raw) {
        char cap_seq[MAX_SEQ][40];
        struct vhub_client *c;
        uint64_t dummy;
        unsigned n_cap;

        daemon_pid = start_vhubd(cf->vhubd, f->control, f->bdir, "debug", f->capture_log, NULL);
        if (vhub_client_connect(f->control, &c) < 0)
                bench_die("connect %s", f->control);
        vm_setup(c, g);
        guest_eventfds_new(g);
        /* the driver acks VERSION_1 | FLUSH | MQ where offered (as test_blk_qsd.py) */
        neg->acked = (UINT64_C(1) << 32) | (UINT64_C(1) << 9) | (UINT64_C(1) << 12);
        (void)vhubd_attach(c, f->sock, g, neg->acked, &dummy, neg);
        neg->acked &= neg->features;
        vhubd_detach(c);
        guest_eventfds_close(g);
        vhub_client_free(c);
        bench_stop(&daemon_pid);
        usleep(cf->gap_ms * 1000);
        n_cap = capture_sequence(f->capture_log, cap_seq, MAX_SEQ);
        guest_eventfds_new(g);
        (void)raw_attach(PATH_EACH, f->sock, g, neg, raw, &dummy);
        close(raw->fd);
        guest_eventfds_close(g);
        if (n_cap != raw->n_seq)
                bench_die("capture: vhubd sent %u requests, the raw front-end %u", n_cap, raw->n_seq);
        for (unsigned i = 0; i < n_cap; i++)
                if (strcmp(cap_seq[i], raw->seq[i]) != 0)
                        bench_die("capture: request %u: vhubd sent %s, the raw front-end %s", i, cap_seq[i],
                            raw->seq[i]);
        usleep(cf->gap_ms * 1000);
        return n_cap;
}

/* A vhubd the measured rounds attach through, with its VM set up. */
static struct vhub_client *measured_vhubd(const char *vhubd, const char *control, const char *bdir,
                                          const char *log, const char *wrapper, pid_t *ret_pid,
                                          const struct guest *g) {
        struct vhub_client *c;

        *ret_pid = start_vhubd(vhubd, control, bdir, "warning", log, wrapper);
        if (vhub_client_connect(control, &c) < 0)
                bench_die("connect %s", control);
        vm_setup(c, g);
        return c;
}

/* One attach and detach along path p; counted into x unless a warm-up. */
static void measure_path(enum path p, struct vhub_client *const clients[2], const char *sock, struct guest *g,
                         const struct negotiated *neg, struct raw *raw, struct samples *x) {
        bool through = p == PATH_VHUBD || p == PATH_VHUBD2;
        pid_t dpid = p == PATH_VHUBD2 ? daemon2_pid : daemon_pid;
        struct vhub_client *cc = clients[p == PATH_VHUBD2];
        uint64_t c0, v0, q0, sc0, sv0, sq0, wall, part;

        guest_eventfds_new(g);
        sc0 = self_switches();
        sv0 = proc_switches(dpid);
        sq0 = proc_switches(qsd_pid);
        c0 = thread_cpu_ns();
        v0 = proc_cpu_ns(dpid);
        q0 = proc_cpu_ns(qsd_pid);
        if (through)
                wall = vhubd_attach(cc, sock, g, neg->acked, &part, NULL);
        else
                wall = raw_attach(p, sock, g, neg, raw, &part);
        if (x) {
                x->cpu_client += thread_cpu_ns() - c0;
                x->cpu_vhubd += through ? proc_cpu_ns(dpid) - v0 : 0;
                x->cpu_qsd += proc_cpu_ns(qsd_pid) - q0;
                x->sw_client += self_switches() - sc0;
                x->sw_vhubd += through ? proc_switches(dpid) - sv0 : 0;
                x->sw_qsd += proc_switches(qsd_pid) - sq0;
                x->wall[x->n] = wall;
                x->part[x->n] = part;
                x->round_trips = through ? 0 : raw->round_trips;
                x->sends = through ? 0 : raw->sends;
                x->n++;
        }
        if (through)
                vhubd_detach(cc);
        else
                close(raw->fd);
        guest_eventfds_close(g);
}

static void print_table(const struct conf *cf, const struct samples *s) {
        printf("\n| path | waits for the back-end / sendmsg() | median µs | p10 – p90 µs | min – max µs | "
               "first part median µs | client CPU µs | vhubd CPU µs | qsd CPU µs | "
               "context switches client / vhubd / qsd |\n");
        printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (unsigned p = 0; p < cf->n_paths; p++) {
                const struct samples *x = &s[p];
                char rt[32];

                snprintf(rt, sizeof(rt), "%u / %u", x->round_trips, x->sends);
                printf("| %s | %s | %.0f | %.0f – %.0f | %.0f – %.0f | %.0f | %.1f | %.1f | %.1f | "
                       "%.1f / %.1f / %.1f |\n",
                       p == PATH_VHUBD2 ? cf->vhubd2 : path_name[p],
                       p == PATH_VHUBD || p == PATH_VHUBD2 ? "-" : rt, pct_us(x->wall, x->n, 0.5),
                       pct_us(x->wall, x->n, 0.1), pct_us(x->wall, x->n, 0.9), pct_us(x->wall, x->n, 0),
                       pct_us(x->wall, x->n, 1), pct_us(x->part, x->n, 0.5),
                       (double)x->cpu_client / 1e3 / x->n, (double)x->cpu_vhubd / 1e3 / x->n,
                       (double)x->cpu_qsd / 1e3 / x->n, (double)x->sw_client / x->n,
                       (double)x->sw_vhubd / x->n, (double)x->sw_qsd / x->n);
        }
        printf("\n(first part: vhubd = device.add's answer; raw = up to ADD_MEM_REG sent (acked for "
               "stages7 and each))\n");
}

/* Ratios per round: each round's vhubd run against the same round's raw runs. */
static void print_ratios(const struct conf *cf, const struct samples *s) {
        static const unsigned pairs[][2] = {
                { PATH_VHUBD, PATH_NEEDED }, { PATH_VHUBD, PATH_STAGES7 }, { PATH_VHUBD, PATH_EACH },
                { PATH_VHUBD2, PATH_NEEDED }, { PATH_VHUBD, PATH_VHUBD2 },
        };
        unsigned runs = cf->runs;
        double *ratio = malloc(runs * sizeof(double));

        if (!ratio)
                bench_die("out of memory");
        for (unsigned k = 0; k < sizeof(pairs) / sizeof(pairs[0]); k++) {
                unsigned a = pairs[k][0], b = pairs[k][1];

                if (a >= cf->n_paths || b >= cf->n_paths)
                        continue;
                for (unsigned i = 0; i < runs; i++)
                        ratio[i] = (double)s[a].wall[i] / (double)s[b].wall[i];
                printf("%s / %s per round: median %.2fx (p10 – p90 %.2f – %.2fx); "
                       "of medians %.2fx\n",
                       path_name[a], path_name[b], pct_d(ratio, runs, 0.5), pct_d(ratio, runs, 0.1),
                       pct_d(ratio, runs, 0.9),
                       pct_us(s[a].wall, runs, 0.5) / pct_us(s[b].wall, runs, 0.5));
        }
        free(ratio);
}

static void print_wait_cost(const struct conf *cf, const struct samples *s) {
        double each = pct_us(s[PATH_EACH].wall, cf->runs, 0.5), need = pct_us(s[PATH_NEEDED].wall, cf->runs, 0.5);
        unsigned d = s[PATH_EACH].round_trips - s[PATH_NEEDED].round_trips;

        if (d > 0)
                printf("one more wait for qsd costs %.1f µs ((each - needed) / %u)\n", (each - need) / d, d);
}

int main(int argc, char **argv) {
        static struct samples s[_PATH_MAX];
        struct vhub_client *clients[2] = { NULL, NULL };
        struct negotiated neg = { 0 };
        struct guest g = { .memfd = -1 };
        struct files f;
        struct conf cf;
        struct raw raw;
        unsigned n_cap;

        bench_init("bench-attach");
        if (parse_conf(argc, argv, &cf) != 0)
                return 2;
        if (access(cf.qsd, X_OK) != 0) {
                printf("bench-attach: skipped: %s not installed\n", cf.qsd);
                return 77;
        }
        signal(SIGPIPE, SIG_IGN);
        bench_workdir_make();
        files_name(&f);
        if (mkdir(f.bdir, 0755) < 0)
                bench_die("mkdir: %s", strerror(errno));
        guest_memory_map(&g);
        qsd_start(cf.qsd, f.sock, f.qsd_log);
        n_cap = capture_check(&cf, &f, &g, &neg, &raw);

        machine_line(cf.build_type);
        printf("# sequence check: the raw front-end sends the %u requests vhubd sent, in its order:\n#  ",
               n_cap);
        for (unsigned i = 0; i < n_cap; i++)
                printf(" %s", raw.seq[i]);
        printf("\n# features offered 0x%" PRIx64 ", protocol features 0x%" PRIx64 ", driver acks 0x%" PRIx64
               "; %u runs per path after %u warm-up rounds, interleaved, %u ms apart\n",
               neg.features, neg.protocol_features, neg.acked, cf.runs, cf.warmup, cf.gap_ms);

        clients[0] = measured_vhubd(cf.vhubd, f.control, f.bdir, f.log, getenv("BENCH_ATTACH_WRAPPER"),
                                    &daemon_pid, &g);
        if (cf.vhubd2)
                clients[1] = measured_vhubd(cf.vhubd2, f.control2, f.bdir, f.log2, NULL, &daemon2_pid, &g);
        for (unsigned round = 0; round < cf.warmup + cf.runs; round++)
                for (unsigned k = 0; k < cf.n_paths; k++) {
                        enum path p = (enum path)((round + k) % cf.n_paths);

                        measure_path(p, clients, f.sock, &g, &neg, &raw, round >= cf.warmup ? &s[p] : NULL);
                        usleep(cf.gap_ms * 1000);
                }
        vhub_client_free(clients[0]);
        vhub_client_free(clients[1]);

        print_table(&cf, s);
        print_ratios(&cf, s);
        print_wait_cost(&cf, s);
        bench_cleanup();
        close(g.memfd);
        munmap(g.map, MEM_SIZE);
        return 0;
}
