/*
 * targets: where mail must not go. An MX address (or an address literal,
 * or a route's address) on loopback, unspecified, link-local, multicast,
 * broadcast or reserved (240.0.0.0/4) networks is refused as a delivery target unless
 * [delivery] allow_networks lists it, and one in [delivery] deny_networks
 * whatever allow_networks says; this node's own SMTP listeners
 * (their addresses, or every interface address for a wildcard listener;
 * an IPv4 one also as a v4-mapped IPv6 address) are refused whatever it
 * says: that is a loop. The scheduler skips
 * refused addresses; a destination left with none fails as the policy
 * says (policy_job: 5.4.4, or 5.4.6 for a loop), with the reason the
 * first refusal gave, or is deferred (4.4.3) when its answer misses MX
 * hosts whose lookups failed for now.
 *
 * Threading: the worker's thread. The interface addresses are read when
 * the worker's delivery is made, again on each reload, and when a
 * target on a wildcard listener's port is not among them, at most every
 * TARGETS_LOCAL_REREAD_NS: an address added later (DHCP, a new egress
 * address) is a loop too. getifaddrs(3) asks the kernel over netlink and
 * does not wait on anything else: rate-limited, it costs a worker
 * little.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/log.h"
#include "engine/netaddr.h"
#include "engine/outbound/internal.h"

/* getifaddrs(3)'s addresses as text: outbound_ops.local_addrs. */
static int
local_addrs_read(char (**out)[64], unsigned *nout)
{
    struct ifaddrs *ifa = NULL;
    if (getifaddrs(&ifa) < 0)
        return -errno;
    unsigned n = 0;
    for (struct ifaddrs *i = ifa; i != NULL; i = i->ifa_next)
        n += i->ifa_addr != NULL &&
             (i->ifa_addr->sa_family == AF_INET || i->ifa_addr->sa_family == AF_INET6);
    char (*v)[64] = calloc(n ? n : 1, sizeof(*v));
    if (v == NULL) {
        freeifaddrs(ifa);
        return -ENOMEM;
    }
    n = 0;
    for (struct ifaddrs *i = ifa; i != NULL; i = i->ifa_next)
        if (i->ifa_addr != NULL &&
            (i->ifa_addr->sa_family == AF_INET || i->ifa_addr->sa_family == AF_INET6))
            netaddr_ip_str(i->ifa_addr, v[n++], sizeof(v[0]));
    freeifaddrs(ifa);
    *out = v;
    *nout = n;
    return 0;
}

void
targets_local_load(struct delivery *d)
{
    char (*v)[64] = NULL;
    unsigned n = 0;
    d->local_read_ns = d->w->now;
    int rc = d->ops->local_addrs != NULL ? d->ops->local_addrs(d, &v, &n)
                                         : local_addrs_read(&v, &n);
    if (rc < 0) {
        log_msg(LOG_WARN, "event=local_addresses_unread err=\"%s\" kept=%u", strerror(-rc),
                d->nlocal);
        return;
    }
    bool same = n == d->nlocal && (n == 0 || memcmp(v, d->local, n * sizeof(*v)) == 0);
    free(d->local);
    d->local = v;
    d->nlocal = n;
    if (same)
        return;
    /* Another list: every answer's usable addresses are counted again. */
    struct dest_iter it = {0};
    for (struct dest *t; (t = dest_next(d, &it)) != NULL;)
        t->targets_for = NULL;
}

static bool
target_is_local(const struct delivery *d, const char *ip)
{
    for (unsigned j = 0; j < d->nlocal; j++)
        if (strcmp(d->local[j], ip) == 0)
            return true;
    return false;
}

/* Is a (on port) one of this node's SMTP listeners? Delivering there is
 * a loop, whatever allow_networks says. */
static bool
target_is_self(struct delivery *d, const union dns_addr *a, unsigned port)
{
    const struct server_config *srv = &d->cfg->server;
    /* A v4-mapped IPv6 address (an AAAA record of ::ffff:a.b.c.d) is
     * where a connect to it goes: the IPv4 address a.b.c.d. */
    union dns_addr v4;
    if (netaddr_v4mapped(&a->sa, &v4.sin))
        a = &v4;
    char ip[64];
    netaddr_ip_str(&a->sa, ip, sizeof(ip));
    for (int k = 0; k < 2; k++) {
        const struct netaddr *l = k == 0 ? srv->listen_addrs : srv->listen_tls_addrs;
        int n = k == 0 ? srv->nlisten : srv->nlisten_tls;
        for (int i = 0; i < n; i++) {
            const struct sockaddr *sa = (const struct sockaddr *)&l[i].ss;
            unsigned lport = sa->sa_family == AF_INET6
                                 ? ntohs(((const struct sockaddr_in6 *)sa)->sin6_port)
                                 : ntohs(((const struct sockaddr_in *)sa)->sin_port);
            if (lport != port || sa->sa_family != a->sa.sa_family)
                continue;
            char lip[64];
            netaddr_ip_str(sa, lip, sizeof(lip));
            if (strcmp(lip, ip) == 0)
                return true;
            const char *sp = netaddr_special(sa);
            if (sp != NULL && strcmp(sp, "unspecified") == 0) {
                if (netaddr_is_loopback(&a->sa) || target_is_local(d, ip))
                    return true;
                if (d->w->now - d->local_read_ns >= TARGETS_LOCAL_REREAD_NS) {
                    targets_local_load(d);
                    if (target_is_local(d, ip))
                        return true;
                }
            }
        }
    }
    return false;
}

/* Why a (on port) is refused as a delivery target ("loopback", ...), or
 * NULL. */
const char *
target_refused(struct delivery *d, const union dns_addr *a, unsigned port)
{
    const struct delivery_config *dc = &d->cfg->delivery;
    if (target_is_self(d, a, port))
        return "this node's own listener";
    return netaddr_target_refused(&a->sa, dc->allow, dc->nallow, dc->deny, dc->ndeny);
}

/* ---- MTA-STS ---- */

/* A first MTA-STS check's TXT lookup on this worker's resolver. It
 * outlives its destination (an eviction, the end): the answer goes to
 * the store by name all the same. */
struct sts_ask {
    struct delivery *d;          /* borrowed */
    struct dest *t;              /* borrowed; NULL once it went */
    struct sts_ask *prev, *next; /* on d->sts_asks */
    bool starting;               /* inside sts_ask_start's call of ops->txt */
    char domain[];
};

static void
sts_ask_unlink(struct sts_ask *a)
{
    struct delivery *d = a->d;
    if (a->prev != NULL)
        a->prev->next = a->next;
    else
        d->sts_asks = a->next;
    if (a->next != NULL)
        a->next->prev = a->prev;
    d->nsts_asks--;
}

static void
on_sts_txt(void *arg, enum dns_status status, const char *why, const char *const *txt, unsigned n,
           uint32_t ttl)
{
    struct sts_ask *a = arg;
    struct delivery *d = a->d;
    struct dest *t = a->t;
    if (delivery_mta_sts(d) != NULL)
        mta_sts_txt_answer(delivery_mta_sts(d), a->domain, status, why, txt, n, ttl);
    bool at_once = a->starting;
    sts_ask_unlink(a);
    free(a);
    if (t != NULL) {
        t->sts_ask = NULL;
        /* An answer given inside the call (c-ares failed at once: no
         * socket under EMFILE, no memory; dns.h) is read by the caller,
         * dest_sts_ready: running t from here would run it inside
         * sched_conn_next, which asks per transaction. */
        if (!at_once)
            dest_run(t);
    }
}

/* Ask _mta-sts.DOMAIN on this worker's resolver for t. 0 (the answer
 * runs t), 1 (answered inside the call: the store has it, t was not
 * run), or a negative code (nothing asked). */
static int
sts_ask_start(struct dest *t)
{
    struct delivery *d = t->d;
    char name[DNS_NAME_MAX + 16];
    int len = snprintf(name, sizeof(name), "_mta-sts.%s", t->name);
    if (len < 0 || (size_t)len >= sizeof(name))
        return -EINVAL;
    size_t dl = strlen(t->name);
    struct sts_ask *a = malloc(sizeof(*a) + dl + 1);
    if (a == NULL)
        return -ENOMEM;
    memcpy(a->domain, t->name, dl + 1);
    a->d = d;
    a->t = t;
    a->prev = NULL;
    a->next = d->sts_asks;
    if (a->next != NULL)
        a->next->prev = a;
    d->sts_asks = a;
    d->nsts_asks++;
    t->sts_ask = a;
    a->starting = true;
    int rc = d->ops->txt(d, name, on_sts_txt, a);
    if (t->sts_ask == NULL)
        return 1; /* on_sts_txt ran, and freed a */
    a->starting = false;
    if (rc < 0) {
        t->sts_ask = NULL;
        sts_ask_unlink(a);
        free(a);
    }
    return rc;
}

void
dest_sts_asks_free(struct delivery *d)
{
    while (d->sts_asks != NULL) {
        struct sts_ask *a = d->sts_asks;
        if (a->t != NULL)
            a->t->sts_ask = NULL;
        sts_ask_unlink(a);
        free(a);
    }
}

/* t goes: its lookup's answer still reaches the store. */
void
dest_sts_forget(struct dest *t)
{
    if (t->sts_ask != NULL) {
        t->sts_ask->t = NULL;
        t->sts_ask = NULL;
    }
}

bool
dest_sts_ready(struct dest *t)
{
    struct delivery *d = t->d;
    struct mta_sts *m = delivery_mta_sts(d);
    /* Not for a route (the MX is the operator's choice, not the
     * domain's) nor an address literal. */
    /* A reload may turn it off ([delivery] mta_sts = no), and on again
     * (engine_mta_sts_reload starts the store if it was not running). */
    /* Nor for mail delivered despite TLS failures (tls_relaxed). */
    if (m == NULL || !d->cfg->delivery.mta_sts || !t->pol->mta_sts || t->tls_relaxed ||
        t->pol->route_host[0] != '\0' || t->name[0] == '[') {
        t->sts = mta_sts_policy_unref(t->sts);
        return true;
    }
    if (t->sts_ask != NULL)
        return false; /* its TXT lookup runs: the answer runs t again */
    if (t->sts_asked != 0 && d->w->now - t->sts_asked < MS_TO_NS(STS_ASK_MS))
        return true;
    struct mta_sts_policy *p = NULL;
    /* Lookups on this worker are bounded as its MX lookups are; beyond,
     * the store's thread takes them (its max_fetches at once). */
    bool can_ask = d->ops->txt != NULL && d->nsts_asks < d->cfg->dns.max_inflight;
    enum mta_sts_answer a = mta_sts_get(m, t->name, can_ask, &p);
    if (a == MTA_STS_ASK) {
        int rc = sts_ask_start(t);
        if (rc == 0)
            return false;
        /* Not asked (as a lookup that failed at once: no policy known; a
         * name too long to ask fails for good, not for now), or answered
         * inside the call: the store's verdict, now. */
        if (rc < 0)
            mta_sts_txt_answer(m, t->name, rc == -EINVAL ? DNS_FAIL : DNS_RETRY,
                               rc == -EINVAL ? "bad name" : "no resolver", NULL, 0,
                               DNS_TTL_UNKNOWN);
        a = mta_sts_get(m, t->name, false, &p);
    }
    if (a == MTA_STS_WAIT)
        return false;
    if (p != t->sts)
        t->targets_for = NULL; /* the hosts it may use may have changed: count again */
    mta_sts_policy_unref(t->sts);
    t->sts = p;
    t->sts_asked = d->w->now;
    return true;
}

const char *
dest_tls_policy_str(const struct dest *t, int tls_pol)
{
    if (t != NULL && t->sts != NULL && t->sts->mode != MTA_STS_NONE)
        return "mta-sts";
    if (t != NULL && t->tls_relaxed && tls_pol != DOMAIN_TLS_OFF)
        return "relaxed";
    return tls_pol == DOMAIN_TLS_OFF        ? "none"
           : tls_pol == DOMAIN_TLS_VERIFY   ? "verify"
           : tls_pol == DOMAIN_TLS_REQUIRED ? "required"
                                            : "opportunistic";
}

/* The addresses of t's answer that may be delivered to, counted once per
 * answer. With none, t->last_fail says why (for the bounce, or for the
 * deferral when an MTA-STS policy matches no MX host). */
unsigned
dest_targets(struct dest *t)
{
    if (t->targets_for == t->mx)
        return t->ntargets;
    t->targets_for = t->mx;
    t->ntargets = 0;
    t->refused_sts = false;
    t->refused_self = false;
    const char *why = NULL;
    const struct dns_mx_host *wh = NULL;
    const union dns_addr *wa = NULL;
    unsigned sts_refused = 0;
    for (unsigned h = 0; h < t->mx->nhosts; h++)
        for (unsigned i = 0; i < t->mx->hosts[h].naddrs; i++) {
            if (!dest_mx_allowed(t, t->mx->hosts[h].name)) {
                sts_refused++;
                continue;
            }
            const char *r = target_refused(t->d, &t->mx->hosts[h].addrs[i], dest_port(t));
            if (r == NULL) {
                t->ntargets++;
            } else if (why == NULL) {
                why = r;
                wh = &t->mx->hosts[h];
                wa = &t->mx->hosts[h].addrs[i];
            }
        }
    if (sts_refused > 0)
        log_msg(t->ntargets ? LOG_INFO : LOG_NOTICE,
                "event=mta_sts_mx_refused domain=%s mx=%s policy_id=%s refused=%u usable=%u",
                t->name, t->mx->hosts[0].name, t->sts->id, sts_refused, t->ntargets);
    if (t->ntargets == 0 && sts_refused > 0) {
        struct smtp_outcome fail, *o = &fail;
        memset(o, 0, sizeof(*o));
        struct policy_fail nf;
        policy_job(POLICY_TLS_POLICY_NO_MX, &nf);
        o->enh = nf.enh;
        t->refused_sts = true;
        snprintf(o->text, sizeof(o->text),
                 "MX %s of %s matches no mx of its MTA-STS policy (id %s, enforce): not "
                 "delivered there",
                 t->mx->hosts[0].name, t->name, t->sts->id);
        dest_last_fail_set(t, o, NULL, NULL);
        return 0;
    }
    if (why != NULL) {
        char ip[64];
        netaddr_ip_str(&wa->sa, ip, sizeof(ip));
        log_msg(t->ntargets ? LOG_INFO : LOG_NOTICE,
                "event=target_refused domain=%s mx=%s addr=%s reason=\"%s\" usable=%u", t->name,
                wh->name, ip, why, t->ntargets);
        if (t->ntargets == 0) {
            struct smtp_outcome fail, *o = &fail;
            memset(o, 0, sizeof(*o));
            bool self = strcmp(why, "this node's own listener") == 0;
            struct policy_fail nf;
            policy_job(self ? POLICY_NO_TARGET_SELF : POLICY_NO_TARGET, &nf);
            t->refused_self = self;
            o->enh = nf.enh;
            if (self)
                snprintf(o->text, sizeof(o->text), "mail for %s loops back to myself (MX %s, %s)",
                         t->name, wh->name, ip);
            else
                snprintf(o->text, sizeof(o->text),
                         "MX %s of %s has address %s (%s): not a delivery target, see "
                         "[delivery] %s",
                         wh->name, t->name, ip, why,
                         strcmp(why, NETADDR_DENIED) == 0 ? "deny_networks" : "allow_networks");
            dest_last_fail_set(t, o, NULL, NULL);
        }
    }
    return t->ntargets;
}

