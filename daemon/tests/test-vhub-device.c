/* SPDX-License-Identifier: MIT */
/*
 * The device engine in one process: a context, VMs and devices whose
 * back-ends are fakes on the same libevent loop, built from protocol/'s
 * reader (every request the daemon sends must validate) and its reply
 * builders.  Driven through the model's own calls, as a face would:
 *
 *   lifecycle   handshake (with REPLY_ACK, and without protocol features:
 *               GET_FEATURES barriers), memory, start (a kick per ring),
 *               stop (the bases the back-end gave), config, remove
 *   loss        the back-end closes: device.disconnected, the reconnect,
 *               the restore rebased on the used index in guest memory,
 *               device.reconnected with each ring's outstanding count
 *   timeout     a request left unanswered: -32007, then a restore
 *   violation   a reply with the wrong flags: -32006, then a restore
 *   parked      handshakes parked behind a memory change resume when it
 *               commits; one fails on resume and frees its device while
 *               the next one is resumed (a use-after-free once)
 *
 * Lifecycle events (vm.created, device.added/started/stopped/removed,
 * vm.destroyed), and device.stats' counts against what the fake back-ends
 * received and answered.  Every event goes to two sinks, which must see
 * the same, timestamps included (the model stamps an event once).  At the end the
 * process holds the fds it held at the start.
 *
 *   test-vhub-device
 */
#include <errno.h>
#include <event2/event.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vhub-check.h"
#include "vhub-config.h"
#include "vhub-context.h"
#include "vhub-cred.h"
#include "vhub-device-internal.h"
#include "vhub-log.h"
#include "vhub-owner.h"
#include "vhub-vm.h"
#include "vhu-socket.h"

#define TIMEOUT_MS 1500          /* --backend-timeout-ms: valgrind must fit in it */
#define MEM_SIZE (1u << 20)
#define UADDR 0x7f0000000000ull
#define RING_SIZE 8
#define MAX_EVENTS 64

static const uint64_t FEATURES = (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES) |
                                 (UINT64_C(1) << VHU_VIRTIO_F_VERSION_1);
static const uint64_t PF = VHU_PF_BIT(VHU_PF_REPLY_ACK) | VHU_PF_BIT(VHU_PF_MQ) | VHU_PF_BIT(VHU_PF_CONFIG) |
                           VHU_PF_BIT(VHU_PF_CONFIGURE_MEM_SLOTS);

/* ---- a fake back-end ---- */

struct fake {
        struct event_base *base;
        char path[PATH_MAX];
        int listen_fd, fd;
        struct event *ev_accept, *ev_read;
        struct vhu_reader reader;
        uint64_t features, pf_offer;    /* what it offers */
        uint64_t pf;                    /* negotiated on this connection */
        unsigned max_mem_slots;
        unsigned connections;
        unsigned counts[_VHU_REQ_MAX];  /* requests received, all connections */
        unsigned replies;               /* replies sent, all connections */
        uint32_t vring_base[2];         /* the last SET_VRING_BASE per ring */
        uint32_t stop_base;             /* what GET_VRING_BASE answers */
        uint32_t ignore;                /* a request left unanswered, once */
        uint32_t violate;               /* a request answered with bad flags, once */
        bool hold_mem;                  /* ADD_MEM_REG acks wait for fake_release() */
        struct vhu_msg held[4];
        unsigned n_held;
};

static void fake_send(struct fake *f, struct vhu_msg *r) {
        CHECK_EQ(vhu_send_msg_blocking(f->fd, r, 1000), 0);
        f->replies++;
}

static unsigned fake_requests(const struct fake *f) {
        unsigned n = 0;

        for (unsigned i = 0; i < _VHU_REQ_MAX; i++)
                n += f->counts[i];
        return n;
}

/* The device counted what its back-end saw (device.stats), once both are idle. */
static void check_counted(const struct vhub_device *d, const struct fake *f) {
        CHECK_EQ(d->stats.requests, fake_requests(f));
        CHECK_EQ(d->stats.replies, f->replies);
}

static void fake_reply(struct fake *f, const struct vhu_msg *m) {
        uint32_t req = m->hdr.request;
        struct vhu_msg r;

        if (!vhu_request_expects_reply(VHU_DIR_FRONTEND, req, m->hdr.flags, f->pf))
                return;
        switch (req) {
        case VHU_REQ_GET_FEATURES:
                vhu_msg_build_reply_u64(&r, m, f->features);
                break;
        case VHU_REQ_GET_PROTOCOL_FEATURES:
                vhu_msg_build_reply_u64(&r, m, f->pf_offer);
                break;
        case VHU_REQ_GET_QUEUE_NUM:
                vhu_msg_build_reply_u64(&r, m, 2);
                break;
        case VHU_REQ_GET_MAX_MEM_SLOTS:
                vhu_msg_build_reply_u64(&r, m, f->max_mem_slots);
                break;
        case VHU_REQ_GET_VRING_BASE:
                vhu_msg_build_reply(&r, m, &(struct vhu_vring_state){ .index = m->payload.state.index,
                                                                      .num = f->stop_base },
                                    sizeof(struct vhu_vring_state), NULL, 0);
                break;
        case VHU_REQ_GET_CONFIG: {
                struct vhu_config c = m->payload.config;

                memset(c.data, 0xab, c.size);
                vhu_msg_build_reply(&r, m, &c, VHU_CONFIG_HEADER_SIZE + c.size, NULL, 0);
                break;
        }
        default:
                vhu_msg_build_reply_u64(&r, m, 0);
                break;
        }
        if (req == f->violate) {
                f->violate = 0;
                r.hdr.flags |= VHU_FLAG_NEED_REPLY; /* a reply is exactly VERSION|REPLY */
        }
        fake_send(f, &r);
}

static void fake_handle(struct fake *f, struct vhu_msg *m) {
        uint32_t req = m->hdr.request;
        const char *why = NULL;

        /* the daemon only ever sends what the protocol allows */
        if (vhu_validate_request(VHU_DIR_FRONTEND, f->pf, m, &why) < 0) {
                fprintf(stderr, "invalid %s from the daemon: %s\n", vhu_request_name(VHU_DIR_FRONTEND, req), why);
                abort();
        }
        f->counts[req]++;
        if (req == VHU_REQ_SET_PROTOCOL_FEATURES)
                f->pf = m->payload.u64;
        if (req == VHU_REQ_SET_VRING_BASE && m->payload.state.index < 2)
                f->vring_base[m->payload.state.index] = m->payload.state.num;
        if (req == f->ignore) {
                f->ignore = 0;
                return;
        }
        if (req == VHU_REQ_ADD_MEM_REG && f->hold_mem) {
                CHECK(f->n_held < 4);
                vhu_msg_init(&f->held[f->n_held]);
                f->held[f->n_held++].hdr = m->hdr;
                return;
        }
        fake_reply(f, m);
}

/* Close the daemon's connection (it has one: fd and ev_read go together). */
static void fake_drop(struct fake *f) {
        if (f->fd < 0)
                return;
        event_free(f->ev_read);
        close(f->fd);
        f->ev_read = NULL;
        f->fd = -1;
        vhu_reader_reset(&f->reader);
        f->n_held = 0;
}

static void fake_read_cb(evutil_socket_t fd, short what, void *userdata) {
        struct fake *f = userdata;
        struct vhu_msg m;
        int r;

        vhu_msg_init(&m);
        while (f->fd >= 0 && (r = vhu_reader_read(&f->reader, f->fd, &m)) == 1) {
                fake_handle(f, &m);
                vhu_msg_clear(&m);
        }
        if (f->fd >= 0 && r != -EAGAIN)
                fake_drop(f); /* the daemon closed */
}

static void fake_accept_cb(evutil_socket_t lfd, short what, void *userdata) {
        struct fake *f = userdata;
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

        if (fd < 0)
                return;
        fake_drop(f); /* one daemon connection at a time */
        f->fd = fd;
        f->pf = 0;
        f->connections++;
        f->ev_read = event_new(f->base, fd, EV_READ | EV_PERSIST, fake_read_cb, f);
        CHECK(f->ev_read && event_add(f->ev_read, NULL) == 0);
}

static void fake_start(struct fake *f, struct event_base *base, const char *dir, const char *name) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        memset(f, 0, sizeof(*f));
        f->base = base;
        f->fd = -1;
        f->features = FEATURES;
        f->pf_offer = PF;
        f->max_mem_slots = 8;
        vhu_reader_init(&f->reader);
        snprintf(f->path, sizeof(f->path), "%s/%s.sock", dir, name);
        CHECK(strlen(f->path) < sizeof(sa.sun_path));
        memcpy(sa.sun_path, f->path, strlen(f->path) + 1);
        f->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        CHECK(f->listen_fd >= 0);
        CHECK_EQ(bind(f->listen_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
        CHECK_EQ(listen(f->listen_fd, 8), 0);
        f->ev_accept = event_new(base, f->listen_fd, EV_READ | EV_PERSIST, fake_accept_cb, f);
        CHECK(f->ev_accept && event_add(f->ev_accept, NULL) == 0);
}

static void fake_stop(struct fake *f) {
        fake_drop(f);
        event_free(f->ev_accept);
        close(f->listen_fd);
        unlink(f->path);
}

/* The held ADD_MEM_REG acks go out. */
static void fake_release(struct fake *f) {
        f->hold_mem = false;
        for (unsigned i = 0; i < f->n_held; i++) {
                struct vhu_msg r;

                vhu_msg_build_reply_u64(&r, &f->held[i], 0);
                fake_send(f, &r);
        }
        f->n_held = 0;
}

/* ---- the model, as a face drives it ---- */

struct seen_event {
        enum vhub_event_type type;
        uint64_t timestamp_usec;
        uid_t uid;
        char device[VHUB_NAME_MAX + 1];
        char reason[200];
        unsigned reconnects;
        bool exact;
        unsigned n_vrings;
        struct vhub_event_vring vrings[2];
};

struct sink {
        struct vhub_event_sink sink;
        struct seen_event events[MAX_EVENTS];
        unsigned n;
};

struct env {
        struct event_base *base;
        struct vhub_config config;
        struct vhub_context ctx;
        struct vhub_owner owner;
        struct vhub_cred cred;
        struct sink sinks[2];
        struct event *ev_deadline;
        bool timed_out;
        char dir[64], backends[96];
};

static void sink_emit(void *userdata, const struct vhub_event *ev) {
        struct sink *s = userdata;
        struct seen_event *e;

        CHECK(s->n < MAX_EVENTS);
        e = &s->events[s->n++];
        e->type = ev->type;
        e->timestamp_usec = ev->timestamp_usec;
        e->uid = ev->uid;
        snprintf(e->device, sizeof(e->device), "%s", ev->device ? ev->device : "");
        snprintf(e->reason, sizeof(e->reason), "%s", ev->reason ? ev->reason : "");
        e->reconnects = ev->reconnects;
        e->exact = ev->exact;
        e->n_vrings = ev->n_vrings < 2 ? ev->n_vrings : 2;
        if (e->n_vrings)
                memcpy(e->vrings, ev->vrings, e->n_vrings * sizeof(*ev->vrings));
}

/* The events of one type that device saw since index `from`. */
static unsigned events_of(const struct env *e, unsigned from, enum vhub_event_type type, const char *device,
                          const struct seen_event **ret_last) {
        unsigned n = 0;

        for (unsigned i = from; i < e->sinks[0].n; i++)
                if (e->sinks[0].events[i].type == type && strcmp(e->sinks[0].events[i].device, device) == 0) {
                        n++;
                        if (ret_last)
                                *ret_last = &e->sinks[0].events[i];
                }
        return n;
}

static void deadline_cb(evutil_socket_t fd, short what, void *userdata) {
        ((struct env *)userdata)->timed_out = true;
}

/* Run the loop until cond holds; a test that hangs fails instead. */
#define RUN_UNTIL(e, cond)                                                                 \
        do {                                                                               \
                struct timeval tv_ = { .tv_sec = 30 };                                    \
                evtimer_add((e)->ev_deadline, &tv_);                                       \
                while (!(cond)) {                                                          \
                        if ((e)->timed_out) {                                              \
                                fprintf(stderr, "%s:%d: timed out waiting for %s\n",       \
                                        __FILE__, __LINE__, #cond);                        \
                                abort();                                                   \
                        }                                                                  \
                        event_base_loop((e)->base, EVLOOP_ONCE);                           \
                }                                                                          \
                evtimer_del((e)->ev_deadline);                                             \
        } while (0)

struct test_call {
        struct vhub_call call;
        bool done;
};

static void test_call_done(struct vhub_call *c) {
        ((struct test_call *)c)->done = true;
}

static void call_init(struct test_call *c) {
        memset(c, 0, sizeof(*c));
        c->call.done = test_call_done;
}

/* Wait for a call; its result (0, or -errno with call.error filled). */
static int call_wait(struct env *e, struct test_call *c) {
        RUN_UNTIL(e, c->done);
        return c->call.result;
}

static void env_init(struct env *e) {
        int sv[2];

        memset(e, 0, sizeof(*e));
        snprintf(e->dir, sizeof(e->dir), "/tmp/test-vhub-device-XXXXXX");
        CHECK(mkdtemp(e->dir));
        snprintf(e->backends, sizeof(e->backends), "%s/backends", e->dir);
        CHECK_EQ(mkdir(e->backends, 0700), 0);
        vhub_config_init(&e->config);
        e->config.backend_timeout_ms = TIMEOUT_MS;
        CHECK_EQ(vhub_config_add_backend_dir(&e->config, e->backends), 0);
        e->base = event_base_new();
        CHECK(e->base);
        e->ev_deadline = evtimer_new(e->base, deadline_cb, e);
        CHECK(e->ev_deadline);
        CHECK_EQ(vhub_context_init(&e->ctx, e->base, &e->config), 0);
        /* two faces listen: both get every event */
        for (int i = 0; i < 2; i++) {
                e->sinks[i].sink = (struct vhub_event_sink){ .emit = sink_emit, .userdata = &e->sinks[i] };
                vhub_context_add_sink(&e->ctx, &e->sinks[i].sink);
        }
        e->owner = (struct vhub_owner){ .face = VHUB_FACE_JSON_RPC, .id = 1 };
        /* the VM acts with this process's own credentials */
        CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        CHECK_EQ(vhub_cred_from_socket(sv[0], &e->cred), 0);
        close(sv[0]);
        close(sv[1]);
}

static void env_done(struct env *e) {
        CHECK_EQ(e->sinks[0].n, e->sinks[1].n);
        CHECK_EQ(memcmp(e->sinks[0].events, e->sinks[1].events, e->sinks[0].n * sizeof(struct seen_event)), 0);
        vhub_context_remove_sink(&e->ctx, &e->sinks[0].sink);
        vhub_context_remove_sink(&e->ctx, &e->sinks[1].sink);
        vhub_context_done(&e->ctx);
        vhub_cred_done(&e->cred);
        event_free(e->ev_deadline);
        event_base_free(e->base);
        vhub_config_done(&e->config);
        CHECK_EQ(rmdir(e->backends), 0);
        CHECK_EQ(rmdir(e->dir), 0);
}

static struct vhub_vm *vm_new(struct env *e, const char *name) {
        struct vhub_error err = { 0 };
        struct vhub_vm *vm = NULL;

        CHECK_EQ(vhub_vm_create(&e->ctx, e->cred.uid, name, 0, &e->owner, &e->cred, &err, &vm), 0);
        return vm;
}

static void vm_gone(struct env *e, struct vhub_vm *vm) {
        struct test_call c;

        call_init(&c);
        vhub_vm_destroy(vm, &c.call);
        CHECK_EQ(call_wait(e, &c), 0);
}

/* A memfd region at gpa; *ret_fd keeps a copy to write guest memory with. */
static int memory_add(struct env *e, struct vhub_vm *vm, uint64_t gpa, int *ret_fd) {
        struct vhub_region region = { .gpa = gpa, .size = MEM_SIZE, .uaddr = UADDR + gpa };
        struct test_call c;

        region.fd = memfd_create("test-vhub-device", MFD_CLOEXEC);
        CHECK(region.fd >= 0);
        CHECK_EQ(ftruncate(region.fd, MEM_SIZE), 0);
        if (ret_fd)
                CHECK((*ret_fd = dup(region.fd)) >= 0);
        call_init(&c);
        vhub_vm_memory_add(vm, &region, &c.call);
        return call_wait(e, &c);
}

static void device_add_async(struct vhub_vm *vm, const char *name, const struct fake *f, struct test_call *c) {
        struct vhub_device_add_params p = {
                .name = name,
                .socket_path = f->path,
                .mode = VHUB_DEV_MODE_CLIENT,
                .face = VHUB_FACE_JSON_RPC,
                .queues = 2,
                .reconnect_ms = 10,
        };

        call_init(c);
        vhub_device_add(vm, &p, &c->call);
}

static struct vhub_device *device_add(struct env *e, struct vhub_vm *vm, const char *name, const struct fake *f) {
        struct test_call c;
        struct vhub_device *d;

        device_add_async(vm, name, f, &c);
        CHECK_EQ(call_wait(e, &c), 0);
        CHECK_EQ(c.call.out.device_add.queues, 2);
        vhub_call_release(&c.call);
        d = vhub_vm_find_device(vm, name);
        CHECK(d && d->state == VHUB_DEV_READY);
        return d;
}

/* Start both rings with fresh eventfds; kick[i] keeps a copy of each kick fd. */
static int device_start(struct env *e, struct vhub_device *d, int kick[2]) {
        struct vhub_vring_params v[2];
        struct test_call c;

        for (unsigned i = 0; i < 2; i++) {
                v[i] = (struct vhub_vring_params){
                        .index = i, .size = RING_SIZE,
                        .desc = 0x10000 * i, .avail = 0x10000 * i + 0x1000, .used = 0x10000 * i + 0x2000,
                        .kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                        .call_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                        .err_fd = -1,
                };
                CHECK(v[i].kick_fd >= 0 && v[i].call_fd >= 0);
                if (kick)
                        CHECK((kick[i] = dup(v[i].kick_fd)) >= 0);
        }
        call_init(&c);
        vhub_device_start(d, UINT64_C(1) << VHU_VIRTIO_F_VERSION_1, v, 2, &c.call);
        return call_wait(e, &c);
}

static int device_stop(struct env *e, struct vhub_device *d, struct test_call *c) {
        call_init(c);
        vhub_device_stop(d, true, &c->call);
        return call_wait(e, c);
}

static int config_get(struct env *e, struct vhub_device *d, struct test_call *c) {
        call_init(c);
        vhub_device_config_get(d, 0, 8, &c->call);
        return call_wait(e, c);
}

/* The restore after a loss, until the device is back in `state`. */
static void wait_restored(struct env *e, struct vhub_device *d, unsigned from, enum vhub_device_state state) {
        RUN_UNTIL(e, events_of(e, from, VHUB_EV_RECONNECTED, d->name, NULL) == 1);
        CHECK_EQ(d->state, state);
        CHECK_EQ(events_of(e, from, VHUB_EV_DISCONNECTED, d->name, NULL), 1);
        CHECK_EQ(events_of(e, from, VHUB_EV_FAILED, d->name, NULL), 0);
}

static void put_u16(int fd, uint64_t gpa, uint16_t v) {
        CHECK_EQ(pwrite(fd, &v, sizeof(v), (off_t)gpa), (ssize_t)sizeof(v));
}

/* ---- the scenarios ---- */

static void test_lifecycle(struct env *e) {
        struct fake f, plain;
        struct vhub_device *d, *p;
        struct test_call c;
        int kick[2], mem;
        uint64_t n;

        fake_start(&f, e->base, e->backends, "f");
        fake_start(&plain, e->base, e->backends, "plain");
        /* no protocol features: every stage ends with a GET_FEATURES barrier,
         * memory goes as one SET_MEM_TABLE */
        plain.features = UINT64_C(1) << VHU_VIRTIO_F_VERSION_1;
        plain.pf_offer = 0;
        {
                unsigned from = e->sinks[0].n;
                struct vhub_vm *vm = vm_new(e, "vm0");

                CHECK_EQ(events_of(e, from, VHUB_EV_VM_CREATED, "", NULL), 1);
                CHECK_EQ(memory_add(e, vm, 0, &mem), 0);
                d = device_add(e, vm, "d0", &f);
                CHECK_EQ(f.counts[VHU_REQ_SET_OWNER], 1);
                CHECK_EQ(f.counts[VHU_REQ_ADD_MEM_REG], 1);
                CHECK_EQ(d->protocol_features, PF);
                CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_ADDED, "d0", NULL), 1);
                check_counted(d, &f);
                CHECK(d->stats.handshake_usec > 0);

                /* start: every ring set up, then one kick each */
                CHECK_EQ(device_start(e, d, kick), 0);
                CHECK_EQ(d->state, VHUB_DEV_RUNNING);
                CHECK_EQ(f.counts[VHU_REQ_SET_VRING_KICK], 2);
                CHECK_EQ(f.counts[VHU_REQ_SET_VRING_ENABLE], 2);
                for (int i = 0; i < 2; i++) {
                        CHECK_EQ(read(kick[i], &n, sizeof(n)), (ssize_t)sizeof(n));
                        CHECK_EQ(n, 1);
                        close(kick[i]);
                }
                /* start again: wrong state, nothing sent */
                CHECK(device_start(e, d, NULL) < 0);
                CHECK_EQ(f.counts[VHU_REQ_SET_FEATURES], 1);

                /* config, then stop with the back-end's bases */
                CHECK_EQ(config_get(e, d, &c), 0);
                CHECK_EQ(c.call.out.config_get.size, 8);
                CHECK_EQ(c.call.out.config_get.data[7], 0xab);
                f.stop_base = 5;
                CHECK_EQ(device_stop(e, d, &c), 0);
                CHECK_EQ(d->state, VHUB_DEV_STOPPED);
                CHECK_EQ(c.call.out.device_stop.n_vrings, 2);
                CHECK_EQ(c.call.out.device_stop.vrings[1].base, 5);
                CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_STARTED, "d0", NULL), 1);
                CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_STOPPED, "d0", NULL), 1);
                check_counted(d, &f);
                CHECK_EQ(d->stats.losses + d->stats.timeouts + d->stats.backend_requests, 0);
                vhub_call_release(&c.call);

                /* the barrier device goes the same way */
                p = device_add(e, vm, "plain", &plain);
                CHECK_EQ(plain.counts[VHU_REQ_SET_MEM_TABLE], 1);
                CHECK_EQ(device_start(e, p, NULL), 0);
                CHECK_EQ(p->state, VHUB_DEV_RUNNING);
                /* the offer, then a barrier per round trip: the negotiation
                 * with the table, START's features, rings and status */
                CHECK_EQ(plain.counts[VHU_REQ_GET_FEATURES], 3);
                CHECK_EQ(plain.counts[VHU_REQ_SET_VRING_ENABLE], 0);

                check_counted(p, &plain);
                vm_gone(e, vm);
                /* the running device was stopped before its back-end was let go */
                CHECK_EQ(plain.counts[VHU_REQ_GET_VRING_BASE], 2);
                /* each device's end, then the VM's; every event stamped, with the VM's uid */
                CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_REMOVED, "d0", NULL), 1);
                CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_REMOVED, "plain", NULL), 1);
                CHECK_EQ(events_of(e, from, VHUB_EV_VM_DESTROYED, "", NULL), 1);
                CHECK_EQ(e->sinks[0].events[e->sinks[0].n - 1].type, VHUB_EV_VM_DESTROYED);
                CHECK_EQ(strcmp(e->sinks[0].events[e->sinks[0].n - 1].reason, VHUB_VM_DESTROYED_DESTROY), 0);
                for (unsigned i = from; i < e->sinks[0].n; i++) {
                        CHECK(e->sinks[0].events[i].timestamp_usec > 0);
                        CHECK(i == from || e->sinks[0].events[i].timestamp_usec >=
                                                   e->sinks[0].events[i - 1].timestamp_usec);
                        CHECK_EQ(e->sinks[0].events[i].uid, e->cred.uid);
                }
        }
        CHECK_EQ(e->ctx.n_vms, 0);
        CHECK_EQ(e->ctx.n_devices, 0);
        close(mem);
        fake_stop(&f);
        fake_stop(&plain);
}

static void test_loss_and_restore(struct env *e) {
        const struct seen_event *ev = NULL;
        struct vhub_device *d;
        struct test_call c;
        struct vhub_vm *vm;
        struct fake f;
        unsigned from;
        int mem;

        fake_start(&f, e->base, e->backends, "f");
        vm = vm_new(e, "vm1");
        CHECK_EQ(memory_add(e, vm, 0, &mem), 0);
        d = device_add(e, vm, "d1", &f);
        CHECK_EQ(device_start(e, d, NULL), 0);

        /* the driver made 5 requests available, the device used 3 */
        put_u16(mem, 0x1000 + 2, 5);
        put_u16(mem, 0x2000 + 2, 3);
        from = e->sinks[0].n;
        fake_drop(&f);
        RUN_UNTIL(e, d->state != VHUB_DEV_RUNNING);
        /* a call during the outage fails at once */
        CHECK(config_get(e, d, &c) < 0);
        CHECK_EQ(c.call.error.code, VHUB_ERR_BACKEND);
        wait_restored(e, d, from, VHUB_DEV_RUNNING);
        events_of(e, from, VHUB_EV_RECONNECTED, "d1", &ev);
        CHECK_EQ(ev->reconnects, 1);
        CHECK_EQ(ev->n_vrings, 2);
        CHECK_EQ(ev->vrings[0].base, 3);
        CHECK_EQ(ev->vrings[0].outstanding, 2);
        CHECK(!ev->exact); /* two outstanding, no inflight region, not in order */
        CHECK_EQ(f.connections, 2);
        CHECK_EQ(f.vring_base[0], 3); /* restarted at the used index */
        CHECK_EQ(d->reconnects, 1);
        CHECK_EQ(d->stats.losses, 1);
        CHECK(d->stats.lost && d->stats.restored && d->stats.restore_usec > 0);
        events_of(e, from, VHUB_EV_DISCONNECTED, "d1", &ev);
        CHECK_EQ(ev->timestamp_usec, d->stats.last_loss_realtime_usec);
        CHECK_EQ(strcmp(ev->reason, d->stats.last_loss_reason), 0);
        check_counted(d, &f);

        /* a request left unanswered: -32007, the back-end is lost and restored */
        from = e->sinks[0].n;
        f.ignore = VHU_REQ_GET_CONFIG;
        CHECK(config_get(e, d, &c) < 0);
        CHECK_EQ(c.call.error.code, VHUB_ERR_TIMEOUT);
        CHECK_EQ(strcmp(c.call.error.device, "d1"), 0);
        wait_restored(e, d, from, VHUB_DEV_RUNNING);
        CHECK_EQ(f.connections, 3);

        /* a reply that breaks the protocol: -32006, lost and restored */
        from = e->sinks[0].n;
        f.violate = VHU_REQ_GET_CONFIG;
        CHECK(config_get(e, d, &c) < 0);
        CHECK_EQ(c.call.error.code, VHUB_ERR_BACKEND);
        wait_restored(e, d, from, VHUB_DEV_RUNNING);
        CHECK_EQ(f.connections, 4);
        CHECK_EQ(config_get(e, d, &c), 0);
        CHECK_EQ(d->reconnects, 3);
        CHECK_EQ(d->stats.losses, 3);
        CHECK_EQ(d->stats.timeouts, 1);
        /* every reply but the one that broke the protocol (a loss, not a reply) */
        CHECK_EQ(d->stats.requests, fake_requests(&f));
        CHECK_EQ(d->stats.replies, f.replies - 1);
        CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_STARTED, "d1", NULL), 0); /* a restore is not a start */

        vm_gone(e, vm);
        close(mem);
        fake_stop(&f);
}

/*
 * Handshakes park while a memory change is under way and resume when it
 * commits.  B's back-end takes one region, and the change makes two: B's
 * handshake fails when resumed, which frees B (its device.add fails)
 * while C, after it in the VM's list, is still to be resumed.
 */
static void test_parked_handshakes(struct env *e) {
        struct test_call mem_add, add_b, add_c;
        struct fake a, b, c;
        struct vhub_region r2;
        struct vhub_device *db, *dc;
        struct vhub_vm *vm;
        unsigned from;

        fake_start(&a, e->base, e->backends, "a");
        fake_start(&b, e->base, e->backends, "b");
        fake_start(&c, e->base, e->backends, "c");
        b.max_mem_slots = 1;
        vm = vm_new(e, "vm2");
        CHECK_EQ(memory_add(e, vm, 0, NULL), 0);
        device_add(e, vm, "A", &a);

        /* the second region waits for A's ack */
        a.hold_mem = true;
        r2 = (struct vhub_region){ .gpa = 0x100000000ull, .size = MEM_SIZE, .uaddr = UADDR + 0x100000000ull };
        r2.fd = memfd_create("test-vhub-device", MFD_CLOEXEC);
        CHECK(r2.fd >= 0 && ftruncate(r2.fd, MEM_SIZE) == 0);
        call_init(&mem_add);
        vhub_vm_memory_add(vm, &r2, &mem_add.call);
        RUN_UNTIL(e, a.n_held == 1);

        device_add_async(vm, "B", &b, &add_b);
        device_add_async(vm, "C", &c, &add_c);
        db = vhub_vm_find_device(vm, "B");
        dc = vhub_vm_find_device(vm, "C");
        CHECK(db && dc && TAILQ_NEXT(db, link) == dc);
        RUN_UNTIL(e, vhub_device_is_parked(db) && vhub_device_is_parked(dc));
        CHECK_EQ(b.counts[VHU_REQ_ADD_MEM_REG], 0);

        from = e->sinks[0].n;
        fake_release(&a);
        RUN_UNTIL(e, mem_add.done && add_b.done && add_c.done);
        /* a failed device.add announces nothing */
        CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_ADDED, "B", NULL), 0);
        CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_REMOVED, "B", NULL), 0);
        CHECK_EQ(events_of(e, from, VHUB_EV_DEVICE_ADDED, "C", NULL), 1);
        CHECK_EQ(mem_add.call.result, 0);
        CHECK(add_b.call.result < 0);
        CHECK_EQ(add_b.call.error.code, VHUB_ERR_LIMIT);
        CHECK(!vhub_vm_find_device(vm, "B"));
        CHECK_EQ(add_c.call.result, 0);
        CHECK_EQ(c.counts[VHU_REQ_ADD_MEM_REG], 2); /* both regions, after the commit */
        CHECK_EQ(vm->n_devices, 2);
        CHECK_EQ(vm->mem.n, 2);

        vm_gone(e, vm);
        fake_stop(&a);
        fake_stop(&b);
        fake_stop(&c);
}

int main(void) {
        int fds_before = vhub_count_open_fds();
        struct env e;

        vhub_log_setup(getenv("VHUB_TEST_DEBUG") ? LOG_DEBUG : LOG_CRIT, false);
        env_init(&e);
        test_lifecycle(&e);
        test_loss_and_restore(&e);
        test_parked_handshakes(&e);
        env_done(&e);
        CHECK_EQ(vhub_count_open_fds(), fds_before);
        printf("ok\n");
        return 0;
}
