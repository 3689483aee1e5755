/*
 * classify: the rule table and the built-in knowledge of what receiving
 * servers send (see classify.h). Built-in rules go through the same
 * parser as operator rules, so a built-in can never be a form the config
 * would refuse, and print exactly as they match.
 *
 * Sources for the built-in table: RFC 3463 (and 3886, 4468, 7372 for the
 * codes they add), and the replies Gmail, Microsoft (Exchange Online,
 * Outlook.com) and Yahoo document or send. The order matters and is the
 * documentation: specific enhanced codes, then text, then fallbacks.
 *
 * The built-in rules are compiled once per process into one table that
 * every struct classify points at and nothing frees: they are the same
 * for every config, and compiled they take some 160 KB (their regexes),
 * which each config a reload replaced used to keep until exit. A table
 * owns only its operator rules.
 *
 * Threading: built on one thread, then read-only (see classify.h); the
 * shared built-ins are made under pthread_once.
 */
#include "engine/classify.h"

#include <errno.h>
#include <pthread.h>
#include <regex.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/re_cost.h"

enum matcher_kind { MATCH_ENH, MATCH_CODE, MATCH_TEXT };

struct rule {
    enum bounce_class cls;
    enum matcher_kind kind;
    int enh_cls, enh_subject, enh_detail; /* -1: "*" */
    unsigned code;
    regex_t re;       /* MATCH_TEXT only */
    char *spec;       /* owned: the matcher as written */
    const char *note; /* borrowed: static text of a built-in; NULL for operator rules */
};

/* The built-in rules and sender_text, compiled: one per process. */
struct classify_builtin {
    struct rule *rules; /* owned, n: never freed (see the top of the file) */
    size_t n;
    regex_t sender;     /* sender_text, compiled */
};

struct classify {
    struct rule *rules; /* owned: n operator rules, tried in order before the built-ins */
    size_t n, cap;
    const struct classify_builtin *builtin; /* borrowed: the process's, lives for ever */
};

/*
 * Replies that refuse our sender rather than the recipient, whatever
 * their code and class (classify_sender_refused): Postfix's sender
 * restrictions ("Sender address rejected: User unknown in local
 * recipient table", reject_unlisted_sender, answered at RCPT under the
 * default smtpd_delay_reject), "Domain of sender address ... does not
 * exist" (Postfix, Sendmail), Exim's "Sender verify failed", and a
 * bounce's own account of the command ("in reply to MAIL FROM command",
 * Postfix; "after MAIL FROM", Exim).
 */
#define SP "[[:space:]]+"
static const char sender_text[] =
    "sender" SP "((address|domain|mailbox)" SP ")?(rejected|refused|denied|unknown|blocked"
    "|not" SP "(allowed|permitted|accepted|found|valid))"
    "|sender" SP "verif(y|ication)" SP "fail|domain" SP "of" SP "sender" SP "address"
    "|(in" SP "reply" SP "to|after)" SP "mail" SP "from";
#undef SP

static const char *const class_names[BOUNCE_CLASS_COUNT] = {
    [BOUNCE_OTHER] = "other",
    [BOUNCE_INVALID_RECIPIENT] = "invalid_recipient",
    [BOUNCE_MAILBOX_FULL] = "mailbox_full",
    [BOUNCE_MESSAGE_TOO_LARGE] = "message_too_large",
    [BOUNCE_POLICY] = "policy",
    [BOUNCE_RATE_LIMITED] = "rate_limited",
    [BOUNCE_DNS_FAILURE] = "dns_failure",
    [BOUNCE_TLS_FAILURE] = "tls_failure",
    [BOUNCE_CONNECTION_FAILURE] = "connection_failure",
    [BOUNCE_EXPIRED] = "expired",
    [BOUNCE_REFUSED_TARGET] = "refused_target",
    [BOUNCE_TLS_POLICY] = "tls_policy",
};

struct builtin {
    enum bounce_class cls;
    const char *matcher;
    const char *note;
};

/*
 * The built-in table, in the order it is tried. Three blocks:
 *  1. specific enhanced codes: the code is the server's own structured
 *     statement of the cause and beats any wording;
 *  2. text, for replies with no code, the generic X.0.0, or a code not
 *     listed above; within it the strong signals come before the weak
 *     ones ("rate limit" before "blocked" before "try again later");
 *  3. fallbacks by basic code and by enhanced-code family, and the
 *     enhanced codes that name no single cause, so that the text above
 *     decides first: X.3.2, "system not accepting network messages", is
 *     a receiver going down or in maintenance as often as one under load
 *     (RFC 3463 names all three; Microsoft sends it for its connection
 *     limit, sluice's own server when it stops): rate_limited only when
 *     the text speaks of load.
 */
static const struct builtin builtins[] = {
    /* 1. enhanced codes */
    {BOUNCE_INVALID_RECIPIENT, "enh:*.1.1", "bad destination mailbox: user unknown"},
    {BOUNCE_INVALID_RECIPIENT, "enh:5.1.0", "other address status, used for unknown users"},
    {BOUNCE_INVALID_RECIPIENT, "enh:5.1.2", "bad destination system: domain does not exist"},
    {BOUNCE_INVALID_RECIPIENT, "enh:5.1.3", "bad destination mailbox address syntax"},
    {BOUNCE_INVALID_RECIPIENT, "enh:5.1.6", "mailbox has moved, no forwarding address"},
    {BOUNCE_INVALID_RECIPIENT, "enh:5.1.10", "Microsoft: recipient not found by address lookup"},
    {BOUNCE_POLICY, "enh:*.1.7", "bad sender mailbox syntax: the receiver refuses our sender"},
    {BOUNCE_POLICY, "enh:*.1.8", "bad sender system address: the receiver refuses our sender"},
    {BOUNCE_INVALID_RECIPIENT, "enh:5.2.1", "mailbox disabled (Gmail: account disabled)"},
    {BOUNCE_RATE_LIMITED, "enh:4.2.1", "Gmail: the user receives mail at too high a rate"},
    {BOUNCE_MAILBOX_FULL, "enh:*.2.2", "mailbox full / over quota"},
    {BOUNCE_MESSAGE_TOO_LARGE, "enh:*.2.3", "message length exceeds administrative limit"},
    {BOUNCE_MESSAGE_TOO_LARGE, "enh:*.3.4", "message too big for system"},
    {BOUNCE_CONNECTION_FAILURE, "enh:4.4.1", "no answer from host"},
    {BOUNCE_INVALID_RECIPIENT, "enh:5.4.1",
     "Microsoft: recipient address rejected, access denied (no such user)"},
    {BOUNCE_CONNECTION_FAILURE, "enh:*.4.2", "bad connection"},
    {BOUNCE_DNS_FAILURE, "enh:*.4.3", "directory (DNS) server failure"},
    {BOUNCE_DNS_FAILURE, "enh:*.4.4", "unable to route: no MX, null MX, no address"},
    {BOUNCE_RATE_LIMITED, "enh:*.4.5", "mail system congestion"},
    {BOUNCE_OTHER, "enh:*.4.6", "routing loop: not a rate problem, whatever the text"},
    {BOUNCE_EXPIRED, "enh:*.4.7", "delivery time expired"},
    {BOUNCE_RATE_LIMITED, "enh:*.5.3", "too many recipients"},
    {BOUNCE_POLICY, "enh:4.7.26", "Gmail: unauthenticated mail (SPF/DKIM), however it is worded"},
    {BOUNCE_POLICY, "enh:4.7.27", "Gmail: SPF failed"},
    {BOUNCE_RATE_LIMITED, "enh:4.7.28", "Gmail: unusual rate of mail from the IP or domain"},
    {BOUNCE_POLICY, "enh:4.7.30", "Gmail: DKIM failed"},
    {BOUNCE_POLICY, "enh:4.7.32", "Gmail: From domain not aligned"},
    {BOUNCE_RATE_LIMITED, "enh:4.7.650", "Microsoft: IP temporarily rate limited"},
    {BOUNCE_POLICY, "enh:5.7.*",
     "security or policy status: spam, blocklist, auth, DMARC (wins over any text)"},

    /* 2. text */
    {BOUNCE_OTHER, "text:gr[ae]y-?list",
     "greylisting: a first attempt deferred on purpose, retried as scheduled; not throttling "
     "and not an unknown user, whatever else it says (postgrey: \"Recipient address rejected: "
     "Greylisted\")"},
    {BOUNCE_INVALID_RECIPIENT,
     "text:user unknown|unknown user|no such (user|mailbox|recipient)|does not exist|doesn'?t exist"
     "|invalid (recipient|mailbox)|unknown (recipient|mailbox)|recipient (address )?rejected"
     "|recipient not found|mailbox (unavailable|not found)|(account|mailbox) (is )?disabled"
     "|does(n'?t| not) have an? ([^ ]+ )?account",
     "unknown or disabled recipient (Yahoo: \"doesn't have a yahoo.com account\")"},
    {BOUNCE_MAILBOX_FULL,
     "text:quota|mailbox (is )?full|mailbox size limit|insufficient (system )?storage"
     "|storage allocation|out of storage",
     "mailbox full"},
    {BOUNCE_MESSAGE_TOO_LARGE,
     "text:too (large|big)|size limit|message size|exceeds? [a-z ]{0,20}size|message length",
     "message too large"},
    {BOUNCE_RATE_LIMITED,
     "text:rate.?limit|throttl|slow down|unusual rate|(server|system) busy|overload"
     "|too many (connections|concurrent|simultaneous|sessions|messages|mails|emails|recipients"
     "|requests)|concurrent (smtp |server )?connections|ports are busy",
     "explicit throttling: before the policy words that often come with it (Microsoft: "
     "\"4.3.2 The maximum number of concurrent server connections has exceeded a limit\"; "
     "postscreen: \"4.3.2 All server ports are busy\")"},
    {BOUNCE_OTHER,
     "text:shutting down|shut ?down|going down|restarting|maintenance"
     "|not accepting network messages",
     "the receiver stops or restarts (sluice: \"421 4.3.2 Service shutting down: try again "
     "later\"): not load, so never rate_limited; before the weak throttling signs it often "
     "ends with"},
    {BOUNCE_POLICY,
     "text:spam|blocked|black ?list|block ?list|deny ?list|spamhaus|spamcop|barracuda"
     "|reputation|unsolicited|suspicious|dmarc|spf|dkim|policy|unauthenticated|not authori[sz]ed"
     "|access denied|banned|permanently deferred",
     "spam, blocklist, authentication, policy"},
    {BOUNCE_RATE_LIMITED,
     "text:try (again )?later|temporarily deferred|deferred due to|too many|come back later",
     "weak throttling signs (Yahoo TSS04: \"temporarily deferred\")"},
    {BOUNCE_DNS_FAILURE,
     "text:name service error|host (or domain name )?not found|dns (query|lookup|resolution) fail"
     "|unroute?able",
     "the remote side could not resolve a name"},

    /* 3. fallbacks */
    {BOUNCE_OTHER, "enh:*.3.2",
     "system not accepting messages (RFC 3463: shutdown, maintenance or load) whose text named "
     "no load: most often a receiver going down"},
    {BOUNCE_RATE_LIMITED, "code:421", "service closing the channel: mostly load or throttling"},
    {BOUNCE_POLICY, "enh:4.7.*", "temporary policy code whose text named no cause"},
    {BOUNCE_CONNECTION_FAILURE, "enh:*.4.*", "network or routing problem"},
};

const char *
bounce_class_str(enum bounce_class c)
{
    if ((unsigned)c >= BOUNCE_CLASS_COUNT)
        return "other";
    return class_names[c];
}

int
bounce_class_parse(const char *s, enum bounce_class *out)
{
    if (s == NULL)
        return -EINVAL;
    for (unsigned i = 0; i < BOUNCE_CLASS_COUNT; i++) {
        if (strcasecmp(s, class_names[i]) == 0) {
            *out = (enum bounce_class)i;
            return 0;
        }
    }
    return -EINVAL;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
set_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* One part of C.S.D: "*" (-1) or 1-3 digits. Advances *s. */
static bool
parse_enh_part(const char **s, int *out)
{
    const char *p = *s;

    if (*p == '*') {
        *out = -1;
        *s = p + 1;
        return true;
    }
    int v = 0, n = 0;
    while (*p >= '0' && *p <= '9' && n < 4) {
        v = v * 10 + (*p - '0');
        p++;
        n++;
    }
    if (n == 0 || n > 3)
        return false;
    *out = v;
    *s = p;
    return true;
}

static bool
parse_enh(const char *s, struct rule *r)
{
    if (!parse_enh_part(&s, &r->enh_cls) || *s++ != '.')
        return false;
    if (!parse_enh_part(&s, &r->enh_subject) || *s++ != '.')
        return false;
    if (!parse_enh_part(&s, &r->enh_detail) || *s != '\0')
        return false;
    /* RFC 3463: the class is 2, 4 or 5 */
    return r->enh_cls == -1 || r->enh_cls == 2 || r->enh_cls == 4 || r->enh_cls == 5;
}

static bool
parse_code(const char *s, unsigned *out)
{
    if (strlen(s) != 3 || s[0] < '2' || s[0] > '5' || s[1] < '0' || s[1] > '5' || s[2] < '0' ||
        s[2] > '9')
        return false;
    *out = (unsigned)((s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0'));
    return true;
}

/* Fill r from a matcher; on failure nothing is left to free. */
static int
rule_init(struct rule *r, enum bounce_class cls, const char *matcher, const char *note, char *err,
          size_t errlen)
{
    memset(r, 0, sizeof(*r));
    r->cls = cls;
    r->note = note;
    if (matcher == NULL || matcher[0] == '\0') {
        set_err(err, errlen, "empty matcher: want enh:C.S.D, code:NNN or text:REGEX");
        return -EINVAL;
    }
    if (strncmp(matcher, "enh:", 4) == 0) {
        r->kind = MATCH_ENH;
        if (!parse_enh(matcher + 4, r)) {
            set_err(err, errlen,
                    "bad enhanced code \"%s\": want C.S.D, C one of 2, 4, 5 or *, S and D 1-3 "
                    "digits or *",
                    matcher + 4);
            return -EINVAL;
        }
    } else if (strncmp(matcher, "code:", 5) == 0) {
        r->kind = MATCH_CODE;
        if (!parse_code(matcher + 5, &r->code)) {
            set_err(err, errlen, "bad reply code \"%s\": want three digits, 200 to 559",
                    matcher + 5);
            return -EINVAL;
        }
    } else if (strncmp(matcher, "text:", 5) == 0) {
        r->kind = MATCH_TEXT;
        if (matcher[5] == '\0') {
            set_err(err, errlen, "empty regex in \"%s\"", matcher);
            return -EINVAL;
        }
        char cost[160];
        if (re_cost_check(matcher + 5, cost, sizeof(cost)) < 0) {
            set_err(err, errlen, "regex \"%s\" refused: %s", matcher + 5, cost);
            return -EINVAL;
        }
        int rc = regcomp(&r->re, matcher + 5, REG_EXTENDED | REG_ICASE | REG_NOSUB);
        if (rc != 0) {
            char why[128];
            regerror(rc, &r->re, why, sizeof(why));
            /* POSIX leaves the regex_t undefined on failure: nothing to free */
            set_err(err, errlen, "bad regex \"%s\": %s", matcher + 5, why);
            return rc == REG_ESPACE ? -ENOMEM : -EINVAL;
        }
    } else {
        set_err(err, errlen, "bad matcher \"%s\": want enh:C.S.D, code:NNN or text:REGEX", matcher);
        return -EINVAL;
    }
    r->spec = strdup(matcher);
    if (r->spec == NULL) {
        if (r->kind == MATCH_TEXT)
            regfree(&r->re);
        return -ENOMEM;
    }
    return 0;
}

static void
rule_fini(struct rule *r)
{
    if (r->kind == MATCH_TEXT)
        regfree(&r->re);
    free(r->spec);
}

static int
grow(struct classify *c)
{
    if (c->n < c->cap)
        return 0;
    size_t cap = c->cap ? c->cap * 2 : 8;
    struct rule *p = realloc(c->rules, cap * sizeof(*p));
    if (p == NULL)
        return -ENOMEM;
    c->rules = p;
    c->cap = cap;
    return 0;
}

static struct classify_builtin builtin_table;
static bool builtin_ok;

/* Compile the built-ins; a failure other than memory is a bug in this
 * file. Out of memory leaves builtin_ok false: classify_new() then fails,
 * as it did when each table compiled its own (and a later call does not
 * try again: pthread_once). */
static void
builtin_compile(void)
{
    size_t nb = sizeof(builtins) / sizeof(builtins[0]);
    struct rule *rules = calloc(nb, sizeof(*rules));
    if (rules == NULL)
        return;
    for (size_t i = 0; i < nb; i++) {
        char err[256];
        int rc = rule_init(&rules[i], builtins[i].cls, builtins[i].matcher, builtins[i].note, err,
                           sizeof(err));
        if (rc == -ENOMEM) {
            while (i-- > 0)
                rule_fini(&rules[i]);
            free(rules);
            return;
        }
        if (rc < 0) {
            fprintf(stderr, "classify: built-in rule %zu: %s\n", i, err);
            abort();
        }
    }
    if (regcomp(&builtin_table.sender, sender_text, REG_EXTENDED | REG_ICASE | REG_NOSUB) != 0) {
        fprintf(stderr, "classify: sender_text refused\n"); /* a bug in this file */
        abort();
    }
    builtin_table.rules = rules;
    builtin_table.n = nb;
    builtin_ok = true;
}

struct classify *
classify_new(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, builtin_compile);
    if (!builtin_ok)
        return NULL;
    struct classify *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->builtin = &builtin_table;
    return c;
}

struct classify *
classify_free(struct classify *c)
{
    if (c == NULL)
        return NULL;
    for (size_t i = 0; i < c->n; i++)
        rule_fini(&c->rules[i]);
    free(c->rules);
    free(c);
    return NULL;
}

int
classify_add_rule(struct classify *c, const char *category, const char *matcher, char *err,
                  size_t errlen)
{
    enum bounce_class cls;
    struct rule r;

    if (c == NULL)
        return -EINVAL;
    if (bounce_class_parse(category, &cls) < 0) {
        set_err(err, errlen,
                "unknown category \"%s\": want one of invalid_recipient, mailbox_full, "
                "message_too_large, policy, rate_limited, dns_failure, tls_failure, "
                "connection_failure, expired, other",
                category ? category : "");
        return -EINVAL;
    }
    int rc = rule_init(&r, cls, matcher, NULL, err, errlen);
    if (rc < 0)
        return rc;
    if (grow(c) < 0) {
        rule_fini(&r);
        return -ENOMEM;
    }
    c->rules[c->n++] = r;
    return 0;
}

bool
classify_same(const struct classify *a, const struct classify *b)
{
    size_t na = a != NULL ? a->n : 0, nb = b != NULL ? b->n : 0;
    if (na != nb)
        return false;
    for (size_t i = 0; i < na; i++)
        if (a->rules[i].cls != b->rules[i].cls || strcmp(a->rules[i].spec, b->rules[i].spec) != 0)
            return false;
    return true;
}

static bool
enh_matches(const struct rule *r, const struct smtp_enh *e)
{
    if (e == NULL || e->cls == 0)
        return false;
    if (r->enh_cls != -1 && r->enh_cls != e->cls)
        return false;
    if (r->enh_subject == -1 ? e->subject == 0 : r->enh_subject != e->subject)
        return false;
    return r->enh_detail == -1 || r->enh_detail == e->detail;
}

enum bounce_class
classify(const struct classify *c, enum classify_source src, unsigned code,
         const struct smtp_enh *enh, const char *text)
{
    switch (src) {
    case CLASSIFY_REPLY:
        break;
    case CLASSIFY_DNS:
        return BOUNCE_DNS_FAILURE;
    case CLASSIFY_TLS:
        return BOUNCE_TLS_FAILURE;
    case CLASSIFY_CONNECT:
        return BOUNCE_CONNECTION_FAILURE;
    case CLASSIFY_EXPIRED:
        return BOUNCE_EXPIRED;
    case CLASSIFY_TARGET:
        return BOUNCE_REFUSED_TARGET;
    case CLASSIFY_TLS_POLICY:
        return BOUNCE_TLS_POLICY;
    case CLASSIFY_PROTOCOL:
    case CLASSIFY_OPERATOR:
    default:
        return BOUNCE_OTHER;
    }
    if (c == NULL)
        return BOUNCE_OTHER;

    /* A bounded copy: the regex cost stays bounded whatever was sent. */
    char buf[CLASSIFY_TEXT_MAX + 1];
    size_t n = text ? strnlen(text, CLASSIFY_TEXT_MAX) : 0;
    if (n > 0)
        memcpy(buf, text, n);
    buf[n] = '\0';

    for (size_t i = 0; i < c->n + c->builtin->n; i++) {
        const struct rule *r = i < c->n ? &c->rules[i] : &c->builtin->rules[i - c->n];
        bool m = false;
        switch (r->kind) {
        case MATCH_ENH:
            m = enh_matches(r, enh);
            break;
        case MATCH_CODE:
            m = code != 0 && r->code == code;
            break;
        case MATCH_TEXT:
            m = n > 0 && regexec(&r->re, buf, 0, NULL, 0) == 0;
            break;
        }
        if (m)
            return r->cls;
    }
    return BOUNCE_OTHER;
}

bool
classify_sender_refused(const struct classify *c, const struct smtp_enh *enh, const char *text)
{
    /* RFC 3463 X.1.7, X.1.8: bad sender's mailbox, bad sender's system */
    if (enh != NULL && enh->cls != 0 && enh->subject == 1 && (enh->detail == 7 || enh->detail == 8))
        return true;
    if (c == NULL || text == NULL || text[0] == '\0')
        return false;
    char buf[CLASSIFY_TEXT_MAX + 1];
    size_t n = strnlen(text, CLASSIFY_TEXT_MAX);
    memcpy(buf, text, n);
    buf[n] = '\0';
    return regexec(&c->builtin->sender, buf, 0, NULL, 0) == 0;
}

/* A table cell: "|" would end the cell, so it is escaped (GFM allows \|
 * even inside a code span). */
static void
put_cell(FILE *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '|')
            fputc('\\', out);
        fputc(*s, out);
    }
}

void
classify_print_rules(const struct classify *c, FILE *out)
{
    if (c == NULL)
        return;
    fputs("| # | matcher | class | why |\n| --- | --- | --- | --- |\n", out);
    for (size_t i = 0; i < c->n + c->builtin->n; i++) {
        const struct rule *r = i < c->n ? &c->rules[i] : &c->builtin->rules[i - c->n];
        fprintf(out, "| %zu | `", i + 1);
        put_cell(out, r->spec);
        fprintf(out, "` | %s | ", bounce_class_str(r->cls));
        put_cell(out, r->note ? r->note : "operator rule");
        fputs(" |\n", out);
    }
}
