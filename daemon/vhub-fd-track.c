/* SPDX-License-Identifier: MIT */
/* Naming and tracking the daemon's fds: see vhub-fd-track.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "vhub-context.h"
#include "vhub-error.h"
#include "vhub-fd-track.h"
#include "vhub-fdstore.h"
#include "vhub-log.h"

const char *vhub_fd_group(char buf[VHUB_FD_GROUP_MAX], char kind, uint64_t id) {
        static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
        char rev[14];
        size_t n = 0, k = 0;

        do {
                rev[n++] = digits[id % 36];
                id /= 36;
        } while (id > 0);
        buf[k++] = kind;
        while (n > 0)
                buf[k++] = rev[--n];
        buf[k] = '\0';
        return buf;
}

void vhub_fd_group_own(struct vhub_context *ctx, char kind, uint64_t id, uid_t uid, bool own) {
        struct vhub_fdstore *store = vhub_context_fdstore(ctx);
        char name[VHUB_FD_GROUP_MAX];
        int r;

        vhub_fd_group(name, kind, id);
        if (!own) {
                vhub_fdstore_disown(store, name);
                return;
        }
        r = vhub_fdstore_own(store, name, uid);
        if (r < 0)
                log_warning("fd-store entry %s: not counted for uid %u: %s", name, (unsigned)uid, strerror(-r));
}

int vhub_fd_store_check(struct vhub_context *ctx, uid_t uid, unsigned n, struct vhub_error *err) {
        const struct vhub_fdstore *store = vhub_context_fdstore(ctx);
        unsigned per_uid, non_root, held;

        if (vhub_fdstore_share_check(store, uid, n) == 0)
                return 0;
        vhub_fdstore_share_limits(store, &per_uid, &non_root);
        held = vhub_fdstore_stored_by(store, uid);
        if (held + n > per_uid)
                return vhub_error_set(err, VHUB_ERR_LIMIT,
                                      "uid %u holds %u of the %u fd-store entries one uid may have; "
                                      "this needs %u more (it would not survive a restart)",
                                      (unsigned)uid, held, per_uid, n);
        /* other uids' numbers stay out of the detail */
        return vhub_error_set(err, VHUB_ERR_LIMIT,
                              "the fd-store entries non-root uids may hold are in use "
                              "(what this makes would not survive a restart)");
}

void vhub_fd_change(struct vhub_context *ctx, enum vhub_fd_change how, const char *group, int fd,
                    const char *fmt, ...) {
        struct vhub_fdstore *store = vhub_context_fdstore(ctx);
        char name[VHUB_FD_NAME_MAX];
        va_list ap;
        int r;

        if (fd < 0)
                return;
        r = how == VHUB_FD_KEPT ? vhub_fdstore_group_add(store, group, fd)
            : how == VHUB_FD_CLOSING ? vhub_fdstore_group_close(store, group, fd)
            : vhub_fdstore_group_remove(store, group, fd);
        /* a restore's owners take back fds their group already holds */
        if (r == -EEXIST && how == VHUB_FD_KEPT && ctx && ctx->restoring)
                r = 0;
        if (r >= 0 && vhub_log_get_level() < LOG_DEBUG)
                return;
        va_start(ap, fmt);
        vsnprintf(name, sizeof(name), fmt, ap);
        va_end(ap);
        if (r < 0)
                log_warning("fd %d %s: fd-store group %s: %s", fd, name, group, strerror(-r));
        else
                log_debug("fd %d %s: %s (group %s)", fd, how == VHUB_FD_KEPT ? "opened" : "closed", name, group);
}

void vhub_fd_visit(const struct vhub_fd_visitor *v, int fd, const char *group, const char *fmt, ...) {
        char name[VHUB_FD_NAME_MAX];
        va_list ap;

        if (fd < 0)
                return;
        va_start(ap, fmt);
        vsnprintf(name, sizeof(name), fmt, ap);
        va_end(ap);
        v->visit(&(struct vhub_fd_info){ .fd = fd, .name = name, .group = group }, v->userdata);
}
