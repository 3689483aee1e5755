/*
 * stats_int.h: what engine/stats.c and engine/stats_render.c share (not a
 * public header).
 */
#ifndef SLUICE_ENGINE_STATS_INT_H
#define SLUICE_ENGINE_STATS_INT_H

#include <stddef.h>
#include <stdint.h>

#include "common/json.h"
#include "engine/stats.h"

#ifndef SLUICE_VERSION
#define SLUICE_VERSION "unknown"
#endif

/* struct json doubles as the growable text buffer: text_printf() appends
 * without any JSON punctuation (the Prometheus text, HTTP headers). */
void text_printf(struct json *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The array member key of n domains (the "domains" answer's shape). */
void render_domain_array(struct json *j, const char *key, const struct stats_domain *d, size_t n,
                         uint64_t now_ms);

#endif
