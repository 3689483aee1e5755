/* stats: being written. */
#ifndef SLUICE_ENGINE_STATS_H
#define SLUICE_ENGINE_STATS_H
#endif
