/*
 * log: one line of key=value pairs per event, led by a timestamp and level,
 * to stderr or a file opened with O_APPEND.
 *
 * Values are escaped as they are formatted, so that text from the network
 * (an MX's reply, a client's EHLO) can neither split a line nor forge a
 * key: log_msg() runs every %s (and %c) argument through log_escape(),
 * in the mode its place in the format calls for: an unquoted value
 * (key=%s) that holds a space is put in quotes (err="Connection refused"),
 * one inside <> (rcpt=<%s>) has its spaces as \x20 and its '>' as \x3e
 * (LOG_ESC_VALUE: a quoted local part may hold both), so that the value
 * ends at the format's '>', and
 * the rest (key="%s", free text) is LOG_ESC_TEXT. The place is what the
 * line holds just before the conversion, from the format or from free
 * text an argument wrote, so a key passed as an argument (detail=%s
 * written as "reason=%s%s%s", ..., " detail=", value) makes the value
 * after it a value as well. Other conversions are printf's.
 *
 * Threading: every function may be called from any thread. Each line is
 * formatted into a stack buffer and written with one write(2), so lines
 * from different threads never interleave. log_reopen() (SIGHUP,
 * logrotate) puts the new file behind the same descriptor number at once
 * (dup3), so no thread can write through a number closed and reused.
 *
 * Batching: a thread that calls log_batch_begin() (the worker loops) keeps
 * its lines below LOG_ERR in a buffer of its own, written whole by
 * log_flush(), when the buffer is full (16 KB; PIPE_BUF when the log is
 * not a regular file, so that a pipe never takes a batch in pieces with
 * another thread's line between them), or before a line at LOG_ERR or
 * above; a batch's lines stay in the order they were logged. The worker
 * flushes before each io_uring submit (its replies, its sends), before it
 * posts to another worker, before a wcall answers its caller, before a
 * reload's park, and before main counts its drain or failure, so a line is
 * in the file before what followed it can be seen there. Not before what
 * c-ares and hiredis send on their own sockets (a DNS query, a Redis
 * command may reach its server before the line of the turn that made it).
 * A crash (an abort, a fault) writes every batching thread's kept lines
 * (up to 256 threads), then its own line, then what the hooks of
 * log_fatal_hook_add() write (the delivery log's lines) when
 * log_catch_fatal() is on (sluice's main turns it on). A stack overflowed
 * does too, on a thread that called log_altstack_init() (every thread
 * sluice starts, and main); a kill -9 loses the lines of the turn it
 * cuts. One write per turn, not one per line: with two workers busy,
 * their writes to the one file also contended for its position lock.
 */
#ifndef SLUICE_COMMON_LOG_H
#define SLUICE_COMMON_LOG_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_NOTICE, LOG_WARN, LOG_ERR, LOG_CRIT };

/* Open the log: path NULL or "-" or "stderr" means standard error.
 * Returns 0 or -errno (the previous destination is kept on error). */
int log_open(const char *path, enum log_level min_level);
/* Reopen the same path (after rename by logrotate). Returns 0 or -errno. */
int log_reopen(void);
void log_close(void);
void log_set_level(enum log_level min_level);
enum log_level log_get_level(void);
/* Tag every line this thread writes with "thread=NAME" (borrowed: the
 * string must outlive the thread's logging, e.g. a literal). */
void log_set_thread_name(const char *name);

const char *log_level_str(enum log_level level);
/* Parse "debug|info|notice|warn|error|crit"; returns -1 when unknown. */
int log_level_parse(const char *s);

enum log_esc {
    /* Always: a backslash and '"' as \\ and \", CR LF TAB as \r \n \t,
     * other control octets (C0, DEL), octets that are not UTF-8 and the
     * code points that reorder or break lines on a terminal (C1 controls,
     * U+2028/2029, bidirectional controls) or that a reader may split
     * fields on (the Unicode spaces: U+00A0, U+1680, U+2000-U+200A,
     * U+202F, U+205F, U+3000) as \xHH per octet. Valid UTF-8 otherwise
     * stays as it is. */
    LOG_ESC_TEXT,
    LOG_ESC_VALUE, /* also a space as \x20 and '>' as \x3e: a value stays one
                    * token, and one inside <> ends at the format's '>' */
};

/* Escape n octets of s into out (cap octets, NUL-terminated when cap > 0).
 * Returns the length of the whole escaped text (as snprintf: a result >=
 * cap means out holds a prefix that ends on a whole escape). */
size_t log_escape(char *out, size_t cap, const char *s, size_t n, enum log_esc mode);

/* Start batching this thread's lines (see above); a failed allocation
 * leaves the thread writing line by line. */
void log_batch_begin(void);
/* Write what this thread kept. */
void log_flush(void);
/* Flush and stop batching (at the thread's end). */
void log_batch_end(void);

/* Catch SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGABRT (not one that is
 * ignored: it stays so): the handler calls log_fatal_signal() at the
 * first of them, then puts back the action it replaced (the default, a
 * core dump; or a sanitizer's report) and lets it run. It runs on the
 * thread's alternate stack when it has one (SA_ONSTACK; see
 * log_altstack_init). Once per process; from main before its threads
 * start. Returns 0 or -errno (the signals that could be caught are). */
int log_catch_fatal(void);
/* Give the calling thread an alternate signal stack (sigaltstack is per
 * thread), so that log_catch_fatal's handler runs, and writes its line,
 * when the thread's own stack is exhausted (deep recursion, a large
 * alloca). Call it first thing in each thread. 64 KB (SIGSTKSZ when
 * larger) and a guard page, mapped here and unmapped at the thread's
 * end (a pthread key's destructor; main's stays to the process's end).
 * A thread that has one already (a second call; a sanitizer's, which
 * ASan gives every thread) keeps it. Returns 0 or -errno (then logged
 * once per process, and the thread goes on without). */
int log_altstack_init(void);
/* Only on the way to dying (a fatal signal, a stop given up): writes
 * each batching thread's kept lines up to its last whole line and empties
 * its batch, from any thread, with no lock: a line a thread was adding
 * just then may be lost, one a thread was flushing just then written
 * twice. Then runs the hooks (log_fatal_hook_add). Async-signal-safe. */
void log_flush_all(void);
/* Only on the way to dying, from a fatal signal's handler (it calls only
 * what a handler may: write(2), no lock, no allocation; and it empties
 * every thread's batch under it): writes the whole lines every batching
 * thread keeps (a line a thread was adding just then may be lost, one a
 * thread was flushing just then written twice), then
 * "level=crit [thread=NAME ]event=fatal_signal
 * signal=SEGV|BUS|ILL|FPE|ABRT pid=N", then runs the hooks (after the
 * line: a hook that faults on a structure the crash tore cannot cost it). */
void log_fatal_signal(int sig);
/* Have fn(arg) called on the way to dying: by log_fatal_signal and by
 * log_flush_all (a stop given up), once per process whichever comes
 * first, on the thread that dies or gives up. fn must be
 * async-signal-safe (write(2), atomics, nanosleep; no lock, no
 * allocation) and must not block for long. For a module that keeps
 * lines of its own (engine/dlog.c), without common/ knowing of it. arg
 * is borrowed until log_fatal_hook_remove. Up to 4 hooks; returns the
 * slot (>= 0) or -ENOSPC. Any thread. */
int log_fatal_hook_add(void (*fn)(void *arg), void *arg);
/* Take the hook of slot off (a slot < 0: nothing); if it is running just
 * then, wait for it to end, so that arg may be freed after. Any thread. */
void log_fatal_hook_remove(int slot);

/* The log's time stamp, "2026-12-04T12:34:56.789Z" (UTC; sec the Unix
 * time, clamped to 1970..9999; ms below 1000), into out, NUL-terminated.
 * Returns its length, LOG_STAMP_LEN. Async-signal-safe. */
#define LOG_STAMP_LEN 24
size_t log_stamp_format(char out[LOG_STAMP_LEN + 1], int64_t sec, unsigned ms);

void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void log_vmsg(enum log_level level, const char *fmt, va_list ap);

static inline int log_enabled(enum log_level level)
{
    return level >= log_get_level();
}

#endif
