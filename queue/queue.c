/*
 * queue: the spool (see queue.h; queue_int.h lists the files of the
 * spool and describes the records and the threads). This file holds the
 * requests: each is built and serialized on its caller's thread and
 * appended to the committer's inbound list (submit); the completion
 * ports, drained by their owner thread, which runs the callbacks and
 * frees the requests; the _wait wrappers; message ids; and the
 * translation of LMDB codes to ours.
 *
 * Threading: submitting, the events calls and queue_id_next(): any
 * thread, concurrently (q->mu guards the inbound list, q->ev_mu the
 * events hook; the id and the event numbers are atomics). A port is
 * drained on its owner thread only, which runs the callbacks; the
 * committer and the notifier push to it under port->mu (commit.c). The
 * _wait wrappers block their caller on a port of their own.
 */
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "queue/queue_int.h"

#define REPLY_STORE_MAX QUEUE_MAX_REPLY

/* LMDB (and errno) codes to ours: the only place they are translated. */
int
queue_lmdb_err(int rc)
{
    switch (rc) {
    case 0:
        return 0;
    case MDB_MAP_FULL:
        return QUEUE_EMAPFULL;
    case MDB_NOTFOUND:
        return QUEUE_ENOTFOUND;
    case MDB_KEYEXIST:
        return QUEUE_EEXIST;
    case MDB_PANIC:
    case MDB_MAP_RESIZED:
        return QUEUE_EPANIC;
    case MDB_READERS_FULL:
        return QUEUE_EREADERS;
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_INVALID:
    case MDB_VERSION_MISMATCH:
    case MDB_INCOMPATIBLE:
        return QUEUE_ECORRUPT;
    case ENOSPC:
    case EDQUOT:
    case EFBIG: /* a file size limit: the file cannot grow, as on a full disk */
        return -ENOSPC;
    }
    if (rc > 0)
        return -rc;
    return QUEUE_ESTORE;
}

/* ---- ports ---- */

struct queue_port *
queue_port_new(void)
{
    struct queue_port *p = calloc(1, sizeof(*p));
    if (p == NULL)
        return NULL;
    p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (p->efd < 0) {
        int e = errno;
        free(p);
        errno = e;
        return NULL;
    }
    pthread_mutex_init(&p->mu, NULL);
    atomic_init(&p->pending, 0);
    return p;
}

struct queue_port *
queue_port_free(struct queue_port *port)
{
    if (port == NULL)
        return NULL;
    if (atomic_load(&port->pending) != 0) {
        log_msg(LOG_CRIT, "queue=port_free pending=%u bug=freed_with_requests_in_flight",
                atomic_load(&port->pending));
        abort();
    }
    close(port->efd);
    pthread_mutex_destroy(&port->mu);
    free(port);
    return NULL;
}

int
queue_port_fd(const struct queue_port *port)
{
    return port->efd;
}

unsigned
queue_port_pending(const struct queue_port *port)
{
    return atomic_load(&((struct queue_port *)port)->pending);
}

/* Owner thread: run a take's callback for each recipient it took. */
static void
take_report(struct queue_req *r)
{
    char strs[RCPT_REC_MAX + 8];
    for (size_t off = 0; off < r->u.take.len;) {
        struct take_rec tr;
        memcpy(&tr, r->u.take.buf + off, sizeof(tr));
        MDB_val v = {tr.len, r->u.take.buf + off + sizeof(tr)};
        struct rcpt_head h;
        memcpy(&h, v.mv_data, sizeof(h));
        struct queue_rcpt qr;
        char *p = strs;
        queue_rcpt_fill(&qr, &h, &v, tr.index, &p);
        struct owner_buf ob;
        const char *os = (const char *)v.mv_data + tr.len;
        memcpy(ob.tenant, os, tr.tenant_len);
        ob.tenant[tr.tenant_len] = '\0';
        os += tr.tenant_len;
        memcpy(ob.campaign, os, tr.campaign_len);
        ob.campaign[tr.campaign_len] = '\0';
        os += tr.campaign_len;
        memcpy(ob.pool, os, tr.pool_len);
        ob.pool[tr.pool_len] = '\0';
        qr.owner = (struct queue_owner){ob.tenant, ob.campaign, ob.pool, tr.priority,
                                        tr.tls_relaxed};
        r->u.take.cb(r->u.take.arg, tr.id, &qr);
        off += (sizeof(tr) + tr.len + tr.tenant_len + tr.campaign_len + tr.pool_len + 7) &
               ~(size_t)7;
    }
}

int
queue_port_drain(struct queue_port *port)
{
    /* Clear the eventfd before taking the list: a push after the take
     * finds the list empty and signals again, so nothing is missed. */
    uint64_t v;
    ssize_t rd = read(port->efd, &v, sizeof(v));
    (void)rd;
    pthread_mutex_lock(&port->mu);
    struct queue_req *r = port->head;
    port->head = port->tail = NULL;
    pthread_mutex_unlock(&port->mu);
    unsigned n = 0;
    for (struct queue_req *x = r; x != NULL; x = x->next)
        n++;
    /* Counted down before any callback, so a callback may free the port. */
    if (n > 0)
        atomic_fetch_sub(&port->pending, n);
    while (r != NULL) {
        struct queue_req *next = r->next;
        if (r->kind == REQ_TAKE) {
            if (r->rc == 0)
                take_report(r);
            free(r->u.take.buf);
        }
        if (r->kind == REQ_UPDATE && r->applied_out != NULL &&
            (r->rc == 0 || r->rc == QUEUE_ESTALE))
            for (size_t i = 0; i < r->u.upd.n; i++)
                r->applied_out[i] = r->u.upd.items[i].applied;
        r->done(r->cookie, r->rc);
        free(r);
        r = next;
    }
    return (int)n;
}

int
queue_port_wait(struct queue_port *port, int timeout_ms)
{
    struct pollfd pfd = {.fd = port->efd, .events = POLLIN};
    int rc = poll(&pfd, 1, timeout_ms);
    if (rc < 0)
        return -errno;
    return queue_port_drain(port);
}

/* ---- submitting ---- */

static int
submit(struct queue *q, struct queue_req *r)
{
    if (q->read_only)
        return -EROFS; /* no committer to take it */
    r->next = NULL;
    atomic_fetch_add(&r->port->pending, 1);
    pthread_mutex_lock(&q->mu);
    if (q->stopping) {
        pthread_mutex_unlock(&q->mu);
        atomic_fetch_sub(&r->port->pending, 1);
        return QUEUE_ECLOSED;
    }
    if (q->in_tail != NULL)
        q->in_tail->next = r;
    else
        q->in_head = r;
    q->in_tail = r;
    q->in_count++;
    atomic_store_explicit(&q->st.backlog, q->in_count, memory_order_relaxed);
    if (q->idle && (!q->gathering || q->in_count >= q->gather_target))
        pthread_cond_signal(&q->cond);
    pthread_mutex_unlock(&q->mu);
    return 0;
}

static size_t
str_len(const char *s)
{
    return s ? strlen(s) : 0;
}

static unsigned char *
put_bytes(unsigned char *p, const char *s, size_t n)
{
    if (n > 0)
        memcpy(p, s, n);
    return p + n;
}

/* Sizes of a message's serialized form (see enq_build). */
struct enq_size {
    size_t sender, envid, auth, client, tenant, campaign, pool;
    uint64_t body_len;
    size_t rcpt_bytes, head_len, iov_bytes;
    size_t data_len; /* a multiple of 8 */
};

/* Check an envelope for queue_enqueue() and size its serialized form.
 * Returns 0 or -EINVAL. */
static int
enq_measure(const struct queue_envelope *env, const struct iovec *body, unsigned iovcnt,
            struct enq_size *sz)
{
    if (env == NULL || env->id == 0 || env->nrcpt == 0 || env->nrcpt > QUEUE_MAX_RCPT ||
        env->rcpt == NULL || (iovcnt > 0 && body == NULL) || iovcnt > 1024 ||
        (unsigned)env->ret > QUEUE_RET_HDRS || (unsigned)env->body_type > QUEUE_BODY_BINARYMIME)
        return -EINVAL;
    sz->sender = str_len(env->sender);
    sz->envid = str_len(env->envid);
    sz->auth = str_len(env->auth_user);
    sz->client = str_len(env->client_addr);
    sz->tenant = str_len(env->tenant);
    sz->campaign = str_len(env->campaign);
    sz->pool = str_len(env->pool);
    if (sz->sender > QUEUE_MAX_ADDR || sz->envid > QUEUE_MAX_PARAM || sz->auth > QUEUE_MAX_PARAM ||
        sz->client > QUEUE_MAX_PARAM || sz->tenant > QUEUE_MAX_TAG ||
        sz->campaign > QUEUE_MAX_TAG || sz->pool > QUEUE_MAX_TAG ||
        env->priority > QUEUE_MAX_PRIORITY)
        return -EINVAL;
    sz->body_len = 0;
    for (unsigned i = 0; i < iovcnt; i++)
        sz->body_len += body[i].iov_len;
    sz->rcpt_bytes = 0;
    for (unsigned i = 0; i < env->nrcpt; i++) {
        const struct queue_rcpt *r = &env->rcpt[i];
        size_t alen = str_len(r->addr), olen = str_len(r->orcpt);
        if (alen == 0 || alen > QUEUE_MAX_ADDR || olen > QUEUE_MAX_PARAM || r->notify > 15)
            return -EINVAL;
        const char *at = strrchr(r->addr, '@');
        size_t dlen = at ? alen - (size_t)(at + 1 - r->addr) : 0;
        sz->rcpt_bytes += 4 + align4(sizeof(struct rcpt_head) + alen + dlen + olen);
    }
    sz->head_len = sizeof(struct msg_head) + sz->sender + sz->envid + sz->auth + sz->client +
                   sz->tenant + sz->campaign + sz->pool;
    sz->iov_bytes = iovcnt * sizeof(struct iovec);
    sz->data_len = (sz->iov_bytes + align4(sz->head_len) + sz->rcpt_bytes + 7) & ~(size_t)7;
    return 0;
}

/* Serialize the message into data (sz->data_len bytes, 8-aligned) and
 * point req->enq into it. */
static void
enq_build(struct queue_req *req, unsigned char *data, const struct queue_envelope *env,
          const struct iovec *body, unsigned iovcnt, const struct enq_size *sz)
{
    req->has_msg = true;
    req->cost = sz->body_len;
    req->enq.id = env->id;
    req->enq.body_len = sz->body_len;
    req->enq.iovcnt = iovcnt;
    req->enq.nrcpt = env->nrcpt;
    req->enq.chunks = sz->body_len > BODY_INLINE_MAX
                          ? (uint32_t)((sz->body_len + BODY_CHUNK - 1) / BODY_CHUNK)
                          : 0;
    if (iovcnt > 0)
        memcpy(data, body, sz->iov_bytes);
    req->enq.iov = (const struct iovec *)data;

    struct msg_head h = {
        .magic = MSG_MAGIC,
        .flags = (uint8_t)((env->body_type == QUEUE_BODY_8BITMIME ? MSG_F_8BITMIME : 0) |
                           (env->body_type == QUEUE_BODY_BINARYMIME ? MSG_F_BINARYMIME : 0) |
                           (env->smtputf8 ? MSG_F_SMTPUTF8 : 0) |
                           (env->tls_relaxed ? MSG_F_TLS_RELAXED : 0)),
        .ret = (uint8_t)env->ret,
        .nrcpt = (uint16_t)env->nrcpt,
        .body_chunks = req->enq.chunks,
        .sender_len = (uint16_t)sz->sender,
        .envid_len = (uint16_t)sz->envid,
        .auth_len = (uint16_t)sz->auth,
        .client_len = (uint16_t)sz->client,
        .tenant_len = (uint8_t)sz->tenant,
        .campaign_len = (uint8_t)sz->campaign,
        .pool_len = (uint8_t)sz->pool,
        .priority = (uint8_t)env->priority,
        .arrival_ms = env->arrival_ms ? env->arrival_ms : clock_unix_ms(),
        .expire_ms = env->expire_ms,
        .body_len = sz->body_len,
    };
    unsigned char *p = data + sz->iov_bytes;
    req->enq.head = p;
    req->enq.head_len = sz->head_len;
    memcpy(p, &h, sizeof(h));
    p += sizeof(h);
    p = put_bytes(p, env->sender, sz->sender);
    p = put_bytes(p, env->envid, sz->envid);
    p = put_bytes(p, env->auth_user, sz->auth);
    p = put_bytes(p, env->client_addr, sz->client);
    p = put_bytes(p, env->tenant, sz->tenant);
    p = put_bytes(p, env->campaign, sz->campaign);
    p = put_bytes(p, env->pool, sz->pool);

    p = data + sz->iov_bytes + align4(sz->head_len);
    req->enq.rcpts = p;
    req->enq.rcpt_bytes = sz->rcpt_bytes;
    for (unsigned i = 0; i < env->nrcpt; i++) {
        const struct queue_rcpt *r = &env->rcpt[i];
        size_t alen = strlen(r->addr), olen = str_len(r->orcpt);
        const char *at = strrchr(r->addr, '@');
        size_t dlen = at ? alen - (size_t)(at + 1 - r->addr) : 0;
        struct rcpt_head rh = {
            .state = QUEUE_RCPT_READY,
            .notify = (uint8_t)r->notify,
            .addr_len = (uint16_t)alen,
            .domain_len = (uint16_t)dlen,
            .orcpt_len = (uint16_t)olen,
        };
        uint32_t len = (uint32_t)(sizeof(rh) + alen + dlen + olen);
        memcpy(p, &len, 4);
        unsigned char *rec = p + 4;
        memcpy(rec, &rh, sizeof(rh));
        unsigned char *s = put_bytes(rec + sizeof(rh), r->addr, alen);
        for (size_t j = 0; j < dlen; j++) {
            char c = at[1 + j];
            s[j] = (unsigned char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
        }
        put_bytes(s + dlen, r->orcpt, olen);
        p += 4 + align4(len);
    }
}

/* Whether text[0..len) is whole lines (or nothing); their count in *lines. */
static bool
events_ok(const char *text, size_t len, uint64_t *lines)
{
    *lines = 0;
    if (len == 0)
        return true;
    if (text == NULL || text[len - 1] != '\n')
        return false;
    for (const char *p = text, *e = text + len; (p = memchr(p, '\n', (size_t)(e - p))) != NULL;
         p++)
        (*lines)++;
    return true;
}

/* Copy the event lines to dst (inside req's allocation) and point req at them. */
static void
events_attach(struct queue_req *req, char *dst, const char *text, size_t len, uint64_t lines)
{
    if (len == 0)
        return;
    memcpy(dst, text, len);
    req->ev_text = dst;
    req->ev_len = len;
    req->ev_lines = lines;
}

int
queue_enqueue(struct queue *q, struct queue_port *port, const struct queue_envelope *env,
              const struct iovec *body, unsigned iovcnt, queue_done_fn *done, void *cookie)
{
    return queue_enqueue_events(q, port, env, body, iovcnt, NULL, 0, done, cookie);
}

int
queue_enqueue_events(struct queue *q, struct queue_port *port, const struct queue_envelope *env,
                     const struct iovec *body, unsigned iovcnt, const char *events,
                     size_t events_len, queue_done_fn *done, void *cookie)
{
    struct enq_size sz;
    uint64_t lines;
    if (q == NULL || port == NULL || done == NULL || enq_measure(env, body, iovcnt, &sz) != 0 ||
        !events_ok(events, events_len, &lines) || events_len > SIZE_MAX / 4)
        return -EINVAL;
    struct queue_req *req = malloc(sizeof(*req) + sz.data_len + events_len);
    if (req == NULL)
        return -ENOMEM;
    memset(req, 0, sizeof(*req));
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_ENQUEUE;
    enq_build(req, (unsigned char *)req->data, env, body, iovcnt, &sz);
    events_attach(req, (char *)req->data + sz.data_len, events, events_len, lines);
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

/* An update request for outcomes[0..n), with room for extra (8-aligned)
 * bytes at the start of its data for a message. NULL: -EINVAL or -ENOMEM
 * in *rc. */
static struct queue_req *
upd_new(const struct queue_outcome *outcomes, size_t n, size_t extra, size_t tail, int *rc)
{
    *rc = -EINVAL;
    if (outcomes == NULL || n == 0 || n > SIZE_MAX / 2 / sizeof(struct upd_item))
        return NULL;
    size_t text = 0;
    for (size_t i = 0; i < n; i++) {
        const struct queue_outcome *o = &outcomes[i];
        if (o->rcpt >= QUEUE_MAX_RCPT || o->code > 999 || (unsigned)o->kind > QUEUE_WARNED)
            return NULL;
        size_t len = str_len(o->reply);
        text += len > REPLY_STORE_MAX ? REPLY_STORE_MAX : len;
        if (o->note_len > QUEUE_NOTE_MAX || (o->note_len > 0 && o->note == NULL))
            return NULL;
        text += o->note_len;
    }
    *rc = -ENOMEM;
    struct queue_req *req =
        malloc(sizeof(*req) + extra + n * sizeof(struct upd_item) + text + tail);
    if (req == NULL)
        return NULL;
    memset(req, 0, sizeof(*req));
    struct upd_item *items = (struct upd_item *)((unsigned char *)req->data + extra);
    char *t = (char *)(items + n);
    for (size_t i = 0; i < n; i++) {
        const struct queue_outcome *o = &outcomes[i];
        size_t len = str_len(o->reply);
        if (len > REPLY_STORE_MAX)
            len = REPLY_STORE_MAX;
        items[i] = (struct upd_item){
            .id = o->id,
            .due_ms = o->due_ms,
            .reply = t,
            .rcpt = o->rcpt,
            .code = (uint16_t)o->code,
            .reply_len = (uint16_t)len,
            .tag = o->tag < QUEUE_TAGS ? (uint8_t)o->tag : 0,
            .kind = (uint8_t)o->kind,
            .untried = o->untried,
        };
        if (len > 0)
            memcpy(t, o->reply, len);
        t += len;
        if (o->note_len > 0) {
            memcpy(t, o->note, o->note_len);
            items[i].note = t;
            items[i].note_len = o->note_len;
            t += o->note_len;
        }
    }
    req->kind = REQ_UPDATE;
    req->u.upd.n = n;
    req->u.upd.items = items;
    req->ev_text = t; /* where the caller's tail goes */
    *rc = 0;
    return req;
}

/* Give each outcome of req its lines of the event text, in order:
 * ev_lines[i] of them (NULL: none), their octets in ev_len. False when
 * they add up to more lines than the text has. */
static bool
upd_events_split(struct queue_req *req, const unsigned *ev_lines)
{
    size_t off = 0;
    for (size_t i = 0; ev_lines != NULL && i < req->u.upd.n; i++) {
        struct upd_item *it = &req->u.upd.items[i];
        size_t start = off;
        it->ev_lines = ev_lines[i];
        for (unsigned l = 0; l < it->ev_lines; l++) {
            const char *nl = off < req->ev_len
                                 ? memchr(req->ev_text + off, '\n', req->ev_len - off)
                                 : NULL;
            if (nl == NULL)
                return false;
            off = (size_t)(nl - req->ev_text) + 1;
        }
        it->ev_len = off - start;
    }
    return true;
}

int
queue_update(struct queue *q, struct queue_port *port, const struct queue_outcome *outcomes,
             size_t n, queue_done_fn *done, void *cookie)
{
    return queue_update_enqueue(q, port, outcomes, n, NULL, NULL, 0, done, cookie);
}

int
queue_update_enqueue(struct queue *q, struct queue_port *port,
                     const struct queue_outcome *outcomes, size_t n,
                     const struct queue_envelope *env, const struct iovec *body, unsigned iovcnt,
                     queue_done_fn *done, void *cookie)
{
    return queue_update_enqueue_events(q, port, outcomes, n, env, body, iovcnt, NULL, 0, NULL, NULL,
                                       done, cookie);
}

int
queue_update_enqueue_events(struct queue *q, struct queue_port *port,
                            const struct queue_outcome *outcomes, size_t n,
                            const struct queue_envelope *env, const struct iovec *body,
                            unsigned iovcnt, const char *events, size_t events_len,
                            const unsigned *ev_lines, bool *applied, queue_done_fn *done,
                            void *cookie)
{
    struct enq_size sz = {0};
    uint64_t lines;
    if (q == NULL || port == NULL || done == NULL ||
        (env != NULL && enq_measure(env, body, iovcnt, &sz) != 0) ||
        !events_ok(events, events_len, &lines) || events_len > SIZE_MAX / 4)
        return -EINVAL;
    int rc;
    struct queue_req *req = upd_new(outcomes, n, sz.data_len, events_len, &rc);
    if (req == NULL)
        return rc;
    char *tail = (char *)req->ev_text;
    req->ev_text = NULL;
    events_attach(req, tail, events, events_len, lines);
    if (!upd_events_split(req, ev_lines)) {
        free(req);
        return -EINVAL;
    }
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->applied_out = applied;
    /* No cost against max_batch_bytes: an update is never held back, and
     * a DSN is small next to the batch bound. */
    if (env != NULL) {
        enq_build(req, (unsigned char *)req->data, env, body, iovcnt, &sz);
        req->cost = 0;
    }
    rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

int
queue_events_put(struct queue *q, struct queue_port *port, const char *events, size_t events_len,
                 queue_done_fn *done, void *cookie)
{
    if (events_len == 0)
        return -EINVAL;
    return queue_events_note_put(q, port, events, events_len, NULL, 0, done, cookie);
}

int
queue_events_note_put(struct queue *q, struct queue_port *port, const char *events,
                      size_t events_len, const void *note, size_t note_len, queue_done_fn *done,
                      void *cookie)
{
    uint64_t lines = 0;
    if (q == NULL || port == NULL || done == NULL || (events_len == 0 && note_len == 0) ||
        (events_len > 0 && !events_ok(events, events_len, &lines)) ||
        events_len > SIZE_MAX / 4 || note_len > QUEUE_NOTE_MAX || (note_len > 0 && note == NULL))
        return -EINVAL;
    struct queue_req *req = malloc(sizeof(*req) + events_len + note_len);
    if (req == NULL)
        return -ENOMEM;
    memset(req, 0, sizeof(*req));
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_EVENTS;
    if (events_len > 0)
        events_attach(req, (char *)req->data, events, events_len, lines);
    if (note_len > 0) {
        memcpy((char *)req->data + events_len, note, note_len);
        req->note = (char *)req->data + events_len;
        req->note_len = note_len;
    }
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

int
queue_events_trim(struct queue *q, struct queue_port *port, uint64_t upto, queue_done_fn *done,
                  void *cookie)
{
    if (q == NULL || port == NULL || done == NULL)
        return -EINVAL;
    struct queue_req *req = calloc(1, sizeof(*req));
    if (req == NULL)
        return -ENOMEM;
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_TRIM;
    req->ev_seq = upto;
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

void
queue_notes_set_hook(struct queue *q, void (*fn)(void *arg), void *arg)
{
    pthread_mutex_lock(&q->ev_mu);
    q->note_hook = fn;
    q->note_hook_arg = arg;
    pthread_mutex_unlock(&q->ev_mu);
}

uint64_t
queue_events_durable(struct queue *q)
{
    return atomic_load(&q->ev_durable);
}

void
queue_events_floor(struct queue *q, uint64_t seq)
{
    uint64_t cur = atomic_load(&q->ev_floor);
    while (cur < seq && !atomic_compare_exchange_weak(&q->ev_floor, &cur, seq)) {
    }
}

void
queue_events_set_hook(struct queue *q, void (*fn)(void *arg), void *arg)
{
    pthread_mutex_lock(&q->ev_mu);
    q->ev_hook = fn;
    q->ev_hook_arg = arg;
    pthread_mutex_unlock(&q->ev_mu);
}

int
queue_due_take(struct queue *q, struct queue_port *port, uint64_t now_ms_, unsigned limit,
               queue_rcpt_fn *cb, void *arg, queue_done_fn *done, void *cookie)
{
    if (q == NULL || port == NULL || cb == NULL || done == NULL)
        return -EINVAL;
    struct queue_req *req = calloc(1, sizeof(*req));
    if (req == NULL)
        return -ENOMEM;
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_TAKE;
    req->u.take.now_ms = now_ms_;
    req->u.take.limit = limit;
    req->u.take.cb = cb;
    req->u.take.arg = arg;
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

struct waiter {
    int rc;
    bool done;
};

static void
waiter_done(void *cookie, int rc)
{
    struct waiter *w = cookie;
    w->rc = rc;
    w->done = true;
}

static int
wait_on(struct queue_port *port, struct waiter *w)
{
    while (!w->done) {
        int rc = queue_port_wait(port, -1);
        if (rc < 0 && rc != -EINTR) {
            /* poll cannot fail on a valid fd short of EINTR; spin rather
             * than free a port with a request in flight */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
    }
    queue_port_free(port);
    return w->rc;
}

int
queue_enqueue_wait(struct queue *q, const struct queue_envelope *env, const struct iovec *body,
                   unsigned iovcnt)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    int rc = queue_enqueue(q, port, env, body, iovcnt, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    return wait_on(port, &w);
}

int
queue_update_wait(struct queue *q, const struct queue_outcome *outcomes, size_t n)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    int rc = queue_update(q, port, outcomes, n, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    return wait_on(port, &w);
}

int
queue_notes_trim(struct queue *q, struct queue_port *port, uint64_t upto, queue_done_fn *done,
                 void *cookie)
{
    if (q == NULL || port == NULL || done == NULL)
        return -EINVAL;
    struct queue_req *req = calloc(1, sizeof(*req));
    if (req == NULL)
        return -ENOMEM;
    req->port = port;
    req->done = done;
    req->cookie = cookie;
    req->kind = REQ_NOTES_TRIM;
    req->note_upto = upto;
    int rc = submit(q, req);
    if (rc < 0)
        free(req);
    return rc;
}

int
queue_notes_trim_wait(struct queue *q, uint64_t upto)
{
    if (q == NULL)
        return -EINVAL;
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    int rc = queue_notes_trim(q, port, upto, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    return wait_on(port, &w);
}

int
queue_update_enqueue_wait(struct queue *q, const struct queue_outcome *outcomes, size_t n,
                          const struct queue_envelope *env, const struct iovec *body,
                          unsigned iovcnt)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    int rc = queue_update_enqueue(q, port, outcomes, n, env, body, iovcnt, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    return wait_on(port, &w);
}

struct take_waiter {
    queue_rcpt_fn *cb;
    void *arg;
    int n;
};

static int
take_count(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct take_waiter *tw = arg;
    tw->n++;
    return tw->cb != NULL ? tw->cb(tw->arg, id, r) : 0;
}

int
queue_due_take_wait(struct queue *q, uint64_t now_ms_, unsigned limit, queue_rcpt_fn *cb,
                    void *arg)
{
    struct queue_port *port = queue_port_new();
    if (port == NULL)
        return -errno;
    struct waiter w = {0, false};
    struct take_waiter tw = {cb, arg, 0};
    int rc = queue_due_take(q, port, now_ms_, limit, take_count, &tw, waiter_done, &w);
    if (rc < 0) {
        queue_port_free(port);
        return rc;
    }
    rc = wait_on(port, &w);
    return rc < 0 ? rc : tw.n;
}

/* ---- ids ---- */

uint64_t
queue_id_next(struct queue *q)
{
    uint64_t now = clock_unix_ms();
    uint64_t last = atomic_load_explicit(&q->last_id, memory_order_relaxed);
    uint64_t id;
    do {
        id = queue_id_after(last, now, q->cfg.node_id);
    } while (!atomic_compare_exchange_weak_explicit(&q->last_id, &last, id, memory_order_relaxed,
                                                    memory_order_relaxed));
    return id;
}
