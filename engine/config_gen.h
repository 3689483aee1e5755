/*
 * config_gen: the configs a running engine has swapped in, numbered by
 * generation, and when a replaced one may be freed.
 *
 * A reload replaces e->cfg whole; pointers read from the old config stay
 * in use for a while (the list of holders is in config_holders.c). The
 * rule is epoch-based reclamation with exact holds for long-lived
 * holders: each worker publishes a floor (the generation it re-pointed
 * its holders to at its last park: everything from there on is kept)
 * and the older generations its sessions and connections still point
 * into, each exactly; a thread outside the workers keeps everything
 * from the generation current when it entered its read section. A
 * replaced config is freed once it is below every floor and in no list.
 * A config may also be pinned: kept to the end, for the parts that keep
 * the config they started on (the MTA-STS thread, ...).
 *
 * Why it is safe: e->cfg is stored before the generation count moves on
 * (config_gens_swap), so a party that reads the count first and e->cfg
 * after sees a config of that generation or a newer one; a worker's
 * floor only moves at its own park, after its holders were re-pointed,
 * so a worker late for a park keeps the old floor until it gets there;
 * what a worker publishes is read from its own state on its own thread
 * between two events, when no frame holds a config pointer; and only
 * the main thread frees, after reading what every party published.
 *
 * Threading: _new, _swap, _pin, _collect and _free on the main thread;
 * _enter/_leave on any thread; _hold, _view on the worker named; the
 * counts on any thread. One mutex; nothing here is on a hot path.
 */
#ifndef SLUICE_ENGINE_CONFIG_GEN_H
#define SLUICE_ENGINE_CONFIG_GEN_H

#include <stdbool.h>
#include <stdint.h>

struct config;
struct owner;
struct config_gens;

/* The generations of an engine with nworkers workers, starting on first
 * (generation 1, pinned, borrowed: the caller frees it after the engine
 * stopped). NULL when out of memory. */
struct config_gens *config_gens_new(const struct config *first, unsigned nworkers);
/* Free every config still owned (after the workers and every other
 * reader stopped). Returns NULL. */
struct config_gens *config_gens_free(struct config_gens *g);

/* Room for the next swap: 0, or -ENOMEM (then the reload is refused).
 * Main thread. */
int config_gens_reserve(struct config_gens *g);
/* ncfg is e->cfg from now on (stored there before this call): it is
 * owned by g from now on, freed once replaced and unreachable. Call
 * config_gens_reserve() first. Returns its generation. Main thread. */
uint64_t config_gens_swap(struct config_gens *g, const struct config *ncfg);
/* Keep cfg (one of g's) until g is freed. Main thread. */
void config_gens_pin(struct config_gens *g, const struct config *cfg);
/* The generation of e->cfg now, or of an older one for a moment during
 * a swap. Any thread. */
uint64_t config_gens_current(struct config_gens *g);

/* A thread outside the workers reads e->cfg (and what it points to) only
 * between these: returns a token for _leave. Any thread; g may be NULL. */
uint64_t config_gens_enter(struct config_gens *g);
void config_gens_leave(struct config_gens *g, uint64_t token);

/* Worker w took up generation view (read with config_gens_current
 * before it re-pointed its holders): what it makes from now on points
 * into view or newer. Worker w's thread. */
void config_gens_set_view(struct config_gens *g, unsigned w, uint64_t view);
/* The view of worker w, for tagging a holder made now (0: g NULL, which
 * harnesses without an engine have). Worker w's thread. */
uint64_t config_gens_view(const struct config_gens *g, unsigned w);
/* Worker w points into generation hold or newer, and into the older
 * generations held[0..nheld) (its sessions' and connections', exactly:
 * one long-lived holder keeps its own config, not every later one).
 * Worker w's thread. */
#define CONFIG_GENS_HELD_MAX 32
void config_gens_hold(struct config_gens *g, unsigned w, uint64_t hold, const uint64_t *held,
                      unsigned nheld);
/* The generation of the config o's tenant or pool points into; the
 * current generation when they point nowhere; 0 (older than everything)
 * when they point into no config g knows (never: as a safe answer). */
uint64_t config_gens_of_owner(struct config_gens *g, const struct owner *o);
/* The generation, and the config (*cfg), of the [source] section src
 * (NULL: of the config in force now, as g knows it: e->cfg or, for a
 * moment during a swap, the one before). 0 and NULL when unknown (never)
 * or g is NULL. */
struct mx_policy;
uint64_t config_gens_of_source(struct config_gens *g, const struct mx_policy *src,
                               const struct config **cfg);

/* Free what no party can reach any more. Returns how many configs were
 * freed. Main thread. */
unsigned config_gens_collect(struct config_gens *g);
/* Configs allocated now: the current one, the pinned ones, and those
 * replaced and not yet freed. Any thread. */
unsigned config_gens_alive(struct config_gens *g);
/* Are replaced configs waiting for a party to move on? Main thread. */
bool config_gens_pending(struct config_gens *g);

/* config_holders.c: on worker w's thread, between two events (no frame
 * of its loop holds a config pointer): publish which configs its state
 * still points into (config_gens_hold). */
struct engine;
void config_holders_publish(struct engine *e, unsigned w);

#endif
