/*
 * stats_int.h: what engine/stats.c and the files split from it
 * (stats_cmd.c, stats_http.c, stats_listen.c, stats_render.c,
 * stats_metrics.c) share
 * (not a public header).
 */
#ifndef SLUICE_ENGINE_STATS_INT_H
#define SLUICE_ENGINE_STATS_INT_H

#include <stdbool.h>
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

/* engine/stats_http.c. What an HTTP answer shows, asked of the stats
 * thread: status.json's body written into j; the Prometheus text
 * (malloc'd, the caller frees it), or NULL when out of memory. */
struct stats_http_views {
    void *arg; /* borrowed: passed to both */
    void (*status)(void *arg, struct json *j);
    char *(*metrics)(void *arg);
};
/* The request in[0..len), whole (its blank line seen), answered into out:
 * status line, headers and body. */
void stats_http_answer(const struct stats_http_views *v, const char *in, size_t len,
                       struct json *out);
/* An error answer (status such as "400 Bad Request"; extra: more header
 * lines, each ending CRLF, or ""); head: to a HEAD request, so without
 * its body (RFC 9110 9.3.2), its length still given. */
void stats_http_error(struct json *out, int minor, const char *status, const char *extra,
                      bool head);
/* Where a request's header ends in in[0..len) (after its blank line), or
 * 0 while it has not. */
size_t stats_http_request_end(const char *in, size_t len);

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
