/*
 * config_int.h: what engine/config.c (the reader), engine/config_check.c
 * (what is done once the file is read) and engine/config_keys.c (the key
 * tables) share. Not a public header.
 */
#ifndef SLUICE_ENGINE_CONFIG_INT_H
#define SLUICE_ENGINE_CONFIG_INT_H

#include <stddef.h>
#include <stdio.h>

#include "common/conf.h"
#include "engine/config.h"
#include "engine/events.h"

struct section {
    const char *name;
    const char *help;
    const struct conf_key *keys;
    size_t offset; /* into struct config */
    size_t size;   /* of the module's struct */
};

/* The sections, in the order --config-reference lists them. */
#define NSECTIONS 13
extern const struct section config_sections[NSECTIONS];
/* The keys of the sections that repeat ([domain NAME], [mx PATTERN],
 * [source ADDRESS], [pool NAME], [tenant NAME]). */
extern const struct conf_key config_domain_keys[];
extern const struct conf_key config_mx_keys[];
extern const struct conf_key config_source_keys[];
extern const struct conf_key config_pool_keys[];
extern const struct conf_key config_tenant_keys[];

/* ---- the reader's state (config.c), finished by config_check.c ---- */

#define MAX_KEYS 64

struct raw_value {
    unsigned key;  /* index into config_domain_keys */
    unsigned line;
    char *value;   /* owned */
};

struct domain_build {
    char *name;               /* owned until moved into the policy */
    unsigned line;
    struct raw_value *values; /* owned */
    unsigned nvalues, cap;
};

/* A [dkim DOMAIN SELECTOR] section as read; its key is loaded in finish(),
 * once [dkim] (which may come later) is known. */
struct dkim_build {
    char *domain, *selector; /* owned */
    unsigned line;
    struct dkim_sig_config sc;
    unsigned key_line[8];    /* per dkim_sig_conf_keys entry */
};

struct parse {
    const char *path;
    FILE *errs;
    FILE *in;
    char *buf;               /* owned: the line being handed to inih, with its line end */
    size_t buf_len, buf_off; /* its length; how much of it inih has taken */
    int read_err;            /* errno of a failed read, 0 none */
    unsigned nsyntax;        /* lines that inih cannot parse, reported */
    unsigned nerrors;
    unsigned line;           /* of the line inih is handling */
    unsigned header_line;    /* of the last [section] header */
    struct config *cfg;

    int sec;                 /* index into config_sections, -1 none, -2 domain, -3 unknown */
    struct domain_build *dom;
    unsigned set_line[NSECTIONS][MAX_KEYS];

    struct domain_build *doms; /* owned */
    unsigned ndoms, domcap;

    struct mx_policy **lim_v; /* the [mx] or [source] section being read: (*lim_v)[lim_i] */
    unsigned lim_i;
    struct lim_set {          /* keys set in [mx] and [source] config_sections, with their line */
        struct mx_policy **v;
        unsigned i, key, line;
    } *lim_set;               /* owned */
    unsigned nlim_set, lim_set_cap;

    struct dkim_build *dkims; /* owned */
    unsigned ndkims;
    struct dkim_build *dkim;  /* the one being read */
    unsigned ev_i; /* the [events] section being read: cfg->events[ev_i] */
    unsigned ev_set_line[EVENTS_SINKS_MAX][MAX_KEYS]; /* where each key of each was set */
    unsigned named_i; /* the [pool] or [tenant] section being read */
    unsigned warmup_i; /* the [warmup] section being read: cfg->warmups[warmup_i] */
};

/* Report an error of the file at line (0: none), counted in p->nerrors. */
void __attribute__((format(printf, 3, 4)))
config_err(struct parse *p, unsigned line, const char *fmt, ...);
/* Once the whole file is read without error: apply, build and check what
 * depends on more than one key or section. 0, or -ENOMEM (errors are
 * counted in p->nerrors). */
int config_finish(struct parse *p);
/* A host or domain name as a config may give one (LDH and _ labels). */
bool config_valid_domain_name(const char *s);
/* Free what the reader built that did not move into p->cfg. */
void config_free_builds(struct parse *p);

#endif
