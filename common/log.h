/*
 * log: one line of key=value pairs per event, led by a timestamp and level,
 * to stderr or a file opened with O_APPEND.
 *
 * Threading: every function may be called from any thread. Each line is
 * formatted into a stack buffer and written with one write(2), so lines
 * from different threads never interleave. log_reopen() swaps the file
 * descriptor atomically (SIGHUP, logrotate).
 */
#ifndef SLUICE_COMMON_LOG_H
#define SLUICE_COMMON_LOG_H

#include <stdarg.h>

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

void log_msg(enum log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void log_vmsg(enum log_level level, const char *fmt, va_list ap);

static inline int log_enabled(enum log_level level)
{
    return level >= log_get_level();
}

#endif
