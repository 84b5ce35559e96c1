/* SPDX-License-Identifier: MIT */
/*
 * Credentials in a restart snapshot (vhub-model-snapshot.h): whose rights a
 * VM or a device acts with must come back exactly, or a restart would lend
 * a uid another's (a device that came back with nothing would act as root).
 * Supplementary groups are one bytes record of little-endian u32s, at most
 * VHUB_SNAP_MAX_GROUPS of them: fewer groups is fewer rights, never more.
 */
#include <errno.h>
#include <stdlib.h>

#include "vhub-model-snapshot.h"

enum { CR_UID = 1, CR_GID, CR_GROUPS };

void vhub_snap_put_groups(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_cred *c) {
        uint8_t b[4 * VHUB_SNAP_MAX_GROUPS];
        size_t n = c->n_groups < VHUB_SNAP_MAX_GROUPS ? c->n_groups : VHUB_SNAP_MAX_GROUPS;

        if (n == 0)
                return;
        for (size_t i = 0; i < n; i++)
                for (int k = 0; k < 4; k++)
                        b[4 * i + (size_t)k] = (uint8_t)(c->groups[i] >> (8 * k));
        vhub_snap_put_bytes(w, tag, b, 4 * n);
}

int vhub_snap_get_groups(const struct vhub_snap_rec *rec, struct vhub_cred *c) {
        const uint8_t *p;
        const void *raw;
        gid_t *groups;
        size_t n;
        int r = vhub_snap_get_bytes(rec, &raw, &n);

        if (r < 0)
                return r;
        if (n % 4 || n / 4 > VHUB_SNAP_MAX_GROUPS)
                return -EBADMSG;
        p = raw;
        groups = n ? calloc(n / 4, sizeof(gid_t)) : NULL;
        if (n && !groups)
                return -ENOMEM;
        for (size_t i = 0; i < n / 4; i++)
                groups[i] = (gid_t)(p[4 * i] | p[4 * i + 1] << 8 | p[4 * i + 2] << 16 | (uint32_t)p[4 * i + 3] << 24);
        free(c->groups);
        c->groups = groups;
        c->n_groups = n / 4;
        return 0;
}

void vhub_snap_put_cred(struct vhub_snap_writer *w, uint32_t tag, const struct vhub_cred *c) {
        vhub_snap_begin(w, tag);
        vhub_snap_put_u32(w, CR_UID, (uint32_t)c->uid);
        vhub_snap_put_u32(w, CR_GID, (uint32_t)c->gid);
        vhub_snap_put_groups(w, CR_GROUPS, c);
        vhub_snap_end(w);
}

int vhub_snap_get_cred(const struct vhub_snap_rec *rec, struct vhub_cred *ret) {
        struct vhub_cred c = { 0 };
        struct vhub_snap_iter it;
        struct vhub_snap_rec x;
        bool have_uid = false, have_gid = false;
        uint32_t u = 0;
        int r = vhub_snap_enter(rec, &it);

        while (r >= 0 && (r = vhub_snap_next(&it, &x)) > 0) {
                switch (x.tag) {
                case CR_UID: r = vhub_snap_get_u32(&x, &u); c.uid = (uid_t)u; have_uid = true; break;
                case CR_GID: r = vhub_snap_get_u32(&x, &u); c.gid = (gid_t)u; have_gid = true; break;
                case CR_GROUPS: r = vhub_snap_get_groups(&x, &c); break;
                default: r = vhub_snap_unknown(&x); break;
                }
        }
        /* half a credential is none: never fill in root's zeros */
        if (r >= 0 && (!have_uid || !have_gid))
                r = -EBADMSG;
        if (r < 0) {
                vhub_cred_done(&c);
                return r;
        }
        vhub_cred_done(ret);
        *ret = c;
        return 0;
}
