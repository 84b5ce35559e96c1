/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target for the whole control path: bytes from a hostile client go
 * through the real server (framing, JSON, strict params, identity, dispatch)
 * into the real model, which talks to a real vhost-user back-end served in
 * the same loop (fuzz-control-backend.c), so device methods run the engine.
 *
 * Input layout:
 *   byte 0   bits 0-2: fds that ride with the first chunk (0-7: a memfd,
 *            two eventfds, a pipe's write end, again); bits 3-4: the
 *            back-end's flavour for this input; bit 5: send in 64-byte
 *            chunks instead of 1500
 *   then     bytes for the control socket; "@/" stands for the back-end
 *            directory (whose name is random), so "@/blk.sock" is the
 *            back-end; "\f" and the byte after it are a pause: the loop and
 *            the back-end run until the calls so far are answered, and the
 *            next bytes come with (that byte & 7) fds; with bit 3 of that
 *            byte set the back-end first connects to "@/srv.sock" (a
 *            server-mode device listening there).  ('\f' is not JSON
 *            whitespace, so it never needs to be part of a request.)
 *            "\v" or "\a", a length byte L and L bytes: the back-end (\v)
 *            or its back-end channel (\a) sends those bytes as they are,
 *            so hostile replies and back-end requests are fuzzed too.
 *
 * After each input the connection closes, lingering VMs are destroyed, and
 * once the daemon is idle the process must hold exactly the fds it held
 * before (abort otherwise): nothing a client does may leak an fd.
 *
 * Built with -DFUZZ_LIBFUZZER and -fsanitize=fuzzer it is a libFuzzer
 * target; otherwise main() replays every file given on the command line (the
 * committed corpus) and a few built-in seeds, so CI needs no fuzzer.
 */
#include <dirent.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "fuzz-control-backend.h"
#include "vhub-check.h"
#include "vhub-config.h"
#include "vhub-context.h"
#include "vhub-log.h"
#include "vhub-frontdoor.h"
#include "vhubd.h"
#include "vhu-scm.h"

#define FUZZ_MAX_FDS 7
#define FUZZ_MAX_INPUT (1 << 20)
/* Replies are due this soon: the back-end here answers at once, so only a
 * request it cannot answer (a hostile input cut the stream) waits for it. */
#define FUZZ_BACKEND_TIMEOUT_MS 30
/* After an input: loop rounds at full speed, then real time in 1 ms steps
 * (ten reply deadlines), before the daemon must have let go of everything. */
#define FUZZ_SETTLE_ROUNDS 200
#define FUZZ_SETTLE_MS (10 * FUZZ_BACKEND_TIMEOUT_MS)

static void env_cleanup(void);

struct fuzz_env {
        struct event_base *base;
        struct vhub_config config;
        struct vhubd vhubd;     /* the model and its faces, wired as vhubd does */
        struct fuzz_backend *backend;
        char dir[48];
        char backends[64];
        char backend_sock[96];
        char server_sock[96];   /* where a server-mode device may listen */
        char sock[100];
        uint8_t *expanded;      /* the input with "@/" expanded */
};

static struct fuzz_env *env_get(void) {
        static struct fuzz_env *env;
        struct vhubd_options o = { .control_listen_fd = -1 };

        if (env)
                return env;
        env = calloc(1, sizeof(*env));
        if (!env)
                abort();
        snprintf(env->dir, sizeof(env->dir), "/tmp/vhub-fuzz-XXXXXX");
        if (!mkdtemp(env->dir))
                abort();
        snprintf(env->backends, sizeof(env->backends), "%s/backends", env->dir);
        snprintf(env->backend_sock, sizeof(env->backend_sock), "%s/blk.sock", env->backends);
        snprintf(env->server_sock, sizeof(env->server_sock), "%s/srv.sock", env->backends);
        snprintf(env->sock, sizeof(env->sock), "%s/control.sock", env->dir);
        if (mkdir(env->backends, 0700) < 0)
                abort();
        env->expanded = malloc(FUZZ_MAX_INPUT * 2);
        if (!env->expanded)
                abort();
        /* as vhubd's main() does; the back-end here writes to VMM pipes too */
        signal(SIGPIPE, SIG_IGN);
        vhub_log_setup(getenv("FUZZ_CONTROL_VERBOSE") ? LOG_DEBUG : LOG_EMERG, false);
        vhub_config_init(&env->config);
        env->config.backend_timeout_ms = FUZZ_BACKEND_TIMEOUT_MS;
        if (vhub_config_add_backend_dir(&env->config, env->backends) < 0)
                abort();
        /* a front-door device's socket: under the fuzzer's own directory, never /run */
        if (asprintf(&env->config.vmm_dir, "%s/vmm", env->dir) < 0)
                abort();
        env->base = event_base_new();
        o.control_path = env->sock;
        env->config.control_mode = 0600;
        env->config.limits.connections = 16;
        env->config.limits.pending_per_connection = 64;
        if (vhubd_init(&env->vhubd, env->base, &env->config, &o) < 0)
                abort();
        /* its fd open from the start: the fd count around each input holds still */
        if (vhub_frontdoor_open_dir(env->vhubd.frontdoor) < 0)
                abort();
        if (fuzz_backend_new(env->backend_sock, &env->backend) < 0)
                abort();
        atexit(env_cleanup);
        return env;
}

static void run_loop(struct fuzz_env *env, int rounds) {
        for (int i = 0; i < rounds; i++) {
                event_base_loop(env->base, EVLOOP_NONBLOCK);
                fuzz_backend_pump(env->backend);
        }
}

/* The kinds of fd a VMM hands over, in a fixed order. */
static int make_fd(unsigned i) {
        int fd, p[2];

        switch (i % 4) {
        case 0:
                fd = memfd_create("fuzz", MFD_CLOEXEC);
                if (fd < 0 || ftruncate(fd, 1 << 16) < 0)
                        abort();
                return fd;
        case 1:
        case 2:
                fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
                if (fd < 0)
                        abort();
                return fd;
        default:
                if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
                        abort();
                close(p[0]);
                return p[1];
        }
}

static int send_with_fds(int fd, const uint8_t *data, size_t len, unsigned n_fds) {
        VHU_SCM_BUF(cbuf, FUZZ_MAX_FDS);
        struct iovec iov = { .iov_base = (void *)data, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        int fds[FUZZ_MAX_FDS];
        ssize_t n;

        for (unsigned i = 0; i < n_fds; i++)
                fds[i] = make_fd(i);
        vhu_scm_attach(&mh, cbuf.buf, sizeof(cbuf.buf), fds, n_fds);
        n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        for (unsigned i = 0; i < n_fds; i++)
                close(fds[i]);
        return n < 0 ? -errno : (int)n;
}

static size_t expand_input(struct fuzz_env *env, const uint8_t *data, size_t size) {
        size_t dl = strlen(env->backends), n = 0;

        for (size_t i = 0; i < size; i++) {
                if (data[i] == '@' && i + 1 < size && data[i + 1] == '/' && n + dl < FUZZ_MAX_INPUT) {
                        memcpy(env->expanded + n, env->backends, dl);
                        n += dl;
                        continue;
                }
                if (n >= FUZZ_MAX_INPUT)
                        break;
                env->expanded[n++] = data[i];
        }
        return n;
}

/* Read the daemon's answers; FUZZ_CONTROL_VERBOSE=1 shows them, and the
 * daemon's debug log (to see how deep a corpus file gets). */
static void drain(int fd) {
        static int verbose = -1;
        char sink[4096];
        ssize_t n;

        if (verbose < 0)
                verbose = getenv("FUZZ_CONTROL_VERBOSE") != NULL;
        while ((n = read(fd, sink, sizeof(sink))) > 0)
                if (verbose)
                        fwrite(sink, 1, (size_t)n, stderr);
}

/* The length of the prefix of data[0..size) free of the bytes in reject. */
static size_t strcspn_len(const uint8_t *data, size_t size, const char *reject) {
        size_t n = 0;

        while (n < size && (data[n] == 0 || !strchr(reject, data[n])))
                n++;
        return n;
}

/* Carry out the directive at data[off] (see the top); where to go on. */
static size_t run_directive(struct fuzz_env *env, const uint8_t *data, size_t size, size_t off,
                            unsigned *n_fds) {
        uint8_t kind = data[off], arg = data[off + 1];
        size_t len;

        if (kind == '\f') {
                if (arg & 8)
                        fuzz_backend_connect(env->backend, env->server_sock);
                /* a pause: let what was sent be answered */
                run_loop(env, 40);
                *n_fds = arg & 7;
                return off + 2;
        }
        len = arg;
        if (len > size - off - 2)
                len = size - off - 2;
        fuzz_backend_inject(env->backend, kind == '\a', data + off + 2, len);
        run_loop(env, 10);
        return off + 2 + len;
}

/* Destroy what outlived its connection (lingering VMs), let every device
 * and connection close; false if the fds held before the input (fds_before)
 * are not back within FUZZ_SETTLE_ROUNDS rounds and FUZZ_SETTLE_MS. */
static bool settle(struct fuzz_env *env, int fds_before) {
        vhub_context_destroy_vms(&env->vhubd.ctx);
        for (int i = 0; i < FUZZ_SETTLE_ROUNDS + FUZZ_SETTLE_MS; i++) {
                if (env->vhubd.ctx.n_vms == 0 && fuzz_backend_connections(env->backend) == 0 &&
                    vhub_count_open_fds() == fds_before)
                        return true;
                if (i >= FUZZ_SETTLE_ROUNDS)
                        usleep(1000);
                run_loop(env, 1);
        }
        return false;
}

static void env_cleanup(void) {
        struct fuzz_env *env = env_get();

        vhubd_done(&env->vhubd);
        env->backend = fuzz_backend_free(env->backend);
        unlink(env->backend_sock);
        free(env->expanded);
        event_base_free(env->base);
        {
                char vmm[128];

                snprintf(vmm, sizeof(vmm), "%s/vmm/%u", env->dir, (unsigned)getuid());
                rmdir(vmm);
                snprintf(vmm, sizeof(vmm), "%s/vmm", env->dir);
                rmdir(vmm);
        }
        vhub_config_done(&env->config);
        rmdir(env->backends);
        rmdir(env->dir);
        free(env);
}

/* Say which fds are open (to tell a leak's kind) and abort. */
static void fail_fd_leak(int before, int after) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *de;

        fprintf(stderr, "fd leak: %d fds open before the input, %d after; open now:\n", before, after);
        while (d && (de = readdir(d))) {
                char path[300], target[256];
                ssize_t n;

                snprintf(path, sizeof(path), "/proc/self/fd/%s", de->d_name);
                n = readlink(path, target, sizeof(target) - 1);
                if (n > 0) {
                        target[n] = 0;
                        fprintf(stderr, "  %s -> %s\n", de->d_name, target);
                }
        }
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct fuzz_env *env = env_get();
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        unsigned n_fds;
        size_t chunk_max;
        int fd, fds_before;

        if (size == 0)
                return 0;
        n_fds = data[0] & 7;
        fuzz_backend_set_flavour(env->backend, (enum fuzz_backend_flavour)((data[0] >> 3) & 3));
        chunk_max = data[0] & 0x20 ? 64 : 1500;
        size = expand_input(env, data + 1, size - 1);
        data = env->expanded;

        fds_before = vhub_count_open_fds();
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", env->sock);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                abort();
        run_loop(env, 2);
        for (size_t off = 0; off < size;) {
                size_t end = off + strcspn_len(data + off, size - off, "\f\v\a");

                /* in pieces, so the framing sees partial lines too */
                while (off < end) {
                        size_t chunk = end - off > chunk_max ? chunk_max : end - off;
                        int r = send_with_fds(fd, data + off, chunk, n_fds);

                        if (r <= 0) {
                                off = end = size;
                                break;
                        }
                        n_fds = 0;
                        off += (size_t)r;
                        run_loop(env, 4);
                        drain(fd);
                }
                if (off + 1 >= size)
                        break;
                off = run_directive(env, data, size, off, &n_fds);
                drain(fd);
        }
        /* the back-end answers within a few rounds: let calls complete */
        run_loop(env, 40);
        drain(fd);
        close(fd);
        /* the connection closes: its VMs are torn down, and so are lingering ones */
        if (!settle(env, fds_before))
                fail_fd_leak(fds_before, vhub_count_open_fds());
        return 0;
}

#ifndef FUZZ_LIBFUZZER
static const char *const seeds[] = {
        "\x00{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"daemon.info\"}\n",
        "\x01{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"vm.create\",\"params\":{\"vm\":\"a\"}}\n"
        "{\"jsonrpc\":\"2.0\",\"id\":2,\"fds\":1,\"method\":\"vm.memory.add\",\"params\":{\"vm\":\"a\",\"gpa\":0,\"size\":65536,\"fd\":0}}\n"
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"vm.memory.list\",\"params\":{\"vm\":\"a\"}}\n",
        "\x00[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"vm.list\"},{\"jsonrpc\":\"2.0\",\"method\":\"x\"},3]\n",
        "\x02{\"jsonrpc\":\"2.0\",\"id\":1,\"fds\":2,\"method\":\"device.start\",\"params\":{\"vm\":\"a\",\"device\":\"d\",\"features\":\"0x100000000\",\"vrings\":[{\"index\":0,\"size\":8,\"desc\":0,\"avail\":4096,\"used\":8192,\"kick\":0,\"call\":1}]}}\n",
        "\x00{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"device.add\",\"params\":{\"vm\":\"a\",\"device\":\"d\",\"socket\":\"/etc/passwd\"}}\n",
        "\x00{bad json\n{\"jsonrpc\":\"2.0\",\"id\":null,\"method\":\"daemon.info\",\"params\":[]}\n",
        "\x03{\"jsonrpc\":\"2.0\",\"id\":\"s\",\"fds\":3,\"method\":\"shared_object.add\",\"params\":{\"vm\":\"a\",\"uuid\":\"00000000-0000-0000-0000-000000000000\",\"fd\":2}}\n",
};

static int replay_file(const char *path) {
        uint8_t *buf;
        long n;
        FILE *f = fopen(path, "rb");

        if (!f)
                return -errno;
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        fseek(f, 0, SEEK_SET);
        buf = malloc(n > 0 ? (size_t)n : 1);
        if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
                free(buf);
                fclose(f);
                return -EIO;
        }
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)n);
        free(buf);
        return 0;
}

int main(int argc, char **argv) {
        unsigned count = 0;

        env_get();

        for (size_t i = 0; i < sizeof(seeds) / sizeof(seeds[0]); i++, count++)
                LLVMFuzzerTestOneInput((const uint8_t *)seeds[i], strlen(seeds[i] + 1) + 1);
        for (int i = 1; i < argc; i++) {
                DIR *d = opendir(argv[i]);
                struct dirent *e;

                if (!d) {
                        if (replay_file(argv[i]) < 0) {
                                fprintf(stderr, "cannot read %s\n", argv[i]);
                                return 1;
                        }
                        count++;
                        continue;
                }
                while ((e = readdir(d))) {
                        char p[4096];

                        if (e->d_name[0] == '.')
                                continue;
                        snprintf(p, sizeof(p), "%s/%s", argv[i], e->d_name);
                        if (replay_file(p) < 0) {
                                fprintf(stderr, "cannot read %s\n", p);
                                closedir(d);
                                return 1;
                        }
                        count++;
                }
                closedir(d);
        }
        printf("replayed %u inputs through the control server\n", count);
        /* a corpus named but empty (a wrong path) must not pass silently */
        return argc > 1 && count == sizeof(seeds) / sizeof(seeds[0]) ? 1 : 0;
}
#endif
