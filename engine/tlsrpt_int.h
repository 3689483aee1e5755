/*
 * tlsrpt_int.h: what tlsrpt.c (the days and their counts, the state
 * file, a report's JSON) and tlsrpt_send.c (sending a day's report) share:
 * the day and the reporter's struct, and the calls the sending makes.
 * Not a public header: only those two files include it.
 *
 * Threading: as tlsrpt.h; the fields say which lock guards them.
 */
#ifndef SLUICE_ENGINE_TLSRPT_INT_H
#define SLUICE_ENGINE_TLSRPT_INT_H

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/hash.h"
#include "dns/dns.h"
#include "engine/netaddr.h"
#include "engine/tlsrpt.h"

struct json;
struct rpol; /* one policy of a day and its counts (tlsrpt.c) */

#define MAX_POLICIES  8           /* per domain and day: no policy, MTA-STS, TLSA per base domain */
#define MAX_RUA       4           /* addresses a report goes to */
#define DAY_MS        86400000ULL

enum day_state { DAY_IDLE, DAY_RUA, DAY_POST };

struct day {
    struct hash_node hn;   /* in r->days (first) */
    struct day *next_all;  /* the sending walk's list */
    struct tlsrpt *r;      /* borrowed */
    char key[DNS_NAME_MAX + 16]; /* "domain day" */
    char domain[DNS_NAME_MAX + 1];
    int64_t day;           /* days since 1970-01-01 UTC */
    unsigned npols;
    struct rpol *pols[MAX_POLICIES]; /* owned; the first of each kind (and MX host) stays */
    /* Sending: the thread's. */
    uint8_t st;            /* enum day_state */
    uint64_t next_try_ms;  /* Unix ms; 0: at once when due */
    unsigned posts, posted; /* transfers in flight, and those that succeeded */
    CURL *easy[MAX_RUA];
    struct curl_slist *hdrs[MAX_RUA];
    char *gz;              /* owned while posting: the gzipped report */
    size_t gzlen;
};

struct tlsrpt {
    const struct config *cfg; /* borrowed */
    char dir[PATH_MAX];
    pthread_mutex_t lock;
    /* under lock: [delivery] allow_networks and deny_networks of the
     * config in force (a reload's), not cfg's of the start */
    struct cidr allow[NETADDR_MAX_LIST], deny[NETADDR_MAX_LIST];
    int nallow, ndeny;
    struct hash days;         /* owned struct day */
    bool dirty;
    uint64_t saved_ms;
    uint64_t sent, failed;
    CURLM *multi;             /* borrowed: the thread's, once it ticked */
    unsigned seq;             /* report ids */
    pthread_mutex_t mail_lock;
    tlsrpt_mail_fn *mail;     /* under mail_lock; NULL: mailto: skipped */
    void *mail_arg;
};

/* ---- tlsrpt.c ---- */

/* Frees d and its policies; NULL. */
struct day *tlsrpt_day_free(struct day *d);
/* Under r->lock, as d's report is made: what it counts is what a sent
 * report takes away (tlsrpt_day_reported). */
void tlsrpt_day_mark(struct day *d);
/* Under r->lock, once d's report went out: its counts less what the
 * report held (tlsrpt_day_mark). Returns whether any are left. */
bool tlsrpt_day_reported(struct day *d);
/* The state file written whole (r->lock taken); a failure is logged and
 * leaves r dirty. */
void tlsrpt_state_save(struct tlsrpt *r);
/* The first (or, end, the last) second of day as RFC 3339 UTC. */
void tlsrpt_day_iso(int64_t day, bool end, char *out, size_t cap);
/* The JSON of RFC 8460 4.4 for d, into j. */
void tlsrpt_day_json(struct tlsrpt *r, const struct day *d, const char *report_id, struct json *j);

#endif
