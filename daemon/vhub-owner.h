/* SPDX-License-Identifier: MIT */
/*
 * Who owns a VM, and which face drives a device.
 *
 * A face is a way in to the model: the JSON-RPC control server (control/)
 * today, the vhost-user front door (an unmodified VMM connected to a socket
 * of the daemon) next.  An owner is one connection of a face.  The face
 * embeds a struct vhub_owner in its connection object, fills it in, and
 * passes it to vhub_vm_create() / vhub_vm_attach(); before it frees the
 * connection it calls vhub_context_owner_gone(), after which the model holds
 * no pointer to it.  The model keeps only the pointer and never looks at the
 * face behind it.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

enum vhub_face {
        VHUB_FACE_JSON_RPC,       /* a control connection (control/) */
        VHUB_FACE_FRONT_DOOR,     /* a VMM speaking vhost-user to the daemon */
        _VHUB_FACE_MAX,
};

const char *vhub_face_to_string(enum vhub_face f);

struct vhub_owner;

struct vhub_owner_ops {
        /* Optional: the owner is behind on the events it must receive (its
         * output queue is long).  Back-end channels of its VMs stop reading
         * until the face calls vhub_context_owner_drained(). */
        bool (*congested)(const struct vhub_owner *o);
};

struct vhub_owner {
        enum vhub_face face;
        uint64_t id;                     /* the face's id of the connection: logs, snapshots */
        const struct vhub_owner_ops *ops;
};
