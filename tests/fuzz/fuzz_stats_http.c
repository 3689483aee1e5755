/*
 * libFuzzer target: the stats listener's HTTP answers (engine/stats_http.c,
 * what GET /, /status.json and /metrics read from any client that reaches
 * [stats] http_listen). The input is what a client sent, as the stats
 * thread holds it (at most STATS_HTTP_REQUEST_MAX octets); where its
 * header ends (stats_http_request_end), the request before it is
 * answered, status.json and the metrics from fixed text.
 * Invariants: the header's end is within the input and right after a
 * blank line; every request gets one whole answer: a status line of
 * HTTP/1.0 or 1.1 and three digits, headers ending in a blank line, a
 * Content-Length that is the length of the body that follows (none
 * after it, and none at all to a HEAD); a 200 only to GET or HEAD of
 * /, /status.json or /metrics (a query allowed).
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/json.h"
#include "engine/stats_int.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

static void
check(int cond)
{
    if (!cond)
        abort();
}

static void
status_of(void *arg, struct json *j)
{
    (void)arg;
    json_obj_begin(j);
    json_kbool(j, "ok", true);
    json_obj_end(j);
}

static char *
metrics_of(void *arg)
{
    (void)arg;
    static const char text[] = "sluice_up 1\n";
    char *t = malloc(sizeof(text));
    if (t != NULL)
        memcpy(t, text, sizeof(text));
    return t;
}

/* Whether the request line asks for one of the three pages with GET or
 * HEAD: the only requests a 200 may answer. */
static int
may_be_ok(const char *in, size_t len)
{
    const char *eol = memchr(in, '\n', len);
    size_t ll = (size_t)(eol - in);
    if (ll > 0 && in[ll - 1] == '\r')
        ll--;
    static const char *const methods[] = {"GET ", "HEAD "};
    for (size_t m = 0; m < 2; m++) {
        size_t ml = strlen(methods[m]);
        if (ll < ml || memcmp(in, methods[m], ml) != 0)
            continue;
        const char *t = in + ml;
        size_t tl = ll - ml;
        static const char *const pages[] = {"/ ", "/?", "/status.json ", "/status.json?",
                                            "/metrics ", "/metrics?"};
        for (size_t p = 0; p < 6; p++)
            if (tl >= strlen(pages[p]) && memcmp(t, pages[p], strlen(pages[p])) == 0)
                return 1;
    }
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > STATS_HTTP_REQUEST_MAX)
        return 0;
    const char *in = (const char *)data;
    size_t end = stats_http_request_end(in, size);
    if (end == 0)
        return 0;
    check(end >= 2 && end <= size && in[end - 1] == '\n' &&
          (in[end - 2] == '\n' || (end >= 3 && in[end - 2] == '\r' && in[end - 3] == '\n')));
    struct json out;
    json_init(&out);
    const struct stats_http_views views = {NULL, status_of, metrics_of};
    stats_http_answer(&views, in, end, &out);
    check(!json_failed(&out));
    const char *a = out.buf;
    size_t alen = out.len;
    check(alen > 12 && (memcmp(a, "HTTP/1.0 ", 9) == 0 || memcmp(a, "HTTP/1.1 ", 9) == 0));
    check(a[9] >= '1' && a[9] <= '5' && a[10] >= '0' && a[10] <= '9' && a[11] >= '0' &&
          a[11] <= '9' && a[12] == ' ');
    int ok = memcmp(a + 9, "200", 3) == 0;
    check(!ok || may_be_ok(in, end));
    const char *hend = NULL;
    for (size_t i = 0; i + 3 < alen; i++)
        if (memcmp(a + i, "\r\n\r\n", 4) == 0) {
            hend = a + i + 4;
            break;
        }
    check(hend != NULL);
    const char *cl = NULL;
    for (const char *p = a; p + 18 <= hend; p++)
        if (memcmp(p, "\r\nContent-Length: ", 18) == 0) {
            cl = p + 18;
            break;
        }
    check(cl != NULL);
    size_t n = strtoul(cl, NULL, 10);
    size_t body = alen - (size_t)(hend - a);
    int head = end >= 5 && memcmp(in, "HEAD ", 5) == 0;
    check(body == n || (head && body == 0));
    check(!(head && ok) || body == 0);
    json_fini(&out);
    return 0;
}
