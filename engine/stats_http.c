/*
 * stats_http: the HTTP side of the stats thread (engine/stats.c reads the
 * requests and sends the answers): a request's line checked (method GET
 * or HEAD, HTTP/1.0 or 1.1, a target of at most 1 KB) and answered whole,
 * headers and body, into a buffer: GET / the status page
 * (engine/stats_page.html, built in), GET /status.json the live state it
 * shows, GET /metrics the Prometheus text; anything else a 4xx or 5xx
 * with its reason. Every answer closes the connection. What the page and
 * the metrics show is asked of the caller (struct stats_http_views), so
 * that this file reads no engine state and can be fed any bytes alone.
 *
 * Threading: the stats thread's; nothing here is shared.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/json.h"
#include "engine/stats_int.h"
#include "engine/stats_page.h"

static void
http_answer(struct json *out, int minor, const char *status, const char *extra, const char *type,
            const char *body, size_t bodylen, bool head)
{
    text_printf(out,
                "HTTP/1.%d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n",
                minor, status, type, bodylen, extra);
    if (!head)
        json_raw(out, body, bodylen);
}

void
stats_http_error(struct json *out, int minor, const char *status, const char *extra, bool head)
{
    char body[128];
    int n = snprintf(body, sizeof(body), "%s\n", status);
    http_answer(out, minor, status, extra, "text/plain; charset=utf-8", body, (size_t)n, head);
}

void
stats_http_answer(const struct stats_http_views *v, const char *in, size_t len, struct json *out)
{
    const char *eol = memchr(in, '\n', len);
    size_t ll = (size_t)(eol - in);
    if (ll > 0 && in[ll - 1] == '\r')
        ll--;
    char line[1024];
    if (ll >= sizeof(line)) {
        stats_http_error(out, 1, "414 URI Too Long", "", false);
        return;
    }
    memcpy(line, in, ll);
    line[ll] = '\0';
    char *sp1 = strchr(line, ' ');
    char *sp2 = sp1 != NULL ? strchr(sp1 + 1, ' ') : NULL;
    if (sp1 == NULL || sp2 == NULL || sp1 == line || sp2 == sp1 + 1 || strchr(sp2 + 1, ' ') ||
        strncmp(sp2 + 1, "HTTP/", 5) != 0) {
        stats_http_error(out, 1, "400 Bad Request", "", false);
        return;
    }
    *sp1 = *sp2 = '\0';
    const char *method = line, *target = sp1 + 1, *version = sp2 + 1;
    int minor;
    if (strcmp(version, "HTTP/1.0") == 0) {
        minor = 0;
    } else if (strcmp(version, "HTTP/1.1") == 0) {
        minor = 1;
    } else {
        stats_http_error(out, 1, "505 HTTP Version Not Supported", "", false);
        return;
    }
    for (const char *m = method; *m != '\0'; m++) {
        if (*m < 'A' || *m > 'Z') {
            stats_http_error(out, minor, "400 Bad Request", "", false);
            return;
        }
    }
    bool head = strcmp(method, "HEAD") == 0;
    if (!head && strcmp(method, "GET") != 0) {
        stats_http_error(out, minor, "405 Method Not Allowed", "Allow: GET, HEAD\r\n", false);
        return;
    }
    size_t tl = strcspn(target, "?");
    if (tl == 1 && target[0] == '/') {
        /* The page is static; what it shows comes from status.json. Its
         * own script and style are inline: nothing else may load. */
        http_answer(out, minor, "200 OK",
                    "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; "
                    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:\r\n"
                    "X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\n",
                    "text/html; charset=utf-8", stats_page_html, stats_page_html_len, head);
        return;
    }
    if (tl == 12 && strncmp(target, "/status.json", 12) == 0) {
        struct json body;
        json_init(&body);
        v->status(v->arg, &body);
        if (json_failed(&body)) {
            json_fini(&body);
            stats_http_error(out, minor, "500 Internal Server Error", "", head);
            return;
        }
        http_answer(out, minor, "200 OK", "X-Content-Type-Options: nosniff\r\n",
                    "application/json", body.buf, body.len, head);
        json_fini(&body);
        return;
    }
    if (tl != 8 || strncmp(target, "/metrics", 8) != 0) {
        stats_http_error(out, minor, "404 Not Found", "", head);
        return;
    }
    char *text = v->metrics(v->arg);
    if (text == NULL) {
        stats_http_error(out, minor, "500 Internal Server Error", "", head);
        return;
    }
    http_answer(out, minor, "200 OK", "", "text/plain; version=0.0.4; charset=utf-8", text,
                strlen(text), head);
    free(text);
}

size_t
stats_http_request_end(const char *in, size_t len)
{
    for (size_t i = 0; i + 1 < len; i++) {
        if (in[i] != '\n')
            continue;
        if (in[i + 1] == '\n')
            return i + 2;
        if (i + 2 < len && in[i + 1] == '\r' && in[i + 2] == '\n')
            return i + 3;
    }
    return 0;
}
