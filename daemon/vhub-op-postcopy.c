/* SPDX-License-Identifier: MIT */
/*
 * POSTCOPY: one step of a postcopy migration on one device (spec
 * "Postcopy").
 *
 * - advise: POSTCOPY_ADVISE; the reply carries the back-end's userfaultfd.
 * - listen: the back-end must hold no memory when it starts listening
 *   (libvhost-user refuses otherwise), so its regions are dropped first
 *   (REM_MEM_REG), then POSTCOPY_LISTEN, then the VM's table goes back as
 *   one SET_MEM_TABLE: the back-end answers with the address of each of its
 *   mappings (fault addresses on its userfaultfd are there), and starts
 *   faulting once the front-end confirms with a u64 0 -- the VMM gets those
 *   addresses in the result.
 * - end: POSTCOPY_END; the reply is a status.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "vhub-backend-conn.h"
#include "vhub-device-internal.h"
#include "vhub-log.h"
#include "vhub-vm.h"
#include "vhu-fd.h"

static void region_to_wire(const struct vhub_region *r, struct vhu_mem_region *w) {
        w->gpa = r->gpa;
        w->size = r->size;
        w->uaddr = r->uaddr;
        w->mmap_offset = r->offset;
}

/* Stage 0 of listen: the back-end drops what it has mapped, then listens. */
static int listen_begin(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        /* without CONFIGURE_MEM_SLOTS the table is replaced whole below */
        for (size_t i = 0; dev_has_pf(d, VHU_PF_CONFIGURE_MEM_SLOTS) && i < d->n_shadow; i++) {
                const struct vhub_region *reg = vhub_vm_region_by_id(d->vm, d->shadow[i]);
                struct vhu_mem_region w;

                if (!reg)
                        continue;
                region_to_wire(reg, &w);
                vhu_msg_build_mem_single(&m, VHU_REQ_REM_MEM_REG, true, &w, -1);
                if ((r = device_send(d, op, &m, TAG(TAGK_MEM_REMOVE, i))) < 0)
                        return r;
        }
        /* libvhost-user answers LISTEN with a u64 whether asked or not: ask */
        vhu_msg_build_none(&m, VHU_REQ_POSTCOPY_LISTEN, true);
        return device_send(d, op, &m, 0);
}

/* Stage 1 of listen: the VM's table, answered with the back-end's mappings. */
static int listen_send_table(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_mem_region regs[VHU_MEM_TABLE_MAX_REGIONS];
        int fds[VHU_MEM_TABLE_MAX_REGIONS];
        struct vhub_vm *vm = d->vm;
        struct vhu_msg m;
        int r;

        shadow_clear(d);
        if (vm->mem.n == 0)
                return 0;
        if (vm->mem.n > VHU_MEM_TABLE_MAX_REGIONS)
                return device_op_error(op, VHUB_ERR_LIMIT, REQ(VHU_REQ_SET_MEM_TABLE),
                                       "postcopy registers at most %d regions", VHU_MEM_TABLE_MAX_REGIONS);
        op->u.postcopy.table = calloc(vm->mem.n, sizeof(*op->u.postcopy.table));
        op->u.postcopy.backend_uaddr = calloc(vm->mem.n, sizeof(uint64_t));
        if (!op->u.postcopy.table || !op->u.postcopy.backend_uaddr)
                return device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
        op->u.postcopy.n_table = vm->mem.n;
        for (size_t i = 0; i < vm->mem.n; i++) {
                op->u.postcopy.table[i] = vm->mem.regions[i];
                region_to_wire(&vm->mem.regions[i], &regs[i]);
                fds[i] = vm->mem.regions[i].fd;
        }
        r = vhu_msg_build_mem_table(&m, false, regs, fds, (unsigned)vm->mem.n);
        if (r < 0)
                return device_op_error(op, VHUB_ERR_INTERNAL, REQ(VHU_REQ_SET_MEM_TABLE),
                                       "cannot build SET_MEM_TABLE: %s", strerror(-r));
        /* no NEED_REPLY: libvhost-user would echo it into the table reply */
        return device_send_awaiting(d, op, &m, TAG(TAGK_MEM_TABLE, 0));
}

int postcopy_stage(struct vhub_device *d, struct vhub_op *op) {
        struct vhu_msg m;
        int r;

        switch (op->u.postcopy.step) {
        case VHUB_POSTCOPY_ADVISE:
        case VHUB_POSTCOPY_END:
                if (op->stage > 0)
                        return OP_STAGE_DONE;
                vhu_msg_build_none(&m, op->u.postcopy.step == VHUB_POSTCOPY_ADVISE ? VHU_REQ_POSTCOPY_ADVISE
                                                                                  : VHU_REQ_POSTCOPY_END,
                                   false);
                return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_NEXT;
        case VHUB_POSTCOPY_LISTEN:
                switch (op->stage) {
                case 0:
                        r = listen_begin(d, op);
                        return r < 0 ? r : OP_STAGE_NEXT;
                case 1:
                        r = listen_send_table(d, op);
                        return r < 0 ? r : OP_STAGE_NEXT;
                case 2:
                        if (op->u.postcopy.n_table == 0)
                                return OP_STAGE_DONE;
                        /* the fault handler knows the mappings now: the back-end may fault */
                        vhu_msg_build_postcopy_mem_ack(&m, false);
                        return device_send(d, op, &m, 0) < 0 ? op->result : OP_STAGE_NEXT;
                default:
                        return OP_STAGE_DONE;
                }
        }
        return OP_STAGE_DONE;
}

/*
 * libvhost-user (QEMU 4.2 to at least 7.2) answers the postcopy SET_MEM_TABLE
 * with the table it was sent: it writes its addresses into a local copy.
 * Its mapping is then found the way a debugger would: the one mapping of
 * the region's file, from file offset 0 over mmap_offset + size (how
 * libvhost-user maps), in the back-end process's /proc/PID/maps (the peer
 * of the socket).  0 if there is not exactly one.
 */
static uint64_t backend_mapping_from_proc(struct vhub_device *d, const struct vhub_region *reg) {
        struct ucred cred;
        socklen_t len = sizeof(cred);
        uint64_t found = 0;
        unsigned matches = 0;
        char path[64], line[512];
        struct stat st;
        FILE *f;

        if (!d->conn || getsockopt(vhub_bconn_fd(d->conn), SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0 ||
            cred.pid <= 0 || fstat(reg->fd, &st) < 0)
                return 0;
        snprintf(path, sizeof(path), "/proc/%d/maps", (int)cred.pid);
        f = fopen(path, "re");
        if (!f)
                return 0;
        while (fgets(line, sizeof(line), f)) {
                unsigned long long start, end, pgoff, inode;
                unsigned maj, min;

                if (sscanf(line, "%llx-%llx %*4s %llx %x:%x %llu", &start, &end, &pgoff, &maj, &min, &inode) != 6)
                        continue;
                if (inode != (unsigned long long)st.st_ino || makedev(maj, min) != st.st_dev || pgoff != 0 ||
                    end - start != reg->size + reg->offset)
                        continue;
                matches++;
                found = start + reg->offset;
        }
        fclose(f);
        return matches == 1 ? found : 0;
}

/* The back-end's answer to the postcopy SET_MEM_TABLE: every region, where it mapped it. */
static void listen_on_table(struct vhub_device *d, struct vhub_op *op, const struct vhu_msg *reply) {
        const struct vhu_mem_table *t = &reply->payload.mem_table;

        if (reply->hdr.size == sizeof(uint64_t)) {
                device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_SET_MEM_TABLE),
                                "back-end answered the postcopy SET_MEM_TABLE with status %llu, not its mappings",
                                (unsigned long long)reply->payload.u64);
                return;
        }
        if (t->nregions != op->u.postcopy.n_table) {
                device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_SET_MEM_TABLE),
                                "back-end answered the postcopy SET_MEM_TABLE with %u regions, not %zu",
                                t->nregions, op->u.postcopy.n_table);
                return;
        }
        for (size_t i = 0; i < op->u.postcopy.n_table; i++) {
                const struct vhub_region *want = &op->u.postcopy.table[i];

                if (t->regions[i].gpa != want->gpa || t->regions[i].size != want->size) {
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_SET_MEM_TABLE),
                                        "back-end's postcopy mapping %zu does not match the region sent", i);
                        return;
                }
                op->u.postcopy.backend_uaddr[i] = t->regions[i].uaddr;
                if (t->regions[i].uaddr == want->uaddr) {
                        uint64_t a = backend_mapping_from_proc(d, want);

                        if (!a) {
                                device_op_error(op, VHUB_ERR_BACKEND, REQ(VHU_REQ_SET_MEM_TABLE),
                                                "back-end answered the postcopy SET_MEM_TABLE with the front-end's own addresses, and its mapping of region %zu cannot be found",
                                                i);
                                return;
                        }
                        device_log(d, LOG_INFO, REQ(VHU_REQ_SET_MEM_TABLE),
                                   "back-end echoed the front-end's address of region %zu (libvhost-user); its mapping is at 0x%llx",
                                   i, (unsigned long long)a);
                        op->u.postcopy.backend_uaddr[i] = a;
                }
        }
        for (size_t i = 0; i < op->u.postcopy.n_table; i++)
                shadow_add(d, op->u.postcopy.table[i].id);
}

void postcopy_on_reply(struct vhub_device *d, struct vhub_op *op, uint32_t request, uint32_t tag,
                       struct vhu_msg *reply) {
        switch (request) {
        case VHU_REQ_POSTCOPY_ADVISE:
                /* the validator checked: exactly one fd */
                op->u.postcopy.ufd = vhu_msg_take_fd(reply, 0);
                break;
        case VHU_REQ_POSTCOPY_END:
                if (reply->payload.u64 != 0)
                        device_op_error(op, VHUB_ERR_BACKEND, REQ(request),
                                        "back-end ended postcopy with status %llu",
                                        (unsigned long long)reply->payload.u64);
                break;
        case VHU_REQ_SET_MEM_TABLE:
                listen_on_table(d, op, reply);
                break;
        default:
                op_check_ack(d, op, request, reply);
                break;
        }
}

void postcopy_free(struct vhub_op *op) {
        free(op->u.postcopy.table);
        free(op->u.postcopy.backend_uaddr);
}

void postcopy_complete(struct vhub_device *d, struct vhub_op *op, int r) {
        struct vhub_postcopy_region *regions = NULL;
        unsigned n = 0;
        int ufd = -1;

        if (r == 0 && op->u.postcopy.step == VHUB_POSTCOPY_LISTEN && op->u.postcopy.n_table > 0) {
                regions = calloc(op->u.postcopy.n_table, sizeof(*regions));
                if (!regions) {
                        r = device_op_error(op, VHUB_ERR_INTERNAL, NULL, "out of memory");
                } else {
                        n = (unsigned)op->u.postcopy.n_table;
                        for (unsigned i = 0; i < n; i++)
                                regions[i] = (struct vhub_postcopy_region){
                                        .gpa = op->u.postcopy.table[i].gpa,
                                        .size = op->u.postcopy.table[i].size,
                                        .backend_uaddr = op->u.postcopy.backend_uaddr[i],
                                };
                }
        }
        if (r == 0 && op->u.postcopy.step == VHUB_POSTCOPY_ADVISE)
                ufd = VHU_TAKE_FD(op->u.postcopy.ufd);
        /* a listen that failed half-way leaves the back-end's memory unknown:
         * a restore maps the VM's table again from scratch */
        if (r < 0 && op->u.postcopy.step == VHUB_POSTCOPY_LISTEN && vhub_device_is_connected(d) &&
            !d->removing && op->error.code != VHUB_ERR_NO_DEVICE && op->error.code != VHUB_ERR_NO_VM)
                device_mark_lost(d, op->error.detail);
        vhub_vm_postcopy_device_done(d->vm, op->u.postcopy.batch, d, d->removing ? 0 : r, &op->error, ufd,
                                     regions, n);
}
