/*
 * trio-tproxy's compiled data path for established connections: the loop of
 * one relay direction, run until it has to wait.  See trio_tproxy/fastpath.py
 * for the design; this file is plain C on purpose (no Python.h): it is built
 * at install time when a C compiler is there and loaded with cffi's ABI mode.
 *
 * OpenSSL is never linked here.  The three OpenSSL functions come as pointers
 * taken from pyOpenSSL's own bindings (struct tt_ossl), so every SSL* is
 * driven by the very OpenSSL that created it (cryptography's), never by the
 * system's libssl.
 *
 * A call returns one of the TT_* codes: what to wait for, "yield" (the byte
 * budget is spent: let other tasks run), or how the direction ended.  Bytes
 * read but not yet written whole stay in p->pend; they may point into the
 * shared scratch buffer, which the caller copies out before anything else
 * runs.  Failures leave the error queue alone and record what pyOpenSSL needs
 * to raise the same exception the pure-Python path would (ret, errno).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

typedef int (*tt_ssl_io)(void *ssl, void *buf, int num);
typedef int (*tt_ssl_get_error)(const void *ssl, int ret);

typedef unsigned long (*tt_err_get)(void);
typedef void (*tt_err_put)(int lib, int func, int reason, const char *file, int line);

struct tt_ossl {
    tt_ssl_io read;
    tt_ssl_io write;
    tt_ssl_get_error get_error;
    tt_err_get err_get;  /* ERR_get_error */
    tt_err_put err_put;  /* ERR_put_error */
};

struct tt_pipe {
    char *scratch;       /* where reads land (the caller's, shared by its pipes) */
    int cap;             /* its size */
    char *pend;          /* bytes read, not yet written */
    int plen;
    long long moved;     /* bytes written to the destination, in all */
    int after_flush;     /* once pend is empty: 0 = read on, else return this code */
    int ret;             /* a failure: the OpenSSL call's return value ... */
    int err;             /* ... and errno right after it (or the syscall's errno) */
    int done;            /* the direction's end (EOF, failure): every later call returns it */
    char *own;           /* pending bytes live here between calls, never in scratch */
    int own_cap;
    int nerr;            /* OpenSSL's error queue at the failure: it is per thread, */
    unsigned long errs[8]; /* so it travels with the pipe (tt_pipe_restore_errors) */
};

enum {
    TT_SRC_READABLE = 1, /* wait until the source fd is readable, call again */
    TT_SRC_WRITABLE = 2, /* TLS source: OpenSSL must write before it can read */
    TT_DST_READABLE = 3, /* TLS destination: OpenSSL must read before it can write */
    TT_DST_WRITABLE = 4,
    TT_YIELD = 5,        /* budget spent: checkpoint, call again */
    TT_SRC_EOF = 6,      /* the source ended cleanly (FIN, close_notify) */
    TT_SRC_FAILED = 7,   /* ret/err say why */
    TT_DST_FAILED = 8,
};

/* SSL_ERROR_* (stable since OpenSSL 0.9) */
enum { WANT_READ = 2, WANT_WRITE = 3, ZERO_RETURN = 6 };

static int is_again(int e) { return e == EAGAIN || e == EWOULDBLOCK; }

static int is_end(int code) { return code >= TT_SRC_EOF; }

/* An OpenSSL call failed: keep its error queue with the pipe. */
static void take_errors(const struct tt_ossl *o, struct tt_pipe *p)
{
    unsigned long e;
    p->nerr = 0;
    while ((e = o->err_get()) != 0)
        if (p->nerr < 8) p->errs[p->nerr++] = e;
}

/* In the thread that will raise the error: put the queue back as it was.
   OpenSSL 3 packs a code as lib << 23 | reason, or flags a system error. */
void tt_pipe_restore_errors(const struct tt_ossl *o, const struct tt_pipe *p)
{
    for (int i = 0; i < p->nerr; i++) {
        unsigned long e = p->errs[i];
        if (e & 0x80000000UL) o->err_put(2 /* ERR_LIB_SYS */, 0, (int)(e & 0x7FFFFFFFUL), "fastpath", 0);
        else o->err_put((int)((e >> 23) & 0xFF), 0, (int)(e & 0x7FFFFF), "fastpath", 0);
    }
}

/* Every return goes through here: pending bytes move out of the scratch buffer
   (which the caller's next pipe reuses) and an end is remembered. */
static int leave(struct tt_pipe *p, int code)
{
    if (p->plen > 0 && p->pend >= p->scratch && p->pend < p->scratch + p->cap) {
        if (p->own_cap < p->plen) {
            char *grown = realloc(p->own, (size_t)p->plen);
            if (grown == NULL) { /* keep the bytes where they are: fail this direction */
                p->ret = -1;
                p->err = ENOMEM;
                p->plen = 0;
                return p->done = TT_SRC_FAILED;
            }
            p->own = grown;
            p->own_cap = p->plen;
        }
        memmove(p->own, p->pend, (size_t)p->plen);
        p->pend = p->own;
    }
    else if (p->plen == 0 && p->own_cap > 64 * 1024) {
        /* a burst is over: an idle connection keeps no big buffer */
        free(p->own);
        p->own = NULL;
        p->own_cap = 0;
    }
    if (is_end(code)) p->done = code;
    return code;
}

/* Plain TCP -> TLS: recv, SSL_write the whole chunk, again. */
int tt_plain_to_tls(const struct tt_ossl *o, int fd, void *ssl, struct tt_pipe *p, long budget)
{
    if (p->done) return p->done;
    for (;;) {
        if (p->plen > 0) {
            /* Partial writes are off: success means the whole chunk. */
            int n = o->write(ssl, p->pend, p->plen);
            if (n <= 0) {
                int saved = errno;
                int e = o->get_error(ssl, n);
                if (e == WANT_WRITE) return leave(p, TT_DST_WRITABLE);
                if (e == WANT_READ) return leave(p, TT_DST_READABLE);
                p->ret = n;
                p->err = saved;
                take_errors(o, p);
                return leave(p, TT_DST_FAILED);
            }
            p->moved += n;
            p->pend += n;
            p->plen -= n;
            budget -= n;
            continue;
        }
        if (p->after_flush) {
            int code = p->after_flush;
            p->after_flush = 0;
            return leave(p, code);
        }
        if (budget <= 0) return leave(p, TT_YIELD);
        ssize_t n = recv(fd, p->scratch, (size_t)p->cap, 0);
        if (n > 0) {
            p->pend = p->scratch;
            p->plen = (int)n;
            /* A short read drained the socket: after this chunk, wait rather
               than spend a recv on EAGAIN. */
            if (n < p->cap) p->after_flush = TT_SRC_READABLE;
            continue;
        }
        if (n == 0) return leave(p, TT_SRC_EOF);
        if (errno == EINTR) continue;
        if (is_again(errno)) return leave(p, TT_SRC_READABLE);
        p->ret = -1;
        p->err = errno;
        return leave(p, TT_SRC_FAILED);
    }
}

/* TLS -> plain TCP: SSL_read every record that fits, send, again. */
int tt_tls_to_plain(const struct tt_ossl *o, void *ssl, int fd, struct tt_pipe *p, long budget)
{
    if (p->done) return p->done;
    for (;;) {
        while (p->plen > 0) {
            ssize_t n = send(fd, p->pend, (size_t)p->plen, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (is_again(errno)) return leave(p, TT_DST_WRITABLE);
                p->ret = -1;
                p->err = errno;
                return leave(p, TT_DST_FAILED);
            }
            p->moved += n;
            p->pend += n;
            p->plen -= (int)n;
            budget -= n;
        }
        if (p->after_flush) {
            int code = p->after_flush;
            p->after_flush = 0;
            return leave(p, code);
        }
        if (budget <= 0) return leave(p, TT_YIELD);
        int total = 0;
        while (total < p->cap) {
            int n = o->read(ssl, p->scratch + total, p->cap - total);
            if (n > 0) {
                total += n;
                continue;
            }
            int saved = errno;
            int e = o->get_error(ssl, n);
            int code;
            if (e == WANT_READ) code = TT_SRC_READABLE;
            else if (e == WANT_WRITE) code = TT_SRC_WRITABLE;
            else if (e == ZERO_RETURN) code = TT_SRC_EOF;
            else {
                p->ret = n;
                p->err = saved;
                take_errors(o, p);
                code = TT_SRC_FAILED;
            }
            /* What was read goes out first; then the wait, EOF or error. */
            if (total == 0) return leave(p, code);
            p->after_flush = code;
            break;
        }
        p->pend = p->scratch;
        p->plen = total;
    }
}


/* ------------------------------------------------------------------------ *
 * The relay thread: established connections relayed without Python.
 *
 * Python hands a connection over (tt_conn_start) once the handshake is done;
 * from then on only this thread touches its fds and its SSL*, in a loop of
 * its own (level-triggered epoll, the interest of each fd being what its two
 * pipes wait for), until one direction ends (EOF or a failure).  Then it
 * takes the fds out of its epoll and hands the connection back
 * (tt_loop_collect, woken through notify_fd); Python carries on with the
 * per-wake-up calls above, which find the pipes exactly as the thread left
 * them.  Python takes a connection back at any time with tt_conn_stop
 * (cancellation): under the loop's mutex, which the thread holds whenever it
 * touches a connection, so after that call the thread never touches it again.
 * Connections live in slots that are never freed; an epoll event carries the
 * slot's generation, so a stale event for a reused slot is ignored.
 * ------------------------------------------------------------------------ */

enum { FREE = 0, PYTHON = 1, QUEUED = 2, RUNNING = 3, RETURNED = 4 };

struct tt_conn {
    struct tt_pipe to_tls;    /* plain -> TLS */
    struct tt_pipe to_plain;  /* TLS -> plain */
    int plain_fd, tls_fd;
    void *ssl;
    int state;
    uint32_t gen;
    uint32_t index;
    uint32_t plain_mask, tls_mask;  /* registered interest (0: not in the epoll set) */
    uint32_t plain_ev, tls_ev;      /* events seen since the pipes last ran */
    int tls_wait, plain_wait;          /* what each pipe waits for (a TT_* code) */
    int ready;                      /* on the ready list */
    struct tt_conn *next_ready, *next_done;
};

struct tt_loop {
    const struct tt_ossl *o;
    int epfd, wake_fd, notify_fd;
    pthread_mutex_t mu;
    struct tt_conn **slots;
    uint32_t nslots, cap;
    struct tt_conn *free_list;       /* through next_ready */
    struct tt_conn *ready_head, *ready_tail;
    struct tt_conn *done_head;
    char *scratch;
    int scratch_cap;
    long budget;
};

#define WAKE_TAG UINT64_MAX

static uint64_t tag(struct tt_conn *c, int tls) {
    return ((uint64_t)c->index << 33) | ((uint64_t)c->gen << 1) | (uint64_t)tls;
}

static void push_ready(struct tt_loop *l, struct tt_conn *c) {
    if (c->ready) return;
    c->ready = 1;
    c->next_ready = NULL;
    if (l->ready_tail) l->ready_tail->next_ready = c; else l->ready_head = c;
    l->ready_tail = c;
}

static void unlink_ready(struct tt_loop *l, struct tt_conn *c) {
    if (!c->ready) return;
    struct tt_conn **pp = &l->ready_head, *prev = NULL;
    while (*pp && *pp != c) { prev = *pp; pp = &(*pp)->next_ready; }
    if (*pp == c) {
        *pp = c->next_ready;
        if (l->ready_tail == c) l->ready_tail = prev;
    }
    c->ready = 0;
}

static void set_interest(struct tt_loop *l, struct tt_conn *c, int tls, uint32_t want) {
    uint32_t *have = tls ? &c->tls_mask : &c->plain_mask;
    if (*have == want) return;
    int fd = tls ? c->tls_fd : c->plain_fd;
    struct epoll_event ev = {.events = want, .data.u64 = tag(c, tls)};
    if (want == 0) epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
    else if (*have == 0) epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev);
    else epoll_ctl(l->epfd, EPOLL_CTL_MOD, fd, &ev);
    *have = want;
}

static void forget_fds(struct tt_loop *l, struct tt_conn *c) {
    set_interest(l, c, 0, 0);
    set_interest(l, c, 1, 0);
}

/* Whether what a pipe waits for has happened. */
static int to_tls_due(const struct tt_conn *c) {
    const uint32_t any = EPOLLERR | EPOLLHUP;
    switch (c->tls_wait) {
    case TT_SRC_READABLE: return (c->plain_ev & (EPOLLIN | any)) != 0;
    case TT_DST_WRITABLE: return (c->tls_ev & (EPOLLOUT | any)) != 0;
    case TT_DST_READABLE: return (c->tls_ev & (EPOLLIN | any)) != 0;
    default: return 1; /* YIELD, or not run yet */
    }
}

static int to_plain_due(const struct tt_conn *c) {
    const uint32_t any = EPOLLERR | EPOLLHUP;
    switch (c->plain_wait) {
    case TT_SRC_READABLE: return (c->tls_ev & (EPOLLIN | any)) != 0;
    case TT_SRC_WRITABLE: return (c->tls_ev & (EPOLLOUT | any)) != 0;
    case TT_DST_WRITABLE: return (c->plain_ev & (EPOLLOUT | any)) != 0;
    default: return 1;
    }
}

static void hand_back(struct tt_loop *l, struct tt_conn *c) {
    forget_fds(l, c);
    c->state = RETURNED;
    c->next_done = l->done_head;
    l->done_head = c;
    uint64_t one = 1;
    (void)!write(l->notify_fd, &one, sizeof one);
}

static void run_conn(struct tt_loop *l, struct tt_conn *c) {
    c->to_tls.scratch = c->to_plain.scratch = l->scratch;
    c->to_tls.cap = c->to_plain.cap = l->scratch_cap;
    if (to_tls_due(c))
        c->tls_wait = tt_plain_to_tls(l->o, c->plain_fd, c->ssl, &c->to_tls, l->budget);
    if (to_plain_due(c))
        c->plain_wait = tt_tls_to_plain(l->o, c->ssl, c->plain_fd, &c->to_plain, l->budget);
    c->plain_ev = c->tls_ev = 0;
    if (is_end(c->tls_wait) || is_end(c->plain_wait)) {
        hand_back(l, c);
        return;
    }
    uint32_t plain = 0, tls = 0;
    if (c->tls_wait == TT_SRC_READABLE) plain |= EPOLLIN;
    if (c->tls_wait == TT_DST_WRITABLE) tls |= EPOLLOUT;
    if (c->tls_wait == TT_DST_READABLE) tls |= EPOLLIN;
    if (c->plain_wait == TT_SRC_READABLE) tls |= EPOLLIN;
    if (c->plain_wait == TT_SRC_WRITABLE) tls |= EPOLLOUT;
    if (c->plain_wait == TT_DST_WRITABLE) plain |= EPOLLOUT;
    set_interest(l, c, 0, plain);
    set_interest(l, c, 1, tls);
    if (c->tls_wait == TT_YIELD || c->plain_wait == TT_YIELD) push_ready(l, c);
}

static void *loop_main(void *arg) {
    struct tt_loop *l = arg;
    struct epoll_event evs[64];
    for (;;) {
        pthread_mutex_lock(&l->mu);
        int timeout = l->ready_head ? 0 : -1;
        pthread_mutex_unlock(&l->mu);
        int n = epoll_wait(l->epfd, evs, 64, timeout);
        if (n < 0 && errno != EINTR) return NULL;
        pthread_mutex_lock(&l->mu);
        for (int i = 0; i < n; i++) {
            uint64_t t = evs[i].data.u64;
            if (t == WAKE_TAG) {
                uint64_t count;
                (void)!read(l->wake_fd, &count, sizeof count);
                continue;
            }
            uint32_t index = (uint32_t)(t >> 33), gen = (uint32_t)(t >> 1);
            if (index >= l->nslots) continue;
            struct tt_conn *c = l->slots[index];
            if (c->gen != gen || c->state != RUNNING) continue; /* stale */
            if (t & 1) c->tls_ev |= evs[i].events; else c->plain_ev |= evs[i].events;
            push_ready(l, c);
        }
        /* One pass over what is ready now; what yields goes round again. */
        struct tt_conn *c = l->ready_head;
        l->ready_head = l->ready_tail = NULL;
        while (c) {
            struct tt_conn *next = c->next_ready;
            c->ready = 0;
            if (c->state == QUEUED) c->state = RUNNING; /* its first run: both pipes */
            if (c->state == RUNNING) run_conn(l, c);
            c = next;
        }
        pthread_mutex_unlock(&l->mu);
    }
}

struct tt_loop *tt_loop_new(const struct tt_ossl *o, int scratch_cap, long budget) {
    struct tt_loop *l = calloc(1, sizeof *l);
    if (!l) return NULL;
    l->o = o;
    l->budget = budget;
    l->scratch_cap = scratch_cap;
    l->scratch = malloc((size_t)scratch_cap);
    l->epfd = epoll_create1(EPOLL_CLOEXEC);
    l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    l->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&l->mu, NULL);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE_TAG};
    pthread_t thread;
    pthread_attr_t attr;
    if (!l->scratch || l->epfd < 0 || l->wake_fd < 0 || l->notify_fd < 0 ||
        epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->wake_fd, &ev) < 0 || pthread_attr_init(&attr) != 0)
        return NULL; /* leaks a few fds once, at start-up: the caller falls back */
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    /* The thread must not take the signals Python expects on its main thread. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int failed = pthread_create(&thread, &attr, loop_main, l);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return failed ? NULL : l;
}

int tt_loop_notify_fd(struct tt_loop *l) { return l->notify_fd; }

/* A connection slot, owned by Python, its pipes empty. */
struct tt_conn *tt_conn_acquire(struct tt_loop *l) {
    pthread_mutex_lock(&l->mu);
    struct tt_conn *c = l->free_list;
    if (c) {
        l->free_list = c->next_ready;
    } else {
        if (l->nslots == l->cap) {
            uint32_t cap = l->cap ? 2 * l->cap : 64;
            struct tt_conn **grown = realloc(l->slots, cap * sizeof *grown);
            if (!grown) { pthread_mutex_unlock(&l->mu); return NULL; }
            l->slots = grown;
            l->cap = cap;
        }
        c = calloc(1, sizeof *c);
        if (!c) { pthread_mutex_unlock(&l->mu); return NULL; }
        c->index = l->nslots;
        l->slots[l->nslots++] = c;
    }
    uint32_t gen = c->gen + 1, index = c->index;
    memset(c, 0, sizeof *c);
    c->gen = gen;
    c->index = index;
    c->state = PYTHON;
    pthread_mutex_unlock(&l->mu);
    return c;
}

void tt_conn_start(struct tt_loop *l, struct tt_conn *c, int plain_fd, int tls_fd, void *ssl) {
    pthread_mutex_lock(&l->mu);
    c->plain_fd = plain_fd;
    c->tls_fd = tls_fd;
    c->ssl = ssl;
    c->state = QUEUED;
    push_ready(l, c);
    uint64_t one = 1;
    (void)!write(l->wake_fd, &one, sizeof one);
    pthread_mutex_unlock(&l->mu);
}

/* Take a connection back (cancellation).  Returns 1 if the thread had it. */
int tt_conn_stop(struct tt_loop *l, struct tt_conn *c) {
    pthread_mutex_lock(&l->mu);
    int had = c->state == QUEUED || c->state == RUNNING;
    if (had) {
        unlink_ready(l, c);
        forget_fds(l, c);
    } else if (c->state == RETURNED) {
        struct tt_conn **pp = &l->done_head;
        while (*pp && *pp != c) pp = &(*pp)->next_done;
        if (*pp) *pp = c->next_done;
    }
    c->state = PYTHON;
    pthread_mutex_unlock(&l->mu);
    return had;
}

/* The connections handed back since the last call (at most max). */
int tt_loop_collect(struct tt_loop *l, struct tt_conn **out, int max) {
    pthread_mutex_lock(&l->mu);
    uint64_t count;
    (void)!read(l->notify_fd, &count, sizeof count);
    int n = 0;
    while (l->done_head && n < max) {
        struct tt_conn *c = l->done_head;
        l->done_head = c->next_done;
        c->state = PYTHON;
        out[n++] = c;
    }
    if (l->done_head) { /* more than max: be woken again */
        uint64_t one = 1;
        (void)!write(l->notify_fd, &one, sizeof one);
    }
    pthread_mutex_unlock(&l->mu);
    return n;
}

/* The slot is free again (its connection is closed or about to be). */
void tt_conn_release(struct tt_loop *l, struct tt_conn *c) {
    tt_conn_stop(l, c);
    pthread_mutex_lock(&l->mu);
    free(c->to_tls.own);
    free(c->to_plain.own);
    c->to_tls.own = c->to_plain.own = NULL;
    c->to_tls.own_cap = c->to_plain.own_cap = 0;
    c->state = FREE;
    c->gen++;
    c->next_ready = l->free_list;
    l->free_list = c;
    pthread_mutex_unlock(&l->mu);
}

/* A Python-side pipe's buffer (pipes outside a slot). */
void tt_pipe_free(struct tt_pipe *p) {
    free(p->own);
    p->own = NULL;
    p->own_cap = 0;
}
