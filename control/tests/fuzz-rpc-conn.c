/* SPDX-License-Identifier: MIT */
/*
 * Fuzz target for the rpc-conn framing layer: the input is cut into chunks
 * that the peer end of a socketpair sends, some with memfds attached; the
 * connection answers every message with one of the fds it got.
 *
 * Input: repeated [header byte h][chunk]; chunk length is (h >> 2) + 1,
 * h & 3 memfds ride with it.
 *
 * Built with -fsanitize=fuzzer (and -DRPC_FUZZ_LIBFUZZER) this is a libFuzzer
 * target; otherwise main() replays a fixed set of seeds and their
 * pseudo-random mutations, then every file named on the command line or
 * inside a directory named there (the committed corpus, corpus-rpc-conn/).
 */
#include "rpc-conn.h"
#include "vhu-scm.h"
#include "vhub-check.h"

#include <dirent.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static unsigned long total_messages, total_inputs;

struct fuzz_state {
        struct rpc_conn *conn;
        unsigned n_close;
        bool in_message;
};

static void on_message(struct rpc_conn *c, json_t *msg, struct rpc_fds *fds, void *userdata) {
        struct fuzz_state *s = userdata;
        json_t *reply;
        int fd = rpc_fds_take(fds, 0);

        CHECK(!s->in_message && s->n_close == 0);
        s->in_message = true;
        total_messages++;
        reply = json_pack("{s:s, s:O?, s:O, s:i}", "jsonrpc", "2.0", "id",
                          json_is_object(msg) ? json_object_get(msg, "id") : NULL,
                          "result", msg, "fds", fd >= 0 ? 1 : 0);
        if (reply)
                (void) rpc_conn_send(c, reply, &fd, fd >= 0 ? 1 : 0);
        json_decref(reply);
        if (fd >= 0)
                close(fd);
        json_decref(msg);
        rpc_fds_clear(fds);
        s->in_message = false;
}

static void on_close(struct rpc_conn *c, const char *reason, void *userdata) {
        struct fuzz_state *s = userdata;

        CHECK(!s->in_message);
        CHECK(++s->n_close == 1);
        CHECK(reason && *reason);
        s->conn = rpc_conn_free(c);
}

static const struct rpc_conn_ops fuzz_ops = {
        .on_message = on_message,
        .on_close = on_close,
};

static void drain_peer(int peer) {
        VHU_SCM_BUF(control, RPC_MAX_FDS_PER_MESSAGE);
        char buf[4096];

        for (;;) {
                struct iovec iov = { buf, sizeof(buf) };
                struct msghdr mh = {
                        .msg_iov = &iov, .msg_iovlen = 1,
                        .msg_control = control.buf, .msg_controllen = sizeof(control.buf),
                };
                ssize_t n = recvmsg(peer, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);

                if (n <= 0)
                        return;
                for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
                        for (size_t i = 0; i < (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                                int fd;

                                memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(fd));
                                close(fd);
                        }
        }
}

static void pump(struct event_base *base, int peer) {
        for (int i = 0; i < 4; i++) {
                event_base_loop(base, EVLOOP_NONBLOCK);
                drain_peer(peer);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        struct rpc_conn_limits limits;
        struct fuzz_state s = { 0 };
        int start = vhub_count_open_fds();
        struct event_base *base = event_base_new();
        int sv[2];

        total_inputs++;
        CHECK(base);
        CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
        rpc_conn_limits_default(&limits);
        limits.max_line = 512;          /* reachable by small inputs */
        limits.max_out_bytes = 64 * 1024;
        limits.max_fds_queued = 8;
        CHECK(rpc_conn_new(base, sv[0], &limits, &fuzz_ops, &s, &s.conn) == 0);

        while (size > 0 && s.conn) {
                VHU_SCM_BUF(control, 3);
                unsigned h = *data++, n_fds = h & 3;
                size_t len = (h >> 2) + 1;
                struct iovec iov;
                struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
                int fds[3];

                size--;
                if (len > size)
                        len = size;
                if (len == 0)
                        break;
                iov = (struct iovec) { (void *) data, len };
                for (unsigned i = 0; i < n_fds; i++) {
                        fds[i] = memfd_create("fuzz", MFD_CLOEXEC);
                        CHECK(fds[i] >= 0);
                }
                vhu_scm_attach(&mh, control.buf, sizeof(control.buf), fds, n_fds);
                /* a closed connection may refuse the rest: that is fine */
                (void) sendmsg(sv[1], &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                for (unsigned i = 0; i < n_fds; i++)
                        close(fds[i]);
                data += len;
                size -= len;
                pump(base, sv[1]);
        }

        close(sv[1]);
        for (int i = 0; i < 16 && s.conn; i++)
                pump(base, -1);
        CHECK(s.conn == NULL && s.n_close == 1);   /* peer gone: on_close ran */
        event_base_free(base);
        CHECK(vhub_count_open_fds() == start);
        return 0;
}

#ifndef RPC_FUZZ_LIBFUZZER
static const struct {
        const char *text;
        unsigned fds;           /* sent with the first chunk */
} seeds[] = {
        { "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"daemon.info\"}\n", 0 },
        { "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"vm.memory.add\",\"fds\":1,"
          "\"params\":{\"fd\":0}}\n", 1 },
        { "[{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"m\",\"fds\":2},{\"id\":4},5]\n", 2 },
        { "\n\n{\"fds\":3}\n{bad\n42\n", 3 },
        { "{\"fds\":-1}\n{\"fds\":1e9}\n", 0 },
        { "{\"a\":1}\n{\"b\":2}\n{\"c\":\"x\\ny\"}\n[]\n", 0 },
};

static void replay_file(const char *path) {
        FILE *f = fopen(path, "re");
        static uint8_t buf[1 << 20];
        size_t n;

        CHECK(f);
        n = fread(buf, 1, sizeof(buf), f);
        fclose(f);
        LLVMFuzzerTestOneInput(buf, n);
}

/* A file, or every regular file in a directory; the number replayed. */
static unsigned replay_path(const char *path) {
        unsigned count = 0;
        struct dirent *de;
        DIR *d = opendir(path);

        if (!d) {
                replay_file(path);
                return 1;
        }
        while ((de = readdir(d))) {
                char file[4096];

                if (de->d_name[0] == '.')
                        continue;
                snprintf(file, sizeof(file), "%s/%s", path, de->d_name);
                replay_file(file);
                count++;
        }
        closedir(d);
        return count;
}

/* Seeds, several per input, cut into chunks (the first chunk of each seed
 * carrying its fds), then up to 7 byte-level mutations. */
static void replay_builtin(void) {
        uint8_t in[4096];

        srand(1);
        for (unsigned round = 0; round < 2000; round++) {
                size_t n = 0;

                for (unsigned k = 0; k < 1 + (unsigned) rand() % 4; k++) {
                        unsigned which = (unsigned) rand() % (sizeof(seeds) / sizeof(seeds[0]));
                        const char *seed = seeds[which].text;
                        size_t sl = strlen(seed), off = 0;

                        while (off < sl && n < sizeof(in) - 70) {
                                size_t len = 1 + (size_t) rand() % 64;

                                if (len > sl - off)
                                        len = sl - off;
                                in[n++] = (uint8_t) (((len - 1) << 2) |
                                                     (off ? 0 : seeds[which].fds));
                                memcpy(in + n, seed + off, len);
                                n += len;
                                off += len;
                        }
                }
                for (unsigned m = round % 8; m > 0 && n > 0; m--)
                        in[(size_t) rand() % n] = (uint8_t) rand();
                LLVMFuzzerTestOneInput(in, n);
        }
}

int main(int argc, char **argv) {
        unsigned from_files = 0;

        replay_builtin();
        for (int i = 1; i < argc; i++)
                from_files += replay_path(argv[i]);
        fprintf(stderr, "fuzz-rpc-conn: %lu inputs (%u from files), %lu messages delivered\n",
                total_inputs, from_files, total_messages);
        /* a corpus named but empty (a wrong path) must not pass silently */
        return argc > 1 && from_files == 0 ? 1 : 0;
}
#endif
