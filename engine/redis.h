/* redis: being written. */
#ifndef SLUICE_ENGINE_REDIS_H
#define SLUICE_ENGINE_REDIS_H
#endif
