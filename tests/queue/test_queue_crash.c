/*
 * Crash test: a child process writes to the spool as fast as it can from
 * several threads (messages with random bodies and recipient counts, and
 * outcome updates) and reports through a pipe what it is about to submit
 * and what was acknowledged; the parent kills it with SIGKILL at a random
 * moment, reopens the spool and checks that
 *   - the spool is consistent (queue_check: no partial message, no orphan
 *     recipient, no message without recipients, index matches states);
 *   - every acknowledged message is there with its exact body (bodies are
 *     derived from the id, so every byte is checked) and envelope;
 *   - every acknowledged outcome is kept; an outcome submitted but not
 *     acknowledged is either fully there or not at all;
 *   - nothing is there that the child never submitted;
 *   - what a round settled stays settled in later rounds.
 * Many rounds, each a fresh child on the same spool.
 *
 * Threading: the parent is single-threaded and has no queue open when it
 * forks; the child starts its own threads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "queue/queue.h"

#define ROUNDS        60
#define MIN_ROUNDS    15    /* then the budget may end the run */
#define BUDGET_MS     60000
#define CHILD_THREADS 4
#define WINDOW        4
#define MAX_RCPT      40
#define BIG_BODY      (300 * 1024) /* above the inline limit: chunked */
#define MAX_BODY      BIG_BODY

enum rec_type { REC_ENQ_INTENT = 1, REC_ENQ_ACK, REC_OUT_INTENT, REC_OUT_ACK };

/* One pipe record; 32 bytes, written with one write(2), so atomic. */
struct rec {
    uint8_t type;
    uint8_t kind; /* enum queue_outcome_kind */
    uint16_t rcpt;
    uint32_t nrcpt;
    uint64_t id;
    uint64_t due;
    uint32_t body_len;
    uint32_t pad;
};
_Static_assert(sizeof(struct rec) == 32, "pipe record size");

static uint64_t
mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* The body of message id: every byte depends on the id. */
static void
fill_body(char *b, size_t len, uint64_t id)
{
    uint64_t x = mix(id) | 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b[i] = (char)(x >> 56);
    }
}

static void
rcpt_addr(char *out, size_t len, uint64_t id, unsigned i)
{
    snprintf(out, len, "r%u.%llx@D%u.Example", i, (unsigned long long)(id & 0xffff), i % 3);
}

/* ---- the child ---- */

struct child {
    struct queue *q;
    int fd;
};

struct cslot {
    struct cthread *t;
    bool busy;
    bool is_update;
    uint64_t id;
    unsigned nrcpt;
    char *body;
    struct queue_outcome out[MAX_RCPT];
    size_t nout;
};

struct cthread {
    struct child *c;
    pthread_t th;
    struct queue_port *port;
    uint64_t rng;
    struct cslot slots[WINDOW];
};

static void
emit(int fd, const struct rec *r)
{
    if (write(fd, r, sizeof(*r)) != (ssize_t)sizeof(*r))
        _exit(5);
}

static uint64_t
rnd(struct cthread *t)
{
    t->rng = t->rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return t->rng >> 33;
}

static void child_start(struct cslot *s);

static void
child_done(void *cookie, int rc)
{
    struct cslot *s = cookie;
    struct cthread *t = s->t;
    if (rc != 0) {
        fprintf(stderr, "child: %s failed: %s\n", s->is_update ? "update" : "enqueue",
                queue_strerror(rc));
        _exit(6);
    }
    if (!s->is_update) {
        struct rec r = {.type = REC_ENQ_ACK, .id = s->id, .nrcpt = s->nrcpt};
        emit(t->c->fd, &r);
        /* sometimes decide outcomes for some of its recipients */
        if (rnd(t) % 10 < 4) {
            s->nout = 0;
            for (unsigned i = 0; i < s->nrcpt; i++) {
                if (rnd(t) % 2)
                    continue;
                unsigned k = (unsigned)(rnd(t) % 3);
                s->out[s->nout++] = (struct queue_outcome){
                    .id = s->id,
                    .rcpt = i,
                    .kind = (enum queue_outcome_kind)k,
                    .due_ms = k == QUEUE_DEFERRED ? clock_unix_ms() + 1000 + rnd(t) % 100000 : 0,
                    .code = k == QUEUE_DELIVERED ? 250
                            : k == QUEUE_BOUNCED ? 550
                                                 : 451,
                    .reply = "4.2.0 test reply",
                };
            }
            if (s->nout > 0) {
                for (size_t i = 0; i < s->nout; i++) {
                    struct rec ri = {.type = REC_OUT_INTENT,
                                     .kind = (uint8_t)s->out[i].kind,
                                     .rcpt = (uint16_t)s->out[i].rcpt,
                                     .id = s->id,
                                     .due = s->out[i].due_ms};
                    emit(t->c->fd, &ri);
                }
                s->is_update = true;
                int urc = queue_update(t->c->q, t->port, s->out, s->nout, child_done, s);
                if (urc != 0)
                    _exit(7);
                return;
            }
        }
    } else {
        for (size_t i = 0; i < s->nout; i++) {
            struct rec r = {.type = REC_OUT_ACK,
                            .kind = (uint8_t)s->out[i].kind,
                            .rcpt = (uint16_t)s->out[i].rcpt,
                            .id = s->id,
                            .due = s->out[i].due_ms};
            emit(t->c->fd, &r);
        }
    }
    s->busy = false;
}

static void
child_start(struct cslot *s)
{
    struct cthread *t = s->t;
    uint64_t roll = rnd(t);
    size_t len = roll % 100 == 0 ? BIG_BODY + rnd(t) % 5000 : (size_t)(rnd(t) % 6000);
    unsigned nrcpt = roll % 37 == 0 ? MAX_RCPT : 1 + (unsigned)(rnd(t) % 5);
    struct queue_rcpt rcpt[MAX_RCPT];
    char addr[MAX_RCPT][64];
    s->id = queue_id_next(t->c->q);
    for (unsigned i = 0; i < nrcpt; i++) {
        rcpt_addr(addr[i], sizeof(addr[i]), s->id, i);
        rcpt[i] = (struct queue_rcpt){.addr = addr[i]};
    }
    fill_body(s->body, len, s->id);
    struct queue_envelope env = {
        .id = s->id, .sender = "sender@example.com", .nrcpt = nrcpt, .rcpt = rcpt};
    struct rec r = {.type = REC_ENQ_INTENT, .id = s->id, .nrcpt = nrcpt, .body_len = (uint32_t)len};
    emit(t->c->fd, &r);
    s->nrcpt = nrcpt;
    s->is_update = false;
    s->busy = true;
    /* split the body in two iovecs to exercise that path too */
    struct iovec iov[2] = {{s->body, len / 3}, {s->body + len / 3, len - len / 3}};
    if (queue_enqueue(t->c->q, t->port, &env, iov, 2, child_done, s) != 0)
        _exit(8);
}

static void *
child_thread(void *arg)
{
    struct cthread *t = arg;
    for (;;) {
        for (int i = 0; i < WINDOW; i++)
            if (!t->slots[i].busy)
                child_start(&t->slots[i]);
        queue_port_wait(t->port, 100);
    }
    return NULL;
}

static void
child_main(const char *path, int fd, uint64_t seed)
{
    struct queue_config cfg = {0};
    char err[512];
    conf_defaults(queue_conf_keys, &cfg, err, sizeof(err));
    free(cfg.path);
    cfg.path = strdup(path);
    cfg.map_size = 1ULL << 30;
    struct child c = {.fd = fd};
    int rc = queue_open(&cfg, &c.q, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "child: %s\n", err);
        _exit(4);
    }
    struct cthread t[CHILD_THREADS];
    for (int i = 0; i < CHILD_THREADS; i++) {
        memset(&t[i], 0, sizeof(t[i]));
        t[i].c = &c;
        t[i].rng = mix(seed + (uint64_t)i * 7777);
        t[i].port = queue_port_new();
        for (int j = 0; j < WINDOW; j++) {
            t[i].slots[j].t = &t[i];
            t[i].slots[j].body = malloc(MAX_BODY + 5000);
        }
        pthread_create(&t[i].th, NULL, child_thread, &t[i]);
    }
    for (;;)
        pause(); /* until the parent's SIGKILL */
}

/* ---- the parent's model ---- */

enum rstate { R_READY, R_DEFERRED, R_GONE };

struct rexp {
    uint8_t state;  /* settled state (enum rstate) */
    uint8_t intent; /* 0 or 1 + kind of an outcome submitted */
    bool intent_acked;
    uint64_t due; /* settled due, or the intent's */
    uint64_t intent_due;
};

struct mexp {
    uint64_t id;
    uint32_t nrcpt;
    uint32_t body_len;
    bool acked;   /* acknowledged, or seen in the spool by a check */
    bool present; /* settled: in the spool */
    struct rexp *r;
};

struct model {
    struct mexp *m; /* open addressing on id */
    size_t cap, n;
};

static struct mexp *
model_get(struct model *md, uint64_t id, bool create)
{
    if (create && md->n * 2 >= md->cap) {
        size_t cap = md->cap ? md->cap * 2 : 4096;
        struct mexp *m = calloc(cap, sizeof(*m));
        for (size_t i = 0; i < md->cap; i++) {
            if (md->m[i].id == 0)
                continue;
            size_t j = mix(md->m[i].id) & (cap - 1);
            while (m[j].id != 0)
                j = (j + 1) & (cap - 1);
            m[j] = md->m[i];
        }
        free(md->m);
        md->m = m;
        md->cap = cap;
    }
    if (md->cap == 0)
        return NULL;
    size_t j = mix(id) & (md->cap - 1);
    while (md->m[j].id != 0) {
        if (md->m[j].id == id)
            return &md->m[j];
        j = (j + 1) & (md->cap - 1);
    }
    if (!create)
        return NULL;
    md->m[j].id = id;
    md->n++;
    return &md->m[j];
}

static void
model_apply(struct model *md, const struct rec *r)
{
    struct mexp *m = model_get(md, r->id, r->type == REC_ENQ_INTENT);
    if (m == NULL)
        fail_msg("record for unknown message %llx", (unsigned long long)r->id);
    switch (r->type) {
    case REC_ENQ_INTENT:
        free(m->r);
        m->nrcpt = r->nrcpt;
        m->body_len = r->body_len;
        m->acked = false;
        m->present = false;
        m->r = calloc(r->nrcpt, sizeof(*m->r));
        break;
    case REC_ENQ_ACK:
        m->acked = true;
        m->present = true;
        break;
    case REC_OUT_INTENT:
        assert_true(r->rcpt < m->nrcpt);
        m->r[r->rcpt].intent = (uint8_t)(1 + r->kind);
        m->r[r->rcpt].intent_due = r->due;
        m->r[r->rcpt].intent_acked = false;
        break;
    case REC_OUT_ACK:
        assert_true(r->rcpt < m->nrcpt);
        assert_int_equal(m->r[r->rcpt].intent, 1 + r->kind);
        m->r[r->rcpt].intent_acked = true;
        break;
    }
}

/* ---- checking one message against the spool ---- */

struct check_ctx {
    struct queue *q;
    char *buf;
    uint64_t checked, bodies, outcomes_kept, unacked_seen;
};

/* What the recipient may look like now: its settled state, or what its
 * outcome made of it (required once acknowledged). Then the observation
 * becomes the settled state: the child that could change it is dead. */
static void
check_rcpt(struct mexp *m, unsigned i, const struct queue_rcpt *got)
{
    struct rexp *e = &m->r[i];
    enum rstate now = got == NULL                         ? R_GONE
                      : got->state == QUEUE_RCPT_DEFERRED ? R_DEFERRED
                                                          : R_READY;
    enum rstate after = e->state;
    uint64_t after_due = e->due;
    if (e->intent) {
        enum queue_outcome_kind k = (enum queue_outcome_kind)(e->intent - 1);
        after = k == QUEUE_DEFERRED ? R_DEFERRED : R_GONE;
        after_due = e->intent_due;
    }
    bool ok_before = now == e->state && (now != R_DEFERRED || got->due_ms == e->due);
    bool ok_after = now == after && (now != R_DEFERRED || got->due_ms == after_due);
    if (e->intent_acked ? !ok_after : !(ok_before || ok_after))
        fail_msg("message %llx rcpt %u: state %d (due %llu), settled %d, intent %d acked %d",
                 (unsigned long long)m->id, i, now, got ? (unsigned long long)got->due_ms : 0ULL,
                 e->state, e->intent, e->intent_acked);
    if (got != NULL) {
        char want[64];
        rcpt_addr(want, sizeof(want), m->id, i);
        assert_string_equal(got->addr, want);
        char dom[16];
        snprintf(dom, sizeof(dom), "d%u.example", i % 3);
        assert_string_equal(got->domain, dom);
        if (now == R_DEFERRED) {
            assert_int_equal(got->attempts, 1);
            assert_string_equal(got->last_reply, "4.2.0 test reply");
        }
    }
    e->state = (uint8_t)now;
    e->due = now == R_DEFERRED ? got->due_ms : 0;
    e->intent = 0;
    e->intent_acked = false;
}

static void
check_message(struct check_ctx *cx, struct mexp *m)
{
    struct queue_envelope *env = NULL;
    int rc = queue_envelope_get(cx->q, m->id, &env);
    if (rc == QUEUE_ENOTFOUND) {
        /* Fine if it never committed (submitted, not acknowledged), or
         * if each recipient may be gone (check_rcpt fails otherwise). */
        if (m->acked && m->present)
            for (unsigned i = 0; i < m->nrcpt; i++)
                check_rcpt(m, i, NULL);
        for (unsigned i = 0; i < m->nrcpt; i++)
            m->r[i] = (struct rexp){.state = R_GONE};
        m->present = false;
        m->acked = true; /* settled */
        cx->checked++;
        return;
    }
    assert_int_equal(rc, 0);
    if (!m->acked)
        cx->unacked_seen++;
    /* envelope */
    assert_string_equal(env->sender, "sender@example.com");
    assert_true(env->body_len == m->body_len);
    assert_true(env->nrcpt >= 1 && env->nrcpt <= m->nrcpt);
    unsigned j = 0;
    for (unsigned i = 0; i < m->nrcpt; i++) {
        const struct queue_rcpt *got = NULL;
        if (j < env->nrcpt && env->rcpt[j].index == i)
            got = &env->rcpt[j++];
        check_rcpt(m, i, got);
    }
    assert_int_equal(j, env->nrcpt);
    /* body, every byte */
    size_t n = 0;
    assert_int_equal(queue_body_read(cx->q, m->id, 0, cx->buf, MAX_BODY + 10000, &n), 0);
    assert_int_equal(n, m->body_len);
    char *want = malloc(m->body_len + 1);
    fill_body(want, m->body_len, m->id);
    if (memcmp(want, cx->buf, n) != 0)
        fail_msg("message %llx: body differs", (unsigned long long)m->id);
    free(want);
    queue_envelope_free(env);
    m->present = true;
    m->acked = true;
    cx->checked++;
    cx->bodies++;
}

/* Every recipient in the spool must belong to a message the model knows. */
static int
walk_known(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    struct model *md = arg;
    struct mexp *m = model_get(md, id, false);
    if (m == NULL)
        fail_msg("spool has message %llx that was never submitted", (unsigned long long)id);
    assert_true(r->index < m->nrcpt);
    return 0;
}

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* The temp dir lives in the fixture so that a failed run removes it too. */
static int
setup(void **state)
{
    char *dir = malloc(256);
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, 256, "%s/sluice-crash-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == NULL) {
        free(dir);
        return -1;
    }
    *state = dir;
    return 0;
}

static int
teardown(void **state)
{
    nftw(*state, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(*state);
    return 0;
}

static void
test_kill9(void **state)
{
    const char *dir = *state;
    char path[300];
    snprintf(path, sizeof(path), "%s/spool", dir);
    struct model md = {0};
    struct check_ctx cx = {.buf = malloc(MAX_BODY + 10000)};
    const char *fixed = getenv("SLUICE_CRASH_SEED"); /* to replay a failure */
    uint64_t seed = fixed ? strtoull(fixed, NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)getpid();
    print_message("crash: seed %llu (SLUICE_CRASH_SEED replays the child's choices)\n",
                  (unsigned long long)seed);
    srand((unsigned)seed);
    uint64_t t_start = clock_mono_ms();
    uint64_t total_acked = 0, total_out_acked = 0, records = 0;
    /* On a slow or loaded machine (sanitizers, shared cores) a child may
     * not get as far as an ack within tens of ms: the kill delays stretch
     * while rounds end with no ack and shrink back once they do, so that
     * the test asserts durability, not the machine's speed. */
    unsigned stretch = 1;

    int round = 0;
    for (; round < ROUNDS; round++) {
        /* a time budget, spent only once the test has seen what it must
         * see: each round checks every message so far, which a slow
         * machine pays for many times over */
        if (round >= MIN_ROUNDS && total_acked > 0 && total_out_acked > 0 &&
            clock_mono_ms() - t_start > BUDGET_MS)
            break;
        int p[2];
        assert_int_equal(pipe(p), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            /* cmocka's handlers would longjmp into the parent's test */
            signal(SIGSEGV, SIG_DFL);
            signal(SIGBUS, SIG_DFL);
            signal(SIGABRT, SIG_DFL);
            signal(SIGILL, SIG_DFL);
            signal(SIGFPE, SIG_DFL);
            close(p[0]);
            child_main(path, p[1], seed + (uint64_t)round * 1000003);
            _exit(0);
        }
        close(p[1]);
        /* a few ms (sometimes during the child's open) to tens of ms */
        uint64_t delay = (uint64_t)(rand() % 100 < 10 ? rand() % 5 : 5 + rand() % 45) * stretch;
        uint64_t acked_before = total_acked + total_out_acked;
        uint64_t deadline = clock_mono_ms() + delay;
        unsigned char buf[64 * 1024];
        size_t have = 0;
        bool killed = false, eof = false;
        while (!eof) {
            uint64_t now = clock_mono_ms();
            if (!killed && now >= deadline) {
                kill(pid, SIGKILL);
                killed = true;
            }
            struct pollfd pfd = {p[0], POLLIN, 0};
            int wait = killed ? 1000 : (int)(deadline - now);
            if (poll(&pfd, 1, wait) <= 0)
                continue;
            ssize_t r = read(p[0], buf + have, sizeof(buf) - have);
            if (r <= 0) {
                eof = true;
                break;
            }
            have += (size_t)r;
            size_t off = 0;
            for (; off + sizeof(struct rec) <= have; off += sizeof(struct rec)) {
                struct rec rc;
                memcpy(&rc, buf + off, sizeof(rc));
                model_apply(&md, &rc);
                records++;
                total_acked += rc.type == REC_ENQ_ACK;
                total_out_acked += rc.type == REC_OUT_ACK;
            }
            memmove(buf, buf + off, have - off);
            have -= off;
        }
        assert_int_equal(have, 0); /* records are never torn */
        if (total_acked + total_out_acked == acked_before)
            stretch = stretch < 8 ? stretch * 2 : 8;
        else if (stretch > 1)
            stretch /= 2;
        close(p[0]);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL))
            fail_msg("child exited on its own: status %d", status);

        /* reopen and check */
        struct queue_config cfg = {0};
        char err[512];
        conf_defaults(queue_conf_keys, &cfg, err, sizeof(err));
        free(cfg.path);
        cfg.path = strdup(path);
        cfg.map_size = 1ULL << 30;
        int rc = queue_open(&cfg, &cx.q, err, sizeof(err));
        if (rc != 0)
            fail_msg("round %d: reopen: %s", round, err);
        struct queue_check_report rep;
        rc = queue_check(cx.q, &rep);
        if (rc != 0)
            fail_msg("round %d: check: %s bad=%llu orphans=%llu empty=%llu bodies=%llu "
                     "due=%llu",
                     round, queue_strerror(rc), (unsigned long long)rep.bad_records,
                     (unsigned long long)rep.orphan_rcpts, (unsigned long long)rep.empty_messages,
                     (unsigned long long)rep.bad_bodies, (unsigned long long)rep.bad_due);
        assert_int_equal(queue_walk(cx.q, walk_known, &md), 0);
        /* every message of the model, this round's and all earlier ones */
        uint64_t present = 0;
        for (size_t i = 0; i < md.cap; i++) {
            if (md.m[i].id == 0)
                continue;
            check_message(&cx, &md.m[i]);
            present += md.m[i].present;
        }
        assert_true(present == rep.messages);
        queue_close(cx.q);
        cx.q = NULL;
        conf_free(queue_conf_keys, &cfg);
    }
    print_message("crash: %d rounds in %llu ms, %llu records, %llu messages acked, %llu outcomes "
                  "acked, %llu unacked but committed, %llu message checks\n",
                  round, (unsigned long long)(clock_mono_ms() - t_start),
                  (unsigned long long)records, (unsigned long long)total_acked,
                  (unsigned long long)total_out_acked, (unsigned long long)cx.unacked_seen,
                  (unsigned long long)cx.checked);
    assert_true(total_acked > 0);
    assert_true(total_out_acked > 0);
    for (size_t i = 0; i < md.cap; i++)
        free(md.m[i].r);
    free(md.m);
    free(cx.buf);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_kill9, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
