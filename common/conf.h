/*
 * conf: typed configuration keys. Each module describes its keys in a
 * table of struct conf_key (name, type, where in the module's struct,
 * bounds, default as text, one line of help); this file parses values of
 * every type, applies defaults through the same parser, and frees owned
 * strings. Reading the INI file and mapping sections to tables is the
 * engine's job (engine/config.c).
 *
 * Threading: pure functions; no global state.
 */
#ifndef SLUICE_COMMON_CONF_H
#define SLUICE_COMMON_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum conf_type {
    CONF_BOOL,     /* bool: yes/no, true/false, on/off, 1/0 */
    CONF_UINT,     /* unsigned: decimal, bounded by min..max */
    CONF_SIZE,     /* uint64_t bytes: 512, 64K, 10M, 2G (powers of 1024) */
    CONF_DURATION, /* uint64_t milliseconds: 250ms, 30s, 5m, 2h, 3d */
    CONF_RATE,     /* struct conf_rate: 50/s, 3000/min, 100/h, 0 or unlimited */
    CONF_STRING,   /* char * (owned by the struct; freed by conf_free) */
    CONF_ENUM,     /* int: index into choices[] */
    CONF_DURATIONS /* struct conf_durations: "5m, 10m, 1h" */
};

/* A rate of count events per per_ms milliseconds; count 0 means unlimited. */
struct conf_rate {
    uint32_t count;
    uint32_t per_ms;
};

#define CONF_MAX_DURATIONS 16
struct conf_durations {
    uint32_t n;
    uint64_t ms[CONF_MAX_DURATIONS];
};

struct conf_key {
    const char *name;
    enum conf_type type;
    size_t offset;             /* into the module's struct */
    uint64_t min, max;         /* UINT/SIZE/DURATION bounds; STRING max length (0: 4096) */
    const char *def;           /* default, parsed like a config value; NULL: zero/NULL */
    const char *help;          /* one line for --config-reference */
    const char *const *choices; /* CONF_ENUM: NULL-terminated */
};

/* Set one key from its text. Returns 0, -ENOENT when name is not in keys,
 * or -EINVAL with a message in err ("expected a size like 10M, got 'x'"). */
int conf_set(const struct conf_key *keys, void *obj, const char *name, const char *value,
             char *err, size_t errlen);
/* Apply every default. Returns 0 or -EINVAL (a bad default is a bug; the
 * message says which key). */
int conf_defaults(const struct conf_key *keys, void *obj, char *err, size_t errlen);
/* Free the owned strings of obj and zero them. */
void conf_free(const struct conf_key *keys, void *obj);
/* Deep-copy obj into dst (strings duplicated). Returns 0 or -ENOMEM. */
int conf_copy(const struct conf_key *keys, void *dst, const void *src, size_t size);
const struct conf_key *conf_find(const struct conf_key *keys, const char *name);
/* For an unknown name: the closest of the n names cand (by edit distance,
 * a swap of two neighbours counting as one edit, case ignored), when it
 * is close enough to be a typo (at most 1 edit for a name of up to 4
 * octets, 2 up to 8, 3 beyond); else NULL. Borrowed from cand. */
const char *conf_suggest_name(const char *name, const char *const *cand, size_t n);
/* The same among the names of keys. */
const char *conf_suggest(const struct conf_key *keys, const char *name);
/* Format the value of a key (for --config-reference and stats). */
void conf_format(const struct conf_key *key, const void *obj, char *out, size_t outlen);
/* "1..65535", "1M..", "off, optional, required", "up to 253 characters"
 * or "" (for the reference and for out-of-range messages). */
void conf_format_range(const struct conf_key *key, char *out, size_t outlen);
const char *conf_type_str(enum conf_type type);

int conf_parse_bool(const char *s, bool *out);
int conf_parse_uint(const char *s, uint64_t *out);
int conf_parse_size(const char *s, uint64_t *out);
int conf_parse_duration(const char *s, uint64_t *ms);
int conf_parse_rate(const char *s, struct conf_rate *out);
int conf_parse_durations(const char *s, struct conf_durations *out);

#define CONF_END {NULL, 0, 0, 0, 0, NULL, NULL, NULL}

#endif
