/*
 * log: see log.h. The destination fd and level live in atomics so that
 * logging takes no lock; reopen puts the new file behind the same fd
 * number (dup3), so a writer racing it writes to the old file or the new
 * one (the old is what logrotate's rename expects), never to a number
 * closed and taken since by a socket.
 *
 * Lines are formatted here, not by vsnprintf: every %s and %c goes
 * through log_escape() on its way into the line (the mode from its place
 * in the format), the other conversions through snprintf one at a time
 * (integers without it). A line cut at the buffer's end is cut between
 * characters and escapes, and marked truncated=1.
 *
 * A fatal signal (log_catch_fatal) writes every thread's batch, found in
 * a fixed table of them, and a line made without printf, then runs the
 * hooks of log_fatal_hook_add (a fixed table too). Its handler runs on
 * the thread's alternate signal stack (log_altstack_init), so that a
 * stack overflowed still leaves its line.
 */
#include "common/log.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>
#include <signal.h>

#include "common/json.h"

static _Atomic int log_fd = 2;
/* The log is not a regular file (stderr to a pipe, a terminal, a socket):
 * a write there is whole only up to PIPE_BUF, so a batch goes out before
 * it passes that (a longer write to a full pipe is taken page by page,
 * and another thread's line may land inside it, cut mid-line). */
static _Atomic bool log_small_writes = true;
/* The log is a regular file that appends (O_APPEND, log_mode_set): its
 * lines go out by pwritev2(RWF_APPEND) (append_write). */
static _Atomic bool log_appends = false;
static _Atomic int log_min = LOG_INFO;
static char *log_path; /* owned; NULL for stderr. Changed only by log_open/close. */
static pthread_mutex_t log_path_lock = PTHREAD_MUTEX_INITIALIZER;
static _Thread_local const char *log_thread;

/* A thread's batch (log_batch_begin): lines kept to be written together.
 * 16 KB is about a hundred lines, one write where there were a hundred. */
#define LOG_BATCH_CAP 16384
struct log_batch {
    /* written by its thread with release, read by log_fatal_signal (any
     * thread) with acquire: the octets below len are whole lines */
    _Atomic size_t len;
    char buf[LOG_BATCH_CAP];
};
static _Thread_local struct log_batch *log_batch; /* borrowed from the table below; NULL:
                                                   * not batching */
/* Every batch ever made, for log_fatal_signal (a handler gets no argument:
 * it finds them here). A slot's batch is made by the first thread that
 * takes the slot and never freed, so a handler never reads a freed one;
 * a thread that ends gives the slot (flushed, empty) to the next. 256:
 * [server] workers' maximum; a thread that finds no slot writes its lines
 * one by one, so none is kept from the handler. */
#define LOG_BATCHES_MAX 256
static struct log_batch *_Atomic log_batches[LOG_BATCHES_MAX]; /* owned, for the process */
static atomic_bool log_batch_taken[LOG_BATCHES_MAX];
static _Thread_local size_t log_batch_slot;
/* The thread's timestamp up to the second, made again when the second
 * changes (log_stamp_format). */
static _Thread_local struct {
    time_t sec;
    size_t len; /* 0: not made yet */
    char text[LOG_STAMP_LEN + 1];
} log_stamp;

static const char *const level_names[] = {"debug", "info", "notice", "warn", "error", "crit"};

const char *
log_level_str(enum log_level level)
{
    if ((unsigned)level < sizeof(level_names) / sizeof(level_names[0]))
        return level_names[level];
    return "?";
}

int
log_level_parse(const char *s)
{
    for (unsigned i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++)
        if (strcmp(s, level_names[i]) == 0)
            return (int)i;
    if (strcmp(s, "warning") == 0)
        return LOG_WARN;
    if (strcmp(s, "err") == 0)
        return LOG_ERR;
    return -1;
}

static int
is_stderr_path(const char *path)
{
    return path == NULL || path[0] == '\0' || strcmp(path, "-") == 0 ||
           strcmp(path, "stderr") == 0;
}

static int
open_path(const char *path)
{
    if (is_stderr_path(path))
        return 2;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    return fd < 0 ? -errno : fd;
}

/* How the lines go to fd (log_small_writes, log_appends). A regular file
 * without O_APPEND (stderr sent by `2>file`) is given it: appended without
 * the descriptor's position (append_write), the lines left that position
 * behind, and the other writers of the same open file (assert(3), a
 * sanitizer's report, the shell's next command once sluice exits) wrote
 * there, over the first lines. With O_APPEND every writer appends, and
 * the line after a copytruncate goes at the start, not after a hole. */
static void
log_mode_set(int fd)
{
    struct stat st;
    bool regular = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    int fl = regular ? fcntl(fd, F_GETFL) : -1;
    bool appends = fl >= 0 && ((fl & O_APPEND) != 0 || fcntl(fd, F_SETFL, fl | O_APPEND) == 0);
    atomic_store(&log_small_writes, !regular);
    atomic_store(&log_appends, appends);
}

int
log_open(const char *path, enum log_level min_level)
{
    int fd = open_path(path);
    if (fd < 0)
        return fd;
    pthread_mutex_lock(&log_path_lock);
    char *copy = is_stderr_path(path) ? NULL : strdup(path);
    free(log_path);
    log_path = copy;
    log_mode_set(fd);
    int old = atomic_exchange(&log_fd, fd);
    if (old > 2 && old != fd)
        close(old);
    pthread_mutex_unlock(&log_path_lock);
    atomic_store(&log_min, (int)min_level);
    return 0;
}

int
log_reopen(void)
{
    pthread_mutex_lock(&log_path_lock);
    int rc = 0;
    if (log_path != NULL) {
        int fd = open_path(log_path);
        if (fd < 0) {
            rc = fd;
        } else {
            log_mode_set(fd);
            int cur = atomic_load(&log_fd);
            if (cur > 2) {
                /* The new file goes behind the number the writers hold
                 * (dup3 swaps it at once): a writer that loaded it just
                 * before writes to the old file or the new one. Closing
                 * the number instead let another thread's next socket
                 * take it, and a writer late with it send log lines down
                 * that connection. */
                if (dup3(fd, cur, O_CLOEXEC) < 0)
                    rc = -errno;
                close(fd);
            } else {
                atomic_store(&log_fd, fd); /* from stderr, which stays open */
            }
        }
    }
    pthread_mutex_unlock(&log_path_lock);
    return rc;
}

void
log_close(void)
{
    pthread_mutex_lock(&log_path_lock);
    log_mode_set(2);
    int old = atomic_exchange(&log_fd, 2);
    if (old > 2)
        close(old);
    free(log_path);
    log_path = NULL;
    pthread_mutex_unlock(&log_path_lock);
}

void
log_set_level(enum log_level min_level)
{
    atomic_store(&log_min, (int)min_level);
}

enum log_level
log_get_level(void)
{
    return (enum log_level)atomic_load_explicit(&log_min, memory_order_relaxed);
}

void
log_set_thread_name(const char *name)
{
    log_thread = name;
}

/* Cleared when the kernel, the file system or a seccomp filter refuses
 * RWF_APPEND. */
static atomic_bool log_rwf_append = true;

/* Write len octets at the end of a regular file. write(2) takes the
 * file's position lock (fdget_pos) when the fd table is shared, as it is
 * between threads, so two workers flushing their batches at once queued
 * on that mutex (2% of the CPU with two workers and many domains, whose
 * batches go out at the same moments); pwritev2 with RWF_APPEND appends
 * without the position, so without the lock. Only to a file that
 * appends (log_appends): the position it leaves behind is then nobody's
 * (log_mode_set). Returns what write(2) would, or -1 with ENOSYS where
 * RWF_APPEND is not taken. */
static ssize_t
append_write(int fd, const char *p, size_t len)
{
    if (!atomic_load_explicit(&log_rwf_append, memory_order_relaxed)) {
        errno = ENOSYS;
        return -1;
    }
    struct iovec iov = {.iov_base = (void *)p, .iov_len = len};
    ssize_t w = pwritev2(fd, &iov, 1, 0, RWF_APPEND);
    /* EPERM: a seccomp filter that does not know pwritev2 (a container
     * runtime's older default profile) refuses it so; every line was
     * lost there, write(2) being allowed. */
    if (w < 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL ||
                  errno == ESPIPE || errno == EPERM)) {
        atomic_store(&log_rwf_append, false); /* an old kernel: write(2) from now on */
        errno = ENOSYS;
    }
    return w;
}

/* Write len octets whole (a short write goes on; EINTR is retried). */
static void
write_all(const char *p, size_t len)
{
    int fd = atomic_load_explicit(&log_fd, memory_order_relaxed);
    bool appends = atomic_load_explicit(&log_appends, memory_order_relaxed);
    size_t off = 0;
    while (off < len) {
        ssize_t w = -1;
        if (appends && (w = append_write(fd, p + off, len - off)) < 0 && errno == ENOSYS)
            appends = false;
        if (!appends)
            w = write(fd, p + off, len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return; /* nowhere left to report it */
        }
        off += (size_t)w;
    }
}

void
log_batch_begin(void)
{
    if (log_batch != NULL)
        return;
    for (size_t i = 0; i < LOG_BATCHES_MAX; i++) {
        if (atomic_exchange(&log_batch_taken[i], true))
            continue;
        struct log_batch *bt = atomic_load(&log_batches[i]);
        if (bt == NULL && (bt = calloc(1, sizeof(*bt))) != NULL)
            atomic_store(&log_batches[i], bt);
        if (bt == NULL) {
            atomic_store(&log_batch_taken[i], false);
            return; /* no memory: lines go out one by one */
        }
        log_batch = bt;
        log_batch_slot = i;
        return;
    }
}

void
log_flush(void)
{
    struct log_batch *b = log_batch;
    size_t len = b != NULL ? atomic_load_explicit(&b->len, memory_order_relaxed) : 0;
    if (len > 0) {
        write_all(b->buf, len);
        atomic_store_explicit(&b->len, 0, memory_order_release);
    }
}

void
log_batch_end(void)
{
    if (log_batch == NULL)
        return;
    log_flush();
    log_batch = NULL;
    atomic_store(&log_batch_taken[log_batch_slot], false); /* kept for the next thread */
}

/* ---- the time stamp, and a fatal signal ---- */

/* From here to log_catch_fatal, only what a signal handler may call
 * (write, clock_gettime, getpid, sigaction, raise) and arithmetic: no
 * snprintf, no gmtime_r, no lock, no allocation. */

/* The decimal digits of v, at least width of them (zero-padded). */
static size_t
put_uint(char *p, unsigned long long v, unsigned width)
{
    char t[24];
    unsigned n = 0;
    do {
        t[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0 && n < sizeof(t));
    while (n < width && n < sizeof(t))
        t[n++] = '0';
    for (unsigned i = 0; i < n; i++)
        p[i] = t[n - 1 - i];
    return n;
}

static size_t
put_str(char *p, const char *s)
{
    size_t n = 0;
    for (; s[n] != '\0'; n++)
        p[n] = s[n];
    return n;
}

size_t
log_stamp_format(char out[LOG_STAMP_LEN + 1], int64_t sec, unsigned ms)
{
    if (sec < 0)
        sec = 0; /* a clock before 1970: shown as its start */
    /* The civil calendar from the days since 1970, in years that begin
     * in March (the leap day last): eras of 400 years, 146,097 days. */
    int64_t days = sec / 86400, secs = sec % 86400;
    int64_t z = days + 719468, era = z / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    int64_t day = doy - (153 * mp + 2) / 5 + 1, month = mp < 10 ? mp + 3 : mp - 9;
    int64_t year = yoe + era * 400 + (month <= 2);
    if (year > 9999)
        year = 9999; /* four digits, as the stamp's width says */
    size_t n = 0;
    n += put_uint(out + n, (unsigned long long)year, 4);
    out[n++] = '-';
    n += put_uint(out + n, (unsigned long long)month, 2);
    out[n++] = '-';
    n += put_uint(out + n, (unsigned long long)day, 2);
    out[n++] = 'T';
    n += put_uint(out + n, (unsigned long long)(secs / 3600), 2);
    out[n++] = ':';
    n += put_uint(out + n, (unsigned long long)(secs / 60 % 60), 2);
    out[n++] = ':';
    n += put_uint(out + n, (unsigned long long)(secs % 60), 2);
    out[n++] = '.';
    n += put_uint(out + n, ms % 1000, 3);
    out[n++] = 'Z';
    out[n] = '\0';
    return n;
}

/* Does the thread's name need no escaping (names of ours are literals;
 * an event sink's thread is named after its config section)? */
static bool
name_plain(const char *s)
{
    size_t n = 0;
    for (; s[n] != '\0' && n < 64; n++) {
        char c = s[n];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return n > 0 && n < 64;
}

static const char *
fatal_str(int sig)
{
    switch (sig) {
    case SIGSEGV:
        return "SEGV";
    case SIGBUS:
        return "BUS";
    case SIGILL:
        return "ILL";
    case SIGFPE:
        return "FPE";
    case SIGABRT:
        return "ABRT";
    default:
        return "other";
    }
}

/* ---- hooks on the way to dying ---- */

/* A slot's state: FREE; TAKING while log_fatal_hook_add fills it; SET;
 * RUNNING while the hook runs (log_fatal_hook_remove waits for it, so
 * that the hook's arg outlives it); RAN: once per process, so that a
 * crash after a stop given up does not write the same lines again. */
enum { HOOK_FREE, HOOK_TAKING, HOOK_SET, HOOK_RUNNING, HOOK_RAN };
#define LOG_FATAL_HOOKS 4
static struct {
    _Atomic int state;
    void (*fn)(void *arg);
    void *arg; /* borrowed: until log_fatal_hook_remove */
} fatal_hooks[LOG_FATAL_HOOKS];

int
log_fatal_hook_add(void (*fn)(void *arg), void *arg)
{
    for (int i = 0; i < LOG_FATAL_HOOKS; i++) {
        int want = HOOK_FREE;
        if (!atomic_compare_exchange_strong(&fatal_hooks[i].state, &want, HOOK_TAKING))
            continue;
        fatal_hooks[i].fn = fn;
        fatal_hooks[i].arg = arg;
        atomic_store(&fatal_hooks[i].state, HOOK_SET); /* fn and arg visible before it */
        return i;
    }
    return -ENOSPC;
}

void
log_fatal_hook_remove(int slot)
{
    if (slot < 0 || slot >= LOG_FATAL_HOOKS)
        return;
    for (;;) {
        int s = atomic_load(&fatal_hooks[slot].state);
        if (s == HOOK_RUNNING) {
            /* on the way to dying: the hook is using arg; let it end */
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
            continue;
        }
        if ((s != HOOK_SET && s != HOOK_RAN) ||
            atomic_compare_exchange_strong(&fatal_hooks[slot].state, &s, HOOK_FREE))
            return;
    }
}

static void
run_fatal_hooks(void)
{
    for (int i = 0; i < LOG_FATAL_HOOKS; i++) {
        int want = HOOK_SET;
        if (!atomic_compare_exchange_strong(&fatal_hooks[i].state, &want, HOOK_RUNNING))
            continue;
        fatal_hooks[i].fn(fatal_hooks[i].arg);
        atomic_store(&fatal_hooks[i].state, HOOK_RAN);
    }
}

/* Every batching thread's kept lines (log_flush_all, without the hooks). */
static void
flush_batches(void)
{
    for (size_t i = 0; i < LOG_BATCHES_MAX; i++) {
        struct log_batch *b = atomic_load(&log_batches[i]);
        if (b == NULL)
            continue;
        size_t len = atomic_load_explicit(&b->len, memory_order_acquire);
        if (len > sizeof(b->buf))
            len = sizeof(b->buf);
        while (len > 0 && b->buf[len - 1] != '\n')
            len--;
        write_all(b->buf, len);
        atomic_store_explicit(&b->len, 0, memory_order_relaxed);
    }
}

void
log_flush_all(void)
{
    int saved = errno;
    flush_batches();
    run_fatal_hooks();
    errno = saved;
}

void
log_fatal_signal(int sig)
{
    int saved = errno;
    flush_batches(); /* the older lines first */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char line[256];
    size_t n = log_stamp_format(line, (int64_t)ts.tv_sec, (unsigned)(ts.tv_nsec / 1000000));
    n += put_str(line + n, " level=crit ");
    const char *th = log_thread;
    if (th != NULL && name_plain(th)) {
        n += put_str(line + n, "thread=");
        n += put_str(line + n, th);
        line[n++] = ' ';
    }
    n += put_str(line + n, "event=fatal_signal signal=");
    n += put_str(line + n, fatal_str(sig));
    n += put_str(line + n, " pid=");
    n += put_uint(line + n, (unsigned long long)getpid(), 1);
    line[n++] = '\n';
    write_all(line, n);
    /* The hooks (the delivery log's lines) after the line: a hook that
     * faults on a structure torn by the crash (the kernel kills at once
     * when the signal is the one being handled; else this handler, entered
     * again, writes nothing more) cannot cost the line. */
    run_fatal_hooks();
    errno = saved;
}

static const int fatal_sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
#define NFATAL (sizeof(fatal_sigs) / sizeof(fatal_sigs[0]))
static struct sigaction fatal_old[NFATAL]; /* the actions log_catch_fatal replaced */
static atomic_flag fatal_once = ATOMIC_FLAG_INIT; /* the first fatal signal writes */

static void
log_on_fatal(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    /* Once: a second fault (another thread's, or a sanitizer's abort
     * after its report) writes nothing more. */
    if (!atomic_flag_test_and_set(&fatal_once))
        log_fatal_signal(sig);
    /* Then as if this handler had not been there: the action before it
     * (the default's core dump, or a sanitizer's report). A fault returns
     * to the instruction, which faults again; a signal sent (kill, raise,
     * abort) is sent again, and taken once this handler returns. */
    for (size_t i = 0; i < NFATAL; i++)
        if (fatal_sigs[i] == sig)
            sigaction(sig, &fatal_old[i], NULL);
    if (si == NULL || si->si_code <= 0)
        raise(sig);
}

int
log_catch_fatal(void)
{
    static bool done; /* main's thread, once: a second call would save log_on_fatal as
                       * the action to put back, and loop */
    if (done)
        return 0;
    done = true;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = log_on_fatal;
    /* On the alternate stack where the thread has one (log_altstack_init):
     * a fault of a stack overflowed has no stack left to run it on, and
     * the kernel would kill without the line. */
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    int rc = 0;
    for (size_t i = 0; i < NFATAL; i++) {
        struct sigaction old;
        if (sigaction(fatal_sigs[i], NULL, &old) < 0) {
            rc = -errno;
            continue;
        }
        /* Ignored (a supervisor's SIGABRT, inherited): it stays ignored. */
        if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_IGN)
            continue;
        fatal_old[i] = old;
        if (sigaction(fatal_sigs[i], &sa, NULL) < 0)
            rc = -errno; /* the others are caught still */
    }
    return rc;
}

/* ---- an alternate signal stack per thread ---- */

static pthread_once_t altstack_once = PTHREAD_ONCE_INIT;
static pthread_key_t altstack_key; /* a thread's mapping (guard page first), unmapped at its end */
static bool altstack_key_ok;
static size_t altstack_page, altstack_size; /* set once, by altstack_setup */
static atomic_bool altstack_warned;

/* The key's destructor, at the thread's end: the stack off first (the
 * kernel would otherwise deliver to memory unmapped), then unmapped. */
static void
altstack_release(void *base)
{
    stack_t off;
    memset(&off, 0, sizeof(off));
    off.ss_flags = SS_DISABLE;
    sigaltstack(&off, NULL);
    munmap(base, altstack_page + altstack_size);
}

static void
altstack_setup(void)
{
    long page = sysconf(_SC_PAGESIZE);
    altstack_page = page > 0 ? (size_t)page : 4096;
    /* 64 KB: the handler needs a few (a 256-octet line, write(2)); what
     * it puts back may be a sanitizer's. SIGSTKSZ is sysconf's since
     * glibc 2.34, and grows with the CPU's vector state. */
    size_t want = 64 * 1024, min = (size_t)SIGSTKSZ;
    if (min > want)
        want = min;
    altstack_size = (want + altstack_page - 1) / altstack_page * altstack_page;
    altstack_key_ok = pthread_key_create(&altstack_key, altstack_release) == 0;
}

/* Said once per process: the thread goes on without (a stack overflow
 * there dies without its line, as before). */
static int
altstack_failed(int rc)
{
    if (!atomic_exchange(&altstack_warned, true))
        log_msg(LOG_WARN, "event=altstack_failed err=\"%s\" note=a_stack_overflow_leaves_no_line",
                strerror(-rc));
    return rc;
}

int
log_altstack_init(void)
{
    pthread_once(&altstack_once, altstack_setup);
    stack_t old;
    if (sigaltstack(NULL, &old) < 0)
        return -errno;
    /* One is there already: ours (a second call), or a sanitizer's (ASan
     * gives each thread one for its own handlers, and frees it itself). */
    if (!(old.ss_flags & SS_DISABLE))
        return 0;
    if (!altstack_key_ok)
        return altstack_failed(-EAGAIN); /* no key: it could not be unmapped at the thread's end */
    void *base = mmap(NULL, altstack_page + altstack_size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (base == MAP_FAILED)
        return altstack_failed(-errno);
    /* The guard page below it (stacks grow down): a handler that
     * overflows the alternate stack faults there too, rather than
     * writing over whatever is mapped below. */
    stack_t ss;
    memset(&ss, 0, sizeof(ss));
    ss.ss_sp = (char *)base + altstack_page;
    ss.ss_size = altstack_size;
    if (mprotect(base, altstack_page, PROT_NONE) < 0 || sigaltstack(&ss, NULL) < 0) {
        int rc = -errno;
        munmap(base, altstack_page + altstack_size);
        return altstack_failed(rc);
    }
    int rc = pthread_setspecific(altstack_key, base);
    if (rc != 0) {
        altstack_release(base);
        return altstack_failed(-rc);
    }
    return 0;
}

/* ---- escaping ---- */

/* Octets of a valid UTF-8 sequence at p that a terminal or a log viewer
 * may take for a control: C1 controls (U+0080-U+009F), the line and
 * paragraph separators (U+2028/2029), the bidirectional embeddings,
 * overrides and isolates (U+202A-U+202E, U+2066-U+2069); or that a
 * reader splitting on Unicode white space (Python's str.split(), Go's
 * strings.Fields) takes for a space between fields: U+00A0, U+1680,
 * U+2000-U+200A, U+202F, U+205F, U+3000. */
static bool
utf8_escaped(const unsigned char *p, size_t l)
{
    if (l == 2)
        return p[0] == 0xc2 && p[1] <= 0xa0;
    if (l == 3 && p[0] == 0xe2 && p[1] == 0x80)
        return p[2] <= 0x8a || (p[2] >= 0xa8 && p[2] <= 0xaf);
    if (l == 3 && p[0] == 0xe2 && p[1] == 0x81)
        return (p[2] >= 0xa6 && p[2] <= 0xa9) || p[2] == 0x9f;
    if (l == 3)
        return (p[0] == 0xe1 && p[1] == 0x9a && p[2] == 0x80) ||
               (p[0] == 0xe3 && p[1] == 0x80 && p[2] == 0x80);
    return false;
}

static void
esc_put(char *out, size_t cap, size_t *len, bool *full, const void *b, size_t k)
{
    if (!*full && *len + k < cap) {
        memcpy(out + *len, b, k);
        out[*len + k] = '\0';
    } else {
        *full = true; /* nothing more: the prefix ends on a whole escape */
    }
    *len += k;
}

/* Octets kept as they are: as many as fit, cut between characters. */
static void
esc_run(char *out, size_t cap, size_t *len, bool *full, const unsigned char *b, size_t k)
{
    if (!*full && *len + k >= cap) {
        size_t fit = cap > *len + 1 ? cap - *len - 1 : 0;
        while (fit > 0 && fit < k && (b[fit] & 0xc0) == 0x80)
            fit--; /* not inside a UTF-8 sequence */
        esc_put(out, cap, len, full, b, fit);
        *len += k - fit;
        *full = true;
        return;
    }
    esc_put(out, cap, len, full, b, k);
}

size_t
log_escape(char *out, size_t cap, const char *s, size_t n, enum log_esc mode)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t len = 0;
    bool full = false;
    if (cap > 0)
        out[0] = '\0';
    size_t run = 0; /* octets kept as they are, not yet copied */
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        size_t l = 1;
        bool esc;
        if (c >= 0x80) {
            l = json_utf8_len(p + i, n - i);
            esc = l == 0 || utf8_escaped(p + i, l);
            if (l == 0)
                l = 1;
        } else {
            esc = c < 0x20 || c == 0x7f || c == '"' || c == '\\' ||
                  ((c == ' ' || c == '>') && mode == LOG_ESC_VALUE);
        }
        if (!esc) {
            run += l;
            i += l;
            continue;
        }
        esc_run(out, cap, &len, &full, p + i - run, run);
        run = 0;
        for (size_t k = 0; k < l; k++, i++) {
            char e[4] = {'\\', 0, 0, 0};
            size_t el = 2;
            switch (p[i]) {
            case '"': e[1] = '"'; break;
            case '\\': e[1] = '\\'; break;
            case '\n': e[1] = 'n'; break;
            case '\r': e[1] = 'r'; break;
            case '\t': e[1] = 't'; break;
            default:
                e[1] = 'x';
                e[2] = hex[p[i] >> 4];
                e[3] = hex[p[i] & 15];
                el = 4;
            }
            esc_put(out, cap, &len, &full, e, el);
        }
    }
    esc_run(out, cap, &len, &full, p + n - run, run);
    return len;
}

/* ---- formatting ---- */

struct line {
    char *buf;  /* cap + 1 octets at least */
    size_t len, cap;
    bool cut;   /* something did not fit: nothing more is written */
};

static void
line_put(struct line *o, const char *s, size_t n)
{
    if (o->cut)
        return;
    if (n > o->cap - o->len) {
        n = o->cap - o->len;
        o->cut = true;
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

/* The escaped text of s, padded to width (a %10s or %-10s). */
static void
line_escaped(struct line *o, const char *s, size_t n, enum log_esc mode, int width, bool left)
{
    size_t pad = 0;
    if (width > 0) {
        size_t need = log_escape(NULL, 0, s, n, mode);
        pad = (size_t)width > need ? (size_t)width - need : 0;
    }
    for (; pad > 0 && !left; pad--)
        line_put(o, " ", 1);
    if (o->cut)
        return;
    size_t room = o->cap - o->len;
    /* cap + 1: log_escape's NUL may take the octet past cap */
    size_t w = log_escape(o->buf + o->len, room + 1, s, n, mode);
    if (w > room) {
        w = strlen(o->buf + o->len); /* the prefix that fits, whole escapes only */
        o->cut = true;
    }
    o->len += w;
    for (; pad > 0; pad--)
        line_put(o, " ", 1);
}

/* An unquoted value (key=%s): quoted when it holds a space, so that
 * err=Connection refused reads err="Connection refused". */
static void
line_value(struct line *o, const char *s, size_t n, int width, bool left)
{
    if (memchr(s, ' ', n) == NULL) {
        line_escaped(o, s, n, LOG_ESC_TEXT, width, left);
        return;
    }
    line_put(o, "\"", 1);
    line_escaped(o, s, n, LOG_ESC_TEXT, width > 2 ? width - 2 : 0, left);
    line_put(o, "\"", 1);
}

/*
 * printf for log lines: the conversions the code uses (flags, width and
 * precision, '*' included; hh h l ll j z t L; d i u o x X c s p f F e E g
 * G a A %), each formatted by snprintf alone, except %s and %c, which go
 * through log_escape(). %n writes nothing.
 */
static void
line_vformat(struct line *o, const char *fmt, va_list ap)
{
    bool quoted = false; /* inside a "..." of the format */
    char prev = ' ';     /* the format's octet before the conversion */
    const char *f = fmt;
    while (*f != '\0') {
        if (*f != '%') {
            const char *e = f;
            while (*e != '\0' && *e != '%') {
                if (*e == '"')
                    quoted = !quoted;
                e++;
            }
            line_put(o, f, (size_t)(e - f));
            prev = e[-1];
            f = e;
            continue;
        }
        char spec[48];
        size_t sl = 0;
        spec[sl++] = *f++;
        bool left = false;
        while (*f != '\0' && strchr("-+ #0'", *f) != NULL && sl < 8) {
            left |= *f == '-';
            spec[sl++] = *f++;
        }
        int width = 0;
        if (*f == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                left = true;
                width = -width;
            }
            sl += (size_t)snprintf(spec + sl, sizeof(spec) - sl, "%s%d", left ? "-" : "", width);
            f++;
        } else {
            while (*f >= '0' && *f <= '9' && sl < 20) {
                width = width * 10 + (*f - '0');
                spec[sl++] = *f++;
            }
        }
        int prec = -1;
        if (*f == '.') {
            f++;
            prec = 0;
            if (*f == '*') {
                prec = va_arg(ap, int);
                f++;
            } else {
                while (*f >= '0' && *f <= '9')
                    prec = prec * 10 + (*f++ - '0');
            }
            if (prec >= 0)
                sl += (size_t)snprintf(spec + sl, sizeof(spec) - sl, ".%d", prec);
        }
        char lenmod[3] = "";
        if (*f == 'h' || *f == 'l') {
            lenmod[0] = *f++;
            if (*f == lenmod[0])
                lenmod[1] = *f++;
        } else if (*f == 'j' || *f == 'z' || *f == 't' || *f == 'L') {
            lenmod[0] = *f++;
        }
        char conv = *f;
        if (conv == '\0')
            break;
        f++;
        bool plain = sl == 1 && prec < 0; /* no flag, width or precision */
        for (const char *m = lenmod; *m != '\0'; m++)
            spec[sl++] = *m;
        spec[sl++] = conv;
        spec[sl] = '\0';
        enum log_esc mode = !quoted && (prev == '=' || prev == '<') ? LOG_ESC_VALUE : LOG_ESC_TEXT;
        char prev_fmt = prev;
        /* What the next conversion follows: the last octet of free text
         * this one writes, so that a key passed as an argument
         * (reason=%s%s%s with " detail=", value) makes the value after it
         * a value too. Not that of a value: one that ends in '=' is no
         * key, and the free text after it stays free text. */
        prev = conv;
        size_t before = o->len;
        bool free_text = mode == LOG_ESC_TEXT && (conv == 's' || conv == 'c');
        char num[512];
        int nl = -1;
        if (plain && (conv == 'u' || conv == 'd' || conv == 'i')) {
            /* the common case, without snprintf */
            unsigned long long u;
            bool neg = false;
            if (conv == 'u') {
                u = lenmod[1] == 'l'   ? va_arg(ap, unsigned long long)
                    : lenmod[0] == 'l' ? va_arg(ap, unsigned long)
                    : lenmod[0] == 'z' ? va_arg(ap, size_t)
                    : lenmod[0] == 'j' ? va_arg(ap, uintmax_t)
                    : lenmod[0] == 't' ? (unsigned long long)va_arg(ap, ptrdiff_t)
                                       : va_arg(ap, unsigned);
                if (lenmod[0] == 'h')
                    u = lenmod[1] == 'h' ? (unsigned char)u : (unsigned short)u;
            } else {
                long long v = lenmod[1] == 'l'   ? va_arg(ap, long long)
                              : lenmod[0] == 'l' ? va_arg(ap, long)
                              : lenmod[0] == 'z' ? va_arg(ap, ssize_t)
                              : lenmod[0] == 'j' ? va_arg(ap, intmax_t)
                              : lenmod[0] == 't' ? va_arg(ap, ptrdiff_t)
                                                 : va_arg(ap, int);
                if (lenmod[0] == 'h')
                    v = lenmod[1] == 'h' ? (signed char)v : (short)v;
                neg = v < 0;
                u = neg ? 0ULL - (unsigned long long)v : (unsigned long long)v;
            }
            char *e = num + sizeof(num), *q = e;
            do
                *--q = (char)('0' + u % 10);
            while ((u /= 10) != 0);
            if (neg)
                *--q = '-';
            line_put(o, q, (size_t)(e - q));
            continue;
        }
        switch (conv) {
        case '%':
            line_put(o, "%", 1);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (s == NULL)
                s = "(null)";
            size_t n = prec >= 0 ? strnlen(s, (size_t)prec) : strlen(s);
            if (!quoted && prev_fmt == '=')
                line_value(o, s, n, width, left);
            else
                line_escaped(o, s, n, mode, width, left);
            break;
        }
        case 'c': {
            char ch = (char)va_arg(ap, int);
            line_escaped(o, &ch, 1, mode, width, left);
            break;
        }
        case 'd':
        case 'i':
            if (lenmod[0] == 'l' && lenmod[1] == 'l')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, long long));
            else if (lenmod[0] == 'l')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, long));
            else if (lenmod[0] == 'j')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, intmax_t));
            else if (lenmod[0] == 'z')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, ssize_t));
            else if (lenmod[0] == 't')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, ptrdiff_t));
            else
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, int));
            break;
        case 'u':
        case 'o':
        case 'x':
        case 'X':
            if (lenmod[0] == 'l' && lenmod[1] == 'l')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, unsigned long long));
            else if (lenmod[0] == 'l')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, unsigned long));
            else if (lenmod[0] == 'j')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, uintmax_t));
            else if (lenmod[0] == 'z')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, size_t));
            else if (lenmod[0] == 't')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, ptrdiff_t));
            else
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, unsigned));
            break;
        case 'f':
        case 'F':
        case 'e':
        case 'E':
        case 'g':
        case 'G':
        case 'a':
        case 'A':
            if (lenmod[0] == 'L')
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, long double));
            else
                nl = snprintf(num, sizeof(num), spec, va_arg(ap, double));
            break;
        case 'p':
            nl = snprintf(num, sizeof(num), spec, va_arg(ap, void *));
            break;
        case 'n':
            (void)va_arg(ap, void *); /* never written */
            break;
        default: /* not a conversion of ours: shown as written */
            line_put(o, spec, sl);
            break;
        }
        if (nl > 0)
            line_put(o, num, (size_t)nl < sizeof(num) ? (size_t)nl : sizeof(num) - 1);
        if (free_text && o->len > before)
            prev = o->buf[o->len - 1];
    }
}

void
log_vmsg(enum log_level level, const char *fmt, va_list ap)
{
    if (!log_enabled(level))
        return;
    char buf[2048];
    static const char mark[] = " truncated=1";
    /* room for the mark and the newline (sizeof counts its NUL) */
    struct line o = {.buf = buf, .len = 0, .cap = sizeof(buf) - sizeof(mark), .cut = false};
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != log_stamp.sec || log_stamp.len == 0) {
        /* up to the '.' before the milliseconds */
        log_stamp.len = log_stamp_format(log_stamp.text, (int64_t)ts.tv_sec, 0) - 4;
        log_stamp.sec = ts.tv_sec;
    }
    line_put(&o, log_stamp.text, log_stamp.len);
    long ms = ts.tv_nsec / 1000000;
    char frac[4] = {(char)('0' + ms / 100), (char)('0' + ms / 10 % 10), (char)('0' + ms % 10), 'Z'};
    line_put(&o, frac, sizeof(frac));
    line_put(&o, " level=", 7);
    const char *lv = log_level_str(level);
    line_put(&o, lv, strlen(lv));
    line_put(&o, " ", 1);
    if (log_thread != NULL) {
        line_put(&o, "thread=", 7);
        line_value(&o, log_thread, strlen(log_thread), 0, false);
        line_put(&o, " ", 1);
    }
    line_vformat(&o, fmt, ap);
    size_t len = o.len;
    if (o.cut) {
        /* Cut: keep the line a line and say so. */
        memcpy(buf + len, mark, sizeof(mark) - 1);
        len += sizeof(mark) - 1;
    }
    buf[len++] = '\n';
    struct log_batch *b = log_batch;
    if (b != NULL && level < LOG_ERR) {
        size_t cap = atomic_load_explicit(&log_small_writes, memory_order_relaxed) ? PIPE_BUF
                                                                                     : sizeof(b->buf);
        if (atomic_load_explicit(&b->len, memory_order_relaxed) + len > cap)
            log_flush();
        size_t at = atomic_load_explicit(&b->len, memory_order_relaxed);
        memcpy(b->buf + at, buf, len); /* len <= sizeof(buf) < sizeof(b->buf) */
        atomic_store_explicit(&b->len, at + len, memory_order_release);
        return;
    }
    /* An error goes out at once, after what the thread kept (in order). */
    log_flush();
    write_all(buf, len);
}

void
log_msg(enum log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_vmsg(level, fmt, ap);
    va_end(ap);
}
