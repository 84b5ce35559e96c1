/* SPDX-License-Identifier: MIT */
/*
 * The fd budget (daemon/vhub-fd-budget.c): how RLIMIT_NOFILE is split
 * (reserve, per uid, the non-root share, --max-fds-per-uid clamped), and
 * which uid a check stops where: per uid, the non-root share, root only
 * at the reserve, and the slack for fds that already arrived.  The ledger
 * of what each uid holds: sums per uid and in all as VMs change and go, a
 * change nobody marked found and healed at --log-level debug, no fd leaked.
 * daemon.info's counts per uid, kept as VMs and devices come and go.
 *
 *   test-vhub-fd-budget
 */
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-context.h"
#include "vhub-device-internal.h"
#include "vhub-fd-budget.h"
#include "vhub-log.h"
#include "vhub-vm.h"

static struct vhub_fd_usage usage(uid_t uid, unsigned by_uid, unsigned non_root, unsigned total) {
        return (struct vhub_fd_usage){ .uid = uid, .by_uid = by_uid, .non_root = non_root, .total = total };
}

static void test_split(void) {
        struct vhub_fd_budget b;

        vhub_fd_budget_split(&b, 512, 0);
        CHECK(b.limit == 512 && b.reserve == 64 && b.per_uid == 112 && b.non_root == 336);

        vhub_fd_budget_split(&b, 131072, 0);    /* the unit's LimitNOFILE */
        CHECK(b.limit == 131072 && b.reserve == 16384 && b.per_uid == 28672);
        CHECK(b.non_root == 86016);             /* 10,000 started devices: ~65,000 */

        vhub_fd_budget_split(&b, 65536, 0);
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

static struct vhub_fd_usage model_usage(struct vhub_context *ctx, uid_t uid) {
        struct vhub_fd_usage u = { .uid = uid };

        vhub_fd_usage_add_model(ctx, &u);
        return u;
}

static void export(struct vhub_vm *vm, unsigned n) {
        static uint8_t next;
        struct vhub_error err = { 0 };

        for (unsigned i = 0; i < n; i++) {
                uint8_t uuid[16] = { [0] = ++next };
                int fd = eventfd(0, EFD_CLOEXEC);

                CHECK(fd >= 0);
                CHECK(vhub_vm_shared_add(vm, uuid, fd, &err) == 0);
        }
}

#define CHECK_USAGE(ctx, uid, by, nr, tot)                                           \
        do {                                                                         \
                struct vhub_fd_usage _u = model_usage((ctx), (uid));                 \
                CHECK_EQ(_u.by_uid, (by));                                           \
                CHECK_EQ(_u.non_root, (nr));                                         \
                CHECK_EQ(_u.total, (tot));                                           \
        } while (0)

/* The ledger through the model's own calls (a VM's shared objects hold fds). */
static void test_ledger(void) {
        struct vhub_config cfg;
        struct vhub_context ctx;
        struct vhub_cred cred = { .uid = 1000 }, root = { .uid = 0 };
        struct vhub_error err = { 0 };
        struct vhub_vm *a, *b, *r;
        uint8_t first[16] = { 0 };
        int fds_before = vhub_count_open_fds();

        unsetenv("VHUB_FD_LEDGER_ABORT");       /* this test makes it differ on purpose */
        vhub_log_set_level(LOG_INFO);
        vhub_config_init(&cfg);
        memset(&ctx, 0, sizeof(ctx));
        ctx.config = &cfg;
        ctx.base = event_base_new();
        CHECK(ctx.base);
        TAILQ_INIT(&ctx.vms);
        CHECK(vhub_fd_ledger_init(&ctx.fd_ledger) == 0);
        CHECK(vhub_hash_init(&ctx.vms_by_name) == 0);

        CHECK(vhub_vm_create(&ctx, 1000, "a", 0, 0, &cred, &err, &a) == 0);
        CHECK(vhub_vm_create(&ctx, 1000, "b", 0, 0, &cred, &err, &b) == 0);
        CHECK(vhub_vm_create(&ctx, 0, "a", 0, 0, &root, &err, &r) == 0);
        CHECK(vhub_vm_find(&ctx, 1000, "a") == a && vhub_vm_find(&ctx, 0, "a") == r);
        CHECK(vhub_vm_find(&ctx, 1001, "a") == NULL);
        CHECK_EQ(vhub_context_count_vms(&ctx, 1000), 2);
        CHECK_EQ(vhub_context_count_vms(&ctx, 0), 1);
        CHECK_EQ(vhub_context_count_vms(&ctx, 1001), 0);
        CHECK_USAGE(&ctx, 1000, 0, 0, 0);

        export(a, 3);
        export(b, 2);
        export(r, 4);
        CHECK_USAGE(&ctx, 1000, 5, 5, 9);
        CHECK_USAGE(&ctx, 0, 4, 5, 9);
        CHECK_USAGE(&ctx, 1001, 0, 5, 9);

        /* through the model: marked, counted again */
        first[0] = 1;
        CHECK(vhub_vm_shared_remove(a, first, &err) == 0);
        CHECK_USAGE(&ctx, 1000, 4, 4, 8);

        /* behind the model's back (nobody marks): stale until a debug check */
        first[0] = 2;
        CHECK(vhub_shared_table_remove(&a->shared, first, NULL) == 0);
        CHECK_USAGE(&ctx, 1000, 4, 4, 8);
        vhub_log_set_level(LOG_DEBUG);
        CHECK_USAGE(&ctx, 1000, 3, 3, 7);       /* found, logged, healed */
        vhub_log_set_level(LOG_INFO);
        CHECK_USAGE(&ctx, 1000, 3, 3, 7);

        /* VMs going: their part leaves the sums, the uid's entry with its last VM */
        vhub_vm_free(b);
        CHECK_USAGE(&ctx, 1000, 1, 1, 5);
        CHECK_EQ(vhub_context_count_vms(&ctx, 1000), 1);
        CHECK(vhub_vm_find(&ctx, 1000, "b") == NULL);
        vhub_vm_free(a);
        CHECK_USAGE(&ctx, 1000, 0, 0, 4);
        CHECK_EQ(ctx.fd_ledger.uids.n, 1);
        vhub_vm_free(r);
        CHECK_USAGE(&ctx, 0, 0, 0, 0);
        CHECK_EQ(ctx.fd_ledger.uids.n, 0);
        CHECK(TAILQ_EMPTY(&ctx.fd_ledger.marked));

        vhub_hash_done(&ctx.vms_by_name);
        vhub_fd_ledger_done(&ctx.fd_ledger);
        event_base_free(ctx.base);
        vhub_config_done(&cfg);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
}

/* A device with nothing behind it: no connection, no rings. */
static struct vhub_device *bare_device(struct vhub_vm *vm, const char *name) {
        struct vhub_device *d = calloc(1, sizeof(*d));

        CHECK(d);
        TAILQ_INIT(&d->ops);
        d->vm = vm;
        d->listen_fd = d->inflight_fd = -1;
        d->state = VHUB_DEV_READY;
        snprintf(d->name, sizeof(d->name), "%s", name);
        vhub_vm_link_device(vm, d);
        return d;
}

#define CHECK_LISTED(ctx, uid, v, d)                                                 \
        do {                                                                         \
                struct vhub_listed _l = vhub_fd_ledger_listed((ctx), (uid));         \
                CHECK_EQ(_l.vms, (v));                                               \
                CHECK_EQ(_l.devices, (d));                                           \
        } while (0)

/* daemon.info's counts, kept as VMs and devices come and go: per uid, root
 * everyone's; a VM being destroyed is not counted, nor are its devices.  At
 * debug level every answer is also walked (a difference aborts here). */
static void test_listed(void) {
        struct vhub_config cfg;
        struct vhub_context ctx;
        struct vhub_cred cred = { .uid = 1000 }, root = { .uid = 0 };
        struct vhub_error err = { 0 };
        struct vhub_device *d;
        struct vhub_vm *a, *b, *r;

        setenv("VHUB_FD_LEDGER_ABORT", "1", 1);
        vhub_log_set_level(LOG_DEBUG);
        vhub_config_init(&cfg);
        CHECK(vhub_context_init(&ctx, event_base_new(), &cfg) == 0);

        CHECK(vhub_vm_create(&ctx, 1000, "a", 0, 0, &cred, &err, &a) == 0);
        CHECK(vhub_vm_create(&ctx, 1000, "b", 0, 0, &cred, &err, &b) == 0);
        CHECK(vhub_vm_create(&ctx, 0, "r", 0, 0, &root, &err, &r) == 0);
        bare_device(a, "d0");
        bare_device(a, "d1");
        bare_device(b, "d0");
        d = bare_device(r, "d0");
        CHECK_LISTED(&ctx, 1000, 2, 3);
        CHECK_LISTED(&ctx, 1001, 0, 0);
        CHECK_LISTED(&ctx, 0, 3, 4);

        /* a device leaving a live VM */
        vhub_vm_unlink_device(r, d);
        free(d);
        CHECK_LISTED(&ctx, 0, 3, 3);

        /* a VM being destroyed is gone from the counts at once, its devices
         * with it, though they are still being removed */
        vhub_vm_destroy(a, NULL);
        CHECK_LISTED(&ctx, 1000, 1, 1);
        CHECK_LISTED(&ctx, 0, 2, 1);
        event_base_loop(ctx.base, EVLOOP_NONBLOCK);
        CHECK(vhub_vm_find(&ctx, 1000, "a") == NULL);
        CHECK_LISTED(&ctx, 1000, 1, 1);

        /* a VM freed without being destroyed (the daemon's exit) */
        vhub_vm_free(b);
        CHECK_LISTED(&ctx, 1000, 0, 0);
        CHECK_LISTED(&ctx, 0, 1, 0);

        vhub_context_done(&ctx);
        CHECK_EQ(ctx.fd_ledger.listed.vms, 0);
        CHECK_EQ(ctx.fd_ledger.listed.devices, 0);
        event_base_free(ctx.base);
        vhub_config_done(&cfg);
        vhub_log_set_level(LOG_INFO);
        unsetenv("VHUB_FD_LEDGER_ABORT");
}

/* What the faces hold (a connection's fds), kept in the ledger as they
 * change: per uid and in all, an entry kept while a uid has VMs or counted
 * connections, and nothing counted once the ledger is done. */
static void test_faces(void) {
        struct vhub_context ctx;
        struct vhub_fd_usage u;

        memset(&ctx, 0, sizeof(ctx));
        CHECK(vhub_fd_ledger_init(&ctx.fd_ledger) == 0);
        CHECK_EQ(vhub_fd_ledger_face_set(&ctx, 1000, 0, 3, 1), 0);      /* a connection: 3 fds */
        CHECK_EQ(vhub_fd_ledger_face_set(&ctx, 1000, 0, 1, 1), 0);      /* another: its socket */
        CHECK_EQ(vhub_fd_ledger_face_set(&ctx, 0, 0, 2, 1), 0);         /* root's */
        u = (struct vhub_fd_usage){ .uid = 1000 };
        vhub_fd_usage_add_faces(&ctx, &u);
        CHECK_EQ(u.total, 6);
        CHECK_EQ(u.non_root, 4);
        CHECK_EQ(u.by_uid, 4);
        CHECK_EQ(vhub_fd_ledger_face_set(&ctx, 1000, 3, 1, 0), 0);      /* two written */
        CHECK_EQ(vhub_fd_ledger_face_set(&ctx, 1000, 1, 0, -1), 0);     /* one closed */
        u = (struct vhub_fd_usage){ .uid = 1000 };
        vhub_fd_usage_add_faces(&ctx, &u);
        CHECK_EQ(u.total, 3);
        CHECK_EQ(u.by_uid, 1);
        CHECK_EQ(ctx.fd_ledger.uids.n, 2);
        CHECK_EQ(vhub_fd_ledger_face_set(&ctx, 1000, 1, 0, -1), 0);     /* its last: the entry goes */
        CHECK_EQ(ctx.fd_ledger.uids.n, 1);
        CHECK_EQ(vhub_fd_ledger_vms(&ctx.fd_ledger, 1000), 0);
        /* done with root's connection still counted (faces close after the
         * model): its entry is freed, later changes count nothing */
        vhub_fd_ledger_done(&ctx.fd_ledger);
        CHECK_EQ(vhub_fd_ledger_face_set(&ctx, 0, 2, 0, -1), 0);
        printf("ok: the faces' fds kept in the ledger per uid and in all; entries go with their last holder\n");
}

int main(void) {
        test_split();
        test_raise();
        test_check();
        test_usage_add();
        test_ledger();
        test_listed();
        test_faces();
        return 0;
}
