/* SPDX-License-Identifier: MIT */
/* The control fuzzer's in-loop vhost-user back-end (see fuzz-control-backend.h). */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "fuzz-control-backend.h"
#include "vhu-message.h"
#include "vhu-socket.h"

#define FB_MAX_CONNS 16
#define FB_QUEUES 2
#define FB_MEM_SLOTS 32
#define FB_SEND_TIMEOUT_MS 1000

/* What the daemon uses; each flavour offers a subset. */
#define FB_PF_ALL                                                                           \
        (VHU_PF_BIT(VHU_PF_MQ) | VHU_PF_BIT(VHU_PF_LOG_SHMFD) | VHU_PF_BIT(VHU_PF_RARP) |  \
         VHU_PF_BIT(VHU_PF_REPLY_ACK) | VHU_PF_BIT(VHU_PF_NET_MTU) |                        \
         VHU_PF_BIT(VHU_PF_BACKEND_REQ) | VHU_PF_BIT(VHU_PF_CONFIG) |                       \
         VHU_PF_BIT(VHU_PF_BACKEND_SEND_FD) | VHU_PF_BIT(VHU_PF_INFLIGHT_SHMFD) |           \
         VHU_PF_BIT(VHU_PF_RESET_DEVICE) | VHU_PF_BIT(VHU_PF_INBAND_NOTIFICATIONS) |        \
         VHU_PF_BIT(VHU_PF_CONFIGURE_MEM_SLOTS) | VHU_PF_BIT(VHU_PF_STATUS) |               \
         VHU_PF_BIT(VHU_PF_SHARED_OBJECT) | VHU_PF_BIT(VHU_PF_DEVICE_STATE))

struct fb_conn {
        int fd;                 /* -1: slot free */
        int channel_fd;         /* the back-end channel the daemon handed over */
        uint64_t features, offered_pf, pf;
        uint8_t status;
        struct vhu_reader reader;
};

struct fuzz_backend {
        int listen_fd;
        int newest;             /* the slot accepted last, -1: none */
        enum fuzz_backend_flavour flavour;
        struct fb_conn conns[FB_MAX_CONNS];
};

static uint64_t flavour_features(enum fuzz_backend_flavour f) {
        uint64_t v = (UINT64_C(1) << VHU_VIRTIO_F_VERSION_1) |
                     (UINT64_C(1) << VHU_VIRTIO_F_LOG_ALL) |
                     (UINT64_C(1) << VHU_VIRTIO_F_EVENT_IDX) |
                     (UINT64_C(1) << VHU_VIRTIO_F_INDIRECT_DESC) | 0x46;

        return f == FUZZ_BACKEND_LEGACY ? v : v | (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES);
}

static uint64_t flavour_pf(enum fuzz_backend_flavour f) {
        switch (f) {
        case FUZZ_BACKEND_FULL:
                return FB_PF_ALL;
        case FUZZ_BACKEND_NO_REPLY_ACK:
                return FB_PF_ALL & ~VHU_PF_BIT(VHU_PF_REPLY_ACK);
        case FUZZ_BACKEND_MEM_TABLE:
                return FB_PF_ALL & ~(VHU_PF_BIT(VHU_PF_REPLY_ACK) |
                                     VHU_PF_BIT(VHU_PF_CONFIGURE_MEM_SLOTS));
        default:
                return 0;
        }
}

int fuzz_backend_new(const char *path, struct fuzz_backend **ret) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct fuzz_backend *b;

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        b = calloc(1, sizeof(*b));
        if (!b)
                return -ENOMEM;
        for (unsigned i = 0; i < FB_MAX_CONNS; i++)
                b->conns[i].fd = b->conns[i].channel_fd = -1;
        b->newest = -1;
        memcpy(sa.sun_path, path, strlen(path));
        b->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (b->listen_fd < 0 || bind(b->listen_fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 ||
            listen(b->listen_fd, FB_MAX_CONNS) < 0) {
                int r = -errno;

                fuzz_backend_free(b);
                return r;
        }
        *ret = b;
        return 0;
}

static void conn_close(struct fb_conn *c) {
        vhu_reader_reset(&c->reader);
        close(c->fd);
        if (c->channel_fd >= 0)
                close(c->channel_fd);
        c->fd = c->channel_fd = -1;
}

struct fuzz_backend *fuzz_backend_free(struct fuzz_backend *b) {
        if (!b)
                return NULL;
        for (unsigned i = 0; i < FB_MAX_CONNS; i++)
                if (b->conns[i].fd >= 0)
                        conn_close(&b->conns[i]);
        if (b->listen_fd >= 0)
                close(b->listen_fd);
        free(b);
        return NULL;
}

void fuzz_backend_set_flavour(struct fuzz_backend *b, enum fuzz_backend_flavour f) {
        b->flavour = f;
}

unsigned fuzz_backend_connections(const struct fuzz_backend *b) {
        unsigned n = 0;

        for (unsigned i = 0; i < FB_MAX_CONNS; i++)
                n += b->conns[i].fd >= 0;
        return n;
}

/* A split-ring inflight region of the size the spec gives, as a memfd. */
static int inflight_reply(const struct vhu_msg *m, struct vhu_msg *r) {
        struct vhu_inflight in = m->payload.inflight;
        int fd, ret;

        in.mmap_size = (uint64_t) in.num_queues *
                       (sizeof(struct vhu_inflight_queue_split) +
                        (uint64_t) in.queue_size * sizeof(struct vhu_inflight_desc_split));
        in.mmap_size = (in.mmap_size + 4095) & ~(uint64_t) 4095;
        in.mmap_offset = 0;
        fd = memfd_create("fuzz-inflight", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t) in.mmap_size) < 0)
                abort();
        ret = vhu_msg_build_reply(r, m, &in, sizeof(in), &fd, 1);
        if (ret < 0)
                close(fd);
        else
                vhu_msg_own_fds(r); /* closed with the reply */
        return ret;
}

/* A device state transfer: the back-end writes a few bytes (save) or reads
 * to EOF (load, bounded), then closes its end. */
static void state_transfer(struct vhu_msg *m) {
        int fd = vhu_msg_take_fd(m, 0);
        char buf[256];

        if (fd < 0)
                return;
        if (m->payload.device_state.direction == VHU_TRANSFER_SAVE)
                (void) !write(fd, "fuzz-state", 10);
        else
                (void) !read(fd, buf, sizeof(buf));
        close(fd);
}

static int build_answer(struct fb_conn *c, struct vhu_msg *m, struct vhu_msg *r) {
        const struct vhu_request_info *info = vhu_request_info(VHU_DIR_FRONTEND, m->hdr.request);
        static const uint8_t zero[VHU_MAX_PAYLOAD];
        struct vhu_config config;
        bool own = info->reply == VHU_REPLY_ALWAYS ||
                   (info->reply == VHU_REPLY_IF_LOG_SHMFD && (c->pf & VHU_PF_BIT(VHU_PF_LOG_SHMFD)));

        if (!own)
                return vhu_msg_build_reply_u64(r, m, 0);
        switch (m->hdr.request) {
        case VHU_REQ_GET_FEATURES:
                return vhu_msg_build_reply_u64(r, m, c->features);
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                return vhu_msg_build_reply_u64(r, m, c->offered_pf);
        case VHU_REQ_GET_QUEUE_NUM:
                return vhu_msg_build_reply_u64(r, m, FB_QUEUES);
        case VHU_REQ_GET_MAX_MEM_SLOTS:
                return vhu_msg_build_reply_u64(r, m, FB_MEM_SLOTS);
        case VHU_REQ_GET_STATUS:
                return vhu_msg_build_reply_u64(r, m, c->status);
        case VHU_REQ_GET_VRING_BASE:
                return vhu_msg_build_reply(r, m, &(struct vhu_vring_state) {
                                                   .index = m->payload.state.index },
                                           sizeof(struct vhu_vring_state), NULL, 0);
        case VHU_REQ_GET_CONFIG:
                config = m->payload.config;
                memset(config.data, 0x5a, config.size);
                return vhu_msg_build_reply(r, m, &config, m->hdr.size, NULL, 0);
        case VHU_REQ_GET_INFLIGHT_FD:
                return inflight_reply(m, r);
        default:
                return vhu_msg_build_reply(r, m, zero, info->reply_min_size, NULL, 0);
        }
}

/* One request from the daemon; false drops the connection. */
static bool handle(struct fb_conn *c, struct vhu_msg *m) {
        struct vhu_msg reply;
        const char *why = NULL;
        bool ok;

        /* the daemon must only send what the spec allows */
        if (vhu_validate_request(VHU_DIR_FRONTEND, c->pf, m, &why) < 0)
                abort();
        switch (m->hdr.request) {
        case VHU_REQ_SET_PROTOCOL_FEATURES:
                if (m->payload.u64 & ~c->offered_pf)
                        abort();
                c->pf = m->payload.u64;
                break;
        case VHU_REQ_SET_BACKEND_REQ_FD:
                if (c->channel_fd >= 0)
                        close(c->channel_fd);
                c->channel_fd = vhu_msg_take_fd(m, 0);
                break;
        case VHU_REQ_SET_STATUS:
                c->status = (uint8_t) m->payload.u64;
                break;
        case VHU_REQ_SET_DEVICE_STATE_FD:
                state_transfer(m);
                break;
        default:
                break;
        }
        if (!vhu_request_expects_reply(VHU_DIR_FRONTEND, m->hdr.request, m->hdr.flags, c->pf))
                return true;

        vhu_msg_init(&reply);
        if (m->hdr.request == VHU_REQ_SET_DEVICE_STATE_FD) {
                if (vhu_msg_build_reply_u64(&reply, m, VHU_DEVICE_STATE_NOFD_MASK) < 0)
                        abort();
        } else if (build_answer(c, m, &reply) < 0) {
                abort();
        }
        ok = vhu_send_msg_blocking(c->fd, &reply, FB_SEND_TIMEOUT_MS) >= 0;
        vhu_msg_clear(&reply);
        return ok;
}

/* Take fd (a new connection to the daemon) into a free slot. */
static void conn_open(struct fuzz_backend *b, unsigned i, int fd) {
        struct fb_conn *c = &b->conns[i];

        b->newest = (int) i;
        c->fd = fd;
        c->channel_fd = -1;
        c->features = flavour_features(b->flavour);
        c->offered_pf = flavour_pf(b->flavour);
        c->pf = 0;
        c->status = 0;
        vhu_reader_init(&c->reader);
}

static int free_slot(const struct fuzz_backend *b) {
        for (unsigned i = 0; i < FB_MAX_CONNS; i++)
                if (b->conns[i].fd < 0)
                        return (int) i;
        return -1;
}

static void accept_new(struct fuzz_backend *b) {
        int i, fd;

        while ((i = free_slot(b)) >= 0) {
                fd = accept4(b->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (fd < 0)
                        return;
                conn_open(b, (unsigned) i, fd);
        }
}

void fuzz_backend_connect(struct fuzz_backend *b, const char *path) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        int i = free_slot(b), fd;

        if (i < 0 || strlen(path) >= sizeof(sa.sun_path))
                return;
        memcpy(sa.sun_path, path, strlen(path));
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return;
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                close(fd);
                return;
        }
        conn_open(b, (unsigned) i, fd);
}

void fuzz_backend_inject(struct fuzz_backend *b, bool channel, const void *bytes, size_t len) {
        struct fb_conn *c;
        int fd;

        if (b->newest < 0)
                return;
        c = &b->conns[b->newest];
        fd = channel ? c->channel_fd : c->fd;
        if (fd >= 0)
                (void) send(fd, bytes, len, MSG_NOSIGNAL | MSG_DONTWAIT);
}

void fuzz_backend_pump(struct fuzz_backend *b) {
        accept_new(b);
        for (unsigned i = 0; i < FB_MAX_CONNS; i++) {
                struct fb_conn *c = &b->conns[i];

                while (c->fd >= 0) {
                        struct vhu_msg m;
                        bool ok;
                        int r;

                        vhu_msg_init(&m);
                        r = vhu_reader_read(&c->reader, c->fd, &m);
                        if (r == -EAGAIN)
                                break;
                        if (r != 1) {
                                /* the daemon closed its end (a protocol error would be its bug) */
                                if (r == -EPROTO)
                                        abort();
                                conn_close(c);
                                break;
                        }
                        ok = handle(c, &m);
                        vhu_msg_clear(&m);
                        if (!ok)
                                conn_close(c);
                }
        }
}
