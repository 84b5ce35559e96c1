/* SPDX-License-Identifier: MIT */
/*
 * Private to daemon/vhub-vm*.c: the macros and functions the VM's files
 * share (vhub-vm.c says which file holds what).
 */
#pragma once

#include "vhub-fd-track.h"
#include "vhub-log.h"
#include "vhub-vm.h"

#define vm_log(vm, level, ...) vhub_log_vm((level), (vm), __VA_ARGS__)

/* The VM's fds join and leave its groups as it takes and closes them
 * (vhub-fd-track.h); fmt names them below "vm/<uid>/<vm>/". */
#define vm_fd_track(vm, group, fd, fmt, ...)                                                     \
        do {                                                                                     \
                vhub_fd_track((vm)->ctx, (group), (fd), "vm/%u/%s/" fmt, (unsigned)(vm)->uid,     \
                              (vm)->name, ##__VA_ARGS__);                                        \
                vhub_changed((vm)->ctx, (vm));                                                   \
        } while (0)
#define vm_fd_untrack(vm, group, fd, fmt, ...)                                                   \
        do {                                                                                     \
                vhub_fd_untrack((vm)->ctx, (group), (fd), "vm/%u/%s/" fmt, (unsigned)(vm)->uid,   \
                                (vm)->name, ##__VA_ARGS__);                                      \
                vhub_changed((vm)->ctx, (vm));                                                   \
        } while (0)
#define vm_fd_visit(vm, v, fd, group, fmt, ...)                                                  \
        vhub_fd_visit((v), (fd), (group), "vm/%u/%s/" fmt, (unsigned)(vm)->uid, (vm)->name,       \
                      ##__VA_ARGS__)

/* vhub-vm.c: the VM's life */
void vm_region_untrack(struct vhub_vm *vm, const struct vhub_region *r);
void vm_mem_op_free(struct vhub_mem_op *op);
bool vm_resume_parked(struct vhub_vm *vm);

/* vhub-vm-dirty-log.c: dirty logging */
void vm_log_close(struct vhub_vm *vm);
