/* limits: being written. */
#ifndef SLUICE_ENGINE_LIMITS_H
#define SLUICE_ENGINE_LIMITS_H
#endif
