/* SPDX-License-Identifier: MIT */
/*
 * vhub-vmm-example's data plane: writes a recognizable pattern through
 * every ring, reads it back into other (poisoned) buffers and checks it
 * byte for byte, asks for the disk's id and flushes -- without blocking the
 * loop the control plane shares: requests are submitted as ring space
 * allows and reaped when a ring's call eventfd fires (or every 50 ms, so a
 * missed notification costs only latency).
 *
 * Output lines "    ring R: OUT lba L (S sectors): OK" are what
 * contrib/demo.sh reads to check the image file afterwards.
 */
#include "vhub-vmm-example.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define RECHECK_MS 50

void vmm_pattern_fill(uint8_t *buf, uint64_t lba, unsigned sectors) {
        for (unsigned s = 0; s < sectors; s++) {
                uint8_t *p = buf + (size_t)s * VHUB_BLK_SECTOR_SIZE;
                uint64_t l = lba + s;
                char head[32];
                int n = snprintf(head, sizeof(head), "vhub-demo lba %010" PRIu64 "\n", l);

                for (unsigned i = 0; i < VHUB_BLK_SECTOR_SIZE; i++)
                        p[i] = (uint8_t)(l * 131 + i * 7 + i / 64);
                memcpy(p, head, (size_t)n);
        }
}

uint64_t vmm_request_lba(const struct opts *o, unsigned ring, unsigned i) {
        /* every ring writes its own extents, with a gap after each request */
        uint64_t ring_span = ((uint64_t)o->requests * o->sectors * 2 + 2047) / 2048 * 2048;

        return FIRST_LBA + ring * ring_span + (uint64_t)i * o->sectors * 2;
}

int vmm_io_setup(struct vmm *x) {
        uint64_t bytes = (uint64_t)x->o.requests * x->o.sectors * VHUB_BLK_SECTOR_SIZE;

        for (unsigned i = 0; i < x->n_rings; i++) {
                struct ring *rg = &x->rings[i];
                int r;

                r = vhub_virtq_new(x->mem, (uint16_t)i, (uint16_t)x->o.queue_size, 0, &rg->vq);
                if (r >= 0)
                        r = vhub_blk_queue_new(x->mem, rg->vq, &rg->q);
                if (r >= 0)
                        r = vhub_guest_mem_alloc(x->mem, bytes, 4096, &rg->wbuf);
                if (r >= 0)
                        r = vhub_guest_mem_alloc(x->mem, bytes, 4096, &rg->rbuf);
                if (r >= 0)
                        r = vhub_guest_mem_alloc(x->mem, 64, 64, &rg->idbuf);
                if (r >= 0) {
                        rg->reqs = calloc(2 * (size_t)x->o.requests + 2, sizeof(*rg->reqs));
                        if (!rg->reqs)
                                r = -ENOMEM;
                }
                if (r < 0) {
                        vmm_fail("ring %u: %s (guest RAM too small?)", i, strerror(-r));
                        return r;
                }
                vmm_log(x, "ring %u: size %u desc 0x%" PRIx64 " avail 0x%" PRIx64 " used 0x%" PRIx64
                           " kick fd %d call fd %d",
                        i, x->o.queue_size, vhub_virtq_desc_gpa(rg->vq), vhub_virtq_avail_gpa(rg->vq),
                        vhub_virtq_used_gpa(rg->vq), vhub_virtq_kick_fd(rg->vq), vhub_virtq_call_fd(rg->vq));
        }
        return 0;
}

/* ---- the phases ---- */

static const char *phase_name(enum io_phase p) {
        switch (p) {
        case IO_WRITE: return "write";
        case IO_READ: return "read";
        case IO_GET_ID: return "GET_ID";
        case IO_FLUSH: return "FLUSH";
        default: return "idle";
        }
}

/* Queue this phase's requests on each ring: reqs[next..end). */
static void phase_prepare(struct vmm *x) {
        const struct opts *o = &x->o;
        uint32_t bytes = o->sectors * VHUB_BLK_SECTOR_SIZE;

        for (unsigned i = 0; i < x->n_rings; i++) {
                struct ring *rg = &x->rings[i];

                rg->next = rg->end = rg->n_reqs;
                switch (x->phase) {
                case IO_WRITE:
                        for (unsigned k = 0; k < o->requests; k++) {
                                struct vhub_blk_req *q = &rg->reqs[rg->n_reqs++];
                                uint64_t gpa = rg->wbuf + (uint64_t)k * bytes;

                                *q = (struct vhub_blk_req){ .type = VHUB_BLK_T_OUT,
                                                            .sector = vmm_request_lba(o, i, k),
                                                            .data_gpa = gpa, .data_len = bytes };
                                vmm_pattern_fill(vhub_guest_mem_at(x->mem, gpa, bytes), q->sector, o->sectors);
                        }
                        break;
                case IO_READ:
                        /* into other buffers, poisoned first */
                        memset(vhub_guest_mem_at(x->mem, rg->rbuf, (uint64_t)o->requests * bytes), 0xaa,
                               (size_t)o->requests * bytes);
                        for (unsigned k = 0; k < o->requests; k++)
                                rg->reqs[rg->n_reqs++] = (struct vhub_blk_req){
                                        .type = VHUB_BLK_T_IN, .sector = vmm_request_lba(o, i, k),
                                        .data_gpa = rg->rbuf + (uint64_t)k * bytes, .data_len = bytes };
                        break;
                case IO_GET_ID:
                        if (i == 0)     /* informational: UNSUPP is an answer too */
                                rg->reqs[rg->n_reqs++] = (struct vhub_blk_req){
                                        .type = VHUB_BLK_T_GET_ID, .data_gpa = rg->idbuf,
                                        .data_len = VHUB_BLK_ID_BYTES };
                        break;
                case IO_FLUSH:
                        rg->reqs[rg->n_reqs++] = (struct vhub_blk_req){ .type = VHUB_BLK_T_FLUSH };
                        break;
                default:
                        break;
                }
                rg->end = rg->n_reqs;
        }
}

static void report_writes(struct vmm *x) {
        for (unsigned i = 0; i < x->n_rings; i++)
                for (unsigned k = 0; k < x->o.requests; k++) {
                        struct vhub_blk_req *q = &x->rings[i].reqs[k];

                        printf("    ring %u: OUT lba %" PRIu64 " (%u sectors): %s\n", i, q->sector, x->o.sectors,
                               vhub_blk_status_name(q->status));
                        if (q->status != VHUB_BLK_S_OK)
                                x->io_ok = false;
                }
}

static void verify_reads(struct vmm *x) {
        const struct opts *o = &x->o;
        uint32_t bytes = o->sectors * VHUB_BLK_SECTOR_SIZE;
        uint8_t *expect = malloc(bytes);
        bool ok = true;

        if (!expect) {
                x->io_ok = false;
                return;
        }
        for (unsigned i = 0; i < x->n_rings; i++)
                for (unsigned k = 0; k < o->requests; k++) {
                        struct vhub_blk_req *q = &x->rings[i].reqs[o->requests + k];
                        const uint8_t *got = vhub_guest_mem_at(x->mem, q->data_gpa, bytes);
                        const char *verdict = "verified";

                        vmm_pattern_fill(expect, q->sector, o->sectors);
                        if (q->status != VHUB_BLK_S_OK) {
                                verdict = "read FAILED";
                                ok = false;
                        } else if (memcmp(got, expect, bytes) != 0) {
                                unsigned off = 0;

                                while (got[off] == expect[off])
                                        off++;
                                printf("    ring %u: IN  lba %" PRIu64 ": MISMATCH at byte %u: got 0x%02x, want 0x%02x\n",
                                       i, q->sector, off, got[off], expect[off]);
                                verdict = "MISMATCH";
                                ok = false;
                        }
                        printf("    ring %u: IN  lba %" PRIu64 " (%u sectors): %s, %s\n", i, q->sector, o->sectors,
                               vhub_blk_status_name(q->status), verdict);
                }
        free(expect);
        vmm_log(x, "verification: %s (%u bytes per request, %u request(s))", ok ? "OK" : "FAILED", bytes,
                o->requests * x->n_rings);
        if (!ok)
                x->io_ok = false;
}

static void report_get_id(struct vmm *x) {
        struct ring *rg = &x->rings[0];
        const struct vhub_blk_req *q = &rg->reqs[rg->n_reqs - 1];
        char id[VHUB_BLK_ID_BYTES + 1] = { 0 };
        bool ok = q->status == VHUB_BLK_S_OK;

        memcpy(id, vhub_guest_mem_at(x->mem, rg->idbuf, VHUB_BLK_ID_BYTES), VHUB_BLK_ID_BYTES);
        for (char *p = id; *p; p++)
                if (*p < 0x20 || *p > 0x7e)
                        *p = '?';
        vmm_log(x, "GET_ID on ring 0: %s%s%s%s", vhub_blk_status_name(q->status), ok ? " \"" : "",
                ok ? id : "", ok ? "\"" : "");
}

static void report_flush(struct vmm *x) {
        for (unsigned i = 0; i < x->n_rings; i++) {
                const struct vhub_blk_req *q = &x->rings[i].reqs[x->rings[i].n_reqs - 1];

                vmm_log(x, "FLUSH on ring %u: %s", i, vhub_blk_status_name(q->status));
                if (q->status != VHUB_BLK_S_OK)
                        x->io_ok = false;
        }
}

static void io_finish(struct vmm *x, int r) {
        void (*done)(struct vmm *x, int r) = x->io_done;

        x->phase = IO_DONE;
        x->io_done = NULL;
        if (done)
                done(x, r);
}

/* The phase is complete: report it and start the next one. */
static void phase_next(struct vmm *x) {
        if (x->phase != IO_IDLE)
                vmm_log(x, "%s: %u request(s) on %u ring(s) completed [%.3f ms]", phase_name(x->phase),
                        x->phase == IO_GET_ID ? 1 : x->phase == IO_FLUSH ? x->n_rings
                                                                          : x->o.requests * x->n_rings,
                        x->n_rings, vmm_ms_since(&x->t_phase));
        switch (x->phase) {
        case IO_WRITE: report_writes(x); break;
        case IO_READ: verify_reads(x); break;
        case IO_GET_ID: report_get_id(x); break;
        case IO_FLUSH: report_flush(x); break;
        default: break;
        }
        x->phase++;
        if (x->phase == IO_FLUSH && !(x->acked & (UINT64_C(1) << VHUB_BLK_F_FLUSH))) {
                vmm_log(x, "FLUSH not offered by the device: skipped");
                x->phase++;
        }
        if (x->phase == IO_DONE) {
                io_finish(x, x->io_ok ? 0 : -EIO);
                return;
        }
        clock_gettime(CLOCK_MONOTONIC, &x->t_phase);
        x->io_deadline = vmm_now_ms() + x->o.timeout_ms;
        phase_prepare(x);
}

/* Submit what fits on a ring and kick once: 0 or -errno. */
static int ring_submit(struct vmm *x, unsigned i) {
        struct ring *rg = &x->rings[i];
        unsigned added = 0;

        while (rg->next < rg->end) {
                int r = vhub_blk_submit(rg->q, &rg->reqs[rg->next]);

                if (r == -ENOSPC && (added > 0 || vhub_blk_inflight(rg->q) > 0))
                        break; /* the rest when completions free room */
                if (r < 0) {
                        vmm_fail("ring %u: submitting %s #%u: %s", i, phase_name(x->phase), rg->next, strerror(-r));
                        return r;
                }
                rg->next++;
                added++;
        }
        if (added > 0 && vhub_blk_notify(rg->q) < 0) {
                vmm_fail("ring %u: kick failed", i);
                return -EIO;
        }
        return 0;
}

/* Reap every ring, refill, and move on when the phase is complete. */
static void io_pump(struct vmm *x) {
        while (vmm_io_active(x)) {
                bool complete = true;

                for (unsigned i = 0; i < x->n_rings; i++) {
                        struct ring *rg = &x->rings[i];
                        int r = vhub_blk_process_completions(rg->q);

                        if (r >= 0)
                                r = ring_submit(x, i);
                        if (r < 0) {
                                if (r == -EPROTO)
                                        vmm_fail("ring %u: the device named a request not in flight", i);
                                io_finish(x, r);
                                return;
                        }
                        if (rg->next < rg->end || vhub_blk_inflight(rg->q) > 0)
                                complete = false;
                }
                if (!complete)
                        return;
                phase_next(x);
        }
}

int vmm_io_start(struct vmm *x, void (*done)(struct vmm *x, int r)) {
        x->io_done = done;
        x->io_ok = true;
        x->phase = IO_IDLE;
        phase_next(x);
        io_pump(x);
        return 0;
}

void vmm_io_poll(struct vmm *x, unsigned ring) {
        uint64_t v;

        if (!vmm_io_active(x))
                return;
        if (ring < x->n_rings)
                /* drain the call eventfd (non-blocking); the used index tells
                 * what completed */
                (void)!read(vhub_virtq_call_fd(x->rings[ring].vq), &v, sizeof(v));
        io_pump(x);
        if (vmm_io_active(x) && vmm_now_ms() >= x->io_deadline) {
                for (unsigned i = 0; i < x->n_rings; i++)
                        vmm_fail("ring %u: waiting for %s completions: %s (%u still in flight, used idx %u)", i,
                                 phase_name(x->phase), strerror(ETIMEDOUT), vhub_blk_inflight(x->rings[i].q),
                                 vhub_virtq_last_used(x->rings[i].vq));
                io_finish(x, -ETIMEDOUT);
        }
}

bool vmm_io_active(const struct vmm *x) {
        return x->phase > IO_IDLE && x->phase < IO_DONE;
}

int vmm_io_timeout_ms(const struct vmm *x) {
        int64_t left;

        if (!vmm_io_active(x))
                return -1;
        left = x->io_deadline - vmm_now_ms();
        if (left < 0)
                return 0;
        return left < RECHECK_MS ? (int)left : RECHECK_MS;
}

void vmm_io_free(struct vmm *x) {
        for (unsigned i = 0; i < MAX_QUEUES; i++) {
                vhub_blk_queue_free(x->rings[i].q);
                vhub_virtq_free(x->rings[i].vq);
                free(x->rings[i].reqs);
                x->rings[i] = (struct ring){ 0 };
        }
}
