/*
 * shaping: traffic shaping that reacts to what receivers say, on every
 * node. Two halves:
 *
 *   - rules (shaping_conf.c): reply patterns (basic code, enhanced code,
 *     a POSIX regex on the text; scoped to a destination group, an MX
 *     pattern or a recipient domain) mapped to an action for a duration.
 *     A rule set is built while the config loads (the operator's file
 *     first, then the shipped etc/shaping.rules) and immutable after:
 *     shaping_rules_match() runs on any thread.
 *   - actions (shaping.c): what the rules fired, here or on another node:
 *     suspend, back off, cap connections, lower the message rate, bounce
 *     what waits or only count, for the source
 *     that was refused at a destination group, the whole group, or a
 *     recipient domain, until a wall-clock time. One table per process,
 *     under a lock, read by the workers when they open a connection or
 *     start a transaction (a lock-free count keeps that free while no
 *     action is active). A keeper thread expires them, keeps them in a
 *     file of the spool (shaping.state: they survive a restart) and shares
 *     them through Redis (see shaping.c) so that every node applies them.
 *
 * Threading: shaping_rules_* as said above; struct shaping is
 * thread-safe (workers, the stats thread, the keeper).
 */
#ifndef SLUICE_ENGINE_SHAPING_H
#define SLUICE_ENGINE_SHAPING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define SHAPING_NAME_MAX    64  /* rule and group names */
#define SHAPING_TEXT_MAX    200 /* of a trigger reply kept with an action */
#define SHAPING_PATTERNS_MAX 16 /* MX patterns per group */
#define SHAPING_ACTIONS_MAX 4096 /* active at once, every node's */

enum shaping_kind {
    SHAPING_SUSPEND,  /* no new connection, open ones say goodbye */
    SHAPING_BACKOFF,  /* one connection per destination and node, one transaction each */
    SHAPING_CAP,      /* at most value connections per destination and node */
    SHAPING_COUNT,    /* only counted (and shown) */
    SHAPING_RATE,     /* the message rate lowered: value per per_ms (an absolute rate), or
                       * per_ms 0 and value in permille of the configured rate */
    SHAPING_BOUNCE,   /* what waits for the scope is bounced (as an operator bounce) */
    SHAPING_KIND_COUNT
};

enum shaping_scope {
    SHAPING_SCOPE_SOURCE, /* the source address refused, at the rule's destination group */
    SHAPING_SCOPE_GROUP,  /* every source, at the destination group (the site) */
    SHAPING_SCOPE_DOMAIN, /* the recipient domain, every source */
    SHAPING_SCOPE_TENANT, /* the tenant whose mail drew the reply, at the destination group
                           * (suspend, rate, bounce: its jobs are set aside, slowed or
                           * bounced, the others go on) */
    SHAPING_SCOPE_COUNT
};

const char *shaping_kind_str(enum shaping_kind k);
const char *shaping_scope_str(enum shaping_scope s);

/* The argument of action=rate:ARG: an absolute rate ("10/s", "600/min",
 * "100/h": *value per *per_ms) or a fraction of the configured rate
 * ("0.5", "50%": *value permille, *per_ms 0), 1..999 permille. Returns 0
 * or -EINVAL. */
int shaping_rate_parse(const char *arg, unsigned *value, unsigned *per_ms);
/* "10/s", "600/min", "50%" ... of an action's value and per_ms, in buf. */
const char *shaping_rate_str(unsigned value, unsigned per_ms, char *buf, size_t cap);

/* ---- rules (shaping_conf.c) ---- */

struct shaping_rules;

/* A reply to match, and where it was met. */
struct shaping_reply {
    unsigned code;                 /* 421 */
    unsigned enh_cls, enh_subject, enh_detail; /* 4.7.0; cls 0: none */
    const char *text;              /* the reply text (at most SMTP_REPLY_TEXT_MAX used) */
    const char *mx;                /* the MX host's name, or NULL */
    const char *domain;            /* the recipient domain, or NULL */
};

/* A rule as loaded. */
struct shaping_rule_info {
    const char *name;
    const char *group;  /* the destination group it is scoped to, or NULL (any host) */
    enum shaping_kind kind;
    enum shaping_scope scope;
    unsigned value;     /* SHAPING_CAP: connections; SHAPING_RATE: see enum shaping_kind */
    unsigned per_ms;    /* SHAPING_RATE */
    uint64_t for_ms;
    const char *origin; /* "FILE:LINE" */
};

/* A rule set with one reference. A config holds one; a reload whose rules
 * are the same as the running config's shares that set instead of keeping
 * a copy of its own (config_share_unchanged), so the set lives as long as
 * its last config. */
struct shaping_rules *shaping_rules_new(void);
struct shaping_rules *shaping_rules_ref(struct shaping_rules *r);
/* Drop a reference; the last frees. Returns NULL; NULL is fine. */
struct shaping_rules *shaping_rules_unref(struct shaping_rules *r);
/* Were a and b built from the same texts under the same names, in the
 * same order (so they hold the same rules)? Both finished. */
bool shaping_rules_same(const struct shaping_rules *a, const struct shaping_rules *b);
/* Add the groups and rules of text (a rules file's contents; origin names
 * it in messages). The first definition of a group wins, so an
 * operator's file loaded first redefines a shipped group. Returns 0, or
 * -EINVAL with "ORIGIN:LINE: why" in err, -ENOMEM. */
int shaping_rules_add_text(struct shaping_rules *r, const char *text, const char *origin,
                           char *err, size_t errlen);
/* ... from a file. */
int shaping_rules_add_file(struct shaping_rules *r, const char *path, char *err, size_t errlen);
/* Build the index; no rule is added after. Returns 0 or -ENOMEM. */
int shaping_rules_finish(struct shaping_rules *r);
unsigned shaping_rules_count(const struct shaping_rules *r);
unsigned shaping_rules_groups(const struct shaping_rules *r);
const struct shaping_rule_info *shaping_rule(const struct shaping_rules *r, unsigned i);
/* The first rule (in load order) that rep matches, or -1. Costs one look
 * at the rules of rep's code and group whose literal (the regex's longest
 * fixed run) occurs in the text, and one regexec for each of those. */
int shaping_rules_match(const struct shaping_rules *r, const struct shaping_reply *rep);
/* The index of the group host belongs to (the first defining it), or -1. */
int shaping_rules_group_of(const struct shaping_rules *r, const char *host);
/* Does host belong to group name (false when no such group)? */
bool shaping_rules_in_group(const struct shaping_rules *r, const char *group, const char *host);
const char *shaping_rules_group_name(const struct shaping_rules *r, unsigned g);
/* Hits of rule i since the rule set was loaded (atomic: any thread); a
 * reload that leaves the rules as they were shares the set, and its
 * counts go on. */
uint64_t shaping_rule_hit_count(const struct shaping_rules *r, unsigned i);
void shaping_rule_hit(const struct shaping_rules *r, unsigned i);

/* The shipped rule set (etc/shaping.rules, embedded at build time). */
extern const char shaping_builtin_rules[];
extern const size_t shaping_builtin_rules_len;

/* ---- actions (shaping.c) ---- */

struct shaping_action {
    char id[17];                    /* 16 hex: the same rule and scope give the same id
                                     * on every node */
    enum shaping_kind kind;
    enum shaping_scope scope;
    unsigned value;                 /* SHAPING_CAP, SHAPING_RATE (see enum shaping_kind) */
    unsigned per_ms;                /* SHAPING_RATE: 0 when value is a fraction */
    char source[64];                /* SHAPING_SCOPE_SOURCE: the address ("" default) */
    char group[SHAPING_NAME_MAX];   /* SOURCE and GROUP scopes */
    char domain[256];               /* SHAPING_SCOPE_DOMAIN */
    char tenant[64];                /* SHAPING_SCOPE_TENANT (with group) */
    char rule[SHAPING_NAME_MAX];    /* the rule, or "operator" */
    char trigger[SHAPING_TEXT_MAX]; /* the reply that fired it */
    char origin[64];                /* the node it was fired on */
    uint64_t started_ms, until_ms;  /* Unix ms */
};

struct shaping;
struct shaping_opts {
    const char *state_path;  /* where active actions are kept (NULL: memory only) */
    const char *node;        /* this node's name, for origin */
    const char *redis_url;   /* NULL: local only */
    const char *redis_password;
    const char *key_prefix;  /* "sluice:" */
    uint64_t redis_timeout_ms;
    unsigned stream_max;     /* entries the Redis stream keeps */
    /* Told of each action that starts or ends on this node (why: how it
     * started, "rule", "redis", "operator", ...; or why it ended,
     * "expired", "cleared", "cleared_elsewhere"), on any thread, under
     * the table's lock: quick, and never calling back. NULL: none. */
    void (*on_event)(void *arg, const struct shaping_action *a, bool started, const char *why);
    void *arg;
};

/* Load the state file, start the keeper thread. Returns 0 or a negative
 * code with a message in err. */
int shaping_open(const struct shaping_opts *o, struct shaping **out, char *err, size_t errlen);
/* Stop the keeper (the state is written), free. Returns NULL. */
struct shaping *shaping_close(struct shaping *s);

/* A reply met on a worker: when rule fires, its action starts (or is
 * extended) for scope; rules is borrowed for the call. Returns the rule's
 * index, or -1. */
int shaping_on_reply(struct shaping *s, const struct shaping_rules *r,
                     const struct shaping_reply *rep, const char *source, const char *tenant);

/* What the active actions say about a connection from source (the
 * address, "" for the node's default) to MX host mx for domain at
 * now_ms. */
struct shaping_verdict {
    bool suspended;     /* no new connection, no new transaction */
    unsigned cap;       /* connections per destination (0: no cap) */
    bool one_txn;       /* backoff: one transaction per connection */
    bool bounce;        /* bounce: what waits is bounced */
    /* rate, of the group- and domain-scope actions (every source's mail
     * to the destination): */
    unsigned rate_permille; /* the lowest fraction of the configured message rate
                             * (0: none) */
    uint64_t rate_interval_ns; /* the longest spacing of messages an absolute rate
                                * asks for (0: none) */
    /* rate, of the source-scope actions: source's own mail to the hosts
     * of src_rate_group only (the other sources are not slowed) */
    unsigned src_rate_permille;
    uint64_t src_rate_interval_ns;
    char src_rate_group[SHAPING_NAME_MAX]; /* the group of the slowest such action */
    uint64_t recheck_ms; /* Unix ms by which to ask again (an action ends or may be cleared) */
};
/* Fills v and returns whether any action applies. Lock-free while no
 * action is active. */
bool shaping_check(struct shaping *s, const struct shaping_rules *r, const char *source,
                   const char *mx, const char *domain, uint64_t now_ms, struct shaping_verdict *v);

/* What the tenant-scope actions say about tenant's mail to MX host mx. */
struct shaping_tenant_verdict {
    bool held;              /* suspend: its jobs are set aside */
    bool bounce;            /* bounce: its jobs are bounced */
    unsigned rate_permille; /* rate: as in struct shaping_verdict (0: none) */
    uint64_t rate_interval_ns;
    char rate_group[SHAPING_NAME_MAX]; /* the group of the slowest rate */
    uint64_t recheck_ms;    /* Unix ms by which to ask again */
};
/* Fills v and returns whether any tenant action applies. Lock-free while
 * no action is active. */
bool shaping_tenant_check(struct shaping *s, const struct shaping_rules *r, const char *tenant,
                          const char *mx, uint64_t now_ms, struct shaping_tenant_verdict *v);
/* Is tenant's mail to MX host mx suspended (a tenant-scope action)? Then
 * *recheck_ms: Unix ms by which to ask again. Lock-free while no action
 * is active. */
bool shaping_tenant_held(struct shaping *s, const struct shaping_rules *r, const char *tenant,
                         const char *mx, uint64_t now_ms, uint64_t *recheck_ms);

/* Told of each bounce action that starts on this node (a rule's, an
 * operator's, another node's, or one read from the state file), on the
 * keeper thread, outside the table's lock, so that it may bounce what
 * waits in the spool for the scope (blocking reads are fine there). Until
 * a hook is set the actions wait for it; NULL unsets it (the hook is not
 * running when this returns). */
void shaping_set_bounce_hook(struct shaping *s,
                             void (*fn)(void *arg, const struct shaping_action *a), void *arg);

/* Operators: an action by hand (rule "operator"), cluster-wide. Given
 * again (the same kind, scope and names: the same id), it sets the
 * action's end and value (cap:N, rate:R), shorter or longer. */
int shaping_add(struct shaping *s, const struct shaping_action *a);
/* Clear the action that shaping_add(a) made (the same kind, scope and
 * names; rule "operator" when a's is empty), cluster-wide. Returns 1, or
 * 0 when there is none. Group "*" (in shaping_add too): every
 * destination (an operator's `sluicectl suspend`). */
int shaping_remove(struct shaping *s, const struct shaping_action *a);
/* Clear the actions that sel names: an id, "all", or SCOPE=NAME
 * (source=ADDR, group=G, domain=D, tenant=T, rule=R); cluster-wide. Returns how many. */
int shaping_clear(struct shaping *s, const char *sel);
/* A copy of the active actions (malloc'ed, the caller frees) in *out. */
int shaping_list(struct shaping *s, struct shaping_action **out, size_t *n);

struct shaping_stats {
    uint64_t active[SHAPING_KIND_COUNT];
    uint64_t started, ended, hits, published, received;
    uint64_t ignored; /* distinct actions (ids) of a kind or scope unknown here (a newer
                       * node's), each counted once however often it is read */
    uint64_t outbox;  /* changes waiting for Redis: at most one per action id */
    uint64_t outbox_dropped; /* changes dropped: more ids than that waited (Redis away) */
    bool redis_on, redis_up;
};
void shaping_stats(struct shaping *s, struct shaping_stats *out);

/* Lines of the state file and the Redis values: one action as text
 * (tab-separated key=value) and back. Parsing returns 0, -EINVAL for a
 * line that is not an action, or -ENOTSUP for an action of a kind or
 * scope this node does not know (a newer node's: ignored, never read as
 * another). */
int shaping_action_format(const struct shaping_action *a, char *buf, size_t cap);
int shaping_action_parse(const char *line, struct shaping_action *a);

#endif
