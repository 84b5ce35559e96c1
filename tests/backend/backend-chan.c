/* SPDX-License-Identifier: MIT */
/*
 * The back-end channel (SET_BACKEND_REQ_FD): requests we send to the
 * front-end on command, and its replies, matched in order and reported to
 * the control client that asked.  Nothing here blocks: a reply may take as
 * long as the front-end likes, up to the request's deadline.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"

#define TB_CHAN_DEFAULT_TIMEOUT_MS 5000

static void pending_answer(struct tb_chan_pending *p, json_t *answer) {
        if (p->client >= 0)
                tb_control_answer(p->client, p->client_gen, answer);
        else
                json_decref(answer);
        p->client = -1;
}

static void pending_pop(struct tb_conn *c) {
        free(c->chan_pending[0].write_data);
        memmove(&c->chan_pending[0], &c->chan_pending[1],
                (c->chan_n_pending - 1) * sizeof(c->chan_pending[0]));
        c->chan_n_pending--;
}

void tb_chan_close(struct tb_conn *c) {
        while (c->chan_n_pending > 0) {
                pending_answer(&c->chan_pending[0], tb_error_answer("back-end channel closed"));
                pending_pop(c);
        }
        vhu_reader_reset(&c->chan_reader);
        vhu_writer_clear(&c->chan_writer);
        if (c->chan_fd >= 0)
                close(c->chan_fd);
        c->chan_fd = -1;
}

void tb_chan_set(struct tb_conn *c, int fd) {
        tb_chan_close(c);
        c->chan_fd = fd;
        if (fd >= 0)
                (void) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

void tb_chan_flush(struct tb_conn *c) {
        if (c->chan_fd < 0 || !vhu_writer_pending(&c->chan_writer))
                return;
        int r = vhu_writer_flush(&c->chan_writer, c->chan_fd);
        if (r < 0 && r != -EAGAIN) {
                tb_warn("sock%u: back-end channel write: %s", c->sock->index, strerror(-r));
                tb_chan_close(c);
        }
}

int tb_chan_send(struct tb_conn *c, uint32_t request, bool need_reply, const void *payload,
                 uint32_t size, const int *fds, unsigned n_fds,
                 const struct tb_chan_pending *how) {
        struct vhu_msg m;
        uint32_t flags = VHU_VERSION | (need_reply ? VHU_FLAG_NEED_REPLY : 0);
        bool expects;
        int r;

        if (c->chan_fd < 0)
                return -ENOTCONN;
        expects = vhu_request_expects_reply(VHU_DIR_BACKEND, request, flags, c->protocol_features);
        if (expects && c->chan_n_pending >= TB_MAX_CHAN_PENDING)
                return -EBUSY;
        if (c->chan_writer.n_bytes > TB_MAX_WRITER_BYTES)
                return -ENOBUFS;
        r = vhu_msg_build(&m, VHU_DIR_BACKEND, request, need_reply, payload, size, fds, n_fds);
        if (r < 0)
                return r;
        r = vhu_writer_queue(&c->chan_writer, &m);
        vhu_msg_forget_fds(&m);
        if (r < 0)
                return r;
        c->chan_sent++;
        c->sock->backend_requests++;
        tb_debug("sock%u: chan -> %s flags 0x%x", c->sock->index,
                 vhu_request_name(VHU_DIR_BACKEND, request), flags);
        tb_chan_flush(c);
        if (c->chan_fd < 0)
                return -EPIPE;
        if (!expects)
                return 0;

        struct tb_chan_pending *p = &c->chan_pending[c->chan_n_pending++];
        if (how)
                *p = *how;
        else
                *p = (struct tb_chan_pending) { .client = -1 };
        p->request = request;
        p->flags = flags;
        if (!p->deadline_ms)
                p->deadline_ms = tb_now_ms() + TB_CHAN_DEFAULT_TIMEOUT_MS;
        if (how && how->write_data) {
                /* the copy owns its own buffer */
                p->write_data = malloc(how->write_len);
                if (p->write_data)
                        memcpy(p->write_data, how->write_data, how->write_len);
                else
                        p->write_len = 0;
        }
        return 1;
}

static char *hex_of(const uint8_t *b, size_t n) {
        char *s = malloc(n * 2 + 1);
        if (!s)
                return NULL;
        for (size_t i = 0; i < n; i++)
                sprintf(s + 2 * i, "%02x", b[i]);
        s[n * 2] = 0;
        return s;
}

/* SHARED_OBJECT_LOOKUP's answer: what the fd holds, and optionally prove the
 * mapping is shared by writing through it. */
static json_t *lookup_report(const struct tb_chan_pending *p, struct vhu_msg *reply) {
        json_t *o = json_pack("{s:b,s:s,s:I,s:b}", "ok", 1, "uuid", p->uuid,
                              "result", (json_int_t) reply->payload.u64, "fd", reply->n_fds > 0);
        struct stat st;

        if (reply->n_fds == 0 || !o)
                return o;
        int fd = reply->fds[0];
        if (fstat(fd, &st) < 0) {
                json_object_set_new(o, "map_error", json_string("fstat failed"));
                return o;
        }
        json_object_set_new(o, "size", json_integer(st.st_size));
        if (st.st_size <= 0)
                return o;
        bool writable = true;
        uint8_t *map = mmap(NULL, (size_t) st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) {
                writable = false;
                map = mmap(NULL, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        }
        if (map == MAP_FAILED) {
                json_object_set_new(o, "map_error", json_string(strerror(errno)));
                return o;
        }
        size_t n = p->read_len < (size_t) st.st_size ? p->read_len : (size_t) st.st_size;
        char *hex = hex_of(map, n);
        json_object_set_new(o, "data", json_string(hex ? hex : ""));
        free(hex);
        if (p->write_len > 0) {
                if (p->write_offset <= (uint64_t) st.st_size &&
                    p->write_len <= (uint64_t) st.st_size - p->write_offset) {
                        if (writable) {
                                memcpy(map + p->write_offset, p->write_data, p->write_len);
                                json_object_set_new(o, "wrote", json_integer((json_int_t) p->write_len));
                        } else
                                json_object_set_new(o, "write_error", json_string("fd is not writable"));
                } else
                        json_object_set_new(o, "write_error", json_string("write beyond the object"));
        }
        munmap(map, (size_t) st.st_size);
        return o;
}

static void chan_reply(struct tb_conn *c, struct vhu_msg *reply) {
        const char *why = NULL;

        if (c->chan_n_pending == 0) {
                c->chan_unexpected++;
                tb_warn("sock%u: unexpected message on the back-end channel (request %u flags 0x%x)",
                        c->sock->index, reply->hdr.request, reply->hdr.flags);
                return;
        }
        struct tb_chan_pending *p = &c->chan_pending[0];
        c->chan_replies++;
        if (vhu_validate_reply(VHU_DIR_BACKEND, p->request, p->flags, c->protocol_features,
                               reply, &why) < 0)
                pending_answer(p, tb_error_answer("invalid reply to %s: %s",
                                                  vhu_request_name(VHU_DIR_BACKEND, p->request), why));
        else if (p->kind == TB_CHAN_LOOKUP)
                pending_answer(p, lookup_report(p, reply));
        else {
                json_t *a = json_pack("{s:b,s:s,s:I}", "ok", 1, "request",
                                      vhu_request_name(VHU_DIR_BACKEND, p->request),
                                      "reply", (json_int_t) reply->payload.u64);
                if (a && p->uuid[0])
                        json_object_set_new(a, "uuid", json_string(p->uuid));
                pending_answer(p, a);
        }
        pending_pop(c);
}

void tb_chan_on_readable(struct tb_conn *c) {
        struct vhu_msg *m = malloc(sizeof(*m));
        if (!m)
                return;
        vhu_msg_init(m);
        while (c->chan_fd >= 0) {
                int r = vhu_reader_read(&c->chan_reader, c->chan_fd, m);
                if (r == -EAGAIN)
                        break;
                if (r <= 0) {
                        tb_info("sock%u: back-end channel closed by the front-end (%s)",
                                c->sock->index, r == 0 ? "EOF" : strerror(-r));
                        tb_chan_close(c);
                        break;
                }
                chan_reply(c, m);
                vhu_msg_clear(m);
        }
        vhu_msg_clear(m);
        free(m);
}

void tb_chan_on_timer(struct tb_conn *c, uint64_t now) {
        for (unsigned i = 0; i < c->chan_n_pending; i++) {
                struct tb_chan_pending *p = &c->chan_pending[i];
                /* stays queued: a late reply still has to be matched */
                if (p->client >= 0 && p->deadline_ms <= now)
                        pending_answer(p, tb_error_answer("timeout waiting for the reply to %s",
                                                          vhu_request_name(VHU_DIR_BACKEND,
                                                                           p->request)));
        }
}

uint64_t tb_chan_next_deadline(const struct tb_conn *c) {
        uint64_t d = UINT64_MAX;
        for (unsigned i = 0; i < c->chan_n_pending; i++)
                if (c->chan_pending[i].client >= 0 && c->chan_pending[i].deadline_ms < d)
                        d = c->chan_pending[i].deadline_ms;
        return d;
}

int tb_chan_flood(struct tb_conn *c, bool garbage, unsigned count, uint64_t *ret_bytes) {
        uint64_t bytes = 0;

        if (c->chan_fd < 0)
                return -ENOTCONN;
        if (!garbage) {
                for (unsigned i = 0; i < count; i++) {
                        int r = tb_chan_send(c, VHU_BREQ_CONFIG_CHANGE_MSG, false, NULL, 0, NULL, 0, NULL);
                        if (r < 0) {
                                *ret_bytes = bytes;
                                return i > 0 ? (int) i : r;
                        }
                        bytes += VHU_HEADER_SIZE;
                }
                *ret_bytes = bytes;
                return (int) count;
        }
        /* Garbage goes straight to the socket: as much as it takes now. */
        uint8_t buf[4096];
        for (unsigned i = 0; i < count; i++) {
                for (size_t k = 0; k < sizeof(buf); k += 8) {
                        uint64_t v = tb_random();
                        memcpy(buf + k, &v, 8);
                }
                ssize_t n = send(c->chan_fd, buf, sizeof(buf), MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0)
                        break;
                bytes += (uint64_t) n;
        }
        *ret_bytes = bytes;
        return (int) count;
}
