/* dlog: being written. */
#ifndef SLUICE_ENGINE_DLOG_H
#define SLUICE_ENGINE_DLOG_H
#endif
