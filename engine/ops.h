/*
 * ops: the engine's side of the stats socket and of /metrics: counters
 * gathered from every worker, the busiest destinations, and the operator
 * commands (message, suspend, resume, flush, bounce, reload).
 *
 * Threading: ops_start/ops_stop on the main thread, after the workers
 * started and before they stop; the callbacks run on the stats thread.
 */
#ifndef SLUICE_ENGINE_OPS_H
#define SLUICE_ENGINE_OPS_H

#include <stddef.h>

struct engine;

/* Start the stats server of [stats] (nothing when it has no socket and no
 * HTTP listener). Returns 0 or a negative code with err. */
int ops_start(struct engine *e, char *err, size_t errlen);
void ops_stop(struct engine *e);

#endif
