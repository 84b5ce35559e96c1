/* SPDX-License-Identifier: MIT */
/* The control API's "JSON line + fd FIFO" framing: see vhub-frame.h. */
#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "vhub-frame.h"
#include "vhu-fd.h"
#include "vhu-scm.h"

#define IN_BUF_MIN   4096u
#define IN_BUF_KEEP  (64u * 1024u)      /* shrink back below this when idle */
#define IN_FDS_MIN   16u
#define OUT_CHUNK    (16u * 1024u)      /* lines without fds share chunks this big */
#define OUT_IOV_MAX  64

/* ---- in ---- */

void vhub_frame_in_init(struct vhub_frame_in *f, size_t max_line, unsigned max_fds) {
        *f = (struct vhub_frame_in){ .max_line = max_line, .max_fds = max_fds };
}

void vhub_frame_in_drop_fds(struct vhub_frame_in *f) {
        if (f->fds)
                vhu_close_many(f->fds + f->fd_head, f->n_fds);
        f->fd_head = 0;
        f->n_fds = 0;
}

void vhub_frame_in_done(struct vhub_frame_in *f) {
        vhub_frame_in_drop_fds(f);
        free(f->fds);
        free(f->buf);
        vhub_frame_in_init(f, f->max_line, f->max_fds);
}

void vhub_frame_in_foreach_fd(const struct vhub_frame_in *f, vhub_frame_fd_fn fn, void *userdata) {
        for (unsigned i = 0; i < f->n_fds; i++)
                fn(f->fds[f->fd_head + i], "in", userdata);
}

unsigned vhub_frame_in_queued_fds(const struct vhub_frame_in *f) {
        return f->n_fds;
}

size_t vhub_frame_in_pending_bytes(const struct vhub_frame_in *f) {
        return f->len - f->start;
}

size_t vhub_frame_in_partial_bytes(const struct vhub_frame_in *f) {
        /* no '\n' in [start, scanned): only the rest is searched, which
         * is nothing once vhub_frame_in_next_line() found no line */
        size_t from = f->scanned > f->start ? f->scanned : f->start;
        const char *nl = f->len > from ? memrchr(f->buf + from, '\n', f->len - from) : NULL;

        return nl ? f->len - (size_t)(nl - f->buf) - 1 : f->len - f->start;
}

size_t vhub_frame_in_buffer_size(const struct vhub_frame_in *f) {
        return f->cap;
}

/* Room for one more read: the unread tail moves to the front, the buffer
 * grows towards max_line + 1 (one line and its '\n') when little is left,
 * and shrinks back when idle.  0, or -ENOMEM with no room at all. */
static int in_make_room(struct vhub_frame_in *f) {
        size_t hard = f->max_line + 1, want = f->cap;
        char *p;

        if (f->start > 0) {
                memmove(f->buf, f->buf + f->start, f->len - f->start);
                f->len -= f->start;
                f->scanned -= f->start;
                f->start = 0;
        }
        if (f->len == 0 && f->cap > IN_BUF_KEEP)
                want = IN_BUF_MIN;
        else if (f->cap - f->len < IN_BUF_MIN && f->cap < hard)
                want = f->cap ? f->cap * 2 : IN_BUF_MIN;
        if (want > hard)
                want = hard;
        if (want == f->cap && f->buf)
                return 0;
        p = realloc(f->buf, want);
        if (!p)
                return f->cap > f->len ? 0 : -ENOMEM;
        f->buf = p;
        f->cap = want;
        return 0;
}

/* Room in the FIFO for the most one recvmsg() can bring that the bound
 * still allows; returns that room (0: the FIFO is full). */
static int in_fds_reserve(struct vhub_frame_in *f, unsigned *ret_room) {
        unsigned room = f->max_fds - f->n_fds, cap;
        int *p;

        if (room > VHU_SCM_MAX_FDS)
                room = VHU_SCM_MAX_FDS;
        *ret_room = room;
        if (f->fd_head > 0 && f->fd_head + f->n_fds + room > f->fd_cap) {
                memmove(f->fds, f->fds + f->fd_head, f->n_fds * sizeof(int));
                f->fd_head = 0;
        }
        if (f->n_fds + room <= f->fd_cap)
                return 0;
        cap = f->fd_cap ? f->fd_cap : IN_FDS_MIN;
        while (cap < f->n_fds + room)
                cap *= 2;
        if (cap > f->max_fds)
                cap = f->max_fds;
        p = realloc(f->fds, cap * sizeof(int));
        if (!p)
                return -ENOMEM;
        f->fds = p;
        f->fd_cap = cap;
        return 0;
}

ssize_t vhub_frame_in_read(struct vhub_frame_in *f, int sockfd, unsigned *ret_fds) {
        struct vhu_scm_received got;
        struct iovec iov;
        unsigned room;
        ssize_t n;
        int r;

        if (ret_fds)
                *ret_fds = 0;
        r = in_make_room(f);
        if (r < 0)
                return r;
        if (f->len == f->cap)
                return -EMSGSIZE; /* a whole max_line without its '\n' */
        r = in_fds_reserve(f, &room);
        if (r < 0)
                return r;
        iov = (struct iovec){ f->buf + f->len, f->cap - f->len };
        n = vhu_scm_recv(sockfd, &iov, 1, VHU_SCM_MAX_FDS, f->fds ? f->fds + f->fd_head + f->n_fds : NULL,
                         f->fds ? room : 0, &got);
        /* every fd that came is queued or closed, whatever else happened */
        f->n_fds += got.n_fds;
        if (ret_fds)
                *ret_fds = got.n_fds;
        if (n < 0)
                return n;
        if (got.n_closed > 0)
                return -ENOBUFS;
        if (got.truncated)
                return -EPROTO;
        f->len += (size_t)n;
        return n;
}

int vhub_frame_in_push(struct vhub_frame_in *f, const void *p, size_t n) {
        while (n > 0) {
                size_t k;
                int r = in_make_room(f);

                if (r < 0)
                        return r;
                if (f->len == f->cap)
                        return -EMSGSIZE;
                k = f->cap - f->len < n ? f->cap - f->len : n;
                memcpy(f->buf + f->len, p, k);
                f->len += k;
                p = (const char *)p + k;
                n -= k;
        }
        return 0;
}

const char *vhub_frame_in_pending(const struct vhub_frame_in *f) {
        return f->buf ? f->buf + f->start : "";
}

int vhub_frame_in_next_line(struct vhub_frame_in *f, const char **ret_line, size_t *ret_len) {
        char *nl;

        if (f->scanned < f->start)
                f->scanned = f->start;
        nl = f->len > f->scanned ? memchr(f->buf + f->scanned, '\n', f->len - f->scanned) : NULL;
        if (!nl) {
                f->scanned = f->len;
                return 0;
        }
        *ret_line = f->buf + f->start;
        *ret_len = (size_t)(nl - (f->buf + f->start));
        f->start = (size_t)(nl - f->buf) + 1;
        f->scanned = f->start;
        return 1;
}

int vhub_frame_in_take_fds(struct vhub_frame_in *f, unsigned n, int **ret_fds) {
        int *fds;

        if (n > f->n_fds)
                return -EBADMSG;
        if (n == 0) {
                *ret_fds = NULL;
                return 0;
        }
        fds = malloc(sizeof(int) * n);
        if (!fds)
                return -ENOMEM;
        memcpy(fds, f->fds + f->fd_head, sizeof(int) * n);
        f->fd_head += n;
        f->n_fds -= n;
        if (f->n_fds == 0)
                f->fd_head = 0;
        *ret_fds = fds;
        return 0;
}

int vhub_frame_in_check(const struct vhub_frame_in *f) {
        size_t partial = f->len - f->start;

        if (partial > f->max_line)
                return -EMSGSIZE;
        if (partial == 0 && f->n_fds > 0)
                return -EBADMSG;
        return 0;
}

/* ---- out ---- */

struct vhub_frame_chunk {
        struct vhub_frame_chunk *next;
        uint64_t first_seq, last_seq;   /* the lines it holds */
        int *fds;                       /* dups, closed once the first byte is out */
        unsigned n_fds;
        size_t len, cap, off;           /* bytes held, room, bytes written */
        char data[];
};

void vhub_frame_out_init(struct vhub_frame_out *o, bool coalesce) {
        *o = (struct vhub_frame_out){ .next_seq = 1, .coalesce = coalesce };
}

static void chunk_close_fds(struct vhub_frame_out *o, struct vhub_frame_chunk *k) {
        if (k->n_fds == 0)
                return;
        vhu_close_many(k->fds, k->n_fds);
        free(k->fds);
        k->fds = NULL;
        o->n_fds -= k->n_fds;
        k->n_fds = 0;
}

static void chunk_free(struct vhub_frame_out *o, struct vhub_frame_chunk *k) {
        chunk_close_fds(o, k);
        o->bytes -= k->len - k->off;
        free(k);
}

void vhub_frame_out_done(struct vhub_frame_out *o) {
        while (o->head) {
                struct vhub_frame_chunk *k = o->head;

                o->head = k->next;
                chunk_free(o, k);
        }
        o->tail = NULL;
}

bool vhub_frame_out_pending(const struct vhub_frame_out *o) {
        return o->head != NULL;
}

void vhub_frame_out_foreach_fd(const struct vhub_frame_out *o, vhub_frame_fd_fn fn, void *userdata) {
        for (const struct vhub_frame_chunk *k = o->head; k; k = k->next)
                for (unsigned i = 0; i < k->n_fds; i++)
                        fn(k->fds[i], "out", userdata);
}

struct encode_buf {
        char *p;
        size_t len, cap;
        bool oom;
};

static int encode_cb(const char *buf, size_t size, void *userdata) {
        struct encode_buf *b = userdata;

        if (size > b->cap - b->len) {
                size_t cap = b->cap ? b->cap : 256;
                char *p;

                while (size > cap - b->len) {
                        if (cap > SIZE_MAX / 2) {
                                b->oom = true;
                                return -1;
                        }
                        cap *= 2;
                }
                p = realloc(b->p, cap);
                if (!p) {
                        b->oom = true;
                        return -1;
                }
                b->p = p;
                b->cap = cap;
        }
        memcpy(b->p + b->len, buf, size);
        b->len += size;
        return 0;
}

int vhub_frame_encode(const json_t *msg, char **ret_line, size_t *ret_len) {
        struct encode_buf b = { 0 };

        if (!msg)
                return -EINVAL;
        if (json_dump_callback(msg, encode_cb, &b, JSON_COMPACT | JSON_ENCODE_ANY) < 0 || b.len == 0) {
                free(b.p);
                return b.oom ? -ENOMEM : -EINVAL;
        }
        *ret_line = b.p;
        *ret_len = b.len;
        return 0;
}

/* Our own copies: the line may leave after the caller closed theirs. */
static int dup_fds(const int *fds, unsigned n, int **ret) {
        int *dups;

        *ret = NULL;
        if (n == 0)
                return 0;
        dups = malloc(n * sizeof(int));
        if (!dups)
                return -ENOMEM;
        for (unsigned i = 0; i < n; i++) {
                dups[i] = fds[i] < 0 ? -1 : fcntl(fds[i], F_DUPFD_CLOEXEC, 3);
                if (dups[i] < 0) {
                        int r = fds[i] < 0 || errno == EBADF ? -EBADF : -errno;

                        vhu_close_many(dups, i);
                        free(dups);
                        return r;
                }
        }
        *ret = dups;
        return 0;
}

int vhub_frame_out_queue(struct vhub_frame_out *o, const struct iovec *parts, unsigned n_parts,
                         const int *fds, unsigned n_fds, uint64_t *ret_seq) {
        struct vhub_frame_chunk *t = o->tail, *k = NULL;
        size_t len = 1, cap;
        int *dups = NULL;
        char *room;
        int r;

        if ((n_parts > 0 && !parts) || (n_fds > 0 && !fds) || n_fds > VHUB_FRAME_MAX_FDS)
                return -EINVAL;
        for (unsigned i = 0; i < n_parts; i++) {
                if (parts[i].iov_len > SIZE_MAX / 2 - len)
                        return -EINVAL;
                len += parts[i].iov_len;
        }
        r = dup_fds(fds, n_fds, &dups);
        if (r < 0)
                return r;
        /* a small line without fds joins the tail's spare room; anything
         * else gets a chunk of its own (fds ride on its first byte): a
         * chunk with room for more behind other lines, exactly its size
         * when it is queued alone -- the usual answer, freed as soon as it
         * is written, stays a small allocation instead of a 16 KiB one
         * (large requests send glibc's malloc into its slow paths) */
        if (o->coalesce && n_fds == 0 && len <= OUT_CHUNK / 2 && t && t->n_fds == 0 && t->cap - t->len >= len) {
                room = t->data + t->len;
        } else {
                cap = o->coalesce && n_fds == 0 && len <= OUT_CHUNK / 2 && t ? OUT_CHUNK : len;
                k = malloc(sizeof(*k) + cap);
                if (!k) {
                        if (dups)
                                vhu_close_many(dups, n_fds);
                        free(dups);
                        return -ENOMEM;
                }
                *k = (struct vhub_frame_chunk){ .cap = cap, .fds = dups, .n_fds = n_fds,
                                                .first_seq = o->next_seq };
                room = k->data;
        }
        for (unsigned i = 0; i < n_parts; i++) {
                memcpy(room, parts[i].iov_base, parts[i].iov_len);
                room += parts[i].iov_len;
        }
        *room = '\n';
        if (k) {
                if (t)
                        t->next = k;
                else
                        o->head = k;
                o->tail = t = k;
                o->n_fds += n_fds;
        }
        t->len += len;
        t->last_seq = o->next_seq;
        o->bytes += len;
        if (ret_seq)
                *ret_seq = o->next_seq;
        o->next_seq++;
        return 0;
}

/* n bytes went out from the head on. */
static void out_consume(struct vhub_frame_out *o, size_t n) {
        while (n > 0 && o->head) {
                struct vhub_frame_chunk *k = o->head;
                size_t left = k->len - k->off;

                /* the first byte is out: its fds went with it */
                chunk_close_fds(o, k);
                if (n < left) {
                        k->off += n;
                        o->bytes -= n;
                        return;
                }
                n -= left;
                o->head = k->next;
                if (!o->head)
                        o->tail = NULL;
                o->sent_seq = k->last_seq;
                chunk_free(o, k);
        }
}

int vhub_frame_out_flush(struct vhub_frame_out *o, int sockfd) {
        while (o->head) {
                VHU_SCM_BUF(control, VHUB_FRAME_MAX_FDS);
                struct iovec iov[OUT_IOV_MAX];
                struct msghdr mh = { .msg_iov = iov };
                struct vhub_frame_chunk *k = o->head;
                int iovcnt = 0;
                ssize_t n;

                /* fds only ever ride with their line's first byte */
                vhu_scm_attach(&mh, control.buf, sizeof(control.buf), k->fds, k->n_fds);
                iov[iovcnt++] = (struct iovec){ k->data + k->off, k->len - k->off };
                /* later chunks may join this sendmsg() unless they carry fds */
                for (k = k->next; k && k->n_fds == 0 && iovcnt < OUT_IOV_MAX; k = k->next)
                        iov[iovcnt++] = (struct iovec){ k->data, k->len };
                mh.msg_iovlen = (size_t)iovcnt;

                n = sendmsg(sockfd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK)
                                return 1;
                        return -errno;
                }
                out_consume(o, (size_t)n);
        }
        return 0;
}

ssize_t vhub_frame_out_unsent(const struct vhub_frame_out *o, char **ret) {
        size_t n = 0;
        char *p;

        *ret = NULL;
        if (o->n_fds > 0)
                return -EBUSY;
        if (o->bytes == 0)
                return 0;
        if (o->bytes > SSIZE_MAX || !(p = malloc(o->bytes)))
                return -ENOMEM;
        for (const struct vhub_frame_chunk *k = o->head; k; k = k->next) {
                memcpy(p + n, k->data + k->off, k->len - k->off);
                n += k->len - k->off;
        }
        *ret = p;
        return (ssize_t)n;
}

int vhub_frame_out_queue_raw(struct vhub_frame_out *o, const void *p, size_t n) {
        struct vhub_frame_chunk *k;

        if (n == 0 || !p)
                return n == 0 ? 0 : -EINVAL;
        if (n > SIZE_MAX / 2)
                return -EINVAL;
        k = malloc(sizeof(*k) + n);
        if (!k)
                return -ENOMEM;
        /* one "line" for the numbering: never dropped (its numbers are
         * taken before any line queued after it) */
        *k = (struct vhub_frame_chunk){ .cap = n, .len = n, .first_seq = o->next_seq, .last_seq = o->next_seq };
        memcpy(k->data, p, n);
        o->next_seq++;
        if (o->tail)
                o->tail->next = k;
        else
                o->head = k;
        o->tail = k;
        o->bytes += n;
        return 0;
}

int vhub_frame_out_drop(struct vhub_frame_out *o, uint64_t seq) {
        struct vhub_frame_chunk *prev = NULL, *k = o->head;

        if (seq <= o->sent_seq)
                return -ENOENT;
        /* chunks hold ascending numbers: the one that could hold seq */
        while (k && k->last_seq < seq) {
                prev = k;
                k = k->next;
        }
        if (!k || k->first_seq > seq)
                return -ENOENT;
        if (k->off > 0 || k->first_seq != k->last_seq)
                return -EBUSY;
        *(prev ? &prev->next : &o->head) = k->next;
        if (o->tail == k)
                o->tail = prev;
        chunk_free(o, k);
        return 0;
}
