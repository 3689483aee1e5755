/*
 * sluice-spool: read a spool that no sluice has open (the queue takes an
 * exclusive lock): count, check, or list or dump every message as JSON
 * lines.
 * A directory without a spool is refused, not given a new one. Every
 * command only reads: the spool is opened read-only (queue_open_readonly),
 * so that it is left exactly as it was: an older sluice's spool keeps its
 * schema number (which a read-write open would raise, and that sluice
 * would then refuse its own spool), no disk blocks are reserved and no
 * file is made in the directory (neither sluice.lock nor LMDB's
 * lock.mdb): a copy of data.mdb alone, or a read-only copy, is read as it
 * is.
 * For operators and for the tests, which then need not know the record
 * format.
 *
 *   sluice-spool count DIR    {"messages":N,"ready":N,"deferred":N}
 *   sluice-spool check DIR    exit 0 when consistent, 1 with a report (counts on
 *                             stdout, each problem found with its key on stderr)
 *   sluice-spool list DIR     one JSON object per message: envelope, each
 *                             recipient's state, attempts, next and last
 *                             attempt and last reply, the body's length; a
 *                             message that cannot be read is named on
 *                             stderr and makes the exit status 1
 *   sluice-spool dump DIR     the same with the body in base64
 *
 * A spool damaged inside a page (LMDB has no checksums) makes LMDB fault;
 * every command then names the damage on stderr and exits 1 (fault.h).
 */
#include <errno.h>
#include <stdbool.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/conf.h"
#include "common/fault.h"
#include "common/json.h"
#include "queue/queue.h"

/* A JSON string through common/json: octets that are not UTF-8 (a
 * receiver's reply in Latin-1, or one cut inside a character) become
 * U+FFFD, so that every line is JSON whatever the spool holds. */
static void
put_str(const char *s)
{
    struct json j;
    json_init(&j);
    json_str(&j, s != NULL ? s : "");
    if (json_failed(&j)) {
        fputs("\"\"", stdout);
    } else {
        fwrite(j.buf, 1, j.len, stdout);
    }
    json_fini(&j);
}

/* Unix ms as an RFC 3339 UTC time in quotes, or null for 0. */
static void
json_time(uint64_t ms)
{
    if (ms == 0) {
        printf("null");
        return;
    }
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    char b[32];
    strftime(b, sizeof(b), "%Y-%m-%dT%H:%M:%S", &tm);
    printf("\"%s.%03uZ\"", b, (unsigned)(ms % 1000));
}

static void
b64(const unsigned char *in, size_t len)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < len; i += 3) {
        uint32_t w = (uint32_t)in[i] << 16;
        if (i + 1 < len)
            w |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < len)
            w |= in[i + 2];
        putchar(tab[w >> 18 & 63]);
        putchar(tab[w >> 12 & 63]);
        putchar(i + 1 < len ? tab[w >> 6 & 63] : '=');
        putchar(i + 2 < len ? tab[w & 63] : '=');
    }
}

struct ids {
    uint64_t *v;
    size_t n, cap;
};

static int
collect(void *arg, uint64_t id, const struct queue_rcpt *r)
{
    (void)r;
    struct ids *ids = arg;
    if (ids->n > 0 && ids->v[ids->n - 1] == id)
        return 0;
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 256;
        uint64_t *v = realloc(ids->v, cap * sizeof(*v));
        if (v == NULL)
            return -ENOMEM;
        ids->v = v;
        ids->cap = cap;
    }
    ids->v[ids->n++] = id;
    return 0;
}

/* list (with_body false) and dump (true). */
static int
dump(struct queue *q, bool with_body)
{
    struct ids ids = {0};
    int rc = queue_walk(q, collect, &ids);
    if (rc != 0) {
        fprintf(stderr, "sluice-spool: walk: %s\n", queue_strerror(rc));
        free(ids.v);
        return 1;
    }
    size_t bad = 0; /* messages left out: the dump is incomplete, and says so */
    for (size_t i = 0; i < ids.n; i++) {
        char qid[QUEUE_ID_STRLEN + 1];
        queue_id_str(ids.v[i], qid);
        struct queue_envelope *env;
        rc = queue_envelope_get(q, ids.v[i], &env);
        if (rc != 0) {
            fprintf(stderr, "sluice-spool: message %s: envelope: %s\n", qid, queue_strerror(rc));
            bad++;
            continue;
        }
        unsigned char *body = with_body ? malloc(env->body_len + 1) : NULL;
        size_t got = 0;
        if (with_body &&
            (body == NULL || queue_body_read(q, env->id, 0, body, env->body_len, &got) != 0)) {
            fprintf(stderr, "sluice-spool: message %s: body unreadable\n", qid);
            bad++;
            free(body);
            queue_envelope_free(env);
            continue;
        }
        printf("{\"id\":\"%s\",\"arrival\":", qid);
        json_time(env->arrival_ms);
        printf(",\"sender\":");
        put_str(env->sender);
        printf(",\"auth_user\":");
        put_str(env->auth_user);
        printf(",\"client\":");
        put_str(env->client_addr);
        printf(",\"envid\":");
        put_str(env->envid);
        printf(",\"tenant\":");
        put_str(env->tenant);
        printf(",\"campaign\":");
        put_str(env->campaign);
        printf(",\"pool\":");
        put_str(env->pool);
        printf(",\"priority\":%u", env->priority);
        printf(",\"delay_warned\":%s", env->delay_warned ? "true" : "false");
        printf(",\"smtputf8\":%s,\"body_type\":%d,\"rcpts\":[", env->smtputf8 ? "true" : "false",
               (int)env->body_type);
        for (unsigned r = 0; r < env->nrcpt; r++) {
            printf(r ? "," : "");
            printf("{\"addr\":");
            put_str(env->rcpt[r].addr);
            printf(",\"domain\":");
            put_str(env->rcpt[r].domain);
            const struct queue_rcpt *x = &env->rcpt[r];
            printf(",\"state\":\"%s\",\"attempts\":%u,\"next_attempt\":",
                   x->tag == QUEUE_TAG_HELD ? "dsn_held" /* failed or relayed, its DSN waiting */
                   : x->state == QUEUE_RCPT_DEFERRED ? "deferred"
                                                      : "ready",
                   x->attempts);
            json_time(x->state == QUEUE_RCPT_DEFERRED ? x->due_ms : 0);
            printf(",\"last_attempt\":");
            json_time(x->last_ms);
            /* null: no server has replied for it yet (as sluicectl message) */
            if (x->last_code != 0)
                printf(",\"last_code\":%u,\"last_reply\":", x->last_code);
            else
                printf(",\"last_code\":null,\"last_reply\":");
            put_str(x->last_reply);
            printf(",\"notify\":%u,\"orcpt\":", x->notify);
            put_str(x->orcpt);
            printf("}");
        }
        printf("],\"body_len\":%" PRIu64, env->body_len);
        if (with_body) {
            printf(",\"body\":\"");
            b64(body, got);
            printf("\"");
        }
        printf("}\n");
        free(body);
        queue_envelope_free(env);
    }
    free(ids.v);
    if (bad > 0) {
        fprintf(stderr, "sluice-spool: %zu of %zu messages left out of the %s\n", bad, ids.n,
                with_body ? "dump" : "list");
        return 1;
    }
    return 0;
}

int
main(int argc, char **argv)
{
    if (argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        printf("usage: sluice-spool count|check|list|dump SPOOL_DIR\n\n"
               "Reads a spool no sluice has open (stop sluice first; while it runs,\n"
               "sluicectl asks it).\n\n"
               "  count  {\"messages\":N,\"ready\":N,\"deferred\":N}\n"
               "  check  exit 0 when consistent, 1 with each problem on stderr\n"
               "  list   one JSON object per message: envelope, each recipient's state,\n"
               "         attempts, next and last attempt and last reply, body length\n"
               "  dump   the same with the body in base64\n");
        return 0;
    }
    if (argc != 3 || (strcmp(argv[1], "count") && strcmp(argv[1], "check") &&
                      strcmp(argv[1], "list") && strcmp(argv[1], "dump"))) {
        fprintf(stderr, "usage: sluice-spool count|check|list|dump SPOOL_DIR\n");
        return 2;
    }
    /* Said here, for the operator, before the queue's own refusal:
     * a mistyped path must not read as an empty, consistent spool. */
    char data[4200];
    struct stat st;
    if ((size_t)snprintf(data, sizeof(data), "%s/data.mdb", argv[2]) >= sizeof(data)) {
        fprintf(stderr, "sluice-spool: %s: path too long\n", argv[2]);
        return 1;
    }
    int sr = stat(data, &st);
    if (sr != 0 || !S_ISREG(st.st_mode) || st.st_size == 0) {
        /* an empty data.mdb: LMDB would start a new one, which read-only
         * it cannot ("Bad file descriptor") */
        fprintf(stderr, "sluice-spool: %s: no spool there (%s: %s)\n", argv[2], data,
                sr != 0 ? strerror(errno) : !S_ISREG(st.st_mode) ? "not a file" : "empty file");
        return 1;
    }
    struct queue_config cfg;
    char err[512];
    memset(&cfg, 0, sizeof(cfg));
    if (conf_defaults(queue_conf_keys, &cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "sluice-spool: %s\n", err);
        return 1;
    }
    free(cfg.path);
    cfg.path = strdup(argv[2]);
    /* LMDB keeps no checksums: a page damaged inside is followed where
     * it points, and faults. Said as what it is, with a status, not a
     * crash (the stdout lines written so far are whole records). */
    struct fault_guard g;
    fault_guard_arm(&g);
    if (sigsetjmp(g.jb, 1) != 0) {
        char what[240];
        fflush(stdout);
        fprintf(stderr,
                "sluice-spool: %s: the spool is damaged: reading %s failed inside LMDB (%s); "
                "LMDB keeps no checksums, so damage inside a page shows only so\n",
                argv[2], data, fault_guard_str(&g, what, sizeof(what)));
        /* The read that faulted left its transaction open: the process
         * ends here, without the exit handlers (a leak check would count
         * what the fault left as ours). */
        _exit(1);
    }
    struct queue *q;
    int rc = queue_open_readonly(&cfg, &q, err, sizeof(err));
    conf_free(queue_conf_keys, &cfg);
    if (rc < 0) {
        fault_guard_restore(NULL);
        /* sluice has it open: what to do then, as the usage says */
        fprintf(stderr, "sluice-spool: %s%s\n", err,
                rc == QUEUE_ELOCKED ? ": stop sluice first (while it runs, sluicectl queue and "
                                      "sluicectl message show what is queued)"
                                    : "");
        return 1;
    }
    int status = 0;
    if (strcmp(argv[1], "count") == 0) {
        struct queue_counts c;
        rc = queue_counts(q, &c, NULL, NULL);
        if (rc != 0) {
            fprintf(stderr, "sluice-spool: %s\n", queue_strerror(rc));
            status = 1;
        } else {
            printf("{\"messages\":%" PRIu64 ",\"ready\":%" PRIu64 ",\"deferred\":%" PRIu64 "}\n",
                   c.messages, c.ready, c.deferred);
        }
    } else if (strcmp(argv[1], "check") == 0) {
        struct queue_check_report r;
        rc = queue_check(q, &r);
        printf("{\"messages\":%" PRIu64 ",\"recipients\":%" PRIu64 ",\"bad_records\":%" PRIu64
               ",\"orphan_rcpts\":%" PRIu64 ",\"empty_messages\":%" PRIu64
               ",\"bad_bodies\":%" PRIu64 ",\"bad_due\":%" PRIu64 "}\n",
               r.messages, r.recipients, r.bad_records, r.orphan_rcpts, r.empty_messages,
               r.bad_bodies, r.bad_due);
        /* then the problems themselves, one line each, for the operator */
        for (unsigned i = 0; i < r.nlisted; i++) {
            char qid[QUEUE_ID_STRLEN + 1] = "";
            if (r.listed[i].id != 0)
                queue_id_str(r.listed[i].id, qid);
            fprintf(stderr, "sluice-spool: %s db=%s key=%s id=%s\n", r.listed[i].what,
                    r.listed[i].db, r.listed[i].key, qid[0] ? qid : "-");
        }
        if (r.lmdb_damage != NULL)
            fprintf(stderr,
                    "sluice-spool: %s: the spool is damaged: LMDB found a damaged page while "
                    "reading %s (%s); LMDB keeps no checksums, so the problems listed before "
                    "may be its echoes\n",
                    argv[2], data, r.lmdb_damage);
        else if (rc != 0 && rc != QUEUE_ECORRUPT)
            fprintf(stderr, "sluice-spool: check: %s\n", queue_strerror(rc));
        status = rc == 0 ? 0 : 1;
    } else {
        status = dump(q, strcmp(argv[1], "dump") == 0);
    }
    queue_close(q);
    fault_guard_restore(NULL);
    return status;
}
