/*
 * suppress: the suppression list. Addresses (or whole domains) that no
 * message may be sent to, per scope: "global", or a tenant's name. Each
 * entry says why (hard bounce, complaint, unsubscribe, manual), when it
 * was added, until when it holds (or for ever), and a free note (where it
 * came from: the bounce's reply, the operator, the import file).
 *
 * Checked at RCPT by the submission server (suppress_check: one LMDB read
 * transaction, no syscall); fed by the delivery code when a recipient
 * bounces with a class the config names and by the out-of-band bounce
 * and complaint listener, through notes committed with what caused them
 * in the spool (suppress_note_*, below: a worker never waits on the
 * list's disk, and a crash loses no entry), and by operators (sluicectl
 * suppress ..., the stats socket's "suppress" command: add, remove,
 * check, list, import and export of CSV).
 *
 * Keys are normalised before they are stored or looked up: the domain is
 * always lowercase; a quoted local part that needs no quotes loses them
 * ("john"@ is john@, RFC 5321 4.1.2) and one that is no dot-string gets
 * them (user.@ is "user."@, as it is sent); the rest of the local part
 * only as [suppress] says (lowercase, +tag stripped, dots of Gmail
 * addresses dropped), all off by default.
 * An entry for "@example.com" (or "example.com") suppresses the domain.
 * Scopes compare without case, as tenant names do: "ACME", "Acme" and
 * "acme" are one list, stored as "acme" (a list stored under capitals
 * by an earlier version is folded into it at open), so that a tenant the
 * config names later, in whatever case, finds the entries an operator or
 * a VERP token gave under its name before.
 *
 * Threading: suppress_open/_close on one thread (the engine's main
 * thread). Everything else from any thread at once: checks and lists are
 * LMDB read transactions (one reader slot per thread), writes are
 * serialized (the writer thread for feeds, a mutex for the rest).
 */
#ifndef SLUICE_ENGINE_SUPPRESS_H
#define SLUICE_ENGINE_SUPPRESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/conf.h"
#include "engine/classify.h"

#define SUPPRESS_SCOPE_GLOBAL "global"
#define SUPPRESS_SCOPE_MAX    64   /* octets of a scope (tenant) name */
#define SUPPRESS_ADDR_MAX     320  /* local part 64, "@", domain 255 */
#define SUPPRESS_NOTE_MAX     400  /* octets of a note; longer ones are cut */
#define SUPPRESS_FEED_MAX     65536 /* feeds waiting for the writer thread; more are dropped */

enum suppress_reason {
    SUPPRESS_HARD_BOUNCE = 0,
    SUPPRESS_COMPLAINT,
    SUPPRESS_UNSUBSCRIBE,
    SUPPRESS_MANUAL,
    SUPPRESS_REASON_COUNT
};

/* [suppress] */
struct suppress_config {
    bool enabled;
    char *path;               /* owned; unset: <[queue] path>/suppress (resolved at load) */
    uint64_t map_size;        /* bytes */
    bool lowercase_local;     /* fold the local part to lowercase */
    bool strip_plus;          /* drop "+tag" from the local part */
    bool gmail_dots;          /* drop dots from local parts at gmail.com and googlemail.com */
    char *reply;              /* owned: the RCPT reply, with {addr} and {reason} */
    char *on_invalid_recipient; /* owned: as written: off, forever or a duration */
    char *on_complaint;         /* owned: as written */
    /* derived at load (suppress_config_check): -1 off, 0 for ever, else ms */
    int64_t invalid_recipient_ttl;
    int64_t complaint_ttl;
};

/* The key table of struct suppress_config. */
extern const struct conf_key suppress_conf_keys[];

/* After the keys are set: check the reply and the policies, fill the
 * derived fields, and make path <spool>/suppress when unset. Returns 0 or
 * -EINVAL with one line in err. */
int suppress_config_check(struct suppress_config *cfg, const char *spool, char *err,
                          size_t errlen);

/* One entry as stored. */
struct suppress_entry {
    char scope[SUPPRESS_SCOPE_MAX + 1];
    char addr[SUPPRESS_ADDR_MAX + 1]; /* normalised: "local@domain" or "@domain" */
    enum suppress_reason reason;
    int64_t added_ms;   /* Unix ms */
    int64_t expires_ms; /* Unix ms; 0: never */
    char note[SUPPRESS_NOTE_MAX + 1];
};

struct suppress_stats {
    uint64_t entries;   /* in the list now (expired ones not yet purged included) */
    uint64_t checks;    /* suppress_check calls */
    uint64_t hits;      /* ... that found an entry */
    uint64_t added;     /* entries written (add, feed, import) */
    uint64_t removed;
    uint64_t feed_dropped; /* entries lost: a bounce's or complaint's that could not be made
                            * (suppress_note_*), a damaged note skipped, a feed refused
                            * (writer queue full) or whose write failed */
    uint64_t map_size, map_used;
};

struct suppress;
struct queue;

const char *suppress_reason_str(enum suppress_reason r);
/* Name (case-insensitive) to reason: 0 or -EINVAL. */
int suppress_reason_parse(const char *s, enum suppress_reason *out);

/* Open (creating the directory and the environment when missing) and
 * start the writer thread. Returns 0 and *out (free with suppress_close)
 * or a negative code with a message for the operator in err. */
int suppress_open(const struct suppress_config *cfg, struct suppress **out, char *err,
                  size_t errlen);
/* Commit what feeds are waiting, stop the writer thread, close. NULL is fine. */
void suppress_close(struct suppress *s);

/* Normalise addr as the list stores it: the domain in lowercase, in
 * A-labels when written in U-labels (as delivery has it). Returns 0, or
 * -EINVAL (no domain, empty or over-long parts, control characters, a
 * space outside a quoted local part: "a b"@x.test is one address). */
int suppress_normalize(const struct suppress *s, const char *addr, char *out, size_t outlen);
/* The scope (NULL: global) as the list stores it: in lowercase (see
 * above). Returns 0, or -EINVAL (empty, too long, a space, a control
 * character, ',' or '"'; or outlen too small). */
int suppress_normalize_scope(const char *scope, char *out, size_t outlen);

/*
 * Add (or replace) the entry of addr ("user@example.com"; "@example.com"
 * or "example.com" for the whole domain) in scope (NULL: global);
 * expires_at is Unix ms, 0 for never; note may be NULL. Committed (synced)
 * before it returns: it blocks on the disk, so workers use suppress_feed.
 * Returns 0, -EINVAL (bad address or scope: one RCPT's syntax refuses
 * too), -EILSEQ (an address not in UTF-8: no recipient would match it),
 * -ENOSPC (map full), -EIO.
 */
int suppress_add(struct suppress *s, const char *scope, const char *addr,
                 enum suppress_reason reason, int64_t expires_at, const char *note);
/* The same, queued to the writer thread, which commits every feed waiting
 * in one transaction. Never blocks on the disk, and a crash before that
 * commit loses it: what must not be lost is a note (below). Returns 0,
 * -EINVAL, -EILSEQ, or -EAGAIN when SUPPRESS_FEED_MAX feeds are waiting (counted
 * as dropped). */
int suppress_feed(struct suppress *s, const char *scope, const char *addr,
                  enum suppress_reason reason, int64_t expires_at, const char *note);
/* A recipient bounced with class cls and reply text (may be NULL). Adds
 * a hard_bounce entry when [suppress] says so for the class
 * (on_invalid_recipient), through suppress_feed (the delivery code makes
 * it a note instead: suppress_note_bounce). s may be NULL (the list is
 * off). Returns 1 when an entry was queued, else 0. */
int suppress_on_bounce(struct suppress *s, const char *tenant, const char *addr,
                       enum bounce_class cls, const char *text);
/* The expiry suppress_feed/_add get for a complaint under the config
 * (Unix ms, 0 never), or -1 when complaints are not to be suppressed. */
int64_t suppress_complaint_expiry(const struct suppress *s, int64_t now_ms);

/*
 * Notes: entries that must not be lost. A feed is committed by the writer
 * thread some time after the outcome that caused it is in the spool, and
 * a kill -9 between the two lost it: a hard bounce mailed again. So the
 * delivery code and the bounce listener make the entry a note
 * (suppress_note_*), committed with the outcome in the spool's own
 * transaction (queue.h, "notes"); the writer thread copies the notes to
 * the list and then trims them from the spool, and suppress_attach_queue
 * does so at start with what a crash left there. A note is entry enough:
 * its key and value as the list stores them.
 */
#define SUPPRESS_NOTE_BYTES                                                                    \
    (4 + SUPPRESS_SCOPE_MAX + 2 + SUPPRESS_ADDR_MAX + 20 + SUPPRESS_NOTE_MAX)

/* The note of a bounce of class cls (suppress_on_bounce's policy) into
 * buf (SUPPRESS_NOTE_BYTES). Returns its length, 0 when the config keeps
 * no entry for it (s NULL: the list is off), or -EINVAL (an address the
 * list cannot hold) or -ENOMEM: that entry is lost, and counted in
 * feed_dropped (the caller logs it). */
int suppress_note_bounce(struct suppress *s, const char *tenant, const char *addr,
                         enum bounce_class cls, const char *text, void *buf);
/* The note of a complaint about addr for tenant (NULL or "": global),
 * under on_complaint, into buf. Returns as suppress_note_bounce. */
int suppress_note_complaint(struct suppress *s, const char *tenant, const char *addr,
                            void *buf);
/* Copy the notes the spool q holds to the list, trim them, and from now
 * on do so on the writer thread after every commit that writes some.
 * The main thread, once, after suppress_open, before any outcome. Returns
 * how many notes were copied now (what the last run left), or -errno
 * when none could be (the list's write failed: the writer tries them
 * again, as any failed copy). */
long suppress_attach_queue(struct suppress *s, struct queue *q);
/* The last copy, and no more: before queue_close, after every writer of
 * notes has stopped. Its trim waits for the spool's answer however long
 * (a slow one is said: event=suppress_notes_trim_slow). NULL is fine. */
void suppress_detach_queue(struct suppress *s);
/* As suppress_detach_queue, for a spool known to answer nothing (a stop
 * that cut its wait for it): the notes are copied to the list, not
 * trimmed from the spool (no request waits on it; the next start copies
 * them again, event=suppress_notes_untrimmed); a trim the list's writer
 * is waiting for is given up (event=suppress_notes_trim_left: its port
 * kept to suppress_close). */
void suppress_detach_queue_stuck(struct suppress *s);

/* Remove the entry of addr in scope (NULL: global). Returns 0, -ENOENT
 * when there is none, -EINVAL, -EIO. */
int suppress_remove(struct suppress *s, const char *scope, const char *addr);

/*
 * Is addr suppressed for tenant scope (NULL or "global": the global list
 * only)? Looks up the address, then its domain; each in the global list,
 * then the scope's. Expired entries do not count. Returns 1 and fills out
 * (may be NULL) with the entry found, 0 when not suppressed, -errno on
 * error (a bad address is not suppressed: 0).
 */
int suppress_check(struct suppress *s, const char *scope, const char *addr,
                   struct suppress_entry *out);

/* Call fn for up to limit entries (0: all) of scope (NULL: every scope),
 * in key order, starting after (after_scope, after_addr) when after_addr
 * is given (after_scope NULL: scope's, or the global list's). Keys sort
 * by scope first: an after_scope that sorts before scope starts at
 * scope's first entry, one after it lists nothing. fn returns 0 to go on, non-zero to stop. Returns the number
 * of entries passed to fn, or -errno. */
long suppress_list(struct suppress *s, const char *scope, const char *after_scope,
                   const char *after_addr, size_t limit,
                   int (*fn)(void *arg, const struct suppress_entry *e), void *arg);

/* CSV, one entry a line: address,scope,reason,added,expires,note (RFC 4180
 * quoting; times ISO 8601 UTC "2026-01-31T12:00:00Z" or Unix seconds,
 * empty: now / never; scope empty: global; reason empty: manual). A first
 * line that starts with "address," is a header. */
struct suppress_import_result {
    uint64_t lines, imported, skipped; /* skipped: lines in error */
    uint64_t entries;      /* the file's entries: its keys (scope and address), each
                            * counted once however many lines name it (if counted) */
    bool counted;          /* the file read and sorted whole, entries counted: false
                            * when cut before (-ECANCELED: nothing written) or failed */
    uint64_t not_imported; /* cut (-ECANCELED) once counted: the entries not written,
                            * entries - imported; cut before counted: 0 (none of the
                            * file's entries written, and they are not all known) */
    unsigned long first_bad_line;      /* 0: none */
    char first_error[160];
};
/* Read in whole, sorted, written in large transactions (MDB_APPEND when
 * the keys come after everything stored). Entries of the file replace
 * stored ones with the same key (the scope folded as every scope is), so
 * the same file imported again stores the same entries (an empty added
 * taken as the time of that import); lines in error are skipped and
 * counted. stop (NULL: never) is asked between transactions, every
 * 65,536 lines while reading and every 65,536 records sorted or merged
 * while sorting, with no lock held: true ends the import there (the
 * stop: a million lines held it for their whole length), what was
 * committed kept, the first entries in scope and address order, and
 * -ECANCELED returned. Returns 0, or -errno (nothing after the failing
 * batch is written). */
int suppress_import_csv(struct suppress *s, FILE *in, bool (*stop)(void *arg), void *arg,
                        struct suppress_import_result *res);
/* Write entries (of scope, NULL: all) with a header line. Returns the
 * number written, or -errno. */
long suppress_export_csv(struct suppress *s, FILE *out, const char *scope);

/*
 * Move every entry of scope from into scope to: the list a tenant's
 * complaints went to while no configured tenant had its tag
 * ("tag:XXXXXXXX", oob.h) becomes its own once the config names it again
 * (engine.c, at start and at each reload). Where to already holds an
 * entry for the address, the one that holds longer stays (for ever beats
 * any expiry). Written in transactions of a bounded size: what a crash
 * leaves under from moves at the next call. Returns the number of
 * entries moved (those dropped for a longer one included), or -errno
 * (-EINVAL: a bad scope, or from and to the same).
 */
long suppress_move_scope(struct suppress *s, const char *from, const char *to);

/* Delete expired entries. Returns how many, or -errno. */
long suppress_purge(struct suppress *s, int64_t now_ms);

/* Wait until every feed queued before the call is committed, and every
 * note the spool held then is in the list (tests, shutdown). */
void suppress_sync(struct suppress *s);

void suppress_stats(struct suppress *s, struct suppress_stats *out);

/* The configured RCPT reply for an entry found for addr, into out. */
void suppress_reply(const struct suppress *s, const char *addr, const struct suppress_entry *e,
                    char *out, size_t outlen);

#endif
