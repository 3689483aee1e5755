/*
 * json: a small writer of JSON text into a growable buffer, for the
 * delivery log, the stats socket and tools. Strings are escaped per RFC
 * 8259; bytes that are not valid UTF-8 become U+FFFD, so every document
 * parses whatever a remote server sent. Commas are placed by the writer:
 * callers say begin/end and key/value, never ",".
 *
 * Allocation failure is sticky (json_failed()); the text is then
 * incomplete and must not be used.
 *
 * Threading: a buffer belongs to one thread at a time.
 */
#ifndef SLUICE_COMMON_JSON_H
#define SLUICE_COMMON_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JSON_DEPTH_MAX 30

struct json {
    char *buf;    /* owned: len octets of text, NUL-terminated when cap > 0 */
    size_t len, cap;
    bool oom;
    unsigned depth;
    uint32_t first; /* bit d: nothing written yet at depth d */
};

void json_init(struct json *j);
void json_fini(struct json *j);
/* Forget the text, keep the memory. */
void json_reset(struct json *j);
static inline bool json_failed(const struct json *j) { return j->oom; }

void json_obj_begin(struct json *j);
void json_obj_end(struct json *j);
void json_arr_begin(struct json *j);
void json_arr_end(struct json *j);
/* An object key; the next call writes its value. */
void json_key(struct json *j, const char *key);

/* Values (as array elements, or after json_key). */
void json_str(struct json *j, const char *s);              /* NULL writes null */
void json_strn(struct json *j, const char *s, size_t n);
void json_u64(struct json *j, uint64_t v);
void json_i64(struct json *j, int64_t v);
void json_double(struct json *j, double v);                /* non-finite: null */
void json_bool(struct json *j, bool v);
void json_null(struct json *j);
/* Unix ms as RFC 3339 UTC with milliseconds: "2026-11-23T02:33:51.123Z". */
void json_time_ms(struct json *j, uint64_t unix_ms);

/* Shorthands: key then value. */
void json_kstr(struct json *j, const char *key, const char *s);
void json_ku64(struct json *j, const char *key, uint64_t v);
void json_kbool(struct json *j, const char *key, bool v);

/* Raw text, no comma, no escaping (a newline between documents). */
void json_raw(struct json *j, const char *s, size_t n);

/* Octets of the valid UTF-8 sequence at s (n > 0 octets left): 1 to 4;
 * 0 when it is not one (overlong forms, surrogates and values past
 * U+10FFFF are not). */
size_t json_utf8_len(const unsigned char *s, size_t n);

/* Write into out (outcap octets) the RFC 3339 form of unix_ms, NUL
 * included; needs 25 octets. Returns the length. */
size_t json_format_time(char *out, size_t outcap, uint64_t unix_ms);

#endif
