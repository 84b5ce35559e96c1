/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vhub-context.h"
#include "vhub-device-vmm.h"
#include "vhub-fd-track.h"
#include "vhub-fdstore.h"
#include "vhub-frontdoor.h"
#include "vhub-log.h"
#include "vhub-vmm-device.h"
#include "vhub-vmm-socket-dir.h"

struct vhub_frontdoor {
        struct vhub_context *ctx;
        char *vmm_dir_path;
        struct vhub_vmm_dir *vmm_dir;      /* opened on first use */
        unsigned backend_timeout_ms;
        struct vhub_vmm_door door;         /* what the model calls */
        struct vhub_vmm_device_list devices;
};

char *vhub_frontdoor_default_dir(void) {
        const char *rd = getenv("RUNTIME_DIRECTORY");
        char *p = NULL;

        if (rd && *rd) {
                /* RUNTIME_DIRECTORY may list several, colon-separated */
                size_t n = strcspn(rd, ":");

                return asprintf(&p, "%.*s/vmm", (int)n, rd) < 0 ? NULL : p;
        }
        return strdup("/run/vhub/vmm");
}

int vhub_frontdoor_open_dir(struct vhub_frontdoor *f) {
        struct vhub_error err = { 0 };

        if (f->vmm_dir)
                return 0;
        return vhub_vmm_dir_open(f->vmm_dir_path, &err, &f->vmm_dir);
}

/* The model asks for a device's socket (vhub_vmm_door.open). */
static int door_open(void *userdata, struct vhub_device *d, const struct vhub_cred *owner,
                     struct vhub_error *err, void **ret_face, const struct vhub_vmm_face_ops **ret_ops,
                     char **ret_path) {
        struct vhub_frontdoor *f = userdata;
        const struct vhub_vmm_device_limits limits = { .backend_timeout_ms = f->backend_timeout_ms };
        struct vhub_vmm_socket *sock = NULL;
        struct vhub_vmm_device *vd;
        char *path = NULL;
        int lfd, r;

        if (!f->vmm_dir) {
                r = vhub_vmm_dir_open(f->vmm_dir_path, err, &f->vmm_dir);
                if (r < 0) {
                        log_error("front door: --vmm-dir %s: %s", f->vmm_dir_path, err->detail);
                        return r;
                }
        }
        lfd = vhub_vmm_socket_create(f->vmm_dir, owner, vhub_device_vm_name(d), vhub_device_name(d), err, &sock,
                                     &path);
        if (lfd < 0)
                return lfd;
        r = vhub_vmm_device_new(f->ctx, &f->devices, d, lfd, sock, owner->uid, &limits, &vd,
                                ret_ops);
        if (r < 0) {
                free(path);
                return vhub_error_set(err, VHUB_ERR_INTERNAL, "cannot listen for the VMM: %s", strerror(-r));
        }
        *ret_face = vd;
        *ret_path = path;
        return 0;
}

/* A restart carried d's VMM session (vhub_vmm_door.adopt). */
static int door_adopt(void *userdata, struct vhub_device *d, const struct vhub_cred *owner,
                      struct vhub_fdstore_restore *r, const struct vhub_snap_rec *rec, void **ret_face,
                      const struct vhub_vmm_face_ops **ret_ops, char **ret_path) {
        struct vhub_frontdoor *f = userdata;
        const struct vhub_vmm_device_limits limits = { .backend_timeout_ms = f->backend_timeout_ms };
        struct vhub_vmm_device *vd;
        int k;

        k = vhub_frontdoor_open_dir(f);
        if (k < 0) {
                log_error("front door: --vmm-dir %s: %s", f->vmm_dir_path, strerror(-k));
                return k;
        }
        k = vhub_vmm_device_adopt(f->ctx, &f->devices, d, f->vmm_dir, owner, r, rec, &limits, &vd, ret_ops,
                                  ret_path);
        if (k < 0)
                return k;
        *ret_face = vd;
        return 0;
}

int vhub_frontdoor_new(struct vhub_context *ctx, const struct vhub_frontdoor_options *o,
                       struct vhub_frontdoor **ret) {
        struct vhub_frontdoor *f = calloc(1, sizeof(*f));

        if (!f)
                return -ENOMEM;
        f->ctx = ctx;
        f->backend_timeout_ms = o->backend_timeout_ms;
        f->vmm_dir_path = strdup(o->vmm_dir);
        if (!f->vmm_dir_path) {
                free(f);
                return -ENOMEM;
        }
        TAILQ_INIT(&f->devices);
        f->door = (struct vhub_vmm_door){ .open = door_open, .adopt = door_adopt, .userdata = f };
        vhub_context_set_vmm_door(ctx, &f->door);
        *ret = f;
        return 0;
}

void vhub_frontdoor_foreach_fd(const struct vhub_frontdoor *f, const struct vhub_fd_visitor *v) {
        /* opened again from --vmm-dir at start: no group */
        if (f->vmm_dir)
                vhub_fd_visit(v, vhub_vmm_dir_fd(f->vmm_dir), NULL, "daemon/vmm-dir");
        vhub_vmm_device_list_foreach_fd(&f->devices, v);
}

void vhub_frontdoor_restore(struct vhub_frontdoor *f, struct vhub_fdstore_restore *r) {
        const char *name;
        char group[VHUB_FD_GROUP_MAX];

        for (size_t i = 0; (name = vhub_fdstore_restore_name(r, i)); i++) {
                if (name[0] != VHUB_FD_GROUP_FRONTDOOR || name[1] == '\0')
                        continue;
                snprintf(group, sizeof(group), "%s", name);
                /* a session carried whole: its device took the group back */
                if (vhub_vmm_device_list_has_group(&f->devices, group))
                        continue;
                if (vhub_fdstore_drop_group(r, group) == 0)
                        log_info("front door: group %s of the earlier run closed (its VMM reconnects)", group);
        }
}

void vhub_frontdoor_pause(struct vhub_frontdoor *f) {
        vhub_vmm_device_list_pause(&f->devices);
}

void vhub_frontdoor_shutdown(struct vhub_frontdoor *f) {
        if (f)
                vhub_vmm_device_list_close(&f->devices);
}

struct vhub_frontdoor *vhub_frontdoor_free(struct vhub_frontdoor *f) {
        if (!f)
                return NULL;
        vhub_context_set_vmm_door(f->ctx, NULL);
        vhub_vmm_device_list_free(&f->devices);
        f->vmm_dir = vhub_vmm_dir_free(f->vmm_dir);
        free(f->vmm_dir_path);
        free(f);
        return NULL;
}
