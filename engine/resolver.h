/*
 * resolver: one struct dns (dns/dns.h) driven by one worker's ring. The
 * sockets c-ares asks to watch get one-shot IORING_OP_POLL_ADD ops,
 * re-armed after each completion while c-ares still wants them (after a
 * poll that failed, from the timer after a bounded backoff: resolver.c);
 * a worker timer covers c-ares's timeouts and runs callbacks that are
 * due. No blocking call, no extra thread.
 *
 * Use resolver_mx_resolve() rather than dns_mx_resolve() on the struct
 * dns: it re-arms the timer afterwards. Its completion rule is the one of
 * dns_mx_resolve(): returns 1 with *res (the callback never runs) or 0
 * with *req (the callback runs later on this worker, from the ring's
 * completions or the timer, unless resolver_cancel() came first).
 *
 * Lifetime (STYLE rule 7): a poll op in flight keeps the resolver alive.
 * resolver_close() frees the struct dns (pending callbacks never run),
 * cancels every poll and frees the resolver when the last one came back,
 * then calls closed(); the worker must keep turning until then. It may be
 * called from inside a resolver callback: it then happens when the dns
 * call that ran the callback returns, and other callbacks already due in
 * that same call still run first (their results are valid).
 *
 * A socket c-ares closes has its poll cancelled at once; its fd number
 * may come back for a new socket at any time, so each socket gets its own
 * watch (the op's user_data), and a late completion of a closed socket's
 * watch is dropped.
 *
 * Threading: everything on the worker's thread.
 */
#ifndef SLUICE_ENGINE_RESOLVER_H
#define SLUICE_ENGINE_RESOLVER_H

#include <stddef.h>

#include "dns/dns.h"
#include "engine/worker.h"

struct resolver;

typedef void resolver_closed_fn(struct worker *w, void *arg);

/* A resolver on w (borrowed: must outlive the resolver). cfg is copied.
 * Returns 0, or a negative code with one line for the operator in err. */
int resolver_new(struct worker *w, const struct dns_config *cfg, struct resolver **out, char *err,
                 size_t errlen);

int resolver_mx_resolve(struct resolver *r, const char *domain, dns_mx_fn *cb, void *arg,
                        struct dns_mx_result **res, struct dns_req **req);
void resolver_cancel(struct resolver *r, struct dns_req *req);
/* dns_txt_lookup() on this worker (MTA-STS first checks), re-arming the
 * timer after. -ENXIO once the resolver is closing. A lookup still out
 * when the resolver closes never calls back. */
int resolver_txt_lookup(struct resolver *r, const char *name, dns_txt_fn *cb, void *arg);

struct resolver_stats {
    struct dns_stats dns;
    unsigned watches;       /* sockets watched now */
    unsigned polls;         /* poll ops in flight now (including cancelled ones) */
    uint64_t poll_failures; /* polls that completed with an error, ever (each re-armed later) */
};
void resolver_stats(const struct resolver *r, struct resolver_stats *out);

/* Close (see above). closed may be NULL; it may run before this returns
 * when nothing was in flight. */
void resolver_close(struct resolver *r, resolver_closed_fn *closed, void *arg);

/* Tests only (defined in builds with test hooks, SLUICE_TESTS=ON): the
 * next n poll completions that report events on a watched socket are
 * taken as failed with err (a negative errno) instead. */
void resolver_test_fail_polls(struct resolver *r, unsigned n, int err);

#endif
