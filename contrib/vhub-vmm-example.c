/* SPDX-License-Identifier: MIT */
/*
 * vhub-vmm-example: the smallest VMM that does real I/O through vhubd.
 *
 * It owns guest RAM (a memfd), hands it to vhubd (vm.memory.add), attaches a
 * vhost-user-blk back-end (device.add), reads its config (device.config.get),
 * builds split virtqueues in its guest RAM, starts the device (device.start
 * with the rings' guest-physical addresses and kick/call eventfds), writes a
 * recognizable pattern, reads it back through the same rings, checks it
 * byte for byte, flushes, stops the device (device.stop: every ring's base
 * must equal the requests submitted on it) and tears everything down.
 * Exit status 0 only if every step and every byte checked out.
 *
 * Pattern: each 512-byte sector at disk LBA L holds "vhub-demo lba L\n" (L
 * as 10 decimal digits) followed by bytes (L*131 + i*7 + i/64) & 0xff.
 * `--dump-pattern LBA COUNT` writes the expected bytes to stdout so a script
 * can compare the image file (contrib/demo.sh does).
 */
#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "guest-mem.h"
#include "vhub-client.h"
#include "virtio-blk.h"
#include "virtq.h"

#define MAX_QUEUES 16u
#define VHOST_USER_F_PROTOCOL_FEATURES 30 /* the daemon's business, never ours to ack */
#define CONFIG_BYTES 36u                  /* up to and including num_queues */
#define FIRST_LBA 8u

struct opts {
        const char *socket;
        const char *blk_socket;
        const char *vm;
        const char *device;
        unsigned queues;
        unsigned requests;
        unsigned sectors;       /* per request */
        unsigned queue_size;
        unsigned mem_mb;
        int timeout_ms;
        bool verbose;
};

struct ring {
        struct vhub_virtq *vq;
        struct vhub_blk_queue *q;
        struct vhub_blk_req *reqs;      /* 2 * requests + 2 */
        unsigned n_reqs;
        uint64_t wbuf, rbuf, idbuf;     /* guest-physical */
};

struct vmm {
        struct opts o;
        struct vhub_client *c;
        struct vhub_guest_mem *mem;
        struct ring rings[MAX_QUEUES];
        unsigned n_rings;
        bool vm_created, device_added, device_started;
        uint64_t features, acked;
        uint64_t capacity;      /* sectors */
        struct timespec t0;
};

/* ---- logging ---- */

static double ms_since(const struct timespec *t) {
        struct timespec now;

        clock_gettime(CLOCK_MONOTONIC, &now);
        return (double)(now.tv_sec - t->tv_sec) * 1e3 + (double)(now.tv_nsec - t->tv_nsec) / 1e6;
}

static void logmsg(struct vmm *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logmsg(struct vmm *x, const char *fmt, ...) {
        va_list ap;

        printf("[%9.3f ms] ", ms_since(&x->t0));
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        putchar('\n');
        fflush(stdout);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
        va_list ap;

        fprintf(stderr, "vhub-vmm-example: ");
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        fflush(stderr);
}

static const char *const blk_feature_names[64] = {
        [1] = "SIZE_MAX", [2] = "SEG_MAX", [4] = "GEOMETRY", [5] = "RO", [6] = "BLK_SIZE",
        [9] = "FLUSH", [10] = "TOPOLOGY", [11] = "CONFIG_WCE", [12] = "MQ", [13] = "DISCARD",
        [14] = "WRITE_ZEROES", [15] = "LIFETIME", [16] = "SECURE_ERASE", [24] = "NOTIFY_ON_EMPTY",
        [26] = "LOG_ALL", [27] = "ANY_LAYOUT", [28] = "INDIRECT_DESC", [29] = "EVENT_IDX",
        [30] = "PROTOCOL_FEATURES", [32] = "VERSION_1", [33] = "ACCESS_PLATFORM",
        [34] = "RING_PACKED", [35] = "IN_ORDER", [36] = "ORDER_PLATFORM", [37] = "SR_IOV",
        [38] = "NOTIFICATION_DATA", [40] = "RING_RESET",
};

static const char *const protocol_feature_names[64] = {
        [0] = "MQ", [1] = "LOG_SHMFD", [2] = "RARP", [3] = "REPLY_ACK", [4] = "NET_MTU",
        [5] = "BACKEND_REQ", [6] = "CROSS_ENDIAN", [7] = "CRYPTO_SESSION", [8] = "PAGEFAULT",
        [9] = "CONFIG", [10] = "BACKEND_SEND_FD", [11] = "HOST_NOTIFIER", [12] = "INFLIGHT_SHMFD",
        [13] = "RESET_DEVICE", [14] = "INBAND_NOTIFICATIONS", [15] = "CONFIGURE_MEM_SLOTS",
        [16] = "STATUS", [17] = "XEN_MMAP", [18] = "SHARED_OBJECT", [19] = "DEVICE_STATE",
};

static void format_bits(char *buf, size_t size, uint64_t v, const char *const names[64]) {
        size_t off = 0;

        buf[0] = '\0';
        for (unsigned b = 0; b < 64 && off < size; b++) {
                int n;

                if (!(v & (UINT64_C(1) << b)))
                        continue;
                if (names[b])
                        n = snprintf(buf + off, size - off, "%s%s", off ? " " : "", names[b]);
                else
                        n = snprintf(buf + off, size - off, "%sbit%u", off ? " " : "", b);
                if (n < 0)
                        break;
                off += (size_t)n;
        }
}

/* ---- the pattern ---- */

static void pattern_fill(uint8_t *buf, uint64_t lba, unsigned sectors) {
        for (unsigned s = 0; s < sectors; s++) {
                uint8_t *p = buf + (size_t)s * VHUB_BLK_SECTOR_SIZE;
                uint64_t l = lba + s;
                char head[32];
                int n = snprintf(head, sizeof(head), "vhub-demo lba %010" PRIu64 "\n", l);

                for (unsigned i = 0; i < VHUB_BLK_SECTOR_SIZE; i++)
                        p[i] = (uint8_t)(l * 131 + i * 7 + i / 64);
                memcpy(p, head, (size_t)n);
        }
}

static uint64_t request_lba(const struct opts *o, unsigned ring, unsigned i) {
        /* every ring writes its own extents, with a gap after each request */
        uint64_t ring_span = ((uint64_t)o->requests * o->sectors * 2 + 2047) / 2048 * 2048;

        return FIRST_LBA + ring * ring_span + (uint64_t)i * o->sectors * 2;
}

/* ---- control calls ---- */

static void drain_events(struct vmm *x) {
        for (;;) {
                json_t *ev = NULL;
                char *s;
                int r = vhub_client_next_event(x->c, 0, &ev, NULL, NULL);

                if (r <= 0)
                        return;
                s = json_dumps(json_object_get(ev, "params"), JSON_COMPACT);
                logmsg(x, "event: %s", s ? s : "?");
                free(s);
                json_decref(ev);
        }
}

/* One call, logged with its timing; params are stolen. */
static int rpc(struct vmm *x, const char *method, json_t *params, const int *fds, unsigned n_fds,
               json_t **ret_result) {
        struct vhub_client_error err;
        struct timespec t;
        json_t *result = NULL;
        int *rfds = NULL;
        unsigned n_rfds = 0;
        int r;

        if (x->o.verbose) {
                char *s = params ? json_dumps(params, JSON_COMPACT) : NULL;

                logmsg(x, "-> %s %s%s", method, s ? s : "{}", n_fds ? " (+fds)" : "");
                free(s);
        }
        clock_gettime(CLOCK_MONOTONIC, &t);
        r = vhub_client_call(x->c, method, params, fds, n_fds, x->o.timeout_ms, &result, &rfds, &n_rfds,
                             &err);
        if (r == -EREMOTEIO || r == -EPROTO) {
                const char *name = vhub_client_error_code_name(err.code);

                logmsg(x, "%s: ERROR %d (%s) %s%s%s%s%s [%.3f ms]", method, err.code, name ? name : "?",
                       err.message, err.detail[0] ? ": " : "", err.detail,
                       err.request[0] ? " request " : "", err.request, ms_since(&t));
                fail("%s failed: %d %s%s%s", method, err.code, err.message, err.detail[0] ? ": " : "",
                     err.detail);
        } else if (r < 0) {
                logmsg(x, "%s: FAILED: %s [%.3f ms]", method, strerror(-r), ms_since(&t));
                fail("%s failed: %s", method, strerror(-r));
        } else {
                char *s = x->o.verbose ? json_dumps(result, JSON_COMPACT) : NULL;

                logmsg(x, "%s: ok [%.3f ms]%s%s", method, ms_since(&t), s ? " <- " : "", s ? s : "");
                free(s);
        }
        vhub_client_close_fds(rfds, n_rfds); /* nothing we call returns fds */
        drain_events(x);
        if (r < 0)
                return r;
        if (ret_result)
                *ret_result = result;
        else
                json_decref(result);
        return 0;
}

static json_t *vm_params(struct vmm *x) {
        return json_pack("{s:s}", "vm", x->o.vm);
}

static json_t *device_params(struct vmm *x) {
        return json_pack("{s:s, s:s}", "vm", x->o.vm, "device", x->o.device);
}

/* ---- steps ---- */

static int step_daemon_info(struct vmm *x) {
        json_t *res;
        uint64_t pf = 0;
        int r = rpc(x, "daemon.info", json_object(), NULL, 0, &res);

        if (r < 0)
                return r == -EREMOTEIO ? 0 : r; /* informational: go on if it is refused */
        (void)vhub_json_object_get_u64(res, "protocol_features", &pf);
        logmsg(x, "  vhubd %s, pid %" JSON_INTEGER_FORMAT ", up %" JSON_INTEGER_FORMAT
                  " ms, protocol features 0x%" PRIx64,
               json_string_value(json_object_get(res, "version")) ?: "?",
               json_integer_value(json_object_get(res, "pid")),
               json_integer_value(json_object_get(res, "uptime_ms")), pf);
        json_decref(res);
        return 0;
}

static int step_memory(struct vmm *x) {
        uint64_t size = (uint64_t)x->o.mem_mb << 20, guard;
        int fd, r;

        r = vhub_guest_mem_new("vhub-demo-ram", 0, size, &x->mem);
        if (r < 0) {
                fail("guest RAM (%u MiB memfd): %s", x->o.mem_mb, strerror(-r));
                return r;
        }
        /* Keep gpa 0 unused: a zero address in a ring looks like a bug. */
        r = vhub_guest_mem_alloc(x->mem, 4096, 4096, &guard);
        if (r < 0)
                return r;
        fd = vhub_guest_mem_fd(x->mem);
        logmsg(x, "guest RAM: memfd of %u MiB at gpa 0x0", x->o.mem_mb);
        return rpc(x, "vm.memory.add",
                   json_pack("{s:s, s:o, s:o, s:i}", "vm", x->o.vm, "gpa", vhub_json_u64(0), "size",
                             vhub_json_u64(size), "fd", 0),
                   &fd, 1, NULL);
}

static int step_device_add(struct vmm *x) {
        char names[512];
        json_t *res;
        uint64_t pf = 0, queues = 0, slots = 0;
        int r;

        r = rpc(x, "device.add",
                json_pack("{s:s, s:s, s:s, s:s, s:i}", "vm", x->o.vm, "device", x->o.device, "socket",
                          x->o.blk_socket, "type", "blk", "queues", (int)x->o.queues),
                NULL, 0, &res);
        if (r < 0)
                return r;
        x->device_added = true;
        if (vhub_json_object_get_u64(res, "features", &x->features) < 0 ||
            vhub_json_object_get_u64(res, "protocol_features", &pf) < 0 ||
            vhub_json_object_get_u64(res, "queues", &queues) < 0 ||
            vhub_json_object_get_u64(res, "max_mem_slots", &slots) < 0) {
                fail("device.add: result lacks features/protocol_features/queues/max_mem_slots");
                json_decref(res);
                return -EBADMSG;
        }
        json_decref(res);

        format_bits(names, sizeof(names), x->features, blk_feature_names);
        logmsg(x, "  features          0x%" PRIx64 " (%s)", x->features, names);
        format_bits(names, sizeof(names), pf, protocol_feature_names);
        logmsg(x, "  protocol_features 0x%" PRIx64 " (%s)", pf, names);
        logmsg(x, "  queues            %" PRIu64, queues);
        logmsg(x, "  max_mem_slots     %" PRIu64, slots);

        if (queues == 0) {
                fail("device.add: back-end reports 0 queues");
                return -EBADMSG;
        }
        x->n_rings = queues < x->o.queues ? (unsigned)queues : x->o.queues;
        if (x->n_rings < x->o.queues)
                logmsg(x, "  using %u queue(s): the device has only %" PRIu64, x->n_rings, queues);
        return 0;
}

static int step_config(struct vmm *x) {
        json_t *res;
        const char *b64;
        uint8_t *cfg = NULL;
        size_t len = 0;
        uint64_t cap;
        int r;

        r = rpc(x, "device.config.get",
                json_pack("{s:s, s:s, s:i, s:i}", "vm", x->o.vm, "device", x->o.device, "offset", 0, "size",
                          (int)CONFIG_BYTES),
                NULL, 0, &res);
        if (r < 0)
                return r;
        b64 = json_string_value(json_object_get(res, "data"));
        r = b64 ? vhub_base64_decode(b64, (void **)&cfg, &len) : -EBADMSG;
        json_decref(res);
        if (r < 0 || len < 8) {
                fail("device.config.get: bad or short data (%zu bytes)", len);
                free(cfg);
                return r < 0 ? r : -EBADMSG;
        }
        /* struct virtio_blk_config: le64 capacity @0, le32 blk_size @20, le16 num_queues @34 */
        memcpy(&cap, cfg, 8);
        x->capacity = le64toh(cap);
        logmsg(x, "  capacity %" PRIu64 " sectors (%" PRIu64 " MiB)", x->capacity,
               x->capacity * 512 / (1024 * 1024));
        if (len >= 24 && (x->features & (UINT64_C(1) << VHUB_BLK_F_BLK_SIZE))) {
                uint32_t bs;

                memcpy(&bs, cfg + 20, 4);
                logmsg(x, "  blk_size %u", le32toh(bs));
        }
        if (len >= 36 && (x->features & (UINT64_C(1) << VHUB_BLK_F_MQ))) {
                uint16_t nq;

                memcpy(&nq, cfg + 34, 2);
                logmsg(x, "  num_queues %u", le16toh(nq));
        }
        free(cfg);

        if (request_lba(&x->o, x->n_rings - 1, x->o.requests) > x->capacity) {
                fail("disk too small: %" PRIu64 " sectors, the test needs %" PRIu64, x->capacity,
                     request_lba(&x->o, x->n_rings - 1, x->o.requests));
                return -ENOSPC;
        }
        return 0;
}

static int step_rings(struct vmm *x) {
        uint64_t bytes = (uint64_t)x->o.requests * x->o.sectors * VHUB_BLK_SECTOR_SIZE;

        for (unsigned i = 0; i < x->n_rings; i++) {
                struct ring *rg = &x->rings[i];
                int r;

                r = vhub_virtq_new(x->mem, (uint16_t)i, (uint16_t)x->o.queue_size, 0, &rg->vq);
                if (r >= 0)
                        r = vhub_blk_queue_new(x->mem, rg->vq, &rg->q);
                if (r >= 0)
                        r = vhub_guest_mem_alloc(x->mem, bytes, 4096, &rg->wbuf);
                if (r >= 0)
                        r = vhub_guest_mem_alloc(x->mem, bytes, 4096, &rg->rbuf);
                if (r >= 0)
                        r = vhub_guest_mem_alloc(x->mem, 64, 64, &rg->idbuf);
                if (r >= 0) {
                        rg->reqs = calloc(2 * (size_t)x->o.requests + 2, sizeof(*rg->reqs));
                        if (!rg->reqs)
                                r = -ENOMEM;
                }
                if (r < 0) {
                        fail("ring %u: %s (guest RAM too small?)", i, strerror(-r));
                        return r;
                }
                logmsg(x, "ring %u: size %u desc 0x%" PRIx64 " avail 0x%" PRIx64 " used 0x%" PRIx64
                          " kick fd %d call fd %d",
                       i, x->o.queue_size, vhub_virtq_desc_gpa(rg->vq), vhub_virtq_avail_gpa(rg->vq),
                       vhub_virtq_used_gpa(rg->vq), vhub_virtq_kick_fd(rg->vq), vhub_virtq_call_fd(rg->vq));
        }
        return 0;
}

static int step_start(struct vmm *x) {
        uint64_t want = (UINT64_C(1) << VHUB_VIRTIO_F_VERSION_1) | (UINT64_C(1) << VHUB_BLK_F_FLUSH);
        int fds[2 * MAX_QUEUES];
        json_t *vrings = json_array(), *params;
        char names[256];
        int r;

        if (!(x->features & (UINT64_C(1) << VHUB_VIRTIO_F_VERSION_1))) {
                fail("the back-end does not offer VIRTIO_F_VERSION_1");
                json_decref(vrings);
                return -EOPNOTSUPP;
        }
        if (x->n_rings > 1)
                want |= UINT64_C(1) << VHUB_BLK_F_MQ;
        x->acked = x->features & want & ~(UINT64_C(1) << VHOST_USER_F_PROTOCOL_FEATURES);
        format_bits(names, sizeof(names), x->acked, blk_feature_names);
        logmsg(x, "acking features 0x%" PRIx64 " (%s)", x->acked, names);

        for (unsigned i = 0; i < x->n_rings; i++) {
                struct vhub_virtq *vq = x->rings[i].vq;

                fds[2 * i] = vhub_virtq_kick_fd(vq);
                fds[2 * i + 1] = vhub_virtq_call_fd(vq);
                if (!vrings ||
                    json_array_append_new(vrings,
                                          json_pack("{s:i, s:i, s:o, s:o, s:o, s:i, s:i, s:i}", "index", (int)i,
                                                    "size", (int)vhub_virtq_size(vq), "desc",
                                                    vhub_json_u64(vhub_virtq_desc_gpa(vq)), "avail",
                                                    vhub_json_u64(vhub_virtq_avail_gpa(vq)), "used",
                                                    vhub_json_u64(vhub_virtq_used_gpa(vq)), "base", 0,
                                                    "kick", (int)(2 * i), "call", (int)(2 * i + 1))) < 0) {
                        json_decref(vrings);
                        return -ENOMEM;
                }
        }
        params = json_pack("{s:s, s:s, s:o, s:o}", "vm", x->o.vm, "device", x->o.device, "features",
                           vhub_json_u64(x->acked), "vrings", vrings);
        r = rpc(x, "device.start", params, fds, 2 * x->n_rings, NULL);
        if (r < 0)
                return r;
        x->device_started = true;
        return 0;
}

static void step_device_list(struct vmm *x) {
        json_t *res, *d;
        size_t i;

        if (rpc(x, "device.list", vm_params(x), NULL, 0, &res) < 0)
                return; /* informational only */
        json_array_foreach(json_object_get(res, "devices"), i, d) {
                uint64_t acked = 0;

                (void)vhub_json_object_get_u64(d, "acked_features", &acked);
                logmsg(x, "  device %s: state %s, acked 0x%" PRIx64 ", queues %" JSON_INTEGER_FORMAT,
                       json_string_value(json_object_get(d, "device")) ?: "?",
                       json_string_value(json_object_get(d, "state")) ?: "?", acked,
                       json_integer_value(json_object_get(d, "queues")));
        }
        json_decref(res);
}

/* Run reqs[first..first+n) on every ring: submit what fits, kick, wait for
 * all, repeat — the rings run concurrently with each other. */
static int run_batch(struct vmm *x, const char *what, unsigned first, unsigned n) {
        unsigned next[MAX_QUEUES];
        struct timespec t;
        bool more = true;

        clock_gettime(CLOCK_MONOTONIC, &t);
        for (unsigned i = 0; i < x->n_rings; i++)
                next[i] = first;
        while (more) {
                more = false;
                for (unsigned i = 0; i < x->n_rings; i++) {
                        struct ring *rg = &x->rings[i];
                        unsigned added = 0;

                        while (next[i] < first + n) {
                                int r = vhub_blk_submit(rg->q, &rg->reqs[next[i]]);

                                if (r == -ENOSPC && added > 0)
                                        break;
                                if (r < 0) {
                                        fail("ring %u: submitting %s #%u: %s", i, what, next[i], strerror(-r));
                                        return r;
                                }
                                next[i]++;
                                added++;
                        }
                        if (added > 0 && vhub_blk_notify(rg->q) < 0) {
                                fail("ring %u: kick failed", i);
                                return -EIO;
                        }
                        if (next[i] < first + n)
                                more = true;
                }
                for (unsigned i = 0; i < x->n_rings; i++) {
                        int r = vhub_blk_wait_all(x->rings[i].q, x->o.timeout_ms);

                        if (r < 0) {
                                fail("ring %u: waiting for %s completions: %s (%u still in flight, used idx %u)",
                                     i, what, strerror(-r), vhub_blk_inflight(x->rings[i].q),
                                     vhub_virtq_last_used(x->rings[i].vq));
                                return r;
                        }
                }
        }
        logmsg(x, "%s: %u request(s) on %u ring(s) completed [%.3f ms]", what, n * x->n_rings, x->n_rings,
               ms_since(&t));
        return 0;
}

static int step_io(struct vmm *x) {
        const struct opts *o = &x->o;
        uint32_t bytes = o->sectors * VHUB_BLK_SECTOR_SIZE;
        uint8_t *expect = malloc(bytes);
        bool ok = true;
        int r;

        if (!expect)
                return -ENOMEM;

        /* writes */
        for (unsigned i = 0; i < x->n_rings; i++) {
                struct ring *rg = &x->rings[i];

                for (unsigned k = 0; k < o->requests; k++) {
                        struct vhub_blk_req *q = &rg->reqs[rg->n_reqs++];
                        uint64_t gpa = rg->wbuf + (uint64_t)k * bytes;

                        *q = (struct vhub_blk_req){ .type = VHUB_BLK_T_OUT, .sector = request_lba(o, i, k),
                                                    .data_gpa = gpa, .data_len = bytes };
                        pattern_fill(vhub_guest_mem_at(x->mem, gpa, bytes), q->sector, o->sectors);
                }
        }
        r = run_batch(x, "write", 0, o->requests);
        if (r < 0)
                goto out;
        for (unsigned i = 0; i < x->n_rings; i++)
                for (unsigned k = 0; k < o->requests; k++) {
                        struct vhub_blk_req *q = &x->rings[i].reqs[k];

                        printf("    ring %u: OUT lba %" PRIu64 " (%u sectors): %s\n", i, q->sector, o->sectors,
                               vhub_blk_status_name(q->status));
                        if (q->status != VHUB_BLK_S_OK)
                                ok = false;
                }

        /* reads into other buffers, poisoned first */
        for (unsigned i = 0; i < x->n_rings; i++) {
                struct ring *rg = &x->rings[i];

                memset(vhub_guest_mem_at(x->mem, rg->rbuf, (uint64_t)o->requests * bytes), 0xaa,
                       (size_t)o->requests * bytes);
                for (unsigned k = 0; k < o->requests; k++) {
                        struct vhub_blk_req *q = &rg->reqs[rg->n_reqs++];

                        *q = (struct vhub_blk_req){ .type = VHUB_BLK_T_IN, .sector = request_lba(o, i, k),
                                                    .data_gpa = rg->rbuf + (uint64_t)k * bytes,
                                                    .data_len = bytes };
                }
        }
        r = run_batch(x, "read", o->requests, o->requests);
        if (r < 0)
                goto out;
        for (unsigned i = 0; i < x->n_rings; i++)
                for (unsigned k = 0; k < o->requests; k++) {
                        struct vhub_blk_req *q = &x->rings[i].reqs[o->requests + k];
                        const uint8_t *got = vhub_guest_mem_at(x->mem, q->data_gpa, bytes);
                        const char *verdict = "verified";

                        pattern_fill(expect, q->sector, o->sectors);
                        if (q->status != VHUB_BLK_S_OK) {
                                verdict = "read FAILED";
                                ok = false;
                        } else if (memcmp(got, expect, bytes) != 0) {
                                unsigned off = 0;

                                while (got[off] == expect[off])
                                        off++;
                                printf("    ring %u: IN  lba %" PRIu64 ": MISMATCH at byte %u: got 0x%02x, want 0x%02x\n",
                                       i, q->sector, off, got[off], expect[off]);
                                verdict = "MISMATCH";
                                ok = false;
                        }
                        printf("    ring %u: IN  lba %" PRIu64 " (%u sectors): %s, %s\n", i, q->sector, o->sectors,
                               vhub_blk_status_name(q->status), verdict);
                }
        logmsg(x, "verification: %s (%u bytes per request, %u request(s))", ok ? "OK" : "FAILED", bytes,
               o->requests * x->n_rings);

        /* GET_ID on ring 0 (informational: UNSUPP is an answer too) */
        {
                struct ring *rg = &x->rings[0];
                struct vhub_blk_req *q = &rg->reqs[rg->n_reqs++];
                char id[VHUB_BLK_ID_BYTES + 1] = { 0 };

                *q = (struct vhub_blk_req){ .type = VHUB_BLK_T_GET_ID, .data_gpa = rg->idbuf,
                                            .data_len = VHUB_BLK_ID_BYTES };
                r = vhub_blk_submit(rg->q, q);
                if (r >= 0)
                        r = vhub_blk_notify(rg->q);
                if (r >= 0)
                        r = vhub_blk_wait_all(rg->q, o->timeout_ms);
                if (r < 0) {
                        fail("GET_ID: %s", strerror(-r));
                        goto out;
                }
                memcpy(id, vhub_guest_mem_at(x->mem, rg->idbuf, VHUB_BLK_ID_BYTES), VHUB_BLK_ID_BYTES);
                for (char *p = id; *p; p++)
                        if (*p < 0x20 || *p > 0x7e)
                                *p = '?';
                logmsg(x, "GET_ID on ring 0: %s%s%s%s", vhub_blk_status_name(q->status),
                       q->status == VHUB_BLK_S_OK ? " \"" : "", q->status == VHUB_BLK_S_OK ? id : "",
                       q->status == VHUB_BLK_S_OK ? "\"" : "");
        }

        /* FLUSH on every ring */
        if (x->acked & (UINT64_C(1) << VHUB_BLK_F_FLUSH)) {
                for (unsigned i = 0; i < x->n_rings; i++) {
                        struct ring *rg = &x->rings[i];

                        rg->reqs[rg->n_reqs] = (struct vhub_blk_req){ .type = VHUB_BLK_T_FLUSH };
                        rg->n_reqs++;
                }
                for (unsigned i = 0; i < x->n_rings; i++) {
                        struct ring *rg = &x->rings[i];

                        r = vhub_blk_submit(rg->q, &rg->reqs[rg->n_reqs - 1]);
                        if (r >= 0)
                                r = vhub_blk_notify(rg->q);
                        if (r < 0) {
                                fail("FLUSH on ring %u: %s", i, strerror(-r));
                                goto out;
                        }
                }
                for (unsigned i = 0; i < x->n_rings; i++) {
                        struct ring *rg = &x->rings[i];

                        r = vhub_blk_wait_all(rg->q, o->timeout_ms);
                        if (r < 0) {
                                fail("FLUSH on ring %u: %s", i, strerror(-r));
                                goto out;
                        }
                        logmsg(x, "FLUSH on ring %u: %s", i, vhub_blk_status_name(rg->reqs[rg->n_reqs - 1].status));
                        if (rg->reqs[rg->n_reqs - 1].status != VHUB_BLK_S_OK)
                                ok = false;
                }
        } else
                logmsg(x, "FLUSH not offered by the device: skipped");

        r = ok ? 0 : -EIO;
out:
        free(expect);
        return r;
}

static int step_stop(struct vmm *x) {
        json_t *res, *v;
        size_t i;
        bool ok = true;
        unsigned seen = 0;
        int r = rpc(x, "device.stop", device_params(x), NULL, 0, &res);

        if (r < 0)
                return r;
        x->device_started = false;
        json_array_foreach(json_object_get(res, "vrings"), i, v) {
                uint64_t index, base;
                uint64_t expect;

                if (vhub_json_object_get_u64(v, "index", &index) < 0 ||
                    vhub_json_object_get_u64(v, "base", &base) < 0) {
                        fail("device.stop: malformed vrings entry");
                        ok = false;
                        continue;
                }
                if (index >= x->n_rings) {
                        logmsg(x, "  ring %" PRIu64 ": base %" PRIu64 " (not used)", index, base);
                        continue;
                }
                seen++;
                expect = (uint16_t)vhub_blk_submitted(x->rings[index].q);
                logmsg(x, "  ring %" PRIu64 ": base %" PRIu64 ", requests submitted %" PRIu64 ": %s", index, base,
                       vhub_blk_submitted(x->rings[index].q), base == expect ? "match" : "MISMATCH");
                if (base != expect)
                        ok = false;
        }
        json_decref(res);
        if (seen != x->n_rings) {
                fail("device.stop reported %u of %u rings", seen, x->n_rings);
                ok = false;
        }
        return ok ? 0 : -EIO;
}

/* Best effort, in reverse order of creation. */
static void teardown(struct vmm *x) {
        if (!x->c)
                return;
        if (x->device_added && rpc(x, "device.remove", device_params(x), NULL, 0, NULL) >= 0)
                x->device_added = false;
        if (x->vm_created && rpc(x, "vm.destroy", vm_params(x), NULL, 0, NULL) >= 0)
                x->vm_created = false;
}

static int run(struct vmm *x) {
        char *path = NULL;
        int r;

        if (!x->o.socket) {
                r = vhub_client_default_socket_path(&path);
                if (r < 0)
                        return r;
        }
        r = vhub_client_connect(x->o.socket ? x->o.socket : path, &x->c);
        if (r < 0) {
                fail("connecting to %s: %s", x->o.socket ? x->o.socket : path, strerror(-r));
                free(path);
                return r;
        }
        logmsg(x, "connected to %s", x->o.socket ? x->o.socket : path);
        free(path);

        r = step_daemon_info(x);
        if (r < 0)
                return r;
        r = rpc(x, "vm.create", vm_params(x), NULL, 0, NULL);
        if (r < 0)
                return r;
        x->vm_created = true;
        r = step_memory(x);
        if (r < 0)
                return r;
        r = step_device_add(x);
        if (r < 0)
                return r;
        r = step_config(x);
        if (r < 0)
                return r;
        r = step_rings(x);
        if (r < 0)
                return r;
        r = step_start(x);
        if (r < 0)
                return r;
        step_device_list(x);
        r = step_io(x);
        if (r < 0 && r != -EIO)
                return r; /* -EIO: data did not verify, but stop cleanly and report bases */
        {
                int s = step_stop(x);

                if (r == 0)
                        r = s;
        }
        if (r < 0)
                return r;
        r = rpc(x, "device.remove", device_params(x), NULL, 0, NULL);
        if (r < 0)
                return r;
        x->device_added = false;
        r = rpc(x, "vm.destroy", vm_params(x), NULL, 0, NULL);
        if (r < 0)
                return r;
        x->vm_created = false;
        return 0;
}

static int dump_pattern(const char *lba_s, const char *count_s) {
        char *e1, *e2;
        unsigned long long lba = strtoull(lba_s, &e1, 0), count = strtoull(count_s, &e2, 0);
        uint8_t buf[VHUB_BLK_SECTOR_SIZE];

        if (*e1 || *e2 || !*lba_s || !*count_s) {
                fail("--dump-pattern LBA COUNT: numbers expected");
                return 2;
        }
        for (unsigned long long i = 0; i < count; i++) {
                pattern_fill(buf, lba + i, 1);
                if (fwrite(buf, 1, sizeof(buf), stdout) != sizeof(buf))
                        return 1;
        }
        return fflush(stdout) == 0 ? 0 : 1;
}

static void usage(FILE *f) {
        fprintf(f,
                "Usage: vhub-vmm-example [OPTIONS] --blk-socket PATH\n"
                "       vhub-vmm-example --dump-pattern LBA COUNT\n"
                "\n"
                "Drives a vhost-user-blk back-end through vhubd: guest RAM, rings, real I/O.\n"
                "\n"
                "  --socket PATH       vhubd control socket (default: $VHUB_SOCKET, else the default path)\n"
                "  --blk-socket PATH   the back-end's vhost-user socket (required)\n"
                "  --queues N          virtqueues to use (default 1, at most %u)\n"
                "  --requests N        writes (and as many reads) per queue (default 8)\n"
                "  --sectors N         sectors per request (default 8)\n"
                "  --queue-size N      ring size, a power of two (default 128)\n"
                "  --mem-mb N          guest RAM in MiB (default 64)\n"
                "  --vm NAME           VM name (default demo)\n"
                "  --device NAME       device name (default disk0)\n"
                "  --timeout-ms N      per control call and per I/O wait (default 10000)\n"
                "  --verbose           log every request and result\n"
                "  --dump-pattern LBA COUNT\n"
                "                      write the pattern expected at LBA.. to stdout and exit\n",
                MAX_QUEUES);
}

static int parse_uint(const char *s, unsigned min, unsigned max, unsigned *ret) {
        char *end;
        unsigned long v;

        errno = 0;
        v = strtoul(s, &end, 10);
        if (errno || *end || end == s || v < min || v > max)
                return -EINVAL;
        *ret = (unsigned)v;
        return 0;
}

int main(int argc, char **argv) {
        enum {
                OPT_SOCKET = 256, OPT_BLK_SOCKET, OPT_QUEUES, OPT_REQUESTS, OPT_SECTORS, OPT_QUEUE_SIZE,
                OPT_MEM_MB, OPT_VM, OPT_DEVICE, OPT_TIMEOUT, OPT_VERBOSE, OPT_DUMP, OPT_HELP,
        };
        static const struct option longopts[] = {
                { "socket", required_argument, NULL, OPT_SOCKET },
                { "blk-socket", required_argument, NULL, OPT_BLK_SOCKET },
                { "queues", required_argument, NULL, OPT_QUEUES },
                { "requests", required_argument, NULL, OPT_REQUESTS },
                { "sectors", required_argument, NULL, OPT_SECTORS },
                { "queue-size", required_argument, NULL, OPT_QUEUE_SIZE },
                { "mem-mb", required_argument, NULL, OPT_MEM_MB },
                { "vm", required_argument, NULL, OPT_VM },
                { "device", required_argument, NULL, OPT_DEVICE },
                { "timeout-ms", required_argument, NULL, OPT_TIMEOUT },
                { "verbose", no_argument, NULL, OPT_VERBOSE },
                { "dump-pattern", required_argument, NULL, OPT_DUMP },
                { "help", no_argument, NULL, OPT_HELP },
                {}
        };
        struct vmm *x = calloc(1, sizeof(*x));
        unsigned timeout = 10000;
        int c, r;

        if (!x)
                return 1;
        x->o = (struct opts){ .vm = "demo", .device = "disk0", .queues = 1, .requests = 8, .sectors = 8,
                              .queue_size = 128, .mem_mb = 64 };
        while ((c = getopt_long(argc, argv, "hv", longopts, NULL)) >= 0) {
                int bad = 0;

                switch (c) {
                case OPT_SOCKET: x->o.socket = optarg; break;
                case OPT_BLK_SOCKET: x->o.blk_socket = optarg; break;
                case OPT_QUEUES: bad = parse_uint(optarg, 1, MAX_QUEUES, &x->o.queues); break;
                case OPT_REQUESTS: bad = parse_uint(optarg, 1, 4096, &x->o.requests); break;
                case OPT_SECTORS: bad = parse_uint(optarg, 1, 256, &x->o.sectors); break;
                case OPT_QUEUE_SIZE:
                        bad = parse_uint(optarg, 4, VHUB_VIRTQ_MAX_SIZE, &x->o.queue_size);
                        if (!bad && (x->o.queue_size & (x->o.queue_size - 1)))
                                bad = -EINVAL;
                        break;
                case OPT_MEM_MB: bad = parse_uint(optarg, 1, 65536, &x->o.mem_mb); break;
                case OPT_VM: x->o.vm = optarg; break;
                case OPT_DEVICE: x->o.device = optarg; break;
                case OPT_TIMEOUT: bad = parse_uint(optarg, 1, 3600000, &timeout); break;
                case 'v':
                case OPT_VERBOSE: x->o.verbose = true; break;
                case OPT_DUMP:
                        if (optind >= argc) {
                                usage(stderr);
                                free(x);
                                return 2;
                        }
                        r = dump_pattern(optarg, argv[optind]);
                        free(x);
                        return r;
                case 'h':
                case OPT_HELP: usage(stdout); free(x); return 0;
                default: usage(stderr); free(x); return 2;
                }
                if (bad) {
                        fail("bad value for --%s: %s", longopts[c - OPT_SOCKET].name, optarg);
                        free(x);
                        return 2;
                }
        }
        if (optind < argc || !x->o.blk_socket) {
                usage(stderr);
                free(x);
                return 2;
        }
        x->o.timeout_ms = (int)timeout;
        clock_gettime(CLOCK_MONOTONIC, &x->t0);

        r = run(x);
        if (r < 0)
                teardown(x);

        for (unsigned i = 0; i < MAX_QUEUES; i++) {
                vhub_blk_queue_free(x->rings[i].q);
                vhub_virtq_free(x->rings[i].vq);
                free(x->rings[i].reqs);
        }
        vhub_client_free(x->c);
        vhub_guest_mem_free(x->mem);
        if (r == -EREMOTEIO)
                logmsg(x, "FAILED: the daemon refused a call (see above)");
        else if (r == -EIO)
                logmsg(x, "FAILED: data or ring state did not verify (see above)");
        else if (r < 0)
                logmsg(x, "FAILED (%s)", strerror(-r));
        else
                logmsg(x, "all steps OK");
        free(x);
        return r < 0 ? 1 : 0;
}
