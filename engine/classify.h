/* classify: being written. */
#ifndef SLUICE_ENGINE_CLASSIFY_H
#define SLUICE_ENGINE_CLASSIFY_H
#endif
