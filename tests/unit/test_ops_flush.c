/*
 * The operator's flush (engine/ops_queue.c cmd_flush): the rests its mail waits
 * on end on the workers (delivery_lift_holds) before any of its deferred
 * recipients comes due in the spool (QUEUE_RETIME). A recipient the due
 * poll took while its destination still rested would be deferred again
 * at once with the failure the rest keeps (scheduler.c), for the next
 * step of its schedule.
 *
 * Why here and not end to end: the wrong order shows only when a due
 * poll (once a second, on worker 0: engine/delivery_due.c) falls between the
 * retime's commit and the lift's message reaching the worker: a few
 * microseconds for one batch, the commits of FLUSH_BATCH recipients
 * each for more. Against a real spool such a test passes whichever the
 * order, nearly always. So the seams are the ones cmd_flush talks
 * through, the link's --wrap: the spool (queue_walk, queue_update)
 * and the workers' end of the rests (delivery_lift_holds, reached
 * through a real worker's mailbox, as the stats thread reaches it).
 * The spool's stand-in is the worst case of the race: every recipient it
 * is asked to retime counts as taken by the due poll at that instant, and
 * must find its domain's rest already ended.
 *
 * The command is reached as the stats thread reaches it: ops_start hands
 * the stats server its table (stats_server_new, wrapped to keep it).
 *
 * A flush that a stop overtakes (engine_stop sets e->stopping) is tried
 * with a port of the test's own (queue_port_*, wrapped): the spool's
 * answers come through it, at once or never (a dead disk).
 *
 * The bounce's wait for its commits (cmd_bounce, bounce_wait) is here
 * too, for the same fixture: the workers' side (delivery_submit_bounce)
 * and the spool's envelopes (queue_envelope_get, _free) are the test's,
 * which decides when the bounced recipient leaves the spool, and when
 * the stop begins. So is the answer of a worker that comes after its
 * caller stopped waiting (wcall_run's WAIT_MS): "sites", its worker's
 * side (delivery_sites) the test's, failed, and held until the caller
 * has given up.
 *
 * And a reload's wait for its outcome (`reload`, engine_reload_wait),
 * which the drain (engine_drain, on an engine with nothing to drain) and
 * the stop (engine_reload_stopping) end too: the main thread's
 * SIGHUP is taken by the test's thread (blocked in every thread, waited
 * for with sigtimedwait), which plays the main thread's part; that the
 * command is in its wait is told by the condition variable's wait itself
 * (pthread_cond_timedwait, wrapped, on e->reload_cv).
 *
 * And a command begun once the stop has begun (one queued behind a bounce
 * or flush the stop ended), which is not run.
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/json.h"
#include "engine/config.h"
#include "engine/delivery.h"
#include "engine/engine.h"
#include "engine/ops.h"
#include "engine/stats.h"
#include "engine/worker.h"
#include "queue/queue.h"

/* ---- the stand-ins (the link's --wrap, tests/unit/CMakeLists.txt) ---- */

/* One recipient of the fake spool. */
struct frcpt {
    uint64_t id;
    unsigned idx;
    const char *domain;
    const char *tenant;
    bool deferred;
    uint64_t due_ms;
};

#define MAXR 8192
#define MAXSTEP 64

/* What the flush did, in order. */
struct step {
    char kind;       /* 'L': rests ended on a worker; 'R': recipients retimed */
    bool all;        /* L: every destination */
    char names[8][64]; /* L: the domains named (at most 8 kept) */
    size_t n;        /* L: names; R: outcomes */
};

static struct {
    pthread_mutex_t lock; /* the lift runs on the worker's thread */
    struct frcpt r[MAXR];
    size_t nr;
    struct step steps[MAXSTEP];
    size_t nsteps;
    unsigned due_while_resting; /* recipients made due before their rest ended */
    unsigned retimed;
    struct stats_ops ops; /* ops_start's table */
    /* answers through the port (else done runs before queue_update
     * returns); held: never (a dead disk) */
    bool via_port, held;
    unsigned stop_at;     /* the request at which the stop begins; 0: none */
    unsigned requests;    /* queue_update calls */
    unsigned waited_ms;   /* what the waits on a port that had nothing asked for, once
                           * the stop began (each sleeps that long) */
    struct engine *e;
    struct fport *last;   /* the port of the last flush */
    /* bounce: the recipients submitted, the envelope reads (under lock:
     * the test's stopping thread reads it), the read after which a
     * recipient has left the spool (0: never), and how long each read
     * takes (a mass bounce's look at many envelopes) */
    unsigned bounced, gets, gone_at, get_ms;
    /* sites: the worker's answer waits for sites_go (the caller gave
     * up), sites_done once it answered; under lock */
    bool sites_go, sites_done;
    atomic_bool reload_waiting; /* a wait on e->reload_cv began */
} S = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* The test's port: the answers it holds until a wait drains them. */
struct fans {
    queue_done_fn *done;
    void *cookie;
};
struct fport {
    unsigned pending; /* submitted, callback not run */
    size_t n;         /* answered, not drained */
    struct fans ans[64];
};

int __wrap_stats_server_new(const char *socket_path, unsigned socket_mode, const char *http_listen,
                            unsigned top_n, const struct stats_ops *ops,
                            struct stats_server **out, char *err, size_t errlen);
int __wrap_queue_walk(struct queue *q, queue_rcpt_fn *cb, void *arg);
int __wrap_queue_update(struct queue *q, struct queue_port *port,
                        const struct queue_outcome *outcomes, size_t n, queue_done_fn *done,
                        void *cookie);
unsigned __wrap_delivery_lift_holds(struct delivery *d, bool all, const char *const *domains,
                                    size_t n);
struct queue_port *__wrap_queue_port_new(void);
struct queue_port *__wrap_queue_port_free(struct queue_port *port);
int __wrap_queue_port_wait(struct queue_port *port, int timeout_ms);
unsigned __wrap_queue_port_pending(const struct queue_port *port);
void __wrap_delivery_submit_bounce(struct engine *e, uint64_t id, const char *domain,
                                   const unsigned *idx, unsigned n, const struct job_owner *owner);
int __wrap_queue_envelope_get(struct queue *q, uint64_t id, struct queue_envelope **out);
struct queue_envelope *__wrap_queue_envelope_free(struct queue_envelope *env);
int __wrap_delivery_sites(struct delivery *d, struct delivery_site **out, size_t *n,
                          size_t *cap);
int __wrap_pthread_cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *m,
                                  const struct timespec *until);

struct queue_port *
__wrap_queue_port_new(void)
{
    struct fport *p = calloc(1, sizeof(*p));
    S.last = p;
    return (struct queue_port *)p;
}

/* Only with nothing pending, as the real one (which panics). */
struct queue_port *
__wrap_queue_port_free(struct queue_port *port)
{
    struct fport *p = (struct fport *)port;
    if (p == NULL)
        return NULL;
    assert_int_equal(p->pending, 0);
    if (S.last == p)
        S.last = NULL;
    free(p);
    return NULL;
}

int
__wrap_queue_port_wait(struct queue_port *port, int timeout_ms)
{
    struct fport *p = (struct fport *)port;
    if (p->n == 0) {
        if (S.e != NULL && atomic_load(&S.e->stopping))
            S.waited_ms += (unsigned)timeout_ms;
        struct timespec ts = {timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
        return 0;
    }
    size_t n = p->n;
    p->n = 0;
    p->pending -= (unsigned)n;
    for (size_t i = 0; i < n; i++)
        p->ans[i].done(p->ans[i].cookie, 0);
    return (int)n;
}

unsigned
__wrap_queue_port_pending(const struct queue_port *port)
{
    return ((const struct fport *)port)->pending;
}

int
__wrap_stats_server_new(const char *socket_path, unsigned socket_mode, const char *http_listen,
                        unsigned top_n, const struct stats_ops *ops, struct stats_server **out,
                        char *err, size_t errlen)
{
    (void)socket_path;
    (void)socket_mode;
    (void)http_listen;
    (void)top_n;
    (void)err;
    (void)errlen;
    S.ops = *ops;
    *out = NULL;
    return 0;
}

int
__wrap_queue_walk(struct queue *q, queue_rcpt_fn *cb, void *arg)
{
    (void)q;
    for (size_t i = 0; i < S.nr; i++) {
        const struct frcpt *f = &S.r[i];
        char addr[128];
        snprintf(addr, sizeof(addr), "u%zu@%s", i, f->domain);
        struct queue_rcpt r = {
            .addr = addr,
            .domain = f->domain,
            .index = f->idx,
            .state = f->deferred ? QUEUE_RCPT_DEFERRED : QUEUE_RCPT_READY,
            .attempts = f->deferred ? 1 : 0,
            .due_ms = f->deferred ? f->due_ms : 0,
            .last_reply = "",
            .owner = {.tenant = f->tenant, .campaign = "", .pool = ""},
        };
        int rc = cb(arg, f->id, &r);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Has a lift recorded so far ended the rest of domain? (Under S.lock.) */
static bool
rest_ended(const char *domain)
{
    for (size_t i = 0; i < S.nsteps; i++) {
        const struct step *s = &S.steps[i];
        if (s->kind != 'L')
            continue;
        if (s->all)
            return true;
        for (size_t k = 0; k < s->n && k < 8; k++)
            if (strcasecmp(s->names[k], domain) == 0)
                return true;
    }
    return false;
}

/* Committed at once: done runs before the call returns (the real spool
 * runs it later, from the port; cmd_flush must take either). */
int
__wrap_queue_update(struct queue *q, struct queue_port *port, const struct queue_outcome *outcomes,
                    size_t n, queue_done_fn *done, void *cookie)
{
    (void)q;
    (void)port;
    pthread_mutex_lock(&S.lock);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(outcomes[i].kind, QUEUE_RETIME);
        const struct frcpt *f = NULL;
        for (size_t k = 0; k < S.nr && f == NULL; k++)
            if (S.r[k].id == outcomes[i].id && S.r[k].idx == outcomes[i].rcpt)
                f = &S.r[k];
        assert_non_null(f);
        /* Due from now: the due poll may take it this instant. */
        if (!rest_ended(f->domain))
            S.due_while_resting++;
        S.retimed++;
    }
    if (S.nsteps < MAXSTEP)
        S.steps[S.nsteps++] = (struct step){.kind = 'R', .n = n};
    pthread_mutex_unlock(&S.lock);
    if (++S.requests == S.stop_at)
        atomic_store(&S.e->stopping, true); /* engine_stop, meanwhile */
    if (!S.via_port) {
        done(cookie, 0);
        return 0;
    }
    struct fport *p = (struct fport *)port;
    assert_true(p->n < 64);
    p->pending++;
    if (!S.held)
        p->ans[p->n++] = (struct fans){done, cookie}; /* answered: drained by a wait */
    return 0;
}

unsigned
__wrap_delivery_lift_holds(struct delivery *d, bool all, const char *const *domains, size_t n)
{
    (void)d;
    pthread_mutex_lock(&S.lock);
    if (S.nsteps < MAXSTEP) {
        struct step *s = &S.steps[S.nsteps++];
        memset(s, 0, sizeof(*s));
        s->kind = 'L';
        s->all = all;
        s->n = n;
        for (size_t i = 0; i < n && i < 8; i++)
            snprintf(s->names[i], sizeof(s->names[i]), "%s", domains[i]);
    }
    pthread_mutex_unlock(&S.lock);
    return 1; /* one destination rested */
}

/* The workers' side of a bounce: counted, committed when the test says
 * (gone_at). */
void
__wrap_delivery_submit_bounce(struct engine *e, uint64_t id, const char *domain,
                              const unsigned *idx, unsigned n, const struct job_owner *owner)
{
    (void)e;
    (void)id;
    (void)domain;
    (void)idx;
    (void)owner;
    S.bounced += n;
}

/* The message with its recipient 0 as the fake spool holds it (last_ms
 * 0, as queue_walk gave it), until the gone_at'th read: then none. */
int
__wrap_queue_envelope_get(struct queue *q, uint64_t id, struct queue_envelope **out)
{
    (void)q;
    pthread_mutex_lock(&S.lock);
    unsigned k = ++S.gets;
    pthread_mutex_unlock(&S.lock);
    if (S.get_ms > 0) {
        struct timespec ts = {0, (long)S.get_ms * 1000000L};
        nanosleep(&ts, NULL);
    }
    *out = NULL;
    if (S.gone_at != 0 && k >= S.gone_at)
        return QUEUE_ENOTFOUND;
    struct queue_envelope *env = calloc(1, sizeof(*env) + sizeof(struct queue_rcpt));
    assert_non_null(env);
    struct queue_rcpt *r = (struct queue_rcpt *)(env + 1);
    *r = (struct queue_rcpt){.addr = "u0@a.test", .domain = "a.test", .index = 0,
                             .state = QUEUE_RCPT_DEFERRED, .last_reply = ""};
    env->id = id;
    env->sender = "";
    env->nrcpt = 1;
    env->rcpt = r;
    *out = env;
    return 0;
}

struct queue_envelope *
__wrap_queue_envelope_free(struct queue_envelope *env)
{
    free(env);
    return NULL;
}

/* Poll flag (under S.lock) every ms for up to 30 s: whether it was set. */
static bool
flag_wait(const bool *flag)
{
    struct timespec tick = {0, 1000000L};
    for (unsigned i = 0; i < 30000; i++) {
        pthread_mutex_lock(&S.lock);
        bool set = *flag;
        pthread_mutex_unlock(&S.lock);
        if (set)
            return true;
        nanosleep(&tick, NULL);
    }
    return false;
}

/* A worker's sites: after its caller gave up waiting (WAIT_MS; the test
 * says when: sites_go), and failed. */
int
__wrap_delivery_sites(struct delivery *d, struct delivery_site **out, size_t *n, size_t *cap)
{
    (void)d;
    (void)out;
    (void)cap;
    *n = 0;
    flag_wait(&S.sites_go);
    pthread_mutex_lock(&S.lock);
    S.sites_done = true;
    pthread_mutex_unlock(&S.lock);
    return -ENOMEM;
}

/* Every wait of the engine's, as it was; one on the reload's condition
 * variable is told first (its caller holds reload_lock: whoever takes
 * the lock after seeing the flag finds it waiting). libc's own is found
 * by name: ld (2.40) leaves __real_ of a versioned libc symbol undefined. */
int
__wrap_pthread_cond_timedwait(pthread_cond_t *cv, pthread_mutex_t *m, const struct timespec *until)
{
    typedef int wait_fn(pthread_cond_t *, pthread_mutex_t *, const struct timespec *);
    static wait_fn *_Atomic real;
    wait_fn *fn = atomic_load(&real);
    if (fn == NULL) {
        *(void **)&fn = dlsym(RTLD_NEXT, "pthread_cond_timedwait");
        if (fn == NULL)
            abort();
        atomic_store(&real, fn);
    }
    if (S.e != NULL && cv == &S.e->reload_cv)
        atomic_store(&S.reload_waiting, true);
    return fn(cv, m, until);
}

/* ---- the engine around it: one real worker, the rest absent ---- */

struct fx {
    struct engine e;
    struct config *cfg;
    struct worker w;
    struct delivery *dlv[1];
    struct server_worker *srv[1]; /* none: what engine_drain finds */
    char conf[64];
    char sock[80];
};

static int
setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    assert_non_null(f);
    snprintf(f->conf, sizeof(f->conf), "/tmp/sluice-flush-XXXXXX");
    int fd = mkstemp(f->conf);
    assert_true(fd >= 0);
    /* The socket is never made (stats_server_new is the test's). */
    snprintf(f->sock, sizeof(f->sock), "%s.sock", f->conf);
    char text[512];
    int n = snprintf(text, sizeof(text),
                     "[server]\nhostname = relay.test\nlisten = 127.0.0.1:2587\n"
                     "[stats]\nsocket = %s\n",
                     f->sock);
    assert_int_equal(write(fd, text, (size_t)n), n);
    close(fd);
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    int rc = config_load(f->conf, &f->cfg, errs);
    fclose(errs);
    if (rc != 0)
        fprintf(stderr, "%s", buf);
    free(buf);
    unlink(f->conf);
    assert_int_equal(rc, 0);
    assert_int_equal(worker_init(&f->w, 0, 64, NULL), 0); /* (main skips without io_uring) */
    assert_int_equal(worker_start(&f->w), 0);
    f->e.cfg = f->cfg;
    f->e.nworkers = 1;
    f->e.workers = &f->w;
    f->e.dlv = f->dlv; /* read by the wrapped delivery_lift_holds, and engine_drain */
    f->e.srv = f->srv;
    f->e.queue = (struct queue *)f; /* a token: every spool call is the test's */
    /* as engine_start: the reload's wait is on the monotonic clock */
    pthread_mutex_init(&f->e.reload_lock, NULL);
    clock_cond_init_mono(&f->e.reload_cv);
    char err[256];
    assert_int_equal(ops_start(&f->e, err, sizeof(err)), 0);
    assert_non_null(S.ops.command);
    pthread_mutex_lock(&S.lock);
    S.nr = S.nsteps = 0;
    S.due_while_resting = S.retimed = 0;
    pthread_mutex_unlock(&S.lock);
    S.via_port = S.held = false;
    S.stop_at = S.requests = S.waited_ms = 0;
    S.bounced = S.gets = S.gone_at = S.get_ms = 0;
    S.sites_go = S.sites_done = false;
    atomic_store(&S.reload_waiting, false);
    S.e = &f->e;
    S.last = NULL;
    *state = f;
    return 0;
}

static int
teardown(void **state)
{
    struct fx *f = *state;
    alarm(0); /* a backstop a failed assertion left armed ends with its test */
    if (S.last != NULL) { /* left to the exit by a flush cut: the exit's */
        free(S.last);
        S.last = NULL;
    }
    ops_stop(&f->e);
    worker_stop(&f->w);
    assert_int_equal(worker_join(&f->w), 0);
    worker_fini(&f->w);
    pthread_mutex_destroy(&f->e.reload_lock);
    pthread_cond_destroy(&f->e.reload_cv);
    config_free(f->cfg);
    free(f);
    return 0;
}

/* n deferred recipients of domain (tenant: NULL for none), due in an
 * hour, one message each. */
static void
spool_add(const char *domain, const char *tenant, size_t n)
{
    static uint64_t next_id = 1;
    for (size_t i = 0; i < n; i++) {
        assert_true(S.nr < MAXR);
        S.r[S.nr++] = (struct frcpt){.id = next_id++, .idx = 0, .domain = domain,
                                     .tenant = tenant ? tenant : "", .deferred = true,
                                     .due_ms = clock_unix_ms() + 3600 * 1000};
    }
}

/* Run "flush ARGS" as the stats thread does and fail it; its error. */
static void
flush_fails(const char *args, char *err, size_t cap)
{
    struct json out;
    json_init(&out);
    int rc = S.ops.command(S.ops.arg, "flush", args, NULL, &out, err, cap);
    assert_int_not_equal(rc, 0);
    json_fini(&out);
}

/* Run "flush ARGS" as the stats thread does; the answer's JSON. */
static void
flush(const char *args, char *answer, size_t cap)
{
    struct json out;
    json_init(&out);
    char err[256] = "";
    int rc = S.ops.command(S.ops.arg, "flush", args, NULL, &out, err, sizeof(err));
    if (rc != 0)
        fprintf(stderr, "flush %s: %s\n", args, err);
    assert_int_equal(rc, 0);
    assert_false(json_failed(&out));
    snprintf(answer, cap, "%.*s", (int)out.len, out.buf);
    json_fini(&out);
}

/* The steps as text: "L*" for a lift of every rest, "L:a.test,b.test"
 * for named ones, "R1000" for a retime of 1000 recipients. */
static void
steps_str(char *buf, size_t cap)
{
    size_t off = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < S.nsteps && off < cap; i++) {
        const struct step *s = &S.steps[i];
        int n;
        if (s->kind == 'R') {
            n = snprintf(buf + off, cap - off, "%sR%zu", i ? " " : "", s->n);
        } else if (s->all) {
            n = snprintf(buf + off, cap - off, "%sL*", i ? " " : "");
        } else {
            n = snprintf(buf + off, cap - off, "%sL:", i ? " " : "");
            for (size_t k = 0; k < s->n && k < 8 && n > 0 && off + (size_t)n < cap; k++)
                n += snprintf(buf + off + n, cap - off - n, "%s%s", k ? "," : "", s->names[k]);
        }
        if (n < 0)
            break;
        off += (size_t)n;
    }
}

/* ---- the cases ---- */

/* flush (every domain): the rests of every destination end, then the
 * deferred come due. */
static void
flush_all_ends_the_rests_before_the_recipients_come_due(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 2);
    spool_add("b.test", NULL, 1);
    char answer[512], steps[512];
    flush("", answer, sizeof(answer));
    assert_int_equal(S.retimed, 3);
    assert_int_equal(S.due_while_resting, 0);
    steps_str(steps, sizeof(steps));
    assert_string_equal(steps, "L* R3");
    assert_non_null(strstr(answer, "\"rests_ended\":1"));
}

/* flush DOMAIN: that domain's rests, then its recipients; the other
 * domain's mail stays as it was. */
static void
flush_domain_ends_its_rest_first(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 2);
    spool_add("b.test", NULL, 1);
    char answer[512], steps[512];
    flush("A.test", answer, sizeof(answer));
    assert_int_equal(S.due_while_resting, 0);
    steps_str(steps, sizeof(steps));
    assert_string_equal(steps, "L:a.test R2");
}

/* flush tenant=T: the rests of the domains of T's deferred mail, then
 * T's recipients. */
static void
flush_tenant_ends_its_domains_rests_first(void **state)
{
    (void)state;
    spool_add("c.test", "acme", 1);
    spool_add("b.test", "other", 1);
    spool_add("a.test", "acme", 2);
    char answer[512], steps[512];
    flush("tenant=acme", answer, sizeof(answer));
    assert_int_equal(S.due_while_resting, 0);
    steps_str(steps, sizeof(steps));
    assert_string_equal(steps, "L:a.test,c.test R3");
}

/* An outage's queue: more than one spool commit of recipients. Every
 * batch comes due after the rests ended, the first as the last (the
 * window a wrong order opens grows with each commit). */
static void
flush_of_many_batches_ends_the_rest_before_the_first(void **state)
{
    (void)state;
    spool_add("down.test", NULL, 2500);
    char answer[512], steps[512];
    flush("", answer, sizeof(answer));
    assert_int_equal(S.retimed, 2500);
    assert_int_equal(S.due_while_resting, 0);
    steps_str(steps, sizeof(steps));
    assert_string_equal(steps, "L* R1000 R1000 R500");
    assert_non_null(strstr(answer, "\"recipients\":2500"));
}

/* A scope that selects nobody ends no rest and retimes nothing. */
static void
flush_of_nobody_ends_nothing(void **state)
{
    (void)state;
    spool_add("a.test", "acme", 1);
    char answer[512], steps[512];
    flush("tenant=nobody", answer, sizeof(answer));
    steps_str(steps, sizeof(steps));
    assert_string_equal(steps, "");
    assert_non_null(strstr(answer, "\"rests_ended\":0"));
}

/* Recipients of the scope already due (a retry within the next two
 * seconds, or overdue) are left to the due poll, and the answer says
 * how many: "recipients":0 alone read as nothing deferred. */
static void
flush_counts_the_recipients_already_due(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 2);
    spool_add("a.test", NULL, 3);
    for (size_t i = S.nr - 3; i < S.nr; i++)
        S.r[i].due_ms = clock_unix_ms() - 1000; /* overdue */
    spool_add("b.test", NULL, 1);
    S.r[S.nr - 1].due_ms = clock_unix_ms() - 1000; /* another domain's */
    char answer[512];
    flush("a.test", answer, sizeof(answer));
    assert_int_equal(S.retimed, 2);
    assert_non_null(strstr(answer, "\"recipients\":2"));
    assert_non_null(strstr(answer, "\"already_due\":3"));
}

/* The wall-clock backstop of a flush that a stop overtakes: one that
 * does not give up (its waits go on, or it never waits) fails the test
 * within BACKSTOP_S, not at ctest's timeout minutes later. What it bounds
 * is the whole flush on a loaded machine under ASan (a second or two),
 * so it is generous; the flush's own bound is asked apart (waited_ms). */
#define BACKSTOP_S 30
#define STR_(x)    #x
#define STR(x)     STR_(x)

static const char *backstop_what = "";

static void
backstop_fired(int sig)
{
    (void)sig;
    static const char head[] = "\nbackstop: ";
    static const char tail[] = ": no end within " STR(BACKSTOP_S) " s of wall time\n";
    (void)!write(2, head, sizeof(head) - 1);
    (void)!write(2, backstop_what, strlen(backstop_what));
    (void)!write(2, tail, sizeof(tail) - 1);
    _exit(1);
}

/* Fail the process (its exit 1 a failed test to ctest) unless
 * backstop_clear comes within BACKSTOP_S. */
static void
backstop_arm(const char *what)
{
    backstop_what = what;
    struct sigaction sa = {.sa_handler = backstop_fired};
    sigemptyset(&sa.sa_mask);
    assert_int_equal(sigaction(SIGALRM, &sa, NULL), 0);
    alarm(BACKSTOP_S);
}

static void
backstop_clear(void)
{
    alarm(0);
}

/* A stop begins while a flush's requests are in flight (the fourth
 * fills the window) on a spool that answers: the four are waited for
 * (told, the port freed, nothing left to the exit), none is submitted
 * after, and the command says the stop cut it, not that the spool
 * refused. The cut gave up at once, the port left with its four
 * requests: "retimed 0 ... the spool refused: Operation canceled". */
static void
flush_overtaken_by_a_stop_waits_for_the_answers_in_flight(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 8000);
    S.via_port = true;
    S.stop_at = 4;
    char err[256] = "";
    backstop_arm("a flush overtaken by a stop, its answers in flight");
    flush_fails("", err, sizeof(err));
    backstop_clear();
    assert_int_equal(S.requests, 4);
    assert_null(S.last); /* freed: every answer came */
    assert_non_null(strstr(err, "flushed 4000 of 8000"));
    assert_null(strstr(err, "refused"));
}

/* The same on a spool that does not answer (a dead disk): the flush
 * gives up within a second of the stop, its port left to the exit. */
static void
flush_overtaken_by_a_stop_on_a_dead_spool_gives_up(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 8000);
    S.via_port = S.held = true;
    S.stop_at = 4;
    char err[256] = "";
    backstop_arm("a flush overtaken by a stop on a dead spool");
    flush_fails("", err, sizeof(err));
    backstop_clear();
    /* It gave up (else the waits went on for ever: the backstop ends
     * the test then), and within a second of the stop: the waits it
     * asked for after the stop began add up to FLUSH_STOP_GRACE_MS (1 s)
     * at most. What the machine took besides, a loaded one more, is not
     * the flush's. */
    print_message("waited %u ms after the stop began\n", S.waited_ms);
    assert_true(S.waited_ms > 0 && S.waited_ms <= 1000);
    assert_int_equal(S.requests, 4);
    assert_non_null(S.last);
    assert_int_equal(S.last->pending, 4);
    assert_non_null(strstr(err, "flushed 0 of 8000"));
}

/* Run "bounce ARGS" as the stats thread does: its return, the answer's
 * JSON or the error in text. */
static int
bounce(const char *args, char *text, size_t cap)
{
    struct json out;
    json_init(&out);
    char err[256] = "";
    int rc = S.ops.command(S.ops.arg, "bounce", args, NULL, &out, err, sizeof(err));
    if (rc == 0)
        snprintf(text, cap, "%.*s", (int)out.len, out.buf);
    else
        snprintf(text, cap, "%s", err);
    json_fini(&out);
    return rc;
}

/* bounce DOMAIN answers once the spool no longer holds the recipient:
 * the workers committed it. */
static void
bounce_answers_once_the_spool_shows_it_done(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 1);
    S.gone_at = 3;
    char text[512];
    assert_int_equal(bounce("a.test", text, sizeof(text)), 0);
    assert_int_equal(S.bounced, 1);
    assert_int_equal(S.gets, 3);
    assert_non_null(strstr(text, "\"recipients\":1"));
    assert_non_null(strstr(text, "\"still_queued\":0"));
}

/* The main thread's stop, once the bounce has looked at the spool
 * twice: e->stopping, as engine_stop sets it (it wakes no one). */
static void *
stop_after_two_looks(void *arg)
{
    uint64_t *at = arg;
    struct timespec tick = {0, 1000000L};
    for (;;) {
        pthread_mutex_lock(&S.lock);
        unsigned k = S.gets;
        pthread_mutex_unlock(&S.lock);
        if (k >= 2)
            break;
        nanosleep(&tick, NULL);
    }
    *at = clock_mono_ms();
    atomic_store(&S.e->stopping, true);
    return NULL;
}

/* A stop while the bounce waits for a commit that does not come (the
 * recipient stays in the spool): the wait ends within a look and a nap
 * of the stop (each 200 ms here: a look at many envelopes), not at its
 * 8 s (BOUNCE_WAIT_MS), which held the stop in ops_stop; the answer
 * says the stop cut it, and how many are still queued or not known to be
 * committed. */
static void
bounce_wait_ends_at_the_stop(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 1);
    S.get_ms = 200;
    uint64_t stop_at = 0;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, stop_after_two_looks, &stop_at), 0);
    char text[512];
    int rc = bounce("a.test", text, sizeof(text));
    uint64_t end = clock_mono_ms();
    assert_int_equal(pthread_join(th, NULL), 0);
    print_message("the bounce answered %llu ms after the stop\n",
                  (unsigned long long)(end - stop_at));
    /* a look under way (200 ms) and a nap's step (20 ms); a loaded
     * machine more, never the wait's 8 s */
    assert_true(end - stop_at < 2000);
    assert_int_equal(S.bounced, 1);
    assert_int_not_equal(rc, 0);
    assert_non_null(strstr(text, "bounced 1, then sluice stopped: 1 of them still queued or not known"));
}

/* A worker that answers after its caller gave up (wcall_run's
 * -ETIMEDOUT), with a failure: the answer says it did not answer, and
 * its failure is written under the call's lock, as the caller reads it
 * (wcall_fail, wcall_rc). The write was bare: a data race with the
 * caller's read that a build with -fsanitize=thread reports (the value
 * read was right all the same: what this test sees without it). */
static void
sites_of_a_late_failed_worker_say_it_did_not_answer(void **state)
{
    (void)state;
    struct json out;
    json_init(&out);
    char err[256] = "";
    int rc = S.ops.command(S.ops.arg, "sites", "", NULL, &out, err, sizeof(err));
    json_fini(&out);
    /* the worker answers now, after its caller gave up, however late
     * either thread ran: no margin of the machine's to lose */
    pthread_mutex_lock(&S.lock);
    S.sites_go = true;
    pthread_mutex_unlock(&S.lock);
    assert_true(flag_wait(&S.sites_done));
    assert_int_not_equal(rc, 0);
    assert_string_equal(err, "a worker did not answer");
}

/* Run "reload" as the stats thread does: its return, the answer's JSON
 * or the error in text. */
static int
reload(char *text, size_t cap)
{
    struct json out;
    json_init(&out);
    char err[256] = "";
    int rc = S.ops.command(S.ops.arg, "reload", "", NULL, &out, err, sizeof(err));
    if (rc == 0)
        snprintf(text, cap, "%.*s", (int)out.len, out.buf);
    else
        snprintf(text, cap, "%s", err);
    json_fini(&out);
    return rc;
}

/* The SIGHUP the command raised (blocked in every thread: main), within
 * ms; false if none came. */
static bool
hup_taken(unsigned ms)
{
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    return sigtimedwait(&hup, NULL, &t) == SIGHUP;
}

/* The main thread's part while a reload command waits: it takes the
 * SIGHUP, then, once the command waits on reload_cv, either begins the
 * stop (engine_stop's first steps) or the drain (engine_drain), or
 * finishes the reload and then begins the stop or the drain. */
struct main_part {
    bool reload_first; /* engine_reload_done before the stop or the drain */
    bool drain;        /* the drain, not the stop */
    bool hup, waiting; /* what it saw */
    bool drain_ran;    /* engine_drain returned as drain_begin expects */
    uint64_t stop_at;  /* mono ms */
};

/* The drain as main.c begins it, on an engine with nothing to drain (no
 * server, no delivery): engine_drain returns at once, its flag set.
 * False if it returned otherwise (told, not asserted: main_part_run's
 * thread is not the test's, whose failure cmocka's longjmp ends). */
static bool
drain_begin(void)
{
    return engine_drain(S.e, 0, NULL) == ENGINE_DRAIN_TIMED_OUT;
}

static void *
main_part_run(void *arg)
{
    struct main_part *m = arg;
    m->hup = hup_taken(10000);
    struct timespec tick = {0, 1000000L};
    for (unsigned i = 0; i < 10000 && !(m->waiting = atomic_load(&S.reload_waiting)); i++)
        nanosleep(&tick, NULL);
    if (m->reload_first) {
        /* The flag of the stop or the drain first, waking no one; then
         * the outcome, whose wake finds both: a reload that finished is
         * told as it went. */
        atomic_store(m->drain ? &S.e->draining : &S.e->stopping, true);
        engine_reload_done(S.e, true, NULL);
        m->stop_at = clock_mono_ms();
        return NULL;
    }
    m->stop_at = clock_mono_ms();
    if (m->drain) {
        m->drain_ran = drain_begin();
        return NULL;
    }
    atomic_store(&S.e->stopping, true); /* as engine_stop */
    engine_reload_stopping(S.e);
    return NULL;
}

/* Run `reload` while the main thread's part m runs beside it: the
 * command's return, its answer in text, when it came (mono ms) in *at.
 * m saw the SIGHUP and the command in its wait. */
static int
reload_beside(struct main_part *m, const char *what, char *text, size_t cap, uint64_t *at)
{
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, main_part_run, m), 0);
    backstop_arm(what);
    int rc = reload(text, cap);
    *at = clock_mono_ms();
    backstop_clear();
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_true(m->hup);
    assert_true(m->waiting);
    assert_true(!m->drain || m->reload_first || m->drain_ran);
    return rc;
}

/* The drain or the stop begins while the command waits: it answers at
 * once, the error want. */
static void
reload_overtaken(bool drain, const char *want)
{
    struct main_part m = {.drain = drain};
    char text[512];
    uint64_t end;
    const char *what =
        drain ? "a reload's wait overtaken by a drain" : "a reload's wait overtaken by a stop";
    int rc = reload_beside(&m, what, text, sizeof(text), &end);
    print_message("the reload answered %llu ms after the %s began\n",
                  (unsigned long long)(end - m.stop_at), drain ? "drain" : "stop");
    assert_int_not_equal(rc, 0);
    assert_string_equal(text, want);
    assert_true(end - m.stop_at < 2000); /* a loaded machine; never the wait's 8 s */
}

/* The reload finishes as the drain or the stop begins, both seen by
 * the same wake: the reload is told as it went. */
static void
reload_finished_first(bool drain)
{
    struct main_part m = {.reload_first = true, .drain = drain};
    char text[512];
    uint64_t end;
    const char *what =
        drain ? "a reload finished as the drain began" : "a reload finished as the stop began";
    int rc = reload_beside(&m, what, text, sizeof(text), &end);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(text, "\"reload\":\"done\""));
}

/* A stop while `reload` waits for its outcome: the main thread takes no
 * SIGHUP once it stops, and the wait went on for its 8 s
 * (RELOAD_WAIT_MS) inside the command thread ops_stop waits for, which
 * held the stop as long, then answered "requested". It ends at the stop,
 * an error that says the reload was not done. */
static void
reload_wait_ends_at_the_stop(void **state)
{
    (void)state;
    reload_overtaken(false, "sluice is stopping: the reload was not done "
                            "(the next start reads the file)");
}

/* A command begun once the stop has begun (stopping set, ops_stop not
 * yet there: the stop's first stages), one queued behind a bounce or a
 * flush that the stop ended, is not run, as those the command thread
 * never came to are not (stats_cmd_stop): it ran (this flush retimed
 * its recipients as the stop went on, answered "ok"; the queued command
 * of test_ops' test_stop_ends_a_bounce_waiting_for_its_commits got its
 * answer whenever the bounce gave up before ops_stop). A reload raises
 * no SIGHUP. */
static void
command_begun_after_the_stop_began_is_not_run(void **state)
{
    (void)state;
    spool_add("a.test", NULL, 2);
    atomic_store(&S.e->stopping, true);
    struct json out;
    json_init(&out);
    char err[256] = "";
    int rc = S.ops.command(S.ops.arg, "flush", "a.test", NULL, &out, err, sizeof(err));
    json_fini(&out);
    assert_int_not_equal(rc, 0);
    assert_string_equal(err, STATS_CMD_NOT_RUN);
    assert_int_equal(S.retimed, 0);
    assert_int_equal(S.nsteps, 0);
    char text[512];
    backstop_arm("a reload asked after the stop began");
    rc = reload(text, sizeof(text));
    backstop_clear();
    assert_int_not_equal(rc, 0);
    assert_string_equal(text, STATS_CMD_NOT_RUN);
    assert_false(hup_taken(0));
}

/* A reload that finished before the stop is told as it went, the stop
 * seen by the same wake notwithstanding. */
static void
reload_finished_before_the_stop_is_told_as_done(void **state)
{
    (void)state;
    reload_finished_first(false);
}

/* A drain while `reload` waits for its outcome: the main thread takes
 * no SIGHUP once it drains (it waits for a second TERM only), and the
 * wait went on for its 8 s (RELOAD_WAIT_MS), then answered "requested"
 * for a reload that would never be done. It ends at the drain's start,
 * an error that says so. */
static void
reload_wait_ends_at_the_drain(void **state)
{
    (void)state;
    reload_overtaken(true, "sluice is draining: the reload was not done "
                           "(the next start reads the file)");
}

/* A reload asked once the drain has begun answers at once, as above; one
 * asked once the stop has followed the drain is not run (as any command
 * begun once the stop began). */
static void
reload_after_the_drain_began_answers_at_once(void **state)
{
    (void)state;
    assert_true(drain_begin());
    char text[512];
    uint64_t start = clock_mono_ms();
    backstop_arm("a reload asked after the drain began");
    int rc = reload(text, sizeof(text));
    uint64_t took = clock_mono_ms() - start;
    (void)hup_taken(1000); /* its SIGHUP, left pending by now */
    print_message("the reload answered in %llu ms\n", (unsigned long long)took);
    assert_int_not_equal(rc, 0);
    assert_string_equal(text, "sluice is draining: the reload was not done "
                              "(the next start reads the file)");
    assert_true(took < 2000);
    atomic_store(&S.e->stopping, true); /* as engine_stop, after the drain */
    rc = reload(text, sizeof(text));
    backstop_clear();
    assert_int_not_equal(rc, 0);
    assert_string_equal(text, STATS_CMD_NOT_RUN); /* not run at all: no SIGHUP */
    assert_false(hup_taken(0));
}

/* A reload that finished before the drain began is told as it went, the
 * drain seen by the same wake notwithstanding. */
static void
reload_finished_before_the_drain_is_told_as_done(void **state)
{
    (void)state;
    reload_finished_first(true);
}

int
main(void)
{
    /* The reload command's SIGHUP (kill(getpid())) is the test's to take
     * (hup_taken): blocked before any thread starts, every one inherits
     * it. */
    sigset_t hup;
    sigemptyset(&hup);
    sigaddset(&hup, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &hup, NULL);
    /* A worker's ring, or skip (77: ctest's SKIP_RETURN_CODE): a skip()
     * in a setup is reported as a failed setup. */
    struct worker probe;
    memset(&probe, 0, sizeof(probe));
    if (worker_init(&probe, 0, 64, NULL) < 0) {
        fprintf(stderr, "no io_uring here: skipped\n");
        return 77;
    }
    worker_fini(&probe);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(flush_all_ends_the_rests_before_the_recipients_come_due,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(flush_domain_ends_its_rest_first, setup, teardown),
        cmocka_unit_test_setup_teardown(flush_tenant_ends_its_domains_rests_first, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(flush_of_many_batches_ends_the_rest_before_the_first,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(flush_of_nobody_ends_nothing, setup, teardown),
        cmocka_unit_test_setup_teardown(flush_counts_the_recipients_already_due, setup, teardown),
        cmocka_unit_test_setup_teardown(flush_overtaken_by_a_stop_waits_for_the_answers_in_flight,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(flush_overtaken_by_a_stop_on_a_dead_spool_gives_up, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(bounce_answers_once_the_spool_shows_it_done, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(bounce_wait_ends_at_the_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(sites_of_a_late_failed_worker_say_it_did_not_answer,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(reload_wait_ends_at_the_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(command_begun_after_the_stop_began_is_not_run, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(reload_finished_before_the_stop_is_told_as_done, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(reload_wait_ends_at_the_drain, setup, teardown),
        cmocka_unit_test_setup_teardown(reload_after_the_drain_began_answers_at_once, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(reload_finished_before_the_drain_is_told_as_done, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
