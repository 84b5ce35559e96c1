/* SPDX-License-Identifier: MIT */
/*
 * protocol/ socket tests over real socketpair(AF_UNIX, SOCK_STREAM): fds
 * stay with their message, partial reads and writes, EPIPE instead of
 * SIGPIPE, truncated or misplaced fds, EOF, and no fd leaks on any path.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vhu-socket.h"
#include "test-util.h"
#include "vhu-scm.h"

static int count_open_fds(void) {
        struct dirent *de;
        DIR *d;
        int n = 0;

        d = opendir("/proc/self/fd");
        if (!d)
                return -1;
        while ((de = readdir(d)))
                if (de->d_name[0] != '.')
                        n++;
        closedir(d);
        return n;
}

static int make_pair(int sv[2]) {
        return socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
}

static int make_memfd(void) {
        return memfd_create("vhu-test", MFD_CLOEXEC);
}

static bool same_file(int a, int b) {
        struct stat sa, sb;

        if (fstat(a, &sa) < 0 || fstat(b, &sb) < 0)
                return false;
        return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

static bool is_cloexec(int fd) {
        int flags = fcntl(fd, F_GETFD);

        return flags >= 0 && (flags & FD_CLOEXEC);
}

/* Send raw bytes with n_fds fds attached (to the first of them). */
static ssize_t send_raw(int sock, const void *buf, size_t len, const int *fds, unsigned n_fds) {
        VHU_SCM_BUF(control, 16);
        struct iovec iov = { .iov_base = (void *) buf, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };

        vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds, n_fds);
        return sendmsg(sock, &mh, MSG_NOSIGNAL);
}

/* Two fd-carrying messages back to back: each fd arrives with its own message. */
static void test_back_to_back_fds(void) {
        struct vhu_reader reader;
        struct vhu_writer writer;
        struct vhu_msg a, b, got;
        int sv[2], fa, fb, table_fds[VHU_MAX_FDS];
        struct vhu_mem_region regions[VHU_MAX_FDS] = { { 0 } };
        int before = count_open_fds();

        test_set_context("back-to-back fds");
        CHECK_EQ(make_pair(sv), 0);
        fa = make_memfd();
        fb = make_memfd();
        for (unsigned i = 0; i < VHU_MAX_FDS; i++) {
                table_fds[i] = make_memfd();
                regions[i].gpa = (uint64_t) i << 30;
                regions[i].size = 1 << 20;
        }

        vhu_msg_init(&a);
        vhu_msg_init(&b);
        CHECK_EQ(vhu_msg_build_vring_fd(&a, VHU_REQ_SET_VRING_CALL, false, 0, fa), 0);
        CHECK_EQ(vhu_msg_build_vring_fd(&b, VHU_REQ_SET_VRING_KICK, false, 1, fb), 0);

        vhu_writer_init(&writer);
        CHECK_EQ(vhu_writer_queue(&writer, &a), 0);
        CHECK_EQ(vhu_writer_queue(&writer, &b), 0);
        CHECK_EQ(vhu_msg_build_mem_table(&a, false, regions, table_fds, VHU_MAX_FDS), 0);
        CHECK_EQ(vhu_writer_queue(&writer, &a), 0);
        CHECK_EQ(vhu_msg_build_mem_table(&b, false, regions, table_fds, 3), 0);
        CHECK_EQ(vhu_writer_queue(&writer, &b), 0);
        CHECK_EQ(writer.n_items, 4);
        CHECK_EQ(writer.n_fds, 1 + 1 + VHU_MAX_FDS + 3);  /* the dups it holds */
        CHECK(vhu_writer_pending(&writer));
        /* The writer dup'd the fds: the caller may close its own at once. */
        close(fa);
        close(fb);
        fa = fb = -1;
        CHECK_EQ(vhu_writer_flush(&writer, sv[0]), 0);
        CHECK(!vhu_writer_pending(&writer));
        CHECK_EQ(writer.n_bytes, 0);
        CHECK_EQ(writer.n_fds, 0);

        vhu_reader_init(&reader);
        vhu_msg_init(&got);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK_EQ(got.hdr.request, VHU_REQ_SET_VRING_CALL);
        CHECK_EQ(got.n_fds, 1);
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &got, NULL), 0);
        CHECK(is_cloexec(got.fds[0]));
        fa = vhu_msg_take_fd(&got, 0);
        vhu_msg_clear(&got);

        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK_EQ(got.hdr.request, VHU_REQ_SET_VRING_KICK);
        CHECK_EQ(got.payload.u64, 1);
        CHECK_EQ(got.n_fds, 1);
        fb = vhu_msg_take_fd(&got, 0);
        CHECK(!same_file(fa, fb));
        vhu_msg_clear(&got);

        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK_EQ(got.hdr.request, VHU_REQ_SET_MEM_TABLE);
        CHECK_EQ(got.n_fds, VHU_MAX_FDS);
        for (unsigned i = 0; i < got.n_fds; i++)
                CHECK(same_file(got.fds[i], table_fds[i]));
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &got, NULL), 0);
        vhu_msg_clear(&got);

        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK_EQ(got.n_fds, 3);
        for (unsigned i = 0; i < got.n_fds; i++)
                CHECK(same_file(got.fds[i], table_fds[i]));
        vhu_msg_clear(&got);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);

        /* The blocking helpers, same thing. */
        CHECK_EQ(vhu_msg_build_vring_fd(&a, VHU_REQ_SET_VRING_ERR, true, 7, table_fds[5]), 0);
        CHECK_EQ(vhu_msg_build_vring_fd(&b, VHU_REQ_SET_VRING_ERR, true, 8, table_fds[6]), 0);
        CHECK_EQ(vhu_send_msg_blocking(sv[0], &a, 1000), 0);
        CHECK_EQ(vhu_send_msg_blocking(sv[0], &b, 1000), 0);
        CHECK_EQ(vhu_recv_msg_blocking(sv[1], &got, 1000), 1);
        CHECK_EQ(got.payload.u64, 7);
        CHECK(got.n_fds == 1 && same_file(got.fds[0], table_fds[5]));
        vhu_msg_clear(&got);
        CHECK_EQ(vhu_recv_msg_blocking(sv[1], &got, 1000), 1);
        CHECK_EQ(got.payload.u64, 8);
        CHECK(got.n_fds == 1 && same_file(got.fds[0], table_fds[6]));
        vhu_msg_clear(&got);

        vhu_msg_forget_fds(&a);
        vhu_msg_forget_fds(&b);
        vhu_reader_reset(&reader);
        vhu_writer_clear(&writer);
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                close(table_fds[i]);
        close(fa);
        close(fb);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

/* A message written one byte at a time reassembles, fd included. */
/* An owner's count of the fds a reader or writer holds, kept by its hook
 * alone: after every call it must equal the real number (no change went
 * unreported). */
struct fds_watch {
        const unsigned *n_fds;
        unsigned seen;
        unsigned calls;
};

static void fds_watch_hook(void *userdata) {
        struct fds_watch *w = userdata;

        w->seen = *w->n_fds;
        w->calls++;
}

static void test_partial_reads(void) {
        uint8_t wire[VHU_HEADER_SIZE + 64];
        struct vhu_vring_addr addr = { .index = 1, .desc = 0x1000, .used = 0x2000, .avail = 0x3000 };
        struct vhu_reader reader;
        struct vhu_msg m, got;
        int sv[2], fd;
        size_t len;
        int before = count_open_fds();
        struct fds_watch watch = { 0 };

        test_set_context("partial reads");
        CHECK_EQ(make_pair(sv), 0);
        fd = make_memfd();
        vhu_reader_init(&reader);
        watch.n_fds = &reader.n_fds;
        vhu_reader_set_fds_hook(&reader, fds_watch_hook, &watch);
        vhu_msg_init(&got);
        vhu_msg_init(&m);

        /* Without fds. */
        CHECK_EQ(vhu_msg_build_vring_addr(&m, true, &addr), 0);
        len = vhu_msg_encode(&m, wire, sizeof(wire));
        CHECK_EQ(len, VHU_HEADER_SIZE + sizeof(addr));
        for (size_t i = 0; i < len; i++) {
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
                CHECK_EQ(send_raw(sv[0], wire + i, 1, NULL, 0), 1);
        }
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK(memcmp(&got.hdr, &m.hdr, sizeof(m.hdr)) == 0);
        CHECK(memcmp(&got.payload.addr, &addr, sizeof(addr)) == 0);
        CHECK_EQ(got.n_fds, 0);
        vhu_msg_clear(&got);

        /* With an fd on the first byte. */
        CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_KICK, false, 2, fd), 0);
        len = vhu_msg_encode(&m, wire, sizeof(wire));
        for (size_t i = 0; i < len; i++) {
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
                CHECK_EQ(watch.seen, reader.n_fds);
                CHECK_EQ(send_raw(sv[0], wire + i, 1, &fd, i == 0 ? 1 : 0), 1);
        }
        CHECK_EQ(watch.calls, 1);       /* the fd arrived with the first byte */
        CHECK_EQ(watch.seen, 1);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK_EQ(watch.seen, 0);        /* handed over with the message */
        CHECK_EQ(watch.calls, 2);
        CHECK_EQ(got.payload.u64, 2);
        CHECK(got.n_fds == 1 && same_file(got.fds[0], fd));
        vhu_msg_clear(&got);

        /* A reset with an fd held: closed, and reported. */
        CHECK_EQ(send_raw(sv[0], wire, 1, &fd, 1), 1);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
        CHECK_EQ(watch.seen, 1);
        vhu_reader_reset(&reader);
        CHECK_EQ(watch.seen, 0);
        CHECK_EQ(watch.calls, 4);

        /* Header and payload split unevenly, two messages in one write. */
        {
                uint8_t two[2 * (VHU_HEADER_SIZE + 8)];

                CHECK_EQ(vhu_msg_build_u64(&m, VHU_REQ_SET_FEATURES, false, 0x1234), 0);
                vhu_msg_encode(&m, two, sizeof(two));
                CHECK_EQ(vhu_msg_build_state(&m, VHU_REQ_SET_VRING_NUM, false, 0, 256), 0);
                vhu_msg_encode(&m, two + VHU_HEADER_SIZE + 8, sizeof(two) - VHU_HEADER_SIZE - 8);
                CHECK_EQ(send_raw(sv[0], two, 5, NULL, 0), 5);
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
                CHECK_EQ(send_raw(sv[0], two + 5, 10, NULL, 0), 10);
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
                CHECK_EQ(send_raw(sv[0], two + 15, sizeof(two) - 15, NULL, 0), (ssize_t) sizeof(two) - 15);
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
                CHECK_EQ(got.payload.u64, 0x1234);
                vhu_msg_clear(&got);
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
                CHECK_EQ(got.payload.state.num, 256);
                vhu_msg_clear(&got);
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
        }

        vhu_msg_forget_fds(&m);
        close(fd);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

/* A small send buffer and a long queue: flush resumes mid-message, fds go once. */
/*
 * Even messages: 4000-byte crypto sessions numbered in their first byte,
 * with an fd attached (the writer and reader move bytes and fds; only the
 * validator would object) so that messages split by the kernel carry fds
 * too; odd ones: SET_VRING_CALL with an fd.  fds[i] is message i's.
 */
static void queue_numbered_messages(struct vhu_writer *writer, const struct fds_watch *watch, int *fds,
                                    unsigned n) {
        static uint8_t payload[VHU_MAX_PAYLOAD];
        struct vhu_msg m;

        vhu_msg_init(&m);
        for (unsigned i = 0; i < n; i++) {
                fds[i] = -1;
                if (i % 2 == 0) {
                        memset(payload, (int) i, 4000);
                        CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_CREATE_CRYPTO_SESSION,
                                               false, payload, 4000, NULL, 0), 0);
                        fds[i] = make_memfd();
                        m.fds[0] = fds[i];
                        m.n_fds = 1;
                } else {
                        fds[i] = make_memfd();
                        CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_CALL, false, i, fds[i]), 0);
                }
                CHECK_EQ(vhu_writer_queue(writer, &m), 0);
                CHECK_EQ(watch->seen, writer->n_fds);
        }
        vhu_msg_forget_fds(&m);
}

/* Message i of queue_numbered_messages(), as the reader got it. */
static void check_numbered_message(const struct vhu_msg *got, unsigned i, const int *fds) {
        if (i % 2 == 0) {
                CHECK_EQ(got->hdr.request, VHU_REQ_CREATE_CRYPTO_SESSION);
                CHECK_EQ(got->hdr.size, 4000);
                CHECK_EQ(got->payload.raw[0], i);
                CHECK_EQ(got->payload.raw[3999], i);
        } else {
                CHECK_EQ(got->hdr.request, VHU_REQ_SET_VRING_CALL);
                CHECK_EQ(got->payload.u64, i);
        }
        CHECK(got->n_fds == 1 && same_file(got->fds[0], fds[i]));
}

/* Clearing a writer with queued fds closes its dups; the hook stays across a clear. */
static void check_clear_closes_dups(struct vhu_writer *writer, const struct fds_watch *watch, const int *fds,
                                    unsigned n) {
        struct vhu_msg m;

        vhu_msg_init(&m);
        for (unsigned i = 1; i < n; i += 2) {
                CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_CALL, false, i, fds[i]), 0);
                CHECK_EQ(vhu_writer_queue(writer, &m), 0);
        }
        vhu_msg_forget_fds(&m);
        CHECK_EQ(writer->n_fds, n / 2);
        CHECK_EQ(watch->seen, n / 2);
        vhu_writer_clear(writer);
        CHECK(!vhu_writer_pending(writer));
        CHECK_EQ(writer->n_fds, 0);
        CHECK_EQ(watch->seen, 0);
        CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_CALL, false, 1, fds[1]), 0);
        CHECK_EQ(vhu_writer_queue(writer, &m), 0);
        vhu_msg_forget_fds(&m);
        CHECK_EQ(watch->seen, 1);
        vhu_writer_clear(writer);
        CHECK_EQ(watch->seen, 0);
}

static void test_partial_writes(void) {
        enum { N_MSGS = 64 };
        struct vhu_reader reader;
        struct vhu_writer writer;
        struct vhu_msg got;
        int sv[2], fds[N_MSGS], sndbuf = 1; /* the kernel rounds up to its minimum */
        unsigned received = 0, eagains = 0, mid_message = 0, mid_message_with_fd = 0;
        size_t suffix_bytes[N_MSGS + 1];
        int before = count_open_fds();
        struct fds_watch watch = { 0 };

        test_set_context("partial writes");
        CHECK_EQ(make_pair(sv), 0);
        CHECK_EQ(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)), 0);
        vhu_writer_init(&writer);
        watch.n_fds = &writer.n_fds;
        vhu_writer_set_fds_hook(&writer, fds_watch_hook, &watch);
        vhu_reader_init(&reader);
        vhu_msg_init(&got);

        queue_numbered_messages(&writer, &watch, fds, N_MSGS);
        CHECK_EQ(writer.n_items, N_MSGS);
        CHECK_EQ(writer.n_fds, N_MSGS);
        suffix_bytes[N_MSGS] = 0;
        for (unsigned k = N_MSGS; k-- > 0;)
                suffix_bytes[k] = suffix_bytes[k + 1] + VHU_HEADER_SIZE + (k % 2 == 0 ? 4000 : 8);
        CHECK_EQ(writer.n_bytes, suffix_bytes[0]);

        while (received < N_MSGS) {
                int r = vhu_writer_flush(&writer, sv[0]);

                if (r == -EAGAIN) {
                        eagains++;
                        /* Bytes left that are no suffix of the queue: stopped mid-message. */
                        for (unsigned k = 0; k < N_MSGS; k++)
                                if (writer.n_bytes < suffix_bytes[k] && writer.n_bytes > suffix_bytes[k + 1]) {
                                        mid_message++;
                                        if (fds[k] >= 0)
                                                mid_message_with_fd++;
                                }
                } else {
                        CHECK_EQ(r, 0);
                }
                /* a message whose first byte went out holds no dups any more */
                CHECK(writer.n_fds <= writer.n_items && writer.n_fds + 1 >= writer.n_items);
                CHECK_EQ(watch.seen, writer.n_fds);
                for (;;) {
                        r = vhu_reader_read(&reader, sv[1], &got);
                        if (r != 1)
                                break;
                        check_numbered_message(&got, received, fds);
                        vhu_msg_clear(&got);
                        received++;
                }
                CHECK_EQ(r, -EAGAIN);
                if (r != -EAGAIN)
                        break;
        }
        CHECK_EQ(received, N_MSGS);
        CHECK(eagains > 0);
        CHECK(mid_message > 0);
        CHECK(mid_message_with_fd > 0);
        CHECK(!vhu_writer_pending(&writer));
        CHECK_EQ(writer.n_items, 0);
        CHECK_EQ(writer.n_bytes, 0);
        CHECK_EQ(writer.n_fds, 0);

        check_clear_closes_dups(&writer, &watch, fds, N_MSGS);

        for (unsigned i = 0; i < N_MSGS; i++)
                if (fds[i] >= 0)
                        close(fds[i]);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

/* A dead peer: -EPIPE, and no SIGPIPE (which would kill this test). */
static void test_epipe(void) {
        struct vhu_writer writer;
        struct vhu_msg m;
        int sv[2];

        test_set_context("EPIPE");
        CHECK_EQ(make_pair(sv), 0);
        close(sv[1]);
        vhu_msg_init(&m);
        CHECK_EQ(vhu_msg_build_none(&m, VHU_REQ_GET_FEATURES, false), 0);
        vhu_writer_init(&writer);
        CHECK_EQ(vhu_writer_queue(&writer, &m), 0);
        CHECK_EQ(vhu_writer_flush(&writer, sv[0]), -EPIPE);
        CHECK(vhu_writer_pending(&writer));
        vhu_writer_clear(&writer);
        CHECK_EQ(vhu_send_msg_blocking(sv[0], &m, 1000), -EPIPE);
        close(sv[0]);
}

/* 9+ fds overflow the control buffer: -EPROTO, and every fd is closed. */
static void test_ctrunc(void) {
        struct vhu_header hdr = { .request = VHU_REQ_SET_OWNER, .flags = VHU_VERSION, .size = 0 };
        struct vhu_reader reader;
        struct vhu_msg got;
        int sv[2], fds[12], base;
        int before = count_open_fds();

        test_set_context("MSG_CTRUNC");
        CHECK_EQ(make_pair(sv), 0);
        base = make_memfd();
        for (unsigned n = VHU_MAX_FDS + 1; n <= 12; n += 3) {
                for (unsigned i = 0; i < n; i++)
                        fds[i] = dup(base);
                CHECK_EQ(send_raw(sv[0], &hdr, sizeof(hdr), fds, n), (ssize_t) sizeof(hdr));
                for (unsigned i = 0; i < n; i++)
                        close(fds[i]);

                vhu_reader_init(&reader);
                vhu_msg_init(&got);
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EPROTO);
                CHECK_EQ(got.n_fds, 0);     /* untouched */
                CHECK_EQ(reader.n_fds, 0);
        }
        /* Exactly VHU_MAX_FDS is fine (even though SET_OWNER takes none: the
         * reader moves bytes and fds, the validator judges them). */
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                fds[i] = dup(base);
        CHECK_EQ(send_raw(sv[0], &hdr, sizeof(hdr), fds, VHU_MAX_FDS), (ssize_t) sizeof(hdr));
        for (unsigned i = 0; i < VHU_MAX_FDS; i++)
                close(fds[i]);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK_EQ(got.n_fds, VHU_MAX_FDS);
        CHECK_EQ(vhu_validate_request(VHU_DIR_FRONTEND, 0, &got, NULL), -EPROTO);
        vhu_msg_clear(&got);

        close(base);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

/* fds must ride on a message's first byte. */
static void test_fds_not_on_first_byte(void) {
        uint8_t wire[VHU_HEADER_SIZE + 8];
        struct vhu_reader reader;
        struct vhu_msg m, got;
        int sv[2], fd;
        int before = count_open_fds();

        test_set_context("fds on a non-first byte");
        fd = make_memfd();
        vhu_msg_init(&m);
        vhu_msg_init(&got);
        CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_KICK, false, 0, fd), 0);
        vhu_msg_encode(&m, wire, sizeof(wire));

        /* On the second byte of the header. */
        CHECK_EQ(make_pair(sv), 0);
        vhu_reader_init(&reader);
        CHECK_EQ(send_raw(sv[0], wire, 1, NULL, 0), 1);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
        CHECK_EQ(send_raw(sv[0], wire + 1, sizeof(wire) - 1, &fd, 1), (ssize_t) sizeof(wire) - 1);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EPROTO);
        CHECK_EQ(got.n_fds, 0);
        close(sv[0]);
        close(sv[1]);

        /* On the first byte of the payload. */
        CHECK_EQ(make_pair(sv), 0);
        vhu_reader_init(&reader);
        CHECK_EQ(send_raw(sv[0], wire, VHU_HEADER_SIZE, NULL, 0), VHU_HEADER_SIZE);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
        CHECK_EQ(send_raw(sv[0], wire + VHU_HEADER_SIZE, 8, &fd, 1), 8);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EPROTO);

        /* A first message with an fd on its first byte and a second fd later. */
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(make_pair(sv), 0);
        vhu_reader_init(&reader);
        CHECK_EQ(send_raw(sv[0], wire, 4, &fd, 1), 4);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
        CHECK_EQ(reader.n_fds, 1);
        CHECK_EQ(send_raw(sv[0], wire + 4, sizeof(wire) - 4, &fd, 1), (ssize_t) sizeof(wire) - 4);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EPROTO);
        CHECK_EQ(reader.n_fds, 0);

        vhu_msg_forget_fds(&m);
        close(fd);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

static void test_eof_and_limits(void) {
        struct vhu_header big = { .request = VHU_REQ_CREATE_CRYPTO_SESSION, .flags = VHU_VERSION,
                                  .size = VHU_MAX_PAYLOAD + 1 };
        uint8_t wire[VHU_HEADER_SIZE + 8];
        struct vhu_reader reader;
        struct vhu_msg m, got;
        int sv[2], fd;
        int before = count_open_fds();

        test_set_context("EOF");
        fd = make_memfd();
        vhu_msg_init(&m);
        vhu_msg_init(&got);
        CHECK_EQ(vhu_msg_build_u64(&m, VHU_REQ_SET_FEATURES, false, 1), 0);
        vhu_msg_encode(&m, wire, sizeof(wire));

        /* Between messages: a message, then 0. */
        CHECK_EQ(make_pair(sv), 0);
        vhu_reader_init(&reader);
        CHECK_EQ(send_raw(sv[0], wire, sizeof(wire), NULL, 0), (ssize_t) sizeof(wire));
        close(sv[0]);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 0);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 0);
        close(sv[1]);

        /* Inside the header, and inside the payload (with an fd to close). */
        for (size_t cut = 5; cut <= VHU_HEADER_SIZE + 3; cut += VHU_HEADER_SIZE - 2) {
                CHECK_EQ(make_pair(sv), 0);
                vhu_reader_init(&reader);
                CHECK_EQ(send_raw(sv[0], wire, cut, &fd, 1), (ssize_t) cut);
                close(sv[0]);
                CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -ECONNRESET);
                CHECK_EQ(reader.n_fds, 0);
                CHECK_EQ(reader.got, 0);
                close(sv[1]);
        }

        /* The blocking reader: EOF, and a timeout with nothing sent. */
        CHECK_EQ(make_pair(sv), 0);
        CHECK_EQ(vhu_recv_msg_blocking(sv[1], &got, 20), -ETIMEDOUT);
        close(sv[0]);
        CHECK_EQ(vhu_recv_msg_blocking(sv[1], &got, 1000), 0);
        close(sv[1]);

        test_set_context("oversized size");
        CHECK_EQ(make_pair(sv), 0);
        vhu_reader_init(&reader);
        CHECK_EQ(send_raw(sv[0], &big, sizeof(big), &fd, 1), (ssize_t) sizeof(big));
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EPROTO);
        CHECK_EQ(got.n_fds, 0);
        close(sv[0]);
        close(sv[1]);

        /* The largest allowed payload goes through. */
        {
                static uint8_t payload[VHU_MAX_PAYLOAD];

                CHECK_EQ(make_pair(sv), 0);
                memset(payload, 0x5a, sizeof(payload));
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_CREATE_CRYPTO_SESSION, false,
                                       payload, VHU_MAX_PAYLOAD, NULL, 0), 0);
                CHECK_EQ(vhu_send_msg_blocking(sv[0], &m, 1000), 0);
                CHECK_EQ(vhu_recv_msg_blocking(sv[1], &got, 1000), 1);
                CHECK_EQ(got.hdr.size, VHU_MAX_PAYLOAD);
                CHECK(memcmp(got.payload.raw, payload, VHU_MAX_PAYLOAD) == 0);
                vhu_msg_clear(&got);
                close(sv[0]);
                close(sv[1]);
        }

        test_set_context("writer argument errors");
        {
                struct vhu_writer writer;

                vhu_writer_init(&writer);
                m.hdr.size = VHU_MAX_PAYLOAD + 1;
                CHECK_EQ(vhu_writer_queue(&writer, &m), -EINVAL);
                m.hdr.size = 8;
                m.n_fds = 1;
                m.fds[0] = -1;
                CHECK_EQ(vhu_writer_queue(&writer, &m), -EINVAL);
                m.n_fds = VHU_MAX_FDS + 1;
                CHECK_EQ(vhu_writer_queue(&writer, &m), -EINVAL);
                m.n_fds = 1;
                m.fds[0] = 1000000; /* not open: F_DUPFD fails */
                CHECK_EQ(vhu_writer_queue(&writer, &m), -EBADF);
                CHECK(!vhu_writer_pending(&writer));
                vhu_msg_forget_fds(&m);
        }

        close(fd);
        CHECK_EQ(count_open_fds(), before);
}

/* vhu_writer_send: straight out with the caller's fds when nothing is
 * queued (no dup), queued (fds dup'd, order kept) when the socket is full. */
static void test_writer_send(void) {
        enum { N_MSGS = 48 };
        static uint8_t payload[VHU_MAX_PAYLOAD];
        struct vhu_reader reader;
        struct vhu_writer writer;
        struct vhu_msg m, got;
        int sv[2], fds[N_MSGS], sndbuf = 1;
        unsigned received = 0, queued_at = N_MSGS;
        int before = count_open_fds(), r;

        test_set_context("writer send");
        CHECK_EQ(make_pair(sv), 0);
        vhu_writer_init(&writer);
        vhu_reader_init(&reader);
        vhu_msg_init(&got);

        /* fast path: one message with an fd, nothing queued, no fd dup'd */
        fds[0] = make_memfd();
        CHECK_EQ(vhu_msg_build_vring_fd(&m, VHU_REQ_SET_VRING_KICK, false, 3, fds[0]), 0);
        {
                int open_before = count_open_fds();

                CHECK_EQ(vhu_writer_send(&writer, sv[0], &m), 0);
                CHECK_EQ(count_open_fds(), open_before);
        }
        CHECK(!vhu_writer_pending(&writer));
        CHECK_EQ(vhu_recv_msg_blocking(sv[1], &got, 1000), 1);
        CHECK_EQ(got.hdr.request, VHU_REQ_SET_VRING_KICK);
        CHECK_EQ(got.n_fds, 1u);
        CHECK(same_file(got.fds[0], fds[0]));
        vhu_msg_clear(&got);
        close(fds[0]);

        /* a full socket: later messages queue behind, in order, fds intact */
        CHECK_EQ(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)), 0);
        for (unsigned i = 0; i < N_MSGS; i++) {
                memset(payload, (int)i, 4000);
                fds[i] = make_memfd();
                CHECK_EQ(vhu_msg_build(&m, VHU_DIR_FRONTEND, VHU_REQ_CREATE_CRYPTO_SESSION, false,
                                       payload, 4000, NULL, 0), 0);
                m.fds[0] = fds[i];
                m.n_fds = 1;
                r = vhu_writer_send(&writer, sv[0], &m);
                CHECK(r == 0 || r == -EAGAIN);
                if (r == -EAGAIN && queued_at == N_MSGS)
                        queued_at = i;
                vhu_msg_forget_fds(&m);
                close(fds[i]); /* the writer holds what it still needs */
                fds[i] = -1;
        }
        CHECK(queued_at < N_MSGS); /* the socket did fill up */
        while (received < N_MSGS) {
                r = vhu_reader_read(&reader, sv[1], &got);
                if (r == -EAGAIN) {
                        CHECK(vhu_writer_flush(&writer, sv[0]) == 0 || vhu_writer_pending(&writer));
                        continue;
                }
                CHECK_EQ(r, 1);
                CHECK_EQ(got.hdr.size, 4000u);
                CHECK_EQ(got.payload.raw[0], (uint8_t)received);
                CHECK_EQ(got.n_fds, 1u);
                vhu_msg_clear(&got);
                received++;
        }
        CHECK(!vhu_writer_pending(&writer));
        vhu_writer_clear(&writer);
        vhu_reader_reset(&reader);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

/* vhu_reader_read_hint: header + the promised payload in one read, never
 * reaching into the next message (whose fd must stay with it); a message
 * shorter than promised is -EPROTO. */
static void test_reader_hint(void) {
        struct vhu_reader reader;
        struct vhu_msg req, a, b, got;
        int sv[2], mfd, before = count_open_fds();

        test_set_context("reader hint");
        CHECK_EQ(make_pair(sv), 0);
        vhu_reader_init(&reader);
        vhu_msg_init(&got);
        /* a u64 reply, then a reply carrying an fd, back to back */
        CHECK_EQ(vhu_msg_build_none(&req, VHU_REQ_GET_FEATURES, false), 0);
        CHECK_EQ(vhu_msg_build_reply_u64(&a, &req, 0x1234), 0);
        mfd = make_memfd();
        CHECK_EQ(vhu_msg_build_vring_fd(&b, VHU_REQ_SET_VRING_CALL, false, 1, mfd), 0);
        CHECK_EQ(vhu_send_msg_blocking(sv[0], &a, 1000), 0);
        CHECK_EQ(vhu_send_msg_blocking(sv[0], &b, 1000), 0);
        vhu_msg_forget_fds(&b);
        CHECK_EQ(vhu_reader_read_hint(&reader, sv[1], &got, 8), 1);
        CHECK_EQ(got.hdr.request, VHU_REQ_GET_FEATURES);
        CHECK_EQ(got.payload.u64, 0x1234u);
        CHECK_EQ(got.n_fds, 0u);
        vhu_msg_clear(&got);
        CHECK_EQ(vhu_reader_read_hint(&reader, sv[1], &got, 8), 1);
        CHECK_EQ(got.hdr.request, VHU_REQ_SET_VRING_CALL);
        CHECK_EQ(got.n_fds, 1u);
        CHECK(same_file(got.fds[0], mfd));
        vhu_msg_clear(&got);
        CHECK_EQ(vhu_reader_read_hint(&reader, sv[1], &got, 8), -EAGAIN);
        /* a header-only message where 8 payload bytes were promised */
        CHECK_EQ(vhu_msg_build_none(&a, VHU_REQ_SET_OWNER, false), 0);
        CHECK_EQ(vhu_msg_build_reply_u64(&b, &req, 7), 0);
        CHECK_EQ(vhu_send_msg_blocking(sv[0], &a, 1000), 0);
        CHECK_EQ(vhu_send_msg_blocking(sv[0], &b, 1000), 0);
        CHECK_EQ(vhu_reader_read_hint(&reader, sv[1], &got, 8), -EPROTO);
        close(mfd);
        vhu_reader_reset(&reader);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

/* A payload half-read when a call returns is kept by the reader until the
 * next call, which may assemble into another message (the daemon reads
 * into a fresh one on its stack each time); an idle reader keeps nothing. */
static void test_partial_payload_across_calls(void) {
        uint8_t wire[VHU_HEADER_SIZE + VHU_MAX_CONFIG_SIZE + 16];
        uint8_t data[200];
        struct vhu_reader reader;
        struct vhu_msg m, got;
        int sv[2], fd;
        size_t len, off = 0;
        int before = count_open_fds();

        test_set_context("partial payload across calls");
        CHECK_EQ(make_pair(sv), 0);
        fd = make_memfd();
        vhu_reader_init(&reader);
        vhu_msg_init(&m);
        for (unsigned i = 0; i < sizeof(data); i++)
                data[i] = (uint8_t)(i * 7 + 1);
        CHECK_EQ(vhu_msg_build_config(&m, VHU_REQ_SET_CONFIG, false, 0, sizeof(data), 0, data), 0);
        m.fds[0] = fd;
        m.n_fds = 1;
        len = vhu_msg_encode(&m, wire, sizeof(wire));
        CHECK(len > VHU_HEADER_SIZE + 200);
        /* pieces of 37 bytes, each call with a message full of other bytes */
        while (off < len) {
                size_t k = len - off < 37 ? len - off : 37;

                CHECK_EQ(send_raw(sv[0], wire + off, k, &fd, off == 0 ? 1 : 0), (ssize_t)k);
                off += k;
                vhu_msg_init(&got);
                memset(got.payload.raw, 0xa5, sizeof(got.payload.raw));
                if (off < len) {
                        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
                        CHECK(off <= VHU_HEADER_SIZE || reader.partial != NULL);
                }
        }
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), 1);
        CHECK(memcmp(&got.hdr, &m.hdr, sizeof(m.hdr)) == 0);
        CHECK(memcmp(got.payload.raw, m.payload.raw, m.hdr.size) == 0);
        CHECK(got.n_fds == 1 && same_file(got.fds[0], fd));
        CHECK(reader.partial == NULL);
        vhu_msg_clear(&got);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
        CHECK(reader.partial == NULL);

        /* dropped while half-read: its fd closed, its bytes freed */
        CHECK_EQ(send_raw(sv[0], wire, VHU_HEADER_SIZE + 50, &fd, 1), VHU_HEADER_SIZE + 50);
        CHECK_EQ(vhu_reader_read(&reader, sv[1], &got), -EAGAIN);
        CHECK(reader.partial != NULL && reader.n_fds == 1);
        vhu_reader_reset(&reader);
        CHECK(reader.partial == NULL && reader.n_fds == 0);

        vhu_msg_forget_fds(&m);
        close(fd);
        close(sv[0]);
        close(sv[1]);
        CHECK_EQ(count_open_fds(), before);
}

int main(void) {
        test_back_to_back_fds();
        test_partial_reads();
        test_partial_payload_across_calls();
        test_partial_writes();
        test_writer_send();
        test_reader_hint();
        test_epipe();
        test_ctrunc();
        test_fds_not_on_first_byte();
        test_eof_and_limits();
        return test_finish("test-vhu-socket");
}
