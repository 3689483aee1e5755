/*
 * harness: see harness.h. The waits here are bounded and event-driven:
 * dnsmasq's readiness is a query it answers, a log line is waited for
 * with inotify.
 */
#include "tests/dns/harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/clock.h"

static const char *
dnsmasq_path(void)
{
    static const char *const paths[] = {"/usr/sbin/dnsmasq", "/usr/bin/dnsmasq",
                                        "/usr/local/sbin/dnsmasq"};
    for (size_t i = 0; i < sizeof(paths) / sizeof(paths[0]); i++)
        if (access(paths[i], X_OK) == 0)
            return paths[i];
    return NULL;
}

/* A port free for both UDP and TCP on 127.0.0.1, below the ephemeral
 * range so that no client socket takes it meanwhile. */
static int
pick_port(void)
{
    static unsigned seed;
    if (seed == 0)
        seed = (unsigned)getpid() ^ (unsigned)clock_mono_ns();
    for (int tries = 0; tries < 200; tries++) {
        int port = 20000 + (int)(rand_r(&seed) % 12000);
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        bool ok = u >= 0 && t >= 0 && bind(u, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
                  bind(t, (struct sockaddr *)&sa, sizeof(sa)) == 0;
        if (u >= 0)
            close(u);
        if (t >= 0)
            close(t);
        if (ok)
            return port;
    }
    return -1;
}

static int
write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    int rc = fputs(text, f) < 0 ? -1 : 0;
    if (fclose(f) != 0)
        rc = -1;
    return rc;
}

static void
show_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    char line[512];
    while (fgets(line, sizeof(line), f) != NULL)
        fprintf(stderr, "  | %s", line);
    fclose(f);
}

static void
remove_dir(const char *dir)
{
    static const char *const files[] = {"dnsmasq.conf", "dnsmasq.log", "stderr"};
    char p[160];
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
}

/* A child that waits for the test's end of a pipe to close, then kills
 * dnsmasq: the cleanup of every exit path the test cannot run itself. */
static void
watchdog_start(struct dnsmasq *m)
{
    int p[2];
    m->watchdog = 0;
    m->watch_fd = -1;
    if (pipe2(p, O_CLOEXEC) < 0)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        /* No PR_SET_PDEATHSIG here: it would kill us before we read EOF. */
        /* hold nothing of the test's but the read end */
        close_range(3, (unsigned)p[0] - 1, 0);
        close_range((unsigned)p[0] + 1, ~0u, 0);
        char c;
        while (read(p[0], &c, 1) < 0 && errno == EINTR)
            ;
        kill(m->pid, SIGKILL);
        remove_dir(m->dir);
        _exit(0);
    }
    close(p[0]);
    if (pid < 0) {
        close(p[1]);
        return;
    }
    m->watchdog = pid;
    m->watch_fd = p[1];
}

static void
reap(struct dnsmasq *m)
{
    /* The watchdog first: once dnsmasq is reaped its PID may be reused. */
    if (m->watchdog > 0) {
        kill(m->watchdog, SIGKILL);
        while (waitpid(m->watchdog, NULL, 0) < 0 && errno == EINTR)
            ;
        m->watchdog = 0;
    }
    if (m->watch_fd >= 0)
        close(m->watch_fd);
    m->watch_fd = -1;
    if (m->pid <= 0)
        return;
    kill(m->pid, SIGTERM);
    while (waitpid(m->pid, NULL, 0) < 0 && errno == EINTR)
        ;
    m->pid = 0;
}

int
dnsmasq_start(struct dnsmasq *m, const char *records, unsigned local_ttl)
{
    memset(m, 0, sizeof(*m));
    m->watch_fd = -1;
    const char *bin = dnsmasq_path();
    if (bin == NULL) {
        fprintf(stderr, "dnsmasq is not installed (tools/install-deps --test installs "
                        "dnsmasq-base): skipping\n");
        return HARNESS_SKIP;
    }
    snprintf(m->dir, sizeof(m->dir), "/tmp/sluice-dns-XXXXXX");
    if (mkdtemp(m->dir) == NULL) {
        perror("mkdtemp");
        return -1;
    }
    char conf[160], err[160];
    snprintf(conf, sizeof(conf), "%s/dnsmasq.conf", m->dir);
    snprintf(m->log, sizeof(m->log), "%s/dnsmasq.log", m->dir);
    snprintf(err, sizeof(err), "%s/stderr", m->dir);
    /* Every name under .test is ours: unknown ones are NXDOMAIN, never
     * forwarded (there is no upstream anyway). */
    size_t len = strlen(records) + 64;
    char *text = malloc(len);
    if (text == NULL)
        return -1;
    snprintf(text, len, "local=/test/\n%s", records);
    int rc = write_file(conf, text);
    free(text);
    if (rc < 0) {
        perror(conf);
        remove_dir(m->dir);
        return -1;
    }
    for (int attempt = 0; attempt < 5; attempt++) {
        m->port = pick_port();
        if (m->port < 0)
            break;
        char a_conf[200], a_port[32], a_log[200], a_ttl[32];
        snprintf(a_conf, sizeof(a_conf), "--conf-file=%s", conf);
        snprintf(a_port, sizeof(a_port), "--port=%d", m->port);
        snprintf(a_log, sizeof(a_log), "--log-facility=%s", m->log);
        snprintf(a_ttl, sizeof(a_ttl), "--local-ttl=%u", local_ttl);
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            break;
        }
        if (pid == 0) {
            int fd = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
            }
            /* As root dnsmasq would drop to "nobody", who cannot write the
             * log in our temp dir. */
            const char *argv[] = {"dnsmasq",
                                  "--keep-in-foreground",
                                  a_conf,
                                  a_port,
                                  "--listen-address=127.0.0.1",
                                  "--bind-interfaces",
                                  "--no-resolv",
                                  "--no-hosts",
                                  "--log-queries",
                                  a_log,
                                  "--pid-file",
                                  a_ttl,
                                  geteuid() == 0 ? "--user=root" : NULL,
                                  NULL};
            execv(bin, (char *const *)argv);
            _exit(127);
        }
        m->pid = pid;
        watchdog_start(m);
        /* Ready when it answers; bounded: 10 s (a loaded machine). */
        for (int i = 0; i < 50; i++) {
            if (raw_query(m->port, "ready.test", 1, 200) >= 0)
                return 0;
            if (waitpid(pid, NULL, WNOHANG) == pid) {
                m->pid = 0;
                break; /* e.g. the port was taken after all: try another */
            }
        }
        reap(m);
    }
    fprintf(stderr, "dnsmasq did not start; its output:\n");
    show_file(err);
    show_file(m->log);
    remove_dir(m->dir);
    return -1;
}

void
dnsmasq_stop(struct dnsmasq *m)
{
    reap(m);
    if (m->dir[0] != '\0')
        remove_dir(m->dir);
    m->dir[0] = '\0';
}

static char *
read_all(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return NULL;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        if (len + 1 == cap) {
            char *nb = realloc(buf, cap * 2);
            if (nb == NULL) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t n = fread(buf + len, 1, cap - len - 1, f);
        if (n == 0)
            break;
        len += n;
    }
    fclose(f);
    if (buf != NULL)
        buf[len] = '\0';
    return buf;
}

static int
count_in(const char *text, const char *needle)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    return n;
}

int
dnsmasq_count(struct dnsmasq *m, const char *type, const char *name)
{
    char mark[64], needle[300];
    snprintf(mark, sizeof(mark), "mark-%u.test", ++m->marks);
    int in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    if (in < 0 || inotify_add_watch(in, m->log, IN_MODIFY) < 0) {
        if (in >= 0)
            close(in);
        return -1;
    }
    int rc = -1;
    if (raw_query(m->port, mark, 1, 2000) < 0)
        goto out;
    snprintf(needle, sizeof(needle), "query[A] %s from", mark);
    uint64_t end = clock_mono_ns() + 5000000000ULL;
    for (;;) {
        char *text = read_all(m->log);
        if (text != NULL && strstr(text, needle) != NULL) {
            snprintf(needle, sizeof(needle), "query[%s] %s from", type, name);
            rc = count_in(text, needle);
            free(text);
            break;
        }
        free(text);
        if (clock_mono_ns() >= end)
            break;
        struct pollfd p = {.fd = in, .events = POLLIN};
        poll(&p, 1, 500);
        char ev[4096];
        while (read(in, ev, sizeof(ev)) > 0)
            ;
    }
out:
    close(in);
    return rc;
}

int
silent_server(int *port)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(sa);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(sa.sin_port);
    return fd;
}

/* name in wire form (no compression) at out[at]; returns the offset past
 * it, 0 when it does not fit or a label is empty or too long. */
static size_t
put_name(uint8_t *out, size_t at, size_t cap, const char *name)
{
    while (*name != '\0') {
        const char *dot = strchr(name, '.');
        size_t n = dot != NULL ? (size_t)(dot - name) : strlen(name);
        if (n == 0 || n > 63 || at + 1 + n >= cap)
            return 0;
        out[at++] = (uint8_t)n;
        memcpy(out + at, name, n);
        at += n;
        name += n + (dot != NULL);
    }
    if (at >= cap)
        return 0;
    out[at++] = 0;
    return at;
}

int
raw_query(int port, const char *name, uint16_t type, int timeout_ms)
{
    uint8_t q[300];
    static uint16_t id = 1;
    id++;
    size_t n = 0;
    q[n++] = (uint8_t)(id >> 8);
    q[n++] = (uint8_t)id;
    q[n++] = 0x01; /* RD */
    q[n++] = 0;
    q[n++] = 0;
    q[n++] = 1; /* one question */
    memset(q + n, 0, 6);
    n += 6;
    n = put_name(q, n, sizeof(q) - 4, name);
    if (n == 0)
        return -1;
    q[n++] = (uint8_t)(type >> 8);
    q[n++] = (uint8_t)type;
    q[n++] = 0;
    q[n++] = 1;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int rc = -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        goto out;
    /* Resend every 20 ms: while nobody listens yet the kernel refuses at
     * once, and a lost datagram is not worth the whole timeout. */
    uint64_t end = clock_mono_ns() + (uint64_t)timeout_ms * 1000000ULL;
    uint64_t resend = 0;
    for (;;) {
        uint64_t now = clock_mono_ns();
        if (now >= end)
            break;
        if (now >= resend) {
            if (send(fd, q, n, 0) < 0 && errno != ECONNREFUSED)
                break;
            resend = now + 20000000ULL;
        }
        uint64_t until = resend < end ? resend : end;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)((until - now + 999999) / 1000000)) <= 0)
            continue;
        uint8_t a[4096];
        ssize_t got = recv(fd, a, sizeof(a), 0);
        if (got >= 12 && a[0] == q[0] && a[1] == q[1]) {
            rc = a[3] & 0x0F;
            break;
        }
        /* got < 0 (ECONNREFUSED): wait for the next resend */
    }
out:
    close(fd);
    return rc;
}

/* ---- poll loop ---- */

void
ploop_init(struct ploop *l)
{
    memset(l, 0, sizeof(*l));
}

void
ploop_sock(void *arg, int fd, bool readable, bool writable)
{
    struct ploop *l = arg;
    l->changes++;
    unsigned i = 0;
    while (i < l->n && l->fds[i].fd != fd)
        i++;
    if (!readable && !writable) {
        if (i < l->n)
            l->fds[i] = l->fds[--l->n];
        return;
    }
    if (i == l->n) {
        if (l->n == PLOOP_MAX)
            abort();
        l->n++;
        l->fds[i].fd = fd;
    }
    l->fds[i].events = (short)((readable ? POLLIN : 0) | (writable ? POLLOUT : 0));
    l->fds[i].revents = 0;
}

int
ploop_run(struct ploop *l, const unsigned *done, unsigned want, int timeout_ms)
{
    uint64_t end = clock_mono_ns() + (uint64_t)timeout_ms * 1000000ULL;
    while (*done < want) {
        uint64_t now = clock_mono_ns();
        if (now >= end)
            return -1;
        uint64_t t = dns_timeout(l->d, now);
        uint64_t wait = t == UINT64_MAX ? end - now : t > now ? t - now : 0;
        if (wait > end - now)
            wait = end - now;
        int n = poll(l->fds, l->n, (int)((wait + 999999) / 1000000));
        if (n < 0 && errno != EINTR)
            return -1;
        /* Callbacks change the set while we walk it: take the ready ones
         * first. A closed and reopened fd may get a stale event; c-ares
         * reads nothing then. */
        struct {
            int fd;
            bool rd, wr;
        } ready[PLOOP_MAX];
        unsigned k = 0;
        for (unsigned i = 0; n > 0 && i < l->n; i++) {
            short re = l->fds[i].revents;
            if (re == 0)
                continue;
            bool broken = (re & (POLLERR | POLLHUP | POLLNVAL)) != 0;
            ready[k].fd = l->fds[i].fd;
            ready[k].rd = (l->fds[i].events & POLLIN) && ((re & POLLIN) || broken);
            ready[k].wr = (l->fds[i].events & POLLOUT) && ((re & POLLOUT) || broken);
            k++;
        }
        for (unsigned i = 0; i < k; i++)
            dns_process_fd(l->d, ready[i].fd, ready[i].rd, ready[i].wr);
        now = clock_mono_ns();
        if (dns_timeout(l->d, now) <= now)
            dns_process_timeouts(l->d);
    }
    return 0;
}

void
harness_config(struct dns_config *cfg, int port)
{
    char err[256], servers[64];
    memset(cfg, 0, sizeof(*cfg));
    if (conf_defaults(dns_conf_keys, cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "dns defaults: %s\n", err);
        abort();
    }
    snprintf(servers, sizeof(servers), "127.0.0.1:%d", port);
    if (conf_set(dns_conf_keys, cfg, "servers", servers, err, sizeof(err)) < 0) {
        fprintf(stderr, "servers: %s\n", err);
        abort();
    }
}

/* ---- the scripted server ---- */

/* The rdata of rr into out; returns its length, 0 when it does not parse. */
static size_t
put_rdata(uint8_t *out, size_t cap, const struct script_rr *rr)
{
    unsigned pref, u, sel, mt;
    int off = 0;
    switch (rr->type) {
    case 1:
        return inet_pton(AF_INET, rr->data, out) == 1 ? 4 : 0;
    case 28:
        return inet_pton(AF_INET6, rr->data, out) == 1 ? 16 : 0;
    case 2: /* NS */
    case 5:
        return put_name(out, 0, cap, rr->data);
    case 16: { /* character-strings separated by '|' */
        size_t n = 0;
        for (const char *p = rr->data;;) {
            size_t l = strcspn(p, "|");
            if (l > 255 || n + 1 + l > cap)
                return 0;
            out[n++] = (uint8_t)l;
            memcpy(out + n, p, l);
            n += l;
            if (p[l] == '\0')
                return n;
            p += l + 1;
        }
    }
    case 15: {
        char host[256];
        if (sscanf(rr->data, "%u %255s", &pref, host) != 2)
            return 0;
        out[0] = (uint8_t)(pref >> 8);
        out[1] = (uint8_t)pref;
        return put_name(out, 2, cap, host);
    }
    case 6: { /* "MNAME RNAME SERIAL REFRESH RETRY EXPIRE MINIMUM" */
        char mname[128], rname[128];
        unsigned v[5];
        if (sscanf(rr->data, "%127s %127s %u %u %u %u %u", mname, rname, &v[0], &v[1], &v[2],
                   &v[3], &v[4]) != 7)
            return 0;
        size_t n = put_name(out, 0, cap, mname);
        if (n != 0)
            n = put_name(out, n, cap, rname);
        if (n == 0 || n + 20 > cap)
            return 0;
        for (int i = 0; i < 5; i++, n += 4) {
            out[n] = (uint8_t)(v[i] >> 24);
            out[n + 1] = (uint8_t)(v[i] >> 16);
            out[n + 2] = (uint8_t)(v[i] >> 8);
            out[n + 3] = (uint8_t)v[i];
        }
        return n;
    }
    case 52: {
        if (sscanf(rr->data, "%u %u %u %n", &u, &sel, &mt, &off) != 3)
            return 0;
        out[0] = (uint8_t)u;
        out[1] = (uint8_t)sel;
        out[2] = (uint8_t)mt;
        size_t n = 3;
        for (const char *h = rr->data + off; h[0] != '\0' && h[1] != '\0' && n < cap; h += 2) {
            unsigned byte;
            if (sscanf(h, "%2x", &byte) != 1)
                return 0;
            out[n++] = (uint8_t)byte;
        }
        return n;
    }
    default:
        return 0;
    }
}

/* The reply to the query q (qlen bytes) into out; returns its length, or
 * 0 to drop the query. */
static size_t
script_reply(struct script_server *s, const uint8_t *q, size_t qlen, uint8_t *out, size_t cap)
{
    if (qlen < 12 || (q[2] & 0x80) != 0 || q[4] != 0 || q[5] != 1)
        return 0;
    unsigned *nq = &s->hits[s->n];
    unsigned k = __atomic_load_n(nq, __ATOMIC_SEQ_CST);
    if (k < SCRIPT_QIDS_MAX) {
        __atomic_store_n(&nq[1 + k], (unsigned)(q[0] << 8 | q[1]), __ATOMIC_SEQ_CST);
        __atomic_store_n(nq, k + 1, __ATOMIC_SEQ_CST);
    }
    char name[256];
    size_t at = 12, nl = 0;
    while (at < qlen && q[at] != 0) {
        size_t n = q[at];
        if ((n & 0xC0) != 0 || at + 1 + n > qlen || nl + n + 1 >= sizeof(name))
            return 0;
        if (nl > 0)
            name[nl++] = '.';
        for (size_t i = 0; i < n; i++) {
            char c = (char)q[at + 1 + i];
            name[nl++] = c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
        }
        at += 1 + n;
    }
    name[nl] = '\0';
    if (at + 5 > qlen)
        return 0;
    uint16_t qtype = (uint16_t)(q[at + 1] << 8 | q[at + 2]);
    size_t qend = at + 5;
    const struct script_answer *a = NULL;
    for (unsigned i = 0; i < s->n && a == NULL; i++)
        if (s->table[i].qtype == qtype && strcmp(s->table[i].qname, name) == 0) {
            a = &s->table[i];
            __atomic_fetch_add(&s->hits[i], 1, __ATOMIC_SEQ_CST);
        }
    if (qend > cap)
        return 0;
    memcpy(out, q, qend);
    out[2] = (uint8_t)(0x80 | (q[2] & 0x01)); /* QR, RD as asked */
    out[3] = (uint8_t)(0x80 | (a != NULL && a->ad ? 0x20 : 0) | (a != NULL ? a->rcode : 5));
    memset(out + 6, 0, 6); /* AN, NS, AR */
    size_t len = qend;
    unsigned an = 0, ns = 0;
    for (unsigned i = 0; a != NULL && i < SCRIPT_RR_MAX && a->rr[i].owner != NULL; i++) {
        const struct script_rr *rr = &a->rr[i];
        if ((rr->type == 6 || rr->type == 2) && qtype != rr->type)
            ns++; /* the authority section's: the table lists them last */
        else if (ns > 0)
            return 0; /* an answer record after one: the table is wrong */
        else
            an++;
        len = put_name(out, len, cap, rr->owner);
        if (len == 0 || len + 10 >= cap)
            return 0;
        uint8_t *h = out + len;
        h[0] = (uint8_t)(rr->type >> 8);
        h[1] = (uint8_t)rr->type;
        h[2] = 0;
        h[3] = 1;                                  /* IN */
        h[4] = h[5] = 0, h[6] = 0x01, h[7] = 0x2c; /* TTL 300 */
        size_t rd = put_rdata(out + len + 10, cap - len - 10, rr);
        if (rd == 0)
            return 0;
        h[8] = (uint8_t)(rd >> 8);
        h[9] = (uint8_t)rd;
        len += 10 + rd;
    }
    out[7] = (uint8_t)an;
    out[9] = (uint8_t)ns;
    return len;
}

/* The shared counters: hits per entry, the count of ids, the ids. */
static size_t
script_map_len(unsigned n)
{
    return (n + 1 + SCRIPT_QIDS_MAX) * sizeof(unsigned);
}

int
script_start(struct script_server *s, const struct script_answer *table, unsigned n)
{
    memset(s, 0, sizeof(*s));
    s->table = table;
    s->n = n;
    s->hits =
        mmap(NULL, script_map_len(n), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (s->hits == MAP_FAILED) {
        s->hits = NULL;
        fprintf(stderr, "script server: mmap: %s\n", strerror(errno));
        return -1;
    }
    int fd = silent_server(&s->port);
    if (fd < 0) {
        fprintf(stderr, "script server: socket: %s\n", strerror(errno));
        script_stop(s);
        return -1;
    }
    pid_t parent = getpid();
    s->pid = fork();
    if (s->pid < 0) {
        fprintf(stderr, "script server: fork: %s\n", strerror(errno));
        close(fd);
        script_stop(s);
        return -1;
    }
    if (s->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        for (;;) {
            uint8_t q[1500], r[1500];
            struct sockaddr_storage from;
            socklen_t flen = sizeof(from);
            ssize_t got = recvfrom(fd, q, sizeof(q), 0, (struct sockaddr *)&from, &flen);
            if (got < 0)
                continue;
            size_t len = script_reply(s, q, (size_t)got, r, sizeof(r));
            if (len > 0)
                sendto(fd, r, len, 0, (struct sockaddr *)&from, flen);
        }
    }
    /* The socket was bound before the fork: queries sent from now on wait
     * in its buffer for the child, so no readiness wait is needed. */
    close(fd);
    return 0;
}

void
script_stop(struct script_server *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
        s->pid = 0;
    }
    if (s->hits != NULL)
        munmap(s->hits, script_map_len(s->n));
    s->hits = NULL;
}

int
script_hits(const struct script_server *s, const char *qname, uint16_t qtype)
{
    for (unsigned i = 0; i < s->n; i++)
        if (s->table[i].qtype == qtype && strcmp(s->table[i].qname, qname) == 0)
            return (int)__atomic_load_n(&s->hits[i], __ATOMIC_SEQ_CST);
    return -1;
}

unsigned
script_qids(const struct script_server *s, uint16_t *out, unsigned max)
{
    const unsigned *nq = &s->hits[s->n];
    unsigned k = __atomic_load_n(nq, __ATOMIC_SEQ_CST);
    if (k > max)
        k = max;
    for (unsigned i = 0; i < k; i++)
        out[i] = (uint16_t)__atomic_load_n(&nq[1 + i], __ATOMIC_SEQ_CST);
    return k;
}
