/* SPDX-License-Identifier: MIT */
/*
 * An API call that waits on back-ends.  The control layer embeds one in its
 * pending-request object, sets done, and hands it to a daemon function; the
 * daemon completes it exactly once (vhub_call_complete), from the event
 * loop, with a result and either an error or the call's outputs.  The model
 * keeps the pointer only while the call is pending; the control layer frees
 * it in done().
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "vhub-config.h"
#include "vhub-error.h"
#include "vhost-user.h"

struct vhu_msg;

struct vhub_call;
typedef void (*vhub_call_done_fn)(struct vhub_call *call);

struct vhub_vring_base {
        uint32_t index;
        uint32_t base;
        int32_t inflight;              /* requests the back-end left suspended (with
                                        * GET_VRING_BASE_INFLIGHT); -1: not known */
};

/* vm.postcopy.advise / listen: per device, what the VMM's migration code needs. */
struct vhub_postcopy_region {
        uint64_t gpa, size;
        uint64_t backend_uaddr;        /* where the back-end mapped it: fault addresses are there */
};

struct vhub_postcopy_device {
        char device[VHUB_NAME_MAX + 1];
        int ufd;                       /* advise: the back-end's userfaultfd (owned), else -1 */
        unsigned n_regions;            /* listen */
        struct vhub_postcopy_region *regions;
};

/* The answer to a front-door VMM's request (vhub-device-vmm.h). */
struct vhub_vmm_answer {
        bool close;                    /* no honest answer: close the VMM's connection */
        char why[320];                 /* when close: for the log */
        struct vhu_msg *msg;           /* else: its payload (a u64 for an ack) and fds;
                                        * owned by the call: vhub_vmm_answer_done() */
};

struct vhub_call {
        vhub_call_done_fn done;
        int result;                    /* 0 or -errno */
        struct vhub_error error;       /* when result < 0 */
        union {
                struct {
                        uint64_t features;
                        uint64_t protocol_features;
                        unsigned queues;
                        unsigned max_mem_slots;
                        bool has_shmem;        /* SHMEM negotiated */
                        char vmm_socket[108];  /* a front-door device's socket, else "" */
                        unsigned n_shmem;
                        uint64_t shmem_sizes[VHU_MAX_SHMEM_REGIONS];
                } device_add;
                struct {
                        unsigned n_vrings;
                        struct vhub_vring_base vrings[VHUB_MAX_QUEUES];
                } device_stop;
                struct {
                        uint32_t size;
                        uint8_t data[VHU_MAX_CONFIG_SIZE];
                } config_get;
                struct {
                        int fd;                /* owned by the call until taken */
                        uint64_t size;
                } dirty_log;
                struct {
                        int fd;                /* a back-end's own transfer fd, or -1 */
                } state_fd;
                struct {
                        uint64_t session_id;
                } crypto_session;
                struct vhub_vmm_answer vmm_request;
                struct {
                        /* owned by the call: vhub_postcopy_out_free() */
                        unsigned n_devices;
                        struct vhub_postcopy_device *devices;
                } postcopy;
        } out;
};

/* Record the outcome and run done().  r < 0 requires call->error filled. */
void vhub_call_complete(struct vhub_call *call, int r);
/* Close the fds and free what out.postcopy holds (NULL-safe, idempotent). */
void vhub_postcopy_out_free(struct vhub_call *call);
/* Frees what out.vmm_request holds (NULL-safe, idempotent). */
void vhub_vmm_answer_done(struct vhub_vmm_answer *a);
/* Fail with a contract error. */
void vhub_call_fail(struct vhub_call *call, const struct vhub_error *e);
