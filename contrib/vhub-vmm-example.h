/* SPDX-License-Identifier: MIT */
/*
 * vhub-vmm-example: the state the example VMM's two halves share.
 *
 * vhub-vmm-example.c is the control plane: its own poll() loop, the control
 * calls made with libvhub-client's asynchronous mode (one call's callback
 * makes the next), events from the library's event handler.
 * vhub-vmm-example-io.c is the data plane in the same loop: virtio-blk
 * requests on split virtqueues in guest RAM, submitted as ring space
 * allows and reaped when a ring's call eventfd fires.
 */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include <vhub/vhub-client.h>

#include "guest-mem.h"
#include "virtio-blk.h"
#include "virtq.h"

#define MAX_QUEUES 16u
#define FIRST_LBA 8u

struct opts {
        const char *socket;
        const char *blk_socket;
        const char *vm;
        const char *device;
        unsigned queues;
        unsigned requests;
        unsigned sectors;       /* per request */
        unsigned queue_size;
        unsigned mem_mb;
        int timeout_ms;
        bool verbose;
};

struct ring {
        struct vhub_virtq *vq;
        struct vhub_blk_queue *q;
        struct vhub_blk_req *reqs;      /* 2 * requests + 2 */
        unsigned n_reqs;                /* reqs used so far */
        unsigned next, end;             /* this I/O phase: reqs[next..end) not yet submitted */
        uint64_t wbuf, rbuf, idbuf;     /* guest-physical */
};

/* The data plane's phases, in order. */
enum io_phase {
        IO_IDLE,
        IO_WRITE,
        IO_READ,
        IO_GET_ID,
        IO_FLUSH,
        IO_DONE,
};

struct vmm {
        struct opts o;
        struct vhub_client *c;
        struct vhub_guest_mem *mem;
        struct ring rings[MAX_QUEUES];
        unsigned n_rings;
        bool vm_created, device_added, device_started;
        uint64_t features, acked;
        uint64_t capacity;      /* sectors */
        struct timespec t0;

        /* control plane */
        unsigned step;          /* index into the step table */
        struct timespec t_call; /* when the current call was made */
        int result;             /* the first failure (-errno), else 0 */
        bool finished;

        /* data plane */
        enum io_phase phase;
        struct timespec t_phase;
        int64_t io_deadline;    /* CLOCK_MONOTONIC ms */
        bool io_ok;             /* every status and byte so far */
        void (*io_done)(struct vmm *x, int r);
};

void vmm_log(struct vmm *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void vmm_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
double vmm_ms_since(const struct timespec *t);
int64_t vmm_now_ms(void);

/* The pattern of one sector at disk LBA lba (see --dump-pattern). */
void vmm_pattern_fill(uint8_t *buf, uint64_t lba, unsigned sectors);
/* Where request i of ring `ring` writes and reads. */
uint64_t vmm_request_lba(const struct opts *o, unsigned ring, unsigned i);

/* Virtqueues, request slots and buffers in guest RAM for x->n_rings rings. */
int vmm_io_setup(struct vmm *x);
/* Run the I/O phases; done(x, r) is called once, from the loop: 0, -EIO
 * (a status or byte did not verify) or another -errno. */
int vmm_io_start(struct vmm *x, void (*done)(struct vmm *x, int r));
/* A ring's call eventfd is readable (or the loop woke up): reap, go on. */
void vmm_io_poll(struct vmm *x, unsigned ring);
/* The poll() timeout the data plane needs (-1: idle). */
int vmm_io_timeout_ms(const struct vmm *x);
bool vmm_io_active(const struct vmm *x);
void vmm_io_free(struct vmm *x);
