/* SPDX-License-Identifier: MIT */
/*
 * Self-test of vhub-test-backend: a tiny blocking front-end built on
 * protocol/ drives the real binary.
 *
 *  1. handshake, memfd guest memory (ADD_MEM_REG), inflight buffer
 *     (GET/SET_INFLIGHT_FD), refusals of bad requests via REPLY_ACK;
 *  2. control socket: shared object export + GET_SHARED_OBJECT, LOOKUP with
 *     a write through the front-end's fd, CONFIG_CHANGE_MSG, misbehaviour;
 *  3. virtio-blk writes then reads, many in flight, completed out of order
 *     (random order, held 10-30 ms): data verified;
 *  4. INFLIGHT_SHMFD: the back-end is SIGKILLed with requests in flight
 *     several times, restarted on the same socket and restored (memory,
 *     SET_INFLIGHT_FD with the kept buffer, SET_VRING_BASE = used idx from
 *     guest memory, kick); every request must complete exactly once, with the
 *     right status, length and data.
 *
 * Exit 0 pass, 1 fail, 77 skip (no back-end binary).
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vhost-user.h"
#include "vhu-message.h"
#include "vhu-socket.h"

#define MEM_SIZE        (8u << 20)
#define DISK_SIZE       (4u << 20)
#define QSIZE           1024u
#define Q_BASE(q)       ((uint64_t) (q) * 0x10000)     /* desc; avail +0x4000; used +0x5000 */
#define HDR_BASE        0x20000u                        /* 32 bytes per slot: header, status */
#define DATA_BASE       0x100000u                       /* 4 KiB per slot */
#define MAX_SLOTS       768u
#define BLOCK           4096u
#define IO_TIMEOUT_MS   5000

#define N_PHASE1        32u
#define N_PHASE2        300u
#define KILL_CYCLES     6u

static const char *backend_bin;
static char tmpdir[64], sock_path[128], ctl_path[128], disk_path[128];
static pid_t backend_pid = -1;
static uint8_t *mem;
static int mem_fd = -1;

static void cleanup(void) {
        if (backend_pid > 0) {
                kill(backend_pid, SIGKILL);
                waitpid(backend_pid, NULL, 0);
                backend_pid = -1;
        }
        if (tmpdir[0]) {
                unlink(sock_path);
                unlink(ctl_path);
                unlink(disk_path);
                rmdir(tmpdir);
        }
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
        va_list ap;
        fprintf(stderr, "test-backend-selftest: FAIL: ");
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        cleanup();
        exit(1);
}

#define CHECK(cond, ...) do { if (!(cond)) die(__VA_ARGS__); } while (0)

static void msleep(unsigned ms) {
        struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long) (ms % 1000) * 1000000 };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
}

static uint64_t now_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

/* ---- the back-end process ---- */

static unsigned seed = 7;

static void backend_start(void) {
        char seed_s[32];
        snprintf(seed_s, sizeof(seed_s), "%u", seed++);
        pid_t pid = fork();
        CHECK(pid >= 0, "fork: %m");
        if (pid == 0) {
                execl(backend_bin, backend_bin, "--socket", sock_path, "--control", ctl_path,
                      "--disk", disk_path, "--disk-size", "4M", "--complete", "random",
                      "--delay-ms", "20", "--seed", seed_s, "--queues", "2",
                      getenv("VHUB_SELFTEST_VERBOSE") ? "-v" : "-q", (char *) NULL);
                _exit(127);
        }
        backend_pid = pid;
}

static void backend_kill(void) {
        kill(backend_pid, SIGKILL);
        waitpid(backend_pid, NULL, 0);
        backend_pid = -1;
}

static int connect_unix(const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        uint64_t deadline = now_ms() + 5000;

        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
        for (;;) {
                int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                CHECK(fd >= 0, "socket: %m");
                if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) == 0)
                        return fd;
                close(fd);
                CHECK(now_ms() < deadline, "connect %s: %m", path);
                msleep(5);
        }
}

/* ---- vhost-user front-end ---- */

struct fe {
        int sock;
        uint64_t features, pf;
        int chan;               /* our end of the back-end channel */
        int ctl;                /* control socket */
};

static void fe_send(struct fe *fe, struct vhu_msg *m) {
        int r = vhu_send_msg_blocking(fe->sock, m, IO_TIMEOUT_MS);
        CHECK(r >= 0, "send %s: %s", vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request), strerror(-r));
}

/* Send m and take its reply (must be one) into *ret. */
static void fe_call(struct fe *fe, struct vhu_msg *m, struct vhu_msg *ret) {
        const char *why = NULL;
        fe_send(fe, m);
        vhu_msg_init(ret);
        int r = vhu_recv_msg_blocking(fe->sock, ret, IO_TIMEOUT_MS);
        CHECK(r == 1, "no reply to %s: %s", vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request),
              r == 0 ? "EOF" : strerror(-r));
        r = vhu_validate_reply(VHU_DIR_FRONTEND, m->hdr.request, m->hdr.flags, fe->pf, ret, &why);
        CHECK(r == 0, "bad reply to %s: %s", vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request), why);
}

static uint64_t fe_get_u64(struct fe *fe, uint32_t request) {
        struct vhu_msg m, r;
        vhu_msg_build_none(&m, request, false);
        fe_call(fe, &m, &r);
        uint64_t v = r.payload.u64;
        vhu_msg_clear(&r);
        return v;
}

/* Send with NEED_REPLY and return the REPLY_ACK value; m's fds are borrowed. */
static uint64_t fe_ack(struct fe *fe, struct vhu_msg *m) {
        struct vhu_msg r;
        CHECK(fe->pf & VHU_PF_BIT(VHU_PF_REPLY_ACK), "REPLY_ACK not negotiated");
        m->hdr.flags |= VHU_FLAG_NEED_REPLY;
        fe_call(fe, m, &r);
        vhu_msg_forget_fds(m);
        uint64_t v = r.payload.u64;
        vhu_msg_clear(&r);
        return v;
}

static void fe_ok(struct fe *fe, struct vhu_msg *m) {
        const char *name = vhu_request_name(VHU_DIR_FRONTEND, m->hdr.request);
        uint64_t v = fe_ack(fe, m);
        CHECK(v == 0, "%s refused: %llu", name, (unsigned long long) v);
}

static void fe_u64_ok(struct fe *fe, uint32_t request, uint64_t v) {
        struct vhu_msg m;
        CHECK(vhu_msg_build_u64(&m, request, false, v) == 0, "build");
        fe_ok(fe, &m);
}

static void fe_state_ok(struct fe *fe, uint32_t request, uint32_t index, uint32_t num) {
        struct vhu_msg m;
        CHECK(vhu_msg_build_state(&m, request, false, index, num) == 0, "build");
        fe_ok(fe, &m);
}

static struct vhu_mem_region guest_region(void) {
        return (struct vhu_mem_region) {
                .gpa = 0, .size = MEM_SIZE, .uaddr = (uint64_t) (uintptr_t) mem, .mmap_offset = 0,
        };
}

static void fe_handshake(struct fe *fe) {
        struct vhu_msg m, r;
        const uint64_t want_pf = VHU_PF_BIT(VHU_PF_MQ) | VHU_PF_BIT(VHU_PF_REPLY_ACK) |
                VHU_PF_BIT(VHU_PF_BACKEND_REQ) | VHU_PF_BIT(VHU_PF_BACKEND_SEND_FD) |
                VHU_PF_BIT(VHU_PF_CONFIG) | VHU_PF_BIT(VHU_PF_CONFIGURE_MEM_SLOTS) |
                VHU_PF_BIT(VHU_PF_INFLIGHT_SHMFD) | VHU_PF_BIT(VHU_PF_STATUS) |
                VHU_PF_BIT(VHU_PF_SHARED_OBJECT);

        fe->sock = connect_unix(sock_path);
        fe->pf = 0;
        fe->features = fe_get_u64(fe, VHU_REQ_GET_FEATURES);
        CHECK(fe->features & (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES), "no PROTOCOL_FEATURES");
        CHECK(fe->features & (UINT64_C(1) << VHU_VIRTIO_F_VERSION_1), "no VERSION_1");
        vhu_msg_build_none(&m, VHU_REQ_SET_OWNER, false);
        fe_send(fe, &m);
        uint64_t pf = fe_get_u64(fe, VHU_REQ_GET_PROTOCOL_FEATURES);
        CHECK((pf & want_pf) == want_pf, "protocol features 0x%llx lack some of 0x%llx",
              (unsigned long long) pf, (unsigned long long) want_pf);
        vhu_msg_build_u64(&m, VHU_REQ_SET_PROTOCOL_FEATURES, false, want_pf);
        fe_send(fe, &m);
        fe->pf = want_pf;
        fe_u64_ok(fe, VHU_REQ_SET_FEATURES, fe->features);
        CHECK(fe_get_u64(fe, VHU_REQ_GET_QUEUE_NUM) == 2, "GET_QUEUE_NUM");
        CHECK(fe_get_u64(fe, VHU_REQ_GET_MAX_MEM_SLOTS) == 32, "GET_MAX_MEM_SLOTS");

        vhu_msg_build_config(&m, VHU_REQ_GET_CONFIG, false, 0, 60, 0, NULL);
        fe_call(fe, &m, &r);
        uint64_t capacity;
        CHECK(r.hdr.size == VHU_CONFIG_HEADER_SIZE + 60, "GET_CONFIG size %u", r.hdr.size);
        memcpy(&capacity, r.payload.config.data, 8);
        CHECK(capacity == DISK_SIZE / 512, "capacity %llu", (unsigned long long) capacity);
        vhu_msg_clear(&r);

        struct vhu_mem_region reg = guest_region();
        vhu_msg_build_mem_single(&m, VHU_REQ_ADD_MEM_REG, false, &reg, mem_fd);
        fe_ok(fe, &m);
}

/* The back-end channel: a socketpair, our end kept. */
static void fe_backend_channel(struct fe *fe) {
        int sv[2];
        struct vhu_msg m;
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair: %m");
        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_BACKEND_REQ_FD, false, NULL, 0, &sv[1], 1);
        fe_ok(fe, &m);
        close(sv[1]);
        fe->chan = sv[0];
}

/* Hand the back-end the inflight buffer GET_INFLIGHT_FD described (inf). */
static void fe_set_inflight(struct fe *fe, const struct vhu_inflight *inf, int inflight_fd) {
        struct vhu_msg m;
        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_SET_INFLIGHT_FD, false, inf, sizeof(*inf),
                      &inflight_fd, 1);
        fe_ok(fe, &m);
}

static void fe_close(struct fe *fe) {
        if (fe->sock >= 0)
                close(fe->sock);
        if (fe->chan >= 0)
                close(fe->chan);
        if (fe->ctl >= 0)
                close(fe->ctl);
        fe->sock = fe->chan = fe->ctl = -1;
}

/* ---- a minimal split-ring driver ---- */

struct drv_q {
        unsigned index;
        volatile uint8_t *desc, *avail, *used;
        uint16_t avail_idx, last_used;
        int kick, call;
};

static void q_init(struct drv_q *q, unsigned index) {
        memset(q, 0, sizeof(*q));
        q->index = index;
        q->desc = mem + Q_BASE(index);
        q->avail = mem + Q_BASE(index) + 0x4000;
        q->used = mem + Q_BASE(index) + 0x5000;
        memset((void *) q->desc, 0, 0x8000);
        q->kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        q->call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        CHECK(q->kick >= 0 && q->call >= 0, "eventfd: %m");
}

static uint16_t q_used_idx(const struct drv_q *q) {
        return __atomic_load_n((volatile uint16_t *) (q->used + 2), __ATOMIC_ACQUIRE);
}

/* Give the rings to the back-end and start them (the restore path, too). */
static void fe_start_queue(struct fe *fe, struct drv_q *q, uint16_t base) {
        struct vhu_msg m;
        struct vhu_vring_addr a = {
                .index = q->index,
                .desc = (uint64_t) (uintptr_t) q->desc,
                .avail = (uint64_t) (uintptr_t) q->avail,
                .used = (uint64_t) (uintptr_t) q->used,
        };
        fe_state_ok(fe, VHU_REQ_SET_VRING_NUM, q->index, QSIZE);
        fe_state_ok(fe, VHU_REQ_SET_VRING_BASE, q->index, base);
        vhu_msg_build_vring_addr(&m, false, &a);
        fe_ok(fe, &m);
        vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_CALL, false, q->index, q->call);
        fe_ok(fe, &m);
        vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_KICK, false, q->index, q->kick);
        fe_ok(fe, &m);
        fe_state_ok(fe, VHU_REQ_SET_VRING_ENABLE, q->index, 1);
}

/* Restore after a back-end crash, as a front-end does: a new back-end, the
 * handshake, the inflight buffer handed back, and ring q restarted where
 * its used index stands. */
static void fe_restore(struct fe *fe, struct drv_q *q, const struct vhu_inflight *inf, int inflight_fd) {
        backend_start();
        fe_handshake(fe);
        fe_set_inflight(fe, inf, inflight_fd);
        fe_start_queue(fe, q, q_used_idx(q));
}

/* One request per slot; slots never share descriptors, buffers or sectors
 * being written, and heads are never reused within a queue. */
struct slot {
        unsigned q;
        uint16_t head;
        bool write;
        uint64_t sector;
        unsigned submitted, completed;
        uint32_t used_len;
};

static struct slot slots[MAX_SLOTS];

static uint8_t pattern(uint64_t sector, unsigned i) {
        return (uint8_t) (sector * 31 + i * 7 + (i >> 9));
}

static void desc_set(struct drv_q *q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags,
                     uint16_t next) {
        volatile uint8_t *d = q->desc + (size_t) i * 16;
        memcpy((void *) d, &addr, 8);
        memcpy((void *) (d + 8), &len, 4);
        memcpy((void *) (d + 12), &flags, 2);
        memcpy((void *) (d + 14), &next, 2);
}

static void q_submit(struct drv_q *q, unsigned s, uint16_t head, bool write, uint64_t sector) {
        uint8_t *hdr = mem + HDR_BASE + s * 32, *data = mem + DATA_BASE + (size_t) s * BLOCK;
        uint32_t type = write ? 1 : 0;

        slots[s] = (struct slot) { .q = q->index, .head = head, .write = write, .sector = sector,
                                   .submitted = 1 };
        memcpy(hdr, &type, 4);
        memset(hdr + 4, 0, 4);
        memcpy(hdr + 8, &sector, 8);
        hdr[16] = 0xff;         /* status: must be overwritten */
        for (unsigned i = 0; i < BLOCK; i++)
                data[i] = write ? pattern(sector, i) : 0xee;
        desc_set(q, head, HDR_BASE + s * 32, 16, 1, (uint16_t) (head + 1));
        desc_set(q, (uint16_t) (head + 1), DATA_BASE + (uint64_t) s * BLOCK, BLOCK,
                 (uint16_t) (1 | (write ? 0 : 2)), (uint16_t) (head + 2));
        desc_set(q, (uint16_t) (head + 2), HDR_BASE + s * 32 + 16, 1, 2, 0);
        volatile uint16_t *ring = (volatile uint16_t *) (q->avail + 4);
        ring[q->avail_idx % QSIZE] = head;
        q->avail_idx++;
        __atomic_store_n((volatile uint16_t *) (q->avail + 2), q->avail_idx, __ATOMIC_RELEASE);
}

static void q_kick(struct drv_q *q) {
        CHECK(eventfd_write(q->kick, 1) == 0, "kick: %m");
}

/* Reap new used elements; each must complete a distinct outstanding slot. */
static unsigned q_reap(struct drv_q *q, unsigned *order, unsigned *n_order) {
        unsigned n = 0;
        uint16_t idx = q_used_idx(q);
        CHECK((uint16_t) (idx - q->last_used) <= QSIZE, "used idx jumped from %u to %u",
              q->last_used, idx);
        while (q->last_used != idx) {
                volatile uint32_t *e = (volatile uint32_t *) (q->used + 4 + (q->last_used % QSIZE) * 8);
                uint32_t id = e[0], len = e[1];
                unsigned s;
                for (s = 0; s < MAX_SLOTS; s++)
                        if (slots[s].submitted && slots[s].q == q->index && slots[s].head == id)
                                break;
                CHECK(s < MAX_SLOTS, "queue %u: used id %u is no submitted head", q->index, id);
                CHECK(slots[s].completed == 0, "queue %u: slot %u (head %u) completed twice",
                      q->index, s, id);
                slots[s].completed++;
                slots[s].used_len = len;
                if (order)
                        order[(*n_order)++] = s;
                q->last_used++;
                n++;
        }
        return n;
}

static void q_wait_all(struct drv_q *q, unsigned first, unsigned last, unsigned *order,
                       unsigned *n_order) {
        uint64_t deadline = now_ms() + 10000;
        for (;;) {
                unsigned missing = 0;
                q_reap(q, order, n_order);
                for (unsigned s = first; s < last; s++)
                        missing += slots[s].completed == 0;
                if (!missing)
                        return;
                CHECK(now_ms() < deadline, "queue %u: %u requests never completed", q->index, missing);
                struct pollfd p = { .fd = q->call, .events = POLLIN };
                eventfd_t v;
                if (poll(&p, 1, 20) > 0)
                        (void) eventfd_read(q->call, &v);
        }
}

static void slot_verify(unsigned s) {
        const struct slot *sl = &slots[s];
        const uint8_t *data = mem + DATA_BASE + (size_t) s * BLOCK;
        uint8_t status = mem[HDR_BASE + s * 32 + 16];

        CHECK(sl->completed == 1, "slot %u completed %u times", s, sl->completed);
        CHECK(status == 0, "slot %u status %u", s, status);
        CHECK(sl->used_len == (sl->write ? 1 : BLOCK + 1), "slot %u used len %u", s, sl->used_len);
        if (!sl->write)
                for (unsigned i = 0; i < BLOCK; i++)
                        CHECK(data[i] == pattern(sl->sector, i),
                              "slot %u: read sector %llu byte %u is 0x%02x", s,
                              (unsigned long long) sl->sector, i, data[i]);
}

/* ---- the control socket ---- */

static void ctl_write(struct fe *fe, const char *line) {
        size_t len = strlen(line);
        CHECK(write(fe->ctl, line, len) == (ssize_t) len && write(fe->ctl, "\n", 1) == 1,
              "control write: %m");
}

static json_t *ctl_read(struct fe *fe) {
        char buf[65536];
        size_t n = 0;
        uint64_t deadline = now_ms() + IO_TIMEOUT_MS;
        while (n < sizeof(buf) - 1) {
                struct pollfd p = { .fd = fe->ctl, .events = POLLIN };
                CHECK(now_ms() < deadline, "control answer timed out");
                if (poll(&p, 1, 100) <= 0)
                        continue;
                ssize_t k = read(fe->ctl, buf + n, 1);
                CHECK(k == 1, "control read: %s", k == 0 ? "EOF" : strerror(errno));
                if (buf[n] == '\n')
                        break;
                n++;
        }
        buf[n] = 0;
        json_error_t jerr;
        json_t *j = json_loads(buf, 0, &jerr);
        CHECK(j, "control answer not JSON: %s", buf);
        return j;
}

static json_t *ctl(struct fe *fe, const char *line) {
        ctl_write(fe, line);
        json_t *j = ctl_read(fe);
        CHECK(json_is_true(json_object_get(j, "ok")), "control %s: %s", line,
              json_string_value(json_object_get(j, "error")));
        return j;
}

/* A back-end request arriving on our channel end; we reply with value (+fd). */
static void chan_serve(struct fe *fe, uint32_t expect, uint64_t value, int fd, uint8_t *ret_uuid) {
        struct vhu_msg m, r;
        const char *why = NULL;
        vhu_msg_init(&m);
        int k = vhu_recv_msg_blocking(fe->chan, &m, IO_TIMEOUT_MS);
        CHECK(k == 1, "back-end channel: %s", k == 0 ? "EOF" : strerror(-k));
        CHECK(vhu_validate_request(VHU_DIR_BACKEND, fe->pf, &m, &why) == 0,
              "back-end request invalid: %s", why);
        CHECK(m.hdr.request == expect, "back-end sent %s, expected %s",
              vhu_request_name(VHU_DIR_BACKEND, m.hdr.request), vhu_request_name(VHU_DIR_BACKEND, expect));
        if (ret_uuid)
                memcpy(ret_uuid, m.payload.shared.uuid, 16);
        if (vhu_request_expects_reply(VHU_DIR_BACKEND, m.hdr.request, m.hdr.flags, fe->pf)) {
                vhu_msg_build_reply(&r, &m, &value, sizeof(value), &fd, fd >= 0 ? 1 : 0);
                CHECK(vhu_send_msg_blocking(fe->chan, &r, IO_TIMEOUT_MS) >= 0, "channel reply");
                vhu_msg_forget_fds(&r);
        }
        vhu_msg_clear(&m);
}

static void test_control_and_shared_objects(struct fe *fe) {
        static const char *u1 = "5b1c8c1e-6a0c-4a54-9d3e-7d1f0a2b3c4d";
        static const char *u2 = "0e5d4c3b-2a19-4807-8f6e-5d4c3b2a1908";
        struct vhu_msg m, r;
        uint8_t uuid[16];
        char line[512];
        json_t *j;

        fe->ctl = connect_unix(ctl_path);
        json_decref(ctl(fe, "{\"cmd\":\"ping\"}"));

        /* export: SHARED_OBJECT_ADD (with NEED_REPLY: REPLY_ACK is on) */
        snprintf(line, sizeof(line), "{\"cmd\":\"export\",\"uuid\":\"%s\",\"size\":8192,\"fill\":\"5aa5\"}", u1);
        ctl_write(fe, line);
        chan_serve(fe, VHU_BREQ_SHARED_OBJECT_ADD, 0, -1, uuid);
        j = ctl_read(fe);
        CHECK(json_is_true(json_object_get(j, "ok")) &&
              json_integer_value(json_object_get(j, "reply")) == 0 &&
              json_is_string(json_object_get(j, "uuid")) &&
              strcmp(json_string_value(json_object_get(j, "uuid")), u1) == 0, "export answer");
        json_decref(j);

        /* GET_SHARED_OBJECT: the UUID echoed, the fd attached */
        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_GET_SHARED_OBJECT, false, uuid, 16, NULL, 0);
        fe_call(fe, &m, &r);
        CHECK(r.n_fds == 1 && r.hdr.size == 16 && memcmp(r.payload.shared.uuid, uuid, 16) == 0,
              "GET_SHARED_OBJECT reply");
        struct stat st;
        CHECK(fstat(r.fds[0], &st) == 0 && st.st_size == 8192, "shared object size");
        uint8_t *obj = mmap(NULL, 8192, PROT_READ, MAP_SHARED, r.fds[0], 0);
        CHECK(obj != MAP_FAILED && obj[0] == 0x5a && obj[1] == 0xa5 && obj[8191] == 0xa5, "shared object data");
        munmap(obj, 8192);
        vhu_msg_clear(&r);
        uuid[0] ^= 0xff;        /* unknown: no fd */
        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_GET_SHARED_OBJECT, false, uuid, 16, NULL, 0);
        fe_call(fe, &m, &r);
        CHECK(r.n_fds == 0, "GET_SHARED_OBJECT of an unknown UUID came with an fd");
        vhu_msg_clear(&r);

        /* LOOKUP: we answer with a memfd; the back-end reads and writes it */
        int fd = memfd_create("selftest-object", MFD_CLOEXEC);
        CHECK(fd >= 0 && ftruncate(fd, 4096) == 0, "memfd: %m");
        uint8_t *mine = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        CHECK(mine != MAP_FAILED, "mmap: %m");
        memset(mine, 0x11, 4096);
        snprintf(line, sizeof(line), "{\"cmd\":\"lookup\",\"uuid\":\"%s\",\"read\":4,\"write\":\"c0ffee\",\"offset\":8}", u2);
        ctl_write(fe, line);
        chan_serve(fe, VHU_BREQ_SHARED_OBJECT_LOOKUP, 0, fd, NULL);
        j = ctl_read(fe);
        CHECK(json_is_true(json_object_get(j, "ok")) && json_is_true(json_object_get(j, "fd")) &&
              json_integer_value(json_object_get(j, "size")) == 4096 &&
              strcmp(json_string_value(json_object_get(j, "data")), "11111111") == 0 &&
              json_integer_value(json_object_get(j, "wrote")) == 3, "lookup answer");
        json_decref(j);
        CHECK(mine[8] == 0xc0 && mine[9] == 0xff && mine[10] == 0xee && mine[11] == 0x11,
              "the back-end's write through the looked-up fd is not visible");
        munmap(mine, 4096);
        close(fd);

        /* CONFIG_CHANGE_MSG, answered nonzero: reported as such */
        ctl_write(fe, "{\"cmd\":\"config-change\"}");
        chan_serve(fe, VHU_BREQ_CONFIG_CHANGE_MSG, 3, -1, NULL);
        j = ctl_read(fe);
        CHECK(json_integer_value(json_object_get(j, "reply")) == 3, "config-change reply");
        json_decref(j);

        /* misbehave: refuse GET_STATUS once with value 5, then normal */
        json_decref(ctl(fe, "{\"cmd\":\"misbehave\",\"request\":\"GET_STATUS\",\"action\":\"refuse\",\"value\":5,\"count\":1}"));
        CHECK(fe_get_u64(fe, VHU_REQ_GET_STATUS) == 5, "misbehave refuse");
        fe_u64_ok(fe, VHU_REQ_SET_STATUS, 0x0f);
        CHECK(fe_get_u64(fe, VHU_REQ_GET_STATUS) == 0x0f, "GET_STATUS after the rule ran out");

        /* hostile input, refused through REPLY_ACK */
        struct vhu_mem_region reg = guest_region();
        vhu_msg_build_mem_single(&m, VHU_REQ_ADD_MEM_REG, false, &reg, mem_fd);
        CHECK(fe_ack(fe, &m) != 0, "overlapping ADD_MEM_REG accepted");
        reg = (struct vhu_mem_region) { .gpa = 1ull << 40, .size = MEM_SIZE * 2, .uaddr = 1ull << 44 };
        vhu_msg_build_mem_single(&m, VHU_REQ_ADD_MEM_REG, false, &reg, mem_fd);
        CHECK(fe_ack(fe, &m) != 0, "ADD_MEM_REG beyond the end of its fd accepted");
        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_NUM, false, 0, 1000);
        CHECK(fe_ack(fe, &m) != 0, "SET_VRING_NUM 1000 accepted");
        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_NUM, false, 7, 256);
        CHECK(fe_ack(fe, &m) != 0, "SET_VRING_NUM of queue 7 accepted");

        j = ctl(fe, "{\"cmd\":\"status\"}");
        json_t *s0 = json_array_get(json_object_get(j, "sockets"), 0);
        json_t *regs = json_object_get(json_object_get(s0, "conn"), "regions");
        CHECK(json_array_size(regs) == 1 &&
              (uint64_t) json_integer_value(json_object_get(json_array_get(regs, 0), "uaddr")) ==
              (uint64_t) (uintptr_t) mem, "status regions");
        CHECK(json_integer_value(json_object_get(json_object_get(s0, "requests"), "ADD_MEM_REG")) == 3,
              "status request counts");
        json_decref(j);
}

/* ---- phases ---- */

/* The work directory's paths and the guest's RAM (a memfd mapped here). */
static void setup_guest(void) {
        snprintf(tmpdir, sizeof(tmpdir), "/tmp/vhub-tb-selftest-XXXXXX");
        CHECK(mkdtemp(tmpdir), "mkdtemp: %m");
        snprintf(sock_path, sizeof(sock_path), "%s/blk.sock", tmpdir);
        snprintf(ctl_path, sizeof(ctl_path), "%s/ctl.sock", tmpdir);
        snprintf(disk_path, sizeof(disk_path), "%s/disk.img", tmpdir);

        mem_fd = memfd_create("selftest-guest", MFD_CLOEXEC);
        CHECK(mem_fd >= 0 && ftruncate(mem_fd, MEM_SIZE) == 0, "guest memfd: %m");
        mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, mem_fd, 0);
        CHECK(mem != MAP_FAILED, "mmap guest: %m");
}

/* 1: the back-end started, handshake, memory and channel, and the inflight
 * buffer it makes; returns the buffer's fd (*inf its layout). */
static int phase_setup(struct fe *fe, struct vhu_inflight *inf) {
        struct vhu_msg m, r;
        int inflight_fd;

        backend_start();
        fe_handshake(fe);
        fe_backend_channel(fe);
        *inf = (struct vhu_inflight){ .num_queues = 2, .queue_size = QSIZE };
        vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_GET_INFLIGHT_FD, false, inf, sizeof(*inf), NULL, 0);
        fe_call(fe, &m, &r);
        CHECK(r.n_fds == 1, "GET_INFLIGHT_FD without fd");
        *inf = r.payload.inflight;
        CHECK(inf->mmap_size == 2 * (16 + 16 * QSIZE) && inf->num_queues == 2 && inf->queue_size == QSIZE,
              "GET_INFLIGHT_FD reply: size %llu", (unsigned long long) inf->mmap_size);
        inflight_fd = vhu_msg_take_fd(&r, 0);
        vhu_msg_clear(&r);
        fe_set_inflight(fe, inf, inflight_fd);
        return inflight_fd;
}

/* 3: writes, then reads, out of order, on ring 0; stopped at the end. */
static void phase_out_of_order(struct fe *fe, struct drv_q *q0, uint64_t t0) {
        unsigned order[MAX_SLOTS], n_order = 0, inversions = 0;
        struct vhu_msg m, r;

        fe_start_queue(fe, q0, 0);
        for (unsigned s = 0; s < N_PHASE1; s++)
                q_submit(q0, s, (uint16_t) (3 * s), true, s * 8);
        q_kick(q0);
        q_wait_all(q0, 0, N_PHASE1, order, &n_order);
        for (unsigned i = 1; i < n_order; i++)
                inversions += order[i] < order[i - 1];
        CHECK(inversions > 0, "writes completed in submission order: not out of order");
        for (unsigned s = N_PHASE1; s < 2 * N_PHASE1; s++)
                q_submit(q0, s, (uint16_t) (3 * s), false, (s - N_PHASE1) * 8);
        q_kick(q0);
        q_wait_all(q0, N_PHASE1, 2 * N_PHASE1, NULL, NULL);
        for (unsigned s = 0; s < 2 * N_PHASE1; s++)
                slot_verify(s);
        /* stop: everything fetched has completed, base is the next avail */
        vhu_msg_build_state(&m, VHU_REQ_GET_VRING_BASE, false, 0, 0);
        fe_call(fe, &m, &r);
        CHECK(r.payload.state.num == 2 * N_PHASE1, "GET_VRING_BASE %u", r.payload.state.num);
        vhu_msg_clear(&r);
        printf("phase 1: %u writes + %u reads, %u inversions in completion order (%llu ms)\n",
               N_PHASE1, N_PHASE1, inversions, (unsigned long long) (now_ms() - t0));
}

/* Phase 2's request `slot` (the i-th from first): three writes of every
 * four, the fourth reading back what phase 1 wrote. */
static void q_submit_phase2(struct drv_q *q, unsigned slot, unsigned first) {
        unsigned i = slot - first;
        bool write = i % 4 != 3;
        uint64_t sector = write ? 1024 + (uint64_t) i * 8 : ((i / 4) % N_PHASE1) * 8;

        q_submit(q, slot, (uint16_t) (3 * i), write, sector);
}

/* The inflight buffer's queue 1 (mapped read-write when writable). */
static struct vhu_inflight_queue_split *inflight_queue1(const struct vhu_inflight *inf, int fd, bool writable,
                                                        void **ret_map) {
        void *map = mmap(NULL, inf->mmap_size, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, 0);

        CHECK(map != MAP_FAILED, "mmap inflight: %m");
        *ret_map = map;
        return (void *) ((uint8_t *) map + 16 + 16 * QSIZE);
}

/* After phase 4's kills: the disk itself holds every write, the inflight buffer is clean. */
static void check_after_kills(unsigned first, const struct vhu_inflight *inf, int inflight_fd) {
        int disk_fd = open(disk_path, O_RDONLY | O_CLOEXEC);
        struct vhu_inflight_queue_split *iq1;
        uint8_t buf[BLOCK];
        void *map;

        CHECK(disk_fd >= 0, "open disk: %m");
        for (unsigned s = first; s < first + N_PHASE2; s++) {
                if (!slots[s].write)
                        continue;
                CHECK(pread(disk_fd, buf, BLOCK, (off_t) slots[s].sector * 512) == BLOCK, "pread: %m");
                for (unsigned i = 0; i < BLOCK; i++)
                        CHECK(buf[i] == pattern(slots[s].sector, i), "disk sector %llu byte %u",
                              (unsigned long long) slots[s].sector, i);
        }
        close(disk_fd);
        iq1 = inflight_queue1(inf, inflight_fd, false, &map);
        CHECK(iq1->version == 1 && iq1->desc_num == QSIZE && iq1->used_idx == N_PHASE2,
              "inflight queue 1 header: version %u desc_num %u used_idx %u", iq1->version,
              iq1->desc_num, iq1->used_idx);
        for (unsigned i = 0; i < QSIZE; i++)
                CHECK(iq1->desc[i].inflight == 0, "inflight entry %u still set", i);
        munmap(map, inf->mmap_size);
}

/* 4: SIGKILL with requests in flight; restart; restore; exactly once.
 * Returns the first slot of the phase. */
static unsigned phase_kill_restore(struct fe *fe, struct drv_q *q1, const struct vhu_inflight *inf,
                                   int inflight_fd, unsigned driver_seed, uint64_t t0) {
        unsigned first = 2 * N_PHASE1, next = first, last = first + N_PHASE2;
        unsigned resubmit_cycles = 0;
        long long resubmitted = 0;

        fe_start_queue(fe, q1, 0);
        srand(driver_seed);
        for (unsigned cycle = 0; cycle < KILL_CYCLES; cycle++) {
                unsigned batch = (last - first) / (KILL_CYCLES + 1), outstanding = 0;
                long long n;
                json_t *j;

                for (unsigned k = 0; k < batch && next < last; k++, next++) {
                        q_submit_phase2(q1, next, first);
                        if (k % 8 == 7)
                                q_kick(q1);
                }
                q_kick(q1);
                msleep(2 + (unsigned) (rand() % 28));
                q_reap(q1, NULL, NULL);
                backend_kill();
                q_reap(q1, NULL, NULL);
                for (unsigned s = first; s < next; s++)
                        outstanding += slots[s].completed == 0;
                resubmit_cycles += outstanding > 0;

                /* restore, as a front-end does after a back-end crash */
                fe_close(fe);
                fe_restore(fe, q1, inf, inflight_fd);
                q_kick(q1);
                /* the restarted back-end found them in the inflight buffer */
                fe->ctl = connect_unix(ctl_path);
                j = ctl(fe, "{\"cmd\":\"vrings\"}");
                n = json_integer_value(json_object_get(
                        json_array_get(json_object_get(j, "vrings"), 1), "resubmitted"));
                json_decref(j);
                CHECK(n <= outstanding, "resubmitted %lld, only %u outstanding", n, outstanding);
                resubmitted += n;
                printf("cycle %u: killed with %u of %u requests outstanding, %lld resubmitted\n",
                       cycle, outstanding, next - first, n);
        }
        while (next < last)
                q_submit_phase2(q1, next++, first);
        q_kick(q1);
        q_wait_all(q1, first, last, NULL, NULL);
        msleep(50);             /* nothing more may arrive */
        q_reap(q1, NULL, NULL);
        CHECK(q_used_idx(q1) == N_PHASE2, "used idx %u after %u requests", q_used_idx(q1), N_PHASE2);
        for (unsigned s = first; s < last; s++)
                slot_verify(s);
        check_after_kills(first, inf, inflight_fd);
        CHECK(resubmit_cycles > 0, "no kill ever hit a request in flight");
        CHECK(resubmitted > 0, "no restarted back-end ever resubmitted an inflight request");
        printf("phase 2: %u requests over %u SIGKILLs (%u with requests in flight), %lld resubmitted, "
               "each completed exactly once (%llu ms)\n", N_PHASE2, KILL_CYCLES, resubmit_cycles, resubmitted,
               (unsigned long long) (now_ms() - t0));
        return first;
}

/*
 * 5: the spec's "last batch" fix-up, deterministically: make the
 * buffer look like a crash right after the used idx was bumped for a
 * batch of the last 5 completions, before their inflight flags were
 * cleared.  The restarted back-end must clear them, not resubmit.
 */
static void phase_last_batch(struct fe *fe, struct drv_q *q1, const struct vhu_inflight *inf, int inflight_fd,
                             unsigned first) {
        struct vhu_inflight_queue_split *iq1;
        json_t *jv, *v1;
        void *map;
        uint16_t h;

        backend_kill();
        fe_close(fe);
        iq1 = inflight_queue1(inf, inflight_fd, true, &map);
        h = iq1->last_batch_head;
        for (unsigned k = 0; k < 5; k++) {
                CHECK(h < QSIZE && slots[first + h / 3].completed == 1, "batch list head %u", h);
                iq1->desc[h].inflight = 1;
                h = iq1->desc[h].next;
        }
        iq1->used_idx = (uint16_t) (iq1->used_idx - 5);
        fe_restore(fe, q1, inf, inflight_fd);
        fe->ctl = connect_unix(ctl_path);
        jv = ctl(fe, "{\"cmd\":\"vrings\"}");
        v1 = json_array_get(json_object_get(jv, "vrings"), 1);
        CHECK(json_integer_value(json_object_get(v1, "resubmitted")) == 0 &&
              json_integer_value(json_object_get(v1, "last_avail")) == N_PHASE2,
              "fix-up: resubmitted %lld, last avail %lld",
              (long long) json_integer_value(json_object_get(v1, "resubmitted")),
              (long long) json_integer_value(json_object_get(v1, "last_avail")));
        json_decref(jv);
        msleep(50);
        CHECK(q_reap(q1, NULL, NULL) == 0 && q_used_idx(q1) == N_PHASE2, "completions after the fix-up");
        CHECK(iq1->used_idx == N_PHASE2, "fix-up left used_idx %u", iq1->used_idx);
        for (unsigned i = 0; i < QSIZE; i++)
                CHECK(iq1->desc[i].inflight == 0, "fix-up left entry %u inflight", i);
        munmap(map, inf->mmap_size);
        printf("phase 3: last-batch fix-up after a crash mid-completion: nothing resubmitted\n");
}

/* A clean exit on SIGTERM. */
static void backend_stop_checked(void) {
        int status;

        kill(backend_pid, SIGTERM);
        waitpid(backend_pid, &status, 0);
        backend_pid = -1;
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "exit status on SIGTERM: 0x%x", status);
}

int main(void) {
        struct fe fe = { .sock = -1, .chan = -1, .ctl = -1 };
        struct vhu_inflight inf;
        struct drv_q q0, q1;
        uint64_t t0 = now_ms();
        unsigned driver_seed, first;
        int inflight_fd;

        backend_bin = getenv("VHUB_TEST_BACKEND");
        if (getenv("VHUB_SELFTEST_SEED"))
                seed = (unsigned) strtoul(getenv("VHUB_SELFTEST_SEED"), NULL, 0);
        driver_seed = seed * 7919u + 12345u;
        if (!backend_bin || access(backend_bin, X_OK) < 0) {
                printf("SKIP: VHUB_TEST_BACKEND not set or not executable\n");
                return 77;
        }
        signal(SIGPIPE, SIG_IGN);
        setvbuf(stdout, NULL, _IOLBF, 0);
        setup_guest();

        inflight_fd = phase_setup(&fe, &inf);
        /* 2: control, shared objects, misbehaviour, refusals */
        test_control_and_shared_objects(&fe);
        q_init(&q0, 0);
        q_init(&q1, 1);
        phase_out_of_order(&fe, &q0, t0);
        first = phase_kill_restore(&fe, &q1, &inf, inflight_fd, driver_seed, t0);
        phase_last_batch(&fe, &q1, &inf, inflight_fd, first);
        backend_stop_checked();

        fe_close(&fe);
        close(inflight_fd);
        close(q0.kick);
        close(q0.call);
        close(q1.kick);
        close(q1.call);
        munmap(mem, MEM_SIZE);
        close(mem_fd);
        cleanup();
        printf("PASS\n");
        return 0;
}
