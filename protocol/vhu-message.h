/* SPDX-License-Identifier: MIT */
/*
 * One vhost-user message with the fds that travel with it, the table that
 * says what every request may carry, and strict encode / decode / validate.
 *
 * Ownership: a message read from a socket owns the fds in fds[0..n_fds):
 * whoever keeps one takes it with vhu_msg_take_fd(), vhu_msg_clear() closes
 * the rest.  A message built from the caller's fds (vhu_msg_build*) only
 * borrows them (fds_borrowed): vhu_msg_clear() leaves them open and nothing
 * can be taken from it.  So every message is cleared the same way.
 * Functions return 0 (or a positive value) on success and -errno on failure;
 * they never log and never exit.
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vhost-user.h"

/* Which side sends a request: selects the table a request number indexes. */
enum vhu_direction {
        VHU_DIR_FRONTEND, /* front-end -> back-end requests (enum vhu_request) */
        VHU_DIR_BACKEND,  /* back-end -> front-end requests (enum vhu_backend_request) */
};

struct vhu_msg {
        struct vhu_header hdr;
        union {
                uint64_t u64;
                struct vhu_vring_state state;
                struct vhu_vring_addr addr;
                struct vhu_mem_table mem_table;
                struct vhu_mem_single mem_single;
                struct vhu_log log;
                struct vhu_iotlb iotlb;
                struct vhu_config config;
                struct vhu_vring_area area;
                struct vhu_inflight inflight;
                struct vhu_shared shared;
                struct vhu_device_state device_state;
                struct vhu_shmem_map shmem_map;
                struct vhu_shmem_config shmem_config;
                struct vhu_crypto_session crypto_session;
                uint8_t raw[VHU_MAX_PAYLOAD];
        } payload;
        int fds[VHU_MAX_FDS];
        unsigned n_fds;
        bool fds_borrowed;      /* built from fds someone else owns */
};

/* How the peer answers a request. */
enum vhu_reply_kind {
        /* No reply of its own; a u64 REPLY_ACK only if NEED_REPLY was set
         * and REPLY_ACK negotiated. */
        VHU_REPLY_ACK_ONLY,
        /* Always answered with its own payload (GET_FEATURES, ...);
         * NEED_REPLY changes nothing. */
        VHU_REPLY_ALWAYS,
        /* Answered with its own payload only when LOG_SHMFD is negotiated
         * (SET_LOG_BASE), else like VHU_REPLY_ACK_ONLY. */
        VHU_REPLY_IF_LOG_SHMFD,
};

/* What one request may carry, per the spec.  Sizes are payload bytes. */
struct vhu_request_info {
        uint32_t request;
        const char *name;            /* "GET_FEATURES", without the VHOST_USER_ prefix */
        uint32_t min_size, max_size; /* allowed request payload sizes */
        uint8_t min_fds, max_fds;    /* fds allowed with the request */
        enum vhu_reply_kind reply;
        uint32_t reply_min_size, reply_max_size; /* the reply's own payload */
        uint8_t reply_max_fds;       /* fds allowed with that reply */
        int protocol_feature;        /* the protocol feature it needs, or -1 */
};

/* NULL for a number the table does not know. */
const struct vhu_request_info *vhu_request_info(enum vhu_direction dir, uint32_t request);
/* "GET_FEATURES"; "UNKNOWN" for unknown numbers.  Never NULL. */
const char *vhu_request_name(enum vhu_direction dir, uint32_t request);
/* "REPLY_ACK"; NULL for bits the spec does not name. */
const char *vhu_protocol_feature_name(unsigned bit);
/*
 * The protocol features the spec allows bit only together with (e.g.
 * GET_VRING_BASE_SKIP_DRAIN needs GET_VRING_BASE_INFLIGHT and
 * INFLIGHT_SHMFD); 0 for none.  vhu_validate_request() requires them too.
 */
uint64_t vhu_protocol_feature_requires(unsigned bit);
/* pf without every bit whose prerequisites it lacks (transitively). */
uint64_t vhu_protocol_features_consistent(uint64_t pf);

/* Message lifetime. */
void vhu_msg_init(struct vhu_msg *m);                 /* zero, no fds */
void vhu_msg_clear(struct vhu_msg *m);                /* close owned fds, re-init */
/* Steal fds[idx] of an owning message; -1 if none (or borrowed). */
int vhu_msg_take_fd(struct vhu_msg *m, unsigned idx);
size_t vhu_msg_wire_size(const struct vhu_msg *m);    /* header + payload bytes */

/*
 * Build a request of direction dir: sets the header (version, plus
 * VHU_FLAG_NEED_REPLY if need_reply), copies size bytes of payload and the
 * fds.  The fds are borrowed, not dup'd (fds_borrowed): vhu_msg_clear()
 * leaves them to their owner.  Returns -EINVAL if the table forbids that
 * size or fd count, -EOPNOTSUPP for unknown requests.
 */
int vhu_msg_build(struct vhu_msg *m, enum vhu_direction dir, uint32_t request,
                  bool need_reply, const void *payload, uint32_t size,
                  const int *fds, unsigned n_fds);
void vhu_msg_forget_fds(struct vhu_msg *m);           /* drop fds without closing (owned or not) */
/* A message built from fds nobody else keeps takes them: vhu_msg_clear()
 * closes them (a reply that carries a new memfd, say). */
void vhu_msg_own_fds(struct vhu_msg *m);

/* Convenience builders (front-end direction), same rules as vhu_msg_build. */
int vhu_msg_build_u64(struct vhu_msg *m, uint32_t request, bool need_reply, uint64_t value);
int vhu_msg_build_none(struct vhu_msg *m, uint32_t request, bool need_reply);
int vhu_msg_build_state(struct vhu_msg *m, uint32_t request, bool need_reply,
                        uint32_t index, uint32_t num);
/* SET_VRING_KICK/CALL/ERR: fd < 0 sets the "no fd" bit. */
int vhu_msg_build_vring_fd(struct vhu_msg *m, uint32_t request, bool need_reply,
                           uint32_t index, int fd);
int vhu_msg_build_vring_addr(struct vhu_msg *m, bool need_reply, const struct vhu_vring_addr *addr);
int vhu_msg_build_mem_table(struct vhu_msg *m, bool need_reply,
                            const struct vhu_mem_region *regions, const int *fds, unsigned n);
/* ADD_MEM_REG (with its fd) or REM_MEM_REG (fd < 0: none sent). */
int vhu_msg_build_mem_single(struct vhu_msg *m, uint32_t request, bool need_reply,
                             const struct vhu_mem_region *region, int fd);
/* GET_CONFIG (data NULL: zeroes of size bytes) / SET_CONFIG. */
int vhu_msg_build_config(struct vhu_msg *m, uint32_t request, bool need_reply,
                         uint32_t offset, uint32_t size, uint32_t flags, const void *data);

/*
 * spec "Postcopy": the front-end's confirmation, after the back-end answered
 * a SET_MEM_TABLE in postcopy mode with its own mapping addresses, that it
 * can now serve faults in them -- a SET_MEM_TABLE carrying a u64 0 (not a
 * table).  With need_reply the back-end's REPLY_ACK to the table follows.
 */
int vhu_msg_build_postcopy_mem_ack(struct vhu_msg *m, bool need_reply);

/*
 * Whether the peer will answer a request just sent with these flags, given
 * the negotiated protocol features.
 */
bool vhu_request_expects_reply(enum vhu_direction dir, uint32_t request, uint32_t flags,
                               uint64_t protocol_features);

/*
 * Validate a reply against the request it answers.  The flags must be
 * exactly VERSION|REPLY, the request number must match, the size must fit
 * the reply kind (its own payload, or a u64 ack), and the fd count must be
 * allowed.  -EPROTO (with *ret_why set to a static sentence) on violation.
 */
int vhu_validate_reply(enum vhu_direction dir, uint32_t request, uint32_t request_flags,
                       uint64_t protocol_features, const struct vhu_msg *reply,
                       const char **ret_why);

/*
 * Validate an incoming request of direction dir (a front-end request as a
 * back-end sees it, or a back-end request as the front-end sees it): known
 * number, version 1, no REPLY flag, no unknown flag, size and fd count
 * allowed, request-specific rules (nregions vs size vs fds, vring fd vs
 * "no fd" bit, config size vs payload, fds only with BACKEND_SEND_FD for
 * back-end requests, ...).  -EPROTO with *ret_why on violation.
 */
int vhu_validate_request(enum vhu_direction dir, uint64_t protocol_features,
                         const struct vhu_msg *m, const char **ret_why);

/* Build a reply to request m into r: flags VERSION|REPLY, same request number. */
int vhu_msg_build_reply(struct vhu_msg *r, const struct vhu_msg *request,
                        const void *payload, uint32_t size, const int *fds, unsigned n_fds);
int vhu_msg_build_reply_u64(struct vhu_msg *r, const struct vhu_msg *request, uint64_t value);

/*
 * Decode bytes into a message: header + payload, checking the size bound.
 * Used by the socket reader and by fuzzers.  Returns the number of bytes
 * consumed, -EAGAIN if more are needed, -EPROTO on an oversized size.
 */
int vhu_msg_decode(struct vhu_msg *m, const void *buf, size_t len);
/* Encode header + payload into buf (must hold vhu_msg_wire_size bytes). */
size_t vhu_msg_encode(const struct vhu_msg *m, void *buf, size_t len);
