/*
 * oob: out-of-band bounces and complaints at the bounce listener, and the
 * VERP sender of outbound mail (see oob.h). The parsing is feedback/'s;
 * this file decides what a parsed report means for sluice: which message
 * and recipient it is about (the VERP token, nothing else), its class (the
 * one table), the delivery log event, the suppression seam.
 *
 * Threading: any worker thread; no state of its own.
 */
#include "engine/oob.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/clock.h"
#include "common/log.h"
#include "engine/classify.h"
#include "engine/config.h"
#include "engine/dlog.h"
#include "feedback/feedback.h"
#include "queue/queue.h"

#define FUTURE_SLACK_MS (24ull * 3600 * 1000) /* clocks of several nodes */

/* Is s[0..n) one of the comma-separated items of list (any case)? */
static int
list_has(const char *list, const char *s, size_t n)
{
    const char *p = list;
    while (p != NULL && *p != '\0') {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        const char *e = p;
        while (*e != '\0' && *e != ',')
            e++;
        const char *t = e;
        while (t > p && (t[-1] == ' ' || t[-1] == '\t'))
            t--;
        if ((size_t)(t - p) == n && n > 0 && strncasecmp(p, s, n) == 0)
            return 1;
        p = e;
    }
    return 0;
}

int
oob_is_bounce_domain(const struct bounce_config *bc, const char *domain, size_t n)
{
    if (n > 0 && domain[n - 1] == '.')
        n--; /* an absolute name */
    return list_has(bc->domains != NULL ? bc->domains : bc->verp_domain, domain, n);
}

enum oob_rcpt
oob_rcpt_check(const struct bounce_config *bc, const char *addr, struct verp_ref *ref)
{
    const char *at = strrchr(addr, '@');
    if (at == NULL || !oob_is_bounce_domain(bc, at + 1, strlen(at + 1)))
        return OOB_RCPT_NOT_OURS;
    size_t ll = (size_t)(at - addr);
    size_t pl = bc->verp_prefix ? strlen(bc->verp_prefix) : 0;
    if (pl > 0 && ll > pl && strncasecmp(addr, bc->verp_prefix, pl) == 0) {
        int rc = verp_parse(bc->verp_key, bc->verp_key_len, addr + pl, ll - pl, ref);
        return rc == 0 ? OOB_RCPT_VERP : OOB_RCPT_FORGED;
    }
    if (list_has(bc->accept_local_parts, addr, ll))
        return OOB_RCPT_LOCAL;
    return OOB_RCPT_NOT_OURS;
}

int
oob_verp_sender(const struct bounce_config *bc, const char *sender, uint64_t id,
                unsigned rcpt_index, const char *rcpt, const char *tenant, char *out, size_t cap)
{
    if (bc->verp_domain == NULL || bc->verp_key_len == 0 || sender == NULL || sender[0] == '\0')
        return 0;
    struct verp_ref ref = {.msg_id = id, .rcpt_index = rcpt_index};
    if (tenant != NULL && strlen(tenant) <= VERP_TENANT_MAX)
        memcpy(ref.tenant, tenant, strlen(tenant) + 1);
    else if (tenant != NULL && tenant[0] != '\0')
        ref.tenant_tag = verp_tenant_tag(bc->verp_key, bc->verp_key_len, tenant);
    return verp_address(bc->verp_key, bc->verp_key_len, bc->verp_prefix, bc->verp_domain, &ref,
                        rcpt, out, cap);
}

/* "tag:" and tag in hex, into buf (OOB_TAG_SCOPE_LEN + 1). */
static void
tag_scope(uint32_t tag, char *buf)
{
    snprintf(buf, OOB_TAG_SCOPE_LEN + 1, "tag:%08x", (unsigned)tag);
}

/* The tenant a token names: its name ("" none), or the configured
 * tenant whose tag it carries. A tag that no configured tenant has (the
 * tenant was removed from the config since, or this node's config does
 * not name it yet) is still that tenant's: "tag:" and the tag in hex,
 * into buf (OOB_TAG_SCOPE_LEN + 1), with *unknown set. Its complaints go
 * to a list of that name, as those of a short-named tenant no longer
 * configured go to its name's: one tenant's complainer is not every
 * tenant's, and "tag:" is no tenant name (config_name_valid). */
static const char *
ref_tenant(const struct bounce_config *bc, const struct verp_ref *ref, char *buf, bool *unknown)
{
    *unknown = false;
    if (ref->tenant[0] != '\0' || ref->tenant_tag == 0)
        return ref->tenant;
    for (unsigned i = 0; i < bc->ntenants; i++)
        if (verp_tenant_tag(bc->verp_key, bc->verp_key_len, bc->tenants[i].name) ==
            ref->tenant_tag)
            return bc->tenants[i].name;
    *unknown = true;
    tag_scope(ref->tenant_tag, buf);
    return buf;
}

int
oob_tag_scope(const struct bounce_config *bc, const char *tenant, char *buf)
{
    buf[0] = '\0';
    if (tenant == NULL || strlen(tenant) <= VERP_TENANT_MAX || bc->verp_key_len == 0)
        return 0;
    tag_scope(verp_tenant_tag(bc->verp_key, bc->verp_key_len, tenant), buf);
    return 1;
}

/* "5.1.1" to the struct classify() takes; false when malformed. */
static int
enh_parse(const char *s, struct smtp_enh *e)
{
    unsigned c, sub, det;
    if (s == NULL || sscanf(s, "%u.%u.%u", &c, &sub, &det) != 3 || sub > 999 || det > 999)
        return 0;
    e->cls = (uint8_t)c;
    e->subject = (uint16_t)sub;
    e->detail = (uint16_t)det;
    return 1;
}

/* Does a feedback report of this type (lowercase, "" when absent) say
 * the recipient does not want the mail? Not RFC 6430's not-spam (the
 * user marked it wanted) nor RFC 6591's auth-failure (a receiver's SPF,
 * DKIM or DMARC check, nothing of the recipient's); the others
 * (abuse, fraud, virus, other, unregistered ones) do. */
static int
complaint_type(const char *type)
{
    return strcmp(type, "not-spam") != 0 && strcmp(type, "auth-failure") != 0;
}

/* Why a token is not to be believed, or NULL. */
static const char *
ref_stale(const struct bounce_config *bc, const struct verp_ref *ref)
{
    uint64_t made = queue_id_time_ms(ref->msg_id), now = clock_unix_ms();
    if (made > now + FUTURE_SLACK_MS)
        return "future_id";
    if (now > made && now - made > bc->verp_max_age)
        return "stale_token";
    return NULL;
}

static void
dropped(uint64_t sid, const char *client, const struct feedback_result *r, const char *why,
        const char *detail)
{
    log_msg(LOG_NOTICE,
            "session=%016llx event=oob_dropped client=%s kind=%s reason=%s%s%s from=\"%.100s\"",
            (unsigned long long)sid, client, feedback_kind_str(r->kind), why,
            detail ? " detail=" : "", detail ? detail : "", r->from);
}

int
oob_message(const struct bounce_config *bc, const struct classify *cls,
            const struct oob_hooks *hooks, struct dlog_writer *lw, uint64_t sid,
            const char *client, const char *const *rcpts, unsigned nrcpt, const char *msg,
            size_t len, struct oob_outcome *out)
{
    memset(out, 0, sizeof(*out));
    struct feedback_result *r = malloc(sizeof(*r));
    if (r == NULL)
        return -ENOMEM;
    int rc = feedback_parse(msg, len, bc->verp_prefix, r);
    if (rc < 0) {
        free(r);
        return rc;
    }
    out->kind = feedback_kind_str(r->kind);
    if (r->kind == FEEDBACK_AUTOREPLY || r->kind == FEEDBACK_UNKNOWN) {
        out->dropped = r->kind == FEEDBACK_AUTOREPLY ? "autoreply" : "unknown";
        dropped(sid, client, r, out->dropped, r->kind == FEEDBACK_AUTOREPLY ? r->autoreply_why
                                                                           : NULL);
        free(r);
        return 0;
    }
    /* The identity: a VERP envelope recipient (checked at RCPT), else the
     * token the report carries, if it is at one of our domains. */
    struct verp_ref ref;
    int have = 0;
    const char *bad = NULL;
    for (unsigned i = 0; i < nrcpt && !have; i++)
        have = oob_rcpt_check(bc, rcpts[i], &ref) == OOB_RCPT_VERP;
    if (!have && r->verp_local[0] != '\0') {
        size_t pl = strlen(bc->verp_prefix);
        if (!oob_is_bounce_domain(bc, r->verp_domain, strlen(r->verp_domain)))
            bad = "foreign_token";
        else if (verp_parse(bc->verp_key, bc->verp_key_len, r->verp_local + pl,
                            strlen(r->verp_local) - pl, &ref) == 0)
            have = 1;
        else
            bad = "forged_token";
    }
    if (!have) {
        out->dropped = bad ? bad : "no_token";
        dropped(sid, client, r, out->dropped, r->orig_message_id[0] ? r->orig_message_id : NULL);
        free(r);
        return 0;
    }
    const char *stale = ref_stale(bc, &ref);
    char qid[QUEUE_ID_STRLEN + 1];
    queue_id_str(ref.msg_id, qid);
    if (stale != NULL) {
        out->dropped = stale;
        dropped(sid, client, r, stale, qid);
        free(r);
        return 0;
    }
    const uint8_t *key = bc->verp_key;
    size_t kl = bc->verp_key_len;
    char tagbuf[OOB_TAG_SCOPE_LEN + 1];
    bool unknown;
    const char *tenant = ref_tenant(bc, &ref, tagbuf, &unknown);
    struct dlog_event ev = {
        .id = qid,
        .client = client,
        .tenant = tenant[0] && !unknown ? tenant : NULL, /* a name, not a tag */
        .report = feedback_kind_str(r->kind),
        .message_id = r->orig_message_id[0] ? r->orig_message_id : NULL,
        .campaign = r->sluice_campaign[0] ? r->sluice_campaign : NULL,
        .rcpt_index = (int)ref.rcpt_index,
    };
    if (r->kind == FEEDBACK_ARF) {
        /* The complaining recipient: the report's, the original's To, our
         * own field; the first that the token's tag confirms. Providers
         * that redact addresses leave only the token: the event names
         * the message and recipient index, the backend knows the rest. */
        const char *cand[] = {r->orig_rcpt_to, r->orig_to, r->sluice_rcpt};
        const char *addr = NULL;
        int verified = 0;
        for (unsigned i = 0; i < 3 && !verified; i++)
            if (verp_rcpt_matches(key, kl, &ref, cand[i]))
                addr = cand[i], verified = 1;
        for (unsigned i = 0; i < 3 && addr == NULL; i++)
            if (cand[i][0] != '\0')
                addr = cand[i];
        ev.kind = DLOG_COMPLAINT;
        ev.rcpt = addr;
        ev.feedback_type = r->feedback_type[0] ? r->feedback_type : "abuse";
        ev.reporter = r->user_agent[0] ? r->user_agent : NULL;
        ev.source = r->source_ip[0] ? r->source_ip : NULL;
        ev.verified = verified ? 1 : -1;
        dlog_event(lw, &ev);
        out->events++;
        snprintf(out->line, sizeof(out->line),
                "session=%016llx event=complaint id=%s rcpt_index=%u rcpt=%s tenant=%s type=%s "
                "verified=%d client=%s",
                (unsigned long long)sid, qid, ref.rcpt_index, addr ? addr : "-",
                tenant[0] ? tenant : "-", ev.feedback_type, verified, client);
        if (verified && complaint_type(r->feedback_type) && hooks != NULL &&
            hooks->suppress != NULL) {
            hooks->suppress(hooks->ctx, tenant, addr, OOB_SUPPRESS_COMPLAINT);
            out->suppressed++;
        }
        free(r);
        return 0;
    }
    /* DSN or non-standard bounce: the recipient block the token's tag
     * confirms; a DSN about several recipients of one VERP transaction
     * cannot be (one recipient each), so the others are not ours. */
    int pick = -1, verified = 0;
    for (unsigned i = 0; i < r->nrcpt && pick < 0; i++)
        if (verp_rcpt_matches(key, kl, &ref, r->rcpt[i].addr) ||
            verp_rcpt_matches(key, kl, &ref, r->rcpt[i].orig_addr))
            pick = (int)i, verified = 1;
    for (unsigned i = 0; i < r->nrcpt && pick < 0; i++)
        if (r->rcpt[i].action == FEEDBACK_ACTION_FAILED)
            pick = (int)i;
    if (pick < 0 && r->nrcpt > 0)
        pick = 0;
    if (pick < 0) {
        out->dropped = "no_recipient";
        dropped(sid, client, r, out->dropped, qid);
        free(r);
        return 0;
    }
    const struct feedback_rcpt *fr = &r->rcpt[pick];
    if (fr->action != FEEDBACK_ACTION_FAILED) {
        /* delayed, relayed, delivered: no bounce (the receiver keeps trying) */
        out->dropped = "not_failed";
        dropped(sid, client, r, out->dropped, feedback_action_str(fr->action));
        free(r);
        return 0;
    }
    struct smtp_enh enh = {0};
    int has_enh = enh_parse(fr->status, &enh);
    unsigned code = fr->code ? fr->code : (has_enh ? enh.cls * 100u + 50u : 0);
    enum bounce_class bcls = classify(cls, CLASSIFY_REPLY, code, has_enh ? &enh : NULL,
                                      fr->diag[0] ? fr->diag : NULL);
    const char *addr = verified                 ? (verp_rcpt_matches(key, kl, &ref, fr->addr)
                                                       ? fr->addr
                                                       : fr->orig_addr)
                       : fr->addr[0] != '\0'     ? fr->addr
                                                : NULL;
    ev.kind = DLOG_OOB_BOUNCE;
    ev.rcpt = addr;
    ev.code = fr->code;
    ev.enhanced = fr->status[0] ? fr->status : NULL;
    ev.reply = fr->diag[0] ? fr->diag : NULL;
    ev.classification = bounce_class_str(bcls);
    ev.action = feedback_action_str(fr->action);
    ev.reporter = r->reporting_mta[0] ? r->reporting_mta : fr->remote_mta[0] ? fr->remote_mta
                                                                             : NULL;
    ev.verified = verified ? 1 : -1;
    dlog_event(lw, &ev);
    out->events++;
    snprintf(out->line, sizeof(out->line),
            "session=%016llx event=oob_bounce id=%s rcpt_index=%u rcpt=%s tenant=%s report=%s "
            "status=%s class=%s verified=%d client=%s",
            (unsigned long long)sid, qid, ref.rcpt_index, addr ? addr : "-",
            tenant[0] ? tenant : "-", ev.report, fr->status[0] ? fr->status : "-",
            ev.classification, verified, client);
    /* A refusal of our sender (the bounce of a MAIL FROM, or of a RCPT
     * under sender checks) says nothing of the recipient, whatever its
     * class (as in-band: outbound/outcome.c). */
    if (verified && bcls == BOUNCE_INVALID_RECIPIENT &&
        !classify_sender_refused(cls, has_enh ? &enh : NULL, fr->diag) && hooks != NULL &&
        hooks->suppress != NULL) {
        hooks->suppress(hooks->ctx, tenant, addr, OOB_SUPPRESS_HARD_BOUNCE);
        out->suppressed++;
    }
    free(r);
    return 0;
}
