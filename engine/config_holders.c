/*
 * config_holders: every place that keeps a pointer into a struct config
 * (or into what it owns) beyond the moment it was read, and how each one
 * lets go of a replaced config, for config_gen's rule (config_gen.h).
 * Holders added to the code must be added here.
 *
 * Re-pointed at each park, on the worker (engine_reload.c park_on_worker, after
 * its view was read): they point into the view or newer from then on.
 *   - server_worker.cfg (&e->cfg->server): server_worker_reconfigure.
 *   - delivery.cfg (e->cfg, what the outbound side reads the config
 *     through): delivery_reconfigure, first (delivery_env_take).
 *   - dest.pol, dest.poolc (domain policy, pool): delivery_reconfigure;
 *     dest.src_ids_for, compared only, is cleared there too (a freed
 *     pool's address may be a new one's).
 *   - mxkey.pol ([mx] and [source] sections): delivery_reconfigure.
 *   - owner_count.rr_for (a pool's round robin, outbound/scope.c),
 *     compared only: cleared by delivery_reconfigure (pool_rr_forget).
 *   - delivery's tenant weights: cleared by delivery_reconfigure.
 * Made between two parks from e->cfg as it is then (the outbound side's
 * from delivery.cfg, the worker's own): the view or newer.
 * Kept past the park, scanned here on the worker, each in one config
 * (its generation kept, not the later ones):
 *   - a session's message owner (owner.h: tenant and pool, from
 *     owner_resolve at the end of DATA to txn_reset after its commit):
 *     its generation found by address (config_gens_of_owner).
 *   - a connection's source ([source] section), and its SMTP client's
 *     EHLO name and timeout table (borrowed by smtp_client for the
 *     connection's life): all from conn.cfg, the config of its source
 *     (or the one in force when it opened without one), conn.cfg_gen.
 * Read by threads outside the workers, in read sections
 * (engine_config_enter/_leave):
 *   - the stats thread: "stats", /metrics, the status page, the domains
 *     view; and the stats command thread: every other stats-socket
 *     command (ops.c);
 *   - the MTA-STS thread, handing a TLS report to delivery (engine.c).
 * Read by no thread outside the workers, outside a read section:
 *   - delivery_owner() (any thread: the shaping keeper's bounces too)
 *     reads [server] campaign_names from e->campaign_names, a copy kept
 *     by the swap, never from e->cfg.
 * Kept to the end (pinned): the config the engine started on (the caller
 * frees it after engine_stop): what start made from it borrows it for
 * good (listeners, the spool, DNS, resolvers, the Redis settings of
 * limits, shaping and warm-up, the suppression list, the stats socket,
 * the delivery log, events at start); the config the MTA-STS store
 * started on (mta_sts.c and tlsrpt.c keep it); the config warm-up plans
 * point into when warmup_reload failed.
 * Copied, not held: [events] sinks (conf_copy), shaping actions (names
 * copied), DNS names asked (normalised copies), the spool's envelope
 * (copied by queue_enqueue), the delivery log's lines (formatted on the
 * caller's thread), TLS contexts and DKIM keyrings (their own
 * references), the users table (its own file).
 *
 * Threading: config_holders_publish runs on the worker it scans, between
 * two events of its loop.
 */
#include "engine/config_gen.h"

#include "engine/engine.h"
#include "engine/outbound/internal.h"
#include "engine/server.h"

static void
add(uint64_t *v, unsigned *n, unsigned cap, uint64_t *floor, uint64_t gen)
{
    if (gen >= *floor)
        return; /* the view keeps it */
    for (unsigned i = 0; i < *n; i++)
        if (v[i] == gen)
            return;
    if (*n < cap) {
        v[(*n)++] = gen;
        return;
    }
    /* More than can be listed: everything from the oldest on. */
    for (unsigned i = 0; i < *n; i++)
        if (v[i] < *floor)
            *floor = v[i];
    if (gen < *floor)
        *floor = gen;
    *n = 0;
}

struct held {
    struct config_gens *gens;
    uint64_t v[CONFIG_GENS_HELD_MAX];
    unsigned n;
    uint64_t floor;
};

static void
add_owner(const struct owner *o, void *arg)
{
    struct held *h = arg;
    add(h->v, &h->n, CONFIG_GENS_HELD_MAX, &h->floor, config_gens_of_owner(h->gens, o));
}

void
config_holders_publish(struct engine *e, unsigned w)
{
    struct held h = {.gens = e->gens, .floor = config_gens_view(e->gens, w)};
    if (e->srv != NULL && e->srv[w] != NULL)
        server_worker_each_owner(e->srv[w], add_owner, &h);
    if (e->dlv != NULL && e->dlv[w] != NULL)
        for (const struct conn *c = e->dlv[w]->all; c != NULL; c = c->next_all)
            add(h.v, &h.n, CONFIG_GENS_HELD_MAX, &h.floor, c->cfg_gen);
    config_gens_hold(e->gens, w, h.floor, h.v, h.n);
}
