/*
 * stats_int.h: what engine/stats.c and the files split from it
 * (stats_cmd.c, stats_listen.c, stats_render.c, stats_metrics.c) share
 * (not a public header).
 */
#ifndef SLUICE_ENGINE_STATS_INT_H
#define SLUICE_ENGINE_STATS_INT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

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

/* Listen on the Unix socket path (mode: its permissions), into *fd, with
 * the file's *dev and *ino (so that only that file is removed at exit);
 * on HOST:PORT or [ADDR]:PORT, into *fd with the port bound in *port
 * (engine/stats_listen.c). 0, or a negative code with a message in err. */
int stats_listen_unix(const char *path, unsigned mode, int *fd, dev_t *dev, ino_t *ino, char *err,
                      size_t errlen);
int stats_listen_http(const char *spec, int *fd, unsigned *port, char *err, size_t errlen);

/* An error answer of the line protocol: {"ok":false,"error":msg}. */
static inline void
stats_answer_error(struct json *out, const char *msg)
{
    json_obj_begin(out);
    json_kbool(out, "ok", false);
    json_kstr(out, "error", msg);
    json_obj_end(out);
}

#endif
