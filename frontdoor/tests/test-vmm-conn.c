/* SPDX-License-Identifier: MIT */
/*
 * The VMM's connection (frontdoor/vhub-vmm-conn.c) against a fake VMM on a
 * socketpair: a QEMU-like handshake, start and stop with real eventfds and
 * memfds; REPLY_ACK exactly when NEED_REPLY and REPLY_ACK say so; answers
 * given out of order leave in request order (fds included); back-pressure
 * at max_pending; every kind of malformed or oversized message, fds where
 * none belong, unoffered protocol features; a VMM that never reads; a face
 * that never answers; freeing from inside the callback.  Every scenario
 * ends with the process's fd count back where it started.
 *
 *   test-vmm-conn
 */
#include <fcntl.h>
#include <stdlib.h>

#include "vhub-vmm-conn.h"
#include "vmm-test.h"

/* What qemu-storage-daemon offers (shared/backends.md), plus bit 30. */
#define BLK_FEATURES UINT64_C(0x175007e46)
#define PF(x)        VHU_PF_BIT(VHU_PF_##x)
/* A back-end's offer the face would relay: qsd's, with INFLIGHT_SHMFD, STATUS
 * and in-band notifications. */
#define OFFER (PF(MQ) | PF(LOG_SHMFD) | PF(REPLY_ACK) | PF(BACKEND_REQ) | PF(CONFIG) | \
               PF(BACKEND_SEND_FD) | PF(HOST_NOTIFIER) | PF(CONFIGURE_MEM_SLOTS) |     \
               PF(INFLIGHT_SHMFD) | PF(STATUS) | PF(INBAND_NOTIFICATIONS))
#define NEED (VHU_VERSION | VHU_FLAG_NEED_REPLY)
#define PLAIN VHU_VERSION
#define MAX_LOG 256

struct seen {
        uint32_t request;
        uint32_t flags;
        uint64_t answer_id;
        enum vhub_vmm_answer_kind kind;
        unsigned n_fds;
        char fd_kind[VHU_MAX_FDS][16];
        uint8_t payload[64];
};

/* The face above the connection, as the tests script it. */
struct face {
        struct event_base *base;
        struct vhub_vmm_conn *conn;
        int vmm;                      /* the fake VMM's end */
        unsigned n;
        struct seen log[MAX_LOG];
        bool defer;                   /* leave answers to the test */
        uint32_t free_on;             /* free the connection on this request */
        int kept_fd;                  /* an fd taken from a request */
        bool lost;
        char reason[256];
        unsigned before_read;         /* on_before_read calls ... */
        unsigned seen_at[8];          /* ... with how many requests seen before each */
};

static void face_answer(struct face *f, const struct vhu_msg *m, uint64_t id) {
        enum vhub_vmm_answer_kind kind = vhub_vmm_conn_answer_kind(f->conn, id);
        int r;

        if (kind == VHUB_VMM_ANSWER_ACK) {
                CHECK_EQ(vhub_vmm_conn_ack(f->conn, id, 0), 0);
                return;
        }
        CHECK_EQ(kind, VHUB_VMM_ANSWER_REPLY);
        switch (m->hdr.request) {
        case VHU_REQ_GET_FEATURES:
                r = vhub_vmm_conn_reply_u64(f->conn, id, BLK_FEATURES);
                break;
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                r = vhub_vmm_conn_reply_u64(f->conn, id, OFFER);
                break;
        case VHU_REQ_GET_QUEUE_NUM:
                r = vhub_vmm_conn_reply_u64(f->conn, id, 2);
                break;
        case VHU_REQ_GET_MAX_MEM_SLOTS:
                r = vhub_vmm_conn_reply_u64(f->conn, id, 32);
                break;
        case VHU_REQ_GET_STATUS:
                r = vhub_vmm_conn_reply_u64(f->conn, id, VHU_STATUS_FEATURES_OK);
                break;
        case VHU_REQ_SET_LOG_BASE:
                r = vhub_vmm_conn_reply_u64(f->conn, id, 0);
                break;
        case VHU_REQ_GET_CONFIG: {
                struct vhu_config c = m->payload.config;

                for (uint32_t i = 0; i < c.size; i++)
                        c.data[i] = (uint8_t)(c.offset + i);
                r = vhub_vmm_conn_reply(f->conn, id, &c, VHU_CONFIG_HEADER_SIZE + c.size, NULL, 0);
                break;
        }
        case VHU_REQ_GET_VRING_BASE: {
                struct vhu_vring_state s = { m->payload.state.index, 100 + m->payload.state.index };

                r = vhub_vmm_conn_reply(f->conn, id, &s, sizeof(s), NULL, 0);
                break;
        }
        case VHU_REQ_GET_INFLIGHT_FD: {
                struct vhu_inflight in = m->payload.inflight;
                int fd = test_memfd(4096);

                in.mmap_size = 4096;
                in.mmap_offset = 0;
                r = vhub_vmm_conn_reply(f->conn, id, &in, sizeof(in), &fd, 1);
                close(fd); /* the connection keeps its own copy until sent */
                break;
        }
        default:
                r = -1;
                break;
        }
        CHECK_EQ(r, 0);
}

static void face_on_request(void *userdata, struct vhu_msg *m, uint64_t id) {
        struct face *f = userdata;
        struct seen *s;

        /* past MAX_LOG only the count goes on */
        s = &f->log[f->n < MAX_LOG ? f->n : MAX_LOG - 1];
        f->n++;
        *s = (struct seen){
                .request = m->hdr.request,
                .flags = m->hdr.flags,
                .answer_id = id,
                .kind = vhub_vmm_conn_answer_kind(f->conn, id),
                .n_fds = m->n_fds,
        };
        memcpy(s->payload, m->payload.raw, sizeof(s->payload));
        for (unsigned i = 0; i < m->n_fds; i++)
                snprintf(s->fd_kind[i], sizeof(s->fd_kind[i]), "%s", test_fd_kind(m->fds[i]));
        if (m->hdr.request == VHU_REQ_SET_BACKEND_REQ_FD) {
                /* the face keeps what it takes; the rest is closed for it */
                CHECK(f->kept_fd < 0);
                f->kept_fd = vhu_msg_take_fd(m, 0);
        }
        if (f->free_on && m->hdr.request == f->free_on) {
                f->conn = vhub_vmm_conn_free(f->conn);
                return;
        }
        if (id && !f->defer)
                face_answer(f, m, id);
}

static void face_on_lost(void *userdata, const char *reason) {
        struct face *f = userdata;

        CHECK(!f->lost);
        f->lost = true;
        snprintf(f->reason, sizeof(f->reason), "%s", reason);
}

static void face_on_before_read(void *userdata) {
        struct face *f = userdata;

        if (f->before_read < sizeof(f->seen_at) / sizeof(f->seen_at[0]))
                f->seen_at[f->before_read] = f->n;
        f->before_read++;
}

static const struct vhub_vmm_conn_ops face_ops = {
        .on_request = face_on_request,
        .on_lost = face_on_lost,
        .on_before_read = face_on_before_read,
};

static void face_setup(struct face *f, const struct vhub_vmm_conn_limits *limits) {
        int sv[2];

        memset(f, 0, sizeof(*f));
        f->kept_fd = -1;
        f->base = event_base_new();
        CHECK(f->base);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        f->vmm = sv[1];
        CHECK_EQ(vhub_vmm_conn_new(f->base, sv[0], limits, &face_ops, f, &f->conn), 0);
        vhub_vmm_conn_offer_protocol_features(f->conn, OFFER);
}

static void face_teardown(struct face *f) {
        vhub_vmm_conn_free(f->conn);
        if (f->kept_fd >= 0)
                close(f->kept_fd);
        close(f->vmm);
        event_base_free(f->base);
}

/* The VMM sends, the face has seen it (and answered unless deferring). */
#define SEND_SEEN(f, send_call)                                     \
        do {                                                        \
                unsigned _before = (f)->n;                          \
                send_call;                                          \
                LOOP_UNTIL((f)->base, (f)->n > _before || (f)->lost); \
                CHECK(!(f)->lost);                                  \
        } while (0)

/* The answer the VMM reads next is to request, with flags VERSION|REPLY. */
static void expect_answer(struct face *f, uint32_t request, struct vhu_msg *ret) {
        vmm_recv(f->vmm, ret);
        CHECK_EQ(ret->hdr.request, request);
        CHECK_EQ(ret->hdr.flags, VHU_VERSION | VHU_FLAG_REPLY);
}

static uint64_t expect_u64(struct face *f, uint32_t request) {
        struct vhu_msg r;

        expect_answer(f, request, &r);
        CHECK_EQ(r.hdr.size, 8);
        CHECK_EQ(r.n_fds, 0);
        return r.payload.u64;
}

/* ---- scenarios ---- */

/*
 * QEMU 7.2's vhost-user-blk, as hw/virtio/vhost-user.c drives it: the
 * handshake (per vhost_dev), the config read at realize, the start with the
 * memory table, inflight and both rings, and the stop.  Requests without
 * NEED_REPLY get nothing back; the VMM's synchronous reads prove it.
 */
static void test_qemu_handshake(void) {
        uint64_t acked = OFFER; /* QEMU 7.2 acks the offer within bits 0..16 */
        struct vhu_mem_single reg = { .region = { 0, 1 << 20, 0x7f0000000000, 0 } };
        struct vhu_inflight inflight = { .num_queues = 2, .queue_size = 128 };
        struct vhu_config cfg = { .offset = 0, .size = 60 };
        int base_fds = vhub_count_open_fds();
        int mem, chan[2], call[2], kick[2], inflight_fd;
        struct vhu_msg r;
        struct face f;

        face_setup(&f, NULL);
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0));
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_FEATURES), BLK_FEATURES);
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_PROTOCOL_FEATURES, PLAIN, NULL, 0, NULL, 0));
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_PROTOCOL_FEATURES), OFFER);
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, acked));
        CHECK_EQ(f.log[f.n - 1].answer_id, 0);
        CHECK_EQ(vhub_vmm_conn_protocol_features(f.conn), acked);
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_QUEUE_NUM, PLAIN, NULL, 0, NULL, 0));
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_QUEUE_NUM), 2);
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_MAX_MEM_SLOTS, PLAIN, NULL, 0, NULL, 0));
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_MAX_MEM_SLOTS), 32);

        /* the back-end channel: the face takes the VMM's socket */
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, chan) == 0);
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_BACKEND_REQ_FD, NEED, NULL, 0, &chan[1], 1));
        close(chan[1]);
        CHECK_EQ(f.log[f.n - 1].kind, VHUB_VMM_ANSWER_ACK);
        CHECK_EQ(expect_u64(&f, VHU_REQ_SET_BACKEND_REQ_FD), 0);
        CHECK(f.kept_fd >= 0);
        CHECK(strcmp(test_fd_kind(f.kept_fd), "socket") == 0);
        CHECK(write(chan[0], "x", 1) == 1); /* it is the same socketpair */
        {
                char c;

                CHECK(read(f.kept_fd, &c, 1) == 1 && c == 'x');
        }
        close(chan[0]);

        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_OWNER, PLAIN, NULL, 0, NULL, 0));
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0));
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_FEATURES), BLK_FEATURES); /* SET_OWNER answered nothing */
        for (unsigned i = 0; i < 2; i++) {
                uint64_t v = i;

                call[i] = test_eventfd();
                SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_VRING_CALL, PLAIN, &v, 8, &call[i], 1));
                CHECK(strcmp(f.log[f.n - 1].fd_kind[0], "eventfd") == 0);
        }
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_CONFIG, PLAIN, &cfg, VHU_CONFIG_HEADER_SIZE + 60, NULL, 0));
        expect_answer(&f, VHU_REQ_GET_CONFIG, &r);
        CHECK_EQ(r.hdr.size, VHU_CONFIG_HEADER_SIZE + 60);
        CHECK_EQ(r.payload.config.data[59], 59);

        /* start */
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_FEATURES, PLAIN, BLK_FEATURES));
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_STATUS, PLAIN, NULL, 0, NULL, 0));
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_STATUS), VHU_STATUS_FEATURES_OK);
        mem = test_memfd(1 << 20);
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_ADD_MEM_REG, NEED, &reg, sizeof(reg), &mem, 1));
        close(mem);
        CHECK(strcmp(f.log[f.n - 1].fd_kind[0], "memfd") == 0);
        CHECK_EQ(expect_u64(&f, VHU_REQ_ADD_MEM_REG), 0);
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_INFLIGHT_FD, PLAIN, &inflight, sizeof(inflight), NULL, 0));
        expect_answer(&f, VHU_REQ_GET_INFLIGHT_FD, &r);
        CHECK_EQ(r.n_fds, 1);
        CHECK(strcmp(test_fd_kind(r.fds[0]), "memfd") == 0);
        CHECK_EQ(r.payload.inflight.mmap_size, 4096);
        inflight_fd = vhu_msg_take_fd(&r, 0);
        inflight.mmap_size = 4096;
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_INFLIGHT_FD, PLAIN, &inflight, sizeof(inflight),
                               &inflight_fd, 1));
        close(inflight_fd);
        for (unsigned i = 0; i < 2; i++) {
                struct vhu_vring_addr addr = { .index = i, .desc = 0x7f0000001000 + i * 0x1000,
                                               .used = 0x7f0000003000, .avail = 0x7f0000002000 };
                uint64_t v = i;

                SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_NUM, PLAIN, i, 128));
                SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_BASE, PLAIN, i, 0));
                SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_VRING_ADDR, PLAIN, &addr, sizeof(addr), NULL, 0));
                kick[i] = test_eventfd();
                SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_VRING_KICK, PLAIN, &v, 8, &kick[i], 1));
                CHECK(strcmp(f.log[f.n - 1].fd_kind[0], "eventfd") == 0);
                SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_VRING_CALL, PLAIN, &v, 8, &call[i], 1));
        }
        for (unsigned i = 0; i < 2; i++) {
                /* newer QEMU waits for each enable */
                SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, NEED, i, 1));
                CHECK_EQ(expect_u64(&f, VHU_REQ_SET_VRING_ENABLE), 0);
        }
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_STATUS, PLAIN, 0x0f));

        /* stop */
        for (unsigned i = 0; i < 2; i++)
                SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, PLAIN, i, 0));
        for (unsigned i = 0; i < 2; i++) {
                SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_GET_VRING_BASE, PLAIN, i, 0));
                expect_answer(&f, VHU_REQ_GET_VRING_BASE, &r);
                CHECK_EQ(r.payload.state.index, i);
                CHECK_EQ(r.payload.state.num, 100 + i);
        }
        for (unsigned i = 0; i < 2; i++) {
                close(kick[i]);
                close(call[i]);
        }
        test_loop_for(f.base, 20);
        CHECK(vmm_nothing_to_read(f.vmm)); /* not one answer too many */
        CHECK(!f.lost);
        CHECK_EQ(f.n, 33);
        CHECK_EQ(vhub_vmm_conn_pending(f.conn), 0);
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* REPLY_ACK: an ack exactly for NEED_REPLY with REPLY_ACK negotiated; a
 * request with its own reply gets that and no extra ack. */
static void test_reply_ack(void) {
        int base_fds = vhub_count_open_fds();
        uint64_t id;
        struct face f;

        face_setup(&f, NULL);
        f.defer = true;
        /* before REPLY_ACK: NEED_REPLY is ignored */
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_NUM, NEED, 0, 64));
        CHECK_EQ(f.log[0].answer_id, 0);
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, PF(MQ) | PF(LOG_SHMFD)));
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_NUM, NEED, 0, 64));
        CHECK_EQ(f.log[2].answer_id, 0);
        /* enabling REPLY_ACK with NEED_REPLY set: the new set decides */
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_PROTOCOL_FEATURES, NEED, OFFER));
        id = f.log[3].answer_id;
        CHECK(id != 0);
        CHECK_EQ(vhub_vmm_conn_answer_kind(f.conn, id), VHUB_VMM_ANSWER_ACK);
        CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, id, 0), -ENOENT); /* it wants an ack */
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, id, 0), 0);
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, id, 0), -ENOENT);       /* exactly once */
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, 0, 0), -ENOENT);
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, id + 100, 0), -ENOENT);
        CHECK_EQ(expect_u64(&f, VHU_REQ_SET_PROTOCOL_FEATURES), 0);
        /* without NEED_REPLY: nothing owed */
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_NUM, PLAIN, 0, 64));
        CHECK_EQ(f.log[4].answer_id, 0);
        /* a failure ack: the VMM reads the status */
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_NUM, NEED, 0, 64));
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, f.log[5].answer_id, 1), 0);
        CHECK_EQ(expect_u64(&f, VHU_REQ_SET_VRING_NUM), 1);
        /* own reply with NEED_REPLY: one reply, no ack */
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, NEED, NULL, 0, NULL, 0));
        id = f.log[6].answer_id;
        CHECK_EQ(vhub_vmm_conn_answer_kind(f.conn, id), VHUB_VMM_ANSWER_REPLY);
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, id, 0), -ENOENT);
        /* a reply the VMM's front-end would refuse is never sent */
        CHECK_EQ(vhub_vmm_conn_reply(f.conn, id, "abcd", 4, NULL, 0), -EINVAL);
        {
                int fd = test_eventfd();

                CHECK_EQ(vhub_vmm_conn_reply(f.conn, id, &id, 8, &fd, 1), -EINVAL);
                close(fd);
        }
        CHECK(vmm_nothing_to_read(f.vmm));
        CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, id, BLK_FEATURES), 0);
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_FEATURES), BLK_FEATURES);
        /* SET_LOG_BASE: its own reply once LOG_SHMFD is negotiated */
        {
                struct vhu_log log = { 4096, 0 };
                int fd = test_memfd(4096);

                SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_SET_LOG_BASE, PLAIN, &log, sizeof(log), &fd, 1));
                close(fd);
                CHECK_EQ(vhub_vmm_conn_answer_kind(f.conn, f.log[7].answer_id), VHUB_VMM_ANSWER_REPLY);
                CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, f.log[7].answer_id, 0), 0);
                CHECK_EQ(expect_u64(&f, VHU_REQ_SET_LOG_BASE), 0);
        }
        test_loop_for(f.base, 10);
        CHECK(vmm_nothing_to_read(f.vmm));
        CHECK(!f.lost);
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* Answers given late and out of order leave in request order, fds too. */
static void test_answers_in_order(void) {
        struct vhu_inflight inflight = { .num_queues = 1, .queue_size = 64 };
        int base_fds = vhub_count_open_fds();
        uint64_t id[4];
        struct vhu_msg r;
        struct face f;
        int fd;

        face_setup(&f, NULL);
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, OFFER));
        f.defer = true;
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0));
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_INFLIGHT_FD, PLAIN, &inflight, sizeof(inflight), NULL, 0));
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, NEED, 0, 1));
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_QUEUE_NUM, PLAIN, NULL, 0, NULL, 0));
        for (unsigned i = 0; i < 4; i++)
                id[i] = f.log[1 + i].answer_id;
        CHECK_EQ(vhub_vmm_conn_pending(f.conn), 4);

        /* the last, then the second (with an fd the face closes at once) */
        CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, id[3], 4), 0);
        inflight.mmap_size = 8192;
        fd = test_memfd(8192);
        CHECK_EQ(vhub_vmm_conn_reply(f.conn, id[1], &inflight, sizeof(inflight), &fd, 1), 0);
        close(fd);
        CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, id[1], 0), -ENOENT); /* answered, held */
        test_loop_for(f.base, 10);
        CHECK(vmm_nothing_to_read(f.vmm)); /* held behind the first */
        CHECK_EQ(vhub_vmm_conn_pending(f.conn), 4);

        CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, id[0], BLK_FEATURES), 0);
        CHECK_EQ(vhub_vmm_conn_pending(f.conn), 2); /* the third, and the fourth held behind it */
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_FEATURES), BLK_FEATURES);
        expect_answer(&f, VHU_REQ_GET_INFLIGHT_FD, &r);
        CHECK_EQ(r.n_fds, 1);
        CHECK(strcmp(test_fd_kind(r.fds[0]), "memfd") == 0);
        {
                struct stat st;

                CHECK(fstat(r.fds[0], &st) == 0 && st.st_size == 8192);
        }
        vhu_msg_clear(&r);
        CHECK(vmm_nothing_to_read(f.vmm)); /* the fourth waits for the third */
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, id[2], 0), 0);
        CHECK_EQ(expect_u64(&f, VHU_REQ_SET_VRING_ENABLE), 0);
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_QUEUE_NUM), 4);
        CHECK_EQ(vhub_vmm_conn_pending(f.conn), 0);

        /* held answers of a connection freed before they went: no fd leaks */
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0));
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_INFLIGHT_FD, PLAIN, &inflight, sizeof(inflight), NULL, 0));
        fd = test_memfd(8192);
        CHECK_EQ(vhub_vmm_conn_reply(f.conn, f.log[f.n - 1].answer_id, &inflight, sizeof(inflight), &fd, 1), 0);
        close(fd);
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* At max_pending the connection stops reading; answers let it go on. */
static void test_back_pressure(void) {
        struct vhub_vmm_conn_limits limits;
        int base_fds = vhub_count_open_fds();
        struct face f;

        vhub_vmm_conn_limits_default(&limits);
        limits.max_pending = 2;
        face_setup(&f, &limits);
        f.defer = true;
        for (unsigned i = 0; i < 5; i++)
                vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0);
        LOOP_UNTIL(f.base, f.n == 2);
        test_loop_for(f.base, 20);
        CHECK_EQ(f.n, 2); /* the rest wait in the socket */
        CHECK(!f.lost);
        for (uint64_t done = 0; done < 5; done++) {
                LOOP_UNTIL(f.base, f.n > done);
                CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, f.log[done].answer_id, done), 0);
        }
        for (uint64_t i = 0; i < 5; i++)
                CHECK_EQ(expect_u64(&f, VHU_REQ_GET_FEATURES), i);
        CHECK_EQ(f.n, 5);
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* One hostile message: the connection is lost with a reason naming it,
 * the face never sees the message, every fd it carried is closed. */
struct hostile {
        const char *name;
        void (*send)(int vmm);
        const char *reason;           /* a substring of the loss reason */
};

static void send_reply_flag(int vmm) {
        vmm_send(vmm, VHU_REQ_GET_FEATURES, VHU_VERSION | VHU_FLAG_REPLY, NULL, 0, NULL, 0);
}

static void send_bad_version(int vmm) {
        vmm_send(vmm, VHU_REQ_GET_FEATURES, 2, NULL, 0, NULL, 0);
}

static void send_unknown_request(int vmm) {
        vmm_send(vmm, 99, PLAIN, NULL, 0, NULL, 0);
}

static void send_oversized(int vmm) {
        struct vhu_header hdr = { VHU_REQ_SET_CONFIG, PLAIN, VHU_MAX_PAYLOAD + 1 };
        uint8_t junk[64] = { 0 };

        vmm_send_raw(vmm, &hdr, sizeof(hdr), NULL, 0);
        vmm_send_raw(vmm, junk, sizeof(junk), NULL, 0);
}

static void send_short_payload(int vmm) {
        vmm_send(vmm, VHU_REQ_SET_VRING_NUM, PLAIN, "1234", 4, NULL, 0);
}

static void send_mem_table_fd_missing(int vmm) {
        struct vhu_mem_table t = { .nregions = 2 };
        int fd = test_memfd(4096);

        vmm_send(vmm, VHU_REQ_SET_MEM_TABLE, PLAIN, &t, 8 + 2 * 32, &fd, 1);
        close(fd);
}

static void send_fd_where_none(int vmm) {
        int fds[2] = { test_eventfd(), test_memfd(4096) };

        vmm_send(vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, fds, 2);
        close(fds[0]);
        close(fds[1]);
}

static void send_kick_nofd_with_fd(int vmm) {
        uint64_t v = VHU_VRING_NOFD_MASK;
        int fd = test_eventfd();

        vmm_send(vmm, VHU_REQ_SET_VRING_KICK, PLAIN, &v, 8, &fd, 1);
        close(fd);
}

static void send_too_many_fds(int vmm) {
        struct vhu_mem_table t = { .nregions = 8 };
        int fds[9];

        for (unsigned i = 0; i < 9; i++)
                fds[i] = test_eventfd();
        vmm_send(vmm, VHU_REQ_SET_MEM_TABLE, PLAIN, &t, 8 + 8 * 32, fds, 9);
        for (unsigned i = 0; i < 9; i++)
                close(fds[i]);
}

static void send_fds_off_first_byte(int vmm) {
        struct vhu_header hdr = { VHU_REQ_SET_VRING_CALL, PLAIN, 8 };
        uint64_t v = 0;
        int fd = test_eventfd();

        vmm_send_raw(vmm, &hdr, sizeof(hdr), NULL, 0);
        vmm_send_raw(vmm, &v, sizeof(v), &fd, 1);
        close(fd);
}

static void send_unoffered_pf(int vmm) {
        vmm_send_u64(vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, OFFER | PF(PAGEFAULT));
}

static void send_inconsistent_pf(int vmm) {
        /* spec: an error to negotiate INBAND_NOTIFICATIONS without REPLY_ACK */
        vmm_send_u64(vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, PF(INBAND_NOTIFICATIONS) | PF(BACKEND_REQ));
}

static void send_unnegotiated(int vmm) {
        struct vhu_config c = { .size = 4 };

        /* GET_CONFIG needs CONFIG, not negotiated yet */
        vmm_send(vmm, VHU_REQ_GET_CONFIG, PLAIN, &c, VHU_CONFIG_HEADER_SIZE + 4, NULL, 0);
}

static void send_eof_mid_message(int vmm) {
        struct vhu_header hdr = { VHU_REQ_SET_FEATURES, PLAIN, 8 };

        vmm_send_raw(vmm, &hdr, 6, NULL, 0);
        shutdown(vmm, SHUT_WR);
}

static void send_eof(int vmm) {
        shutdown(vmm, SHUT_WR);
}

static const struct hostile hostile[] = {
        { "REPLY flag on a request", send_reply_flag, "bad request GET_FEATURES" },
        { "version 2", send_bad_version, "bad request GET_FEATURES" },
        { "unknown request", send_unknown_request, "bad request UNKNOWN (99)" },
        { "payload beyond 4096 bytes", send_oversized, "framing" },
        { "payload shorter than its request", send_short_payload, "bad request SET_VRING_NUM" },
        { "mem table with a missing fd", send_mem_table_fd_missing, "bad request SET_MEM_TABLE" },
        { "fds with a request that takes none", send_fd_where_none, "bad request GET_FEATURES" },
        { "kick with no-fd bit and an fd", send_kick_nofd_with_fd, "bad request SET_VRING_KICK" },
        { "nine fds", send_too_many_fds, "framing" },
        { "fds off the first byte", send_fds_off_first_byte, "framing" },
        { "protocol feature not offered", send_unoffered_pf, "beyond the 0x" },
        { "protocol features the spec forbids together", send_inconsistent_pf, "without what the spec requires" },
        { "request of an unnegotiated feature", send_unnegotiated, "bad request GET_CONFIG" },
        { "EOF inside a message", send_eof_mid_message, "inside a message" },
        { "EOF", send_eof, "closed the connection" },
};

static void test_hostile(void) {
        for (size_t i = 0; i < sizeof(hostile) / sizeof(hostile[0]); i++) {
                int base_fds = vhub_count_open_fds();
                struct face f;

                face_setup(&f, NULL);
                /* a valid request first: the connection is in use when it breaks */
                SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0));
                CHECK_EQ(expect_u64(&f, VHU_REQ_GET_FEATURES), BLK_FEATURES);
                hostile[i].send(f.vmm);
                LOOP_UNTIL(f.base, f.lost);
                if (!strstr(f.reason, hostile[i].reason)) {
                        fprintf(stderr, "%s: reason \"%s\" lacks \"%s\"\n", hostile[i].name, f.reason,
                                hostile[i].reason);
                        abort();
                }
                CHECK_EQ(f.n, 1); /* the face never saw it */
                /* lost: nothing is answered any more, nothing more is read */
                CHECK_EQ(vhub_vmm_conn_ack(f.conn, 1, 0), -ENOTCONN);
                CHECK(vhub_vmm_conn_is_lost(f.conn));
                face_teardown(&f);
                CHECK_EQ(vhub_count_open_fds(), base_fds);
                printf("hostile: %-45s -> %s\n", hostile[i].name, f.reason);
        }
}

/* A VMM that sends and never reads: dropped by the byte bound, or by the
 * write deadline; the daemon's loop never blocks on it. */
static void fill_until_lost(struct face *f) {
        struct vhu_config c = { .size = 256 };
        int small = 4096;

        CHECK(setsockopt(f->vmm, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small)) == 0);
        SEND_SEEN(f, vmm_send_u64(f->vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, OFFER));
        for (unsigned i = 0; i < 1000 && !f->lost; i++) {
                vmm_send(f->vmm, VHU_REQ_GET_CONFIG, PLAIN, &c, VHU_CONFIG_HEADER_SIZE + 256, NULL, 0);
                test_loop_step(f->base);
        }
        LOOP_UNTIL(f->base, f->lost);
}

static void test_vmm_never_reads(void) {
        struct vhub_vmm_conn_limits limits;
        int base_fds = vhub_count_open_fds();
        struct face f;

        vhub_vmm_conn_limits_default(&limits);
        limits.max_queued_bytes = 16 << 10;
        face_setup(&f, &limits);
        fill_until_lost(&f);
        CHECK(strstr(f.reason, "the VMM does not read its connection"));
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);

        vhub_vmm_conn_limits_default(&limits);
        limits.max_queued_bytes = 64 << 20;
        limits.write_timeout_ms = 100;
        face_setup(&f, &limits);
        fill_until_lost(&f);
        CHECK(strstr(f.reason, "the VMM read nothing on its connection for 100 ms"));
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* A face that never answers: the VMM is not left waiting forever. */
static void test_answer_deadline(void) {
        struct vhub_vmm_conn_limits limits;
        int base_fds = vhub_count_open_fds();
        struct face f;

        vhub_vmm_conn_limits_default(&limits);
        limits.answer_timeout_ms = 50;
        face_setup(&f, &limits);
        f.defer = true;
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0));
        LOOP_UNTIL(f.base, f.lost);
        CHECK(strstr(f.reason, "GET_FEATURES from the VMM not answered within 50 ms"));
        CHECK(vmm_sees_eof(f.vmm) == false); /* the face closes it: free */
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* The face frees the connection from inside on_request, with requests and
 * fds still behind it in the socket. */
static void test_free_inside_callback(void) {
        int base_fds = vhub_count_open_fds();
        struct face f;
        int fd;

        face_setup(&f, NULL);
        f.free_on = VHU_REQ_SET_OWNER;
        vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0);
        vmm_send(f.vmm, VHU_REQ_SET_OWNER, PLAIN, NULL, 0, NULL, 0);
        fd = test_eventfd();
        vmm_send_u64(f.vmm, VHU_REQ_SET_VRING_CALL, PLAIN, 0); /* no fd: malformed, never read */
        vmm_send(f.vmm, VHU_REQ_SET_VRING_CALL, PLAIN, &(uint64_t){ 0 }, 8, &fd, 1);
        close(fd);
        LOOP_UNTIL(f.base, f.conn == NULL);
        test_loop_for(f.base, 10);
        CHECK_EQ(f.n, 2);
        CHECK(!f.lost); /* freed, not lost: no callback after free */
        CHECK(vmm_sees_eof(f.vmm));
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* vhub_vmm_conn_fail: the face closes a VMM it cannot answer honestly. */
static void test_fail(void) {
        int base_fds = vhub_count_open_fds();
        struct face f;

        face_setup(&f, NULL);
        f.defer = true;
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_GET_VRING_BASE, PLAIN, 0, 0));
        vhub_vmm_conn_fail(f.conn, "the back-end is gone and the used index cannot be read");
        CHECK(!f.lost); /* reported from the loop */
        LOOP_UNTIL(f.base, f.lost);
        CHECK(strcmp(f.reason, "the back-end is gone and the used index cannot be read") == 0);
        CHECK_EQ(vhub_vmm_conn_reply(f.conn, f.log[0].answer_id, &(struct vhu_vring_state){ 0, 1 }, 8,
                                     NULL, 0), -ENOTCONN);
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/*
 * A restart of the daemon carries the session only while the connection is
 * at rest; the next process's connection on the same socket resumes it with
 * what the VMM acked (docs/restart.md, "Front-door devices").
 */
static void test_carry(void) {
        int base_fds = vhub_count_open_fds();
        const uint64_t acked = PF(MQ) | PF(REPLY_ACK) | PF(CONFIG);
        struct vhu_vring_state st = { 0, 64 };
        uint8_t raw[VHU_HEADER_SIZE + sizeof(st)];
        struct vhu_header h = { VHU_REQ_SET_VRING_NUM, PLAIN, sizeof(st) };
        struct face f;
        int fd;

        face_setup(&f, NULL);
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, acked));
        CHECK(vhub_vmm_conn_at_rest(f.conn));
        /* a request the face has not answered: not at rest */
        f.defer = true;
        SEND_SEEN(&f, vmm_send(f.vmm, VHU_REQ_GET_FEATURES, PLAIN, NULL, 0, NULL, 0));
        CHECK(!vhub_vmm_conn_at_rest(f.conn));
        CHECK_EQ(vhub_vmm_conn_reply_u64(f.conn, f.log[1].answer_id, BLK_FEATURES), 0);
        CHECK(vhub_vmm_conn_at_rest(f.conn));
        CHECK_EQ(expect_u64(&f, VHU_REQ_GET_FEATURES), BLK_FEATURES);
        /* a message half-read: not at rest until it is whole */
        memcpy(raw, &h, sizeof(h));
        memcpy(raw + VHU_HEADER_SIZE, &st, sizeof(st));
        vmm_send_raw(f.vmm, raw, VHU_HEADER_SIZE + 2, NULL, 0);
        test_loop_for(f.base, 20);
        CHECK_EQ(f.n, 2);
        CHECK(!vhub_vmm_conn_at_rest(f.conn));
        SEND_SEEN(&f, vmm_send_raw(f.vmm, raw + VHU_HEADER_SIZE + 2, sizeof(raw) - VHU_HEADER_SIZE - 2, NULL, 0));
        CHECK_EQ(f.log[2].request, VHU_REQ_SET_VRING_NUM);
        CHECK(vhub_vmm_conn_at_rest(f.conn));
        /* the next process: a new connection on the same socket */
        vhub_vmm_conn_pause(f.conn, true);
        vmm_send_state(f.vmm, VHU_REQ_SET_VRING_NUM, NEED, 1, 32);      /* waits in the socket */
        fd = fcntl(vhub_vmm_conn_fd(f.conn), F_DUPFD_CLOEXEC, 3);
        CHECK(fd >= 0);
        f.conn = vhub_vmm_conn_free(f.conn);
        CHECK_EQ(vhub_vmm_conn_new(f.base, fd, NULL, &face_ops, &f, &f.conn), 0);
        vhub_vmm_conn_offer_protocol_features(f.conn, acked & ~PF(CONFIG));
        CHECK_EQ(vhub_vmm_conn_resume(f.conn, acked), -EPROTO);          /* beyond the offer */
        vhub_vmm_conn_offer_protocol_features(f.conn, OFFER);
        CHECK_EQ(vhub_vmm_conn_resume(f.conn, PF(INBAND_NOTIFICATIONS)), -EPROTO); /* without REPLY_ACK */
        CHECK_EQ(vhub_vmm_conn_protocol_features(f.conn), 0);
        CHECK_EQ(vhub_vmm_conn_resume(f.conn, acked), 0);
        CHECK_EQ(vhub_vmm_conn_protocol_features(f.conn), acked);
        /* the request that waited is read whole, under the acked set: an ack is due */
        LOOP_UNTIL(f.base, f.n > 3 || f.lost);
        CHECK(!f.lost);
        CHECK_EQ(f.log[3].request, VHU_REQ_SET_VRING_NUM);
        CHECK_EQ(f.log[3].kind, VHUB_VMM_ANSWER_ACK);
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, f.log[3].answer_id, 0), 0);
        CHECK_EQ(expect_u64(&f, VHU_REQ_SET_VRING_NUM), 0);
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/*
 * A crash may carry a session busy with requests (docs/restart.md, "A crash
 * with VMM requests in flight"): the connection is quiet with exactly those
 * answers owed, and the next process handles each again as if just read --
 * an answer id of its own, one answer to the VMM.
 */
static void test_carry_busy(void) {
        int base_fds = vhub_count_open_fds();
        const uint64_t acked = PF(MQ) | PF(REPLY_ACK) | PF(CONFIG);
        struct vhu_msg redo, r;
        struct face f;
        int fd;

        face_setup(&f, NULL);
        SEND_SEEN(&f, vmm_send_u64(f.vmm, VHU_REQ_SET_PROTOCOL_FEATURES, PLAIN, acked));
        f.defer = true;
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, PLAIN, 0, 0));   /* nothing owed */
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_GET_VRING_BASE, PLAIN, 0, 0));
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, NEED, 1, 0));    /* an ack owed */
        CHECK(vhub_vmm_conn_quiet(f.conn, 2));
        CHECK(!vhub_vmm_conn_quiet(f.conn, 1));
        CHECK(!vhub_vmm_conn_at_rest(f.conn));
        /* an answer given behind one not given yet: held, not quiet any more */
        CHECK_EQ(vhub_vmm_conn_ack(f.conn, f.log[3].answer_id, 0), 0);
        CHECK(!vhub_vmm_conn_quiet(f.conn, 2));
        CHECK(!vhub_vmm_conn_quiet(f.conn, 1));
        /* the next process: the same socket, GET_VRING_BASE carried and handled again */
        fd = fcntl(vhub_vmm_conn_fd(f.conn), F_DUPFD_CLOEXEC, 3);
        CHECK(fd >= 0);
        f.conn = vhub_vmm_conn_free(f.conn);
        CHECK_EQ(vhub_vmm_conn_new(f.base, fd, NULL, &face_ops, &f, &f.conn), 0);
        vhub_vmm_conn_offer_protocol_features(f.conn, OFFER);
        CHECK_EQ(vhub_vmm_conn_resume(f.conn, acked), 0);
        vhu_msg_init(&redo);
        redo.hdr = (struct vhu_header){ VHU_REQ_GET_VRING_BASE, PLAIN, sizeof(redo.payload.state) };
        redo.payload.state = (struct vhu_vring_state){ 0, 0 };
        f.defer = false;
        vhub_vmm_conn_redo(f.conn, &redo);
        CHECK_EQ(f.n, 5);
        CHECK_EQ(f.log[4].request, VHU_REQ_GET_VRING_BASE);
        CHECK_EQ(f.log[4].kind, VHUB_VMM_ANSWER_REPLY);
        expect_answer(&f, VHU_REQ_GET_VRING_BASE, &r);
        CHECK_EQ(r.payload.state.num, 100);
        CHECK(vhub_vmm_conn_at_rest(f.conn));
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/*
 * The face hears before bytes are taken: once per wake-up before the first
 * message, and again before each later message the same wake-up reads
 * (handling the one before may have written a snapshot that carries the
 * session) -- not when nothing more waits.
 */
static void test_before_read(void) {
        int base_fds = vhub_count_open_fds();
        struct face f;

        face_setup(&f, NULL);
        f.defer = true;
        /* two messages in the socket before the loop runs: one wake-up */
        vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, PLAIN, 0, 1);
        vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, PLAIN, 1, 1);
        LOOP_UNTIL(f.base, f.n == 2 || f.lost);
        CHECK(!f.lost);
        CHECK_EQ(f.before_read, 2);
        CHECK_EQ(f.seen_at[0], 0);
        CHECK_EQ(f.seen_at[1], 1);       /* after the first was handled */
        /* the next message, in a wake-up of its own: heard once more */
        SEND_SEEN(&f, vmm_send_state(f.vmm, VHU_REQ_SET_VRING_ENABLE, PLAIN, 0, 0));
        CHECK_EQ(f.before_read, 3);
        CHECK_EQ(f.seen_at[2], 2);
        face_teardown(&f);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

int main(void) {
        test_qemu_handshake();
        test_reply_ack();
        test_answers_in_order();
        test_back_pressure();
        test_hostile();
        test_vmm_never_reads();
        test_answer_deadline();
        test_free_inside_callback();
        test_fail();
        test_carry();
        test_carry_busy();
        test_before_read();
        printf("vmm-conn: all passed\n");
        return 0;
}
