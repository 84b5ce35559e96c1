/* SPDX-License-Identifier: MIT */
/*
 * The fd budget (daemon/vhub-fd-budget.c): how RLIMIT_NOFILE is split
 * (reserve, per uid, the non-root share, --max-fds-per-uid clamped), and
 * which uid a check stops where: per uid, the non-root share, root only
 * at the reserve, and the slack for fds that already arrived.
 *
 *   test-vhub-fd-budget
 */
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

#include "vhub-check.h"
#include "vhub-fd-budget.h"

static struct vhub_fd_usage usage(uid_t uid, unsigned by_uid, unsigned non_root, unsigned total) {
        return (struct vhub_fd_usage){ .uid = uid, .by_uid = by_uid, .non_root = non_root, .total = total };
}

static void test_split(void) {
        struct vhub_fd_budget b;

        vhub_fd_budget_split(&b, 512, 0);
        CHECK(b.limit == 512 && b.reserve == 64 && b.per_uid == 112 && b.non_root == 336);

        vhub_fd_budget_split(&b, 65536, 0);     /* the unit's LimitNOFILE */
        CHECK(b.limit == 65536 && b.reserve == 8192 && b.per_uid == 14336);
        CHECK(b.non_root == 65536 - 8192 - 14336);

        /* the option, and what it is clamped to */
        vhub_fd_budget_split(&b, 65536, 1000);
        CHECK(b.per_uid == 1000 && b.non_root == 65536 - 8192 - 1000);
        vhub_fd_budget_split(&b, 65536, 1u << 30);
        CHECK(b.per_uid == (65536 - 8192) / 2);     /* root keeps as much */
        vhub_fd_budget_split(&b, 65536, 1);
        CHECK(b.per_uid == 16);

        /* a tiny limit: half of it stays in reserve */
        vhub_fd_budget_split(&b, 100, 0);
        CHECK(b.reserve == 50 && b.per_uid == 16 && b.non_root == 34);
}

/* The soft limit is raised to the hard one (lowering the soft limit needs
 * no privilege, so this works as any user). */
static void test_raise(void) {
        struct vhub_fd_budget b;
        struct rlimit rl, lower;

        CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
        if (rl.rlim_max == RLIM_INFINITY || rl.rlim_max <= 64) {
                fprintf(stderr, "hard RLIMIT_NOFILE %llu: raising not checked\n",
                        (unsigned long long)rl.rlim_max);
                return;
        }
        lower = (struct rlimit){ .rlim_cur = 64, .rlim_max = rl.rlim_max };
        CHECK(setrlimit(RLIMIT_NOFILE, &lower) == 0);
        vhub_fd_budget_setup(&b, 0);
        CHECK(getrlimit(RLIMIT_NOFILE, &lower) == 0);
        CHECK(lower.rlim_cur == rl.rlim_max);
        CHECK(b.limit == (rl.rlim_max > (1u << 30) ? 1u << 30 : (unsigned)rl.rlim_max));
}

static void test_check(void) {
        struct vhub_fd_budget b = { .limit = 512, .reserve = 64, .per_uid = 112, .non_root = 336 };
        struct vhub_fd_usage u;
        struct vhub_error err = { 0 };

        /* per uid */
        u = usage(1000, 111, 200, 210);
        CHECK(vhub_fd_budget_check(&b, &u, 1, 0, &err) == 0);
        CHECK(vhub_fd_budget_check(&b, &u, 2, 0, &err) < 0);
        CHECK(err.code == VHUB_ERR_LIMIT && strstr(err.detail, "--max-fds-per-uid"));
        /* fds that already arrived may pass it by the slack */
        u = usage(1000, 120, 200, 210);
        CHECK(vhub_fd_budget_check(&b, &u, 0, 16, &err) == 0);
        u = usage(1000, 129, 200, 210);
        CHECK(vhub_fd_budget_check(&b, &u, 0, 16, &err) < 0);

        /* the non-root share, without naming the other uids' numbers */
        memset(&err, 0, sizeof(err));
        u = usage(1000, 10, 336, 350);
        CHECK(vhub_fd_budget_check(&b, &u, 1, 0, &err) < 0);
        CHECK(strstr(err.detail, "non-root") && !strstr(err.detail, "336 fds"));

        /* root: only the reserve */
        u = usage(0, 100, 336, 447);
        CHECK(vhub_fd_budget_check(&b, &u, 1, 0, &err) == 0);
        CHECK(vhub_fd_budget_check(&b, &u, 2, 0, &err) < 0);
        CHECK(strstr(err.detail, "reserve"));
}

static void test_usage_add(void) {
        struct vhub_fd_usage u = { .uid = 1000 };

        vhub_fd_usage_add(&u, 1000, 3);
        vhub_fd_usage_add(&u, 1001, 5);
        vhub_fd_usage_add(&u, 0, 7);
        CHECK(u.by_uid == 3 && u.non_root == 8 && u.total == 15);
}

int main(void) {
        test_split();
        test_raise();
        test_check();
        test_usage_add();
        return 0;
}
