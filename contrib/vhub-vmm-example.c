/* SPDX-License-Identifier: MIT */
/*
 * vhub-vmm-example: the smallest VMM that does real I/O through vhubd, the
 * way a VMM with its own event loop uses libvhub-client.
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
 * Everything runs in one poll() loop: the control socket (as
 * vhub_client_get_events()/vhub_client_get_timeout_ms() ask) and the rings'
 * call eventfds.  Control calls are asynchronous (vhub_client_call_async):
 * each step's callback checks the result and makes the next call; while
 * the I/O runs, a device.list goes out and is answered without holding up
 * the rings.  Events (device.disconnected, ...) arrive through the
 * library's event handler and are logged.
 *
 * Pattern: each 512-byte sector at disk LBA L holds "vhub-demo lba L\n" (L
 * as 10 decimal digits) followed by bytes (L*131 + i*7 + i/64) & 0xff.
 * `--dump-pattern LBA COUNT` writes the expected bytes to stdout so a script
 * can compare the image file (contrib/demo.sh does).
 *
 * Built like any program that uses the installed library:
 *     cc vhub-vmm-example.c vhub-vmm-example-io.c virtq/guest-mem.c virtq/virtq.c \
 *        virtq/virtio-blk.c -Ivirtq $(pkg-config --cflags --libs vhub-client)
 */
#include "vhub-vmm-example.h"

#include <endian.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define VHOST_USER_F_PROTOCOL_FEATURES 30 /* the daemon's business, never ours to ack */
#define CONFIG_BYTES 36u                  /* up to and including num_queues */

/* ---- logging ---- */

int64_t vmm_now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

double vmm_ms_since(const struct timespec *t) {
        struct timespec now;

        clock_gettime(CLOCK_MONOTONIC, &now);
        return (double)(now.tv_sec - t->tv_sec) * 1e3 + (double)(now.tv_nsec - t->tv_nsec) / 1e6;
}

void vmm_log(struct vmm *x, const char *fmt, ...) {
        va_list ap;

        printf("[%9.3f ms] ", vmm_ms_since(&x->t0));
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        putchar('\n');
        fflush(stdout);
}

void vmm_fail(const char *fmt, ...) {
        va_list ap;

        fprintf(stderr, "vhub-vmm-example: ");
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        fflush(stderr);
}

/* ---- feature names ---- */

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

/* ---- the control plane: one step per call, each started by the last ---- */

struct step {
        const char *method;
        /* build the call: params (stolen by the library) and the fds to pass */
        int (*request)(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds);
        /* check the result; NULL: nothing to check */
        int (*done)(struct vmm *x, json_t *result);
        bool optional;          /* an error answer is logged and the run goes on */
};

static void run_step(struct vmm *x);
static void teardown(struct vmm *x);

/* The run failed: keep the first reason, then undo what was set up. */
static void vmm_abort(struct vmm *x, int r) {
        if (x->result == 0)
                x->result = r;
        teardown(x);
}

static json_t *vm_params(struct vmm *x) {
        return json_pack("{s:s}", "vm", x->o.vm);
}

static json_t *device_params(struct vmm *x) {
        return json_pack("{s:s, s:s}", "vm", x->o.vm, "device", x->o.device);
}

/* Log an answer like a trace of the call; 0 or the reply's status. */
static int log_reply(struct vmm *x, const struct vhub_client_reply *rep) {
        const struct vhub_client_error *e = rep->error;

        if (e) {
                const char *name = vhub_client_error_code_name(e->code);

                vmm_log(x, "%s: ERROR %d (%s) %s%s%s%s%s [%.3f ms]", rep->method, e->code, name ? name : "?",
                        e->message, e->detail[0] ? ": " : "", e->detail, e->request[0] ? " request " : "",
                        e->request, vmm_ms_since(&x->t_call));
                vmm_fail("%s failed: %d %s%s%s", rep->method, e->code, e->message, e->detail[0] ? ": " : "",
                         e->detail);
        } else if (rep->status < 0) {
                vmm_log(x, "%s: FAILED: %s [%.3f ms]", rep->method, strerror(-rep->status),
                        vmm_ms_since(&x->t_call));
                vmm_fail("%s failed: %s", rep->method, strerror(-rep->status));
        } else {
                char *s = x->o.verbose ? json_dumps(rep->result, JSON_COMPACT) : NULL;

                vmm_log(x, "%s: ok [%.3f ms]%s%s", rep->method, vmm_ms_since(&x->t_call), s ? " <- " : "",
                        s ? s : "");
                free(s);
        }
        return rep->status;
}

/* Make a call; cb(c, reply, x) runs from the loop when it is answered. */
static int vmm_call(struct vmm *x, const char *method, json_t *params, const int *fds, unsigned n_fds,
                    vhub_client_reply_fn cb) {
        int r;

        if (x->o.verbose) {
                char *s = params ? json_dumps(params, JSON_COMPACT) : NULL;

                vmm_log(x, "-> %s %s%s", method, s ? s : "{}", n_fds ? " (+fds)" : "");
                free(s);
        }
        clock_gettime(CLOCK_MONOTONIC, &x->t_call);
        r = vhub_client_call_async(x->c, method, params, fds, n_fds, x->o.timeout_ms, cb, x, NULL);
        if (r < 0)
                vmm_fail("%s: %s", method, strerror(-r));
        return r;
}

/* Every event is logged; a VMM would act on device.config_changed, ... */
static void on_event(struct vhub_client *c, struct vhub_client_event *ev, void *userdata) {
        struct vmm *x = userdata;
        char *s = json_dumps(ev->params, JSON_COMPACT);

        vmm_log(x, "event: %s", s ? s : ev->name);
        free(s);
}

static int req_vm(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds) {
        *ret_params = vm_params(x);
        return 0;
}

static int req_device(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds) {
        *ret_params = device_params(x);
        return 0;
}

static int req_info(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds) {
        *ret_params = json_object();
        return 0;
}

static int done_info(struct vmm *x, json_t *res) {
        uint64_t pf = 0;

        (void)vhub_json_object_get_u64(res, "protocol_features", &pf);
        vmm_log(x, "  vhubd %s, pid %" JSON_INTEGER_FORMAT ", up %" JSON_INTEGER_FORMAT
                   " ms, protocol features 0x%" PRIx64,
                json_string_value(json_object_get(res, "version")) ?: "?",
                json_integer_value(json_object_get(res, "pid")),
                json_integer_value(json_object_get(res, "uptime_ms")), pf);
        return 0;
}

static int done_vm_create(struct vmm *x, json_t *res) {
        x->vm_created = true;
        return 0;
}

static int req_memory(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds) {
        uint64_t size = (uint64_t)x->o.mem_mb << 20, guard;
        int r;

        r = vhub_guest_mem_new("vhub-demo-ram", 0, size, &x->mem);
        if (r < 0) {
                vmm_fail("guest RAM (%u MiB memfd): %s", x->o.mem_mb, strerror(-r));
                return r;
        }
        /* Keep gpa 0 unused: a zero address in a ring looks like a bug. */
        r = vhub_guest_mem_alloc(x->mem, 4096, 4096, &guard);
        if (r < 0)
                return r;
        fds[0] = vhub_guest_mem_fd(x->mem);
        *ret_n_fds = 1;
        vmm_log(x, "guest RAM: memfd of %u MiB at gpa 0x0", x->o.mem_mb);
        *ret_params = json_pack("{s:s, s:o, s:o, s:i}", "vm", x->o.vm, "gpa", vhub_json_u64(0), "size",
                                vhub_json_u64(size), "fd", 0);
        return 0;
}

static int req_device_add(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds) {
        *ret_params = json_pack("{s:s, s:s, s:s, s:s, s:i}", "vm", x->o.vm, "device", x->o.device, "socket",
                                x->o.blk_socket, "type", "blk", "queues", (int)x->o.queues);
        return 0;
}

static int done_device_add(struct vmm *x, json_t *res) {
        char names[512];
        uint64_t pf = 0, queues = 0, slots = 0;

        x->device_added = true;
        if (vhub_json_object_get_u64(res, "features", &x->features) < 0 ||
            vhub_json_object_get_u64(res, "protocol_features", &pf) < 0 ||
            vhub_json_object_get_u64(res, "queues", &queues) < 0 ||
            vhub_json_object_get_u64(res, "max_mem_slots", &slots) < 0) {
                vmm_fail("device.add: result lacks features/protocol_features/queues/max_mem_slots");
                return -EBADMSG;
        }
        format_bits(names, sizeof(names), x->features, blk_feature_names);
        vmm_log(x, "  features          0x%" PRIx64 " (%s)", x->features, names);
        format_bits(names, sizeof(names), pf, protocol_feature_names);
        vmm_log(x, "  protocol_features 0x%" PRIx64 " (%s)", pf, names);
        vmm_log(x, "  queues            %" PRIu64, queues);
        vmm_log(x, "  max_mem_slots     %" PRIu64, slots);
        if (queues == 0) {
                vmm_fail("device.add: back-end reports 0 queues");
                return -EBADMSG;
        }
        x->n_rings = queues < x->o.queues ? (unsigned)queues : x->o.queues;
        if (x->n_rings < x->o.queues)
                vmm_log(x, "  using %u queue(s): the device has only %" PRIu64, x->n_rings, queues);
        return 0;
}

static int req_config(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds) {
        *ret_params = json_pack("{s:s, s:s, s:i, s:i}", "vm", x->o.vm, "device", x->o.device, "offset", 0,
                                "size", (int)CONFIG_BYTES);
        return 0;
}

/* The config says how big the disk is; then the rings can be built. */
static int done_config(struct vmm *x, json_t *res) {
        const char *b64 = json_string_value(json_object_get(res, "data"));
        uint8_t *cfg = NULL;
        size_t len = 0;
        uint64_t cap;
        int r = b64 ? vhub_base64_decode(b64, (void **)&cfg, &len) : -EBADMSG;

        if (r < 0 || len < 8) {
                vmm_fail("device.config.get: bad or short data (%zu bytes)", len);
                free(cfg);
                return r < 0 ? r : -EBADMSG;
        }
        /* struct virtio_blk_config: le64 capacity @0, le32 blk_size @20, le16 num_queues @34 */
        memcpy(&cap, cfg, 8);
        x->capacity = le64toh(cap);
        vmm_log(x, "  capacity %" PRIu64 " sectors (%" PRIu64 " MiB)", x->capacity,
                x->capacity * 512 / (1024 * 1024));
        if (len >= 24 && (x->features & (UINT64_C(1) << VHUB_BLK_F_BLK_SIZE))) {
                uint32_t bs;

                memcpy(&bs, cfg + 20, 4);
                vmm_log(x, "  blk_size %u", le32toh(bs));
        }
        if (len >= 36 && (x->features & (UINT64_C(1) << VHUB_BLK_F_MQ))) {
                uint16_t nq;

                memcpy(&nq, cfg + 34, 2);
                vmm_log(x, "  num_queues %u", le16toh(nq));
        }
        free(cfg);
        if (vmm_request_lba(&x->o, x->n_rings - 1, x->o.requests) > x->capacity) {
                vmm_fail("disk too small: %" PRIu64 " sectors, the test needs %" PRIu64, x->capacity,
                         vmm_request_lba(&x->o, x->n_rings - 1, x->o.requests));
                return -ENOSPC;
        }
        return vmm_io_setup(x);
}

static int req_start(struct vmm *x, json_t **ret_params, int *fds, unsigned *ret_n_fds) {
        uint64_t want = (UINT64_C(1) << VHUB_VIRTIO_F_VERSION_1) | (UINT64_C(1) << VHUB_BLK_F_FLUSH);
        json_t *vrings = json_array();
        char names[256];

        if (!(x->features & (UINT64_C(1) << VHUB_VIRTIO_F_VERSION_1))) {
                vmm_fail("the back-end does not offer VIRTIO_F_VERSION_1");
                json_decref(vrings);
                return -EOPNOTSUPP;
        }
        if (x->n_rings > 1)
                want |= UINT64_C(1) << VHUB_BLK_F_MQ;
        x->acked = x->features & want & ~(UINT64_C(1) << VHOST_USER_F_PROTOCOL_FEATURES);
        format_bits(names, sizeof(names), x->acked, blk_feature_names);
        vmm_log(x, "acking features 0x%" PRIx64 " (%s)", x->acked, names);

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
        *ret_n_fds = 2 * x->n_rings;
        *ret_params = json_pack("{s:s, s:s, s:o, s:o}", "vm", x->o.vm, "device", x->o.device, "features",
                                vhub_json_u64(x->acked), "vrings", vrings);
        return 0;
}

/* device.list while the rings run: the control plane does not hold up I/O. */
static void on_device_list(struct vhub_client *c, struct vhub_client_reply *rep, void *userdata) {
        struct vmm *x = userdata;
        json_t *d;
        size_t i;

        if (log_reply(x, rep) < 0)
                return; /* informational only */
        json_array_foreach(json_object_get(rep->result, "devices"), i, d) {
                uint64_t acked = 0;

                (void)vhub_json_object_get_u64(d, "acked_features", &acked);
                vmm_log(x, "  device %s: state %s, acked 0x%" PRIx64 ", queues %" JSON_INTEGER_FORMAT,
                        json_string_value(json_object_get(d, "device")) ?: "?",
                        json_string_value(json_object_get(d, "state")) ?: "?", acked,
                        json_integer_value(json_object_get(d, "queues")));
        }
}

static void io_done(struct vmm *x, int r) {
        if (r < 0 && r != -EIO) {
                vmm_abort(x, r);
                return;
        }
        /* -EIO: the data did not verify, but stop cleanly and report bases */
        if (r < 0 && x->result == 0)
                x->result = r;
        x->step++;
        run_step(x);
}

static int done_start(struct vmm *x, json_t *res) {
        x->device_started = true;
        (void)vmm_call(x, "device.list", vm_params(x), NULL, 0, on_device_list);
        return vmm_io_start(x, io_done);
}

static int done_stop(struct vmm *x, json_t *res) {
        json_t *v;
        size_t i;
        bool ok = true;
        unsigned seen = 0;

        x->device_started = false;
        json_array_foreach(json_object_get(res, "vrings"), i, v) {
                uint64_t index, base, expect;

                if (vhub_json_object_get_u64(v, "index", &index) < 0 ||
                    vhub_json_object_get_u64(v, "base", &base) < 0) {
                        vmm_fail("device.stop: malformed vrings entry");
                        ok = false;
                        continue;
                }
                if (index >= x->n_rings) {
                        vmm_log(x, "  ring %" PRIu64 ": base %" PRIu64 " (not used)", index, base);
                        continue;
                }
                seen++;
                expect = (uint16_t)vhub_blk_submitted(x->rings[index].q);
                vmm_log(x, "  ring %" PRIu64 ": base %" PRIu64 ", requests submitted %" PRIu64 ": %s", index,
                        base, vhub_blk_submitted(x->rings[index].q), base == expect ? "match" : "MISMATCH");
                if (base != expect)
                        ok = false;
        }
        if (seen != x->n_rings) {
                vmm_fail("device.stop reported %u of %u rings", seen, x->n_rings);
                ok = false;
        }
        if (!ok)
                return -EIO;
        /* the data failed to verify: stopped cleanly, now undo the rest */
        return x->result;
}

static int done_device_remove(struct vmm *x, json_t *res) {
        x->device_added = false;
        return 0;
}

static int done_vm_destroy(struct vmm *x, json_t *res) {
        x->vm_created = false;
        return 0;
}

static const struct step steps[] = {
        { "daemon.info", req_info, done_info, .optional = true },
        { "vm.create", req_vm, done_vm_create },
        { "vm.memory.add", req_memory, NULL },
        { "device.add", req_device_add, done_device_add },
        { "device.config.get", req_config, done_config },
        { "device.start", req_start, done_start },
        { NULL },       /* the I/O, in the loop; io_done() moves on */
        { "device.stop", req_device, done_stop },
        { "device.remove", req_device, done_device_remove },
        { "vm.destroy", req_vm, done_vm_destroy },
};

static void on_step_reply(struct vhub_client *c, struct vhub_client_reply *rep, void *userdata) {
        struct vmm *x = userdata;
        const struct step *s = &steps[x->step];
        int r = log_reply(x, rep);

        if (r == -EREMOTEIO && s->optional)
                r = 0; /* informational: go on if it is refused */
        else if (r >= 0 && s->done)
                r = s->done(x, rep->result);
        if (r < 0) {
                vmm_abort(x, r);
                return;
        }
        x->step++;
        run_step(x);
}

/* Make the current step's call (or finish). */
static void run_step(struct vmm *x) {
        const struct step *s;
        int fds[2 * MAX_QUEUES];
        unsigned n_fds = 0;
        json_t *params = NULL;
        int r;

        if (x->step >= sizeof(steps) / sizeof(steps[0])) {
                x->finished = true;
                return;
        }
        s = &steps[x->step];
        if (!s->method)
                return; /* the I/O runs in the loop; io_done() moves on */
        r = s->request(x, &params, fds, &n_fds);
        if (r >= 0)
                r = vmm_call(x, s->method, params, fds, n_fds, on_step_reply);
        else
                json_decref(params);
        if (r < 0)
                vmm_abort(x, r);
}

/* Best effort, in reverse order of creation, then done: each undo is
 * tried once, whatever it answers. */
static void on_teardown_reply(struct vhub_client *c, struct vhub_client_reply *rep, void *userdata) {
        struct vmm *x = userdata;

        (void)log_reply(x, rep);
        if (strcmp(rep->method, "device.remove") == 0)
                x->device_added = false;
        else
                x->vm_created = false;
        teardown(x);
}

static void teardown(struct vmm *x) {
        if (x->device_added && vhub_client_get_error(x->c) == 0 &&
            vmm_call(x, "device.remove", device_params(x), NULL, 0, on_teardown_reply) >= 0)
                return;
        if (x->vm_created && vhub_client_get_error(x->c) == 0 &&
            vmm_call(x, "vm.destroy", vm_params(x), NULL, 0, on_teardown_reply) >= 0)
                return;
        x->finished = true;
}

/* ---- the loop ---- */

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
                vmm_fail("connecting to %s: %s", x->o.socket ? x->o.socket : path, strerror(-r));
                free(path);
                return r;
        }
        vmm_log(x, "connected to %s", x->o.socket ? x->o.socket : path);
        free(path);
        vhub_client_set_event_handler(x->c, on_event, x);

        run_step(x);
        while (!x->finished) {
                struct pollfd pfds[1 + MAX_QUEUES];
                unsigned n = 1;
                int timeout = vhub_client_get_timeout_ms(x->c), io = vmm_io_timeout_ms(x);

                pfds[0] = (struct pollfd){ .fd = vhub_client_get_fd(x->c), .events = vhub_client_get_events(x->c) };
                if (vmm_io_active(x))
                        for (unsigned i = 0; i < x->n_rings; i++)
                                pfds[n++] = (struct pollfd){ .fd = vhub_virtq_call_fd(x->rings[i].vq),
                                                             .events = POLLIN };
                if (io >= 0 && (timeout < 0 || io < timeout))
                        timeout = io;
                if (poll(pfds, n, timeout) < 0 && errno != EINTR) {
                        r = -errno;
                        vmm_fail("poll: %s", strerror(-r));
                        return r;
                }
                /* Callbacks of answered and overdue calls, events: whatever
                 * woke us (a call's deadline needs no readable socket). */
                r = vhub_client_dispatch(x->c);
                if (r < 0) {
                        vmm_fail("control connection: %s", strerror(-r));
                        if (x->result == 0)
                                x->result = r;
                        return x->result;
                }
                /* Rings whose call eventfd fired, then every ring once
                 * more: a missed notification only costs latency. */
                for (unsigned i = 1; i < n; i++)
                        if (pfds[i].revents)
                                vmm_io_poll(x, i - 1);
                vmm_io_poll(x, MAX_QUEUES);
        }
        return x->result;
}

/* ---- the command line ---- */

static int dump_pattern(const char *lba_s, const char *count_s) {
        char *e1, *e2;
        unsigned long long lba = strtoull(lba_s, &e1, 0), count = strtoull(count_s, &e2, 0);
        uint8_t buf[VHUB_BLK_SECTOR_SIZE];

        if (*e1 || *e2 || !*lba_s || !*count_s) {
                vmm_fail("--dump-pattern LBA COUNT: numbers expected");
                return 2;
        }
        for (unsigned long long i = 0; i < count; i++) {
                vmm_pattern_fill(buf, lba + i, 1);
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
                        vmm_fail("bad value for --%s: %s", longopts[c - OPT_SOCKET].name, optarg);
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

        vmm_io_free(x);
        vhub_client_free(x->c);
        vhub_guest_mem_free(x->mem);
        if (r == -EREMOTEIO)
                vmm_log(x, "FAILED: the daemon refused a call (see above)");
        else if (r == -EIO)
                vmm_log(x, "FAILED: data or ring state did not verify (see above)");
        else if (r < 0)
                vmm_log(x, "FAILED (%s)", strerror(-r));
        else
                vmm_log(x, "all steps OK");
        free(x);
        return r < 0 ? 1 : 0;
}
