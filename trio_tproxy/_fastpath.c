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
#include <sys/socket.h>
#include <sys/types.h>

typedef int (*tt_ssl_io)(void *ssl, void *buf, int num);
typedef int (*tt_ssl_get_error)(const void *ssl, int ret);

struct tt_ossl {
    tt_ssl_io read;
    tt_ssl_io write;
    tt_ssl_get_error get_error;
};

struct tt_pipe {
    char *scratch;       /* where reads land (shared by every pipe) */
    int cap;             /* its size */
    char *pend;          /* bytes read, not yet written */
    int plen;
    long long moved;     /* bytes written to the destination, in all */
    int after_flush;     /* once pend is empty: 0 = read on, else return this code */
    int ret;             /* a failure: the OpenSSL call's return value ... */
    int err;             /* ... and errno right after it (or the syscall's errno) */
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

/* Plain TCP -> TLS: recv, SSL_write the whole chunk, again. */
int tt_plain_to_tls(const struct tt_ossl *o, int fd, void *ssl, struct tt_pipe *p, long budget)
{
    for (;;) {
        if (p->plen > 0) {
            /* Partial writes are off: success means the whole chunk. */
            int n = o->write(ssl, p->pend, p->plen);
            if (n <= 0) {
                int saved = errno;
                int e = o->get_error(ssl, n);
                if (e == WANT_WRITE) return TT_DST_WRITABLE;
                if (e == WANT_READ) return TT_DST_READABLE;
                p->ret = n;
                p->err = saved;
                return TT_DST_FAILED;
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
            return code;
        }
        if (budget <= 0) return TT_YIELD;
        ssize_t n = recv(fd, p->scratch, (size_t)p->cap, 0);
        if (n > 0) {
            p->pend = p->scratch;
            p->plen = (int)n;
            /* A short read drained the socket: after this chunk, wait rather
               than spend a recv on EAGAIN. */
            if (n < p->cap) p->after_flush = TT_SRC_READABLE;
            continue;
        }
        if (n == 0) return TT_SRC_EOF;
        if (errno == EINTR) continue;
        if (is_again(errno)) return TT_SRC_READABLE;
        p->ret = -1;
        p->err = errno;
        return TT_SRC_FAILED;
    }
}

/* TLS -> plain TCP: SSL_read every record that fits, send, again. */
int tt_tls_to_plain(const struct tt_ossl *o, void *ssl, int fd, struct tt_pipe *p, long budget)
{
    for (;;) {
        while (p->plen > 0) {
            ssize_t n = send(fd, p->pend, (size_t)p->plen, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (is_again(errno)) return TT_DST_WRITABLE;
                p->ret = -1;
                p->err = errno;
                return TT_DST_FAILED;
            }
            p->moved += n;
            p->pend += n;
            p->plen -= (int)n;
            budget -= n;
        }
        if (p->after_flush) {
            int code = p->after_flush;
            p->after_flush = 0;
            return code;
        }
        if (budget <= 0) return TT_YIELD;
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
                code = TT_SRC_FAILED;
            }
            /* What was read goes out first; then the wait, EOF or error. */
            if (total == 0) return code;
            p->after_flush = code;
            break;
        }
        p->pend = p->scratch;
        p->plen = total;
    }
}
