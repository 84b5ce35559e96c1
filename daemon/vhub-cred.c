/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <grp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vhub-cred.h"
#include "vhub-log.h"

int vhub_cred_from_socket(int fd, struct vhub_cred *ret) {
        struct ucred uc;
        socklen_t len = sizeof(uc);
        gid_t *groups = NULL;

        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &len) < 0)
                return -errno;
        /* the peer's groups are fixed at its connect(): ask for the size, then
         * fetch; a second ERANGE cannot happen but is an error, not a loop */
        len = 0;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, NULL, &len) < 0 && errno != ERANGE)
                return -errno;
        if (len > 0) {
                groups = malloc(len);
                if (!groups)
                        return -ENOMEM;
                if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) < 0) {
                        int r = -errno;

                        free(groups);
                        return r;
                }
        }
        *ret = (struct vhub_cred){
                .uid = uc.uid,
                .gid = uc.gid,
                .groups = groups,
                .n_groups = len / sizeof(gid_t),
        };
        return 0;
}

int vhub_cred_copy(const struct vhub_cred *src, struct vhub_cred *ret) {
        gid_t *groups = NULL;

        if (src->n_groups > 0) {
                groups = malloc(src->n_groups * sizeof(gid_t));
                if (!groups)
                        return -ENOMEM;
                memcpy(groups, src->groups, src->n_groups * sizeof(gid_t));
        }
        *ret = (struct vhub_cred){
                .uid = src->uid,
                .gid = src->gid,
                .groups = groups,
                .n_groups = src->n_groups,
        };
        return 0;
}

void vhub_cred_done(struct vhub_cred *c) {
        if (!c)
                return;
        free(c->groups);
        *c = (struct vhub_cred){ 0 };
}

/* setfsuid()/setfsgid() report no error: ask for the current value back. */
static bool fsuid_is(uid_t uid) {
        return (uid_t)setfsuid((uid_t)-1) == uid;
}

static bool fsgid_is(gid_t gid) {
        return (gid_t)setfsgid((gid_t)-1) == gid;
}

int vhub_cred_enter(const struct vhub_cred *c, struct vhub_cred_scope *s) {
        int n, r;

        *s = (struct vhub_cred_scope){ .switched = false };
        if (c->uid == geteuid())
                return 0;
        n = getgroups(0, NULL);
        if (n < 0)
                return -errno;
        s->groups = calloc((size_t)n + 1, sizeof(gid_t));
        if (!s->groups)
                return -ENOMEM;
        n = getgroups(n, s->groups);
        if (n < 0) {
                r = -errno;
                goto fail;
        }
        s->n_groups = n;
        s->fsuid = (uid_t)setfsuid((uid_t)-1);
        s->fsgid = (gid_t)setfsgid((gid_t)-1);
        if (setgroups(c->n_groups, c->groups) < 0) {
                r = -errno;
                goto fail;
        }
        s->switched = true;
        (void)setfsgid(c->gid);
        if (!fsgid_is(c->gid)) {
                vhub_cred_leave(s);
                return -EPERM;
        }
        (void)setfsuid(c->uid);
        if (!fsuid_is(c->uid)) {
                vhub_cred_leave(s);
                return -EPERM;
        }
        return 0;

fail:
        free(s->groups);
        s->groups = NULL;
        return r;
}

void vhub_cred_leave(struct vhub_cred_scope *s) {
        if (s->switched) {
                /* fsuid back to 0 first: it raises the file capabilities again */
                (void)setfsuid(s->fsuid);
                (void)setfsgid(s->fsgid);
                if (!fsuid_is(s->fsuid) || !fsgid_is(s->fsgid) ||
                    setgroups(s->n_groups, s->groups) < 0) {
                        vhub_log_full(LOG_CRIT, NULL, NULL, NULL, "cannot return to the daemon's own credentials; aborting");
                        abort();
                }
        }
        free(s->groups);
        *s = (struct vhub_cred_scope){ .switched = false };
}
