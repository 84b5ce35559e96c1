/* SPDX-License-Identifier: MIT */
/*
 * The VMM's back-end channel (frontdoor/vhub-vmm-channel.c): vhubd sends
 * back-end requests to a fake VMM that reads them as QEMU's backend_read()
 * does and answers NEED_REPLY; replies come back validated; every awaited
 * request gets exactly one answer -- the reply, or NULL when the VMM is
 * silent past the deadline, answers wrongly, or closes the channel; only
 * what the VMM negotiated is ever sent.  fd counts back to the start.
 *
 *   test-vmm-channel
 */
#include <stdlib.h>

#include "vhub-vmm-channel.h"
#include "vmm-test.h"

#define PF(x) VHU_PF_BIT(VHU_PF_##x)
#define QEMU_PF (PF(MQ) | PF(REPLY_ACK) | PF(BACKEND_REQ) | PF(BACKEND_SEND_FD) | \
                 PF(HOST_NOTIFIER) | PF(CONFIG))
#define NEED (VHU_VERSION | VHU_FLAG_NEED_REPLY)
#define MAX_ANSWERS 64

struct answer {
        uint32_t tag, request;
        bool got_reply;
        uint64_t status;
};

struct side {
        struct event_base *base;
        struct vhub_vmm_channel *ch;
        int vmm;
        unsigned n;
        struct answer answers[MAX_ANSWERS];
        bool lost, lost_timeout;
        char reason[200];
        bool free_in_answer;
};

static void on_answer(void *userdata, uint32_t tag, uint32_t request, struct vhu_msg *reply) {
        struct side *s = userdata;

        CHECK(!s->lost); /* every answer comes before the loss */
        CHECK(s->n < MAX_ANSWERS);
        s->answers[s->n++] = (struct answer){
                .tag = tag,
                .request = request,
                .got_reply = reply != NULL,
                .status = reply ? reply->payload.u64 : 0,
        };
        if (s->free_in_answer)
                s->ch = vhub_vmm_channel_free(s->ch);
}

static void on_lost(void *userdata, bool timeout, const char *reason) {
        struct side *s = userdata;

        CHECK(!s->lost);
        s->lost = true;
        s->lost_timeout = timeout;
        snprintf(s->reason, sizeof(s->reason), "%s", reason);
}

static const struct vhub_vmm_channel_ops ops = { .on_answer = on_answer, .on_lost = on_lost };

static void side_setup(struct side *s, uint64_t pf, unsigned timeout_ms, unsigned max_pending) {
        int sv[2];

        memset(s, 0, sizeof(*s));
        s->base = event_base_new();
        CHECK(s->base);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        s->vmm = sv[1];
        CHECK_EQ(vhub_vmm_channel_new(s->base, sv[0], timeout_ms, max_pending, &ops, s, &s->ch), 0);
        vhub_vmm_channel_set_protocol_features(s->ch, pf);
}

static void side_teardown(struct side *s) {
        vhub_vmm_channel_free(s->ch);
        close(s->vmm);
        event_base_free(s->base);
}

static int send_request(struct side *s, uint32_t request, bool need_reply, const void *payload,
                        uint32_t size, const int *fds, unsigned n_fds, uint32_t tag) {
        struct vhu_msg m;

        vhu_msg_init(&m);
        m.hdr = (struct vhu_header){ request, VHU_VERSION | (need_reply ? VHU_FLAG_NEED_REPLY : 0), size };
        if (size)
                memcpy(m.payload.raw, payload, size);
        for (unsigned i = 0; i < n_fds; i++)
                m.fds[i] = fds[i];
        m.n_fds = n_fds;
        return vhub_vmm_channel_send(s->ch, &m, tag);
}

/* The VMM reads a back-end request the way a front-end validates one. */
static void vmm_read_request(struct side *s, uint64_t pf, struct vhu_msg *m) {
        const char *why = NULL;

        vmm_recv(s->vmm, m);
        CHECK_EQ(vhu_validate_request(VHU_DIR_BACKEND, pf, m, &why), 0);
}

static void vmm_ack(struct side *s, const struct vhu_msg *req, uint64_t status) {
        struct vhu_msg r;

        CHECK_EQ(vhu_msg_build_reply_u64(&r, req, status), 0);
        CHECK_EQ(vhu_send_msg_blocking(s->vmm, &r, TEST_WAIT_MS), 0);
}

static void test_relay(void) {
        struct vhu_vring_area area = { .u64 = 1, .size = 4096, .offset = 0 };
        int base_fds = vhub_count_open_fds();
        struct vhu_msg m;
        struct side s;
        int fd;

        side_setup(&s, QEMU_PF, 5000, 8);
        /* CONFIG_CHANGE_MSG, acked */
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 11), 1);
        CHECK_EQ(vhub_vmm_channel_awaiting(s.ch), 1);
        vmm_read_request(&s, QEMU_PF, &m);
        CHECK_EQ(m.hdr.request, VHU_BREQ_CONFIG_CHANGE_MSG);
        CHECK_EQ(m.hdr.flags, NEED);
        vmm_ack(&s, &m, 0);
        LOOP_UNTIL(s.base, s.n == 1);
        CHECK(s.answers[0].got_reply && s.answers[0].tag == 11 && s.answers[0].status == 0);

        /* a host notifier with its fd: the VMM gets the fd, refuses (1) */
        fd = test_memfd(4096);
        CHECK_EQ(send_request(&s, VHU_BREQ_VRING_HOST_NOTIFIER_MSG, true, &area, sizeof(area), &fd, 1, 12), 1);
        close(fd);
        vmm_read_request(&s, QEMU_PF, &m);
        CHECK_EQ(m.n_fds, 1);
        CHECK(strcmp(test_fd_kind(m.fds[0]), "memfd") == 0);
        vmm_ack(&s, &m, 1);
        vhu_msg_clear(&m);
        LOOP_UNTIL(s.base, s.n == 2);
        CHECK(s.answers[1].got_reply && s.answers[1].tag == 12 && s.answers[1].status == 1);

        /* without NEED_REPLY nothing is awaited */
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, false, NULL, 0, NULL, 0, 13), 0);
        vmm_read_request(&s, QEMU_PF, &m);
        CHECK_EQ(vhub_vmm_channel_awaiting(s.ch), 0);

        /* two in flight: answered in order */
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 14), 1);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 15), 1);
        vmm_read_request(&s, QEMU_PF, &m);
        vmm_ack(&s, &m, 0);
        vmm_read_request(&s, QEMU_PF, &m);
        vmm_ack(&s, &m, 0);
        LOOP_UNTIL(s.base, s.n == 4);
        CHECK(s.answers[2].tag == 14 && s.answers[3].tag == 15);
        test_loop_for(s.base, 10);
        CHECK(!s.lost);
        side_teardown(&s);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* Only what the VMM negotiated goes out. */
static void test_refused_requests(void) {
        struct vhu_vring_area area = { .u64 = 0, .size = 4096 };
        int base_fds = vhub_count_open_fds();
        struct side s;
        int fd = test_memfd(4096);

        side_setup(&s, PF(BACKEND_REQ), 5000, 2);
        /* NEED_REPLY without REPLY_ACK: QEMU would answer anyway */
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 1), -EINVAL);
        /* an fd without BACKEND_SEND_FD, a host notifier without HOST_NOTIFIER */
        CHECK_EQ(send_request(&s, VHU_BREQ_VRING_HOST_NOTIFIER_MSG, false, &area, sizeof(area), &fd, 1, 2), -EINVAL);
        vhub_vmm_channel_set_protocol_features(s.ch, PF(BACKEND_REQ) | PF(HOST_NOTIFIER));
        CHECK_EQ(send_request(&s, VHU_BREQ_VRING_HOST_NOTIFIER_MSG, false, &area, sizeof(area), &fd, 1, 2), -EINVAL);
        /* a malformed one */
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, false, "ab", 2, NULL, 0, 3), -EINVAL);
        CHECK_EQ(send_request(&s, 77, false, NULL, 0, NULL, 0, 4), -EINVAL);
        CHECK(vmm_nothing_to_read(s.vmm));
        /* past max_pending */
        vhub_vmm_channel_set_protocol_features(s.ch, QEMU_PF);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 5), 1);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 6), 1);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 7), -ENOBUFS);
        close(fd);
        side_teardown(&s); /* awaited replies dropped without callbacks */
        CHECK_EQ(s.n, 0);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* The VMM never answers: NULL for each awaited request, then the loss. */
static void test_silent_vmm(void) {
        int base_fds = vhub_count_open_fds();
        struct side s;

        side_setup(&s, QEMU_PF, 50, 8);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 21), 1);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 22), 1);
        LOOP_UNTIL(s.base, s.lost);
        CHECK_EQ(s.n, 2);
        CHECK(!s.answers[0].got_reply && s.answers[0].tag == 21);
        CHECK(!s.answers[1].got_reply && s.answers[1].tag == 22);
        CHECK(s.lost_timeout);
        CHECK(strstr(s.reason, "did not answer CONFIG_CHANGE_MSG on its back-end channel within 50 ms"));
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 23), -ENOTCONN);
        side_teardown(&s);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* A wrong reply, an unsolicited message, a closed channel. */
static void test_broken_vmm(void) {
        int base_fds = vhub_count_open_fds();
        struct vhu_msg m, r;
        struct side s;

        /* a reply with the wrong request number */
        side_setup(&s, QEMU_PF, 5000, 8);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 31), 1);
        vmm_read_request(&s, QEMU_PF, &m);
        m.hdr.request = VHU_BREQ_IOTLB_MSG;
        CHECK_EQ(vhu_msg_build_reply_u64(&r, &m, 0), 0);
        CHECK_EQ(vhu_send_msg_blocking(s.vmm, &r, TEST_WAIT_MS), 0);
        LOOP_UNTIL(s.base, s.lost);
        CHECK(s.n == 1 && !s.answers[0].got_reply && !s.lost_timeout);
        CHECK(strstr(s.reason, "bad reply to CONFIG_CHANGE_MSG"));
        side_teardown(&s);

        /* a reply nobody waits for */
        side_setup(&s, QEMU_PF, 5000, 8);
        vhu_msg_init(&m);
        m.hdr.request = VHU_BREQ_CONFIG_CHANGE_MSG;
        CHECK_EQ(vhu_msg_build_reply_u64(&r, &m, 0), 0);
        CHECK_EQ(vhu_send_msg_blocking(s.vmm, &r, TEST_WAIT_MS), 0);
        LOOP_UNTIL(s.base, s.lost);
        CHECK(strstr(s.reason, "unsolicited"));
        side_teardown(&s);

        /* the VMM closes its end with a request outstanding; freeing from
         * inside on_answer is safe */
        side_setup(&s, QEMU_PF, 5000, 8);
        s.free_in_answer = true;
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 41), 1);
        CHECK_EQ(send_request(&s, VHU_BREQ_CONFIG_CHANGE_MSG, true, NULL, 0, NULL, 0, 42), 1);
        shutdown(s.vmm, SHUT_WR);
        LOOP_UNTIL(s.base, s.ch == NULL);
        test_loop_for(s.base, 10);
        CHECK_EQ(s.n, 1); /* freed inside the first: no more callbacks */
        CHECK(!s.lost);
        side_teardown(&s);
        CHECK_EQ(vhub_count_open_fds(), base_fds);
}

/* What SET_BACKEND_REQ_FD brought must be a stream socket. */
static void test_not_a_channel(void) {
        struct event_base *base = event_base_new();
        int base_fds = vhub_count_open_fds();
        struct vhub_vmm_channel *ch = NULL;
        int sv[2];

        CHECK_EQ(vhub_vmm_channel_new(base, test_memfd(4096), 100, 4, &ops, NULL, &ch), -ENOTSOCK);
        CHECK_EQ(vhub_vmm_channel_new(base, test_eventfd(), 100, 4, &ops, NULL, &ch), -ENOTSOCK);
        CHECK(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv) == 0);
        close(sv[1]);
        CHECK_EQ(vhub_vmm_channel_new(base, sv[0], 100, 4, &ops, NULL, &ch), -ENOTSOCK);
        CHECK(ch == NULL);
        CHECK_EQ(vhub_count_open_fds(), base_fds); /* taken and closed in every case */
        event_base_free(base);
}

int main(void) {
        test_not_a_channel();
        test_relay();
        test_refused_requests();
        test_silent_vmm();
        test_broken_vmm();
        printf("vmm-channel: all passed\n");
        return 0;
}
