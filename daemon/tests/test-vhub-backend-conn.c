/* SPDX-License-Identifier: MIT */
/*
 * A back-end connection (daemon/vhub-backend-conn.c) whose peer closes
 * while requests are still going out: the replies the peer sent before it
 * closed are delivered, in order, and the loss names the request it left
 * unanswered -- not whichever was the oldest unread when a later write
 * found the socket closed (a stage sends several requests at once).
 *
 *   test-vhub-backend-conn
 */
#include <event2/event.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-backend-conn.h"
#include "vhub-check.h"
#include "vhu-socket.h"

struct seen {
        unsigned replies;
        uint32_t reply_request[8];
        bool lost;
        bool lost_timeout;
        uint32_t lost_request;
        char reason[200];
};

static void on_reply(void *userdata, uint32_t request, uint32_t tag, struct vhu_msg *reply) {
        struct seen *s = userdata;

        if (s->replies < 8)
                s->reply_request[s->replies] = request;
        s->replies++;
}

static void on_lost(void *userdata, bool timeout, uint32_t request, const char *reason) {
        struct seen *s = userdata;

        s->lost = true;
        s->lost_timeout = timeout;
        s->lost_request = request;
        snprintf(s->reason, sizeof(s->reason), "%s", reason);
}

static const struct vhub_bconn_ops ops = { .on_reply = on_reply, .on_lost = on_lost };

/* The peer reads n requests (blocking). */
static void peer_read(int fd, unsigned n) {
        for (unsigned i = 0; i < n; i++) {
                struct vhu_msg m;

                vhu_msg_init(&m);
                CHECK_EQ(vhu_recv_msg_blocking(fd, &m, 2000), 1);
                vhu_msg_clear(&m);
        }
}

static void peer_ack(int fd, uint32_t request) {
        struct vhu_msg req, r;

        vhu_msg_init(&req);
        req.hdr.request = request;
        req.hdr.flags = VHU_VERSION | VHU_FLAG_NEED_REPLY;
        CHECK(vhu_msg_build_reply_u64(&r, &req, 0) == 0);
        CHECK_EQ(vhu_send_msg_blocking(fd, &r, 2000), 0);
}

static void test_peer_closes_mid_burst(void) {
        struct event_base *base = event_base_new();
        struct vhub_bconn *c = NULL;
        struct seen s = { 0 };
        struct vhu_msg m;
        int sv[2];

        CHECK(base);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        CHECK(vhub_bconn_new(base, sv[0], 5000, 64, &ops, &s, &c) == 0);
        vhub_bconn_set_protocol_features(c, VHU_PF_BIT(VHU_PF_REPLY_ACK));

        /* two acked requests out; the peer answers the first and closes */
        vhu_msg_build_none(&m, VHU_REQ_SET_OWNER, true);
        CHECK_EQ(vhub_bconn_send(c, &m, 1), 1);
        vhu_msg_build_u64(&m, VHU_REQ_SET_FEATURES, true, 1ull << 32);
        CHECK_EQ(vhub_bconn_send(c, &m, 2), 1);
        peer_read(sv[1], 2);
        peer_ack(sv[1], VHU_REQ_SET_OWNER);
        close(sv[1]);

        /* the same burst goes on before the loop runs: this write finds
         * the peer gone; the request is awaited like the others */
        vhu_msg_build_state(&m, VHU_REQ_SET_VRING_ENABLE, true, 0, 1);
        CHECK_EQ(vhub_bconn_send(c, &m, 3), 1);
        CHECK(!s.lost);

        for (int i = 0; i < 100 && !s.lost; i++)
                event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        CHECK(s.lost);
        /* the answer the peer gave before it closed was delivered */
        CHECK_EQ(s.replies, 1);
        CHECK_EQ(s.reply_request[0], VHU_REQ_SET_OWNER);
        /* and the loss names the first request left unanswered */
        CHECK_EQ(s.lost_request, VHU_REQ_SET_FEATURES);
        CHECK(!s.lost_timeout);
        CHECK(strstr(s.reason, "closed"));
        CHECK(vhub_bconn_is_lost(c));
        /* nothing is sent once lost */
        CHECK_EQ(vhub_bconn_send(c, &m, 4), -ENOTCONN);

        vhub_bconn_free(c);
        event_base_free(base);
}

int main(void) {
        int fds_before = vhub_count_open_fds();

        test_peer_closes_mid_burst();
        CHECK_EQ(vhub_count_open_fds(), fds_before);
        printf("vhub-backend-conn: ok\n");
        return 0;
}
