/*
 * fs: small file-system helpers shared by the spool and the suppression
 * list.
 *
 * Threading: any thread.
 */
#ifndef SLUICE_COMMON_FS_H
#define SLUICE_COMMON_FS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Make path and its missing parents (mode 0700 for each one made), as
 * mkdir -p. Returns 0 when path is a directory now, -ENOTDIR when it is
 * something else, -ENAMETOOLONG past 4095 octets, or -errno of mkdir. */
int fs_mkdir_p(const char *path);

/* fsync the directory dir (a rename or a new file in it is durable).
 * Returns 0 or -errno. */
int fs_fsync_dir(const char *dir);
/* Write len octets of text to dir/name through a fsynced temporary file
 * (dir/.name.tmp) and a rename, then fsync dir: the file holds the old
 * text or the new one, whatever a crash does. Returns 0 or -errno. */
int fs_write_atomic(const char *dir, const char *name, const char *text, size_t len);
/* The FNV-1a digest (hash_bytes) of the whole file at path, into *out:
 * to tell whether a file read again holds what it held (not against an
 * adversary). Returns 0 or -errno. */
int fs_digest(const char *path, uint64_t *out);

#endif
