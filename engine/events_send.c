/*
 * events_send: sending one batch of a sink (see events_int.h for the
 * other files of the event push): the webhook, a JSON array POSTed with
 * libcurl's easy interface (one handle per sink, reused for keep-alive),
 * signed with an HMAC-SHA256 header when the sink has a secret, its
 * answer read up to HTTP_ANSWER_MAX and classified (2xx acknowledges; a
 * 413 and a 4xx that refuses the events are told apart from the rest);
 * and the Redis stream, the batch's events XADDed pipelined on one
 * hiredis context per sink (a new connection answers an AUTH or a PING
 * first). Both run on the sink's thread and give up a request in flight
 * when the sink stops.
 *
 * Threading: the sink's thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/json.h"
#include "common/log.h"
#include "engine/events_int.h"

/* ---- signature ---- */

void
events_sign(const char *secret, uint64_t ts, const char *body, size_t len, char *out)
{
    unsigned char mac[EVP_MAX_MD_SIZE];
    size_t maclen = 0;
    char prefix[32];
    int pn = snprintf(prefix, sizeof(prefix), "%" PRIu64 ".", ts);
    EVP_MAC *m = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *c = m != NULL ? EVP_MAC_CTX_new(m) : NULL;
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0),
                           OSSL_PARAM_construct_end()};
    if (c == NULL || !EVP_MAC_init(c, (const unsigned char *)secret, strlen(secret), params) ||
        !EVP_MAC_update(c, (const unsigned char *)prefix, (size_t)pn) ||
        !EVP_MAC_update(c, (const unsigned char *)body, len) ||
        !EVP_MAC_final(c, mac, &maclen, sizeof(mac)))
        maclen = 0;
    EVP_MAC_CTX_free(c);
    EVP_MAC_free(m);
    static const char hex[] = "0123456789abcdef";
    memcpy(out, "sha256=", 7);
    for (size_t i = 0; i < maclen; i++) {
        out[7 + 2 * i] = hex[mac[i] >> 4];
        out[8 + 2 * i] = hex[mac[i] & 15];
    }
    out[7 + 2 * maclen] = '\0';
}

/* ---- HTTP ---- */

/* The answer's body means nothing (the status is the answer): read and
 * dropped, up to HTTP_ANSWER_MAX; past it the transfer stops (the
 * connection is closed), so an endless or huge body costs no more. */
static size_t
discard(char *p, size_t size, size_t n, void *arg)
{
    (void)p;
    struct sink *s = arg;
    s->answer_len += size * n;
    return s->answer_len > HTTP_ANSWER_MAX ? 0 : size * n;
}

/* libcurl calls this while a request runs: a stop abandons it (the
 * batch is sent again from the cursor after the restart). */
static int
http_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
    (void)dltotal;
    (void)dlnow;
    (void)ultotal;
    (void)ulnow;
    const struct sink *s = arg;
    return atomic_load(&s->ev->stopping) || atomic_load(&s->quit) ? 1 : 0;
}

int
sink_http_init(struct sink *s)
{
    s->curl = curl_easy_init();
    if (s->curl == NULL)
        return -ENOMEM;
    CURL *c = s->curl;
    curl_easy_setopt(c, CURLOPT_URL, s->cfg.url);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)s->cfg.timeout);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)s->cfg.timeout);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, s);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, s->curl_err);
    curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, http_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, s);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "sluice/" SLUICE_VERSION);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    if (s->cfg.ca_file != NULL)
        curl_easy_setopt(c, CURLOPT_CAINFO, s->cfg.ca_file);
    return 0;
}

/*
 * Whether an HTTP status refuses the events sent, so that sending them
 * again can only be refused again: a 4xx but those that say nothing
 * about the body (a wrong secret or URL refuses every batch alike, and
 * dropping events one by one would empty the backlog into the log), those
 * that ask to come back later, and 413 (the batch's size, not its
 * events: halved).
 */
bool
sink_http_refuses(long code)
{
    switch (code) {
    case 401: /* Unauthorized: a wrong secret */
    case 403: /* Forbidden: an address or credentials refused */
    case 404: /* Not Found, 405 Method Not Allowed, 410 Gone: a wrong URL */
    case 405:
    case 407: /* Proxy Authentication Required */
    case 408: /* Request Timeout */
    case 410:
    case 413: /* Content Too Large: halved (HTTP_TOO_LARGE) */
    case 421: /* Misdirected Request */
    case 425: /* Too Early */
    case 429: /* Too Many Requests */
        return false;
    default:
        return code >= 400 && code <= 499;
    }
}

/* POST the batch. Returns 0 on a 2xx, else -1 with the reason in err. A
 * 2xx status acknowledges the batch whatever happens to the body after
 * it (cut short, too long, a stop): the endpoint took the batch; sending
 * it again would only repeat it, and for an endpoint that always answers
 * so, for ever. A 413 returns HTTP_TOO_LARGE, a status sink_http_refuses
 * HTTP_REFUSED; *status is the status (0: none). */
int
sink_http_send(struct sink *s, long *status, char *err, size_t errlen)
{
    *status = 0;
    uint64_t ts = clock_unix_ms() / 1000;
    char line[128], sig[80];
    curl_slist_free_all(s->headers);
    s->headers = NULL;
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    snprintf(line, sizeof(line), EVENTS_TS_HEADER ": %" PRIu64, ts);
    if (h != NULL)
        h = curl_slist_append(h, line);
    if (h != NULL && s->cfg.secret != NULL) {
        events_sign(s->cfg.secret, ts, s->body.buf, s->body.len, sig);
        snprintf(line, sizeof(line), EVENTS_SIG_HEADER ": %s", sig);
        h = curl_slist_append(h, line);
    }
    if (h != NULL)
        h = curl_slist_append(h, "Expect:"); /* no 100-continue round trip */
    if (h == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    s->headers = h;
    curl_easy_setopt(s->curl, CURLOPT_HTTPHEADER, s->headers);
    curl_easy_setopt(s->curl, CURLOPT_POSTFIELDS, s->body.buf);
    curl_easy_setopt(s->curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)s->body.len);
    s->curl_err[0] = '\0';
    s->answer_len = 0;
    CURLcode rc = curl_easy_perform(s->curl);
    long code = 0; /* this transfer's: libcurl clears it as a transfer starts */
    curl_easy_getinfo(s->curl, CURLINFO_RESPONSE_CODE, &code);
    *status = code;
    /* A 429 or 503 may say when to come back (RFC 9110 10.2.3: seconds or
     * a date, which libcurl turns into seconds): the backoff heeds it. */
    curl_off_t after = 0;
    s->retry_after_ms = 0;
    if ((code == 429 || code == 503) &&
        curl_easy_getinfo(s->curl, CURLINFO_RETRY_AFTER, &after) == CURLE_OK && after > 0)
        s->retry_after_ms = after > 86400 ? 86400000u : (uint64_t)after * 1000u;
    if (code >= 200 && code <= 299)
        return 0;
    if (code != 0) /* the status says more than what became of its body */
        snprintf(err, errlen, "HTTP status %ld", code);
    else
        snprintf(err, errlen, "%.180s", s->curl_err[0] ? s->curl_err : curl_easy_strerror(rc));
    return code == 413 ? HTTP_TOO_LARGE : sink_http_refuses(code) ? HTTP_REFUSED : -1;
}

/* ---- Redis ---- */

void
sink_redis_drop(struct sink *s)
{
    if (s->redis == NULL)
        return;
    pthread_mutex_lock(&s->ev->mu);
    s->redis_fd = -1; /* closed below: a stop no longer touches it */
    pthread_mutex_unlock(&s->ev->mu);
    redisFree(s->redis);
    s->redis = NULL;
}

/* A stop abandons the request in flight: libcurl's through its progress
 * callback, a Redis one (hiredis blocks in read or write until the
 * timeout) by shutting its socket down, which ends the wait at once.
 * mu held. */
void
sink_abort_locked(struct sink *s)
{
    if (s->redis_fd >= 0)
        shutdown(s->redis_fd, SHUT_RDWR);
}

static int
redis_connect(struct sink *s, char *err, size_t errlen)
{
    struct timeval tv = {.tv_sec = (time_t)(s->cfg.timeout / 1000),
                         .tv_usec = (suseconds_t)(s->cfg.timeout % 1000 * 1000)};
    s->redis = redisConnectWithTimeout(s->host, s->port, tv);
    if (s->redis == NULL || s->redis->err) {
        snprintf(err, errlen, "connect %.64s:%d: %.100s", s->host, s->port,
                 s->redis ? s->redis->errstr : "out of memory");
        sink_redis_drop(s);
        return -1;
    }
    redisSetTimeout(s->redis, tv);
    pthread_mutex_lock(&s->ev->mu);
    s->redis_fd = s->redis->fd;
    if (s->ev->stop || s->stop) /* the stop came during the connect */
        sink_abort_locked(s);
    pthread_mutex_unlock(&s->ev->mu);
    /* A first command answered before any XADD: a Redis at maxclients
     * writes "-ERR max number of clients reached" on a connection it
     * takes, before it reads a command, and closes it; read as an XADD's
     * answer, that error would drop the event as refused. AUTH when
     * there is a password, else a PING, which a user allowed XADD alone
     * may see refused with -NOPERM: answered all the same. */
    bool ping = s->password[0] == '\0';
    redisReply *r;
    if (ping)
        r = redisCommand(s->redis, "PING");
    else if (s->user[0] != '\0')
        r = redisCommand(s->redis, "AUTH %s %s", s->user, s->password);
    else
        r = redisCommand(s->redis, "AUTH %s", s->password);
    bool ok = r != NULL && (r->type != REDIS_REPLY_ERROR ||
                            (ping && r->len >= 6 && memcmp(r->str, "NOPERM", 6) == 0));
    const char *what = ping ? "PING" : "AUTH";
    if (!ok)
        snprintf(err, errlen, "%s: %s", what, r ? r->str : s->redis->errstr);
    if (r != NULL)
        freeReplyObject(r);
    if (!ok) {
        sink_redis_drop(s);
        return -1;
    }
    return 0;
}

/* Does an error reply to an XADD refuse the event for what it holds? A
 * generic -ERR does (no code says more); a code names a state of the
 * server (-OOM, -READONLY, -LOADING, -BUSY, -MASTERDOWN, -TRYAGAIN,
 * -CLUSTERDOWN, -MOVED, -MISCONF, ...), of the connection (-NOAUTH,
 * -NOPERM) or of the key (-WRONGTYPE: the stream's name holds another
 * type), which refuses every event alike until someone fixes it. */
static bool
xadd_error_refuses_event(const redisReply *r)
{
    return r->len >= 3 && memcmp(r->str, "ERR", 3) == 0 && (r->len == 3 || r->str[3] == ' ');
}

/* XADD every event of the batch, pipelined, and note what became of
 * each in s->fates: the replies come one per command, in order, so one
 * refused XADD says nothing of the others; an event answered with an id
 * is in the stream whatever happens to the rest. Returns 0 when every
 * one is in, else -1 with the first failure in err (a lost connection:
 * the events not answered are XADD_RETRY). After an XADD_RETRY the
 * connection is dropped: the next send connects again. */
int
sink_redis_send(struct sink *s, char *err, size_t errlen)
{
    for (unsigned i = 0; i < s->nlines; i++)
        s->fates[i] = XADD_RETRY;
    s->refusal[0] = '\0';
    if (s->redis == NULL && redis_connect(s, err, errlen) < 0)
        return -1;
    char maxlen[24], id[64];
    snprintf(maxlen, sizeof(maxlen), "%u", s->cfg.maxlen);
    for (unsigned i = 0; i < s->nlines; i++) {
        int idn = snprintf(id, sizeof(id), "%s-%" PRIu64, journal_id(s->ev->journal), s->seqs[i]);
        const char *av[10];
        size_t al[10];
        int argc = 0;
#define ARG(p, n) (av[argc] = (p), al[argc] = (n), argc++)
        ARG("XADD", 4);
        ARG(s->stream, strlen(s->stream));
        if (s->cfg.maxlen > 0) {
            ARG("MAXLEN", 6);
            ARG("~", 1);
            ARG(maxlen, strlen(maxlen));
        }
        ARG("*", 1);
        ARG("event_id", 8);
        ARG(id, (size_t)idn);
        ARG("data", 4);
        ARG(s->body.buf + s->offs[i], s->lens[i]);
#undef ARG
        if (redisAppendCommandArgv(s->redis, argc, av, al) != REDIS_OK) {
            snprintf(err, errlen, "%s", s->redis->errstr);
            sink_redis_drop(s);
            return -1;
        }
    }
    int rc = 0;
    bool again = false; /* an answer that says the server or the key takes nothing now */
    for (unsigned i = 0; i < s->nlines; i++) {
        void *rp = NULL;
        if (redisGetReply(s->redis, &rp) != REDIS_OK) {
            if (rc == 0)
                snprintf(err, errlen, "%s", s->redis->errstr[0] ? s->redis->errstr : "I/O error");
            sink_redis_drop(s);
            return -1;
        }
        redisReply *r = rp;
        if (r->type == REDIS_REPLY_ERROR) {
            s->fates[i] = xadd_error_refuses_event(r) ? XADD_REFUSED : XADD_RETRY;
            again |= s->fates[i] == XADD_RETRY;
            if (s->fates[i] == XADD_REFUSED && s->refusal[0] == '\0')
                snprintf(s->refusal, sizeof(s->refusal), "%s", r->str);
            if (rc == 0)
                snprintf(err, errlen, "XADD: %s", r->str);
            rc = -1;
        } else {
            s->fates[i] = XADD_IN;
        }
        freeReplyObject(r);
    }
    /* The next try connects again: it may reach another server (after a
     * failover this one is a replica, -READONLY for ever, while the
     * name or the proxy in front leads to the new master) or be allowed
     * what this connection was not (-NOAUTH, -NOPERM). */
    if (again)
        sink_redis_drop(s);
    return rc;
}
