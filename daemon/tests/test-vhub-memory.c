/* SPDX-License-Identifier: MIT */
/*
 * The VM memory table (daemon/vhub-memory.c): validation of a new region
 * (backing fd type and size, page alignment, overlap in guest-physical and
 * user address space, wraparound), lookup and translation at region edges,
 * find/remove by gpa and id, and who owns which fd.
 *
 *   test-vhub-memory
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-memory.h"

#define KiB (UINT64_C(1) << 10)
#define MiB (UINT64_C(1) << 20)

static int make_memfd(uint64_t size) {
        int fd = memfd_create("test-vhub-memory", MFD_CLOEXEC);

        CHECK(fd >= 0);
        CHECK(ftruncate(fd, (off_t)size) == 0);
        return fd;
}

static bool fd_open(int fd) {
        return fcntl(fd, F_GETFD) >= 0;
}

static struct vhub_region region(uint64_t gpa, uint64_t size, uint64_t offset, uint64_t uaddr,
                                 int fd) {
        return (struct vhub_region){ .gpa = gpa, .size = size, .offset = offset, .uaddr = uaddr,
                                     .fd = fd, .page_size = 0 };
}

/* check_new must refuse r with -32009 and a detail, and leave r->fd open. */
static void expect_bad(const struct vhub_mem_table *t, struct vhub_region r, const char *what) {
        struct vhub_error err = { 0 };
        bool was_open = r.fd >= 0 && fd_open(r.fd);
        int k = vhub_mem_table_check_new(t, &r, &err);

        if (k >= 0 || err.code != VHUB_ERR_REGION || !err.detail[0]) {
                fprintf(stderr, "expected -32009 for %s, got r=%d code=%d detail='%s'\n", what, k,
                        err.code, err.detail);
                exit(1);
        }
        if (was_open)
                CHECK(fd_open(r.fd)); /* "Does not take r->fd" */
        printf("ok: refused %s: %s\n", what, err.detail);
}

static void expect_good(const struct vhub_mem_table *t, struct vhub_region *r, const char *what) {
        struct vhub_error err = { 0 };
        int k = vhub_mem_table_check_new(t, r, &err);

        if (k < 0) {
                fprintf(stderr, "expected %s to be accepted, got %d: %s\n", what, k, err.detail);
                exit(1);
        }
        CHECK(err.code == 0);
        printf("ok: accepted %s\n", what);
}

/* Add r after checking it; the table owns r.fd afterwards. */
static void add(struct vhub_mem_table *t, struct vhub_region r, uint64_t id) {
        expect_good(t, &r, "a region to add");
        r.id = id;
        CHECK(vhub_mem_table_add(t, &r) == 0);
        CHECK(r.fd == -1); /* taken */
}

static void test_empty(void) {
        struct vhub_mem_table t;
        uint64_t ua = 0xdead;
        char buf[8];

        vhub_mem_table_init(&t);
        CHECK(t.n == 0);
        CHECK(!vhub_mem_table_lookup(&t, 0, 1));
        CHECK(!vhub_mem_table_find_gpa(&t, 0));
        CHECK(!vhub_mem_table_find_id(&t, 1));
        CHECK(vhub_mem_table_gpa_to_uaddr(&t, 0, 1, &ua) == -ERANGE);
        CHECK(ua == 0xdead);
        CHECK(vhub_mem_table_end(&t) == 0);
        CHECK(vhub_mem_table_remove(&t, 0, NULL) == -ENOENT);
        CHECK(vhub_mem_table_read(&t, 0, buf, sizeof(buf)) == -ERANGE);
        vhub_mem_table_done(&t);
        vhub_mem_table_done(&t); /* done twice is harmless */
        printf("ok: empty table\n");
}

static void test_backing(void) {
        struct vhub_mem_table t;
        struct vhub_region r;
        int fd, pfd[2], sfd[2], ro, dn;
        char path[64];

        vhub_mem_table_init(&t);

        /* page size without hugetlbfs: 4096 for a memfd */
        fd = make_memfd(1 * MiB);
        r = region(0x100000, 1 * MiB, 0, 0x7f0000100000, fd);
        expect_good(&t, &r, "a 1 MiB memfd");
        CHECK(r.page_size == 4096);
        CHECK(fd_open(fd));

        /* offset + size exactly at the end of the fd is fine; one page more is not */
        r = region(0, 512 * KiB, 512 * KiB, 0, fd);
        expect_good(&t, &r, "offset + size == fd size");
        expect_bad(&t, region(0, 512 * KiB + 4096, 512 * KiB, 0, fd), "offset + size beyond the fd");
        expect_bad(&t, region(0, 2 * MiB, 0, 0, fd), "size beyond the fd");
        expect_bad(&t, region(0, 4096, 1 * MiB, 0, fd), "offset at the end of the fd");
        expect_bad(&t, region(0, 4096, 2 * MiB, 0, fd), "offset beyond the fd");
        expect_bad(&t, region(0, 0, 0, 0, fd), "size 0");

        /* alignment to the backing page size */
        expect_bad(&t, region(0x800, 4096, 0, 0x1000, fd), "unaligned gpa");
        expect_bad(&t, region(0x1000, 0x1800, 0, 0x1000, fd), "unaligned size");
        expect_bad(&t, region(0x1000, 4096, 0x200, 0x1000, fd), "unaligned offset");
        expect_bad(&t, region(0x1000, 4096, 0, 0x1001, fd), "unaligned uaddr");

        /* wraparound of gpa, uaddr or offset + size */
        expect_bad(&t, region(UINT64_MAX - 0xfff, 0x2000, 0, 0x1000, fd), "gpa + size wraps");
        expect_bad(&t, region(0x1000, 0x2000, 0, UINT64_MAX - 0xfff, fd), "uaddr + size wraps");
        expect_bad(&t, region(0x1000, 0x2000, UINT64_MAX - 0xfff, 0x1000, fd), "offset + size wraps");
        expect_bad(&t, region(0x1000, UINT64_MAX, 0, 0x1000, fd), "size 2^64 - 1");
        /* close to the top without wrapping is fine */
        r = region(UINT64_MAX - 0x1fff, 0x1000, 0, UINT64_MAX - 0x3fff, fd);
        expect_good(&t, &r, "a page just below the top of both address spaces");

        /* unusable fd types; none of them is taken or closed */
        CHECK(pipe2(pfd, O_CLOEXEC) == 0);
        expect_bad(&t, region(0, 4096, 0, 0, pfd[1]), "a pipe");
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sfd) == 0);
        expect_bad(&t, region(0, 4096, 0, 0, sfd[0]), "a socket");
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        ro = open(path, O_RDONLY | O_CLOEXEC);
        CHECK(ro >= 0);
        expect_bad(&t, region(0, 4096, 0, 0, ro), "a read-only fd of a memfd");
        dn = open("/dev/null", O_RDWR | O_CLOEXEC);
        CHECK(dn >= 0);
        expect_bad(&t, region(0, 4096, 0, 0, dn), "/dev/null");
        expect_bad(&t, region(0, 4096, 0, 0, -1), "fd -1");
        close(dn);
        expect_bad(&t, region(0, 4096, 0, 0, dn), "a closed fd number");
        close(pfd[0]);
        close(pfd[1]);
        close(sfd[0]);
        close(sfd[1]);
        close(ro);

        /* a read-write regular file is a valid backing ("a shared file") */
        {
                char tmpl[] = "/tmp/test-vhub-memory-XXXXXX";
                int f = mkstemp(tmpl);

                CHECK(f >= 0);
                unlink(tmpl);
                CHECK(ftruncate(f, 64 * KiB) == 0);
                r = region(0, 64 * KiB, 0, 0, f);
                expect_good(&t, &r, "a read-write regular file");
                CHECK(r.page_size == 4096);
                close(f);
        }
        close(fd);
        vhub_mem_table_done(&t);
}

/* With a hugetlbfs memfd, alignment is to the huge page size.  Hugetlb may be
 * unavailable (no hugetlbfs, no pages): then this part says so and passes. */
static void test_hugetlb(void) {
        struct vhub_mem_table t;
        struct vhub_region r;
        struct statfs sfs;
        uint64_t huge;
        int fd;

        fd = memfd_create("test-vhub-memory-huge", MFD_CLOEXEC | MFD_HUGETLB);
        if (fd < 0) {
                printf("note: no MFD_HUGETLB here (%s): huge page alignment not tested\n",
                       strerror(errno));
                return;
        }
        CHECK(fstatfs(fd, &sfs) == 0);
        CHECK((unsigned long)sfs.f_type == (unsigned long)HUGETLBFS_MAGIC);
        huge = (uint64_t)sfs.f_bsize;
        if (ftruncate(fd, (off_t)(2 * huge)) < 0) {
                printf("note: cannot size a hugetlb memfd (%s): huge page alignment not tested\n",
                       strerror(errno));
                close(fd);
                return;
        }
        vhub_mem_table_init(&t);
        r = region(0, 2 * huge, 0, 0x7f0000000000, fd);
        expect_good(&t, &r, "a hugetlbfs memfd");
        CHECK(r.page_size == huge);
        expect_bad(&t, region(4096, huge, 0, 0x7f0000000000, fd), "gpa aligned to 4 KiB only (hugetlbfs)");
        expect_bad(&t, region(0, 4096, 0, 0x7f0000000000, fd), "size of 4 KiB (hugetlbfs)");
        expect_bad(&t, region(0, huge, 4096, 0x7f0000000000, fd), "offset of 4 KiB (hugetlbfs)");
        expect_bad(&t, region(0, huge, 0, 0x7f0000001000, fd), "uaddr aligned to 4 KiB only (hugetlbfs)");
        close(fd);
        vhub_mem_table_done(&t);
}

static void test_overlap(void) {
        struct vhub_mem_table t;
        struct vhub_region r;
        const uint64_t A = 0x100000, U = 0x7f0000100000; /* region [A, A+1M) at uaddr U */
        int fd = make_memfd(4 * MiB), a;

        vhub_mem_table_init(&t);
        a = make_memfd(1 * MiB);
        add(&t, region(A, 1 * MiB, 0, U, a), 1);

        /* guest-physical overlap, user addresses far apart */
        expect_bad(&t, region(A, 1 * MiB, 0, 0x10000000, fd), "the same gpa range");
        expect_bad(&t, region(A + 0x80000, 64 * KiB, 0, 0x10000000, fd), "a gpa range inside");
        expect_bad(&t, region(A - 64 * KiB, 128 * KiB, 0, 0x10000000, fd), "a gpa range over the start");
        expect_bad(&t, region(A + 1 * MiB - 4096, 8192, 0, 0x10000000, fd), "a gpa range over the end");
        expect_bad(&t, region(0, 4 * MiB, 0, 0x10000000, fd), "a gpa range covering it");
        expect_bad(&t, region(A + 1 * MiB - 4096, 4096, 0, 0x10000000, fd), "its last gpa page");
        expect_bad(&t, region(A, 4096, 0, 0x10000000, fd), "its first gpa page");

        /* user address overlap, guest-physical ranges apart */
        expect_bad(&t, region(0x10000000, 1 * MiB, 0, U, fd), "the same uaddr range");
        expect_bad(&t, region(0x10000000, 64 * KiB, 0, U + 0x80000, fd), "a uaddr range inside");
        expect_bad(&t, region(0x10000000, 128 * KiB, 0, U - 64 * KiB, fd), "a uaddr range over the start");
        expect_bad(&t, region(0x10000000, 8192, 0, U + 1 * MiB - 4096, fd), "a uaddr range over the end");
        expect_bad(&t, region(0x10000000, 4 * MiB, 0, U - 1 * MiB, fd), "a uaddr range covering it");

        /* adjacent on either side, in both spaces, is fine */
        r = region(A - 64 * KiB, 64 * KiB, 0, U - 64 * KiB, fd);
        expect_good(&t, &r, "adjacent below in gpa and uaddr");
        r = region(A + 1 * MiB, 64 * KiB, 0, U + 1 * MiB, fd);
        expect_good(&t, &r, "adjacent above in gpa and uaddr");
        /* the same backing fd range may back two regions (offsets are not exclusive) */
        r = region(0x20000000, 1 * MiB, 0, 0x30000000, fd);
        expect_good(&t, &r, "an fd range another region uses too");

        /* a second region: overlap with either is caught */
        add(&t, region(0x20000000, 1 * MiB, 0, 0x7f0020000000, make_memfd(1 * MiB)), 2);
        expect_bad(&t, region(0x20080000, 4096, 0, 0x40000000, fd), "the second region's gpa range");
        expect_bad(&t, region(0x40000000, 4096, 0, 0x7f00200ff000, fd), "the second region's last uaddr page");
        r = region(0x40000000, 4096, 0, 0x40000000, fd);
        expect_good(&t, &r, "a region apart from both");

        close(fd);
        vhub_mem_table_done(&t);
        CHECK(!fd_open(a)); /* done closed the table's fds (no fd was opened since) */
}

static void test_lookup_translate(void) {
        struct vhub_mem_table t;
        const struct vhub_region *g;
        uint64_t ua;
        int fa = make_memfd(2 * MiB), fb = make_memfd(1 * MiB);
        char buf[4];

        vhub_mem_table_init(&t);
        /* A: [1M, 2M) backed at offset 1M of a 2 MiB memfd, uaddr 0x7f0000000000
         * B: [2M, 3M) adjacent in gpa, uaddr far away */
        CHECK(pwrite(fa, "ABCD", 4, (off_t)(1 * MiB)) == 4);                  /* A's first bytes */
        CHECK(pwrite(fa, "wxyz", 4, (off_t)(2 * MiB - 4)) == 4);              /* A's last bytes */
        CHECK(pwrite(fb, "1234", 4, 0) == 4);
        add(&t, region(1 * MiB, 1 * MiB, 1 * MiB, 0x7f0000000000, fa), 10);
        add(&t, region(2 * MiB, 1 * MiB, 0, 0x7e0000000000, fb), 11);

        g = vhub_mem_table_lookup(&t, 1 * MiB, 1);
        CHECK(g && g->id == 10);
        g = vhub_mem_table_lookup(&t, 2 * MiB - 1, 1);
        CHECK(g && g->id == 10);
        g = vhub_mem_table_lookup(&t, 1 * MiB, 1 * MiB);
        CHECK(g && g->id == 10);                                  /* the whole region */
        CHECK(!vhub_mem_table_lookup(&t, 1 * MiB, 1 * MiB + 1)); /* one byte into B */
        CHECK(!vhub_mem_table_lookup(&t, 2 * MiB - 1, 2));       /* spans A and B */
        g = vhub_mem_table_lookup(&t, 2 * MiB, 1);
        CHECK(g && g->id == 11);
        g = vhub_mem_table_lookup(&t, 3 * MiB - 1, 1);
        CHECK(g && g->id == 11);
        CHECK(!vhub_mem_table_lookup(&t, 3 * MiB, 1));           /* just past B */
        CHECK(!vhub_mem_table_lookup(&t, 1 * MiB - 1, 1));       /* just before A */
        CHECK(!vhub_mem_table_lookup(&t, 1 * MiB - 1, 2));       /* straddles A's start */
        CHECK(!vhub_mem_table_lookup(&t, 1 * MiB, 0));           /* empty range */
        CHECK(!vhub_mem_table_lookup(&t, UINT64_MAX, 2));        /* wraps */
        CHECK(!vhub_mem_table_lookup(&t, 1 * MiB + 8, UINT64_MAX)); /* wraps */
        printf("ok: lookup at region edges\n");

        CHECK(vhub_mem_table_gpa_to_uaddr(&t, 1 * MiB, 1, &ua) == 0 && ua == 0x7f0000000000);
        CHECK(vhub_mem_table_gpa_to_uaddr(&t, 2 * MiB - 16, 16, &ua) == 0 &&
              ua == 0x7f0000000000 + 1 * MiB - 16);
        CHECK(vhub_mem_table_gpa_to_uaddr(&t, 2 * MiB, 16, &ua) == 0 && ua == 0x7e0000000000);
        ua = 42;
        CHECK(vhub_mem_table_gpa_to_uaddr(&t, 2 * MiB - 8, 16, &ua) == -ERANGE);
        CHECK(vhub_mem_table_gpa_to_uaddr(&t, 3 * MiB, 1, &ua) == -ERANGE);
        CHECK(ua == 42); /* untouched on failure */
        printf("ok: gpa -> uaddr translation at region edges\n");

        CHECK(vhub_mem_table_end(&t) == 3 * MiB);

        /* read goes through the fd at the region's offset */
        CHECK(vhub_mem_table_read(&t, 1 * MiB, buf, 4) == 0 && memcmp(buf, "ABCD", 4) == 0);
        CHECK(vhub_mem_table_read(&t, 2 * MiB - 4, buf, 4) == 0 && memcmp(buf, "wxyz", 4) == 0);
        CHECK(vhub_mem_table_read(&t, 2 * MiB, buf, 4) == 0 && memcmp(buf, "1234", 4) == 0);
        CHECK(vhub_mem_table_read(&t, 2 * MiB - 2, buf, 4) == -ERANGE);
        CHECK(vhub_mem_table_read(&t, 3 * MiB - 2, buf, 4) == -ERANGE);
        printf("ok: reads at region edges, through the offset\n");

        vhub_mem_table_done(&t);
}

static void test_find_remove(void) {
        struct vhub_mem_table t;
        const struct vhub_region *g;
        int fds[20], out = -1;

        vhub_mem_table_init(&t);
        /* more than the initial capacity: the table grows and keeps everything */
        for (unsigned i = 0; i < 20; i++) {
                fds[i] = make_memfd(64 * KiB);
                add(&t, region((uint64_t)i * MiB, 64 * KiB, 0, 0x7f0000000000 + (uint64_t)i * MiB,
                               fds[i]), 100 + i);
        }
        CHECK(t.n == 20);
        for (unsigned i = 0; i < 20; i++) {
                g = vhub_mem_table_find_gpa(&t, (uint64_t)i * MiB);
                CHECK(g && g->id == 100 + i && g->fd == fds[i]);
                g = vhub_mem_table_find_id(&t, 100 + i);
                CHECK(g && g->gpa == (uint64_t)i * MiB);
        }
        CHECK(!vhub_mem_table_find_gpa(&t, 4096));      /* inside region 0, not its start */
        CHECK(!vhub_mem_table_find_id(&t, 99));
        CHECK(!vhub_mem_table_find_id(&t, 120));
        CHECK(vhub_mem_table_end(&t) == 19 * MiB + 64 * KiB);

        /* remove with ret_fd: the fd moves to the caller, still open */
        CHECK(vhub_mem_table_remove(&t, 5 * MiB, &out) == 0);
        CHECK(out == fds[5] && fd_open(out));
        close(out);
        CHECK(t.n == 19);
        CHECK(!vhub_mem_table_find_id(&t, 105));
        CHECK(!vhub_mem_table_find_gpa(&t, 5 * MiB));
        CHECK(!vhub_mem_table_lookup(&t, 5 * MiB, 1));
        /* everything after it is still found (the array was compacted) */
        for (unsigned i = 6; i < 20; i++) {
                g = vhub_mem_table_find_id(&t, 100 + i);
                CHECK(g && g->gpa == (uint64_t)i * MiB && g->fd == fds[i]);
        }
        /* remove without ret_fd closes the fd */
        CHECK(vhub_mem_table_remove(&t, 19 * MiB, NULL) == 0);
        CHECK(!fd_open(fds[19]));
        CHECK(vhub_mem_table_end(&t) == 18 * MiB + 64 * KiB);
        /* not at a region start, or already removed */
        CHECK(vhub_mem_table_remove(&t, 4096, NULL) == -ENOENT);
        CHECK(vhub_mem_table_remove(&t, 5 * MiB, NULL) == -ENOENT);
        CHECK(t.n == 18);
        /* the freed range can be used again */
        {
                struct vhub_region r = region(5 * MiB, 64 * KiB, 0, 0x7f0000000000 + 5 * MiB,
                                              make_memfd(64 * KiB));

                expect_good(&t, &r, "the range of a removed region");
                r.id = 200;
                CHECK(vhub_mem_table_add(&t, &r) == 0);
                g = vhub_mem_table_lookup(&t, 5 * MiB + 100, 10);
                CHECK(g && g->id == 200);
        }
        printf("ok: find and remove by gpa and id\n");
        vhub_mem_table_done(&t);
        for (unsigned i = 0; i < 19; i++)
                if (i != 5)
                        CHECK(!fd_open(fds[i])); /* done closed every region fd */
        CHECK(t.n == 0 && t.regions == NULL);
}

int main(void) {
        test_empty();
        test_backing();
        test_hugetlb();
        test_overlap();
        test_lookup_translate();
        test_find_remove();
        printf("PASS: test-vhub-memory\n");
        return 0;
}
