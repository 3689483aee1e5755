/*
 * engine: the running daemon: its config, its workers and (as later parts
 * land) the spool, listeners and scheduler they share. main.c owns one
 * engine and drives it from signals.
 *
 * Threading: engine_start/engine_stop/engine_free run on the main thread;
 * workers only read the engine through their ctx pointer.
 */
#ifndef SLUICE_ENGINE_ENGINE_H
#define SLUICE_ENGINE_ENGINE_H

#include "engine/config.h"
#include "engine/worker.h"

struct engine {
    const struct config *cfg; /* borrowed: outlives the engine */
    struct worker *workers;   /* owned array of nworkers */
    unsigned nworkers;
};

/* Set up and start every worker. Returns 0, or -errno with a message for
 * the operator in err. On failure nothing is left running. */
int engine_start(struct engine *e, const struct config *cfg, char *err, size_t errlen);
/* Stop every worker and wait for them; then free what engine_start made. */
void engine_stop(struct engine *e);

#endif
