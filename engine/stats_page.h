/*
 * stats_page: the status page served at GET / of the stats HTTP listener
 * (engine/stats_page.html, embedded at build time by engine/embed.cmake).
 * Read-only data.
 */
#ifndef SLUICE_ENGINE_STATS_PAGE_H
#define SLUICE_ENGINE_STATS_PAGE_H

#include <stddef.h>

extern const char stats_page_html[]; /* NUL-terminated */
extern const size_t stats_page_html_len;

#endif
