/*
 * redis_url: a redis:// URL taken apart, with no I/O: the one parser
 * behind [redis] url (redis.c's redis_url_parse, which then resolves the
 * host) and an [events] sink's redis:// url (events.c).
 *
 *   redis://[[USER]:PASSWORD@]HOST[:PORT][/PATH]
 *
 * as RFC 3986 reads it, with the leniency redis-cli users expect: the
 * userinfo ends at the last '@' before the path, so that a password may
 * hold '@' and '/' unescaped; its percent-escapes are decoded (%40 is
 * '@', %2F '/', %25 '%'), as redis-py and redis-cli decode them. A
 * userinfo without ':' is a password alone (redis-cli's reading). HOST is
 * a name, an IPv4 address or a [bracketed] IPv6 address; PORT 1 to 65535
 * (6379 when not given). PATH is what follows the '/' after HOST[:PORT],
 * as written: [redis] url takes none or "0", a sink its stream's name,
 * which may hold '@': with a path required, an '@' with no '/' after it
 * belongs to the path.
 *
 * Threading: none of its own; reentrant.
 */
#ifndef SLUICE_ENGINE_REDIS_URL_H
#define SLUICE_ENGINE_REDIS_URL_H

#include <stdbool.h>
#include <stddef.h>

#define REDIS_URL_PART_MAX 255 /* octets of a user, password, host or path */

enum redis_url_kind {
    REDIS_URL_DB,     /* [redis] url: "redis://" may be left out; the path is optional */
    REDIS_URL_STREAM, /* an events sink: "redis://" and a non-empty path required */
};

struct redis_url {
    char user[REDIS_URL_PART_MAX + 1];     /* decoded; "": none */
    char password[REDIS_URL_PART_MAX + 1]; /* decoded; "": none */
    char host[REDIS_URL_PART_MAX + 1];     /* without the brackets of an IPv6 address */
    int port;
    char path[REDIS_URL_PART_MAX + 1]; /* after the '/', as written; "": none */
};

/* Take url apart into *out. Returns 0, or -EINVAL with one line in err
 * that names the part at fault and never quotes the userinfo (a password
 * does not belong in a log). */
int redis_url_split(const char *url, enum redis_url_kind kind, struct redis_url *out, char *err,
                    size_t errlen);

#endif
