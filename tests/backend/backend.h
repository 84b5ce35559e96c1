/* SPDX-License-Identifier: MIT */
/*
 * vhub-test-backend: the project's scriptable vhost-user back-end for tests.
 *
 * One process serves several vhost-user sockets (struct tb_sock); each has at
 * most one front-end connection at a time (struct tb_conn) whose protocol
 * state is dropped when the front-end goes away.  A virtio-blk device sits
 * behind every connection; all sockets share one disk.  A JSON control
 * socket (backend-control.c) scripts misbehaviour, shared objects and
 * back-end channel requests.  Everything runs in one poll() loop (main.c).
 */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "vhost-user.h"
#include "vhu-message.h"
#include "vhu-socket.h"

/* Limits: every user-controllable resource has one. */
#define TB_MAX_SOCKETS          64
#define TB_MAX_QUEUES           64
#define TB_MAX_QUEUE_SIZE       32768u
#define TB_MAX_MEM_SLOTS        509u
#define TB_MAX_MISBEHAVE        32
#define TB_MAX_SHARED           64
#define TB_MAX_SHARED_SIZE      (64u << 20)
#define TB_MAX_CONTROL_CLIENTS  8
#define TB_MAX_CONTROL_LINE     (64u << 10)
#define TB_MAX_CHAN_PENDING     64
#define TB_MAX_REQ_DATA         (32u << 20)     /* bytes of data in one blk request */
#define TB_MAX_WRITER_BYTES     (16u << 20)     /* queued bytes per socket before we give up */
#define TB_MAX_STATE_BLOB       4096u
#define TB_CONFIG_SIZE          60u
#define TB_INFLIGHT_QUEUE_HDR   16u

/* virtio-blk, virtio spec "Block Device". */
#define TB_VIRTIO_BLK_F_FLUSH   9
#define TB_VIRTIO_BLK_F_MQ      12
#define TB_VIRTIO_BLK_T_IN      0u
#define TB_VIRTIO_BLK_T_OUT     1u
#define TB_VIRTIO_BLK_T_FLUSH   4u
#define TB_VIRTIO_BLK_T_GET_ID  8u
#define TB_VIRTIO_BLK_S_OK      0u
#define TB_VIRTIO_BLK_S_IOERR   1u
#define TB_VIRTIO_BLK_S_UNSUPP  2u
#define TB_VIRTIO_BLK_ID_BYTES  20u
#define TB_SECTOR_SIZE          512u

/* How GET_VRING_BASE stops a ring (spec GET_VRING_BASE, GET_VRING_BASE_SKIP_DRAIN). */
enum tb_stop {
        TB_STOP_DRAIN,          /* complete everything in flight first */
        TB_STOP_SUSPEND_UNREADY,/* GET_VRING_BASE_INFLIGHT: complete what is ready, suspend the rest */
        TB_STOP_SUSPEND_ALL,    /* GET_VRING_BASE_SKIP_DRAIN: suspend everything at once */
};

enum tb_order {
        TB_ORDER_FIFO,
        TB_ORDER_REVERSE,
        TB_ORDER_RANDOM,
        _TB_ORDER_MAX,
};

/* Misbehaviour, applied to one request name on one socket (backend-misbehave.c). */
enum tb_action {
        TB_ACT_REFUSE,          /* nonzero REPLY_ACK, or a refusing reply */
        TB_ACT_BAD_FLAGS,       /* reply with flags other than VERSION|REPLY */
        TB_ACT_WRONG_REQUEST,   /* reply carrying another request number */
        TB_ACT_OVERSIZED,       /* reply header's size beyond VHU_MAX_PAYLOAD */
        TB_ACT_EXTRA_FDS,       /* reply with fds it must not carry */
        TB_ACT_SILENCE,         /* process, never answer */
        TB_ACT_CLOSE,           /* close the connection instead of processing */
        TB_ACT_HANG,            /* stop reading the socket until "resume" */
        TB_ACT_DELAY,           /* process now, answer after arg ms */
        TB_ACT_IGNORE_FD,       /* SET_VRING_KICK/CALL/ERR: keep the fd, never use it */
        _TB_ACT_MAX,
};

struct tb_rule {
        uint32_t request;
        enum tb_action action;
        int64_t count;          /* times left; < 0: forever */
        uint64_t arg;           /* delay ms, refusal value, flags, request number */
        bool has_arg;
};

struct tb_options {
        char **socket_paths;    /* listen */
        unsigned n_socket_paths;
        char **connect_paths;   /* connect (front-end listens) */
        unsigned n_connect_paths;
        char *control_path;
        char *disk_path;
        uint64_t disk_size;
        uint64_t features;
        uint64_t protocol_features;
        unsigned queues;
        unsigned mem_slots;
        enum tb_order order;
        unsigned delay_ms;
        uint64_t seed;
        unsigned fail_handshake;
        unsigned reconnect_ms;
        int verbose;
        uint64_t shmem_sizes[VHU_MAX_SHMEM_REGIONS];  /* GET_SHMEM_CONFIG, by shmid */
        unsigned n_shmem;
};

struct tb_region {
        uint64_t gpa, size, uaddr, mmap_offset;
        void *map;              /* mmap() result */
        size_t map_len;
        uint8_t *host;          /* map + mmap_offset: guest address gpa */
};

struct tb_mem {
        struct tb_region *regions;
        unsigned n, max;
        uint64_t generation;    /* bumped on every change: rings re-translate */

        /* Dirty log (SET_LOG_BASE with LOG_SHMFD). */
        void *log_map;
        size_t log_map_len;
        uint8_t *log;
        uint64_t log_size;
        bool logging;           /* VHOST_F_LOG_ALL acked: mark dirty pages */
};

/* A guest-physical scatter-gather element of a descriptor chain. */
struct tb_seg {
        uint64_t gpa;
        uint32_t len;
};

/* One request fetched from a ring, indexed by its head descriptor. */
struct tb_req {
        bool busy;
        uint64_t counter;       /* inflight order */
        uint64_t ready_ms;      /* completion time */
        struct tb_seg *segs;    /* readable segments first, then writable */
        unsigned n_segs, n_readable;
};

struct tb_vq {
        unsigned index;
        uint32_t num;           /* 0 until SET_VRING_NUM */
        struct vhu_vring_addr addr;
        bool addr_set;
        uint16_t last_avail;    /* next avail index to fetch */
        uint16_t used_idx;      /* our copy of used->idx */
        uint32_t set_base;      /* the last SET_VRING_BASE as sent (a packed ring's: both wrap counters) */
        int kick_fd, call_fd, err_fd;
        int ignored_fd;         /* misbehaviour "ignore-fd": held open, never read or written */
        bool kick_ignored;      /* ... and it was the kick fd: the ring is polled instead */
        bool enabled, started, polling;
        bool endian_set, big_endian;    /* SET_VRING_ENDIAN (legacy devices) */
        bool activated;         /* rings translated, inflight resubmitted */
        char broken[128];       /* non-empty: stopped because of a front-end error */

        /* Host pointers into guest memory, valid while mem_generation matches. */
        uint64_t mem_generation;
        volatile uint8_t *desc, *avail, *used;

        struct vhu_inflight_queue_split *inflight;  /* into the inflight area, or NULL */

        struct tb_req *reqs;    /* num entries */
        uint16_t *pending;      /* heads in flight, fetch order */
        unsigned n_pending;

        uint64_t fetched, completed, resubmitted, calls;
        uint64_t suspended;     /* left in the inflight region by stops */
};

enum tb_chan_kind {
        TB_CHAN_PLAIN,          /* report the u64 reply */
        TB_CHAN_LOOKUP,         /* SHARED_OBJECT_LOOKUP: report the fd */
};

/* A back-end request waiting for the front-end's reply. */
struct tb_chan_pending {
        uint32_t request;
        uint32_t flags;
        enum tb_chan_kind kind;
        uint64_t deadline_ms;
        int client;             /* control client slot, -1: nobody waits */
        uint64_t client_gen;
        /* lookup: what to do with the fd */
        size_t read_len;
        uint8_t *write_data;
        size_t write_len;
        uint64_t write_offset;
        char uuid[37];
};

enum tb_state_xfer {
        TB_XFER_NONE,
        TB_XFER_SAVE,           /* we write the blob to the fd */
        TB_XFER_LOAD,           /* we read it until EOF */
};

struct tb_sock;

struct tb_conn {
        struct tb_sock *sock;
        int fd;
        struct vhu_reader reader;
        struct vhu_writer writer;

        uint64_t features;              /* acked by SET_FEATURES */
        uint64_t protocol_features;     /* acked by SET_PROTOCOL_FEATURES */
        bool features_set;
        uint64_t status;
        bool handshake_failed_once;     /* --fail-handshake fired on this conn */

        struct tb_mem mem;
        struct tb_vq vqs[TB_MAX_QUEUES];
        uint64_t inflight_counter;

        /* Inflight area (GET/SET_INFLIGHT_FD). */
        void *inflight_map;
        size_t inflight_map_len;
        uint8_t *inflight_base;
        uint64_t inflight_size;
        uint16_t inflight_queues, inflight_queue_size;

        /* Back-end channel (SET_BACKEND_REQ_FD). */
        int chan_fd;
        struct vhu_reader chan_reader;
        struct vhu_writer chan_writer;
        struct tb_chan_pending chan_pending[TB_MAX_CHAN_PENDING];
        unsigned chan_n_pending;
        uint64_t chan_sent, chan_replies, chan_unexpected;

        /* Device state transfer (SET_DEVICE_STATE_FD). */
        enum tb_state_xfer xfer;
        int xfer_fd;
        uint8_t xfer_buf[TB_MAX_STATE_BLOB];
        size_t xfer_len, xfer_done;
        int xfer_result;                /* 0 ok, -errno */
        bool xfer_finished;

        /* Misbehaviour in progress. */
        bool hung;
        struct vhu_msg *held;           /* the request that hung the socket */
        struct vhu_msg *delayed;        /* a reply to send at paused_until */
        uint64_t paused_until;          /* "delay": no reading before this */

        bool dead;                      /* close at the end of this loop turn */
};

struct tb_shared {
        uint8_t uuid[16];
        int fd;
        uint64_t size;
        uint64_t lookups;               /* GET_SHARED_OBJECT answered */
};

struct tb_sock {
        unsigned index;
        char *path;
        bool connect_mode;
        int listen_fd;                  /* listen mode */
        uint64_t next_connect_ms;
        struct tb_conn *conn;

        uint64_t connections;
        unsigned fail_handshake_left;
        uint64_t requests[_VHU_REQ_MAX];
        uint64_t unknown_requests, protocol_errors;
        /* every connection's: replies sent, requests sent on the back-end
         * channel (a front-end's counters can be checked against these) */
        uint64_t replies, backend_requests;
        uint64_t fetched, completed;
        char last_error[160];

        struct tb_rule rules[TB_MAX_MISBEHAVE];
        unsigned n_rules;

        struct tb_shared shared[TB_MAX_SHARED];
        unsigned n_shared;
};

struct tb_control;

struct tb {
        struct tb_options opt;
        struct tb_sock *socks;
        unsigned n_socks;
        int disk_fd;
        uint64_t disk_size;             /* bytes, multiple of 512 */
        bool disk_is_file;
        uint8_t config[TB_CONFIG_SIZE];
        uint64_t rng;
        struct tb_control *control;
        bool quit;
};

extern struct tb tb;

/* main.c */
uint64_t tb_now_ms(void);
uint64_t tb_random(void);
void tb_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define tb_info(...)  tb_log(1, __VA_ARGS__)
#define tb_debug(...) tb_log(2, __VA_ARGS__)
#define tb_warn(...)  tb_log(0, __VA_ARGS__)
const char *tb_order_name(enum tb_order o);
int tb_order_from_name(const char *s);
int tb_memfd_new(const char *name, uint64_t size);
/* A non-blocking listening socket at path (a stale socket there is
 * replaced): the fd, or -errno. */
int tb_listen_unix(const char *path, int backlog);
uint64_t tb_sigbus_count(void);         /* SIGBUS faults survived */

/* backend-conn.c */
struct tb_conn *tb_conn_new(struct tb_sock *s, int fd);
struct tb_conn *tb_conn_free(struct tb_conn *c);
void tb_conn_on_readable(struct tb_conn *c);
void tb_conn_flush(struct tb_conn *c);
void tb_conn_on_timer(struct tb_conn *c, uint64_t now);
uint64_t tb_conn_next_deadline(const struct tb_conn *c);
void tb_conn_resume(struct tb_conn *c);
void tb_conn_fail(struct tb_conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
bool tb_conn_has_pf(const struct tb_conn *c, unsigned bit);
void tb_conn_xfer_io(struct tb_conn *c);

/* backend-mem.c */
void tb_mem_init(struct tb_mem *m, unsigned max);
void tb_mem_clear(struct tb_mem *m);            /* regions and log */
void tb_mem_clear_regions(struct tb_mem *m);
int tb_mem_add(struct tb_mem *m, const struct vhu_mem_region *r, int fd, const char **ret_why);
int tb_mem_remove(struct tb_mem *m, const struct vhu_mem_region *r);
/* Host pointer for [uaddr, uaddr+len) inside one region, or NULL. */
void *tb_mem_uaddr(const struct tb_mem *m, uint64_t uaddr, uint64_t len);
/* Copy between guest-physical memory and a buffer; -EFAULT if not mapped. */
bool tb_mem_mapped(const struct tb_mem *m, uint64_t gpa, uint64_t len);
int tb_mem_read(const struct tb_mem *m, uint64_t gpa, void *dst, size_t len);
int tb_mem_write(struct tb_mem *m, uint64_t gpa, const void *src, size_t len);
int tb_mem_set_log(struct tb_mem *m, int fd, uint64_t size, uint64_t offset);
void tb_mem_log_dirty(struct tb_mem *m, uint64_t gpa, uint64_t len);

/* backend-blk.c */
void tb_blk_config_init(void);
void tb_vq_init(struct tb_vq *vq, unsigned index);
void tb_vq_reset(struct tb_vq *vq);
int tb_vq_set_num(struct tb_vq *vq, uint32_t num);   /* power of 2, while stopped */     /* drops requests, closes fds: back to initial */
int tb_vq_start(struct tb_conn *c, struct tb_vq *vq);
/* Stop: complete or suspend what is in flight, return the next avail index. */
uint16_t tb_vq_stop(struct tb_conn *c, struct tb_vq *vq, enum tb_stop how);
void tb_vq_kick(struct tb_conn *c, struct tb_vq *vq);
void tb_vq_on_timer(struct tb_conn *c, struct tb_vq *vq, uint64_t now);
uint64_t tb_vq_next_deadline(const struct tb_vq *vq);
bool tb_vq_runnable(const struct tb_conn *c, const struct tb_vq *vq);
int tb_inflight_create(struct tb_conn *c, const struct vhu_inflight *req, struct vhu_inflight *ret, int *ret_fd);
int tb_inflight_set(struct tb_conn *c, const struct vhu_inflight *in, int fd, const char **ret_why);
void tb_inflight_clear(struct tb_conn *c);
/* Device state blob for SET_DEVICE_STATE_FD. */
size_t tb_state_save(const struct tb_conn *c, uint8_t *buf, size_t len);
int tb_state_load(struct tb_conn *c, const uint8_t *buf, size_t len);

/* backend-chan.c: the back-end channel */
void tb_chan_set(struct tb_conn *c, int fd);
void tb_chan_close(struct tb_conn *c);
void tb_chan_on_readable(struct tb_conn *c);
void tb_chan_flush(struct tb_conn *c);
void tb_chan_on_timer(struct tb_conn *c, uint64_t now);
uint64_t tb_chan_next_deadline(const struct tb_conn *c);
/* Send a back-end request; when it expects a reply and client >= 0, that
 * control client gets the answer later.  Returns 1 if a reply is awaited, 0
 * if done, -errno. */
int tb_chan_send(struct tb_conn *c, uint32_t request, bool need_reply, const void *payload,
                 uint32_t size, const int *fds, unsigned n_fds,
                 const struct tb_chan_pending *how);
int tb_chan_flood(struct tb_conn *c, bool garbage, unsigned count, uint64_t *ret_bytes);

/* backend-shared.c */
struct tb_shared *tb_shared_find(struct tb_sock *s, const uint8_t uuid[16]);
int tb_shared_export(struct tb_sock *s, const uint8_t uuid[16], uint64_t size,
                     const uint8_t *fill, size_t fill_len, struct tb_shared **ret);
int tb_shared_remove(struct tb_sock *s, const uint8_t uuid[16]);
void tb_shared_clear(struct tb_sock *s);

/* backend-misbehave.c */
const char *tb_action_name(enum tb_action a);
int tb_action_from_name(const char *s);
int tb_rule_add(struct tb_sock *s, const struct tb_rule *r);
void tb_rules_clear(struct tb_sock *s, uint32_t request);  /* request 0: all */
/* Consume one use of the first rule for request; false if none. */
bool tb_rule_take(struct tb_sock *s, uint32_t request, struct tb_rule *ret);
int tb_request_from_name(enum vhu_direction dir, const char *name, uint32_t *ret);

/* backend-control.c */
int tb_control_open(const char *path);
void tb_control_close(void);
struct pollfd;
/* Append the control fds to the poll set; ctx[i] gets tags for dispatch. */
size_t tb_control_pollfds(struct pollfd *p, size_t max);
void tb_control_dispatch(const struct pollfd *p, size_t n);
/* Deliver a deferred answer (a JSON object, stolen) to a waiting client. */
struct json_t;
void tb_control_answer(int client, uint64_t gen, struct json_t *answer);
/* {"ok":false,"error":"..."}: the answer to a command that failed. */
struct json_t *tb_error_answer(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* main.c: socket lifecycle */
void tb_sock_drop_conn(struct tb_sock *s, const char *why);
