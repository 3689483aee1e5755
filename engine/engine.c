/*
 * engine: start and stop the workers (see engine.h).
 */
#include "engine/engine.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

int
engine_start(struct engine *e, const struct config *cfg, char *err, size_t errlen)
{
    memset(e, 0, sizeof(*e));
    e->cfg = cfg;
    e->workers = calloc(cfg->server.workers, sizeof(*e->workers));
    if (e->workers == NULL) {
        snprintf(err, errlen, "out of memory for %u workers", cfg->server.workers);
        return -ENOMEM;
    }
    int rc = 0;
    for (unsigned i = 0; i < cfg->server.workers; i++) {
        rc = worker_init(&e->workers[i], i, cfg->server.ring_entries, e);
        if (rc < 0) {
            snprintf(err, errlen,
                     "cannot set up io_uring for worker %u: %s%s", i, strerror(-rc),
                     rc == -EPERM || rc == -ENOSYS
                         ? " (io_uring disabled? see /proc/sys/kernel/io_uring_disabled)"
                     : rc == -ENOMEM ? " (locked memory limit? try a smaller [server] ring_entries)"
                                     : "");
            break;
        }
        e->nworkers++;
    }
    for (unsigned i = 0; rc == 0 && i < e->nworkers; i++) {
        rc = worker_start(&e->workers[i]);
        if (rc < 0)
            snprintf(err, errlen, "cannot start worker thread %u: %s", i, strerror(-rc));
    }
    if (rc < 0) {
        engine_stop(e);
        return rc;
    }
    return 0;
}

void
engine_stop(struct engine *e)
{
    for (unsigned i = 0; i < e->nworkers; i++)
        if (e->workers[i].started)
            worker_stop(&e->workers[i]);
    for (unsigned i = 0; i < e->nworkers; i++) {
        int rc = worker_join(&e->workers[i]);
        if (rc < 0)
            log_msg(LOG_ERR, "event=worker_failed worker=%u err=%s", i, strerror(-rc));
    }
    for (unsigned i = 0; i < e->nworkers; i++)
        worker_fini(&e->workers[i]);
    free(e->workers);
    e->workers = NULL;
    e->nworkers = 0;
}
