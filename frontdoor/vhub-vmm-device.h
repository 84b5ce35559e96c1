/* SPDX-License-Identifier: MIT */
/*
 * One front-door device as the face sees it: its socket, the listener that
 * takes one VMM at a time, that VMM's connection and back-end channel, and
 * the VMM's requests on their way through the model
 * (vhub_device_vmm_request(): docs/front-door.md).
 *
 * The model owns the device and tells this object it is gone
 * (vhub_vmm_face_ops.gone); this object owns the socket's name, the
 * listening fd, the connection and the channel.
 */
#pragma once

#include <stdbool.h>
#include <sys/queue.h>

#include "vhub-device-vmm.h"
#include "vhub-vmm-socket-dir.h"

struct vhub_context;
struct vhub_fd_visitor;
struct vhub_vmm_device;

/* The face's devices (for shutdown); a device is on it until it is freed. */
TAILQ_HEAD(vhub_vmm_device_list, vhub_vmm_device);

/* What the face does when a VMM connects (from --backend-timeout-ms). */
struct vhub_vmm_device_limits {
        unsigned backend_timeout_ms;
        unsigned max_requests;        /* the VMM's requests in the model before reading pauses */
};

/*
 * listen_fd (taken in every case) listens on the device's socket, whose
 * name sock (taken in every case) removes when the device goes.  The
 * object registers nothing itself: the model calls it through *ret_ops.
 */
int vhub_vmm_device_new(struct vhub_context *ctx, struct vhub_vmm_device_list *list,
                        struct vhub_device *dev, int listen_fd, struct vhub_vmm_socket *sock, uid_t owner_uid,
                        const struct vhub_vmm_device_limits *limits, struct vhub_vmm_device **ret,
                        const struct vhub_vmm_face_ops **ret_ops);
/*
 * A device whose VMM's session a restart of the daemon carried
 * (docs/restart.md, "Front-door devices"): its socket, listener, the VMM's
 * connection and channel taken back from the fd-store group f<device id> in
 * r as rec (what face_ops.save wrote) names them, the VMM attached and read
 * again.  Every member of the group not named goes.  0, or -errno with
 * nothing kept (-ENOENT: an fd was not passed back; -EPROTO: the acked
 * protocol features are no longer offered).  *ret_path is malloc'd.
 */
struct vhub_fdstore_restore;
struct vhub_snap_rec;
int vhub_vmm_device_adopt(struct vhub_context *ctx, struct vhub_vmm_device_list *list, struct vhub_device *dev,
                          struct vhub_vmm_dir *dir, const struct vhub_cred *owner,
                          struct vhub_fdstore_restore *fr, const struct vhub_snap_rec *rec,
                          const struct vhub_vmm_device_limits *limits, struct vhub_vmm_device **ret,
                          const struct vhub_vmm_face_ops **ret_ops, char **ret_path);
/* Whether one of the devices has group as its fd-store group. */
bool vhub_vmm_device_list_has_group(const struct vhub_vmm_device_list *list, const char *group);
/* Every fd it holds, named (group f<device id>; what its transports queue
 * has none). */
void vhub_vmm_device_foreach_fd(const struct vhub_vmm_device *vd, const struct vhub_fd_visitor *v);
void vhub_vmm_device_list_foreach_fd(const struct vhub_vmm_device_list *list, const struct vhub_fd_visitor *v);
/* Every device's VMM is read no more, a VMM that connects later neither. */
void vhub_vmm_device_list_pause(struct vhub_vmm_device_list *list);
/* Shutdown: every device's listener and VMM connection close now (the model
 * is told each VMM left); a device keeps its object until it goes. */
void vhub_vmm_device_list_close(struct vhub_vmm_device_list *list);
/* Shutdown of the last resort: every device still on the list is freed
 * without telling the model (which is gone). */
void vhub_vmm_device_list_free(struct vhub_vmm_device_list *list);
