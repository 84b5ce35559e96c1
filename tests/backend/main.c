/* SPDX-License-Identifier: MIT */
/*
 * vhub-test-backend: command line, the vhost-user sockets' lifecycle (listen
 * or connect, one front-end at a time, reconnect), and the single-threaded
 * poll() loop that drives everything.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"

#define TB_DEFAULT_DISK_SIZE (UINT64_C(16) << 20)

struct tb tb = { .disk_fd = -1 };

uint64_t tb_now_ms(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
}

/* xorshift64*: reproducible with --seed, good enough to shuffle completions */
uint64_t tb_random(void) {
        uint64_t x = tb.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        tb.rng = x;
        return x * UINT64_C(0x2545F4914F6CDD1D);
}

void tb_log(int level, const char *fmt, ...) {
        va_list ap;
        if (level > tb.opt.verbose)
                return;
        fprintf(stderr, "vhub-test-backend[%d]: ", (int) getpid());
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
}

static const char *const order_names[_TB_ORDER_MAX] = {
        [TB_ORDER_FIFO] = "fifo",
        [TB_ORDER_REVERSE] = "reverse",
        [TB_ORDER_RANDOM] = "random",
};

const char *tb_order_name(enum tb_order o) {
        return o < _TB_ORDER_MAX ? order_names[o] : "unknown";
}

int tb_order_from_name(const char *s) {
        for (int i = 0; i < _TB_ORDER_MAX; i++)
                if (strcmp(order_names[i], s) == 0)
                        return i;
        return -EINVAL;
}

/*
 * A hostile front-end may truncate a memfd we have mapped: the next access
 * raises SIGBUS.  Put a private zero page over the faulting page and carry
 * on (the access reads zeroes, writes go nowhere); the count is reported.
 */
static volatile sig_atomic_t sigbus_count;
static long page_size;

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
        void *page = (void *) ((uintptr_t) si->si_addr & ~((uintptr_t) page_size - 1));
        if (si->si_code != BUS_ADRERR || !si->si_addr ||
            mmap(page, (size_t) page_size, PROT_READ | PROT_WRITE,
                 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED) {
                signal(SIGBUS, SIG_DFL);
                raise(SIGBUS);
                return;
        }
        sigbus_count++;
}

uint64_t tb_sigbus_count(void) {
        return (uint64_t) sigbus_count;
}

int tb_memfd_new(const char *name, uint64_t size) {
        int fd = memfd_create(name, MFD_CLOEXEC);
        if (fd < 0)
                return -errno;
        if (ftruncate(fd, (off_t) size) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

/* ---- sockets ---- */

int tb_listen_unix(const char *path, int backlog) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        struct stat st;

        if (strlen(path) >= sizeof(sa.sun_path))
                return -ENAMETOOLONG;
        strcpy(sa.sun_path, path);
        /* a stale socket of a killed predecessor is fine to replace */
        if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
                unlink(path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        if (bind(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0 || listen(fd, backlog) < 0) {
                int r = -errno;
                close(fd);
                return r;
        }
        return fd;
}

static int sock_listen(struct tb_sock *s) {
        int fd = tb_listen_unix(s->path, 16);
        if (fd < 0)
                return fd;
        s->listen_fd = fd;
        return 0;
}

static void sock_attach(struct tb_sock *s, int fd, const char *how) {
        (void) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        s->conn = tb_conn_new(s, fd);
        if (!s->conn) {
                close(fd);
                return;
        }
        tb_info("sock%u: front-end %s (connection %" PRIu64 ")", s->index, how, s->connections);
        tb_conn_on_readable(s->conn);
}

static void sock_accept(struct tb_sock *s) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
                if (errno != EAGAIN && errno != EINTR)
                        tb_warn("sock%u: accept: %m", s->index);
                return;
        }
        sock_attach(s, fd, "connected");
}

static void sock_try_connect(struct tb_sock *s) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };

        s->next_connect_ms = tb_now_ms() + tb.opt.reconnect_ms;
        if (strlen(s->path) >= sizeof(sa.sun_path))
                return;
        strcpy(sa.sun_path, s->path);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return;
        /* non-blocking unix connect() succeeds or fails now (EAGAIN: backlog full) */
        if (connect(fd, (struct sockaddr *) &sa, sizeof(sa)) < 0) {
                tb_debug("sock%u: connect %s: %m", s->index, s->path);
                close(fd);
                return;
        }
        s->next_connect_ms = 0;
        sock_attach(s, fd, "reached");
}

void tb_sock_drop_conn(struct tb_sock *s, const char *why) {
        if (!s->conn)
                return;
        tb_info("sock%u: connection dropped (%s)", s->index, why);
        s->conn = tb_conn_free(s->conn);
        if (s->connect_mode)
                s->next_connect_ms = tb_now_ms() + tb.opt.reconnect_ms;
}

/* ---- options ---- */

static int parse_u64(const char *s, uint64_t *ret, int base) {
        char *end;
        errno = 0;
        unsigned long long v = strtoull(s, &end, base);
        if (errno || end == s)
                return -EINVAL;
        switch (*end) {
        case 'K': case 'k': v <<= 10; end++; break;
        case 'M': case 'm': v <<= 20; end++; break;
        case 'G': case 'g': v <<= 30; end++; break;
        default: break;
        }
        if (*end || s[0] == '-')
                return -EINVAL;
        *ret = v;
        return 0;
}

/* A count or a time in [min, max]; *ret untouched on failure. */
static int parse_unsigned(const char *s, unsigned min, unsigned max, unsigned *ret) {
        uint64_t v;
        int r = parse_u64(s, &v, 0);
        if (r < 0)
                return r;
        if (v < min || v > max)
                return -ERANGE;
        *ret = (unsigned) v;
        return 0;
}

/* "1M,0,64K": sizes by shmid, at most 256 (checked by nobody: tests want bad ones too). */
static int parse_shmem(const char *arg, struct tb_options *o) {
        char *copy = strdup(arg), *save = NULL, *tok;
        int r = 0;

        if (!copy)
                return -ENOMEM;
        o->n_shmem = 0;
        for (tok = strtok_r(copy, ",", &save); tok && r == 0; tok = strtok_r(NULL, ",", &save)) {
                if (o->n_shmem == VHU_MAX_SHMEM_REGIONS)
                        r = -E2BIG;
                else
                        r = parse_u64(tok, &o->shmem_sizes[o->n_shmem++], 0);
        }
        free(copy);
        return r;
}

static void usage(FILE *f) {
        fputs("Usage: vhub-test-backend [OPTIONS]\n"
              "  --socket PATH             listen on PATH (repeatable)\n"
              "  --connect PATH            connect to a listening front-end (repeatable)\n"
              "  --control PATH            JSON control socket\n"
              "  --disk FILE               disk image (created/extended to --disk-size)\n"
              "  --disk-size BYTES         disk size (K/M/G suffixes; default 16M)\n"
              "  --features HEX            virtio features offered\n"
              "  --protocol-features HEX   protocol features offered\n"
              "  --queues N                GET_QUEUE_NUM (default 2)\n"
              "  --mem-slots N             GET_MAX_MEM_SLOTS (default 32)\n"
              "  --complete fifo|reverse|random   completion order (default fifo)\n"
              "  --delay-ms N              hold requests N ms before completing\n"
              "  --seed N                  random seed\n"
              "  --fail-handshake N        close the first N connections after GET_FEATURES\n"
              "  --reconnect-ms N          --connect retry interval (default 100)\n"
              "  --shmem SIZE[,SIZE...]    GET_SHMEM_CONFIG's region sizes by shmid (K/M/G)\n"
              "  -v, --verbose             more logging (repeatable); -q, --quiet: less\n",
              f);
}

static int add_path(char ***v, unsigned *n, const char *p) {
        char **nv = realloc(*v, (*n + 1) * sizeof(*nv));
        if (!nv)
                return -ENOMEM;
        *v = nv;
        nv[*n] = strdup(p);
        if (!nv[*n])
                return -ENOMEM;
        (*n)++;
        return 0;
}

enum {
        OPT_SOCKET = 0x100, OPT_CONNECT, OPT_CONTROL, OPT_DISK, OPT_DISK_SIZE,
        OPT_FEATURES, OPT_PFEATURES, OPT_QUEUES, OPT_SLOTS, OPT_COMPLETE,
        OPT_DELAY, OPT_SEED, OPT_FAIL_HS, OPT_RECONNECT, OPT_SHMEM,
};

/* The defaults: a virtio-blk device with every protocol feature the
 * daemon uses, two queues, FIFO completion. */
static void options_default(struct tb_options *o) {
        o->features = (UINT64_C(1) << VHU_VIRTIO_F_VERSION_1) | (UINT64_C(1) << TB_VIRTIO_BLK_F_FLUSH) |
                      (UINT64_C(1) << TB_VIRTIO_BLK_F_MQ) | (UINT64_C(1) << VHU_F_PROTOCOL_FEATURES);
        o->protocol_features =
                VHU_PF_BIT(VHU_PF_MQ) | VHU_PF_BIT(VHU_PF_LOG_SHMFD) | VHU_PF_BIT(VHU_PF_REPLY_ACK) |
                VHU_PF_BIT(VHU_PF_BACKEND_REQ) | VHU_PF_BIT(VHU_PF_CONFIG) |
                VHU_PF_BIT(VHU_PF_BACKEND_SEND_FD) | VHU_PF_BIT(VHU_PF_HOST_NOTIFIER) |
                VHU_PF_BIT(VHU_PF_INFLIGHT_SHMFD) | VHU_PF_BIT(VHU_PF_RESET_DEVICE) |
                VHU_PF_BIT(VHU_PF_CONFIGURE_MEM_SLOTS) | VHU_PF_BIT(VHU_PF_STATUS) |
                VHU_PF_BIT(VHU_PF_SHARED_OBJECT) | VHU_PF_BIT(VHU_PF_DEVICE_STATE);
        o->queues = 2;
        o->mem_slots = 32;
        o->order = TB_ORDER_FIFO;
        o->seed = (uint64_t) time(NULL) ^ ((uint64_t) getpid() << 32);
        o->reconnect_ms = 100;
        o->verbose = 1;
}

/* One option's value into o; -errno when it is bad. */
static int parse_option(struct tb_options *o, int c, const char *arg) {
        int r = 0;

        switch (c) {
        case OPT_SOCKET:  r = add_path(&o->socket_paths, &o->n_socket_paths, arg); break;
        case OPT_CONNECT: r = add_path(&o->connect_paths, &o->n_connect_paths, arg); break;
        case OPT_CONTROL: free(o->control_path); o->control_path = strdup(arg); break;
        case OPT_DISK:    free(o->disk_path); o->disk_path = strdup(arg); break;
        case OPT_DISK_SIZE:
                r = parse_u64(arg, &o->disk_size, 0);
                break;
        case OPT_FEATURES:
                r = parse_u64(arg, &o->features, 16);
                break;
        case OPT_PFEATURES:
                r = parse_u64(arg, &o->protocol_features, 16);
                break;
        case OPT_QUEUES:
                r = parse_unsigned(arg, 1, TB_MAX_QUEUES, &o->queues);
                break;
        case OPT_SLOTS:
                r = parse_unsigned(arg, 1, TB_MAX_MEM_SLOTS, &o->mem_slots);
                break;
        case OPT_COMPLETE:
                r = tb_order_from_name(arg);
                if (r >= 0) {
                        o->order = (enum tb_order) r;
                        r = 0;
                }
                break;
        case OPT_DELAY:
                r = parse_unsigned(arg, 0, 600000, &o->delay_ms);
                break;
        case OPT_SEED:
                r = parse_u64(arg, &o->seed, 0);
                break;
        case OPT_FAIL_HS:
                r = parse_unsigned(arg, 0, 1000000, &o->fail_handshake);
                break;
        case OPT_RECONNECT:
                r = parse_unsigned(arg, 1, 60000, &o->reconnect_ms);
                break;
        case OPT_SHMEM:
                r = parse_shmem(arg, o);
                break;
        case 'v': o->verbose++; break;
        case 'q': o->verbose--; break;
        case 'h': usage(stdout); exit(EXIT_SUCCESS);
        default:  return -EINVAL;   /* getopt returns only the table's values here */
        }
        return r;
}

/* What the options must say together. */
static int options_check(const struct tb_options *o) {
        if (o->n_socket_paths + o->n_connect_paths == 0) {
                fprintf(stderr, "vhub-test-backend: need at least one --socket or --connect\n");
                return -EINVAL;
        }
        if (o->n_socket_paths + o->n_connect_paths > TB_MAX_SOCKETS) {
                fprintf(stderr, "vhub-test-backend: at most %d sockets\n", TB_MAX_SOCKETS);
                return -EINVAL;
        }
        return 0;
}

static int parse_args(int argc, char **argv) {
        static const struct option opts[] = {
                { "socket",            required_argument, NULL, OPT_SOCKET },
                { "connect",           required_argument, NULL, OPT_CONNECT },
                { "control",           required_argument, NULL, OPT_CONTROL },
                { "disk",              required_argument, NULL, OPT_DISK },
                { "disk-size",         required_argument, NULL, OPT_DISK_SIZE },
                { "features",          required_argument, NULL, OPT_FEATURES },
                { "protocol-features", required_argument, NULL, OPT_PFEATURES },
                { "queues",            required_argument, NULL, OPT_QUEUES },
                { "mem-slots",         required_argument, NULL, OPT_SLOTS },
                { "complete",          required_argument, NULL, OPT_COMPLETE },
                { "delay-ms",          required_argument, NULL, OPT_DELAY },
                { "seed",              required_argument, NULL, OPT_SEED },
                { "fail-handshake",    required_argument, NULL, OPT_FAIL_HS },
                { "reconnect-ms",      required_argument, NULL, OPT_RECONNECT },
                { "shmem",             required_argument, NULL, OPT_SHMEM },
                { "verbose",           no_argument,       NULL, 'v' },
                { "quiet",             no_argument,       NULL, 'q' },
                { "help",              no_argument,       NULL, 'h' },
                {}
        };
        struct tb_options *o = &tb.opt;
        int c, r, idx;

        options_default(o);
        while ((idx = -1, c = getopt_long(argc, argv, "vqh", opts, &idx)) >= 0) {
                if (c == '?') {         /* getopt said what it did not know */
                        usage(stderr);
                        return -EINVAL;
                }
                r = parse_option(o, c, optarg);
                if (r < 0) {
                        /* the option's name from the table: argv[optind - 1] is the
                         * value itself when it came as a separate argument */
                        fprintf(stderr, "vhub-test-backend: bad value for --%s: %s\n",
                                idx >= 0 ? opts[idx].name : "?", optarg ? optarg : "");
                        return r;
                }
        }
        if (optind < argc) {
                fprintf(stderr, "vhub-test-backend: unexpected argument %s\n", argv[optind]);
                return -EINVAL;
        }
        r = options_check(o);
        if (r < 0)
                return r;
        if (o->seed == 0)
                o->seed = 1;        /* xorshift needs a nonzero state */
        tb.rng = o->seed;
        return 0;
}

static int disk_open(void) {
        struct stat st;
        uint64_t want = tb.opt.disk_size;

        if (tb.opt.disk_path) {
                tb.disk_fd = open(tb.opt.disk_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
                if (tb.disk_fd < 0 || fstat(tb.disk_fd, &st) < 0)
                        return -errno;
                if (!want && st.st_size == 0)
                        want = TB_DEFAULT_DISK_SIZE;
                if (want > (uint64_t) st.st_size && ftruncate(tb.disk_fd, (off_t) want) < 0)
                        return -errno;
                tb.disk_size = want > (uint64_t) st.st_size ? want : (uint64_t) st.st_size;
                tb.disk_is_file = true;
        } else {
                tb.disk_size = want ? want : TB_DEFAULT_DISK_SIZE;
                tb.disk_fd = tb_memfd_new("vhub-tb-disk", tb.disk_size);
                if (tb.disk_fd < 0)
                        return tb.disk_fd;
        }
        tb.disk_size -= tb.disk_size % TB_SECTOR_SIZE;
        return 0;
}

static int socks_open(void) {
        unsigned n = tb.opt.n_socket_paths + tb.opt.n_connect_paths;

        tb.socks = calloc(n, sizeof(*tb.socks));
        if (!tb.socks)
                return -ENOMEM;
        for (unsigned i = 0; i < n; i++) {
                struct tb_sock *s = &tb.socks[i];
                bool connect_mode = i >= tb.opt.n_socket_paths;
                s->index = i;
                s->listen_fd = -1;
                s->connect_mode = connect_mode;
                s->path = connect_mode ? tb.opt.connect_paths[i - tb.opt.n_socket_paths]
                                       : tb.opt.socket_paths[i];
                s->fail_handshake_left = tb.opt.fail_handshake;
                tb.n_socks++;
                if (connect_mode)
                        continue;       /* first attempt from the loop */
                int r = sock_listen(s);
                if (r < 0) {
                        fprintf(stderr, "vhub-test-backend: listen on %s: %s\n", s->path, strerror(-r));
                        return r;
                }
        }
        return 0;
}

static void cleanup(void) {
        for (unsigned i = 0; i < tb.n_socks; i++) {
                struct tb_sock *s = &tb.socks[i];
                s->conn = tb_conn_free(s->conn);
                if (s->listen_fd >= 0) {
                        close(s->listen_fd);
                        unlink(s->path);
                }
                tb_shared_clear(s);
        }
        free(tb.socks);
        tb_control_close();
        if (tb.disk_fd >= 0)
                close(tb.disk_fd);
        for (unsigned i = 0; i < tb.opt.n_socket_paths; i++)
                free(tb.opt.socket_paths[i]);
        for (unsigned i = 0; i < tb.opt.n_connect_paths; i++)
                free(tb.opt.connect_paths[i]);
        free(tb.opt.socket_paths);
        free(tb.opt.connect_paths);
        free(tb.opt.control_path);
        free(tb.opt.disk_path);
}

/* ---- the loop ---- */

enum pfd_kind { PFD_SIGNAL, PFD_LISTEN, PFD_CONN, PFD_CHAN, PFD_KICK, PFD_XFER };

struct pfd_tag {
        enum pfd_kind kind;
        unsigned sock, vq;
};

#define TB_MAX_PFDS (1 + TB_MAX_CONTROL_CLIENTS + 1 + TB_MAX_SOCKETS * (4 + TB_MAX_QUEUES))

static void conn_reap(struct tb_sock *s) {
        if (s->conn && s->conn->dead)
                tb_sock_drop_conn(s, s->last_error[0] ? s->last_error : "closed");
}

static void dispatch(const struct pollfd *p, const struct pfd_tag *t) {
        struct tb_sock *s = &tb.socks[t->sock];
        struct tb_conn *c = s->conn;

        if (!p->revents)
                return;
        switch (t->kind) {
        case PFD_SIGNAL:
                break;
        case PFD_LISTEN:
                if (!s->conn)
                        sock_accept(s);
                break;
        case PFD_CONN:
                if (!c || c->fd != p->fd || c->dead)
                        break;
                if (p->revents & POLLOUT)
                        tb_conn_flush(c);
                if (p->revents & (POLLIN | POLLHUP | POLLERR))
                        tb_conn_on_readable(c);
                break;
        case PFD_CHAN:
                if (!c || c->chan_fd != p->fd || c->dead)
                        break;
                if (p->revents & POLLOUT)
                        tb_chan_flush(c);
                if (c->chan_fd >= 0 && (p->revents & (POLLIN | POLLHUP | POLLERR)))
                        tb_chan_on_readable(c);
                break;
        case PFD_KICK:
                if (c && !c->dead && c->vqs[t->vq].kick_fd == p->fd)
                        tb_vq_kick(c, &c->vqs[t->vq]);
                break;
        case PFD_XFER:
                if (c && !c->dead && c->xfer_fd == p->fd)
                        tb_conn_xfer_io(c);
                break;
        }
        conn_reap(s);
}

static int run(int sigfd) {
        static struct pollfd pfds[TB_MAX_PFDS];
        static struct pfd_tag tags[TB_MAX_PFDS];

        while (!tb.quit) {
                size_t n = 0;
                uint64_t now = tb_now_ms(), deadline = UINT64_MAX;

                pfds[n] = (struct pollfd) { .fd = sigfd, .events = POLLIN };
                tags[n++] = (struct pfd_tag) { .kind = PFD_SIGNAL };
                size_t ctl_first = n;
                n += tb_control_pollfds(pfds + n, TB_MAX_PFDS - n);
                size_t ctl_n = n - ctl_first;

                for (unsigned i = 0; i < tb.n_socks; i++) {
                        struct tb_sock *s = &tb.socks[i];
                        struct tb_conn *c = s->conn;
                        if (s->connect_mode && !c) {
                                if (s->next_connect_ms <= now)
                                        sock_try_connect(s);
                                c = s->conn;
                                if (!c && s->next_connect_ms < deadline)
                                        deadline = s->next_connect_ms;
                        }
                        if (!c) {
                                if (s->listen_fd >= 0) {
                                        pfds[n] = (struct pollfd) { .fd = s->listen_fd, .events = POLLIN };
                                        tags[n++] = (struct pfd_tag) { .kind = PFD_LISTEN, .sock = i };
                                }
                                continue;
                        }
                        short ev = 0;
                        if (!c->hung && !c->delayed && !c->paused_until)
                                ev |= POLLIN;
                        if (vhu_writer_pending(&c->writer))
                                ev |= POLLOUT;
                        pfds[n] = (struct pollfd) { .fd = c->fd, .events = ev };
                        tags[n++] = (struct pfd_tag) { .kind = PFD_CONN, .sock = i };
                        if (c->chan_fd >= 0) {
                                short cev = POLLIN;
                                if (vhu_writer_pending(&c->chan_writer))
                                        cev |= POLLOUT;
                                pfds[n] = (struct pollfd) { .fd = c->chan_fd, .events = cev };
                                tags[n++] = (struct pfd_tag) { .kind = PFD_CHAN, .sock = i };
                        }
                        if (c->xfer_fd >= 0) {
                                short xev = c->xfer == TB_XFER_SAVE ? POLLOUT : POLLIN;
                                pfds[n] = (struct pollfd) { .fd = c->xfer_fd, .events = xev };
                                tags[n++] = (struct pfd_tag) { .kind = PFD_XFER, .sock = i };
                        }
                        for (unsigned q = 0; q < tb.opt.queues; q++) {
                                if (c->vqs[q].kick_fd < 0)
                                        continue;
                                pfds[n] = (struct pollfd) { .fd = c->vqs[q].kick_fd, .events = POLLIN };
                                tags[n++] = (struct pfd_tag) { .kind = PFD_KICK, .sock = i, .vq = q };
                        }
                        uint64_t d = tb_conn_next_deadline(c);
                        if (d < deadline)
                                deadline = d;
                }

                int timeout = -1;
                if (deadline != UINT64_MAX)
                        timeout = deadline <= now ? 0 : (int) (deadline - now < 60000 ? deadline - now : 60000);
                int r = poll(pfds, n, timeout);
                if (r < 0) {
                        if (errno == EINTR)
                                continue;
                        tb_warn("poll: %m");
                        return -errno;
                }
                if (pfds[0].revents) {
                        struct signalfd_siginfo si;
                        if (read(sigfd, &si, sizeof(si)) == sizeof(si)) {
                                tb_info("signal %u: exiting", si.ssi_signo);
                                tb.quit = true;
                        }
                }
                tb_control_dispatch(pfds + ctl_first, ctl_n);
                for (size_t k = ctl_first + ctl_n; k < n; k++)
                        dispatch(&pfds[k], &tags[k]);

                now = tb_now_ms();
                static uint64_t sigbus_seen;
                if (tb_sigbus_count() != sigbus_seen) {
                        sigbus_seen = tb_sigbus_count();
                        tb_warn("SIGBUS on guest memory (%" PRIu64 " so far): a front-end truncated "
                                "a mapped fd; zero pages put in place", sigbus_seen);
                }
                for (unsigned i = 0; i < tb.n_socks; i++) {
                        struct tb_sock *s = &tb.socks[i];
                        if (s->conn && !s->conn->dead)
                                tb_conn_on_timer(s->conn, now);
                        conn_reap(s);
                }
        }
        return 0;
}

int main(int argc, char **argv) {
        sigset_t mask;
        int sigfd = -1, r;

        if (parse_args(argc, argv) < 0) {
                cleanup();
                return 2;
        }
        signal(SIGPIPE, SIG_IGN);
        page_size = sysconf(_SC_PAGESIZE);
        struct sigaction sa = { .sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO | SA_NODEFER };
        sigaction(SIGBUS, &sa, NULL);
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        sigfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);

        r = disk_open();
        if (r < 0) {
                fprintf(stderr, "vhub-test-backend: disk: %s\n", strerror(-r));
                goto out;
        }
        tb_blk_config_init();
        r = socks_open();
        if (r < 0)
                goto out;
        /* last: a connectable control socket means everything listens */
        if (tb.opt.control_path) {
                r = tb_control_open(tb.opt.control_path);
                if (r < 0) {
                        fprintf(stderr, "vhub-test-backend: control socket %s: %s\n",
                                tb.opt.control_path, strerror(-r));
                        goto out;
                }
        }
        tb_info("ready: %u socket(s), disk %" PRIu64 " bytes, features 0x%" PRIx64
                ", protocol features 0x%" PRIx64 ", order %s, delay %u ms, seed %" PRIu64,
                tb.n_socks, tb.disk_size, tb.opt.features, tb.opt.protocol_features,
                tb_order_name(tb.opt.order), tb.opt.delay_ms, tb.opt.seed);
        r = run(sigfd);
out:
        if (sigfd >= 0)
                close(sigfd);
        cleanup();
        return r < 0 ? 1 : 0;
}
