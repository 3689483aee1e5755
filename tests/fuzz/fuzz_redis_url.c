/*
 * libFuzzer target: the redis:// URL parser (engine/redis_url.c, pure,
 * compiled in alone). The input is one URL; the first octet picks the
 * kind ([redis] url or an events sink's). Invariants: a URL is refused
 * with a message, or taken apart into parts that fit (a host, a port in
 * range, a path where one is required); and the URL written back from
 * those parts, with every octet of the userinfo percent-escaped, is taken
 * apart into the same parts.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/redis_url.h"

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

static size_t
escape(char *out, const char *s)
{
    size_t o = 0;
    for (; *s != '\0'; s++)
        o += (size_t)sprintf(out + o, "%%%02X", (unsigned char)*s);
    return o;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > 4096)
        return 0;
    enum redis_url_kind kind = data[0] & 1 ? REDIS_URL_STREAM : REDIS_URL_DB;
    char *url = malloc(size);
    if (url == NULL)
        return 0;
    memcpy(url, data + 1, size - 1);
    url[size - 1] = '\0';
    struct redis_url u, v;
    char err[256] = "";
    int rc = redis_url_split(url, kind, &u, err, sizeof(err));
    if (rc != 0) {
        check(err[0] != '\0');
        free(url);
        return 0;
    }
    check(u.host[0] != '\0' && u.port >= 1 && u.port <= 65535);
    check(kind == REDIS_URL_DB || u.path[0] != '\0');
    /* written back: every userinfo octet escaped, the rest as it was */
    char *back = malloc(64 + 3 * 2 * (REDIS_URL_PART_MAX + 1) + 2 * (REDIS_URL_PART_MAX + 1));
    check(back != NULL);
    size_t o = (size_t)sprintf(back, "redis://");
    if (u.user[0] != '\0' || u.password[0] != '\0') {
        o += escape(back + o, u.user);
        back[o++] = ':';
        o += escape(back + o, u.password);
        back[o++] = '@';
    }
    o += (size_t)sprintf(back + o, strchr(u.host, ':') ? "[%s]:%d" : "%s:%d", u.host, u.port);
    if (u.path[0] != '\0')
        sprintf(back + o, "/%s", u.path);
    check(redis_url_split(back, kind, &v, err, sizeof(err)) == 0);
    check(strcmp(u.user, v.user) == 0 && strcmp(u.password, v.password) == 0 &&
          strcmp(u.host, v.host) == 0 && u.port == v.port && strcmp(u.path, v.path) == 0);
    free(back);
    free(url);
    return 0;
}
