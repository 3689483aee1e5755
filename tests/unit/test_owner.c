/*
 * owner: the control header fields (table-driven: folding, case, blanks
 * before the colon, duplicates, over-long and malformed values, cuts that
 * leave the rest of the header section intact), the owner decisions
 * against a config and a user (engine/owner.h), and the expiry field's
 * value (msa_parse_expiry), and the bound on the campaign names a node
 * keeps ids for (delivery_owner, [server] campaign_names).
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "common/intern.h"
#include "common/log.h"
#include "engine/config.h"
#include "engine/delivery.h"
#include "engine/engine.h"
#include "engine/msa.h"
#include "engine/owner.h"

struct scan_case {
    const char *msg;
    int rc;                  /* 0 or an enum owner_error */
    enum owner_field field;  /* with rc < 0 */
    const char *tenant, *campaign, *pool, *priority, *expire; /* NULL: absent */
    const char *kept;        /* the header section once the cuts are made */
};

static const struct scan_case cases[] = {
    {"Subject: a\r\n\r\nbody\r\n", 0, 0, NULL, NULL, NULL, NULL, NULL, "Subject: a\r\n"},
    {"X-Sluice-Tenant: acme\r\nSubject: a\r\n\r\nb\r\n", 0, 0, "acme", NULL, NULL, NULL, NULL,
     "Subject: a\r\n"},
    /* case, blanks before the colon, surrounding blanks */
    {"x-sluice-POOL :  bulk \t\r\nSubject: a\r\n\r\n", 0, 0, NULL, NULL, "bulk", NULL, NULL,
     "Subject: a\r\n"},
    /* folded: unfolded, its continuation lines cut with it */
    {"Subject: a\r\nX-Sluice-Campaign: spring\r\n sale\r\n\t2026\r\nTo: b\r\n\r\n", 0, 0, NULL,
     "spring sale 2026", NULL, NULL, NULL, "Subject: a\r\nTo: b\r\n"},
    {"X-Sluice-Campaign:\r\n folded-only\r\n\r\n", 0, 0, NULL, "folded-only", NULL, NULL, NULL,
     ""},
    /* every field, the expiry too, in any order */
    {"X-Sluice-Priority: 7\r\nFrom: f\r\nX-Sluice-Expire: 2h\r\nX-Sluice-Tenant: t\r\n"
     "X-Sluice-Pool: p\r\nX-Sluice-Campaign: c\r\n\r\n",
     0, 0, "t", "c", "p", "7", "2h", "From: f\r\n"},
    /* an empty value is absent, and still cut */
    {"X-Sluice-Tenant:\r\nSubject: a\r\n\r\n", 0, 0, NULL, NULL, NULL, NULL, NULL,
     "Subject: a\r\n"},
    /* a field that only starts like ours is not ours */
    {"X-Sluice-Tenants: x\r\nX-Sluice-Tenant-Id: y\r\n\r\n", 0, 0, NULL, NULL, NULL, NULL, NULL,
     "X-Sluice-Tenants: x\r\nX-Sluice-Tenant-Id: y\r\n"},
    /* a continuation line of another field is not a field */
    {"Subject: a\r\n X-Sluice-Tenant: x\r\n\r\n", 0, 0, NULL, NULL, NULL, NULL, NULL,
     "Subject: a\r\n X-Sluice-Tenant: x\r\n"},
    /* duplicates are refused, whatever their case */
    {"X-Sluice-Tenant: a\r\nx-sluice-tenant: a\r\n\r\n", OWNER_EDUP, OWNER_F_TENANT, NULL, NULL, NULL, NULL, NULL, NULL},
    {"X-Sluice-Expire: 1h\r\nX-Sluice-Expire: 2h\r\n\r\n", OWNER_EDUP, OWNER_F_EXPIRE, NULL, NULL, NULL, NULL, NULL, NULL},
    /* malformed values */
    {"X-Sluice-Tenant: a b\r\n\r\n", OWNER_EVALUE, OWNER_F_TENANT, NULL, NULL, NULL, NULL, NULL, NULL},
    {"X-Sluice-Pool: p/q\r\n\r\n", OWNER_EVALUE, OWNER_F_POOL, NULL, NULL, NULL, NULL, NULL, NULL},
    {"X-Sluice-Priority: 10\r\n\r\n", OWNER_EVALUE, OWNER_F_PRIORITY, NULL, NULL, NULL, NULL, NULL, NULL},
    {"X-Sluice-Priority: high\r\n\r\n", OWNER_EVALUE, OWNER_F_PRIORITY, NULL, NULL, NULL, NULL, NULL, NULL},
    {"X-Sluice-Campaign: say \"hi\"\r\n\r\n", OWNER_EVALUE, OWNER_F_CAMPAIGN, NULL, NULL, NULL, NULL, NULL, NULL},
    {"X-Sluice-Campaign: caf\xc3\xa9\r\n\r\n", OWNER_EVALUE, OWNER_F_CAMPAIGN, NULL, NULL, NULL, NULL, NULL, NULL},
    {"X-Sluice-Tenant: 0123456789012345678901234567890123456789012345678901234567890123x\r\n\r\n",
     OWNER_EVALUE, OWNER_F_TENANT, NULL, NULL, NULL, NULL, NULL, NULL},
};

static void
test_scan_table(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct scan_case *c = &cases[i];
        size_t len = strlen(c->msg);
        struct msa_scan ms;
        msa_scan(c->msg, len, &ms);
        struct owner_scan sc;
        enum owner_field f = OWNER_F_COUNT;
        int rc = owner_scan(c->msg, ms.header_len, "X-Sluice-Expire", &sc, &f);
        if (rc != c->rc)
            fail_msg("case %zu: rc %d, want %d", i, rc, c->rc);
        if (rc < 0) {
            assert_int_equal(f, c->field);
            continue;
        }
        const char *want[OWNER_F_COUNT] = {c->tenant, c->campaign, c->pool, c->priority,
                                           c->expire};
        for (int k = 0; k < OWNER_F_COUNT; k++) {
            if (want[k] == NULL) {
                if (sc.present[k])
                    fail_msg("case %zu: field %d present: \"%s\"", i, k, sc.value[k]);
            } else if (!sc.present[k] || strcmp(sc.value[k], want[k]) != 0) {
                fail_msg("case %zu: field %d is \"%s\", want \"%s\"", i, k, sc.value[k], want[k]);
            }
        }
        char kept[512];
        size_t n = 0, at = 0;
        for (unsigned k = 0; k < sc.ncuts; k++) {
            assert_true(sc.cuts[k].off >= at);
            memcpy(kept + n, c->msg + at, sc.cuts[k].off - at);
            n += sc.cuts[k].off - at;
            at = sc.cuts[k].off + sc.cuts[k].len;
        }
        memcpy(kept + n, c->msg + at, ms.header_len - at);
        n += ms.header_len - at;
        kept[n] = '\0';
        if (strcmp(kept, c->kept) != 0)
            fail_msg("case %zu: kept \"%s\", want \"%s\"", i, kept, c->kept);
    }
}

/* An over-long value is refused; blanks past the limit are not counted. */
static void
test_scan_long(void **state)
{
    (void)state;
    char msg[1024];
    char v[OWNER_VALUE_MAX + 2];
    memset(v, 'c', sizeof(v) - 1);
    v[sizeof(v) - 1] = '\0';
    snprintf(msg, sizeof(msg), "X-Sluice-Campaign: %s\r\n\r\n", v);
    struct owner_scan sc;
    enum owner_field f;
    assert_int_equal(owner_scan(msg, strlen(msg) - 2, NULL, &sc, &f), OWNER_ELONG);
    assert_int_equal(f, OWNER_F_CAMPAIGN);
    v[OWNER_VALUE_MAX] = '\0'; /* exactly the limit, then blanks */
    snprintf(msg, sizeof(msg), "X-Sluice-Campaign: %s  \r\n   \r\n\r\n", v);
    assert_int_equal(owner_scan(msg, strlen(msg) - 2, NULL, &sc, &f), 0);
    assert_int_equal(strlen(sc.value[OWNER_F_CAMPAIGN]), OWNER_VALUE_MAX);
    /* without expire_name, the expiry field is nobody's */
    const char *m2 = "X-Sluice-Expire: 1h\r\n";
    assert_int_equal(owner_scan(m2, strlen(m2), NULL, &sc, &f), 0);
    assert_int_equal(sc.ncuts, 0);
}

static struct config *
load(const char *text)
{
    char path[64];
    snprintf(path, sizeof(path), "/tmp/sluice-owner-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    struct config *cfg = NULL;
    int rc = config_load(path, &cfg, stderr);
    unlink(path);
    assert_int_equal(rc, 0);
    return cfg;
}

static const char *const CONF = "[server]\nlisten = 127.0.0.1:2525\n"
                                "[source 127.0.0.2]\nehlo = a.example\n"
                                "[source 127.0.0.3]\n"
                                "[pool tx]\nsources = 127.0.0.2\n"
                                "[pool bulk]\nsources = 127.0.0.2:3, 127.0.0.3\n"
                                "[pool other]\nsources = 127.0.0.3\n"
                                "[tenant acme]\npools = tx, bulk\npool = tx\npriority = 4\n"
                                "[tenant solo]\npool = bulk\n";

static int
resolve(const struct config *cfg, const struct auth_user *u, bool trusted, const char *msg,
        struct owner *o, char *reply)
{
    struct owner_scan sc;
    enum owner_field f;
    assert_int_equal(owner_scan(msg, strlen(msg), NULL, &sc, &f), 0);
    reply[0] = '\0';
    return owner_resolve(cfg, u, trusted, &sc, o, reply, 300);
}

static void
test_resolve(void **state)
{
    (void)state;
    struct config *cfg = load(CONF);
    assert_string_equal(cfg->sources[0].ehlo, "a.example");
    assert_null(cfg->sources[1].ehlo);
    assert_int_equal(cfg->npools, 3);
    assert_int_equal(cfg->pools[1].nsources, 2);
    assert_int_equal(cfg->pools[1].sources[0].weight, 3);
    assert_int_equal(cfg->pools[1].sources[1].weight, 1);
    const struct tenant_config *solo = config_tenant(cfg, "SOLO", 4);
    assert_non_null(solo);
    assert_int_equal(solo->npools, 1); /* pool alone: it is the only one allowed */

    struct owner o;
    char r[300];
    struct auth_user u1 = {.name = "app1", .tenant = "acme"};
    struct auth_user u2 = {.name = "app2", .tenant = "acme", .pool = "bulk"};
    struct auth_user u3 = {.name = "app3"};
    struct auth_user u4 = {.name = "app4", .tenant = "gone"};
    struct auth_user u5 = {.name = "app5", .pool = "gone"};

    /* the user's tenant and its defaults */
    assert_int_equal(resolve(cfg, &u1, false, "Subject: x\r\n", &o, r), 0);
    assert_string_equal(o.tenant->name, "acme");
    assert_string_equal(o.pool->name, "tx");
    assert_int_equal(o.priority, 4);
    assert_string_equal(o.campaign, "");
    /* a header choosing among the tenant's pools, a priority, a campaign */
    assert_int_equal(resolve(cfg, &u1, false,
                             "X-Sluice-Pool: BULK\r\nX-Sluice-Priority: 0\r\n"
                             "X-Sluice-Campaign: c1\r\n",
                             &o, r),
                     0);
    assert_string_equal(o.pool->name, "bulk");
    assert_int_equal(o.priority, 0);
    assert_string_equal(o.campaign, "c1");
    /* the same tenant named again is fine; another is not */
    assert_int_equal(resolve(cfg, &u1, false, "X-Sluice-Tenant: Acme\r\n", &o, r), 0);
    assert_int_equal(resolve(cfg, &u1, true, "X-Sluice-Tenant: solo\r\n", &o, r), -EPERM);
    assert_string_equal(r, "550 5.7.1 tenant \"solo\" not allowed for user \"app1\"");
    /* a pool the tenant may not use, an unknown one */
    assert_int_equal(resolve(cfg, &u1, false, "X-Sluice-Pool: other\r\n", &o, r), -EPERM);
    assert_string_equal(r, "550 5.7.1 pool \"other\" not allowed for tenant \"acme\"");
    assert_int_equal(resolve(cfg, &u1, false, "X-Sluice-Pool: nope\r\n", &o, r), -EPERM);
    assert_string_equal(r, "550 5.7.1 unknown pool \"nope\"");
    /* a user pinned to a pool */
    assert_int_equal(resolve(cfg, &u2, false, "", &o, r), 0);
    assert_string_equal(o.pool->name, "bulk");
    assert_int_equal(resolve(cfg, &u2, false, "X-Sluice-Pool: tx\r\n", &o, r), -EPERM);
    assert_string_equal(r, "550 5.7.1 pool \"tx\" not allowed for user \"app2\"");
    /* X-Sluice-Tenant from trusted networks only */
    assert_int_equal(resolve(cfg, &u3, false, "X-Sluice-Tenant: acme\r\n", &o, r), -EPERM);
    assert_string_equal(r, "550 5.7.1 X-Sluice-Tenant is honoured from trusted networks only");
    assert_int_equal(resolve(cfg, NULL, true, "X-Sluice-Tenant: solo\r\n", &o, r), 0);
    assert_string_equal(o.tenant->name, "solo");
    assert_string_equal(o.pool->name, "bulk");
    assert_int_equal(resolve(cfg, NULL, true, "X-Sluice-Tenant: who\r\n", &o, r), -EPERM);
    assert_string_equal(r, "550 5.7.1 unknown tenant \"who\"");
    /* no tenant: a pool by header from trusted networks only */
    assert_int_equal(resolve(cfg, NULL, true, "X-Sluice-Pool: other\r\n", &o, r), 0);
    assert_null(o.tenant);
    assert_string_equal(o.pool->name, "other");
    assert_int_equal(resolve(cfg, &u3, false, "X-Sluice-Pool: other\r\n", &o, r), -EPERM);
    /* nothing at all */
    assert_int_equal(resolve(cfg, &u3, false, "", &o, r), 0);
    assert_null(o.tenant);
    assert_null(o.pool);
    /* the users file names what the config lacks: the operator's error, 4xx */
    assert_int_equal(resolve(cfg, &u4, false, "", &o, r), -EPERM);
    assert_string_equal(r, "451 4.3.5 tenant \"gone\" of user \"app4\" is not configured: try "
                           "again later");
    assert_int_equal(resolve(cfg, &u5, false, "", &o, r), -EPERM);
    assert_memory_equal(r, "451 4.3.5", 9);
    config_free(cfg);
}

/* The expiry field: a duration from arrival or an RFC 3339 time; a bad
 * value, including a duration whose end does not fit in 64-bit Unix ms
 * (it wrapped to a time just before arrival: the message expired unsent
 * right after its 250), is -EINVAL, refused with 550 5.6.0. */
static void
test_expiry(void **state)
{
    (void)state;
    const uint64_t now = 1764700000000ULL; /* 2025-12-02 */
    static const struct {
        const char *v;
        int rc;
        uint64_t want; /* with rc 0 */
    } ex[] = {
        {"90m", 0, now + 90 * 60000ULL},
        {"3600", 0, now + 3600000ULL},
        {"2026-11-23T18:00:00Z", 0, 1795456800000ULL},
        {"10000000000d", 0, now + 10000000000ULL * 86400000ULL}, /* long: max_age wins */
        {"tomorrow", -EINVAL, 0},
        {"0s", -EINVAL, 0},
        {"2026-11-23T18:00:00", -EINVAL, 0},
        /* ms = 18446744073709551000: fits alone, wraps once added to now */
        {"18446744073709551s", -EINVAL, 0},
        {"213503982334d", -EINVAL, 0},
        /* past what ms can hold even alone */
        {"18446744073709552s", -EINVAL, 0},
    };
    for (size_t i = 0; i < sizeof(ex) / sizeof(ex[0]); i++) {
        uint64_t got = 0;
        int rc = msa_parse_expiry(ex[i].v, strlen(ex[i].v), now, &got);
        if (rc != ex[i].rc || (rc == 0 && got != ex[i].want))
            fail_msg("%s: rc %d expire %llu, want rc %d expire %llu", ex[i].v, rc,
                     (unsigned long long)got, ex[i].rc, (unsigned long long)ex[i].want);
        if (rc == 0)
            assert_true(got > now);
    }
}

/* Campaign names come from clients: past [server] campaign_names a new
 * one gets no id (the job's campaign is "none"), logged at the first
 * refusal and at each power of two; names known before keep their ids,
 * and tenants and pools are not bounded by it. Before, every new name got
 * an id for the process's life, up to the table's 4 Mi names. */
static void
test_campaign_names_bounded(void **state)
{
    (void)state;
    char text[1024];
    snprintf(text, sizeof(text), "[server]\ncampaign_names = 2\n%s",
             CONF + strlen("[server]\n"));
    struct config *cfg = load(text);
    assert_int_equal(cfg->server.campaign_names, 2);
    struct engine e;
    memset(&e, 0, sizeof(e));
    e.cfg = cfg;
    e.campaign_names = cfg->server.campaign_names; /* as engine_start sets it */
    e.names = intern_new();
    assert_non_null(e.names);
    char logpath[] = "/tmp/test_owner_log_XXXXXX";
    int lfd = mkstemp(logpath);
    assert_true(lfd >= 0);
    close(lfd);
    assert_int_equal(log_open(logpath, LOG_INFO), 0);
    struct job_owner a, b, c, d, x;
    delivery_owner(&e, "acme", "tx", "spring", 1, &a);
    delivery_owner(&e, "acme", "tx", "summer", 1, &b);
    delivery_owner(&e, "acme", "bulk", "autumn", 1, &c); /* the third: no id */
    delivery_owner(&e, "solo", "other", "spring", 1, &d);
    for (int i = 0; i < 5; i++) {
        char name[32];
        snprintf(name, sizeof(name), "unique-%d", i);
        delivery_owner(&e, "acme", "tx", name, 1, &x);
        assert_int_equal(x.campaign, 0);
    }
    log_open(NULL, LOG_INFO);
    assert_true(a.campaign != 0 && b.campaign != 0 && a.campaign != b.campaign);
    assert_int_equal(c.campaign, 0);
    assert_true(c.tenant != 0 && c.pool != 0); /* its owner otherwise whole */
    assert_int_equal(d.campaign, a.campaign);
    assert_true(d.tenant != 0 && d.pool != 0 && d.pool != a.pool);
    FILE *fp = fopen(logpath, "r");
    assert_non_null(fp);
    char line[1024];
    unsigned full = 0;
    bool first = false;
    while (fgets(line, sizeof(line), fp) != NULL)
        if (strstr(line, "event=campaign_names_full") != NULL) {
            full++;
            first |= strstr(line, "campaign=\"autumn\" limit=2 refused=1 ") != NULL;
        }
    fclose(fp);
    unlink(logpath);
    assert_true(first);
    assert_int_equal(full, 3); /* refusals 1, 2 and 4 of 6 */
    intern_free(e.names);
    config_free(cfg);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scan_table),
        cmocka_unit_test(test_scan_long),
        cmocka_unit_test(test_resolve),
        cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_campaign_names_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
