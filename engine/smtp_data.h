/*
 * smtp_data: the message content of DATA. Server side, incremental
 * dot-unstuffing with end-of-data detection and the checks that refuse
 * SMTP smuggling; client side, streaming dot-stuffing with the terminating
 * ".\r\n". Both take input at any read boundary and give the same result
 * for every split, and both jump from line end to line end with a vector
 * scan; the state machines see only line starts and CR/LF.
 *
 * Threading: pure functions; a state struct belongs to one session.
 */
#ifndef SLUICE_ENGINE_SMTP_DATA_H
#define SLUICE_ENGINE_SMTP_DATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SMTP_DATA_LINE_MAX 998 /* octets without CRLF (RFC 5322 2.1.1) */

/* Results besides errors (there are none: odd content is flagged). */
enum { SMTP_DATA_MORE = 0, SMTP_DATA_END = 1 };

/* smtp_unstuff.flags */
enum smtp_data_flag {
    SMTP_DATA_F_BARE_LF = 1u << 0,   /* LF without CR before it */
    SMTP_DATA_F_BARE_CR = 1u << 1,   /* CR without LF after it */
    SMTP_DATA_F_LONG_LINE = 1u << 2, /* a line over SMTP_DATA_LINE_MAX */
    SMTP_DATA_F_NUL = 1u << 3,       /* a NUL octet */
    SMTP_DATA_F_8BIT = 1u << 4,      /* an octet >= 0x80 (8BITMIME needed to relay it) */
};

/*
 * Receive side. A line that is exactly "." ends the data; a line starting
 * with "." loses that dot. Lines end with CRLF only: a bare LF or CR is
 * content, flagged, never a line end, so no variant of "LF . LF", "CR . CR",
 * "CRLF . LF", "LF . CRLF" or "CRLF . CR" ends the data. The server reads
 * to the end and then refuses a message flagged BARE_LF or BARE_CR (and
 * decides for itself about LONG_LINE, NUL and 8BIT).
 */
struct smtp_unstuff {
    uint32_t flags;     /* enum smtp_data_flag */
    uint8_t state;      /* private */
    uint32_t line_len;  /* private: content octets of the current line */
    uint64_t in_total;  /* octets consumed since DATA, the terminator included */
    uint64_t out_total; /* content octets produced: the size to check against SIZE */
    uint64_t bare_off;  /* when BARE_LF/CR: offset in the input stream of the first */
};

void smtp_unstuff_init(struct smtp_unstuff *u);

/*
 * Unstuff in[0..len) into out, which must have room for len octets; out
 * may be in itself (unstuffing in place) but must not otherwise overlap it.
 * Sets *produced (content octets written) and *consumed. Returns
 * SMTP_DATA_END when the terminating line was found: *consumed then counts
 * the input up to and including it, and the rest of in is the next
 * command (pipelining). Returns SMTP_DATA_MORE otherwise; *consumed may
 * then fall short of len by one or two octets (a "." or ".\r" at a line
 * start, which the next octets decide): keep them and present them again
 * in front of the next input. After END, the state answers END with
 * nothing consumed until smtp_unstuff_init().
 */
int smtp_unstuff(struct smtp_unstuff *u, const char *in, size_t len, char *out, size_t *consumed,
                 size_t *produced);

/*
 * Send side: stuff a stored message (CRLF lines, any chunking) into out
 * (cap octets, at least 2). A bare CR or LF in the input is sent as CRLF,
 * so the output never holds one. Consumes what fits: *consumed may fall
 * short of len when out fills; present the rest again with more room.
 */
struct smtp_stuff {
    uint8_t state;   /* private */
    uint8_t fin;     /* private: which terminator, 0 before finishing */
    uint8_t fin_pos; /* private: octets of it written */
};

void smtp_stuff_init(struct smtp_stuff *s);
void smtp_stuff(struct smtp_stuff *s, const char *in, size_t len, char *out, size_t cap,
                size_t *consumed, size_t *produced);
/* After the last input: write ".\r\n", with CRLF before it when the
 * message did not end with one. Returns SMTP_DATA_END once all of it is
 * written, SMTP_DATA_MORE when out filled (call again with more room). */
int smtp_stuff_finish(struct smtp_stuff *s, char *out, size_t cap, size_t *produced);

#endif
