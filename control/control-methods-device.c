/* SPDX-License-Identifier: MIT */
/* A device's methods: add, remove, list, stats, config, start, stop, kick,
 * reset, net, state, backend_reply.  Their rows are in control-methods.c's
 * table (control-methods-internal.h). */
#include <stdlib.h>

#include "control-methods-internal.h"
#include "vhub-context.h"
#include "vhub-info.h"
#include "vhub-time.h"
#include "vhu-fd.h"

/* ---- devices ---- */

static const char *const device_modes[] = { "client", "server", NULL };
static const enum vhub_device_mode device_mode_values[] = { VHUB_DEV_MODE_CLIENT, VHUB_DEV_MODE_SERVER };

const struct param cm_device_add_params[] = {
        P_DEVICE("the new device's name, unique within its VM"),
        { .name = "socket", .kind = PARAM_STRING, .required = true, .max = MAX_SOCKET_PATH,
          .offset = AT(device_add.socket),
          .description = "the back-end's unix socket, inside a --backend-dir (at most 107 bytes)" },
        { .name = "type", .kind = PARAM_NAME, .max = 31, .offset = AT(device_add.type),
          .description = "the virtio device type (blk, net, fs, ...), informational" },
        { .name = "mode", .kind = PARAM_ENUM, .values = device_modes, .offset = AT(device_add.mode),
          .description = "connect to the socket (client, the default) or listen on it (server)" },
        { .name = "queues", .kind = PARAM_U32, .min = 1, .max = VHUB_MAX_QUEUES, .offset = AT(device_add.queues),
          .description = "how many virtqueues the VMM uses (default: what the back-end reports, else 1)" },
        { .name = "reconnect_ms", .kind = PARAM_U32, .max = MAX_RECONNECT_MS, .def = 100,
          .offset = AT(device_add.reconnect_ms),
          .description = "delay before the first reconnect after a loss (default 100; 0: never, the device fails)" },
        { .name = "vmm_socket", .kind = PARAM_BOOL, .offset = AT(device_add.vmm_socket),
          .description = "a front-door device: the daemon also listens on a socket of its own, where an "
                         "unmodified VMM connects as if to the back-end (default false)" },
        { 0 },
};

json_t *cm_result_device_add(struct control_call *cc) {
        json_t *res = json_pack("{s:o, s:o, s:i, s:i}", "features",
                                vhub_json_u64(cc->call.out.device_add.features), "protocol_features",
                                vhub_json_u64(cc->call.out.device_add.protocol_features), "queues",
                                (int)cc->call.out.device_add.queues, "max_mem_slots",
                                (int)cc->call.out.device_add.max_mem_slots);
        json_t *sizes;

        if (res && cc->call.out.device_add.vmm_socket[0])
                json_object_set_new(res, "vmm_socket", json_string(cc->call.out.device_add.vmm_socket));
        /* contract: `shmem` only where SHMEM is negotiated (GET_SHMEM_CONFIG) */
        if (!res || !cc->call.out.device_add.has_shmem)
                return res;
        sizes = json_array();
        for (unsigned i = 0; i < cc->call.out.device_add.n_shmem; i++)
                json_array_append_new(sizes, vhub_json_u64(cc->call.out.device_add.shmem_sizes[i]));
        json_object_set_new(res, "shmem", sizes);
        return res;
}

const struct param cm_device_add_result = R_OBJECT(
        R_U64("features", "the virtio features the back-end offered"),
        R_U64("protocol_features", "the protocol features negotiated"),
        R_U64("queues", "the queue count"),
        R_U64("max_mem_slots", "how many memory regions the back-end takes"),
        { .name = "shmem", .kind = PARAM_ARRAY, .max = VHU_MAX_SHMEM_REGIONS,
          .items = &(const struct param){ .kind = PARAM_U64, .max = UINT64_MAX },
          .description = "where SHMEM is negotiated: the back-end's shared-memory region sizes (GET_SHMEM_CONFIG)" },
        { .name = "vmm_socket", .kind = PARAM_STRING,
          .description = "with vmm_socket: true, the socket the VMM connects to" });

int cm_device_add(struct method_call *m, struct vhub_error *err) {
        struct vhub_device_add_params p = {
                .name = m->p.device,
                .socket_path = m->p.device_add.socket,
                .type = m->p.device_add.type,
                .mode = device_mode_values[m->p.device_add.mode],
                .queues = m->p.device_add.queues,
                .reconnect_ms = m->p.device_add.reconnect_ms,
                .face = VHUB_FACE_JSON_RPC,
                .vmm_socket = m->p.device_add.vmm_socket,
                /* the asker's rights, never the VM creator's: root may have
                 * created the VM for this uid */
                .cred = &m->req->conn->cred,
        };
        /* its socket, channel, inflight fd... */
        int r = control_req_check_fds(m->req, VHUB_DEVICE_OWN_FDS, err);

        if (r < 0)
                return r;
        vhub_device_add(m->vm, &p, &m->cc->call);
        return 0;
}

int cm_device_remove(struct method_call *m, struct vhub_error *err) {
        vhub_device_remove(m->dev, &m->cc->call);
        return 0;
}

static json_t *device_json(const void *item) {
        const struct vhub_device_info *d = item;

        json_t *o = json_pack("{s:s, s:s, s:s, s:o, s:o, s:o, s:i, s:i}", "device", d->name, "state",
                              vhub_device_state_to_string(d->state), "socket", d->socket, "features",
                              vhub_json_u64(d->features), "acked_features", vhub_json_u64(d->acked_features),
                              "protocol_features", vhub_json_u64(d->protocol_features), "queues",
                              (int)d->queues, "reconnects", (int)d->reconnects);

        if (o && d->type[0])    /* an extension (docs/control-api.md) */
                json_object_set_new(o, "type", json_string(d->type));
        /* contract: front-door devices carry vmm_socket and vmm */
        if (o && d->front_door) {
                json_object_set_new(o, "vmm_socket", json_string(d->vmm_socket));
                json_object_set_new(o, "vmm", json_string(d->vmm_connected ? "connected" : "waiting"));
        }
        return o;
}

int cm_device_list(struct method_call *m, struct vhub_error *err) {
        struct vhub_device_info *devs = NULL;
        size_t n = 0;
        int r = vhub_info_devices(m->vm, &devs, &n);

        return cm_call_answer_list(m, r, "devices", devs, n, sizeof(*devs), device_json, err);
}

static const char *const vmm_states[] = { "connected", "waiting", NULL };
static const char *const device_states[] = { "connecting", "ready", "running", "stopped",
                                             "disconnected", "failed", NULL };

const struct param cm_device_list_result = R_OBJECT(
        R_ARRAY_OF("devices", "the VM's devices",
                   R("device", PARAM_NAME, "its name"),
                   { .name = "state", .kind = PARAM_ENUM, .required = true, .values = device_states,
                     .description = "where it is in its life" },
                   R("socket", PARAM_STRING, "its back-end socket"),
                   R_U64("features", "the virtio features the back-end offers"),
                   R_U64("acked_features", "what the last device.start acked"),
                   R_U64("protocol_features", "the protocol features negotiated"),
                   R_U64("queues", "the queue count"),
                   R_U64("reconnects", "how many times it was restored after a loss"),
                   { .name = "type", .kind = PARAM_NAME, .max = 31,
                     .description = "an extension: the type device.add was given, if any" },
                   { .name = "vmm_socket", .kind = PARAM_STRING,
                     .description = "a front-door device: the socket its VMM connects to" },
                   { .name = "vmm", .kind = PARAM_ENUM, .values = vmm_states,
                     .description = "a front-door device: whether a VMM is connected" }));

int cm_device_stats(struct method_call *m, struct vhub_error *err) {
        struct vhub_device_stats_info st;
        const struct vhub_device_stats *c = &st.counters;
        json_t *res;

        vhub_info_device_stats(m->dev, &st);
        res = json_pack("{s:s, s:o, s:o, s:o, s:o, s:o, s:I, s:o, s:o, s:o}", "state",
                        vhub_device_state_to_string(st.state), "since_ms", vhub_json_u64(st.since_usec / 1000),
                        "requests", vhub_json_u64(c->requests), "replies", vhub_json_u64(c->replies),
                        "timeouts", vhub_json_u64(c->timeouts), "losses", vhub_json_u64(c->losses),
                        "reconnects", (json_int_t)st.reconnects, "backend_requests",
                        vhub_json_u64(c->backend_requests), "handshake_us", vhub_json_u64(c->handshake_usec),
                        /* an extension (docs/control-api.md) */
                        "eventfd_skipped", vhub_json_u64(c->eventfd_skipped));
        if (res && c->lost) {
                char timestamp[VHUB_RFC3339_LEN];

                vhub_format_rfc3339(c->last_loss_realtime_usec, timestamp);
                json_object_set_new(res, "last_loss", json_pack("{s:s, s:s}", "reason", c->last_loss_reason,
                                                                "timestamp", timestamp));
        }
        if (res && c->restored)
                json_object_set_new(res, "restore_us", vhub_json_u64(c->restore_usec));
        return cm_call_answer(m, res, err);
}

const struct param cm_device_stats_result = R_OBJECT(
        { .name = "state", .kind = PARAM_ENUM, .required = true, .values = device_states,
          .description = "where it is in its life, as device.list says" },
        R_U64("since_ms", "milliseconds in that state"),
        R_U64("requests", "vhost-user requests sent to its back-end, every connection since device.add"),
        R_U64("replies", "replies received from the back-end"),
        R_U64("timeouts", "replies that missed --backend-timeout-ms (each a loss or a failed restore attempt)"),
        R_U64("losses", "times the back-end was lost while the device was up"),
        R_U64("reconnects", "times it was restored after a loss (device.list's reconnects)"),
        { .name = "last_loss", .kind = PARAM_OBJECT,
          .members = (const struct param[]){
                  R("reason", PARAM_STRING, "why, as device.disconnected said"),
                  R("timestamp", PARAM_TIMESTAMP, "when: device.disconnected's timestamp"),
                  { 0 } },
          .description = "the last loss, once there was one" },
        R_U64("backend_requests", "requests the back-end sent on its channel (BACKEND_REQ)"),
        R_U64("handshake_us", "the last successful handshake's duration (device.add's or a restore's); 0 before"),
        { .name = "restore_us", .kind = PARAM_U64, .max = UINT64_MAX,
          .description = "the last restore's duration, from the loss to device.reconnected, once there was one" },
        R_U64("eventfd_skipped", "an extension: writes to the VMM's kick/call/err eventfds not done (counter "
                                 "full and unread, or a broken fd)"));

/* config space: offset + length at most VHU_MAX_CONFIG_SIZE (checked by the functions) */
#define P_CONFIG_OFFSET(field_)                                                                    \
        { .name = "offset", .kind = PARAM_U32, .required = true, .max = VHU_MAX_CONFIG_SIZE,    \
          .offset = AT(field_), .description = "where to start in the config space" }

const struct param cm_device_config_get_params[] = {
        P_CONFIG_OFFSET(config_get.offset),
        { .name = "size", .kind = PARAM_U32, .required = true, .min = 1, .max = VHU_MAX_CONFIG_SIZE,
          .offset = AT(config_get.size), .description = "how many bytes (offset + size at most 256)" },
        { 0 },
};

json_t *cm_result_config_get(struct control_call *cc) {
        char *b64 = NULL;
        json_t *res;

        if (vhub_base64_encode(cc->call.out.config_get.data, cc->call.out.config_get.size, &b64) < 0)
                return NULL;
        res = json_pack("{s:s}", "data", b64);
        free(b64);
        return res;
}

const struct param cm_config_get_result = R_OBJECT(
        { .name = "data", .kind = PARAM_BASE64, .required = true, .min = 1, .max = VHU_MAX_CONFIG_SIZE,
          .description = "the bytes read" });

int cm_device_config_get(struct method_call *m, struct vhub_error *err) {
        uint32_t offset = m->p.config_get.offset, size = m->p.config_get.size;

        if (offset + size > VHU_MAX_CONFIG_SIZE)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "'size' must be 1..%d and offset+size at most %d",
                                      VHU_MAX_CONFIG_SIZE, VHU_MAX_CONFIG_SIZE);
        vhub_device_config_get(m->dev, offset, size, &m->cc->call);
        return 0;
}

const struct param cm_device_config_set_params[] = {
        P_CONFIG_OFFSET(config_set.offset),
        { .name = "data", .kind = PARAM_BASE64, .required = true, .min = 1, .max = VHU_MAX_CONFIG_SIZE,
          .offset = AT(config_set.data), .description = "the bytes to write (offset + length at most 256)" },
        { 0 },
};

int cm_device_config_set(struct method_call *m, struct vhub_error *err) {
        const struct params_bytes *data = &m->p.config_set.data;

        if (m->p.config_set.offset + data->len > VHU_MAX_CONFIG_SIZE)
                return vhub_error_set(err, VHUB_ERR_PARAMS, "offset + data length exceeds %d", VHU_MAX_CONFIG_SIZE);
        vhub_device_config_set(m->dev, m->p.config_set.offset, data->data, (uint32_t)data->len, &m->cc->call);
        return 0;
}

#define VRING(field) offsetof(struct vhub_vring_params, field)

static const struct param vring_members[] = {
        { .name = "index", .kind = PARAM_U32, .required = true, .max = VHUB_MAX_QUEUES - 1,
          .offset = VRING(index), .description = "the ring's index" },
        { .name = "size", .kind = PARAM_U32, .required = true, .max = 32768, .offset = VRING(size),
          .description = "its size (a power of 2)" },
        /* a packed ring's position is a u32: spec "Vring descriptor indices for
         * packed virtqueues" (what device.stop answers for it) */
        { .name = "base", .kind = PARAM_U32, .max = UINT32_MAX, .offset = VRING(base),
          .given = PARAM_GIVEN(struct vhub_vring_params, base_given),
          .description = "the next avail index (default 0); split rings: at most 65535; packed rings: "
                         "bits 0-14 the next avail index, bit 15 its wrap counter, bits 16-30 the next used "
                         "index, bit 31 its wrap counter (default 0x80008000: index 0, wrap counters 1)" },
        { .name = "desc", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = VRING(desc),
          .description = "guest-physical address of the descriptor table" },
        { .name = "avail", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = VRING(avail),
          .description = "guest-physical address of the available ring" },
        { .name = "used", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = VRING(used),
          .description = "guest-physical address of the used ring" },
        { .name = "kick", .kind = PARAM_FD, .offset = VRING(kick_fd),
          .description = "fd index: the kick eventfd; left out, the VMM kicks with device.kick "
                         "(INBAND_NOTIFICATIONS)" },
        { .name = "call", .kind = PARAM_FD, .required = true, .offset = VRING(call_fd),
          .description = "fd index: the call eventfd" },
        { .name = "err", .kind = PARAM_FD, .offset = VRING(err_fd), .description = "fd index: the error eventfd" },
        { 0 },
};

const struct param cm_device_start_params[] = {
        { .name = "features", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = AT(start.features),
          .description = "the virtio features the driver acked (bit 30 is the daemon's and ignored)" },
        { .name = "vrings", .kind = PARAM_ARRAY, .required = true, .min = 1, .max = VHUB_MAX_QUEUES,
          .offset = AT(start.vrings),
          .items = &(const struct param){ .kind = PARAM_OBJECT, .members = vring_members,
                                          .size = sizeof(struct vhub_vring_params) },
          .description = "the rings to start" },
        { 0 },
};

int cm_device_start(struct method_call *m, struct vhub_error *err) {
        /* bit 30 is vhost-user's own: the daemon adds it itself */
        uint64_t features = m->p.start.features & ~(UINT64_C(1) << VHU_F_PROTOCOL_FEATURES);

        /* takes every ring's fds, in every case */
        vhub_device_start(m->dev, features, m->p.start.vrings.items, (unsigned)m->p.start.vrings.n, &m->cc->call);
        return 0;
}

const struct param cm_device_stop_params[] = {
        { .name = "drain", .kind = PARAM_BOOL, .def = true, .offset = AT(stop.drain),
          .description = "wait for in-flight requests (default); false: GET_VRING_BASE_SKIP_DRAIN, the "
                         "back-end suspends them into the inflight region" },
        { 0 },
};

json_t *cm_result_device_stop(struct control_call *cc) {
        json_t *v = json_array();

        for (unsigned i = 0; i < cc->call.out.device_stop.n_vrings; i++) {
                const struct vhub_vring_base *b = &cc->call.out.device_stop.vrings[i];
                /* base is a u32 (a packed ring's has wrap counters in bits 15 and 31) */
                json_t *ring = json_pack("{s:i, s:I}", "index", (int)b->index, "base", (json_int_t)b->base);

                /* GET_VRING_BASE_INFLIGHT: how many requests the back-end
                 * suspended into the inflight region (completed after the
                 * next device.start); absent if the region was unreadable */
                if (ring && b->inflight >= 0)
                        json_object_set_new(ring, "inflight", json_integer(b->inflight));
                json_array_append_new(v, ring);
        }
        return json_pack("{s:o}", "vrings", v);
}

const struct param cm_device_stop_result = R_OBJECT(
        R_ARRAY_OF("vrings", "every ring that was running",
                   R_U64("index", "the ring's index"),
                   { .name = "base", .kind = PARAM_U32, .required = true, .max = UINT32_MAX,
                     .description = "GET_VRING_BASE: where the ring stopped (packed rings: wrap counters in "
                                    "bits 15 and 31)" },
                   { .name = "inflight", .kind = PARAM_U32, .max = UINT32_MAX,
                     .description = "with GET_VRING_BASE_INFLIGHT: requests the back-end suspended, completed "
                                    "after the next device.start" }));

int cm_device_stop(struct method_call *m, struct vhub_error *err) {
        vhub_device_stop(m->dev, m->p.stop.drain, &m->cc->call);
        return 0;
}

const struct param cm_device_kick_params[] = {
        { .name = "index", .kind = PARAM_U32, .required = true, .max = VHUB_MAX_QUEUES - 1,
          .offset = AT(kick.index), .description = "the ring to kick (one that was started)" },
        { 0 },
};

int cm_device_kick(struct method_call *m, struct vhub_error *err) {
        vhub_device_kick(m->dev, m->p.kick.index, &m->cc->call);
        return 0;
}

int cm_device_reset(struct method_call *m, struct vhub_error *err) {
        vhub_device_reset(m->dev, &m->cc->call);
        return 0;
}

const struct param cm_device_net_rarp_params[] = {
        { .name = "mac", .kind = PARAM_MAC, .required = true, .offset = AT(rarp.mac),
          .description = "the guest's MAC address, aa:bb:cc:dd:ee:ff" },
        { 0 },
};

int cm_device_net_rarp(struct method_call *m, struct vhub_error *err) {
        vhub_device_send_rarp(m->dev, m->p.rarp.mac, &m->cc->call);
        return 0;
}

const struct param cm_device_net_mtu_params[] = {
        { .name = "mtu", .kind = PARAM_U32, .required = true, .min = 68, .max = 65535, .offset = AT(mtu.mtu),
          .description = "the MTU to set" },
        { 0 },
};

int cm_device_net_mtu(struct method_call *m, struct vhub_error *err) {
        vhub_device_set_mtu(m->dev, (uint16_t)m->p.mtu.mtu, &m->cc->call);
        return 0;
}

const struct param cm_device_state_fd_params[] = {
        P_FD(state_fd.fd, "fd index: the VMM's end of the pipe the state moves through"),
        { 0 },
};

json_t *cm_result_state_fd(struct control_call *cc) {
        /* a back-end that offers its own transfer channel: the VMM must use it */
        if (cc->call.out.state_fd.fd >= 0) {
                if (control_call_reply_fds(cc, 1) < 0) {
                        cc->call.out.state_fd.fd = vhu_safe_close(cc->call.out.state_fd.fd);
                        return NULL;
                }
                cc->reply_fds[cc->n_reply_fds++] = VHU_TAKE_FD(cc->call.out.state_fd.fd);
                return json_pack("{s:i}", "fd", 0);
        }
        return json_object();
}

const struct param cm_state_fd_result = R_OBJECT(
        { .name = "fd", .kind = PARAM_FD,
          .description = "fd index in this response: the back-end's own transfer channel, to use instead" });

static int device_state_transfer(struct method_call *m, bool load) {
        m->cc->call.out.state_fd.fd = -1;
        vhub_device_state_fd(m->dev, load, VHU_TAKE_FD(m->p.state_fd.fd), &m->cc->call);
        return 0;
}

int cm_device_state_save(struct method_call *m, struct vhub_error *err) {
        return device_state_transfer(m, false);
}

int cm_device_state_load(struct method_call *m, struct vhub_error *err) {
        return device_state_transfer(m, true);
}

int cm_device_state_check(struct method_call *m, struct vhub_error *err) {
        vhub_device_check_state(m->dev, &m->cc->call);
        return 0;
}

const struct param cm_device_backend_reply_params[] = {
        { .name = "token", .kind = PARAM_U64, .required = true, .max = UINT64_MAX, .offset = AT(backend_reply.token),
          .description = "the token of the device.backend_request event" },
        { .name = "result", .kind = PARAM_U64, .required = true, .max = UINT64_MAX,
          .offset = AT(backend_reply.result), .description = "0 for success, else a positive errno" },
        { 0 },
};

int cm_device_backend_reply(struct method_call *m, struct vhub_error *err) {
        if (vhub_device_backend_reply(m->dev, m->p.backend_reply.token, m->p.backend_reply.result) < 0)
                return vhub_error_set(err, VHUB_ERR_PARAMS,
                                      "'token': %llu is not a back-end request waiting for an answer",
                                      (unsigned long long)m->p.backend_reply.token);
        return 0;
}
