/*
 * slab: small objects that live long and die in crowds, kept out of
 * malloc's heap. A table that keeps an entry per domain for an hour (the
 * MTA-STS store's) and is filled by the same threads that allocate and
 * free destinations, connections and buffers by the thousand would leave
 * one of its entries in nearly every page of their heap: glibc cannot
 * give those pages back when the destinations go, and the process keeps
 * the busiest hour's memory for as long as the entries live. A slab
 * takes objects of up to SLAB_MAX octets from 64 KiB blocks of its own,
 * mapped from the system (mmap) in size classes of 32 octets, and
 * unmaps a block when its last object is freed (one empty block per
 * class is kept, so that one object made and freed over and over at a
 * block's edge does not map and unmap each time). Objects are 32-octet
 * aligned; a freed one is found its block by its address.
 *
 * What it does not do: move objects. A block goes back only once every
 * object in it is freed; freed slots are taken again first (by the
 * block most recently given room), so a slab holds about as many
 * objects' worth as it ever held at once, even if a few long-lived ones
 * keep each block.
 *
 * Threading: none; the owner serializes (the MTA-STS store: under its
 * lock).
 */
#ifndef SLUICE_COMMON_SLAB_H
#define SLUICE_COMMON_SLAB_H

#include <stddef.h>

#define SLAB_BLOCK   ((size_t)64 * 1024) /* what is mapped at a time */
#define SLAB_MAX     512                 /* largest object; slab_alloc refuses larger */
#define SLAB_CLASSES (SLAB_MAX / 32)

struct slab_block;

struct slab {
    struct slab_block *partial[SLAB_CLASSES]; /* owned: blocks with room, per class */
    struct slab_block *full;                  /* owned: blocks without */
    size_t blocks;                            /* mapped now */
    size_t objects;                           /* allocated now */
};

void slab_init(struct slab *s);
/* Unmap every block, whatever objects are still in them. */
void slab_fini(struct slab *s);
/* An object of size octets (1 to SLAB_MAX), not zeroed; NULL when size is
 * out of range or the system has no memory. */
void *slab_alloc(struct slab *s, size_t size);
/* p from slab_alloc(s, ...), or NULL. */
void slab_free(struct slab *s, void *p);
/* Octets mapped now: the blocks, headers and room included. */
static inline size_t
slab_bytes(const struct slab *s)
{
    return s->blocks * SLAB_BLOCK;
}

#endif
