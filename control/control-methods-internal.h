/* SPDX-License-Identifier: MIT */
/*
 * The contract's methods, private to their files (included by no other):
 * control-methods.c holds the table and the dispatch; each method's params,
 * result descriptor and function live in the file of its job:
 *   control-methods-daemon.c             daemon.info, rpc.discover, events.subscribe
 *   control-methods-vm.c                 vm.create/attach/destroy/list, shared_object.*
 *   control-methods-memory.c             vm.memory.*, vm.dirty_log.*, vm.postcopy.*
 *   control-methods-device.c             device.*: a device's life, config, rings, state
 *   control-methods-device-features.c    device.crypto.*, device.gpu.*, device.iotlb.*
 */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "control-internal.h"
#include "control-params.h"
#include "vhub-device.h"
#include "vhub-vm.h"

/* "uid" left out: the caller's own (outside the range a request may give). */
#define UID_CALLER UINT64_MAX
#define MAX_LINGER_MS (7ull * 24 * 3600 * 1000)
#define MAX_RECONNECT_MS 3600000u
/* a unix socket path: sun_path less its NUL */
#define MAX_SOCKET_PATH 107

/* Every method's params; each descriptor says where its members go. */
struct method_params {
        /* the VM and device a method names (METHOD_VM, METHOD_DEVICE; device.add's new one) */
        const char *vm;
        uint64_t uid;
        const char *device;
        union {
                struct {
                        uint64_t linger_ms;
                } vm_create;
                struct {
                        struct vhub_region region;
                        bool uaddr_given;
                } memory_add;
                struct {
                        uint64_t gpa;
                } memory_remove;
                struct {
                        const char *socket, *type;
                        unsigned mode;
                        uint32_t queues, reconnect_ms;
                        bool vmm_socket;
                } device_add;
                struct {
                        uint32_t offset, size;
                } config_get;
                struct {
                        uint32_t offset;
                        struct params_bytes data;
                } config_set;
                struct {
                        uint64_t features;
                        struct params_array vrings; /* of struct vhub_vring_params */
                } start;
                struct {
                        bool drain;
                } stop;
                struct {
                        uint32_t index;
                } kick;
                struct {
                        uint8_t mac[6];
                } rarp;
                struct {
                        uint32_t mtu;
                } mtu;
                struct {
                        int fd;
                } state_fd;
                struct {
                        uint8_t uuid[16];
                        int fd;
                } shared;
                struct {
                        uint64_t token, result;
                } backend_reply;
                struct {
                        struct vhu_crypto_session s; /* its u32 members read in place */
                        uint32_t direction, op_type, hash_mode, alg_chain_order; /* u8 on the wire */
                        struct params_bytes cipher_key, auth_key;
                } crypto_create;
                struct {
                        uint64_t session_id;
                } crypto_close;
                struct {
                        int fd;
                } gpu;
                struct {
                        uint64_t iova, size, uaddr;
                        unsigned perm;
                } iotlb;
                struct {
                        bool backend_regions;
                } postcopy_listen;
        };
};

#define AT(field) offsetof(struct method_params, field)

/* What a method's function gets. */
struct method_call {
        struct control_req *req;
        struct method_params p;
        struct vhub_vm *vm;          /* METHOD_VM: the VM named (METHOD_VM_OPTIONAL: NULL if none) */
        struct vhub_device *dev;     /* METHOD_DEVICE: the device named */
        struct control_call *cc;     /* METHOD_WAITS: hand &cc->call to the model, which answers */
        json_t *result;              /* otherwise the answer; NULL: {} */
};

/* ---- members every method that names a VM or device has ---- */

#define P_VM(required_)                                                                          \
        { .name = "vm", .kind = PARAM_NAME, .required = (required_), .offset = AT(vm),         \
          .description = "the VM's name (names are per uid)" }
#define P_UID                                                                                    \
        { .name = "uid", .kind = PARAM_U64, .max = UINT32_MAX - 1, .def = UID_CALLER,           \
          .offset = AT(uid), .description = "root only: the uid the VM belongs to (default: the caller's)" }
#define P_DEVICE(description_)                                                                   \
        { .name = "device", .kind = PARAM_NAME, .required = true, .offset = AT(device),         \
          .description = (description_) }

/* "fd", an fd the request carries: the one such member of most methods */
#define P_FD(field_, description_)                                                               \
        { .name = "fd", .kind = PARAM_FD, .required = true, .offset = AT(field_),               \
          .description = (description_) }

/* Result members, for rpc.discover (the functions below build them). */
#define R(name_, kind_, description_) { .name = (name_), .kind = (kind_), .required = true, .description = (description_) }
#define R_U64(name_, description_)                                                                 \
        { .name = (name_), .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .description = (description_) }
#define R_OBJECT(...) { .kind = PARAM_OBJECT, .members = (const struct param[]){ __VA_ARGS__, { 0 } } }
#define R_ARRAY_OF(name_, description_, ...)                                                       \
        { .name = (name_), .kind = PARAM_ARRAY, .required = true, .max = UINT64_MAX,             \
          .items = &(const struct param)R_OBJECT(__VA_ARGS__), .description = (description_) }
#define R_NAMES(name_, description_)                                                               \
        { .name = (name_), .kind = PARAM_ARRAY, .required = true, .max = UINT64_MAX,             \
          .items = &(const struct param){ .kind = PARAM_NAME }, .description = (description_) }


/* ---- control-methods.c: what every method's function uses */

struct vhub_context *cm_call_ctx(const struct method_call *m);
int cm_call_answer(struct method_call *m, json_t *result, struct vhub_error *err);
int cm_call_answer_list(struct method_call *m, int r, const char *key, void *items, size_t n,
                        size_t size, json_t *(*item_json)(const void *item), struct vhub_error *err);

/* ---- control-methods-daemon.c: daemon.info, rpc.discover, events.subscribe */

int cm_daemon_info(struct method_call *m, struct vhub_error *err);
extern const struct param cm_daemon_info_result;
int cm_rpc_discover(struct method_call *m, struct vhub_error *err);
extern const struct param cm_rpc_discover_result;
int cm_events_subscribe(struct method_call *m, struct vhub_error *err);

/* ---- control-methods-vm.c: vm.create/attach/destroy/list, shared_object.* */

extern const struct param cm_vm_create_params[];
int cm_vm_create(struct method_call *m, struct vhub_error *err);
int cm_vm_attach(struct method_call *m, struct vhub_error *err);
int cm_vm_destroy(struct method_call *m, struct vhub_error *err);
int cm_vm_list(struct method_call *m, struct vhub_error *err);
extern const struct param cm_vm_list_result;
extern const struct param cm_shared_object_add_params[];
int cm_shared_object_add(struct method_call *m, struct vhub_error *err);
extern const struct param cm_shared_object_remove_params[];
int cm_shared_object_remove(struct method_call *m, struct vhub_error *err);
int cm_shared_object_list(struct method_call *m, struct vhub_error *err);
extern const struct param cm_shared_object_list_result;

/* ---- control-methods-memory.c: vm.memory.*, vm.dirty_log.*, vm.postcopy.* */

extern const struct param cm_vm_memory_add_params[];
int cm_vm_memory_add(struct method_call *m, struct vhub_error *err);
extern const struct param cm_vm_memory_remove_params[];
int cm_vm_memory_remove(struct method_call *m, struct vhub_error *err);
int cm_vm_memory_list(struct method_call *m, struct vhub_error *err);
extern const struct param cm_vm_memory_list_result;
json_t *cm_result_dirty_log(struct control_call *cc);
extern const struct param cm_dirty_log_result;
int cm_vm_dirty_log_start(struct method_call *m, struct vhub_error *err);
int cm_vm_dirty_log_stop(struct method_call *m, struct vhub_error *err);
json_t *cm_result_postcopy_advise(struct control_call *cc);
extern const struct param cm_postcopy_advise_result;
int cm_vm_postcopy_advise(struct method_call *m, struct vhub_error *err);
extern const struct param cm_postcopy_listen_params[];
extern const struct param cm_postcopy_listen_result;
int cm_vm_postcopy_listen(struct method_call *m, struct vhub_error *err);
int cm_vm_postcopy_end(struct method_call *m, struct vhub_error *err);

/* ---- control-methods-device.c: device.*: a device's life, config, rings, state */

extern const struct param cm_device_add_params[];
json_t *cm_result_device_add(struct control_call *cc);
extern const struct param cm_device_add_result;
int cm_device_add(struct method_call *m, struct vhub_error *err);
int cm_device_remove(struct method_call *m, struct vhub_error *err);
int cm_device_list(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_list_result;
int cm_device_stats(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_stats_result;
extern const struct param cm_device_config_get_params[];
json_t *cm_result_config_get(struct control_call *cc);
extern const struct param cm_config_get_result;
int cm_device_config_get(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_config_set_params[];
int cm_device_config_set(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_start_params[];
int cm_device_start(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_stop_params[];
json_t *cm_result_device_stop(struct control_call *cc);
extern const struct param cm_device_stop_result;
int cm_device_stop(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_kick_params[];
int cm_device_kick(struct method_call *m, struct vhub_error *err);
int cm_device_reset(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_net_rarp_params[];
int cm_device_net_rarp(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_net_mtu_params[];
int cm_device_net_mtu(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_state_fd_params[];
json_t *cm_result_state_fd(struct control_call *cc);
extern const struct param cm_state_fd_result;
int cm_device_state_save(struct method_call *m, struct vhub_error *err);
int cm_device_state_load(struct method_call *m, struct vhub_error *err);
int cm_device_state_check(struct method_call *m, struct vhub_error *err);
extern const struct param cm_device_backend_reply_params[];
int cm_device_backend_reply(struct method_call *m, struct vhub_error *err);

/* ---- control-methods-device-features.c: device.crypto.*, device.gpu.*, device.iotlb.* */

extern const struct param cm_crypto_session_create_params[];
extern const struct param cm_crypto_session_close_params[];
json_t *cm_result_crypto_session(struct control_call *cc);
extern const struct param cm_crypto_session_result;
int cm_device_crypto_session_create(struct method_call *m, struct vhub_error *err);
int cm_device_crypto_session_close(struct method_call *m, struct vhub_error *err);
extern const struct param cm_gpu_set_socket_params[];
int cm_device_gpu_set_socket(struct method_call *m, struct vhub_error *err);
extern const struct param cm_iotlb_update_params[];
extern const struct param cm_iotlb_invalidate_params[];
int cm_device_iotlb_update(struct method_call *m, struct vhub_error *err);
int cm_device_iotlb_invalidate(struct method_call *m, struct vhub_error *err);
