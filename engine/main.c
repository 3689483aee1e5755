/*
 * main: command line, config, signals. The main thread starts the engine
 * and then only waits for signals (they are blocked in every thread from
 * before the config is read, so sigwaitinfo() here receives them all,
 * those sent while it started too): SIGTERM and SIGINT drain and
 * stop, SIGHUP reopens the logs and reloads what may change at run time
 * (a TERM or INT that comes during a reload is taken before the next
 * SIGHUP: a storm of them does not hold the stop back). A fault or an
 * abort in any thread (a stack overflow too: main and every thread
 * sluice starts have an alternate signal stack, log_altstack_init) is
 * caught only to write the log's kept lines, one of its own and the
 * delivery log's lines not yet written (log_catch_fatal), then dies as
 * before.
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "engine/classify.h"
#include "engine/config.h"
#include "engine/engine.h"

#define DEFAULT_CONFIG "etc/sluice.conf"

static void
usage(FILE *out)
{
    fprintf(out,
            "usage: sluice [-c FILE] [--check-config] [--help] [--version]\n"
            "       sluice --config-reference | --classify-rules\n"
            "       sluice [-c FILE] --dkim-dns DOMAIN SELECTOR\n"
            "\n"
            "sluice is a bulk mail relay. It runs in the foreground and logs to the\n"
            "file of [log] file (standard error by default).\n"
            "\n"
            "  -c, --config FILE     configuration file (default: %s)\n"
            "  -t, --check-config    check the configuration, print every error as\n"
            "                        file:line: key: what is wrong (with the known\n"
            "                        key or section an unknown one is a typo of),\n"
            "                        and exit (0: valid, 1: errors); the checks\n"
            "                        across keys and of the files named run once\n"
            "                        the file reads without error\n"
            "      --config-reference  print every section and key with its default\n"
            "  -h, --help            this text\n"
            "  -V, --version         print the version\n"
            "\n"
            "      --classify-rules  print the built-in bounce classification table\n"
            "      --dkim-dns DOMAIN SELECTOR  print the DNS TXT record to publish for\n"
            "                        that DKIM key of the configuration (zone file syntax)\n"
            "\n"
            "Signals: TERM or INT drains (stops accepting, lets outbound transactions in\n"
            "flight finish for [server] drain_timeout, leaves the rest queued; a second\n"
            "TERM or INT ends the drain at once; a HUP then, and to the exit, reopens\n"
            "the logs and reloads nothing, logged as event=reload_ignored, a line a\n"
            "second at most) and\n"
            "exits 0; HUP reopens the log and the delivery log, reloads the users file\n"
            "and the configuration: domain policies and limits, TLS policies, [tls]\n"
            "(certificate and key read again, CAs, protocols, ciphers), retries,\n"
            "classification and bounce settings take effect; what needs a restart\n"
            "(listeners, workers, spool, sockets, Redis URL, log paths) is logged as\n"
            "kept. A config with errors, or TLS files that do not load, is refused and\n"
            "the old one kept.\n"
            "\n"
            "Exit status: 0 after a drain (or a check or print that succeeded), 1 when\n"
            "it cannot start or the configuration has errors, 2 on a usage error, 70\n"
            "when a worker's io_uring failed at run time (logged as event=worker_failed;\n"
            "the others were drained, nothing is lost) or a stop was given up on a\n"
            "spool that answered nothing (event=stop_stuck): a supervisor should\n"
            "restart it.\n",
            DEFAULT_CONFIG);
}

/* --dkim-dns: the TXT record of one key of the config, in zone file
 * syntax, split into strings of at most 255 octets (RFC 1035 3.3). */
static int
print_dkim_dns(const char *path, const char *domain, const char *selector)
{
    struct config *cfg;
    if (config_load(path, &cfg, stderr) < 0)
        return 1;
    char d[256];
    snprintf(d, sizeof(d), "%s", domain);
    for (char *p = d; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    const struct dkim_signer *s =
        cfg->dkim_keys ? dkim_keyring_find(cfg->dkim_keys, d, selector) : NULL;
    if (s == NULL && cfg->dkim_keys != NULL) {
        /* [dkim * SELECTOR] signs as its own domain */
        const struct dkim_signer *def = dkim_keyring_find(cfg->dkim_keys, "*", selector);
        if (def != NULL && strcmp(def->domain, d) == 0)
            s = def;
    }
    if (s == NULL) {
        fprintf(stderr, "sluice: %s: no DKIM key for domain %s selector %s\n", path, d, selector);
        config_free(cfg);
        return 1;
    }
    char txt[2048];
    long n = dkim_key_txt(s->key, txt, sizeof(txt));
    if (n < 0) {
        fprintf(stderr, "sluice: %s: %s\n", s->source, dkim_strerror((int)n));
        config_free(cfg);
        return 1;
    }
    printf("; %s, %u bits, from %s\n", dkim_alg_str(dkim_key_alg(s->key)),
           dkim_key_bits(s->key), s->source);
    printf("%s._domainkey.%s. IN TXT (", s->selector, s->domain);
    for (long off = 0; off < n; off += 255)
        printf(" \"%.*s\"", (int)(n - off < 255 ? n - off : 255), txt + off);
    printf(" )\n");
    config_free(cfg);
    return 0;
}

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", no_argument, NULL, 't'},
        {"config-reference", no_argument, NULL, 'R'},
        {"classify-rules", no_argument, NULL, 'K'},
        {"dkim-dns", no_argument, NULL, 'D'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *path = DEFAULT_CONFIG;
    bool check = false, dkim_dns = false;
    int c;
    while ((c = getopt_long(argc, argv, "c:thV", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            path = optarg;
            break;
        case 't':
            check = true;
            break;
        case 'D':
            dkim_dns = true;
            break;
        case 'R':
            config_reference(stdout);
            return 0;
        case 'K': {
            struct classify *cl = classify_new();
            if (cl == NULL)
                return 1;
            classify_print_rules(cl, stdout);
            classify_free(cl);
            return 0;
        }
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("sluice %s\n", SLUICE_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (dkim_dns) {
        if (argc - optind != 2) {
            fprintf(stderr, "sluice: --dkim-dns needs a DOMAIN and a SELECTOR\n");
            usage(stderr);
            return 2;
        }
        return print_dkim_dns(path, argv[optind], argv[optind + 1]);
    }
    if (optind != argc) {
        fprintf(stderr, "sluice: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }

    /* The signals the main loop waits for, blocked before the config is
     * read: a SIGHUP sent while it is (logrotate's, or a reload sent as
     * the service starts) waits for the loop and reloads then, instead
     * of killing the process with the default action; a SIGTERM waits
     * likewise and stops it once started. Blocked here, the mask is
     * inherited by every thread the engine starts. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    if (!check)
        pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    struct config *cfg;
    if (config_load(path, &cfg, stderr) < 0) {
        if (check)
            fprintf(stderr, "%s: configuration has errors\n", path);
        return 1;
    }
    if (check) {
        printf("%s: ok\n", path);
        if (cfg->dns.dnssec == DNS_DNSSEC_TRUST_AD)
            printf("%s: [dns] dnssec = trust_ad: DANE is on. sluice does not validate DNSSEC "
                   "itself: it trusts the AD bit of %s, which must be a validating resolver "
                   "(unbound, with the root trust anchor) on this host; the AD bit is "
                   "believed only because the path to it is loopback\n",
                   path, cfg->dns.servers);
        config_free(cfg);
        return 0;
    }

    int rc = log_open(cfg->log.file, (enum log_level)cfg->log.level);
    if (rc < 0) {
        fprintf(stderr, "sluice: cannot open log file %s: %s\n", cfg->log.file, strerror(-rc));
        config_free(cfg);
        return 1;
    }
    log_set_thread_name("main");

    signal(SIGPIPE, SIG_IGN);
    /* A crash leaves the workers' kept lines and its own in the log. */
    if ((rc = log_catch_fatal()) < 0)
        log_msg(LOG_WARN, "event=fatal_signals_not_caught err=\"%s\"", strerror(-rc));
    log_altstack_init(); /* and each thread it starts calls it too */

    struct engine engine;
    memset(&engine, 0, sizeof(engine));
    char err[512];
    rc = engine_start(&engine, cfg, err, sizeof(err));
    if (rc < 0) {
        log_msg(LOG_CRIT, "event=start_failed reason=\"%s\"", err);
        /* Logging to a file, the terminal or the supervisor's journal
         * would see an exit 1 and nothing else: say why there too. */
        if (strcmp(cfg->log.file, "-") != 0)
            fprintf(stderr, "sluice: start failed: %s (log: %s)\n", err, cfg->log.file);
        config_free(cfg);
        return 1;
    }
    /* Where to find it: the first line a new user reads. */
    log_msg(LOG_NOTICE,
            "event=ready version=%s pid=%ld workers=%u config=%s hostname=%s listen=\"%s\" "
            "listen_tls=\"%s\" stats_socket=%s metrics=%s bounce_listen=\"%s\"",
            SLUICE_VERSION, (long)getpid(), engine.nworkers, cfg->path, cfg->server.hostname,
            cfg->server.listen, cfg->server.listen_tls ? cfg->server.listen_tls : "-",
            cfg->stats.socket ? cfg->stats.socket : "-",
            cfg->stats.http_listen ? cfg->stats.http_listen : "-",
            cfg->bounce.listen ? cfg->bounce.listen : "-");
    if (!cfg->delivery.enabled)
        log_msg(LOG_WARN, "event=delivery_disabled key=delivery.enabled "
                          "note=mail_is_accepted_and_queued_but_nothing_is_sent");
    /* The name said in EHLO (a [source]'s ehlo aside), greetings and DSNs:
     * one of a single label, as a short system host name is when hostname
     * is unset ("vm"), is refused by receivers that want a fully qualified
     * one (Postfix's reject_non_fqdn_helo_hostname). */
    if (strchr(cfg->server.hostname, '.') == NULL)
        log_msg(LOG_WARN, "event=hostname_not_fqdn hostname=%s key=server.hostname "
                          "note=receivers_may_refuse_an_ehlo_name_without_a_dot",
                cfg->server.hostname);

    /* The config started on is kept to the end (what the start made
     * borrows from it); each one a reload brings is the engine's, freed
     * once replaced and no thread can reach it any more (config_gen.h,
     * engine_config_collect). While replaced ones wait for a thread to
     * move on, the loop wakes each second to ask again. */
    sigset_t stops; /* what ends the loop: a reload does not hold it back */
    sigemptyset(&stops);
    sigaddset(&stops, SIGTERM);
    sigaddset(&stops, SIGINT);
    bool reloaded = false;
    for (;;) {
        siginfo_t si;
        struct timespec tick = {1, 0}, now = {0, 0};
        bool pending = engine_config_pending(&engine);
        /* After a reload, a TERM or INT that came meanwhile is taken
         * before the next SIGHUP: sigwaitinfo gives the lowest-numbered
         * pending signal first (HUP 1), so under SIGHUPs sent faster than
         * a reload runs (tens of ms: a loop of kill -HUP, a logrotate
         * run per file) one was always pending and the TERM waited for
         * as long as they went on. A TERM now waits for one reload at
         * most: the one under way, or one pending with it. */
        int sig = reloaded ? sigtimedwait(&stops, &si, &now) : -1;
        reloaded = false;
        if (sig < 0)
            sig = pending ? sigtimedwait(&sigs, &si, &tick) : sigwaitinfo(&sigs, &si);
        if (sig < 0) {
            if (errno == EAGAIN) {
                engine_config_collect(&engine);
                continue;
            }
            if (errno == EINTR)
                continue;
            log_msg(LOG_CRIT, "event=sigwait_failed err=%s", strerror(errno));
            break;
        }
        if (sig == SIGHUP) {
            rc = log_reopen();
            log_msg(rc < 0 ? LOG_ERR : LOG_NOTICE, "event=sighup log_reopened=%s%s%s",
                    rc < 0 ? "no err=" : "yes", rc < 0 ? strerror(-rc) : "", "");
            char *buf = NULL;
            size_t blen = 0;
            FILE *errs = open_memstream(&buf, &blen);
            struct config *ncfg = NULL;
            bool enabled_kept = false;
            if (errs == NULL || config_load(path, &ncfg, errs) < 0) {
                if (errs != NULL)
                    fclose(errs);
                for (char *save = NULL, *l = buf ? strtok_r(buf, "\n", &save) : NULL; l;
                     l = strtok_r(NULL, "\n", &save))
                    log_msg(LOG_ERR, "event=reload_refused error=\"%s\"", l);
                log_msg(LOG_ERR, "event=reload_failed what=config note=previous_config_kept");
                ncfg = NULL;
            } else {
                fclose(errs);
                config_share_unchanged(ncfg, engine.cfg);
                if (ncfg->delivery.enabled != engine.cfg->delivery.enabled) {
                    /* The due poll and the spool walk are set up at start. */
                    log_msg(LOG_WARN, "event=reload_kept key=delivery.enabled "
                                      "note=needs_a_restart");
                    ncfg->delivery.enabled = engine.cfg->delivery.enabled;
                    enabled_kept = true;
                }
            }
            /* the first error is what `sluicectl reload` shows */
            char first[512] = "";
            if (ncfg == NULL)
                snprintf(first, sizeof(first), "%s",
                         buf == NULL || buf[0] == '\0' ? "out of memory" : buf);
            free(buf);
            const struct config *before = engine.cfg;
            engine_reload(&engine, ncfg);
            if (enabled_kept && engine.cfg == ncfg) {
                /* what `sluicectl reload` prints as not in force until a
                 * restart: the engine's list of such keys does not see
                 * this one, put back above */
                pthread_mutex_lock(&engine.reload_lock);
                size_t kl = strlen(engine.reload_kept);
                snprintf(engine.reload_kept + kl, sizeof(engine.reload_kept) - kl, "%s%s",
                         kl > 0 ? ", " : "", "delivery.enabled");
                pthread_mutex_unlock(&engine.reload_lock);
            }
            engine_reload_done(&engine, ncfg != NULL && engine.cfg == ncfg,
                               ncfg == NULL ? first : NULL);
            /* Refused (a certificate that does not load, no memory): no
             * thread saw it. */
            if (ncfg != NULL && engine.cfg != ncfg)
                config_free(ncfg);
            /* The config replaced may stay allocated a while (a pointer
             * read from it just before the swap stays valid; the first
             * one to the end), but its DKIM keys need not: the engine
             * holds those in force. Before the collect below: until then
             * before is alive. */
            if (engine.cfg != before)
                config_drop_dkim_keys((struct config *)(uintptr_t)before);
            engine_config_collect(&engine);
            reloaded = true;
            continue;
        }
        uint64_t drain_ms = engine.cfg->server.drain_timeout;
        log_msg(LOG_NOTICE,
                "event=stopping signal=%s sender_pid=%ld drain_timeout_ms=%llu reason=%s",
                sig == SIGTERM ? "TERM" : "INT", (long)si.si_pid, (unsigned long long)drain_ms,
                engine_failed_workers(&engine) > 0 ? "worker_failed" : "signal");
        /* A second TERM or INT ends the drain (engine_drain); a HUP
         * there, and in the stop after it (engine_stop takes it by a
         * thread of its own), reopens the logs, reloads nothing and is
         * logged so (event=reload_ignored), the drain going on:
         * engine_drain first tells a `sluicectl reload` waiting for one
         * that it will not be done. A SIGHUP raised
         * before this TERM was taken was taken first (sigwaitinfo on
         * Linux gives the lowest-numbered pending signal first, HUP 1
         * before INT 2 and TERM 15): its reload ran, and is told as it
         * went; one at most (above). */
        enum engine_drain_end end = engine_drain(&engine, drain_ms, &stops);
        if (end != ENGINE_DRAIN_CUT) {
            bool all = end == ENGINE_DRAIN_DONE;
            log_msg(all ? LOG_NOTICE : LOG_WARN, "event=drain_%s note=%s",
                    all ? "done" : "timed_out",
                    all ? "nothing_in_flight" : "what_was_in_flight_stays_queued");
        }
        break;
    }
    /* A failed worker: exit non-zero, so that the supervisor restarts us. */
    int status = engine_failed_workers(&engine) > 0 ? ENGINE_EXIT_FAILED : 0;
    engine_stop(&engine);
    if (engine.stop_given_up) /* the spool left open: event=stop_spool_given_up */
        status = ENGINE_EXIT_FAILED;
    log_msg(status == 0 ? LOG_NOTICE : LOG_CRIT, "event=stopped exit=%d", status);
    log_close();
    config_free(cfg);
    return status;
}
