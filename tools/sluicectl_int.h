/*
 * sluicectl_int.h: what the pieces of sluicectl share: the connection to
 * sluice's stats socket (struct ctl), the export's file made here, the
 * tables, the command table's entries (struct cmd) and the functions each
 * piece gives the others. Not an interface of sluice: tools/ only.
 *
 * Threading: one thread (see sluicectl.c).
 */
#ifndef SLUICE_TOOLS_SLUICECTL_INT_H
#define SLUICE_TOOLS_SLUICECTL_INT_H

#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include <cjson/cJSON.h>

#define DEFAULT_SOCKET  "/run/sluice/stats.sock"
#define TIMEOUT_MS      10000
#define LINE_MAX_OCTETS 4096 /* the server's STATS_LINE_MAX */
#define DOMAINS_MAX     1000
#define SCOPED_BULK_TIMEOUT_MS (30u * 60 * 1000) /* flush, bounce: a spool of millions */

enum { EXIT_OK = 0, EXIT_REFUSED = 1, EXIT_USAGE = 2, EXIT_UNREACHABLE = 3 };

struct ctl {
    const char *path; /* borrowed: argv or the environment */
    const char *path_from; /* static: where path came from, for the operator */
    bool json;
    int fd;    /* -1: not connected yet */
    char *buf; /* owned: what was read and not yet used */
    size_t len, cap;
    char *last; /* owned: the text of the last answer, for --json */
    unsigned timeout_ms; /* per request; 0: TIMEOUT_MS */
    int pass_fd; /* owned: a file sent with the next request (SCM_RIGHTS), then closed; -1: none */
};

/* Set by on_signal (top's SIGINT and SIGTERM): a wait in progress ends early. */
extern volatile sig_atomic_t interrupted;

/* The file made for an export until sluice answered it ok (see
 * sluicectl_client.c). */
struct made {
    char path[PATH_MAX + 1]; /* "": none */
    dev_t dev;
    ino_t ino;
};
extern struct made made;

#define COLS_MAX 17 /* the domains view's */

struct table {
    unsigned ncols;
    unsigned right; /* bit c: column c is right-aligned */
    size_t nrows, cap;
    char **cells;  /* owned: nrows * ncols strings */
    bool *heading; /* owned: a row printed as is, first cell only */
    size_t w[COLS_MAX]; /* widths of the rows flushed before (table_flush) */
};

struct cmd;
typedef int cmd_fn(struct ctl *c, const struct cmd *cmd, int argc, char **argv);

struct cmd {
    const char *name, *args, *about, *more;
    int min, max;
    cmd_fn *run;
};

/* sluicectl_client.c: signals, errors, the socket and its requests */
void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
void on_signal_made(int sig);
void made_signals(bool block, sigset_t *old);
void on_signal(int sig);
bool output_reader_gone(void);
void ctl_connect(struct ctl *c);
void ctl_close(struct ctl *c);
cJSON *ctl_ask(struct ctl *c, const char *line, const char **raw);

/* sluicectl_render.c: cells, tables, the stats, domains and generic views */
char *cell_buf(void);
const cJSON *get(const cJSON *o, const char *path);
bool num(const cJSON *o, const char *path, double *out);
const char *fmt_count_d(double v);
const char *fmt_count(const cJSON *o, const char *path);
const char *fmt_bytes(const cJSON *o, const char *path);
const char *fmt_duration(const cJSON *o, const char *path);
const char *fmt_str(const cJSON *o, const char *path);
void table_init(struct table *t, unsigned ncols, unsigned right);
void table_row(struct table *t, ...);
void table_flush(struct table *t, FILE *f);
void table_print(struct table *t, FILE *f);
void print_header(const cJSON *st);
void print_rates(const cJSON *st);
void render_stats(const cJSON *st);
void render_domains(const cJSON *doc, size_t limit);
void render_generic(const cJSON *doc);

/* sluicectl_views.c: the commands but suppress, with their renderers */
long parse_number(const char *what, const char *s, long min, long max);
void check_word(const char *cmd, const char *what, const char *s);
int run_plain(struct ctl *c, const struct cmd *cmd, int argc, char **argv);
int run_scoped(struct ctl *c, const struct cmd *cmd, int argc, char **argv);
int run_domains(struct ctl *c, const struct cmd *cmd, int argc, char **argv);
int run_sites(struct ctl *c, const struct cmd *cmd, int argc, char **argv);
int run_events(struct ctl *c, const struct cmd *cmd, int argc, char **argv);
int run_warmup(struct ctl *c, const struct cmd *cmd, int argc, char **argv);
int run_shaping(struct ctl *c, const struct cmd *cmd, int argc, char **argv);
int run_top(struct ctl *c, const struct cmd *cmd, int argc, char **argv);

/* sluicectl_suppress.c */
int run_suppress(struct ctl *c, const struct cmd *cmd, int argc, char **argv);

#endif
