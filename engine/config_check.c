/*
 * config_check: what engine/config.c's reader does once the whole file is
 * read (see config_int.h): the [domain] sections applied over [domain *]
 * and sorted, routes and their targets, the header lists, DKIM keys
 * loaded, the bounce settings, owners (tenants, pools and their sources),
 * shaping rules, warm-up plans, and every check across keys and sections
 * ([dns], [tls], lists of addresses), each error on the line of the key
 * at fault (config_finish). The key tables are engine/config_keys.c's.
 *
 * Threading: as config_load(): any thread, on the parse it is given.
 */
#include "engine/config.h"
#include "engine/config_int.h"

#include "engine/classify.h"
#include "engine/events.h"
#include "engine/shaping.h"
#include "engine/smtp_cmd.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"

static int
apply_domain(struct parse *p, struct domain_policy *pol, const struct domain_build *d)
{
    char why[256];
    for (unsigned i = 0; i < d->nvalues; i++) {
        const struct conf_key *k = &config_domain_keys[d->values[i].key];
        if (conf_set(config_domain_keys, pol, k->name, d->values[i].value, why, sizeof(why)) < 0) {
            config_err(p, d->values[i].line, "%s: %s", k->name, why);
            return -EINVAL;
        }
    }
    return 0;
}

static int
cmp_domain(const void *a, const void *b)
{
    return strcmp(((const struct domain_policy *)a)->name, ((const struct domain_policy *)b)->name);
}

void
config_free_builds(struct parse *p)
{
    for (unsigned i = 0; i < p->ndkims; i++) {
        free(p->dkims[i].domain);
        free(p->dkims[i].selector);
        conf_free(dkim_sig_conf_keys, &p->dkims[i].sc);
    }
    free(p->dkims);
    p->dkims = NULL;
    p->ndkims = 0;
    for (unsigned i = 0; i < p->ndoms; i++) {
        free(p->doms[i].name);
        for (unsigned j = 0; j < p->doms[i].nvalues; j++)
            free(p->doms[i].values[j].value);
        free(p->doms[i].values);
    }
    free(p->doms);
    p->doms = NULL;
    p->ndoms = 0;
}

/* "host", "host:port", "[literal]" or "[literal]:port" into the policy. */
static int
parse_route(struct parse *p, struct domain_policy *pol, unsigned line)
{
    pol->route_host[0] = '\0';
    pol->route_port = 0;
    if (pol->route == NULL)
        return 0;
    const char *r = pol->route, *colon;
    if (r[0] == '[') {
        const char *close = strchr(r, ']');
        colon = close != NULL && close[1] == ':' ? close + 1 : NULL;
        if (close == NULL || (close[1] != '\0' && colon == NULL)) {
            config_err(p, line, "route: \"%s\" is not [address] or [address]:port", r);
            return -EINVAL;
        }
    } else {
        colon = strrchr(r, ':');
    }
    size_t hl = colon ? (size_t)(colon - r) : strlen(r);
    if (hl == 0 || hl >= sizeof(pol->route_host)) {
        config_err(p, line, "route: \"%s\": no host", r);
        return -EINVAL;
    }
    if (colon != NULL) {
        char *end;
        unsigned long port = strtoul(colon + 1, &end, 10);
        if (colon[1] == '\0' || *end != '\0' || port == 0 || port > 65535) {
            config_err(p, line, "route: \"%s\": the port must be 1 to 65535", r);
            return -EINVAL;
        }
        pol->route_port = (unsigned)port;
    }
    memcpy(pol->route_host, r, hl);
    pol->route_host[hl] = '\0';
    for (char *c = pol->route_host; *c; c++)
        if (*c >= 'A' && *c <= 'Z')
            *c = (char)(*c + 32);
    return 0;
}

/* A route to an address literal that delivery refuses as a target
 * (loopback, link-local, ... and not in [delivery] allow_networks:
 * outbound/targets.c): every message routed there would bounce, so the
 * config is refused instead. A host name is resolved at delivery, not
 * here. */
static void
check_route_target(struct parse *p, const struct domain_policy *pol, unsigned line)
{
    const char *h = pol->route_host;
    size_t n = strlen(h);
    if (n < 3 || h[0] != '[' || h[n - 1] != ']')
        return;
    bool v6 = strncmp(h + 1, "ipv6:", 5) == 0;
    char spec[sizeof(pol->route_host) + 8];
    snprintf(spec, sizeof(spec), v6 ? "[%.*s]:25" : "%.*s:25", (int)(n - (v6 ? 7 : 2)),
             h + (v6 ? 6 : 1));
    struct netaddr a;
    if (netaddr_parse(spec, &a) < 0)
        return;
    const struct sockaddr *sa = (const struct sockaddr *)&a.ss;
    const struct delivery_config *dc = &p->cfg->delivery;
    const char *what = netaddr_target_refused(sa, dc->allow, dc->nallow, dc->deny, dc->ndeny);
    if (what != NULL && strcmp(what, NETADDR_DENIED) == 0)
        config_err(p, line,
             "route: %s is in [delivery] deny_networks: every message routed there would "
             "bounce (class refused_target)",
             pol->route);
    else if (what != NULL)
        config_err(p, line,
             "route: %s is a %s address, which [delivery] allow_networks does not list: every "
             "message routed there would bounce (class refused_target)",
             pol->route, what);
}

static int
resolve_domains(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    if (conf_defaults(config_domain_keys, &cfg->default_domain, why, sizeof(why)) < 0) {
        config_err(p, 0, "%s", why);
        return -EINVAL;
    }
    cfg->default_domain.name = strdup("*");
    if (cfg->default_domain.name == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < p->ndoms; i++)
        if (strcmp(p->doms[i].name, "*") == 0) {
            cfg->default_domain.line = p->doms[i].line;
            if (apply_domain(p, &cfg->default_domain, &p->doms[i]) < 0)
                return -EINVAL;
        }
    if (parse_route(p, &cfg->default_domain, cfg->default_domain.line) < 0)
        return -EINVAL;
    check_route_target(p, &cfg->default_domain, cfg->default_domain.line);
    unsigned n = 0;
    cfg->domains = calloc(p->ndoms ? p->ndoms : 1, sizeof(*cfg->domains));
    if (cfg->domains == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < p->ndoms; i++) {
        if (strcmp(p->doms[i].name, "*") == 0)
            continue;
        struct domain_policy *pol = &cfg->domains[n];
        *pol = cfg->default_domain; /* owned fields: the name, and the route copied */
        pol->route = NULL;
        if (cfg->default_domain.route != NULL &&
            (pol->route = strdup(cfg->default_domain.route)) == NULL)
            return -ENOMEM;
        pol->name = p->doms[i].name;
        p->doms[i].name = NULL;
        pol->line = p->doms[i].line;
        n++;
        cfg->ndomains = n;
        if (apply_domain(p, pol, &p->doms[i]) < 0 || parse_route(p, pol, pol->line) < 0)
            return -EINVAL;
        if (pol->route != NULL && (cfg->default_domain.route == NULL ||
                                   strcmp(pol->route, cfg->default_domain.route) != 0))
            check_route_target(p, pol, pol->line); /* an inherited one is said once */
    }
    qsort(cfg->domains, cfg->ndomains, sizeof(*cfg->domains), cmp_domain);
    return 0;
}

static unsigned
key_line(struct parse *p, unsigned sec, const char *name)
{
    const struct conf_key *k = conf_find(config_sections[sec].keys, name);
    return k ? p->set_line[sec][k - config_sections[sec].keys] : 0;
}

/* Why name cannot be this host's name, or NULL. It is the EHLO name, in
 * Received, and in each DSN its Message-ID, Reporting-MTA and From:
 * (dsn_from@name): a name with a space failed every connection
 * (client_init_failed), one with < or > every DSN (dsn_failed). A domain
 * as RCPT takes one, ASCII (smtp_mailbox_check; its path limit is not
 * this name's). */
static const char *
hostname_why(const char *name)
{
    char a[2 + 253 + 1];
    int n = snprintf(a, sizeof(a), "x@%s", name);
    if (n < 0 || (size_t)n >= sizeof(a))
        return "longer than 253 octets";
    int rc = smtp_mailbox_check(a, (size_t)n, false);
    if (rc == SMTP_CMD_E_UTF8_NOT_ALLOWED)
        return "not ASCII: an IDN is written as its A-labels (xn--...)";
    return rc == 0 || rc == SMTP_CMD_E_PATH_TOO_LONG ? NULL : smtp_cmd_err_str(rc);
}

/* [server] hostname and [bounce] dsn_from: a DSN's From: is
 * dsn_from@hostname, its Message-ID ends with hostname. */
static void
check_names(struct parse *p)
{
    struct config *cfg = p->cfg;
    unsigned bsec = 0;
    while (strcmp(config_sections[bsec].name, "bounce") != 0)
        bsec++;
    const char *why;
    /* mx.example.com. is mx.example.com, as in DNS: the dot dropped, not
     * refused (an EHLO name or a Message-ID has none) */
    size_t hl = cfg->server.hostname != NULL ? strlen(cfg->server.hostname) : 0;
    if (hl > 1 && cfg->server.hostname[hl - 1] == '.' && cfg->server.hostname[hl - 2] != '.')
        cfg->server.hostname[hl - 1] = '\0';
    if (cfg->server.hostname != NULL && (why = hostname_why(cfg->server.hostname)) != NULL)
        config_err(p, key_line(p, 0, "hostname"), "hostname: \"%s\" is no domain name: %s",
                   cfg->server.hostname, why);
    char a[128];
    int n = snprintf(a, sizeof(a), "%s@example.com", cfg->bounce.dsn_from);
    int rc = n < 0 || (size_t)n >= sizeof(a) ? SMTP_CMD_E_LOCAL_TOO_LONG
                                             : smtp_mailbox_check(a, (size_t)n, false);
    if (rc < 0)
        config_err(p, key_line(p, bsec, "dsn_from"), "dsn_from: \"%s\" is no local part: %s",
                   cfg->bounce.dsn_from, smtp_cmd_err_str(rc));
}

/* [delivery] key's CIDR list text (NULL: unset) into out: the count, or
 * 0 with the error at the key's line. */
static int
delivery_nets(struct parse *p, const char *key, const char *text, struct cidr *out)
{
    if (text == NULL)
        return 0;
    char why[256];
    int n = cidr_parse_list(text, out, NETADDR_MAX_LIST, why, sizeof(why));
    if (n >= 0)
        return n;
    unsigned line = 0;
    for (unsigned i = 0; i < NSECTIONS; i++)
        if (strcmp(config_sections[i].name, "delivery") == 0)
            line = key_line(p, i, key);
    config_err(p, line, "%s: %s", key, why);
    return 0;
}

/* The files of [tls] loaded as the start and a reload load them
 * (engine.c): a certificate, key or CA file that does not load is an
 * error of this config, on the line of its key, so that --check-config
 * says so (it said ok before) and a reload's refusal names the line (it
 * did not). The contexts made are dropped. */
static void
check_tls_files(struct parse *p, const struct tls_config *tc, unsigned sec)
{
    char why[400];
    struct tls_ctx *ctx = NULL;
    int rc = 0;
    /* the client's only when it names files: the system store is the
     * machine's, and OpenSSL keeps some of what loading it takes */
    if (tc->ca_file != NULL || tc->ca_path != NULL) {
        rc = tls_ctx_new_client(tc, &ctx, why, sizeof(why));
        ctx = tls_ctx_unref(ctx);
    }
    if (rc == 0 && tls_config_has_server(tc)) {
        rc = tls_ctx_new_server(tc, &ctx, why, sizeof(why));
        ctx = tls_ctx_unref(ctx);
    }
    if (rc == 0)
        return;
    /* the messages begin with the key at fault ("key_file PATH: ...") */
    char key[32];
    size_t n = strcspn(why, " ");
    snprintf(key, sizeof(key), "%.*s", (int)(n < sizeof(key) ? n : sizeof(key) - 1), why);
    unsigned line = key_line(p, sec, key);
    if (line == 0)
        line = key_line(p, sec, "cert_file");
    config_err(p, line, "[tls] %s", why);
}

static bool
valid_field_name(const char *s, size_t n)
{
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= 32 || s[i] >= 127 || s[i] == ':')
            return false;
    return true;
}

/* [log] delivery_log_headers into cfg->log.headers. */
static int
parse_headers(struct parse *p)
{
    struct log_config *lc = &p->cfg->log;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "log") != 0)
        sec++;
    unsigned line = key_line(p, sec, "delivery_log_headers");
    for (const char *s = lc->delivery_log_headers; s != NULL && *s != '\0';) {
        while (*s == ' ' || *s == '\t' || *s == ',')
            s++;
        size_t n = strcspn(s, ", \t");
        if (n == 0)
            break;
        if (!valid_field_name(s, n)) {
            config_err(p, line, "delivery_log_headers: \"%.*s\" is not a header field name", (int)n,
                 s);
        } else if (lc->nheaders == DLOG_HEADERS_MAX) {
            config_err(p, line, "delivery_log_headers: at most %d fields", DLOG_HEADERS_MAX);
            return 0;
        } else if ((lc->headers[lc->nheaders] = strndup(s, n)) == NULL) {
            return -ENOMEM;
        } else {
            lc->nheaders++;
        }
        s += n;
    }
    struct stats_config *sc = &p->cfg->stats;
    char *end = NULL;
    unsigned long mode = sc->socket_mode_text ? strtoul(sc->socket_mode_text, &end, 8) : 0660;
    /* octal digits only: strtoul takes a sign and leading blanks */
    if (sc->socket_mode_text != NULL &&
        (*end != '\0' || mode > 0777 ||
         strspn(sc->socket_mode_text, "01234567") != strlen(sc->socket_mode_text))) {
        unsigned ss = 0;
        while (strcmp(config_sections[ss].name, "stats") != 0)
            ss++;
        config_err(p, key_line(p, ss, "socket_mode"), "socket_mode: octal permissions, e.g. 0660");
    }
    sc->socket_mode = (unsigned)mode;
    /* One message of max_message_size to max_recipients recipients must
     * fit, or its client would be told 452 for ever. */
    uint64_t one_txn = p->cfg->server.max_message_size +
                       (uint64_t)p->cfg->server.max_recipients * CONFIG_RCPT_MEMORY_MAX;
    if (p->cfg->server.body_memory_limit < one_txn)
        config_err(p,
             key_line(p, 0, "body_memory_limit") ? key_line(p, 0, "body_memory_limit")
             : key_line(p, 0, "max_message_size") ? key_line(p, 0, "max_message_size")
                                                  : key_line(p, 0, "max_recipients"),
             "body_memory_limit: smaller than max_message_size (%llu) and the memory of "
             "max_recipients (%u) recipients (%u octets each at most): %llu; a message of that "
             "size to that many recipients could never be received",
             (unsigned long long)p->cfg->server.max_message_size, p->cfg->server.max_recipients,
             CONFIG_RCPT_MEMORY_MAX, (unsigned long long)one_txn);
    const char *eh = p->cfg->server.expire_header;
    if (eh != NULL && !valid_field_name(eh, strlen(eh)))
        config_err(p, key_line(p, 0, "expire_header"), "expire_header: not a header field name");
    static const char *const control[] = {"X-Sluice-Tenant", "X-Sluice-Campaign", "X-Sluice-Pool",
                                          "X-Sluice-Priority"};
    for (size_t i = 0; eh != NULL && i < sizeof(control) / sizeof(control[0]); i++)
        if (strcasecmp(eh, control[i]) == 0)
            config_err(p, key_line(p, 0, "expire_header"), "expire_header: %s is a control field of "
                 "its own (engine/owner.h)", control[i]);
    return 0;
}

static void
dkim_report(void *ctx, const char *what)
{
    struct parse *p = ctx;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "dkim") != 0)
        sec++;
    config_err(p, key_line(p, sec, "key_dir"), "[dkim] %s", what);
}

/* Load every key of [dkim DOMAIN SELECTOR] config_sections and of [dkim] key_dir
 * into cfg->dkim_keys: a key that cannot be read or parsed is an error of
 * this config, with the line of its key_file. */
static int
build_dkim(struct parse *p)
{
    struct config *cfg = p->cfg;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "dkim") != 0)
        sec++;
    char why[256];
    const char *bad = NULL;
    if (dkim_config_check(&cfg->dkim, &bad, why, sizeof(why)) < 0)
        config_err(p, key_line(p, sec, bad), "%s: %s", bad, why);
    if (p->ndkims == 0 && cfg->dkim.key_dir == NULL)
        return 0;
    struct dkim_keyring *kr = dkim_keyring_new(cfg->dkim.signing_domain);
    if (kr == NULL)
        return -ENOMEM;
    for (unsigned i = 0; i < p->ndkims; i++) {
        struct dkim_build *b = &p->dkims[i];
        char err[1200];
        bad = NULL;
        int rc = dkim_keyring_add(kr, b->domain, b->selector, &b->sc, &cfg->dkim, &bad, err,
                                  sizeof(err));
        if (rc == -ENOMEM) {
            dkim_keyring_unref(kr);
            return rc;
        }
        if (rc < 0) {
            const struct conf_key *k = bad ? conf_find(dkim_sig_conf_keys, bad) : NULL;
            unsigned line = k ? b->key_line[k - dkim_sig_conf_keys] : 0;
            config_err(p, line ? line : b->line, "[dkim %s %s] %s: %s", b->domain, b->selector,
                 bad ? bad : "key_file", err);
        }
    }
    if (cfg->dkim.key_dir != NULL)
        dkim_keyring_add_dir(kr, &cfg->dkim, dkim_report, p);
    dkim_keyring_seal(kr, dkim_report, p);
    cfg->dkim_keys = kr;
    return 0;
}

/* netaddr_parse_list into *out, allocated at the count parsed (NULL when
 * none); returns the count, -1 with why, or -ENOMEM. */
static int
parse_addrs(const char *text, struct netaddr **out, char *why, size_t whylen)
{
    struct netaddr tmp[NETADDR_MAX_LIST];
    int n = netaddr_parse_list(text, tmp, NETADDR_MAX_LIST, why, whylen);
    *out = NULL;
    if (n <= 0)
        return n;
    if ((*out = malloc((size_t)n * sizeof(tmp[0]))) == NULL) {
        snprintf(why, whylen, "out of memory");
        return -ENOMEM;
    }
    memcpy(*out, tmp, (size_t)n * sizeof(tmp[0]));
    return n;
}

/* [bounce]: the listener's addresses, the VERP key, the prefix. */
static void
check_bounce(struct parse *p)
{
    struct bounce_config *b = &p->cfg->bounce;
    unsigned sec = 0;
    while (strcmp(config_sections[sec].name, "bounce") != 0)
        sec++;
    char why[256];
    if (b->listen != NULL) {
        b->nlisten = parse_addrs(b->listen, &b->listen_addrs, why, sizeof(why));
        if (b->nlisten <= 0)
            config_err(p, key_line(p, sec, "listen"), "[bounce] listen: %s",
                 b->nlisten == 0 ? "no address given" : why);
        if (b->domains == NULL && b->verp_domain == NULL)
            config_err(p, key_line(p, sec, "listen"),
                 "[bounce] listen: needs domains or verp_domain (the domains it accepts for)");
    }
    for (const char *c = b->verp_prefix; c != NULL && *c; c++)
        if (!isalnum((unsigned char)*c) && *c != '-' && *c != '_' && *c != '.') {
            config_err(p, key_line(p, sec, "verp_prefix"),
                 "[bounce] verp_prefix: letters, digits, '-', '_' and '.' only");
            break;
        }
    if (b->verp_key_file != NULL) {
        int n = verp_key_load(b->verp_key_file, b->verp_key, sizeof(b->verp_key), why,
                              sizeof(why));
        if (n < 0)
            config_err(p, key_line(p, sec, "verp_key_file"), "[bounce] verp_key_file: %s", why);
        else
            b->verp_key_len = (size_t)n;
    } else if (b->verp_domain != NULL || b->listen != NULL) {
        config_err(p, key_line(p, sec, b->verp_domain ? "verp_domain" : "listen"),
             "[bounce] %s: needs verp_key_file (the key of the VERP tokens)",
             b->verp_domain ? "verp_domain" : "listen");
    }
}

/* The submission, implicit-TLS and bounce listeners each bind one
 * SO_REUSEPORT socket per worker, so two of them given the same address
 * both bound, and the kernel spread its connections over them: a
 * submission client met the TLS listener's silence or the bounce
 * listener. An address may be one listener's only. */
static void
check_listeners_apart(struct parse *p)
{
    const struct server_config *srv = &p->cfg->server;
    const struct bounce_config *b = &p->cfg->bounce;
    unsigned bsec = 0;
    while (strcmp(config_sections[bsec].name, "bounce") != 0)
        bsec++;
    const struct {
        const struct netaddr *a;
        int n;
        const char *name;
        unsigned line;
    } l[] = {
        {srv->listen_addrs, srv->nlisten, "listen", key_line(p, 0, "listen")},
        {srv->listen_tls_addrs, srv->nlisten_tls, "listen_tls", key_line(p, 0, "listen_tls")},
        {b->listen_addrs, b->nlisten, "[bounce] listen", key_line(p, bsec, "listen")},
    };
    for (unsigned i = 1; i < sizeof(l) / sizeof(l[0]); i++)
        for (int j = 0; j < l[i].n; j++) {
            char a[INET6_ADDRSTRLEN + 8], o[INET6_ADDRSTRLEN + 8];
            netaddr_str((const struct sockaddr *)&l[i].a[j].ss, a, sizeof(a));
            bool found = false;
            for (unsigned k = 0; k < i && !found; k++)
                for (int m = 0; m < l[k].n && !found; m++) {
                    netaddr_str((const struct sockaddr *)&l[k].a[m].ss, o, sizeof(o));
                    if (strcmp(a, o) != 0)
                        continue;
                    found = true;
                    config_err(p, l[i].line,
                               "%s: %s is also %s's: each listener needs an address of its own "
                               "(the connections would be spread over both)",
                               l[i].name, a, l[k].name);
                }
        }
}

/* One "ADDRESS[:weight]" of a pool's sources (IPv6 with a weight in
 * brackets) into its canonical address text and weight. */
static int
parse_pool_source(const char *tok, char *addr, size_t cap, unsigned *weight, char *why,
                  size_t whylen)
{
    char buf[80];
    unsigned char bin[16];
    size_t n = strlen(tok);
    if (n >= sizeof(buf)) {
        snprintf(why, whylen, "\"%.40s...\" is too long", tok);
        return -EINVAL;
    }
    memcpy(buf, tok, n + 1);
    *weight = 1;
    char *a = buf, *w = NULL;
    int fam;
    if (buf[0] == '[') {
        char *close = strchr(buf, ']');
        if (close == NULL || (close[1] != '\0' && close[1] != ':')) {
            snprintf(why, whylen, "\"%s\": expected [IPv6]:weight", tok);
            return -EINVAL;
        }
        *close = '\0';
        a = buf + 1;
        w = close[1] == ':' ? close + 2 : NULL;
        fam = AF_INET6;
    } else if (inet_pton(AF_INET6, buf, bin) == 1) {
        fam = AF_INET6;
    } else {
        char *colon = strrchr(buf, ':');
        if (colon != NULL) {
            *colon = '\0';
            w = colon + 1;
        }
        fam = AF_INET;
    }
    if (inet_pton(fam, a, bin) != 1 || inet_ntop(fam, bin, addr, (socklen_t)cap) == NULL) {
        snprintf(why, whylen, "\"%s\" is not an address (IPv6 with a weight: [ADDRESS]:weight)",
                 tok);
        return -EINVAL;
    }
    if (w != NULL) {
        uint64_t v;
        if (conf_parse_uint(w, &v) < 0 || v > 1000) {
            snprintf(why, whylen, "\"%s\": the weight must be 0 to 1000", tok);
            return -EINVAL;
        }
        *weight = (unsigned)v;
    }
    return 0;
}

/* Resolve [pool] sources against [source] config_sections and [tenant] pools
 * against [pool] config_sections, reporting every name that matches nothing. */
static int
resolve_owners(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    for (unsigned i = 0; i < cfg->nsources; i++) {
        const char *e = cfg->sources[i].ehlo;
        if (e != NULL && !config_valid_domain_name(e))
            config_err(p, cfg->sources[i].line, "[source %s] ehlo: \"%s\" is not a host name",
                 cfg->sources[i].pattern, e);
    }
    for (unsigned i = 0; i < cfg->npools; i++) {
        struct pool_config *pl = &cfg->pools[i];
        unsigned line = pl->key_line[0] ? pl->key_line[0] : pl->line;
        if (pl->sources_text == NULL) {
            config_err(p, pl->line, "[pool %s]: sources: not set (a pool needs at least one source)",
                 pl->name);
            continue;
        }
        unsigned total = 0;
        for (const char *s = pl->sources_text; *s != '\0';) {
            while (*s == ' ' || *s == '\t' || *s == ',')
                s++;
            size_t n = strcspn(s, ", \t");
            if (n == 0)
                break;
            char tok[128], addr[INET6_ADDRSTRLEN];
            snprintf(tok, sizeof(tok), "%.*s", (int)(n < 127 ? n : 127), s);
            s += n;
            unsigned weight;
            if (parse_pool_source(tok, addr, sizeof(addr), &weight, why, sizeof(why)) < 0) {
                config_err(p, line, "[pool %s] sources: %s", pl->name, why);
                continue;
            }
            const struct mx_policy *src = NULL;
            for (unsigned k = 0; k < cfg->nsources; k++)
                if (strcmp(cfg->sources[k].pattern, addr) == 0)
                    src = &cfg->sources[k];
            if (src == NULL) {
                config_err(p, line, "[pool %s] sources: %s has no [source %s] section", pl->name, addr,
                     addr);
                continue;
            }
            bool dup = false;
            for (unsigned k = 0; k < pl->nsources; k++)
                dup |= pl->sources[k].source == src;
            if (dup) {
                config_err(p, line, "[pool %s] sources: %s is listed twice", pl->name, addr);
                continue;
            }
            struct pool_source *v = realloc(pl->sources, (pl->nsources + 1) * sizeof(*v));
            if (v == NULL)
                return -ENOMEM;
            pl->sources = v;
            v[pl->nsources++] = (struct pool_source){src, weight};
            total += weight;
        }
        if (pl->nsources > 0 && total == 0)
            config_err(p, line, "[pool %s] sources: every weight is 0: the pool could send nothing",
                 pl->name);
    }
    for (unsigned i = 0; i < cfg->ntenants; i++) {
        struct tenant_config *t = &cfg->tenants[i];
        unsigned pools_line = t->key_line[1] ? t->key_line[1] : t->line;
        unsigned pool_line = t->key_line[2] ? t->key_line[2] : t->line;
        for (const char *s = t->pools_text; s != NULL && *s != '\0';) {
            while (*s == ' ' || *s == '\t' || *s == ',')
                s++;
            size_t n = strcspn(s, ", \t");
            if (n == 0)
                break;
            const struct pool_config *pl = config_pool(cfg, s, n);
            if (pl == NULL) {
                config_err(p, pools_line, "[tenant %s] pools: no [pool %.*s] section", t->name, (int)n,
                     s);
            } else if (config_tenant_may_use(t, pl)) {
                config_err(p, pools_line, "[tenant %s] pools: %s is listed twice", t->name, pl->name);
            } else {
                const struct pool_config **v = realloc(t->pools, (t->npools + 1) * sizeof(*v));
                if (v == NULL)
                    return -ENOMEM;
                t->pools = v;
                v[t->npools++] = pl;
            }
            s += n;
        }
        if (t->pool_text != NULL) {
            t->pool = config_pool(cfg, t->pool_text, strlen(t->pool_text));
            if (t->pool == NULL) {
                config_err(p, pool_line, "[tenant %s] pool: no [pool %s] section", t->name,
                     t->pool_text);
            } else if (t->pools_text == NULL) {
                const struct pool_config **v = malloc(sizeof(*v));
                if (v == NULL)
                    return -ENOMEM;
                v[0] = t->pool;
                t->pools = v;
                t->npools = 1;
            } else if (!config_tenant_may_use(t, t->pool)) {
                config_err(p, pool_line, "[tenant %s] pool: %s is not among its pools (%s)", t->name,
                     t->pool->name, t->pools_text);
            }
        } else if (t->npools > 0) {
            t->pool = t->pools[0];
        }
    }
    cfg->bounce.tenants = cfg->tenants;
    cfg->bounce.ntenants = cfg->ntenants;
    return 0;
}

/* Where key (of config_source_keys) was set in [source] i; its header's line
 * when it was not. */
static unsigned
source_key_line(struct parse *p, unsigned i, const char *key)
{
    const struct conf_key *k = conf_find(config_source_keys, key);
    for (unsigned n = 0; k != NULL && n < p->nlim_set; n++) {
        const struct lim_set *ls = &p->lim_set[n];
        if (ls->v == &p->cfg->sources && ls->i == i && ls->key == (unsigned)(k - config_source_keys))
            return ls->line;
    }
    return p->cfg->sources[i].line;
}

/* [shaping]: the operator's rules file, then the shipped set, compiled
 * once (a bad rule is an error of this config). */
static int
build_shaping(struct parse *p)
{
    struct config *cfg = p->cfg;
    if (!cfg->shaping.enabled)
        return 0;
    if ((cfg->shaping_rules = shaping_rules_new()) == NULL)
        return -ENOMEM;
    char why[512];
    int rc = 0;
    if (cfg->shaping.rules != NULL)
        rc = shaping_rules_add_file(cfg->shaping_rules, cfg->shaping.rules, why, sizeof(why));
    if (rc == 0 && cfg->shaping.builtin_rules)
        rc = shaping_rules_add_text(cfg->shaping_rules, shaping_builtin_rules,
                                    "(built-in shaping.rules)", why, sizeof(why));
    if (rc == -ENOMEM)
        return -ENOMEM;
    if (rc < 0) {
        unsigned sec = 0;
        while (strcmp(config_sections[sec].name, "shaping") != 0)
            sec++;
        config_err(p, key_line(p, sec, "rules"), "[shaping] rules: %s", why);
        return 0;
    }
    return shaping_rules_finish(cfg->shaping_rules);
}

/* Finish each [warmup] plan and put each [source] on its plan. */
static void
resolve_warmups(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    for (unsigned i = 0; i < cfg->nwarmups; i++) {
        unsigned line;
        if (warmup_conf_finish(&cfg->warmups[i], &line, why, sizeof(why)) < 0)
            config_err(p, line, "%s", why);
    }
    for (unsigned i = 0; i < cfg->nsources; i++) {
        struct mx_policy *src = &cfg->sources[i];
        if (src->warmup == NULL) {
            if (src->warmup_start != NULL)
                config_err(p, source_key_line(p, i, "warmup_start"),
                     "[source %s] warmup_start: set without warmup (a plan)", src->pattern);
            continue;
        }
        for (unsigned k = 0; k < cfg->nwarmups; k++)
            if (strcasecmp(cfg->warmups[k].name, src->warmup) == 0)
                src->warmup_plan = &cfg->warmups[k];
        if (src->warmup_plan == NULL)
            config_err(p, source_key_line(p, i, "warmup"), "[source %s] warmup: no [warmup %s] section",
                 src->pattern, src->warmup);
        if (src->warmup_start == NULL)
            config_err(p, source_key_line(p, i, "warmup"),
                 "[source %s] warmup: needs warmup_start = YYYY-MM-DD (day 1 of the plan)",
                 src->pattern);
        else if (warmup_conf_parse_date(src->warmup_start, &src->warmup_start_day) < 0)
            config_err(p, source_key_line(p, i, "warmup_start"),
                 "[source %s] warmup_start: \"%s\" is not a date YYYY-MM-DD", src->pattern,
                 src->warmup_start);
    }
}

int
config_finish(struct parse *p)
{
    struct config *cfg = p->cfg;
    char why[256];
    struct delivery_config *dc = &cfg->delivery;
    uint32_t *t = dc->client_timeouts; /* each key is at most an hour: fits */
    t[SMTP_CLIENT_S_GREETING] = t[SMTP_CLIENT_S_EHLO] = t[SMTP_CLIENT_S_HELO] =
        (uint32_t)dc->greeting_timeout;
    t[SMTP_CLIENT_S_STARTTLS] = t[SMTP_CLIENT_S_TLS] = (uint32_t)dc->starttls_timeout;
    t[SMTP_CLIENT_S_RSET] = t[SMTP_CLIENT_S_MAIL] = t[SMTP_CLIENT_S_RCPT] =
        (uint32_t)dc->command_timeout;
    t[SMTP_CLIENT_S_DATA] = t[SMTP_CLIENT_S_BODY] = (uint32_t)dc->data_timeout;
    t[SMTP_CLIENT_S_DOT] = (uint32_t)dc->dot_timeout;
    t[SMTP_CLIENT_S_IDLE] = t[SMTP_CLIENT_S_CLOSED] = 0; /* the caller's idle_timeout */
    for (unsigned i = 0; i < NSECTIONS; i++)
        if (strcmp(config_sections[i].name, "suppress") == 0 &&
            suppress_config_check(&cfg->suppress, cfg->queue.path, why, sizeof(why)) != 0) {
            const char *k = strncmp(why, "reply", 5) == 0             ? "reply"
                            : strncmp(why, "on_complaint", 12) == 0   ? "on_complaint"
                            : strncmp(why, "on_invalid", 10) == 0     ? "on_invalid_recipient"
                                                                      : "path";
            config_err(p, key_line(p, i, k), "%s", why);
        }
    struct server_config *srv = &cfg->server;
    srv->nlisten = parse_addrs(srv->listen, &srv->listen_addrs, why, sizeof(why));
    if (srv->nlisten <= 0)
        config_err(p, key_line(p, 0, "listen"), "listen: %s",
             srv->nlisten == 0 ? "no address given" : why);
    if (srv->listen_tls != NULL) {
        srv->nlisten_tls = parse_addrs(srv->listen_tls, &srv->listen_tls_addrs, why, sizeof(why));
        if (srv->nlisten_tls < 0)
            config_err(p, key_line(p, 0, "listen_tls"), "listen_tls: %s", why);
        else if (!tls_config_has_server(&cfg->tls))
            config_err(p, key_line(p, 0, "listen_tls"), "listen_tls: needs [tls] cert_file");
    }
    check_bounce(p);
    check_listeners_apart(p);
    if (cfg->delivery.source_address != NULL) {
        struct cidr src[4];
        int n = cidr_parse_list(cfg->delivery.source_address, src, 4, why, sizeof(why));
        unsigned line = 0;
        for (unsigned i = 0; i < NSECTIONS; i++)
            if (strcmp(config_sections[i].name, "delivery") == 0)
                line = key_line(p, i, "source_address");
        for (int i = 0; i < n; i++) {
            struct sockaddr_storage *ss =
                src[i].family == AF_INET ? &cfg->delivery.source4 : &cfg->delivery.source6;
            if (ss->ss_family != AF_UNSPEC || src[i].bits != (src[i].family == AF_INET ? 32 : 128)) {
                config_err(p, line, "source_address: one address per family, without /prefix");
                n = -1;
                break;
            }
            if (src[i].family == AF_INET) {
                struct sockaddr_in *a = (struct sockaddr_in *)ss;
                a->sin_family = AF_INET;
                memcpy(&a->sin_addr, src[i].addr, 4);
            } else {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
                a->sin6_family = AF_INET6;
                memcpy(&a->sin6_addr, src[i].addr, 16);
            }
        }
        if (n == -EINVAL || n == -E2BIG)
            config_err(p, line, "source_address: %s", why);
    }
    cfg->delivery.nallow =
        delivery_nets(p, "allow_networks", cfg->delivery.allow_networks, cfg->delivery.allow);
    cfg->delivery.ndeny =
        delivery_nets(p, "deny_networks", cfg->delivery.deny_networks, cfg->delivery.deny);
    const char *dns_bad;
    if (dns_config_check(&cfg->dns, &dns_bad, why, sizeof(why)) < 0) {
        unsigned dns_sec = 0;
        while (strcmp(config_sections[dns_sec].name, "dns") != 0)
            dns_sec++;
        /* the line of the key at fault, or of the other key it is checked
         * against when that one keeps its default */
        unsigned line = key_line(p, dns_sec, dns_bad);
        if (line == 0)
            line = key_line(p, dns_sec, strcmp(dns_bad, "min_ttl") == 0 ? "max_ttl" : "servers");
        config_err(p, line, "[dns] %s", why);
    }
    unsigned tls_sec = 0;
    while (strcmp(config_sections[tls_sec].name, "tls") != 0)
        tls_sec++;
    if (cfg->tls.min_protocol > cfg->tls.max_protocol) {
        /* refused by the TLS context at start; said here, with its line */
        unsigned line = key_line(p, tls_sec, "min_protocol");
        if (line == 0)
            line = key_line(p, tls_sec, "max_protocol");
        config_err(p, line, "[tls] min_protocol is newer than max_protocol");
    } else {
        check_tls_files(p, &cfg->tls, tls_sec);
    }
    srv->ntrusted = cidr_parse_list(srv->trusted_networks, srv->trusted, NETADDR_MAX_LIST, why,
                                    sizeof(why));
    if (srv->ntrusted < 0)
        config_err(p, key_line(p, 0, "trusted_networks"), "trusted_networks: %s", why);
    if (parse_headers(p) < 0)
        return -ENOMEM;
    if (resolve_owners(p) < 0)
        return -ENOMEM;
    resolve_warmups(p);
    if (build_shaping(p) < 0)
        return -ENOMEM;
    if (build_dkim(p) < 0)
        return -ENOMEM;
    for (unsigned i = 0; i < cfg->nevents; i++)
        if (events_sink_check(&cfg->events[i], why, sizeof(why)) < 0)
            config_err(p, cfg->events[i].line, "[events %s]: %s", cfg->events[i].name, why);
    check_names(p);
    if (p->nerrors != 0)
        return -EINVAL;
    if (cfg->server.workers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        cfg->server.workers = n > 0 ? (unsigned)n : 1;
    }
    if (cfg->server.hostname == NULL) {
        char host[256];
        if (gethostname(host, sizeof(host)) != 0)
            snprintf(host, sizeof(host), "localhost");
        host[sizeof(host) - 1] = '\0';
        cfg->server.hostname = strdup(host);
        if (cfg->server.hostname == NULL)
            return -ENOMEM;
        const char *bad = hostname_why(host);
        if (bad != NULL) {
            config_err(p, 0, "the system host name \"%s\" is no domain name (%s): set [server] "
                       "hostname", host, bad);
            return -EINVAL;
        }
    }
    return resolve_domains(p);
}
