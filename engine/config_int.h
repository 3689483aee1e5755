/*
 * config_int.h: what engine/config.c (the reader) and
 * engine/config_keys.c (the key tables) share. Not a public header.
 */
#ifndef SLUICE_ENGINE_CONFIG_INT_H
#define SLUICE_ENGINE_CONFIG_INT_H

#include <stddef.h>

#include "common/conf.h"
#include "engine/config.h"

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

#endif
