/*
 * fs: small file-system helpers shared by the spool and the suppression
 * list.
 *
 * Threading: any thread.
 */
#ifndef SLUICE_COMMON_FS_H
#define SLUICE_COMMON_FS_H

#include <sys/types.h>

/* Make path and its missing parents (mode 0700 for each one made), as
 * mkdir -p. Returns 0 when path is a directory now, -ENOTDIR when it is
 * something else, -ENAMETOOLONG past 4095 octets, or -errno of mkdir. */
int fs_mkdir_p(const char *path);

#endif
