/*
 * intern: small stable ids for names (tenants, pools, campaigns, sources)
 * so that hot objects (a queued job, a per-tenant counter) carry a 32-bit
 * id instead of a string. One table serves the whole engine: a name gets
 * one id, ids start at 1 (0 is "none") and stay valid, with their names,
 * until the table is freed; nothing is ever removed, so the table grows
 * with the distinct names met. It stops at INTERN_MAX names: past that,
 * intern_id() returns 0 (the name is then treated as none by whoever
 * asked) and counts the refusal. Since nothing is removed (intern_name()
 * is read without a lock, and a queued job may hold any id), names that
 * clients choose (campaigns) go through intern_id_bounded(), whose own
 * bound keeps them from growing the table, and the memory, to INTERN_MAX.
 *
 * Threading: intern_id() from any thread (a mutex around the name
 * lookup); intern_name() from any thread without a lock (ids map to
 * names through chunks that are published once, never moved).
 */
#ifndef SLUICE_COMMON_INTERN_H
#define SLUICE_COMMON_INTERN_H

#include <stddef.h>
#include <stdint.h>

#define INTERN_CHUNK 1024u
#define INTERN_MAX   (1u << 22) /* names: 4 Mi ids, 4096 chunks */
#define INTERN_NAME_MAX 255     /* octets of a name; longer is refused (id 0) */

struct intern;

/* A new empty table; NULL without memory. */
struct intern *intern_new(void);
/* Free t and every name (NULL: nothing). Returns NULL. */
struct intern *intern_free(struct intern *t);
/* The id of name (made on first use); 0 for NULL or "", for a name longer
 * than INTERN_NAME_MAX, without memory, or past INTERN_MAX. Names compare
 * exactly (case matters). */
uint32_t intern_id(struct intern *t, const char *name);
/* As intern_id(), for names chosen by clients: a name not yet in t is
 * made only while fewer than max names were made by this function (those
 * of intern_id() do not count; a name in t gets its id whoever made it).
 * Past max it returns 0 and sets *over to the refusals past a max so far,
 * this one included (else *over is 0), for the caller to log. */
uint32_t intern_id_bounded(struct intern *t, const char *name, uint32_t max, uint64_t *over);
/* The id of name if it has one, else 0; makes nothing. */
uint32_t intern_find(struct intern *t, const char *name);
/* The name of id (borrowed: lives as long as t), or NULL for 0 or an id
 * never given. */
const char *intern_name(const struct intern *t, uint32_t id);
/* Names held, and names refused for the cap or memory. */
void intern_counts(const struct intern *t, uint64_t *names, uint64_t *refused);
/* Names made by intern_id_bounded(), and names it refused past its max. */
void intern_bounded_counts(const struct intern *t, uint64_t *made, uint64_t *refused);

#endif
