/*
 * test_oob: engine/oob.c between the parser and the delivery log: which
 * reports reach the suppression seam (a verified hard bounce, a verified
 * complaint) and which do not (a delay, a policy block, a refusal of
 * our sender, a replayed token
 * naming another address, a redacted complaint, a forged or stale token,
 * an auto-reply); the events written for them; the RCPT rule of the
 * bounce listener; the VERP sender.
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

#include "common/clock.h"
#include "engine/classify.h"
#include "engine/config.h"
#include "engine/dlog.h"
#include "engine/oob.h"
#include "queue/queue.h"

static const char key[] = "0123456789abcdef0123456789abcdef";

struct calls {
    unsigned n;
    char tenant[32], addr[128];
    int kind;
};

static void
on_suppress(void *ctx, const char *tenant, const char *addr, int kind)
{
    struct calls *c = ctx;
    c->n++;
    snprintf(c->tenant, sizeof(c->tenant), "%s", tenant);
    snprintf(c->addr, sizeof(c->addr), "%s", addr);
    c->kind = kind;
}

static void
bounce_conf(struct bounce_config *bc)
{
    memset(bc, 0, sizeof(*bc));
    bc->verp_domain = "bounces.example.com";
    bc->domains = "bounces.example.com, fbl.example.com";
    bc->verp_prefix = "bounce-";
    bc->accept_local_parts = "postmaster, fbl";
    bc->verp_max_age = 30ull * 86400 * 1000;
    memcpy(bc->verp_key, key, 32);
    bc->verp_key_len = 32;
}

/* A fixture with its placeholder VERP address and one recipient replaced. */
static char *
fixture(const char *name, const char *verp, const char *from_rcpt, const char *to_rcpt,
        size_t *len)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", FIXTURES, name);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    static char raw[1 << 16];
    size_t n = fread(raw, 1, sizeof(raw) - 1, f);
    fclose(f);
    raw[n] = '\0';
    char *out = malloc(2 * n + 4096);
    size_t o = 0;
    const char *ph = "bounce-aeaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@bounces.example.com";
    for (size_t i = 0; i < n;) {
        if (strncmp(raw + i, ph, strlen(ph)) == 0) {
            o += (size_t)sprintf(out + o, "%s", verp);
            i += strlen(ph);
        } else if (from_rcpt && strncmp(raw + i, from_rcpt, strlen(from_rcpt)) == 0) {
            o += (size_t)sprintf(out + o, "%s", to_rcpt);
            i += strlen(from_rcpt);
        } else {
            out[o++] = raw[i++];
        }
    }
    *len = o;
    return out;
}

static uint64_t
new_id(void)
{
    return queue_id_after(0, clock_unix_ms(), 3);
}

static void
verp_for(const struct bounce_config *bc, uint64_t id, unsigned idx, const char *rcpt,
         const char *tenant, char *out, size_t cap)
{
    int n = oob_verp_sender(bc, "news@shop.example.com", id, idx, rcpt, tenant, out, cap);
    assert_true(n > 0);
}

static void
run(const struct bounce_config *bc, struct calls *c, const char *rcpt, const char *msg,
    size_t len, struct oob_outcome *o)
{
    struct classify *cls = classify_new();
    struct oob_hooks h = {on_suppress, c};
    const char *rcpts[] = {rcpt};
    assert_int_equal(oob_message(bc, cls, &h, NULL, 1, "192.0.2.1", rcpts, 1, msg, len, o), 0);
    classify_free(cls);
}

static void
test_hard_bounce_suppresses(void **state)
{
    struct bounce_config bc;
    bounce_conf(&bc);
    uint64_t id = new_id();
    char verp[128];
    verp_for(&bc, id, 4, "Nobody@Example.net", "shop", verp, sizeof(verp));
    size_t len;
    char *m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
    struct calls c = {0};
    struct oob_outcome o;
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(o.events, 1);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.tenant, "shop");
    assert_string_equal(c.addr, "nobody@example.net");
    assert_int_equal(c.kind, OOB_SUPPRESS_HARD_BOUNCE);
    free(m);

    /* the same token, the delayed recipient's block only: no bounce */
    verp_for(&bc, id, 5, "full@example.net", "shop", verp, sizeof(verp));
    m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
    memset(&c, 0, sizeof(c));
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(c.n, 0);
    assert_int_equal(o.events, 0);
    assert_string_equal(o.dropped, "not_failed");
    free(m);

    /* Exim's text: found, classified, suppressed */
    verp_for(&bc, id, 0, "gone@example.org", "", verp, sizeof(verp));
    m = fixture("exim-bounce.eml", verp, NULL, NULL, &len);
    memset(&c, 0, sizeof(c));
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.addr, "gone@example.org");
    assert_string_equal(c.tenant, "");
    free(m);
}

/* A tenant name longer than a token holds goes as its tag; the listener
 * finds it among the configured tenants, and the complaint or bounce goes
 * to that tenant's list. A tag no configured tenant has: a list of that
 * tag ("tag:XXXXXXXX"), not the global one. */
static void
test_long_tenant_by_tag(void **state)
{
    (void)state;
    struct bounce_config bc;
    bounce_conf(&bc);
    struct tenant_config tenants[2] = {{.name = "acme-newsletters"}, {.name = "Customer-0042"}};
    bc.tenants = tenants;
    bc.ntenants = 2;
    uint64_t id = new_id();
    char verp[128];
    verp_for(&bc, id, 4, "Nobody@Example.net", "customer-0042", verp, sizeof(verp));
    assert_true(strchr(verp, '@') - verp <= 64);
    size_t len;
    char *m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
    struct calls c = {0};
    struct oob_outcome o;
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.tenant, "Customer-0042");
    assert_string_equal(c.addr, "nobody@example.net");
    /* The tenant is gone from the config since: still its own list,
     * under its tag (the hook's tenant; a hard bounce is global anyway),
     * never the global one: above all for a complaint, which speaks of
     * that tenant's mail only. Before the fix both went global (""), while
     * a gone tenant with a short name (carried whole) kept its list. */
    bc.ntenants = 1;
    char want[32];
    snprintf(want, sizeof(want), "tag:%08x",
             (unsigned)verp_tenant_tag(bc.verp_key, bc.verp_key_len, "customer-0042"));
    memset(&c, 0, sizeof(c));
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.tenant, want);
    free(m);
    verp_for(&bc, id, 2, "happy.reader@yahoo.com", "customer-0042", verp, sizeof(verp));
    m = fixture("arf-yahoo.eml", verp, NULL, NULL, &len);
    memset(&c, 0, sizeof(c));
    run(&bc, &c, "fbl@fbl.example.com", m, len, &o);
    assert_int_equal(c.n, 1);
    assert_int_equal(c.kind, OOB_SUPPRESS_COMPLAINT);
    assert_string_equal(c.tenant, want);
    free(m);
    /* a short name no longer configured is carried whole: its list */
    verp_for(&bc, id, 2, "happy.reader@yahoo.com", "gone", verp, sizeof(verp));
    m = fixture("arf-yahoo.eml", verp, NULL, NULL, &len);
    memset(&c, 0, sizeof(c));
    run(&bc, &c, "fbl@fbl.example.com", m, len, &o);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.tenant, "gone");
    free(m);
}

static void
test_no_suppression(void **state)
{
    struct bounce_config bc;
    bounce_conf(&bc);
    uint64_t id = new_id();
    char verp[128];
    size_t len;
    struct calls c = {0};
    struct oob_outcome o;
    /* a token made for someone else: logged unverified, nothing suppressed */
    verp_for(&bc, id, 0, "someone.else@example.net", "", verp, sizeof(verp));
    char *m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(o.events, 1);
    assert_int_equal(c.n, 0);
    free(m);
    /* a policy block (5.7.1) is a bounce, not a dead address */
    verp_for(&bc, id, 0, "nobody@example.net", "", verp, sizeof(verp));
    m = fixture("postfix-dsn.eml", verp, "Status: 5.1.1", "Status: 5.7.1", &len);
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(o.events, 1);
    assert_int_equal(c.n, 0);
    free(m);
    /* auto-reply */
    m = fixture("autoreply-vacation.eml", verp, NULL, NULL, &len);
    run(&bc, &c, verp, m, len, &o);
    assert_string_equal(o.dropped, "autoreply");
    assert_int_equal(c.n, 0);
    free(m);
    /* a stale token: dropped */
    uint64_t old = queue_id_after(0, clock_unix_ms() - 40ull * 86400 * 1000, 3);
    verp_for(&bc, old, 0, "nobody@example.net", "", verp, sizeof(verp));
    m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
    run(&bc, &c, "postmaster@bounces.example.com", m, len, &o);
    assert_string_equal(o.dropped, "stale_token");
    free(m);
    /* a token from another key in the report, sent to postmaster: forged */
    struct bounce_config other = bc;
    memcpy(other.verp_key, "fedcba9876543210fedcba9876543210", 32);
    verp_for(&other, id, 0, "nobody@example.net", "", verp, sizeof(verp));
    m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
    run(&bc, &c, "postmaster@bounces.example.com", m, len, &o);
    assert_string_equal(o.dropped, "forged_token");
    assert_int_equal(c.n, 0);
    free(m);
}

static void
test_complaint(void **state)
{
    struct bounce_config bc;
    bounce_conf(&bc);
    uint64_t id = new_id();
    char verp[128];
    size_t len;
    struct calls c = {0};
    struct oob_outcome o;
    verp_for(&bc, id, 2, "happy.reader@yahoo.com", "t1", verp, sizeof(verp));
    char *m = fixture("arf-yahoo.eml", verp, NULL, NULL, &len);
    run(&bc, &c, "fbl@fbl.example.com", m, len, &o);
    assert_int_equal(o.events, 1);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.addr, "happy.reader@yahoo.com");
    assert_string_equal(c.tenant, "t1");
    assert_int_equal(c.kind, OOB_SUPPRESS_COMPLAINT);
    free(m);
    /* redacted: the provider left no address; logged, not suppressed */
    memset(&c, 0, sizeof(c));
    m = fixture("arf-yahoo.eml", verp, "happy.reader@yahoo.com", "redacted@yahoo.com", &len);
    run(&bc, &c, "fbl@fbl.example.com", m, len, &o);
    assert_int_equal(o.events, 1);
    assert_int_equal(c.n, 0);
    free(m);
    /* reports that are no complaint of the recipient's (RFC 6430's
     * not-spam: the user said it is wanted; RFC 6591's auth-failure: a
     * receiver's authentication check): logged, not suppressed */
    static const char *const not_complaints[] = {"Feedback-Type: not-spam",
                                                 "Feedback-Type: Auth-Failure"};
    for (unsigned i = 0; i < 2; i++) {
        memset(&c, 0, sizeof(c));
        m = fixture("arf-yahoo.eml", verp, "Feedback-Type: abuse", not_complaints[i], &len);
        run(&bc, &c, "fbl@fbl.example.com", m, len, &o);
        assert_int_equal(o.events, 1);
        assert_int_equal(o.suppressed, 0);
        assert_int_equal(c.n, 0);
        free(m);
    }
}

static void
test_rcpt_rule_and_sender(void **state)
{
    struct bounce_config bc;
    bounce_conf(&bc);
    char verp[128];
    verp_for(&bc, 77, 1, "a@b.example", "", verp, sizeof(verp));
    struct verp_ref ref;
    assert_int_equal(oob_rcpt_check(&bc, verp, &ref), OOB_RCPT_VERP);
    assert_true(ref.msg_id == 77 && ref.rcpt_index == 1);
    assert_int_equal(oob_rcpt_check(&bc, "FBL@Fbl.Example.Com", &ref), OOB_RCPT_LOCAL);
    assert_int_equal(oob_rcpt_check(&bc, "abuse@fbl.example.com", &ref), OOB_RCPT_NOT_OURS);
    assert_int_equal(oob_rcpt_check(&bc, "bounce-zzzz@bounces.example.com", &ref),
                     OOB_RCPT_FORGED);
    assert_int_equal(oob_rcpt_check(&bc, "user@example.com", &ref), OOB_RCPT_NOT_OURS);
    assert_int_equal(oob_rcpt_check(&bc, "user@bounces.example.com.evil", &ref),
                     OOB_RCPT_NOT_OURS);
    assert_int_equal(oob_rcpt_check(&bc, "postmaster@bounces.example.com.", &ref),
                     OOB_RCPT_LOCAL);
    /* the null sender keeps its <>; VERP off keeps the sender */
    assert_int_equal(oob_verp_sender(&bc, "", 1, 0, "a@b", NULL, verp, sizeof(verp)), 0);
    bc.verp_domain = NULL;
    assert_int_equal(oob_verp_sender(&bc, "x@y", 1, 0, "a@b", NULL, verp, sizeof(verp)), 0);
}

/* Replace the first from in m[0..*len) (room for 4096 more octets, as
 * fixture leaves) by to. */
static void
subst(char *m, size_t *len, const char *from, const char *to)
{
    char *at = memmem(m, *len, from, strlen(from));
    assert_non_null(at);
    size_t fl = strlen(from), tl = strlen(to), tail = *len - (size_t)(at - m) - fl;
    memmove(at + tl, at + fl, tail);
    memcpy(at, to, tl);
    *len = *len - fl + tl;
}

/* A verified DSN whose diagnostic refuses our sender, not the recipient:
 * Postfix's reject_unlisted_sender ("550 5.1.0 <sender>: Sender address
 * rejected: User unknown in local recipient table": 5.1.0 and its text
 * are invalid_recipient), Exim's sender verification without an
 * enhanced code. Logged as the bounce it is, and the recipient is not
 * suppressed (as in-band, bb10b46). Before the fix both were. */
static void
test_sender_refusal_does_not_suppress(void **state)
{
    (void)state;
    struct bounce_config bc;
    bounce_conf(&bc);
    uint64_t id = new_id();
    char verp[128];
    verp_for(&bc, id, 4, "nobody@example.net", "shop", verp, sizeof(verp));
    static const char *const status[] = {"Status: 5.1.0", "Status: 5.0.0"};
    static const char *const diag[] = {
        "550 5.1.0 <news@shop.example.com>: Sender address\n    rejected: User unknown in "
        "local recipient table",
        "550 Sender verify failed: unknown user",
    };
    for (unsigned i = 0; i < 2; i++) {
        size_t len;
        char *m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
        subst(m, &len, "Status: 5.1.1", status[i]);
        subst(m, &len,
              "550 5.1.1 <nobody@example.net>: Recipient address\n    rejected: User unknown in "
              "local recipient table",
              diag[i]);
        struct calls c = {0};
        struct oob_outcome o;
        run(&bc, &c, verp, m, len, &o);
        assert_int_equal(o.events, 1);
        assert_int_equal(o.suppressed, 0);
        assert_int_equal(c.n, 0);
        free(m);
    }
    /* the recipient's own refusal still is */
    size_t len;
    char *m = fixture("postfix-dsn.eml", verp, NULL, NULL, &len);
    struct calls c = {0};
    struct oob_outcome o;
    run(&bc, &c, verp, m, len, &o);
    assert_int_equal(c.n, 1);
    free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hard_bounce_suppresses),
        cmocka_unit_test(test_long_tenant_by_tag),
        cmocka_unit_test(test_no_suppression),
        cmocka_unit_test(test_complaint),
        cmocka_unit_test(test_rcpt_rule_and_sender),
        cmocka_unit_test(test_sender_refusal_does_not_suppress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
