/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target for the whole control path: bytes from a hostile client go
 * through the real server (framing, JSON, strict params, identity, dispatch)
 * into the real model, with no back-end reachable (the back-end directory is
 * an empty private one).  The first input byte says how many memfds ride
 * with the bytes (0-3), so fd-taking methods are reached too.
 *
 * Built with -DFUZZ_LIBFUZZER and -fsanitize=fuzzer it is a libFuzzer
 * target; otherwise main() replays every file given on the command line (the
 * committed corpus) and a few built-in seeds, so CI needs no fuzzer.
 */
#include <dirent.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "vhub-config.h"
#include "vhub-log.h"
#include "vhubd.h"
#include "vhu-scm.h"

struct fuzz_env {
        struct event_base *base;
        struct vhub_config config;
        struct vhubd vhubd;     /* the model and its faces, wired as vhubd does */
        char dir[48];
        char sock[100];
};

static struct fuzz_env *env_get(void) {
        static struct fuzz_env *env;
        struct vhubd_options o = { .control_listen_fd = -1 };
        char backends[128];

        if (env)
                return env;
        env = calloc(1, sizeof(*env));
        if (!env)
                abort();
        snprintf(env->dir, sizeof(env->dir), "/tmp/vhub-fuzz-XXXXXX");
        if (!mkdtemp(env->dir))
                abort();
        snprintf(backends, sizeof(backends), "%s/backends", env->dir);
        snprintf(env->sock, sizeof(env->sock), "%s/control.sock", env->dir);
        if (mkdir(backends, 0700) < 0)
                abort();
        vhub_log_setup(LOG_EMERG, false);
        vhub_config_init(&env->config);
        env->config.backend_timeout_ms = 50;
        if (vhub_config_add_backend_dir(&env->config, backends) < 0)
                abort();
        env->base = event_base_new();
        o.control_path = env->sock;
        env->config.control_mode = 0600;
        env->config.limits.connections = 16;
        env->config.limits.pending_per_connection = 64;
        if (vhubd_init(&env->vhubd, env->base, &env->config, &o) < 0)
                abort();
        return env;
}

static void run_loop(struct fuzz_env *env, int rounds) {
        for (int i = 0; i < rounds; i++)
                event_base_loop(env->base, EVLOOP_NONBLOCK);
}

static int send_with_fds(int fd, const uint8_t *data, size_t len, unsigned n_fds) {
        VHU_SCM_BUF(cbuf, 3);
        struct iovec iov = { .iov_base = (void *)data, .iov_len = len };
        struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
        int fds[3];
        ssize_t n;

        for (unsigned i = 0; i < n_fds; i++) {
                fds[i] = memfd_create("fuzz", MFD_CLOEXEC);
                if (fds[i] < 0 || ftruncate(fds[i], 1 << 16) < 0)
                        abort();
        }
        vhu_scm_attach(&mh, cbuf.buf, sizeof(cbuf.buf), fds, n_fds);
        n = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        for (unsigned i = 0; i < n_fds; i++)
                close(fds[i]);
        return n < 0 ? -errno : (int)n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct fuzz_env *env = env_get();
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        char sink[4096];
        unsigned n_fds;
        int fd;

        if (size == 0)
                return 0;
        n_fds = data[0] % 4;
        data++;
        size--;
        if (size > 1 << 20)
                size = 1 << 20;
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", env->sock);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                abort();
        run_loop(env, 2);
        /* in pieces, so the framing sees partial lines too */
        for (size_t off = 0; off < size;) {
                size_t chunk = size - off > 1500 ? 1500 : size - off;
                int r = send_with_fds(fd, data + off, chunk, off == 0 ? n_fds : 0);

                if (r <= 0)
                        break;
                off += (size_t)r;
                run_loop(env, 3);
                while (read(fd, sink, sizeof(sink)) > 0)
                        ;
        }
        run_loop(env, 10);
        while (read(fd, sink, sizeof(sink)) > 0)
                ;
        close(fd);
        /* the connection closes: its VMs are torn down */
        run_loop(env, 20);
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

static void env_cleanup(void) {
        struct fuzz_env *env = env_get();
        char p[160];

        vhubd_done(&env->vhubd);
        event_base_free(env->base);
        vhub_config_done(&env->config);
        snprintf(p, sizeof(p), "%s/backends", env->dir);
        rmdir(p);
        rmdir(env->dir);
        free(env);
}

int main(int argc, char **argv) {
        unsigned count = 0;

        env_get();
        atexit(env_cleanup);

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
        return 0;
}
#endif
