/*
 * suppress: the suppression list in an LMDB environment of its own (see
 * suppress.h); its CSV import and export are engine/suppress_csv.c's, the
 * spool's notes (entries committed with the outcomes, copied to the list
 * by the writer thread) engine/suppress_notes.c's, a scope's moves (and
 * the fold at open of scopes stored with capitals)
 * engine/suppress_scope.c's.
 *
 * Why not a sub-database of the spool: the list has another life. Its
 * size follows the provider's customers (tens of millions of addresses),
 * not the mail in flight, so it gets its own map_size; a bulk import of a
 * million entries is one long write transaction, which in the spool's
 * environment would hold LMDB's single writer lock and stall the group
 * commit that every 250 waits for; and it is backed up, copied between
 * nodes and restored on its own (mdb_copy <spool>/suppress), while the
 * spool is not. It lives under the spool directory: same disk, same
 * owner, found where the operator looks.
 *
 * One database, "entries". Key: scope, NUL, normalised address
 * ("local@domain", or "@domain" for the whole domain), so that a scope's
 * entries are one range in key order. Value (little-endian):
 *   u8 version (1) | u8 reason | u16 note length | i64 added ms |
 *   i64 expires ms (0: never) | note
 *
 * Reads (check, list, export) are read transactions; LMDB binds one
 * reader slot to each thread (no MDB_NOTLS), so a check costs no syscall
 * and no lock. The writer thread walks the whole list at start and after
 * each import, so that a check's pages are in memory and mapped before a
 * worker needs them (a page fault on a worker's loop stalls every
 * session of that worker). Writes take wlock: the writer thread's batches
 * of feeds, copies of the spool's notes (engine/suppress_notes.c),
 * operator adds and removes, imports in chunks, purges in chunks, a
 * scope's moves (suppress_move_scope) in chunks. Feeds from the workers
 * wait in a bounded list for the writer thread, which commits all that
 * are waiting in one transaction (group commit).
 *
 * Threading: see suppress.h.
 */
#include "engine/suppress.h"
#include "engine/suppress_int.h"

#include <ctype.h>
#include <endian.h>
#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/fs.h"
#include "common/idn.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/smtp_cmd.h"

static const char *const reason_names[] = {"hard_bounce", "complaint", "unsubscribe", "manual"};

#define SUP(f) offsetof(struct suppress_config, f)
const struct conf_key suppress_conf_keys[] = {
    {"enabled", CONF_BOOL, SUP(enabled), 0, 0, "yes",
     "check every recipient at RCPT against the suppression list, and keep the list", NULL},
    {"path", CONF_STRING, SUP(path), 1, 4000, NULL,
     "directory of the list's own LMDB environment; unset: the spool's path + /suppress", NULL},
    {"map_size", CONF_SIZE, SUP(map_size), 1ULL << 20, 0, "4G",
     "largest size the list may reach (about 100 bytes an entry); raise it and restart to grow",
     NULL},
    {"lowercase_local", CONF_BOOL, SUP(lowercase_local), 0, 0, "no",
     "fold local parts to lowercase before storing and checking (domains always are); either "
     "way, an entry of reason hard_bounce or complaint whose local part is in lowercase (as "
     "bounces and feedback reports store theirs) holds for that local part in any case",
     NULL},
    {"strip_plus", CONF_BOOL, SUP(strip_plus), 0, 0, "no",
     "drop a +tag from local parts (user+news@ is user@)", NULL},
    {"gmail_dots", CONF_BOOL, SUP(gmail_dots), 0, 0, "no",
     "drop the dots of local parts at gmail.com and googlemail.com (f.o.o@ is foo@)", NULL},
    {"reply", CONF_STRING, SUP(reply), 1, 200, "550 5.7.1 <{addr}>: recipient suppressed ({reason})",
     "the RCPT reply to a suppressed recipient: a 4xx or 5xx code, then text; {addr} and "
     "{reason} are replaced",
     NULL},
    {"on_invalid_recipient", CONF_STRING, SUP(on_invalid_recipient), 1, 32, "off",
     "a recipient that bounces with class invalid_recipient is suppressed (reason hard_bounce) "
     "for this long: off, forever, or a duration like 30d; not on a refusal of the sender "
     "(X.1.7, X.1.8, \"Sender address rejected\", at MAIL, at RCPT or in a DSN) nor on an "
     "error of our own that no server replied",
     NULL},
    {"on_complaint", CONF_STRING, SUP(on_complaint), 1, 32, "forever",
     "a recipient who complained (feedback-loop report) is suppressed for this long: off, "
     "forever, or a duration",
     NULL},
    CONF_END,
};

/* ---- names, normalisation, encoding ---- */

const char *
suppress_reason_str(enum suppress_reason r)
{
    return (unsigned)r < SUPPRESS_REASON_COUNT ? reason_names[r] : "manual";
}

int
suppress_reason_parse(const char *s, enum suppress_reason *out)
{
    for (unsigned i = 0; i < SUPPRESS_REASON_COUNT; i++)
        if (strcasecmp(s, reason_names[i]) == 0) {
            *out = (enum suppress_reason)i;
            return 0;
        }
    return -EINVAL;
}

/* "off" -1, "forever" 0, else a duration in ms (> 0). */
static int
parse_ttl(const char *s, int64_t *out)
{
    if (strcasecmp(s, "off") == 0 || strcasecmp(s, "no") == 0) {
        *out = -1;
        return 0;
    }
    if (strcasecmp(s, "forever") == 0 || strcasecmp(s, "never") == 0) {
        *out = 0;
        return 0;
    }
    uint64_t ms;
    if (conf_parse_duration(s, &ms) != 0 || ms == 0 || ms > (uint64_t)INT64_MAX / 2)
        return -EINVAL;
    *out = (int64_t)ms;
    return 0;
}

int
suppress_config_check(struct suppress_config *cfg, const char *spool, char *err, size_t errlen)
{
    const char *r = cfg->reply;
    if (r == NULL || strlen(r) < 4 || (r[0] != '4' && r[0] != '5') || !isdigit((unsigned char)r[1]) ||
        !isdigit((unsigned char)r[2]) || r[3] != ' ') {
        snprintf(err, errlen, "reply: must start with a 4xx or 5xx code and a space");
        return -EINVAL;
    }
    for (const char *p = r; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            snprintf(err, errlen, "reply: control characters are not allowed");
            return -EINVAL;
        }
    if (parse_ttl(cfg->on_invalid_recipient, &cfg->invalid_recipient_ttl) != 0) {
        snprintf(err, errlen, "on_invalid_recipient: expected off, forever or a duration, got '%s'",
                 cfg->on_invalid_recipient);
        return -EINVAL;
    }
    if (parse_ttl(cfg->on_complaint, &cfg->complaint_ttl) != 0) {
        snprintf(err, errlen, "on_complaint: expected off, forever or a duration, got '%s'",
                 cfg->on_complaint);
        return -EINVAL;
    }
    if (cfg->path == NULL && spool != NULL) {
        size_t n = strlen(spool) + sizeof("/suppress");
        if ((cfg->path = malloc(n)) == NULL) {
            snprintf(err, errlen, "out of memory");
            return -ENOMEM;
        }
        snprintf(cfg->path, n, "%s/suppress", spool);
    }
    return 0;
}

static bool
is_gmail(const char *d, size_t n)
{
    return (n == 9 && memcmp(d, "gmail.com", 9) == 0) ||
           (n == 14 && memcmp(d, "googlemail.com", 14) == 0);
}

/* addr into out as stored: see suppress.h. cfg NULL: no local-part rules. */
int
sup_normalize(const struct suppress_config *cfg, const char *addr, char *out, size_t outlen)
{
    if (addr == NULL)
        return -EINVAL;
    size_t n = strlen(addr);
    if (n >= 2 && addr[0] == '<' && addr[n - 1] == '>') {
        addr++;
        n -= 2;
    }
    /* A space only inside a quoted local part ("a b"@x.test: RFC 5321
     * 4.1.2 qtextSMTP), which RCPT takes; none elsewhere. */
    size_t qend = 0;
    for (size_t i = 1; n > 0 && addr[0] == '"' && i < n && qend == 0; i++) {
        if (addr[i] == '\\')
            i++;
        else if (addr[i] == '"')
            qend = i;
    }
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)addr[i] <= 0x20 || addr[i] == 0x7f) && !(addr[i] == ' ' && i < qend))
            return -EINVAL;
    const char *at = memrchr(addr, '@', n);
    const char *local = addr, *dom;
    size_t ll, dl;
    if (at == NULL) { /* a bare domain */
        ll = 0;
        dom = addr;
        dl = n;
    } else {
        ll = (size_t)(at - addr);
        dom = at + 1;
        dl = n - ll - 1;
    }
    if (dl > 0 && dom[dl - 1] == '.')
        dl--; /* example.com. is example.com */
    char ubuf[SMTP_LOCAL_MAX];
    ll = smtp_local_canon(local, ll, ubuf, &local);
    if (dl == 0 || dl > 255 || ll > 64 || ll + dl + 2 > outlen || memchr(dom, '@', dl) != NULL)
        return -EINVAL;
    size_t o = 0;
    bool gm = false;
    char dbuf[256];
    /* A domain in U-labels is its A-labels, as delivery has it (job_new):
     * x@BÜCHER.test, x@bücher.test and x@xn--bcher-kva.test are one
     * mailbox, and one entry holds for all. One that is no valid IDN is
     * kept as written (delivery bounces it). */
    int an = idn_is_ascii(dom, dl) ? -EINVAL : idn_domain_ascii(dom, dl, dbuf, sizeof(dbuf), NULL);
    if (an > 0) {
        dl = (size_t)an;
        if (ll + dl + 2 > outlen)
            return -EINVAL;
    } else {
        for (size_t i = 0; i < dl; i++)
            dbuf[i] = (char)tolower((unsigned char)dom[i]);
    }
    gm = cfg != NULL && cfg->gmail_dots && is_gmail(dbuf, dl);
    /* A local part quoted only for its dots ("user."@, smtp_local_canon)
     * gets the rules inside its quotes, and keeps them only if what is
     * left still needs them: "user+x."@ is "user"@ under strip_plus
     * (not "user), "u.ser."@gmail.com is user@ under gmail_dots. Any other
     * quoted one ("a b+x"@) gets them inside its quotes too, and keeps
     * them ("a b"@ under strip_plus, not "a b@), its quoted pairs whole. */
    bool quoted = ll >= 3 && local[0] == '"' && local[ll - 1] == '"';
    bool dq = quoted;
    for (size_t i = 1; dq && i + 1 < ll; i++) {
        unsigned char c = (unsigned char)local[i];
        dq = isalnum(c) || c >= 0x80 || strchr("!#$%&'*+-/=?^_`{|}~.", c) != NULL;
    }
    const char *lp = quoted ? local + 1 : local;
    size_t lpl = quoted ? ll - 2 : ll;
    if (quoted)
        out[o++] = '"';
    size_t first = o;
    for (size_t i = 0; i < lpl; i++) {
        char c = lp[i];
        if (quoted && c == '\\' && i + 1 < lpl) {
            out[o++] = c;
            c = lp[++i];
            out[o++] = cfg != NULL && cfg->lowercase_local ? (char)tolower((unsigned char)c) : c;
            continue;
        }
        if (cfg != NULL && cfg->strip_plus && c == '+' && o > first)
            break;
        if (gm && c == '.')
            continue;
        if (cfg != NULL && cfg->lowercase_local)
            c = (char)tolower((unsigned char)c);
        out[o++] = c;
    }
    if (ll > 0 && o == first)
        return -EINVAL;
    if (dq) {
        size_t kept = o - first;
        if (out[first] == '.' || out[o - 1] == '.' || memmem(out + first, kept, "..", 2)) {
            out[o++] = '"';
        } else {
            memmove(out, out + first, kept);
            o = kept;
        }
    } else if (quoted) {
        out[o++] = '"';
    }
    out[o++] = '@';
    memcpy(out + o, dbuf, dl);
    o += dl;
    out[o] = '\0';
    return 0;
}

int
suppress_normalize(const struct suppress *s, const char *addr, char *out, size_t outlen)
{
    return sup_normalize(s ? &s->cfg : NULL, addr, out, outlen);
}

static int
check_scope(const char *scope)
{
    size_t n = strlen(scope);
    if (n == 0 || n > SUPPRESS_SCOPE_MAX)
        return -EINVAL;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)scope[i] <= 0x20 || scope[i] == 0x7f || scope[i] == ',' ||
            scope[i] == '"')
            return -EINVAL;
    return 0;
}

/* Scopes compare without case, as tenant names do (config.c): a list is
 * stored and found under its scope in lowercase, whoever names it (the
 * config's spelling at RCPT, the one a VERP token carried, an operator's,
 * an imported file's). scope (NULL: global) into out (SUPPRESS_SCOPE_MAX
 * + 1). Returns 0, or -EINVAL for a name no scope can have. */
int
sup_scope_fold(const char *scope, char *out)
{
    if (scope == NULL)
        scope = SUPPRESS_SCOPE_GLOBAL;
    if (check_scope(scope) != 0)
        return -EINVAL;
    size_t i = 0;
    for (; scope[i] != '\0'; i++)
        out[i] = (char)tolower((unsigned char)scope[i]);
    out[i] = '\0';
    return 0;
}

int
suppress_normalize_scope(const char *scope, char *out, size_t outlen)
{
    char f[SUPPRESS_SCOPE_MAX + 1];
    if (sup_scope_fold(scope, f) != 0 || strlen(f) >= outlen)
        return -EINVAL;
    memcpy(out, f, strlen(f) + 1);
    return 0;
}

size_t
sup_key_make(uint8_t *k, const char *scope, const char *norm)
{
    size_t sl = strlen(scope), al = strlen(norm);
    memcpy(k, scope, sl);
    k[sl] = '\0';
    memcpy(k + sl + 1, norm, al);
    return sl + 1 + al;
}

size_t
sup_val_make(uint8_t *v, enum suppress_reason reason, int64_t added, int64_t expires, const char *note)
{
    size_t nl = note ? strnlen(note, SUPPRESS_NOTE_MAX) : 0;
    v[0] = 1;
    v[1] = (uint8_t)reason;
    uint16_t l16 = htole16((uint16_t)nl);
    uint64_t a = htole64((uint64_t)added), x = htole64((uint64_t)expires);
    memcpy(v + 2, &l16, 2);
    memcpy(v + 4, &a, 8);
    memcpy(v + 12, &x, 8);
    if (nl > 0)
        memcpy(v + VAL_HDR, note, nl);
    /* A note is one line of text: no control characters survive. */
    for (size_t i = 0; i < nl; i++)
        if (v[VAL_HDR + i] < 0x20 || v[VAL_HDR + i] == 0x7f)
            v[VAL_HDR + i] = ' ';
    return VAL_HDR + nl;
}

/* Decode key k and value v into e. Returns 0 or -EINVAL (damaged). */
static int
entry_decode(const MDB_val *k, const MDB_val *v, struct suppress_entry *e)
{
    const uint8_t *kp = k->mv_data;
    const uint8_t *z = memchr(kp, '\0', k->mv_size);
    if (z == NULL || v->mv_size < VAL_HDR)
        return -EINVAL;
    size_t sl = (size_t)(z - kp), al = k->mv_size - sl - 1;
    if (sl > SUPPRESS_SCOPE_MAX || al > SUPPRESS_ADDR_MAX)
        return -EINVAL;
    memcpy(e->scope, kp, sl);
    e->scope[sl] = '\0';
    memcpy(e->addr, z + 1, al);
    e->addr[al] = '\0';
    const uint8_t *vp = v->mv_data;
    uint16_t l16;
    uint64_t a, x;
    memcpy(&l16, vp + 2, 2);
    memcpy(&a, vp + 4, 8);
    memcpy(&x, vp + 12, 8);
    size_t nl = le16toh(l16);
    if (nl > SUPPRESS_NOTE_MAX || VAL_HDR + nl > v->mv_size)
        return -EINVAL;
    e->reason = vp[1] < SUPPRESS_REASON_COUNT ? (enum suppress_reason)vp[1] : SUPPRESS_MANUAL;
    e->added_ms = (int64_t)le64toh(a);
    e->expires_ms = (int64_t)le64toh(x);
    memcpy(e->note, vp + VAL_HDR, nl);
    e->note[nl] = '\0';
    return 0;
}

int64_t
sup_val_expires(const MDB_val *v)
{
    uint64_t x;
    if (v->mv_size < VAL_HDR)
        return 0;
    memcpy(&x, (const uint8_t *)v->mv_data + 12, 8);
    return (int64_t)le64toh(x);
}

int
sup_mdb_errno(int rc)
{
    switch (rc) {
    case 0:
        return 0;
    case MDB_NOTFOUND:
        return -ENOENT;
    case MDB_MAP_FULL:
        return -ENOSPC;
    case MDB_READERS_FULL:
        return -EAGAIN;
    case ENOMEM:
        return -ENOMEM;
    default:
        return rc > 0 ? -rc : -EIO;
    }
}

int
sup_cursor_open(struct suppress *s, unsigned flags, MDB_txn **txn, MDB_cursor **cur)
{
    int rc = mdb_txn_begin(s->env, NULL, flags, txn);
    if (rc != 0)
        return sup_mdb_errno(rc);
    if ((rc = mdb_cursor_open(*txn, s->dbi, cur)) != 0) {
        mdb_txn_abort(*txn);
        return sup_mdb_errno(rc);
    }
    return 0;
}

/* ---- writing ---- */

/* Commit n key/value pairs in one transaction (wlock held). */
int
sup_write_pairs(struct suppress *s, struct feed *list)
{
    MDB_txn *txn;
    int rc = mdb_txn_begin(s->env, NULL, 0, &txn);
    if (rc != 0)
        return sup_mdb_errno(rc);
    uint64_t n = 0;
    for (struct feed *f = list; f != NULL; f = f->next) {
        MDB_val k = {f->klen, f->kv}, v = {f->vlen, f->kv + f->klen};
        if ((rc = mdb_put(txn, s->dbi, &k, &v, 0)) != 0) {
            mdb_txn_abort(txn);
            return sup_mdb_errno(rc);
        }
        n++;
    }
    rc = mdb_txn_commit(txn);
    if (rc != 0)
        return sup_mdb_errno(rc);
    atomic_fetch_add(&s->added, n);
    return 0;
}

/* The local part of a normalised address in lowercase (ASCII): true
 * when that changed it. */
static bool
fold_local(char *norm)
{
    char *at = strrchr(norm, '@');
    bool changed = false;
    for (char *p = norm; at != NULL && p < at; p++)
        if (*p >= 'A' && *p <= 'Z') {
            *p = (char)(*p - 'A' + 'a');
            changed = true;
        }
    return changed;
}

/* Whether an entry found under an address's lowercased local part holds
 * for the address as given: the reasons that feedback and bounces feed,
 * whose report proves the address only up to case (suppress_feed). */
static bool
holds_without_case(enum suppress_reason r)
{
    return r == SUPPRESS_HARD_BOUNCE || r == SUPPRESS_COMPLAINT;
}

bool
sup_utf8_text(const char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0, k; i < n; i += k)
        if ((k = json_utf8_len((const unsigned char *)s + i, n - i)) == 0)
            return false;
    return true;
}

/* Whether a domain has a label in A-labels ("xn--", stored in lowercase). */
static bool
has_alabel(const char *d)
{
    for (;;) {
        if (strncmp(d, "xn--", 4) == 0)
            return true;
        if ((d = strchr(d, '.')) == NULL)
            return false;
        d++;
    }
}

int
sup_storable(const char *norm)
{
    if (!sup_utf8_text(norm))
        return -EILSEQ;
    /* a whole domain ("@example.com") as the domain of a mailbox */
    char buf[SUPPRESS_ADDR_MAX + 3];
    int n = snprintf(buf, sizeof(buf), "%s%s", norm[0] == '@' ? "x" : "", norm);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return -EINVAL;
    int rc = smtp_mailbox_check(buf, (size_t)n, true);
    /* RCPT counts the path as the client wrote it: a domain in U-labels
     * is stored in its A-labels (sup_normalize), longer by a few octets a
     * label, so that a mailbox RCPT took at 250 octets may be stored at
     * 280; the path limit is not this form's then. */
    if (rc == SMTP_CMD_E_PATH_TOO_LONG && has_alabel(strrchr(buf, '@') + 1))
        rc = 0;
    return rc == 0 ? 0 : -EINVAL;
}

/* fold: store the local part in lowercase (suppress_feed's entries). */
struct feed *
sup_feed_make(const struct suppress *s, const char *scope, const char *addr,
              enum suppress_reason reason, int64_t expires_at, const char *note, bool fold,
              int *err)
{
    char norm[SUPPRESS_ADDR_MAX + 2], sc[SUPPRESS_SCOPE_MAX + 1];
    if ((unsigned)reason >= SUPPRESS_REASON_COUNT || sup_scope_fold(scope, sc) != 0 ||
        sup_normalize(&s->cfg, addr, norm, sizeof(norm)) != 0 || strlen(norm) > SUPPRESS_ADDR_MAX ||
        expires_at < 0) {
        *err = -EINVAL;
        return NULL;
    }
    /* An address in another encoding (Latin-1 pasted into a terminal)
     * would be stored as its octets, listed as U+FFFD (so that the
     * listed form removed nothing), and matched by no recipient: RCPT
     * takes only UTF-8; so would one RCPT's syntax refuses. */
    int rc = sup_storable(norm);
    if (rc < 0) {
        *err = rc;
        return NULL;
    }
    if (fold)
        fold_local(norm);
    struct feed *f = malloc(sizeof(*f) + KEY_MAX + VAL_MAX);
    if (f == NULL) {
        *err = -ENOMEM;
        return NULL;
    }
    f->next = NULL;
    f->klen = (uint16_t)sup_key_make(f->kv, sc, norm);
    f->vlen = (uint16_t)sup_val_make(f->kv + f->klen, reason, (int64_t)clock_unix_ms(), expires_at,
                                 note);
    return f;
}

int
suppress_add(struct suppress *s, const char *scope, const char *addr, enum suppress_reason reason,
             int64_t expires_at, const char *note)
{
    int rc = 0;
    struct feed *f = sup_feed_make(s, scope, addr, reason, expires_at, note, false, &rc);
    if (f == NULL)
        return rc;
    pthread_mutex_lock(&s->wlock);
    rc = sup_write_pairs(s, f);
    pthread_mutex_unlock(&s->wlock);
    free(f);
    return rc;
}

/* Queue f (taken over) to the writer thread: 0, or -EAGAIN (dropped). */
static int
feed_queue(struct suppress *s, struct feed *f)
{
    pthread_mutex_lock(&s->flock);
    if (s->nfeed >= SUPPRESS_FEED_MAX || s->stop) {
        pthread_mutex_unlock(&s->flock);
        free(f);
        atomic_fetch_add(&s->feed_dropped, 1);
        return -EAGAIN;
    }
    *s->ftail = f;
    s->ftail = &f->next;
    s->nfeed++;
    s->fseq_in++;
    pthread_cond_signal(&s->fcv);
    pthread_mutex_unlock(&s->flock);
    return 0;
}

int
suppress_feed(struct suppress *s, const char *scope, const char *addr, enum suppress_reason reason,
              int64_t expires_at, const char *note)
{
    int rc = 0;
    /* A bounce or a report names the address in its own spelling, which
     * a feedback report proves only up to case (its VERP tag is made
     * from the lowercased address, feedback/verp.c): stored with the
     * local part in lowercase, and found so by suppress_check. */
    struct feed *f = sup_feed_make(s, scope, addr, reason, expires_at, note,
                                   holds_without_case(reason), &rc);
    return f != NULL ? feed_queue(s, f) : rc;
}

/* The entry a bounce of class cls asks for under [suppress]
 * on_invalid_recipient, or NULL: none (*err 0), or a bad address. */
struct feed *
sup_bounce_entry(const struct suppress *s, const char *tenant, const char *addr,
                 enum bounce_class cls, const char *text, int *err)
{
    *err = 0;
    if (s == NULL || cls != BOUNCE_INVALID_RECIPIENT || s->cfg.invalid_recipient_ttl < 0)
        return NULL;
    int64_t exp = s->cfg.invalid_recipient_ttl == 0
                      ? 0
                      : (int64_t)clock_unix_ms() + s->cfg.invalid_recipient_ttl;
    char note[SUPPRESS_NOTE_MAX + 1];
    snprintf(note, sizeof(note), "bounce: %s", text ? text : "");
    return sup_feed_make(s, tenant, addr, SUPPRESS_HARD_BOUNCE, exp, note, true, err);
}

int
suppress_on_bounce(struct suppress *s, const char *tenant, const char *addr, enum bounce_class cls,
                   const char *text)
{
    int rc = 0;
    struct feed *f = sup_bounce_entry(s, tenant, addr, cls, text, &rc);
    if (f != NULL)
        rc = feed_queue(s, f);
    if (rc != 0)
        log_msg(LOG_WARN, "event=suppress_feed_failed rcpt=<%s> err=\"%s\"", addr, strerror(-rc));
    return f != NULL && rc == 0;
}

int64_t
suppress_complaint_expiry(const struct suppress *s, int64_t now_ms)
{
    if (s == NULL || s->cfg.complaint_ttl < 0)
        return -1;
    return s->cfg.complaint_ttl == 0 ? 0 : now_ms + s->cfg.complaint_ttl;
}

/* The key an entry for norm had when the list was written by a sluice
 * that stored a local part with dots leading, trailing or doubled as
 * typed (user.@x: operators' adds and imports), before such a local part
 * took its quotes in every key ("user."@x, smtp_local_canon): that
 * unquoted form into buf (SUPPRESS_ADDR_MAX + 2), or false when norm's
 * local part is no such quoted one. Checks and removals look there too,
 * so an entry stored before is still found and still removable. */
static bool
legacy_unquoted(const char *norm, char *buf)
{
    const char *at = strrchr(norm, '@');
    if (norm[0] != '"' || at == NULL || at - norm < 3 || at[-1] != '"')
        return false;
    size_t ll = (size_t)(at - norm) - 2;
    char q[SMTP_LOCAL_MAX];
    const char *out;
    /* only what local_quote makes: atext and dots, no dot-string */
    if (smtp_local_canon(norm + 1, ll, q, &out) != ll + 2 || out == norm + 1 ||
        memcmp(out, norm, ll + 2) != 0)
        return false;
    memcpy(buf, norm + 1, ll);
    memcpy(buf + ll, at, strlen(at) + 1);
    return true;
}

int
suppress_remove(struct suppress *s, const char *scope, const char *addr)
{
    char norm[SUPPRESS_ADDR_MAX + 2], sc[SUPPRESS_SCOPE_MAX + 1];
    uint8_t kb[KEY_MAX];
    if (sup_scope_fold(scope, sc) != 0 || sup_normalize(&s->cfg, addr, norm, sizeof(norm)) != 0 ||
        strlen(norm) > SUPPRESS_ADDR_MAX)
        return -EINVAL;
    MDB_val k = {sup_key_make(kb, sc, norm), kb}, v;
    pthread_mutex_lock(&s->wlock);
    MDB_txn *txn;
    int rc = mdb_txn_begin(s->env, NULL, 0, &txn);
    if (rc == 0) {
        rc = mdb_del(txn, s->dbi, &k, NULL);
        char legacy[SUPPRESS_ADDR_MAX + 2];
        if ((rc == 0 || rc == MDB_NOTFOUND) && legacy_unquoted(norm, legacy)) {
            /* both, when a re-import stored the new key beside the old:
             * either left would keep the address suppressed */
            k = (MDB_val){sup_key_make(kb, sc, legacy), kb};
            int lrc = mdb_del(txn, s->dbi, &k, NULL);
            if (rc == MDB_NOTFOUND || lrc != MDB_NOTFOUND)
                rc = lrc;
        }
        /* None as given: the entry a bounce or complaint stored in
         * lowercase, which suppress_check finds for this address. */
        if (rc == MDB_NOTFOUND && fold_local(norm)) {
            k = (MDB_val){sup_key_make(kb, sc, norm), kb};
            if (mdb_get(txn, s->dbi, &k, &v) == 0 && v.mv_size >= 2 &&
                holds_without_case((enum suppress_reason)((const uint8_t *)v.mv_data)[1]))
                rc = mdb_del(txn, s->dbi, &k, NULL);
        }
        if (rc == 0)
            rc = mdb_txn_commit(txn);
        else
            mdb_txn_abort(txn);
    }
    pthread_mutex_unlock(&s->wlock);
    if (rc == 0)
        atomic_fetch_add(&s->removed, 1);
    return sup_mdb_errno(rc);
}

long
suppress_purge(struct suppress *s, int64_t now_ms)
{
    long total = 0;
    /* Each batch goes on from the last key deleted: started again from
     * the first key, a purge of E expired among N entries walked about
     * E / PURGE_BATCH times N keys, holding the write lock each time. */
    unsigned char from[512]; /* LMDB keys: 511 octets at most (mdb_env_get_maxkeysize) */
    size_t from_len = 0;
    for (;;) {
        pthread_mutex_lock(&s->wlock);
        MDB_txn *txn;
        MDB_cursor *cur;
        int rc = mdb_txn_begin(s->env, NULL, 0, &txn);
        if (rc == 0 && (rc = mdb_cursor_open(txn, s->dbi, &cur)) != 0)
            mdb_txn_abort(txn);
        if (rc != 0) {
            pthread_mutex_unlock(&s->wlock);
            return sup_mdb_errno(rc);
        }
        MDB_val k = {.mv_size = from_len, .mv_data = from}, v;
        long n = 0;
        bool more = false;
        for (rc = mdb_cursor_get(cur, &k, &v, from_len > 0 ? MDB_SET_RANGE : MDB_FIRST); rc == 0;
             rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
            int64_t x = sup_val_expires(&v);
            if (x == 0 || x > now_ms)
                continue;
            if (k.mv_size <= sizeof(from)) {
                memcpy(from, k.mv_data, k.mv_size);
                from_len = k.mv_size;
            }
            if ((rc = mdb_cursor_del(cur, 0)) != 0)
                break;
            if (++n == PURGE_BATCH) {
                more = true;
                break;
            }
        }
        mdb_cursor_close(cur);
        if (rc != 0 && rc != MDB_NOTFOUND) {
            mdb_txn_abort(txn);
            pthread_mutex_unlock(&s->wlock);
            return sup_mdb_errno(rc);
        }
        rc = mdb_txn_commit(txn);
        pthread_mutex_unlock(&s->wlock);
        if (rc != 0)
            return sup_mdb_errno(rc);
        total += n;
        atomic_fetch_add(&s->removed, (uint64_t)n);
        if (!more)
            return total;
    }
}

/* Walk the whole list once, off the workers: every page is then in the
 * page cache and mapped in this process, so that a check at RCPT does not
 * take a page fault (from the disk after a restart, and costly under a
 * hypervisor even from the cache) on a worker's loop. Stops early when
 * the list is closing. */
static void
prefault(struct suppress *s)
{
    uint64_t t0 = clock_mono_ms(), n = 0;
    MDB_txn *txn;
    MDB_cursor *cur;
    if (mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn) != 0)
        return;
    if (mdb_cursor_open(txn, s->dbi, &cur) != 0) {
        mdb_txn_abort(txn);
        return;
    }
    MDB_val k, v;
    volatile uint8_t sink = 0;
    for (int rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        sink ^= ((const uint8_t *)v.mv_data)[0];
        if ((++n & 0xffff) == 0 && atomic_load_explicit(&s->closing, memory_order_relaxed))
            break;
    }
    (void)sink;
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    if (n > 0)
        log_msg(LOG_INFO, "event=suppress_warm entries=%llu ms=%llu", (unsigned long long)n,
                (unsigned long long)(clock_mono_ms() - t0));
}

/* The writer thread: commits every feed waiting in one transaction. */
static void *
writer_main(void *arg)
{
    struct suppress *s = arg;
    log_altstack_init();
    log_set_thread_name("suppress");
    /* a minute after start (not in the way of the start itself), then every hour */
    uint64_t next_purge = clock_mono_ms() + 60000;
    prefault(s);
    pthread_mutex_lock(&s->flock);
    for (;;) {
        uint64_t retry = 0;
        while (s->fhead == NULL && !s->stop && !s->warm && !s->notes_due &&
               clock_mono_ms() < next_purge &&
               ((retry = atomic_load(&s->notes_retry_ms)) == 0 || clock_mono_ms() < retry)) {
            uint64_t now = clock_mono_ms();
            struct timespec until =
                clock_mono_deadline(retry != 0 && retry - now < 60000 ? retry - now : 60000);
            pthread_cond_timedwait(&s->fcv, &s->flock, &until);
        }
        if (s->fhead == NULL && s->stop)
            break;
        retry = atomic_load(&s->notes_retry_ms);
        bool warm = s->warm, notes = s->notes_due || (retry != 0 && clock_mono_ms() >= retry);
        s->warm = false;
        s->notes_due = false;
        struct feed *list = s->fhead;
        unsigned n = s->nfeed;
        uint64_t seq = s->fseq_in;
        s->fhead = NULL;
        s->ftail = &s->fhead;
        s->nfeed = 0;
        pthread_mutex_unlock(&s->flock);
        if (list != NULL && !s->test_hold) {
            pthread_mutex_lock(&s->wlock);
            int rc = sup_write_pairs(s, list);
            pthread_mutex_unlock(&s->wlock);
            if (rc != 0) {
                atomic_fetch_add(&s->feed_dropped, n);
                log_msg(LOG_ERR, "event=suppress_write_failed entries=%u err=\"%s\"", n,
                        strerror(-rc));
            }
        }
        while (list != NULL) {
            struct feed *next = list->next;
            free(list);
            list = next;
        }
        if (notes)
            sup_notes_pump(s, false);
        if (warm && !s->stop)
            prefault(s);
        if (clock_mono_ms() >= next_purge && !s->stop) {
            long p = suppress_purge(s, (int64_t)clock_unix_ms());
            if (p > 0)
                log_msg(LOG_INFO, "event=suppress_purged entries=%ld", p);
            else if (p < 0)
                log_msg(LOG_ERR, "event=suppress_purge_failed err=\"%s\"", strerror((int)-p));
            next_purge = clock_mono_ms() + PURGE_EVERY_MS;
        }
        pthread_mutex_lock(&s->flock);
        s->fseq_done = seq;
        pthread_cond_broadcast(&s->dcv);
    }
    s->fseq_done = s->fseq_in;
    pthread_cond_broadcast(&s->dcv);
    pthread_mutex_unlock(&s->flock);
    return NULL;
}

void
suppress_sync(struct suppress *s)
{
    pthread_mutex_lock(&s->flock);
    uint64_t want = s->fseq_in;
    pthread_cond_signal(&s->fcv);
    while (s->fseq_done < want)
        pthread_cond_wait(&s->dcv, &s->flock);
    pthread_mutex_unlock(&s->flock);
    sup_notes_pump(s, true);
}

/* ---- open, close ---- */

int
suppress_open(const struct suppress_config *cfg, struct suppress **out, char *err, size_t errlen)
{
    *out = NULL;
    if (cfg->path == NULL) {
        snprintf(err, errlen, "suppress: no path");
        return -EINVAL;
    }
    struct suppress *s = calloc(1, sizeof(*s));
    if (s == NULL) {
        snprintf(err, errlen, "suppress: out of memory");
        return -ENOMEM;
    }
    if (conf_copy(suppress_conf_keys, &s->cfg, cfg, sizeof(*cfg)) != 0) {
        free(s);
        snprintf(err, errlen, "suppress: out of memory");
        return -ENOMEM;
    }
    s->cfg.invalid_recipient_ttl = cfg->invalid_recipient_ttl;
    s->cfg.complaint_ttl = cfg->complaint_ttl;
    pthread_mutex_init(&s->wlock, NULL);
    pthread_mutex_init(&s->flock, NULL);
    pthread_mutex_init(&s->plock, NULL);
    clock_cond_init_mono(&s->fcv);
    pthread_cond_init(&s->dcv, NULL);
    s->ftail = &s->fhead;
    int rc;
    if ((s->notes_kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        rc = -errno;
        snprintf(err, errlen, "suppress: cannot make an eventfd: %s", strerror(-rc));
        suppress_close(s);
        return rc;
    }
    if ((rc = fs_mkdir_p(cfg->path)) < 0) {
        snprintf(err, errlen, "suppress: cannot create %s: %s", cfg->path, strerror(-rc));
        suppress_close(s);
        return rc;
    }
    MDB_txn *txn = NULL;
    if ((rc = mdb_env_create(&s->env)) != 0 || (rc = mdb_env_set_maxdbs(s->env, 2)) != 0 ||
        (rc = mdb_env_set_maxreaders(s->env, 1024)) != 0 ||
        (rc = mdb_env_set_mapsize(s->env, (size_t)cfg->map_size)) != 0 ||
        (rc = mdb_env_open(s->env, cfg->path, 0, 0600)) != 0 ||
        (rc = mdb_txn_begin(s->env, NULL, 0, &txn)) != 0 ||
        (rc = mdb_dbi_open(txn, "entries", MDB_CREATE, &s->dbi)) != 0 ||
        (rc = mdb_txn_commit(txn), txn = NULL, rc) != 0) {
        if (txn != NULL)
            mdb_txn_abort(txn);
        snprintf(err, errlen, "suppress: cannot open the list at %s: %s", cfg->path,
                 mdb_strerror(rc));
        suppress_close(s);
        return sup_mdb_errno(rc);
    }
    long folded = sup_fold_stored_scopes(s);
    if (folded < 0) {
        snprintf(err, errlen, "suppress: cannot fold the scopes of the list at %s to lowercase: %s",
                 cfg->path, strerror((int)-folded));
        suppress_close(s);
        return (int)folded;
    }
#ifdef SLUICE_TEST_HOOKS
    /* SLUICE_TEST_SUPPRESS_HOLD=1: the list writes nothing of its own
     * accord: the feeds the writer thread takes are dropped and the
     * spool's notes stay there (as if a kill -9 always came before the
     * list's commit); operators' writes (suppress_add) still happen. */
    const char *hold = getenv("SLUICE_TEST_SUPPRESS_HOLD");
    if (hold != NULL && strcmp(hold, "1") == 0) {
        s->test_hold = true;
        log_msg(LOG_WARN, "event=test_hook name=SLUICE_TEST_SUPPRESS_HOLD");
    }
#endif
    if ((rc = pthread_create(&s->thread, NULL, writer_main, s)) != 0) {
        snprintf(err, errlen, "suppress: cannot start its thread: %s", strerror(rc));
        suppress_close(s);
        return -rc;
    }
    s->thread_started = true;
    *out = s;
    return 0;
}

void
suppress_close(struct suppress *s)
{
    if (s == NULL)
        return;
    if (s->thread_started) {
        atomic_store(&s->closing, true);
        pthread_mutex_lock(&s->flock);
        s->stop = true;
        pthread_cond_signal(&s->fcv);
        pthread_mutex_unlock(&s->flock);
        pthread_join(s->thread, NULL);
    }
    sup_notes_left_free(s);
    if (s->notes_kick_fd >= 0)
        close(s->notes_kick_fd);
    while (s->fhead != NULL) {
        struct feed *n = s->fhead->next;
        free(s->fhead);
        s->fhead = n;
    }
    if (s->env != NULL)
        mdb_env_close(s->env);
    conf_free(suppress_conf_keys, &s->cfg);
    pthread_mutex_destroy(&s->wlock);
    pthread_mutex_destroy(&s->flock);
    pthread_mutex_destroy(&s->plock);
    pthread_cond_destroy(&s->fcv);
    pthread_cond_destroy(&s->dcv);
    free(s);
}

/* ---- reading ---- */

/* Look key up in txn: 1 (live entry, decoded into out), 0, or -errno. */
static int
lookup(MDB_txn *txn, MDB_dbi dbi, const char *scope, const char *norm, int64_t now,
       struct suppress_entry *out)
{
    uint8_t kb[KEY_MAX];
    MDB_val k = {sup_key_make(kb, scope, norm), kb}, v;
    int rc = mdb_get(txn, dbi, &k, &v);
    if (rc == MDB_NOTFOUND)
        return 0;
    if (rc != 0)
        return sup_mdb_errno(rc);
    int64_t x = sup_val_expires(&v);
    if (x != 0 && x <= now)
        return 0;
    if (out != NULL && entry_decode(&k, &v, out) != 0)
        return -EINVAL;
    return 1;
}

int
suppress_check(struct suppress *s, const char *scope, const char *addr, struct suppress_entry *out)
{
    char norm[SUPPRESS_ADDR_MAX + 2];
    atomic_fetch_add_explicit(&s->checks, 1, memory_order_relaxed);
    if (sup_normalize(&s->cfg, addr, norm, sizeof(norm)) != 0 || strlen(norm) > SUPPRESS_ADDR_MAX) {
        /* No entry can hold this address (an over-long local part...),
         * but its domain's entry still holds. */
        const char *at = addr != NULL ? strrchr(addr, '@') : NULL;
        if (at == NULL || sup_normalize(NULL, at, norm, sizeof(norm)) != 0)
            return 0;
    }
    char sc[SUPPRESS_SCOPE_MAX + 1];
    bool scoped =
        scope != NULL && sup_scope_fold(scope, sc) == 0 && strcmp(sc, SUPPRESS_SCOPE_GLOBAL) != 0;
    scope = sc;
    /* "@domain": after the last '@', as sup_normalize() split it (a quoted
     * local part may hold one) */
    const char *dom = strrchr(norm, '@');
    MDB_txn *txn;
    int rc = mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn);
    if (rc != 0)
        return sup_mdb_errno(rc);
    int64_t now = (int64_t)clock_unix_ms();
    rc = 0;
    if (dom != norm) { /* an address: it first, then its domain */
        rc = lookup(txn, s->dbi, SUPPRESS_SCOPE_GLOBAL, norm, now, out);
        if (rc == 0 && scoped)
            rc = lookup(txn, s->dbi, scope, norm, now, out);
        char legacy[SUPPRESS_ADDR_MAX + 2];
        if (rc == 0 && legacy_unquoted(norm, legacy)) {
            rc = lookup(txn, s->dbi, SUPPRESS_SCOPE_GLOBAL, legacy, now, out);
            if (rc == 0 && scoped)
                rc = lookup(txn, s->dbi, scope, legacy, now, out);
        }
        /* Then its local part in lowercase: a bounce's or a complaint's
         * entry (suppress_feed) holds for the address in any case. */
        char low[sizeof(norm)];
        memcpy(low, norm, sizeof(low));
        if (rc == 0 && fold_local(low)) {
            struct suppress_entry e;
            rc = lookup(txn, s->dbi, SUPPRESS_SCOPE_GLOBAL, low, now, &e);
            if (rc == 1 && !holds_without_case(e.reason))
                rc = 0;
            if (rc == 0 && scoped) {
                rc = lookup(txn, s->dbi, scope, low, now, &e);
                if (rc == 1 && !holds_without_case(e.reason))
                    rc = 0;
            }
            if (rc == 1 && out != NULL)
                *out = e;
        }
    }
    if (rc == 0)
        rc = lookup(txn, s->dbi, SUPPRESS_SCOPE_GLOBAL, dom, now, out);
    if (rc == 0 && scoped)
        rc = lookup(txn, s->dbi, scope, dom, now, out);
    mdb_txn_abort(txn);
    if (rc == 1)
        atomic_fetch_add_explicit(&s->hits, 1, memory_order_relaxed);
    return rc;
}

long
suppress_list(struct suppress *s, const char *scope, const char *after_scope,
              const char *after_addr, size_t limit,
              int (*fn)(void *arg, const struct suppress_entry *e), void *arg)
{
    uint8_t kb[KEY_MAX];
    size_t sl = 0;
    char sc[SUPPRESS_SCOPE_MAX + 1], asc[SUPPRESS_SCOPE_MAX + 1];
    if (scope != NULL) {
        if (sup_scope_fold(scope, sc) != 0)
            return -EINVAL;
        scope = sc;
        sl = strlen(scope) + 1; /* with its NUL: the range's prefix */
    }
    if (after_scope != NULL) {
        size_t al = strlen(after_scope);
        if (al > SUPPRESS_SCOPE_MAX)
            return -EINVAL;
        for (size_t i = 0; i <= al; i++)
            asc[i] = (char)tolower((unsigned char)after_scope[i]);
        after_scope = asc;
    }
    if (after_addr != NULL && after_scope != NULL && scope != NULL) {
        /* A position in another scope than the one listed (the stats
         * socket's command takes any; sluicectl only sends back the next
         * page's). Keys sort by scope first (scope NUL address, and a
         * scope holds no NUL, so strcmp orders them as the keys): one
         * before the scope is before all of it, from its start; one after
         * it is past all of it, nothing. Positioned there, the listing
         * met another scope's key first and stopped, empty, either way. */
        int c = strcmp(after_scope, scope);
        if (c > 0)
            return 0;
        if (c < 0)
            after_addr = after_scope = NULL;
    }
    MDB_txn *txn;
    MDB_cursor *cur;
    int rc = sup_cursor_open(s, MDB_RDONLY, &txn, &cur);
    if (rc != 0)
        return rc;
    MDB_val k, v;
    bool skip_equal = false;
    if (after_addr != NULL) {
        const char *as = after_scope ? after_scope : (scope ? scope : SUPPRESS_SCOPE_GLOBAL);
        if (strlen(as) > SUPPRESS_SCOPE_MAX || strlen(after_addr) > SUPPRESS_ADDR_MAX) {
            mdb_cursor_close(cur);
            mdb_txn_abort(txn);
            return -EINVAL;
        }
        k.mv_size = sup_key_make(kb, as, after_addr);
        k.mv_data = kb;
        skip_equal = true;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    } else if (scope != NULL) {
        k.mv_size = sup_key_make(kb, scope, "");
        k.mv_data = kb;
        rc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
    } else {
        rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
    }
    uint8_t after[KEY_MAX];
    size_t afterlen = 0;
    if (skip_equal) {
        afterlen = sup_key_make(after, after_scope ? after_scope : (scope ? scope : SUPPRESS_SCOPE_GLOBAL),
                            after_addr);
    }
    long n = 0;
    struct suppress_entry e;
    for (; rc == 0; rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        if (skip_equal) {
            skip_equal = false;
            if (k.mv_size == afterlen && memcmp(k.mv_data, after, afterlen) == 0)
                continue;
        }
        if (scope != NULL && (k.mv_size < sl || memcmp(k.mv_data, scope, sl) != 0))
            break;
        if (entry_decode(&k, &v, &e) != 0)
            continue;
        n++;
        if (fn(arg, &e) != 0 || (limit != 0 && (size_t)n >= limit))
            break;
    }
    mdb_cursor_close(cur);
    mdb_txn_abort(txn);
    return rc == 0 || rc == MDB_NOTFOUND ? n : sup_mdb_errno(rc);
}

void
suppress_stats(struct suppress *s, struct suppress_stats *out)
{
    memset(out, 0, sizeof(*out));
    out->checks = atomic_load(&s->checks);
    out->hits = atomic_load(&s->hits);
    out->added = atomic_load(&s->added);
    out->removed = atomic_load(&s->removed);
    out->feed_dropped = atomic_load(&s->feed_dropped);
    MDB_txn *txn;
    if (mdb_txn_begin(s->env, NULL, MDB_RDONLY, &txn) == 0) {
        MDB_stat st;
        if (mdb_stat(txn, s->dbi, &st) == 0)
            out->entries = st.ms_entries;
        MDB_envinfo ei;
        MDB_stat es;
        if (mdb_env_info(s->env, &ei) == 0 && mdb_env_stat(s->env, &es) == 0) {
            out->map_size = ei.me_mapsize;
            out->map_used = (uint64_t)(ei.me_last_pgno + 1) * es.ms_psize;
        }
        mdb_txn_abort(txn);
    }
}

void
suppress_reply(const struct suppress *s, const char *addr, const struct suppress_entry *e,
               char *out, size_t outlen)
{
    size_t o = 0;
    const char *p = s->cfg.reply;
    if (outlen == 0)
        return;
    while (*p != '\0' && o + 1 < outlen) {
        const char *sub = NULL;
        size_t skip = 0;
        if (strncmp(p, "{addr}", 6) == 0) {
            sub = addr;
            skip = 6;
        } else if (strncmp(p, "{reason}", 8) == 0) {
            sub = suppress_reason_str(e->reason);
            skip = 8;
        }
        if (sub != NULL) {
            for (; *sub != '\0' && o + 1 < outlen; sub++)
                out[o++] = *sub;
            p += skip;
        } else {
            out[o++] = *p++;
        }
    }
    out[o] = '\0';
}
