/*
 * id: the pure half of message ids: the ordering rule and the text form.
 * The generator's state (the last id handed out) lives in struct queue.
 *
 * Text: 13 characters of Crockford's base32 alphabet, which is in ASCII
 * order, so ids sort as text the way they sort as numbers (ls, grep, log
 * files). 13 * 5 = 65 bits: the first character carries the top 4 bits.
 *
 * Threading: pure functions.
 */
#include "queue/queue.h"

#include <string.h>

#define SEQ_BITS  12
#define NODE_BITS 10
#define TIME_BITS 42
#define SEQ_MAX   ((1u << SEQ_BITS) - 1)
#define NODE_MAX  ((1u << NODE_BITS) - 1)
#define TIME_MAX  ((1ULL << TIME_BITS) - 1)

static const char alphabet[32] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

static uint64_t
id_make(uint64_t ms, unsigned node, unsigned seq)
{
    return (ms << (NODE_BITS + SEQ_BITS)) | ((uint64_t)(node & NODE_MAX) << SEQ_BITS) | seq;
}

uint64_t
queue_id_after(uint64_t last, uint64_t now_unix_ms, unsigned node_id)
{
    uint64_t now = now_unix_ms > QUEUE_ID_EPOCH_MS ? now_unix_ms - QUEUE_ID_EPOCH_MS : 0;
    if (now > TIME_MAX)
        now = TIME_MAX; /* year 2163: ids stop being time-ordered, never unique */
    uint64_t id = id_make(now, node_id, 0);
    if (id > last)
        return id;
    /* The clock is at or behind the last id (same millisecond, a step
     * back, or an id read from the spool): keep the last timestamp and
     * take the next sequence number; when the sequence is used up, borrow
     * the next millisecond. Either way the result stays > last. */
    uint64_t ms = last >> (NODE_BITS + SEQ_BITS);
    unsigned last_node = (unsigned)(last >> SEQ_BITS) & NODE_MAX;
    unsigned seq = (unsigned)last & SEQ_MAX;
    if (last_node == (node_id & NODE_MAX) && seq < SEQ_MAX)
        return last + 1;
    if (last_node < (node_id & NODE_MAX))
        return id_make(ms, node_id, 0);
    return id_make(ms + 1, node_id, 0);
}

uint64_t
queue_id_time_ms(uint64_t id)
{
    return (id >> (NODE_BITS + SEQ_BITS)) + QUEUE_ID_EPOCH_MS;
}

unsigned
queue_id_node(uint64_t id)
{
    return (unsigned)(id >> SEQ_BITS) & NODE_MAX;
}

void
queue_id_str(uint64_t id, char out[QUEUE_ID_STRLEN + 1])
{
    for (int i = QUEUE_ID_STRLEN - 1; i >= 0; i--) {
        out[i] = alphabet[id & 31];
        id >>= 5;
    }
    out[QUEUE_ID_STRLEN] = '\0';
}

static int
digit_value(char c)
{
    if (c >= 'a' && c <= 'z')
        c = (char)(c - 'a' + 'A');
    const char *p = c ? memchr(alphabet, c, sizeof(alphabet)) : NULL;
    return p ? (int)(p - alphabet) : -1;
}

int
queue_id_parse(const char *s, uint64_t *id)
{
    uint64_t v = 0;
    for (int i = 0; i < QUEUE_ID_STRLEN; i++) {
        int d = digit_value(s[i]);
        if (d < 0)
            return -EINVAL;
        if (i == 0 && d > 15)
            return -EINVAL; /* would need a 65th bit */
        v = (v << 5) | (uint64_t)d;
    }
    if (s[QUEUE_ID_STRLEN] != '\0')
        return -EINVAL;
    *id = v;
    return 0;
}
