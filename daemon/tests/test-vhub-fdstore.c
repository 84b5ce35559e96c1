/* SPDX-License-Identifier: MIT */
/*
 * The fd store client (daemon/vhub-fdstore*.c) against a datagram socket
 * playing the service manager: the exact messages and fds, names, a full
 * manager queue (EAGAIN: nothing blocks, order kept, a queued push removed
 * before it left is never sent), hard failures and the budget (degraded),
 * fds sharing one open file (aliases, and moving the file when the stored
 * name goes), and the restore side: take by name, stale names removed, the
 * same name passed twice, LISTEN_* from the environment.
 *
 *   test-vhub-fdstore
 */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-commit.h"
#include "vhub-context.h"
#include "vhub-fd-track.h"
#include "vhub-fdstore.h"
#include "vhub-fdstore-share.h"
#include "vhub-log.h"
#include "vhub-snapshot.h"

/* ---- the manager's side: a bound datagram socket, and a store of its own
 * applying what arrives (as systemd's service_add_fd_store() would) */

#define MGR_MAX 4096

struct mgr {
        int sock;
        char path[108];
        char *names[MGR_MAX];
        int fds[MGR_MAX];
        size_t n;
};

static void mgr_open(struct mgr *m, const char *dir, const char *name) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int one = 1;

        memset(m, 0, sizeof(*m));
        snprintf(m->path, sizeof(m->path), "%s/%s", dir, name);
        m->sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        CHECK(m->sock >= 0);
        CHECK_EQ(setsockopt(m->sock, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)), 0);
        strcpy(sa.sun_path, m->path);
        CHECK_EQ(bind(m->sock, (struct sockaddr *) &sa, sizeof(sa)), 0);
}

static void mgr_close_store(struct mgr *m) {
        for (size_t i = 0; i < m->n; i++) {
                close(m->fds[i]);
                free(m->names[i]);
        }
        m->n = 0;
}

static void mgr_close(struct mgr *m) {
        mgr_close_store(m);
        if (m->sock >= 0)
                close(m->sock);
        m->sock = -1;
        unlink(m->path);
}

/* One datagram: its text and fd (-1 if none).  1, or 0 after timeout_ms. */
static int mgr_recv(struct mgr *m, char *text, size_t size, int *ret_fd, int timeout_ms) {
        union {
                struct cmsghdr h;
                uint8_t buf[CMSG_SPACE(sizeof(int) * 4) + CMSG_SPACE(sizeof(struct ucred))];
        } control;
        struct iovec iov = { .iov_base = text, .iov_len = size - 1 };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                             .msg_controllen = sizeof(control.buf) };
        struct pollfd p = { .fd = m->sock, .events = POLLIN };
        bool have_creds = false;
        ssize_t n;

        *ret_fd = -1;
        if (poll(&p, 1, timeout_ms) == 0)
                return 0;
        n = recvmsg(m->sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        CHECK(n >= 0);
        CHECK(!(mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)));
        text[n] = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                        CHECK_EQ(c->cmsg_len, CMSG_LEN(sizeof(int)));  /* one fd per message */
                        memcpy(ret_fd, CMSG_DATA(c), sizeof(int));
                } else if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_CREDENTIALS) {
                        struct ucred uc;

                        memcpy(&uc, CMSG_DATA(c), sizeof(uc));
                        /* NotifyAccess=main: the manager checks the sender */
                        CHECK_EQ(uc.pid, getpid());
                        have_creds = true;
                }
        }
        CHECK(have_creds);
        return 1;
}

static bool same_file(int a, int b) {
        return syscall(SYS_kcmp, getpid(), getpid(), KCMP_FILE, a, b) == 0;
}

static void mgr_apply(struct mgr *m, const char *text, int fd) {
        const char *name = strstr(text, "FDNAME=");

        CHECK(name);
        name += strlen("FDNAME=");
        if (strncmp(text, "FDSTOREREMOVE=1\n", 16) == 0) {
                CHECK_EQ(fd, -1);
                for (size_t i = 0; i < m->n; i++)
                        if (strcmp(m->names[i], name) == 0) {
                                close(m->fds[i]);
                                free(m->names[i]);
                                m->names[i] = m->names[m->n - 1];
                                m->fds[i] = m->fds[m->n - 1];
                                m->n--;
                                i--;
                        }
                return;
        }
        CHECK(strncmp(text, "FDSTORE=1\nFDNAME=", 17) == 0);
        CHECK(strstr(text, "\nFDPOLL=0"));
        CHECK(fd >= 0);
        *strstr(text, "\nFDPOLL=0") = 0;
        /* systemd's same_fd(): a second fd of a stored file is dropped */
        for (size_t i = 0; i < m->n; i++)
                if (same_file(m->fds[i], fd)) {
                        fprintf(stderr, "the manager would drop %s: same file as %s\n", name, m->names[i]);
                        abort();
                }
        CHECK(m->n < MGR_MAX);
        m->names[m->n] = strdup(name);
        m->fds[m->n] = fd;
        m->n++;
}

/* Receive and apply everything that arrives within timeout_ms of quiet,
 * running the store's loop meanwhile; returns how many messages. */
static int mgr_pump(struct mgr *m, struct event_base *base, int timeout_ms) {
        char text[512];
        int fd, n = 0;

        for (;;) {
                if (base)
                        event_base_loop(base, EVLOOP_NONBLOCK);
                if (!mgr_recv(m, text, sizeof(text), &fd, timeout_ms))
                        return n;
                mgr_apply(m, text, fd);
                n++;
        }
}

static int mgr_find(const struct mgr *m, const char *name) {
        for (size_t i = 0; i < m->n; i++)
                if (strcmp(m->names[i], name) == 0)
                        return m->fds[i];
        return -1;
}

static void expect_msg(struct mgr *m, const char *want, int want_file) {
        char text[512];
        int fd;

        CHECK_EQ(mgr_recv(m, text, sizeof(text), &fd, 1000), 1);
        if (strcmp(text, want) != 0) {
                fprintf(stderr, "got \"%s\", expected \"%s\"\n", text, want);
                abort();
        }
        if (want_file >= 0) {
                CHECK(fd >= 0);
                CHECK(same_file(fd, want_file));
                close(fd);
        } else
                CHECK_EQ(fd, -1);
}

static void expect_quiet(struct mgr *m) {
        char text[512];
        int fd;

        if (mgr_recv(m, text, sizeof(text), &fd, 50)) {
                fprintf(stderr, "unexpected message \"%s\"\n", text);
                abort();
        }
}

/* The next message is the push (or the removal) of name, applied. */
static void expect_applied(struct mgr *m, bool push, const char *name) {
        char want[128], text[512];
        int fd;

        if (push)
                snprintf(want, sizeof(want), "FDSTORE=1\nFDNAME=%s\nFDPOLL=0", name);
        else
                snprintf(want, sizeof(want), "FDSTOREREMOVE=1\nFDNAME=%s", name);
        CHECK_EQ(mgr_recv(m, text, sizeof(text), &fd, 1000), 1);
        if (strcmp(text, want) != 0) {
                fprintf(stderr, "got \"%s\", expected \"%s\"\n", text, want);
                abort();
        }
        CHECK_EQ(fd >= 0, push);
        mgr_apply(m, text, fd);
}

/* A rebuild of group's stash, applied: its members stored under the
 * alternate name first, the old stash removed, the new one pushed, the
 * copy removed (vhub-fdstore-group.c, fds_group_stash()). */
static void expect_rebuild(struct mgr *m, const char *group) {
        char alt[32];

        snprintf(alt, sizeof(alt), "%s%s", group, VHUB_FDSTORE_GROUP_ALT);
        expect_applied(m, true, alt);
        expect_applied(m, false, group);
        expect_applied(m, true, group);
        expect_applied(m, false, alt);
}

static struct vhub_fdstore *store_new(struct event_base *base, const char *path, unsigned max_fds) {
        struct vhub_fdstore_options o = { .notify_socket = path, .max_fds = max_fds };
        struct vhub_fdstore *s = NULL;

        CHECK_EQ(vhub_fdstore_new(base, &o, &s), 0);
        CHECK(vhub_fdstore_enabled(s));
        return s;
}

static int efd(void) {
        int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);

        CHECK(fd >= 0);
        return fd;
}

/* ---- the tests */

static void test_names(void) {
        char long_name[300];

        CHECK(vhub_fdstore_name_valid("vm/1000/vm0/region/3"));
        CHECK(vhub_fdstore_name_valid("dev/0/vm-a/net.0/ring1.kick"));
        CHECK(vhub_fdstore_name_valid("with space"));
        CHECK(!vhub_fdstore_name_valid(""));
        CHECK(!vhub_fdstore_name_valid(NULL));
        CHECK(!vhub_fdstore_name_valid("a:b"));           /* LISTEN_FDNAMES separator */
        CHECK(!vhub_fdstore_name_valid("a\nFDSTORE=1"));  /* would forge a field */
        CHECK(!vhub_fdstore_name_valid("tab\there"));
        CHECK(!vhub_fdstore_name_valid("del\x7f"));
        CHECK(!vhub_fdstore_name_valid("\xc3\xa9"));
        memset(long_name, 'x', sizeof(long_name));
        long_name[255] = 0;
        CHECK(vhub_fdstore_name_valid(long_name));
        long_name[255] = 'x';
        long_name[256] = 0;
        CHECK(!vhub_fdstore_name_valid(long_name));
        printf("ok: names follow systemd's fdname_is_valid() (and no empty name)\n");
}

static void test_disabled(void) {
        struct vhub_fdstore_options o = { .disabled = true, .notify_socket = "/nonexistent" };
        struct vhub_fdstore *s = NULL;
        struct vhub_fdstore_stats st;
        int fd = efd();

        CHECK_EQ(vhub_fdstore_new(NULL, &o, &s), 0);
        CHECK(!vhub_fdstore_enabled(s));
        CHECK_EQ(vhub_fdstore_push(s, fd, "a"), 0);
        CHECK_EQ(vhub_fdstore_push(s, fd, "a:b"), -EINVAL);
        CHECK_EQ(vhub_fdstore_push(s, -1, "a"), -EBADF);
        CHECK_EQ(vhub_fdstore_remove(s, "a"), 0);
        CHECK(!vhub_fdstore_degraded(s));
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.names, 0);
        s = vhub_fdstore_free(s);
        /* no $NOTIFY_SOCKET: disabled too */
        unsetenv("NOTIFY_SOCKET");
        CHECK_EQ(vhub_fdstore_new(NULL, NULL, &s), 0);
        CHECK(!vhub_fdstore_enabled(s));
        vhub_fdstore_free(s);
        CHECK(!vhub_fdstore_enabled(NULL));
        CHECK_EQ(vhub_fdstore_push(NULL, fd, "a"), 0);
        close(fd);
        /* a manager that is not there: the daemon learns it at start */
        o = (struct vhub_fdstore_options) { .notify_socket = "/nonexistent/notify" };
        CHECK_EQ(vhub_fdstore_new(NULL, &o, &s), -ENOENT);
        o.notify_socket = "relative/path";
        CHECK_EQ(vhub_fdstore_new(NULL, &o, &s), -EAFNOSUPPORT);
        printf("ok: a disabled store accepts and ignores, still checking names\n");
}

static void test_messages(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore *s;
        struct mgr m;
        int a = efd(), b = memfd_create("guest", MFD_CLOEXEC);

        CHECK(b >= 0);
        mgr_open(&m, dir, "notify");
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_push(s, a, "dev/1000/vm0/blk0/ring0.kick"), 0);
        expect_msg(&m, "FDSTORE=1\nFDNAME=dev/1000/vm0/blk0/ring0.kick\nFDPOLL=0", a);
        CHECK_EQ(vhub_fdstore_push(s, b, "vm/1000/vm0/region/0"), 0);
        expect_msg(&m, "FDSTORE=1\nFDNAME=vm/1000/vm0/region/0\nFDPOLL=0", b);
        CHECK(vhub_fdstore_contains(s, "vm/1000/vm0/region/0"));
        CHECK_EQ(vhub_fdstore_push(s, b, "vm/1000/vm0/region/0"), -EEXIST);
        CHECK_EQ(vhub_fdstore_push(s, a, "fdstore/mine"), -EINVAL);
        CHECK_EQ(vhub_fdstore_push(s, 999, "closed"), -EBADF);
        CHECK_EQ(vhub_fdstore_remove(s, "vm/1000/vm0/region/0"), 0);
        expect_msg(&m, "FDSTOREREMOVE=1\nFDNAME=vm/1000/vm0/region/0", -1);
        CHECK_EQ(vhub_fdstore_remove(s, "vm/1000/vm0/region/0"), -ENOENT);
        CHECK(!vhub_fdstore_contains(s, "vm/1000/vm0/region/0"));
        /* two eventfds share one anonymous inode but are different files */
        {
                int c = efd();

                CHECK_EQ(vhub_fdstore_push(s, c, "dev/1000/vm0/blk0/ring0.call"), 0);
                expect_msg(&m, "FDSTORE=1\nFDNAME=dev/1000/vm0/blk0/ring0.call\nFDPOLL=0", c);
                CHECK_EQ(vhub_fdstore_remove(s, "dev/1000/vm0/blk0/ring0.call"), 0);
                expect_msg(&m, "FDSTOREREMOVE=1\nFDNAME=dev/1000/vm0/blk0/ring0.call", -1);
                close(c);
        }
        CHECK(!vhub_fdstore_degraded(s));
        vhub_fdstore_free(s);
        mgr_close(&m);

        /* the abstract namespace */
        {
                struct sockaddr_un sa = { .sun_family = AF_UNIX };
                char name[64];
                int one = 1;

                snprintf(name, sizeof(name), "@vhub-test-fdstore-%d", getpid());
                m.sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
                CHECK(m.sock >= 0);
                CHECK_EQ(setsockopt(m.sock, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)), 0);
                memcpy(sa.sun_path + 1, name + 1, strlen(name) - 1);
                CHECK_EQ(bind(m.sock, (struct sockaddr *) &sa,
                              (socklen_t) (offsetof(struct sockaddr_un, sun_path) + strlen(name))), 0);
                m.n = 0;
                m.path[0] = 0;
                s = store_new(base, name, 0);
                CHECK_EQ(vhub_fdstore_push(s, a, "ctl/conn/1"), 0);
                expect_msg(&m, "FDSTORE=1\nFDNAME=ctl/conn/1\nFDPOLL=0", a);
                vhub_fdstore_free(s);
                close(m.sock);
        }
        close(a);
        close(b);
        event_base_free(base);
        printf("ok: FDSTORE=1/FDNAME=/FDPOLL=0 with one fd, FDSTOREREMOVE=1, abstract sockets\n");
}

/* The manager does not read: pushes queue, nothing blocks, and everything
 * arrives in order once it reads again. */
static void test_full_queue(const char *dir) {
        enum { N = 600 };
        int fds[N], before = vhub_count_open_fds();
        struct event_base *base = event_base_new();
        struct vhub_fdstore_stats st;
        struct vhub_fdstore *s;
        struct mgr m;
        char name[64];

        mgr_open(&m, dir, "notify-full");
        s = store_new(base, m.path, 0);
        for (int i = 0; i < N; i++) {
                fds[i] = efd();
                snprintf(name, sizeof(name), "dev/0/vm0/d%d/ring0.kick", i);
                CHECK_EQ(vhub_fdstore_push(s, fds[i], name), 0);
        }
        vhub_fdstore_get_stats(s, &st);
        printf("   %d pushes with the manager not reading: %zu queued, %llu would-blocks\n", N, st.queued,
               (unsigned long long) st.send_retries);
        CHECK(st.queued > 0);           /* the kernel queue holds max_dgram_qlen */
        CHECK_EQ(st.stored, N);
        CHECK(!vhub_fdstore_degraded(s));
        /* a queued push removed before it left: never sent, nor its removal */
        CHECK_EQ(vhub_fdstore_push(s, fds[0], "gone/before/sent"), 1);
        {
                int e = efd();

                CHECK_EQ(vhub_fdstore_push(s, e, "gone/before/sent2"), 0);
                CHECK_EQ(vhub_fdstore_remove(s, "gone/before/sent2"), 0);
                close(e);
        }
        /* removing a queued name that left already: its removal queues behind */
        CHECK_EQ(vhub_fdstore_remove(s, "dev/0/vm0/d0/ring0.kick"), 0);
        mgr_pump(&m, base, 200);
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.queued, 0);
        /* d1..: stored; d0 removed, its file moved to its alias; the alias table */
        CHECK_EQ(m.n, N + 1);
        CHECK(mgr_find(&m, "dev/0/vm0/d0/ring0.kick") < 0);
        CHECK(mgr_find(&m, "gone/before/sent2") < 0);
        CHECK(same_file(mgr_find(&m, "gone/before/sent"), fds[0]));
        for (int i = 1; i < N; i++) {
                snprintf(name, sizeof(name), "dev/0/vm0/d%d/ring0.kick", i);
                CHECK(same_file(mgr_find(&m, name), fds[i]));
        }
        vhub_fdstore_free(s);
        mgr_close(&m);
        for (int i = 0; i < N; i++)
                close(fds[i]);
        event_base_free(base);
        CHECK_EQ(vhub_count_open_fds(), before);
        printf("ok: a full manager queue: %d pushes queued without blocking, delivered once it reads, "
               "a push removed while queued never sent, no dup left open\n", N);
}

/* Order is kept across the queue: a name pushed, removed and pushed again
 * while queued ends up stored with its last file. */
static void test_queue_order(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore *s;
        struct mgr m;
        int a = efd(), b = efd(), filler[40];
        char name[32];

        mgr_open(&m, dir, "notify-order");
        s = store_new(base, m.path, 0);
        for (int i = 0; i < 40; i++) {
                filler[i] = efd();
                snprintf(name, sizeof(name), "f%d", i);
                CHECK_EQ(vhub_fdstore_push(s, filler[i], name), 0);
        }
        CHECK_EQ(vhub_fdstore_push(s, a, "x"), 0);
        mgr_pump(&m, base, 100);        /* x sent */
        for (int i = 0; i < 40; i++) {
                snprintf(name, sizeof(name), "f%d", i);
                CHECK_EQ(vhub_fdstore_remove(s, name), 0);
        }
        CHECK_EQ(vhub_fdstore_remove(s, "x"), 0);
        CHECK_EQ(vhub_fdstore_push(s, b, "x"), 0);
        mgr_pump(&m, base, 100);
        CHECK_EQ(m.n, 1);
        CHECK(same_file(mgr_find(&m, "x"), b));
        vhub_fdstore_free(s);
        mgr_close(&m);
        for (int i = 0; i < 40; i++)
                close(filler[i]);
        close(a);
        close(b);
        event_base_free(base);
        printf("ok: removals and pushes of one name keep their order through the queue\n");
}

static void test_failures(const char *dir) {
        struct vhub_fdstore_stats st;
        struct vhub_fdstore *s;
        struct mgr m;
        int a = efd(), b = efd(), c = efd(), d = efd();

        /* the budget (FileDescriptorStoreMax=): over it, failed here rather
         * than dropped silently by systemd */
        mgr_open(&m, dir, "notify-budget");
        s = store_new(NULL, m.path, 3);
        CHECK_EQ(vhub_fdstore_push(s, a, "a"), 0);
        CHECK_EQ(vhub_fdstore_push(s, b, "b"), 0);
        CHECK_EQ(vhub_fdstore_push(s, c, "c"), 0);
        CHECK(!vhub_fdstore_degraded(s));
        CHECK_EQ(vhub_fdstore_push(s, d, "d"), 0);
        CHECK(vhub_fdstore_degraded(s));
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.failed, 1);
        CHECK_EQ(st.push_failures, 1);
        CHECK_EQ(mgr_pump(&m, NULL, 50), 3);
        CHECK_EQ(vhub_fdstore_remove(s, "a"), 0);
        CHECK(vhub_fdstore_degraded(s));        /* d is still not stored */
        CHECK_EQ(vhub_fdstore_remove(s, "d"), 0);       /* nothing to tell the manager */
        CHECK(!vhub_fdstore_degraded(s));
        CHECK_EQ(mgr_pump(&m, NULL, 50), 1);
        CHECK_EQ(m.n, 2);
        vhub_fdstore_free(s);
        mgr_close(&m);

        /* the manager went away: pushes fail for good, the daemon goes on */
        mgr_open(&m, dir, "notify-gone");
        s = store_new(NULL, m.path, 0);
        CHECK_EQ(vhub_fdstore_push(s, a, "a"), 0);
        mgr_close(&m);
        CHECK_EQ(vhub_fdstore_push(s, b, "b"), 0);
        CHECK(vhub_fdstore_degraded(s));
        CHECK_EQ(vhub_fdstore_remove(s, "a"), 0);
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.remove_failures, 1);
        CHECK(vhub_fdstore_degraded(s));
        CHECK_EQ(vhub_fdstore_remove(s, "b"), 0);
        CHECK(!vhub_fdstore_degraded(s));
        vhub_fdstore_free(s);
        close(a);
        close(b);
        close(c);
        close(d);
        /* LISTEN_FDNAMES must stay under the kernel's 128 KiB per
         * environment string, or the next start cannot exec: long names
         * fail once their sum would pass it */
        {
                struct event_base *base = event_base_new();
                enum { MANY = 600 };
                int many[MANY], stored = 0;
                char name[256];

                mgr_open(&m, dir, "notify-names");
                s = store_new(base, m.path, 0);
                for (int i = 0; i < MANY; i++) {
                        many[i] = efd();
                        memset(name, 'n', 255);
                        name[255] = 0;
                        snprintf(name, 16, "%05d", i);
                        name[5] = '/';
                        CHECK_EQ(vhub_fdstore_push(s, many[i], name), 0);
                        vhub_fdstore_get_stats(s, &st);
                        if (st.failed == 0)
                                stored++;
                        mgr_pump(&m, base, 0);
                }
                vhub_fdstore_get_stats(s, &st);
                CHECK(vhub_fdstore_degraded(s));
                CHECK(st.names_bytes <= VHUB_FDSTORE_NAMES_BUDGET);
                CHECK_EQ((size_t) stored, st.stored);
                CHECK_EQ(st.stored, VHUB_FDSTORE_NAMES_BUDGET / 256);
                printf("   %d names of 255 characters fit in LISTEN_FDNAMES (%zu bytes), the rest failed\n", stored,
                       st.names_bytes);
                vhub_fdstore_free(s);
                mgr_close(&m);
                for (int i = 0; i < MANY; i++)
                        close(many[i]);
                event_base_free(base);
        }
        printf("ok: over the budget (fds or LISTEN_FDNAMES bytes) or with the manager gone: logged, counted, "
               "degraded while such an fd lives\n");
}

static int read_aliases(int table_fd, char out[][2][64], int max) {
        struct vhub_snap_doc doc;
        struct vhub_snap_iter it;
        struct vhub_snap_rec rec;
        void *buf;
        size_t len;
        int n = 0;

        CHECK_EQ(vhub_snap_file_read(table_fd, &buf, &len, NULL), 0);
        CHECK_EQ(vhub_snap_parse(buf, len, &doc, NULL), 0);
        vhub_snap_doc_iter(&doc, &it);
        while (vhub_snap_next(&it, &rec) > 0) {
                struct vhub_snap_iter in;
                struct vhub_snap_rec f;

                CHECK(n < max);
                CHECK_EQ(vhub_snap_enter(&rec, &in), 0);
                while (vhub_snap_next(&in, &f) > 0)
                        CHECK_EQ(vhub_snap_get_fdname(&f, out[n][f.tag - 1], 64), 0);
                n++;
        }
        free(buf);
        return n;
}

/* One memfd behind two regions (QEMU splits RAM around the PCI hole):
 * systemd would keep one entry; the store records the other name. */
static void test_aliases(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore *s;
        struct mgr m;
        char al[4][2][64];
        int mem = memfd_create("ram", MFD_CLOEXEC), mem2 = dup(mem), table;

        mgr_open(&m, dir, "notify-alias");
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_push(s, mem, "vm/0/vm0/region/0"), 0);
        CHECK_EQ(vhub_fdstore_push(s, mem, "vm/0/vm0/region/1"), 1);   /* the same fd again */
        CHECK_EQ(vhub_fdstore_push(s, mem2, "vm/0/vm0/region/2"), 1);  /* a dup */
        mgr_pump(&m, base, 50);
        CHECK_EQ(m.n, 2);       /* the memfd and the alias table */
        table = mgr_find(&m, VHUB_FDSTORE_ALIASES);
        CHECK(table >= 0);
        CHECK_EQ(read_aliases(table, al, 4), 2);
        CHECK(strcmp(al[0][1], "vm/0/vm0/region/0") == 0 && strcmp(al[1][1], "vm/0/vm0/region/0") == 0);

        /* the stored name goes: the file moves to an alias, the other alias
         * follows it */
        CHECK_EQ(vhub_fdstore_remove(s, "vm/0/vm0/region/0"), 0);
        mgr_pump(&m, base, 50);
        CHECK(mgr_find(&m, "vm/0/vm0/region/0") < 0);
        {
                int heir = mgr_find(&m, "vm/0/vm0/region/1") >= 0 ? 1 : 2, other = 3 - heir;
                char heir_name[64], other_name[64];

                snprintf(heir_name, sizeof(heir_name), "vm/0/vm0/region/%d", heir);
                snprintf(other_name, sizeof(other_name), "vm/0/vm0/region/%d", other);
                CHECK(same_file(mgr_find(&m, heir_name), mem));
                CHECK_EQ(read_aliases(table, al, 4), 1);
                CHECK(strcmp(al[0][0], other_name) == 0 && strcmp(al[0][1], heir_name) == 0);
                CHECK_EQ(vhub_fdstore_remove(s, other_name), 0);
                CHECK_EQ(read_aliases(table, al, 4), 0);
                CHECK_EQ(vhub_fdstore_remove(s, heir_name), 0);
        }
        mgr_pump(&m, base, 50);
        CHECK_EQ(m.n, 1);       /* the (empty) alias table stays */
        vhub_fdstore_free(s);
        mgr_close(&m);
        close(mem);
        close(mem2);
        event_base_free(base);
        printf("ok: fds of one open file: one stored entry, the others aliases kept in the table, "
               "the file moves when the stored name goes\n");
}

/* A whole cycle: a first daemon pushes, "dies", the manager hands the fds
 * to a second one, which takes what its snapshot names. */
static void test_restore(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore_restore *r;
        struct vhub_fdstore_stats st;
        struct vhub_fdstore *s;
        struct mgr m;
        int kick = efd(), call = efd(), ram = memfd_create("ram", MFD_CLOEXEC), spare = efd();
        int fds[MGR_MAX], fa, fr0, fr1, fr2;
        char *names[MGR_MAX];
        size_t n;

        mgr_open(&m, dir, "notify-restore");
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_push(s, kick, "dev/0/vm0/b/ring0.kick"), 0);
        CHECK_EQ(vhub_fdstore_push(s, call, "dev/0/vm0/b/ring0.call"), 0);
        CHECK_EQ(vhub_fdstore_push(s, ram, "vm/0/vm0/region/0"), 0);
        CHECK_EQ(vhub_fdstore_push(s, ram, "vm/0/vm0/region/1"), 1);
        CHECK_EQ(vhub_fdstore_push(s, spare, "stale/one"), 0);
        mgr_pump(&m, base, 50);
        vhub_fdstore_free(s);           /* the first daemon is gone */
        CHECK_EQ(m.n, 5);

        /* systemd passes stored fds newest first */
        n = m.n;
        for (size_t i = 0; i < n; i++) {
                fds[i] = fcntl(m.fds[n - 1 - i], F_DUPFD_CLOEXEC, 3);
                names[i] = m.names[n - 1 - i];
        }
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_restore_from(s, fds, names, n, &r), 0);
        CHECK_EQ(vhub_fdstore_restore_count(r), 5);     /* 4 passed (the table is the store's) + 1 alias */
        fa = vhub_fdstore_take(r, "dev/0/vm0/b/ring0.kick");
        CHECK(fa >= 0 && same_file(fa, kick));
        CHECK_EQ(vhub_fdstore_take(r, "dev/0/vm0/b/ring0.kick"), -ENOENT);
        CHECK_EQ(vhub_fdstore_take(r, "no/such"), -ENOENT);
        CHECK_EQ(vhub_fdstore_take(r, VHUB_FDSTORE_ALIASES), -ENOENT);
        fr1 = vhub_fdstore_take(r, "vm/0/vm0/region/1");        /* an alias: a dup */
        fr0 = vhub_fdstore_take(r, "vm/0/vm0/region/0");
        CHECK(fr0 >= 0 && fr1 >= 0 && fr0 != fr1 && same_file(fr0, ram) && same_file(fr1, ram));
        fr2 = vhub_fdstore_take(r, "dev/0/vm0/b/ring0.call");
        CHECK(fr2 >= 0 && same_file(fr2, call));
        /* "stale/one" is claimed by nobody */
        CHECK_EQ(vhub_fdstore_restore_finish(r), 1);
        mgr_pump(&m, base, 50);
        CHECK(mgr_find(&m, "stale/one") < 0);
        CHECK_EQ(m.n, 4);

        /* the taken names are tracked as if pushed: a name in use is
         * refused, an alias of a restored file is found, removal moves the
         * file to the restored alias */
        CHECK_EQ(vhub_fdstore_push(s, fa, "dev/0/vm0/b/ring0.kick"), -EEXIST);
        CHECK_EQ(vhub_fdstore_push(s, fa, "dev/0/vm0/b/ring0.kick.again"), 1);
        CHECK_EQ(vhub_fdstore_remove(s, "vm/0/vm0/region/0"), 0);
        mgr_pump(&m, base, 50);
        CHECK(mgr_find(&m, "vm/0/vm0/region/0") < 0);
        CHECK(same_file(mgr_find(&m, "vm/0/vm0/region/1"), ram));
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.aliases, 1);
        CHECK(!vhub_fdstore_degraded(s));
        vhub_fdstore_free(s);
        close(fa);
        close(fr0);
        close(fr1);
        close(fr2);

        /* the same name twice (a store that lost track): the claimed one
         * stays, the extra copy is dropped */
        mgr_close_store(&m);
        {
                int d1 = efd(), d2 = efd(), d1_copy = dup(d1);
                int pfds[2] = { d1, d2 };
                char *pnames[2] = { "d", "d" };
                int got;

                s = store_new(base, m.path, 0);
                CHECK_EQ(vhub_fdstore_restore_from(s, pfds, pnames, 2, &r), 0);
                got = vhub_fdstore_take(r, "d");
                CHECK_EQ(got, d1);
                CHECK_EQ(vhub_fdstore_take(r, "d"), -ENOENT);
                CHECK_EQ(vhub_fdstore_restore_finish(r), 1);
                expect_msg(&m, "FDSTOREREMOVE=1\nFDNAME=d", -1);
                expect_msg(&m, "FDSTORE=1\nFDNAME=d\nFDPOLL=0", d1_copy);
                expect_quiet(&m);
                CHECK_EQ(fcntl(d2, F_GETFD), -1);       /* the extra copy was closed */
                vhub_fdstore_free(s);
                close(got);
                close(d1_copy);
        }
        /* giving up (a snapshot it cannot read) tells the manager nothing */
        {
                int e1 = efd();
                int pfds[1] = { e1 };
                char *pnames[1] = { "e" };

                s = store_new(base, m.path, 0);
                CHECK_EQ(vhub_fdstore_restore_from(s, pfds, pnames, 1, &r), 0);
                vhub_fdstore_restore_abort(r);
                expect_quiet(&m);
                CHECK(!vhub_fdstore_contains(s, "e"));
                vhub_fdstore_free(s);
        }
        /* without a store (socket activation only): take and close */
        {
                int e1 = efd(), e2 = efd();
                int pfds[2] = { e1, e2 };
                char *pnames[2] = { "control", "other" };

                CHECK_EQ(vhub_fdstore_restore_from(NULL, pfds, pnames, 2, &r), 0);
                CHECK_EQ(vhub_fdstore_take(r, "control"), e1);
                CHECK_EQ(vhub_fdstore_restore_finish(r), 1);
                CHECK_EQ(fcntl(e2, F_GETFD), -1);
                close(e1);
        }
        mgr_close(&m);
        close(kick);
        close(call);
        close(ram);
        close(spare);
        event_base_free(base);
        printf("ok: restore: take by name (aliases as dups), stale names removed, a doubled name "
               "repaired, abort silent\n");
}

/* The fds a stored stash holds, in order (read from a copy: the stash's
 * queue is emptied by it, as a restore would). */
/* One message of a stash (flags: MSG_PEEK leaves it queued): its fds
 * into out, how many, or -1 if none is queued. */
static ssize_t stash_recv(int stash, int flags, int *out, size_t max) {
        union {
                struct cmsghdr h;
                uint8_t buf[CMSG_SPACE(sizeof(int) * 253)];
        } control;
        char byte;
        struct iovec iov = { &byte, 1 };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                             .msg_controllen = sizeof(control.buf) };
        size_t n = 0;

        if (recvmsg(stash, &mh, flags | MSG_DONTWAIT | MSG_CMSG_CLOEXEC) <= 0)
                return -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
                size_t m = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

                CHECK(n + m <= max);
                memcpy(out + n, CMSG_DATA(c), m * sizeof(int));
                n += m;
        }
        return (ssize_t)n;
}

static size_t stash_read(int stash, int *out, size_t max) {
        size_t n = 0;
        ssize_t k;

        while ((k = stash_recv(stash, 0, out + n, max - n)) >= 0)
                n += (size_t)k;
        return n;
}

/* Groups: one stored stash socket per group, rebuilt once per loop turn. */
static void test_groups(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore_stats st;
        struct vhub_fdstore *s;
        struct mgr m;
        int a = efd(), b = efd(), c = memfd_create("ram", MFD_CLOEXEC), got[8], stash;
        size_t n;

        CHECK(c >= 0);
        mgr_open(&m, dir, "notify-groups");
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", a), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", b), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", c), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", c), -EEXIST);
        CHECK_EQ(vhub_fdstore_group_add(s, "a:b", c), -EINVAL);
        CHECK_EQ(vhub_fdstore_group_add(s, "fdstore/x", c), -EINVAL);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", -1), -EBADF);
        /* the same eventfd in another group: both stashes hold it */
        CHECK_EQ(vhub_fdstore_group_add(s, "d2", a), 0);
        CHECK_EQ(vhub_fdstore_group_size(s, "d1"), 3);
        /* nothing is sent before the loop turns: three adds, one push */
        expect_quiet(&m);
        CHECK_EQ(mgr_pump(&m, base, 50), 2);
        CHECK_EQ(m.n, 2);
        stash = mgr_find(&m, "d1");
        CHECK(stash >= 0);
        n = stash_read(stash, got, 8);
        CHECK_EQ(n, 3);
        CHECK(same_file(got[0], a) && same_file(got[1], b) && same_file(got[2], c));
        for (size_t i = 0; i < n; i++)
                close(got[i]);
        CHECK_EQ(vhub_fdstore_push(s, a, "d1"), -EEXIST); /* a group's name */
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.groups, 2);
        CHECK_EQ(st.group_members, 4);
        CHECK_EQ(st.stored, 2);
        CHECK_EQ(st.names_bytes, strlen("d1:d2:"));

        /* a member leaves (an eventfd): nothing is sent, it stays in the
         * stash as a dead fd (a restore claims members by key) ... */
        CHECK_EQ(vhub_fdstore_group_remove(s, "d1", b), 0);
        CHECK_EQ(vhub_fdstore_group_remove(s, "d1", b), -ENOENT);
        event_base_loop(base, EVLOOP_NONBLOCK);
        expect_quiet(&m);
        /* ... until the sweep compacts the stash: the members under the
         * alternate name, remove, the new one, the copy removed
         * (FDSTOREREMOVE drops every fd of the name: never two under one) */
        usleep(400 * 1000);
        event_base_loop(base, EVLOOP_NONBLOCK);
        expect_rebuild(&m, "d1");
        /* a member joins a stored group: appended into the stash through
         * its kept writing end, nothing sent to the manager */
        {
                int d = efd(), sp[2];

                CHECK_EQ(vhub_fdstore_group_add(s, "d1", d), 0);
                event_base_loop(base, EVLOOP_NONBLOCK);
                expect_quiet(&m);
                CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
                CHECK_EQ(vhub_fdstore_group_add(s, "d1", sp[0]), 0);
                event_base_loop(base, EVLOOP_NONBLOCK);
                expect_quiet(&m);
                /* the manager's stash (read here, as a restore would):
                 * the compacted message, then the appended ones */
                n = stash_read(mgr_find(&m, "d1"), got, 8);
                CHECK_EQ(n, 4);
                CHECK(same_file(got[0], a) && same_file(got[1], c) && same_file(got[2], d) &&
                      same_file(got[3], sp[0]));
                for (size_t i = 0; i < n; i++)
                        close(got[i]);
                /* a socket is not left in the stash (its peer must see it
                 * close), unless the stash was rebuilt less than 250 ms
                 * ago (the sweep's compaction above): a peer churning
                 * sockets gets a rebuild per sweep, not per socket */
                {
                        int sq[2];

                        CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sq), 0);
                        CHECK_EQ(vhub_fdstore_group_add(s, "d1", sq[0]), 0);
                        event_base_loop(base, EVLOOP_NONBLOCK);
                        CHECK_EQ(vhub_fdstore_group_remove(s, "d1", sq[0]), 0);
                        close(sq[0]);
                        event_base_loop(base, EVLOOP_NONBLOCK);
                        expect_quiet(&m);
                        /* the sweep: compacted, and the peer sees the end */
                        usleep(400 * 1000);
                        event_base_loop(base, EVLOOP_NONBLOCK);
                        expect_rebuild(&m, "d1");
                        CHECK_EQ(read(sq[1], got, 1), 0);
                        close(sq[1]);
                }
                /* 250 ms after the last rebuild: a socket leaving has the
                 * stash rebuilt at once */
                usleep(300 * 1000);
                CHECK_EQ(vhub_fdstore_group_remove(s, "d1", sp[0]), 0);
                CHECK_EQ(vhub_fdstore_group_remove(s, "d1", d), 0);
                event_base_loop(base, EVLOOP_NONBLOCK);
                expect_rebuild(&m, "d1");
                close(sp[0]);
                close(sp[1]);
                close(d);
        }
        n = stash_read(mgr_find(&m, "d1"), got, 8);
        CHECK_EQ(n, 2);
        CHECK(same_file(got[0], a) && same_file(got[1], c));
        for (size_t i = 0; i < n; i++)
                close(got[i]);
        /* the last member leaves: the group goes */
        CHECK_EQ(vhub_fdstore_group_remove(s, "d2", a), 0);
        event_base_loop(base, EVLOOP_NONBLOCK);
        expect_msg(&m, "FDSTOREREMOVE=1\nFDNAME=d2", -1);
        mgr_apply(&m, "FDSTOREREMOVE=1\nFDNAME=d2", -1);
        CHECK(mgr_find(&m, "d2") < 0);
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.groups, 1);
        CHECK(!vhub_fdstore_degraded(s));

        /* a member closed before it left its group (an owner's bug): the
         * stash cannot be made, the group is reported, nothing else breaks */
        {
                int e = efd(), x = fcntl(e, F_DUPFD_CLOEXEC, 900); /* a number nothing reuses here */

                close(e);
                CHECK(x >= 900);
                CHECK_EQ(vhub_fdstore_group_add(s, "bad", x), 0);
                close(x);
                vhub_fdstore_sync(s);
                CHECK(vhub_fdstore_degraded(s));
                CHECK_EQ(vhub_fdstore_group_remove(s, "bad", x), 0);
                vhub_fdstore_sync(s);
                CHECK(!vhub_fdstore_degraded(s));
        }
        mgr_pump(&m, base, 50);
        vhub_fdstore_free(s);
        mgr_close(&m);
        close(a);
        close(b);
        close(c);
        event_base_free(base);
        printf("ok: groups: one stash per group, in order, rebuilt once per loop turn, appended to, dead fds "
               "compacted by the sweep, a socket leaving rebuilt at once (by the sweep within 250 ms of a "
               "rebuild), removed when empty\n");
}

/* A group comes back after a restart: its fds in order with their keys,
 * and it is stored again at once (reading the stash emptied it). */
static void test_group_restore(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore_member *mem = NULL;
        struct vhub_fdstore_restore *r;
        struct vhub_fd_key ka, kb, kc;
        struct vhub_fdstore *s;
        struct mgr m;
        int a = efd(), b = efd(), c = memfd_create("ram", MFD_CLOEXEC), fds[4], got[8];
        char *names[4];
        size_t n;

        CHECK_EQ(vhub_fd_key_of(a, &ka), 0);
        CHECK_EQ(vhub_fd_key_of(b, &kb), 0);
        CHECK_EQ(vhub_fd_key_of(c, &kc), 0);
        /* every eventfd has the same inode; the kernel's id tells them apart */
        CHECK(ka.dev == kb.dev && ka.ino == kb.ino);
        CHECK(ka.eventfd_id != 0 && ka.eventfd_id != kb.eventfd_id);
        CHECK_EQ(kc.eventfd_id, 0);
        mgr_open(&m, dir, "notify-grestore");
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "v1", c), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", a), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", b), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "d1", c), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "c1", b), 0);
        mgr_pump(&m, base, 50);
        vhub_fdstore_free(s);           /* the first daemon is gone */
        CHECK_EQ(m.n, 3);

        for (size_t i = 0; i < m.n; i++) {
                fds[i] = fcntl(m.fds[m.n - 1 - i], F_DUPFD_CLOEXEC, 3);
                names[i] = m.names[m.n - 1 - i];
        }
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_restore_from(s, fds, names, m.n, &r), 0);
        CHECK_EQ(vhub_fdstore_take_group(r, "d1", &mem, &n), 0);
        CHECK_EQ(n, 3);
        CHECK(same_file(mem[0].fd, a) && same_file(mem[1].fd, b) && same_file(mem[2].fd, c));
        CHECK(memcmp(&mem[0].key, &ka, sizeof(ka)) == 0);
        CHECK(memcmp(&mem[1].key, &kb, sizeof(kb)) == 0);
        CHECK(memcmp(&mem[2].key, &kc, sizeof(kc)) == 0);
        CHECK_EQ(vhub_fdstore_take_group(r, "d1", &(struct vhub_fdstore_member *){ NULL }, &n), -ENOENT);
        CHECK_EQ(vhub_fdstore_group_size(s, "d1"), 3);
        /* peeked, not read: the manager's stash still holds the group, and
         * nothing is pushed for it */
        mgr_pump(&m, base, 50);
        {
                char text[512];
                int fd;

                CHECK_EQ(mgr_recv(&m, text, sizeof(text), &fd, 100), 0);
        }
        n = stash_read(mgr_find(&m, "d1"), got, 8);
        CHECK_EQ(n, 3);
        CHECK(same_file(got[0], a) && same_file(got[1], b) && same_file(got[2], c));
        for (size_t i = 0; i < n; i++)
                close(got[i]);
        /* "v1" and "c1" are claimed by nobody: stale */
        CHECK_EQ(vhub_fdstore_restore_finish(r), 2);
        mgr_pump(&m, base, 50);
        CHECK_EQ(m.n, 1);
        /* the members are the caller's: they leave the group as usual */
        for (size_t i = 0; i < 3; i++)
                CHECK_EQ(vhub_fdstore_group_remove(s, "d1", mem[i].fd), 0);
        mgr_pump(&m, base, 50);
        CHECK_EQ(m.n, 0);
        for (size_t i = 0; i < 3; i++) {
                close(mem[i].fd);
                close(i == 0 ? a : i == 1 ? b : c);     /* the first daemon's copies */
        }
        free(mem);
        vhub_fdstore_free(s);
        mgr_close(&m);
        event_base_free(base);
        printf("ok: a group restored in order with its identity keys, its stash left stored as it was\n");
}

/* A group of more fds than one message carries (its stash holds two):
 * read at the restore, so stored again at once (a rebuild). */
static void test_group_restore_big(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore_member *mem = NULL;
        struct vhub_fdstore_restore *r;
        struct vhub_fdstore *s;
        struct mgr m;
        int fds[300], got[300], stash;
        char *names[1];
        size_t n;

        mgr_open(&m, dir, "notify-gbig");
        s = store_new(base, m.path, 0);
        for (size_t i = 0; i < 300; i++) {
                fds[i] = efd();
                CHECK_EQ(vhub_fdstore_group_add(s, "d9", fds[i]), 0);
        }
        mgr_pump(&m, base, 50);
        vhub_fdstore_free(s);
        CHECK_EQ(m.n, 1);
        stash = fcntl(m.fds[0], F_DUPFD_CLOEXEC, 3);
        names[0] = m.names[0];
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_restore_from(s, &stash, names, 1, &r), 0);
        CHECK_EQ(vhub_fdstore_take_group(r, "d9", &mem, &n), 0);
        CHECK_EQ(n, 300);
        CHECK(same_file(mem[0].fd, fds[0]) && same_file(mem[299].fd, fds[299]));
        expect_rebuild(&m, "d9");
        CHECK_EQ(stash_read(mgr_find(&m, "d9"), got, 300), 300);
        CHECK(same_file(got[0], fds[0]) && same_file(got[299], fds[299]));
        for (size_t i = 0; i < 300; i++) {
                close(got[i]);
                CHECK_EQ(vhub_fdstore_group_remove(s, "d9", mem[i].fd), 0);
                close(mem[i].fd);
                close(fds[i]);
        }
        CHECK_EQ(vhub_fdstore_restore_finish(r), 0);
        mgr_pump(&m, base, 50);
        CHECK_EQ(m.n, 0);
        free(mem);
        vhub_fdstore_free(s);
        mgr_close(&m);
        event_base_free(base);
        printf("ok: a group of two messages is read at the restore and stored again at once\n");
}

/* The members of the stash stored under name, peeked (the stash is left
 * as it is), are exactly want[0..n) in order. */
static bool mgr_stash_holds(const struct mgr *m, const char *name, const int *want, size_t n) {
        int stash = mgr_find(m, name), got[253];
        ssize_t k = stash >= 0 ? stash_recv(stash, MSG_PEEK, got, 253) : -1;
        bool same = k == (ssize_t)n;

        for (ssize_t i = 0; i < k; i++) {
                same = same && same_file(got[i], want[i]);
                close(got[i]);
        }
        return same;
}

/* The manager's store as a crash would leave it to the next start: dups of
 * its fds, newest first, and their names. */
static size_t mgr_copy(const struct mgr *m, int *fds, char **names) {
        for (size_t i = 0; i < m->n; i++) {
                fds[i] = fcntl(m->fds[m->n - 1 - i], F_DUPFD_CLOEXEC, 3);
                CHECK(fds[i] >= 0);
                names[i] = strdup(m->names[m->n - 1 - i]);
        }
        return m->n;
}

/* A crash in the middle of a stash's rebuild: at every point of it the
 * manager holds the members (before, the old stash was removed first and
 * the new one pushed next: a crash in between lost the group, a VM's guest
 * memory and its devices' inflight regions -- restart-sandbox's crash
 * loop under ASan), and the next start takes them back from the copy
 * under the alternate name, then stores the group under its own again. */
static void test_group_rebuild_crash(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore *s;
        struct mgr m;
        int ram = memfd_create("ram", MFD_CLOEXEC), inflight = memfd_create("inflight", MFD_CLOEXEC);
        int sp[2], live[2], crash_fds[2][4];
        char *crash_names[2][4];
        size_t crash_n[2];
        char text[512];
        int fd, msgs = 0;

        CHECK(ram >= 0 && inflight >= 0);
        CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp), 0);
        live[0] = ram;
        live[1] = inflight;
        mgr_open(&m, dir, "notify-rebuild");
        s = store_new(base, m.path, 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "v1", ram), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "v1", sp[0]), 0);
        CHECK_EQ(vhub_fdstore_group_add(s, "v1", inflight), 0);
        CHECK_EQ(mgr_pump(&m, base, 50), 1);
        /* the back-end's connection leaves: the stash is rebuilt at once
         * (a socket leaving a stash first pushed as it is) */
        CHECK_EQ(vhub_fdstore_group_remove(s, "v1", sp[0]), 0);
        close(sp[0]);
        event_base_loop(base, EVLOOP_NONBLOCK);
        while (mgr_recv(&m, text, sizeof(text), &fd, 200)) {
                mgr_apply(&m, text, fd);
                /* a crash here: the next start is passed the store as it is */
                CHECK(mgr_stash_holds(&m, "v1", live, 2) || mgr_stash_holds(&m, "v1" VHUB_FDSTORE_GROUP_ALT, live, 2));
                if (msgs < 2)
                        crash_n[msgs] = mgr_copy(&m, crash_fds[msgs], crash_names[msgs]);
                msgs++;
        }
        CHECK_EQ(msgs, 4);
        CHECK_EQ(m.n, 1);
        CHECK(mgr_stash_holds(&m, "v1", live, 2));
        vhub_fdstore_free(s);           /* the daemon crashed */
        mgr_close_store(&m);
        close(sp[1]);

        /* the next start, after a crash after the copy's push (both stored)
         * and after the old stash's removal (the copy alone) */
        for (size_t k = 0; k < 2; k++) {
                struct vhub_fdstore_member *mem = NULL;
                struct vhub_fdstore_restore *r;
                size_t n;

                CHECK_EQ(crash_n[k], 2 - k);
                s = store_new(base, m.path, 0);
                for (size_t i = 0; i < crash_n[k]; i++)
                        mgr_apply(&m, (snprintf(text, sizeof(text), "FDSTORE=1\nFDNAME=%s\nFDPOLL=0",
                                                crash_names[k][i]), text),
                                  fcntl(crash_fds[k][i], F_DUPFD_CLOEXEC, 3));
                CHECK_EQ(vhub_fdstore_restore_from(s, crash_fds[k], crash_names[k], crash_n[k], &r), 0);
                CHECK_EQ(vhub_fdstore_take_group(r, "v1", &mem, &n), 0);
                CHECK_EQ(n, 2);
                CHECK(same_file(mem[0].fd, ram) && same_file(mem[1].fd, inflight));
                /* stored under its own name again, the copy gone: nothing stale */
                CHECK_EQ(vhub_fdstore_restore_finish(r), 0);
                mgr_pump(&m, base, 50);
                CHECK_EQ(m.n, 1);
                CHECK(mgr_stash_holds(&m, "v1", live, 2));
                for (size_t i = 0; i < n; i++) {
                        CHECK_EQ(vhub_fdstore_group_remove(s, "v1", mem[i].fd), 0);
                        close(mem[i].fd);
                }
                free(mem);
                mgr_pump(&m, base, 50);
                CHECK_EQ(m.n, 0);
                vhub_fdstore_free(s);
                for (size_t i = 0; i < crash_n[k]; i++)
                        free(crash_names[k][i]);
        }
        mgr_close(&m);
        close(ram);
        close(inflight);
        event_base_free(base);
        printf("ok: a crash at any point of a stash's rebuild: the manager holds the members (the copy "
               "under the alternate name), the next start takes them back and stores the group again\n");
}

/* Take what arrives and close it at once (a manager that keeps nothing),
 * running the store's loop meanwhile: until `want` messages came, or none
 * did within timeout_ms (want 0: until none is waiting).  How many came. */
static unsigned mgr_sink(struct mgr *m, struct event_base *base, size_t want, int timeout_ms) {
        unsigned n = 0;

        for (;;) {
                char text[512];
                int fd;

                if (want && n >= want)
                        return n;
                event_base_loop(base, EVLOOP_NONBLOCK);
                if (!mgr_recv(m, text, sizeof(text), &fd, timeout_ms))
                        return n;
                if (fd >= 0)
                        close(fd);
                n++;
        }
}

/* issue 14's scale: 10,000 devices (each one group for its socket, channel,
 * inflight fd and 2 rings' eventfds), 1,000 VMs (regions, shared objects),
 * 256 control connections: the names systemd passes back stay within the
 * LISTEN_FDNAMES budget, where a name per fd could not. */
static void test_group_budget(const char *dir) {
        enum { DEVICES = 10000, VMS = 1000, CONNS = 256, PER_DEVICE = 9 };
        struct event_base *base = event_base_new();
        struct vhub_fdstore_stats st;
        struct vhub_fdstore *s;
        size_t per_fd_names = 0;
        char group[VHUB_FD_GROUP_MAX];
        struct mgr m;
        int fds[PER_DEVICE], ram = memfd_create("ram", MFD_CLOEXEC);
        unsigned sunk = 0;

        CHECK(ram >= 0);
        for (int i = 0; i < PER_DEVICE; i++)
                fds[i] = efd();
        mgr_open(&m, dir, "notify-budget");
        /* as many as the daemon's unit would allow (FileDescriptorStoreMax=) */
        s = store_new(base, m.path, 65536);
        for (unsigned d = 1; d <= DEVICES; d++) {
                for (int i = 0; i < PER_DEVICE; i++) {
                        char name[128];

                        vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, d);
                        CHECK_EQ(vhub_fdstore_group_add(s, group, fds[i]), 0);
                        /* what a name per fd would have cost */
                        per_fd_names += (size_t)snprintf(name, sizeof(name), "dev/1000/vm%u/dev%u/ring%d.kick",
                                                         d / 10, d % 10, i) + 1;
                }
                if (d % 256 == 0) {
                        vhub_fdstore_sync(s);
                        sunk += mgr_sink(&m, base, 0, 0);
                }
        }
        /* ids come from one counter per kind: the daemon's own names */
        for (unsigned v = 1; v <= VMS; v++) {
                CHECK_EQ(vhub_fdstore_group_add(s, vhub_fd_group(group, VHUB_FD_GROUP_VM, v), ram), 0);
                CHECK_EQ(vhub_fdstore_group_add(s, vhub_fd_group(group, VHUB_FD_GROUP_SHARED, v), ram), 0);
        }
        for (unsigned c = 1; c <= CONNS; c++)
                CHECK_EQ(vhub_fdstore_group_add(s, vhub_fd_group(group, VHUB_FD_GROUP_CONNECTION, c),
                                                fds[0]), 0);
        CHECK(strcmp(vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, UINT64_MAX), "d3w5e11264sgsf") == 0);
        CHECK(strcmp(vhub_fd_group(group, VHUB_FD_GROUP_SHARED, 36), "o10") == 0);
        vhub_fdstore_sync(s);
        vhub_fdstore_get_stats(s, &st);
        sunk += mgr_sink(&m, base, st.stored - sunk, 1000);
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.failed, 0);
        CHECK(!vhub_fdstore_degraded(s));
        CHECK_EQ(st.stored, DEVICES + 2 * VMS + CONNS);
        CHECK_EQ(st.group_members, DEVICES * PER_DEVICE + 2 * VMS + CONNS);
        CHECK(st.names_bytes <= VHUB_FDSTORE_NAMES_BUDGET);
        CHECK(per_fd_names > VHUB_FDSTORE_NAMES_BUDGET);
        printf("ok: %u devices, %u VMs, %u connections: %zu fds in %zu groups, LISTEN_FDNAMES %zu bytes "
               "(budget %u; a name per fd: %zu)\n", DEVICES, VMS, CONNS, st.group_members, st.groups,
               st.names_bytes, (unsigned)VHUB_FDSTORE_NAMES_BUDGET, per_fd_names);
        vhub_fdstore_free(s);
        mgr_close(&m);
        for (int i = 0; i < PER_DEVICE; i++)
                close(fds[i]);
        close(ram);
        event_base_free(base);
}

/* Each uid's share of the store: the split, entries counted as they are
 * stored and removed (whoever owns them, whenever the owner said so), a
 * push past a non-root uid's share failing for it alone, root unbounded. */
static void test_share(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_fdstore_stats st;
        struct vhub_fdstore *s;
        unsigned per_uid, non_root;
        char group[VHUB_FD_GROUP_MAX];
        struct mgr m;
        int fd = efd(), snap = efd();

        mgr_open(&m, dir, "notify-share");
        s = store_new(base, m.path, 16);
        vhub_fdstore_share_limits(s, &per_uid, &non_root);
        CHECK_EQ(per_uid, 4);
        CHECK_EQ(non_root, 12);
        /* uid 1000's six devices: four fit its share, two are not stored */
        for (unsigned d = 1; d <= 6; d++) {
                vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, d);
                CHECK_EQ(vhub_fdstore_own(s, group, 1000), 0);
                CHECK_EQ(vhub_fdstore_group_add(s, group, fd), 0);
                if (d == 4)
                        vhub_fdstore_sync(s);   /* d1..d4 stored first */
        }
        vhub_fdstore_sync(s);
        mgr_pump(&m, base, 50);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 4);
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.stored, 4);
        CHECK_EQ(st.failed, 2);
        CHECK_EQ(m.n, 4);
        CHECK_EQ(vhub_fdstore_share_check(s, 1000, 1), -EDQUOT);
        /* root's part is kept, and root is not bounded by a share */
        CHECK_EQ(vhub_fdstore_share_check(s, 0, 12), 0);
        for (unsigned d = 7; d <= 10; d++) {
                vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, d);
                CHECK_EQ(vhub_fdstore_own(s, group, 0), 0);
                CHECK_EQ(vhub_fdstore_group_add(s, group, fd), 0);
        }
        vhub_fdstore_sync(s);
        mgr_pump(&m, base, 50);
        CHECK_EQ(vhub_fdstore_stored_by(s, 0), 4);
        CHECK_EQ(m.n, 8);
        /* a removal gives the entry back; an owner gone (disowned) keeps
         * counting what it left stored until that is removed */
        CHECK_EQ(vhub_fdstore_group_remove(s, vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, 1), fd), 0);
        vhub_fdstore_sync(s);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 3);
        CHECK_EQ(vhub_fdstore_share_check(s, 1000, 1), 0);
        CHECK_EQ(vhub_fdstore_share_check(s, 1000, 2), -EDQUOT);
        vhub_fdstore_disown(s, vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, 2));
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 3);
        CHECK_EQ(vhub_fdstore_group_remove(s, group, fd), 0);
        vhub_fdstore_sync(s);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 2);
        /* the failed ones go without touching the count */
        for (unsigned d = 5; d <= 6; d++)
                CHECK_EQ(vhub_fdstore_group_remove(s, vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, d), fd), 0);
        vhub_fdstore_sync(s);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 2);
        vhub_fdstore_get_stats(s, &st);
        CHECK_EQ(st.failed, 0);
        /* the non-root uids together: uid 1000 holds 2, uid 2000 4, uid
         * 3000 4 -> a fourth uid may add 2, not 3 (root's quarter) */
        for (unsigned d = 13; d <= 20; d++) {
                vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, d);
                CHECK_EQ(vhub_fdstore_own(s, group, d <= 16 ? 2000 : 3000), 0);
                CHECK_EQ(vhub_fdstore_group_add(s, group, fd), 0);
        }
        vhub_fdstore_sync(s);
        mgr_pump(&m, base, 50);
        CHECK_EQ(vhub_fdstore_stored_by(s, 2000), 4);
        CHECK_EQ(vhub_fdstore_stored_by(s, 3000), 4);
        CHECK_EQ(vhub_fdstore_share_check(s, 4000, 2), 0);
        CHECK_EQ(vhub_fdstore_share_check(s, 4000, 3), -EDQUOT);
        /* a name stored before its owner came back (a restart's): counted
         * when it is owned; one nobody owns counts for nobody */
        CHECK_EQ(vhub_fdstore_push(s, snap, "s1"), 0);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 2);
        CHECK_EQ(vhub_fdstore_own(s, "s1", 1000), 0);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 3);
        CHECK_EQ(vhub_fdstore_own(s, "s1", 1000), 0);   /* twice: counted once */
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 3);
        CHECK_EQ(vhub_fdstore_remove(s, "s1"), 0);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000), 2);
        vhub_fdstore_disown(s, "s1");
        for (unsigned d = 3; d <= 20; d++)
                if (d < 5 || d > 6)
                        (void)vhub_fdstore_group_remove(s, vhub_fd_group(group, VHUB_FD_GROUP_DEVICE, d), fd);
        vhub_fdstore_sync(s);
        mgr_pump(&m, base, 50);
        CHECK_EQ(vhub_fdstore_stored_by(s, 1000) + vhub_fdstore_stored_by(s, 2000) +
                 vhub_fdstore_stored_by(s, 3000) + vhub_fdstore_stored_by(s, 0), 0);
        CHECK_EQ(m.n, 0);
        vhub_fdstore_free(s);
        mgr_close(&m);
        /* the split of the smallest stores */
        {
                struct vhub_fdstore_share sh;

                CHECK_EQ(vhub_fdstore_share_init(&sh, 1), 0);
                CHECK_EQ(sh.per_uid, 1);
                CHECK_EQ(sh.non_root, 0);
                CHECK_EQ(vhub_fdstore_share_room(&sh, 1000, 1), -EDQUOT);
                CHECK_EQ(vhub_fdstore_share_room(&sh, 0, 1), 0);
                vhub_fdstore_share_done(&sh);
                CHECK_EQ(vhub_fdstore_share_init(&sh, 16384), 0);
                CHECK_EQ(sh.per_uid, 4096);
                CHECK_EQ(sh.non_root, 12288);
                vhub_fdstore_share_done(&sh);
        }
        close(fd);
        close(snap);
        event_base_free(base);
        printf("ok: each uid's share of the store: a quarter per non-root uid, root's quarter kept, "
               "counted as entries are stored and removed\n");
}

/* LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES as systemd sets them, in a child so
 * that fds 3 and 4 are free. */
static void test_restore_env(void) {
        pid_t pid = fork();
        int status;

        CHECK(pid >= 0);
        if (pid == 0) {
                struct vhub_fdstore_restore *r;
                int a = efd(), b = memfd_create("m", MFD_CLOEXEC);
                char spid[16];

                a = fcntl(a, F_DUPFD_CLOEXEC, 100);
                b = fcntl(b, F_DUPFD_CLOEXEC, 101);
                CHECK(dup2(a, 3) == 3 && dup2(b, 4) == 4);      /* inherited: no CLOEXEC */
                snprintf(spid, sizeof(spid), "%d", getpid());
                setenv("LISTEN_PID", spid, 1);
                setenv("LISTEN_FDS", "2", 1);
                setenv("LISTEN_FDNAMES", "only-one-name", 1);
                /* names that do not match the count: refused, nothing closed */
                CHECK_EQ(vhub_fdstore_restore_from_env(NULL, &r), -EINVAL);
                CHECK(fcntl(3, F_GETFD) >= 0 && fcntl(4, F_GETFD) >= 0);
                setenv("LISTEN_PID", spid, 1);
                setenv("LISTEN_FDS", "2", 1);
                setenv("LISTEN_FDNAMES", "ctl/listen:vm/0/v/region/0", 1);
                CHECK_EQ(vhub_fdstore_restore_from_env(NULL, &r), 0);
                CHECK(!getenv("LISTEN_FDS") && !getenv("LISTEN_PID") && !getenv("LISTEN_FDNAMES"));
                CHECK_EQ(vhub_fdstore_take(r, "vm/0/v/region/0"), 4);
                CHECK_EQ(vhub_fdstore_take(r, "ctl/listen"), 3);
                CHECK(fcntl(3, F_GETFD) & FD_CLOEXEC);  /* every fd O_CLOEXEC */
                CHECK(same_file(3, a) && same_file(4, b));
                CHECK_EQ(vhub_fdstore_restore_finish(r), 0);
                /* LISTEN_PID of another process: not ours */
                setenv("LISTEN_PID", "1", 1);
                setenv("LISTEN_FDS", "2", 1);
                CHECK_EQ(vhub_fdstore_restore_from_env(NULL, &r), 0);
                CHECK_EQ(vhub_fdstore_restore_count(r), 0);
                vhub_fdstore_restore_finish(r);
                _exit(0);
        }
        CHECK_EQ(waitpid(pid, &status, 0), pid);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        printf("ok: LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES parsed by sd_listen_fds_with_names(), then unset\n");
}

/* ---- the turn's commit (vhub-commit.h): what waits for it runs after it,
 * from the loop, in order; a commit made at once runs none of it ---- */

struct turn_wait {
        struct vhub_commit_wait w;
        struct turn_log *log;
        int id;
        struct turn_wait *queue_next;   /* queued when this one runs */
};

struct turn_log {
        struct vhub_context *ctx;
        unsigned commits;               /* the daemon's snapshot "written" */
        int order[8];
        unsigned commits_seen[8];       /* commits made before each ran */
        unsigned n;
};

static void turn_commit_daemon(void *userdata) {
        ((struct turn_log *)userdata)->commits++;
}

static void turn_run(struct vhub_commit_wait *w) {
        struct turn_wait *t = (struct turn_wait *)w;
        struct turn_log *log = t->log;

        CHECK(!vhub_commit_waiting(w));
        CHECK(log->n < 8);
        log->commits_seen[log->n] = log->commits;
        log->order[log->n++] = t->id;
        if (t->queue_next) {
                /* the next turn's: its change is written first */
                vhub_changed(log->ctx, NULL);
                vhub_commit_after(log->ctx, &t->queue_next->w);
        }
}

static void test_commit_turn(const char *dir) {
        struct event_base *base = event_base_new();
        struct vhub_context ctx = { .base = base };
        struct turn_log log = { .ctx = &ctx };
        struct turn_wait w[5];
        struct mgr m;

        for (int i = 0; i < 5; i++)
                w[i] = (struct turn_wait){ .w.run = turn_run, .log = &log, .id = i + 1 };
        w[0].queue_next = &w[2];
        mgr_open(&m, dir, "notify-turn");
        ctx.fdstore = store_new(base, m.path, 0);
        CHECK_EQ(vhub_commit_setup(&ctx), 0);
        CHECK(vhub_commit_enabled(&ctx));
        ctx.commit_daemon = turn_commit_daemon;
        ctx.commit_userdata = &log;

        vhub_changed(&ctx, NULL);
        vhub_commit_after(&ctx, &w[0].w);
        vhub_commit_after(&ctx, &w[1].w);
        vhub_commit_after(&ctx, &w[3].w);
        CHECK(vhub_commit_waiting(&w[3].w));
        vhub_commit_wait_cancel(&w[3].w);
        CHECK(!vhub_commit_waiting(&w[3].w));
        vhub_commit_wait_cancel(&w[3].w);      /* not queued: nothing */
        /* at once: written, but nothing waiting runs inside it */
        vhub_commit_now(&ctx);
        CHECK_EQ(log.commits, 1u);
        CHECK_EQ(log.n, 0u);
        /* the turn: one commit (nothing dirty is written again), then 1 and 2
         * in order; 3, queued by 1, waits for the next turn's commit */
        CHECK_EQ(event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK), 0);
        CHECK(log.n >= 2);
        CHECK_EQ(log.order[0], 1);
        CHECK_EQ(log.order[1], 2);
        CHECK_EQ(log.commits_seen[0], 1u);
        CHECK_EQ(log.commits_seen[1], 1u);
        while (log.n < 3)
                CHECK_EQ(event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK), 0);
        CHECK_EQ(log.order[2], 3);
        CHECK_EQ(log.commits_seen[2], 2u);     /* its own turn's commit came first */
        /* a wait cancelled before its turn never runs; a pending one goes
         * with the commits (vhub_commit_done()) */
        vhub_commit_after(&ctx, &w[4].w);
        vhub_commit_done(&ctx);
        CHECK(!vhub_commit_waiting(&w[4].w));
        CHECK(event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK) >= 0);
        CHECK_EQ(log.n, 3u);
        CHECK_EQ(log.commits, 2u);
        ctx.fdstore = vhub_fdstore_free(ctx.fdstore);
        mgr_close(&m);
        event_base_free(base);
        printf("ok: the turn's commit runs what waits for it after it, in order, from the loop only; "
               "a wait queued meanwhile waits for the next turn's; a cancelled one never runs\n");
}

int main(void) {
        char dir[] = "/tmp/vhub-test-fdstore-XXXXXX";
        struct rlimit rl;
        int fds_before;

        setvbuf(stdout, NULL, _IOLBF, 0);
        vhub_log_setup(LOG_ERR, false);
        /* the full-queue test holds a few thousand fds */
        CHECK_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
        rl.rlim_cur = rl.rlim_max;
        (void) setrlimit(RLIMIT_NOFILE, &rl);
        CHECK(mkdtemp(dir));
        fds_before = vhub_count_open_fds();
        test_names();
        test_disabled();
        test_messages(dir);
        test_full_queue(dir);
        test_queue_order(dir);
        test_failures(dir);
        test_aliases(dir);
        test_restore(dir);
        test_groups(dir);
        test_group_restore(dir);
        test_group_restore_big(dir);
        test_group_rebuild_crash(dir);
        test_group_budget(dir);
        test_share(dir);
        test_restore_env();
        test_commit_turn(dir);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
        printf("ok: no fd leaked\n");
        rmdir(dir);
        return 0;
}
