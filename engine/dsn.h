/* dsn: being written. */
#ifndef SLUICE_ENGINE_DSN_H
#define SLUICE_ENGINE_DSN_H
#endif
