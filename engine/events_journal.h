/*
 * events_journal: the durable event journal that event sinks push from.
 * The events module's pump appends the event lines committed in the
 * spool (one event a line, under the numbers the spool gave them) and
 * fsyncs them; each sink reads from its own durable cursor and moves it
 * once its endpoint acknowledged.
 *
 * On disk, in one directory (by default <spool>/events):
 *   id                        a random 64-bit node id, made once (hex)
 *   OFF-SEQ.seg               segments of whole lines; OFF is the byte
 *                             position of the first line in the journal,
 *                             SEQ its event number (both 16 hex digits)
 *   cursor.NAME               one sink's position, "OFF SEQ\n"
 * Positions are global and contiguous (a segment starts where the last
 * one ended), so an event is named by its number: the event id pushed
 * with it is "<node id>-<seq>", the same on every retry and unique
 * across nodes (two nodes draw different ids).
 *
 * Crash safety: an append writes whole lines and fsyncs before it moves
 * the durable end that readers see; a crash can leave a torn tail (a
 * part line, or zeros the file system allocated but never wrote) after
 * the last fsync, which journal_open cuts off. Readers never see past
 * the durable end, so an event number is never reused after a crash. A
 * cursor is written to a temporary file, fsynced and renamed. A skip of
 * numbers (journal_skip_to) renames an empty last segment to its new
 * numbers in one step, or starts a new segment; two segments at one
 * offset (the leftover of a crash inside an older build's skip) are
 * taken at open for what they are: the one numbered higher is kept, the
 * other (empty) deleted.
 *
 * Threading: journal_append and journal_skip_to from one thread at a
 * time (the pump); journal_read, journal_end, the cursor calls and
 * journal_trim from any thread (the state is under a mutex, reads use
 * pread on a descriptor of the caller's own).
 */
#ifndef SLUICE_ENGINE_EVENTS_JOURNAL_H
#define SLUICE_ENGINE_EVENTS_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define JOURNAL_SEGMENT_DEFAULT (64u * 1024 * 1024) /* a new segment past this size */
#define JOURNAL_NAME_MAX        64                  /* a cursor name: [A-Za-z0-9_.-] */

struct journal;

/* A position between two events: the byte offset and the event number
 * of the next event. */
struct journal_pos {
    uint64_t off;
    uint64_t seq;
};

/* Open (creating it and its id when missing) the journal in dir, cut a
 * torn tail. segment_max 0: JOURNAL_SEGMENT_DEFAULT. Returns 0 and *out
 * (free with journal_close) or -errno with a message in err. */
int journal_open(const char *dir, size_t segment_max, struct journal **out, char *err,
                 size_t errlen);

/* The size past which the next append starts a new segment (0:
 * JOURNAL_SEGMENT_DEFAULT): the grain of what a trim can drop. */
void journal_set_segment_max(struct journal *j, size_t segment_max);
struct journal *journal_close(struct journal *j);

/* Append n buffers of whole lines and fsync. Returns 0 or -errno (then
 * nothing of this call is visible to readers; the tail is cut back). */
int journal_append(struct journal *j, const struct iovec *iov, unsigned n);

/* Number the next line appended seq (above the end: the numbers
 * between are never used; a reader passes them). Appending thread.
 * Returns 0 or -errno. */
int journal_skip_to(struct journal *j, uint64_t seq);

/* The durable end and the first position still on disk. */
void journal_end(struct journal *j, struct journal_pos *end);
void journal_begin(struct journal *j, struct journal_pos *begin);

/* The node id, 16 hex digits. Borrowed: lives as long as j. */
const char *journal_id(const struct journal *j);

/*
 * Read whole lines from *pos into buf (cap octets), from one segment,
 * never past the durable end. *pos may be moved forward first: to the
 * first segment still on disk when it lies before it. *fd is the
 * caller's cache of an open segment (-1 at first; close it when done),
 * *fd_seg which one it is. Returns the octets read (0: nothing new), or
 * -errno. A line longer than cap is skipped whole and counted in
 * *skipped (events lost to this reader; never happens with dlog lines).
 * Octets without a newline up to a segment's end (a segment damaged on
 * disk: appends write whole lines) are skipped too, logged, and reading
 * goes on in the next segment: the numbers passed are counted in
 * *skipped.
 */
long journal_read(struct journal *j, struct journal_pos *pos, char *buf, size_t cap, int *fd,
                  uint64_t *fd_seg, uint64_t *skipped);

/* Whether name may name a cursor: 1 to JOURNAL_NAME_MAX of
 * [A-Za-z0-9_.-], not starting with a dot. */
bool journal_name_valid(const char *name);

/* A sink's cursor: 0 and *pos (the journal's first position when the
 * cursor was never stored or lies outside the journal), or -errno.
 * *lost (NULL: not asked) is the number of events between a stored
 * cursor and the journal's first position when the segments after that
 * cursor were deleted since (trimmed while its sink was away): events
 * that sink will never get; else 0. */
int journal_cursor_load(struct journal *j, const char *name, struct journal_pos *pos,
                        uint64_t *lost);
int journal_cursor_store(struct journal *j, const char *name, const struct journal_pos *pos);
/* Whether a cursor was ever stored for name (it stays when its sink is
 * removed: added back, the sink resumes there). */
bool journal_cursor_exists(struct journal *j, const char *name);

/* Delete the segments that end at or before keep (every cursor passed
 * them). The segment being appended to is never deleted. Returns how
 * many were deleted. */
unsigned journal_trim(struct journal *j, const struct journal_pos *keep);

/* The first position of the oldest segment that keeps at most max_bytes
 * between it and the end: where a sink that is too far behind is moved
 * (what it skips is lost to it). */
void journal_pos_within(struct journal *j, uint64_t max_bytes, struct journal_pos *out);

/* Bytes of segments on disk. */
uint64_t journal_bytes(struct journal *j);

#endif
