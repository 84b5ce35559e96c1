/* SPDX-License-Identifier: MIT */
/*
 * The vhost-user front door, vhubd's second face (docs/front-door.md): the
 * composition root creates it beside the JSON-RPC server and registers it
 * on the model (vhub_context_set_vmm_door), which asks it for a socket for
 * each device added with vmm_socket.  --vmm-dir is opened when the first
 * such device comes, so a daemon that never uses the front door touches
 * nothing there.
 */
#pragma once

struct vhub_context;
struct vhub_fd_visitor;
struct vhub_fdstore_restore;
struct vhub_frontdoor;

struct vhub_frontdoor_options {
        const char *vmm_dir;               /* --vmm-dir (absolute; copied) */
        unsigned backend_timeout_ms;       /* how long a VMM request may wait */
};

/* The contract's default --vmm-dir: $RUNTIME_DIRECTORY/vmm, else
 * /run/vhub/vmm.  malloc'd; NULL when out of memory. */
char *vhub_frontdoor_default_dir(void);

int vhub_frontdoor_new(struct vhub_context *ctx, const struct vhub_frontdoor_options *o,
                       struct vhub_frontdoor **ret);
/* Open --vmm-dir now instead of at the first front-door device (a harness
 * that counts the daemon's fds around each input).  0 or -errno. */
int vhub_frontdoor_open_dir(struct vhub_frontdoor *f);
/* Every fd the face holds: --vmm-dir's ("daemon/vmm-dir", opened again at
 * start) and each device's (vhub_vmm_device_foreach_fd()). */
void vhub_frontdoor_foreach_fd(const struct vhub_frontdoor *f, const struct vhub_fd_visitor *v);
/*
 * A start that carries an earlier run's state (docs/restart.md): a device
 * whose VMM's session the snapshot carried whole (a planned restart) took
 * its group back already (vhub_vmm_door.adopt, from the model's restore).
 * Every other group of the front door's (f<device id>: a socket's
 * directories, its listener, the VMM's connection and channel) is closed
 * now, and those VMMs see their connections close; the model makes each
 * such device's socket again (vmm_restore_finish()).
 */
void vhub_frontdoor_restore(struct vhub_frontdoor *f, struct vhub_fdstore_restore *r);
/* A planned restart: no more VMM requests are read, and none that connects
 * later: a session at rest then is carried (vhub_vmm_face_ops.at_rest). */
void vhub_frontdoor_pause(struct vhub_frontdoor *f);
/* Shutdown: every device's listener and VMM connection close (the model
 * hears that each VMM left). */
void vhub_frontdoor_shutdown(struct vhub_frontdoor *f);
/* After the model is gone (every device told the face it went).  NULL-safe. */
struct vhub_frontdoor *vhub_frontdoor_free(struct vhub_frontdoor *f);
