/*
 * slab: see slab.h. A block is SLAB_BLOCK octets at an address that is a
 * multiple of SLAB_BLOCK (mapped twice as large, the ends unmapped), its
 * header first, then cap objects of its class's size: those never used
 * after bump, the freed ones on a list through their first word. A block
 * with room is on its class's partial list, one without on the full
 * list. Under AddressSanitizer, the octets no object holds are poisoned
 * (an object's own octets past the size asked for too).
 *
 * Threading: none (slab.h).
 */
#include "common/slab.h"

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define SLAB_HDR 64 /* the header's room: the first object's offset */

#if defined(__SANITIZE_ADDRESS__) /* gcc */
#define SLAB_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) /* clang */
#define SLAB_ASAN 1
#endif
#endif
#ifdef SLAB_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n)   ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n)   ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

struct slab_block {
    struct slab_block *prev, *next; /* borrowed: neighbours on s->partial[cls] or s->full */
    void *free;                     /* borrowed: freed objects of this block */
    char *bump;                     /* borrowed: the first never used, in this block */
    unsigned used, cap;
    unsigned cls;
    bool full; /* on s->full */
};
_Static_assert(sizeof(struct slab_block) <= SLAB_HDR, "slab_block outgrew its room");

static size_t
class_size(unsigned cls)
{
    return ((size_t)cls + 1) * 32;
}

static struct slab_block **
list_of(struct slab *s, struct slab_block *b)
{
    return b->full ? &s->full : &s->partial[b->cls];
}

static void
unlink_block(struct slab *s, struct slab_block *b)
{
    struct slab_block **head = list_of(s, b);
    if (b->prev != NULL)
        b->prev->next = b->next;
    else
        *head = b->next;
    if (b->next != NULL)
        b->next->prev = b->prev;
    b->prev = b->next = NULL;
}

static void
push_block(struct slab *s, struct slab_block *b)
{
    struct slab_block **head = list_of(s, b);
    b->prev = NULL;
    b->next = *head;
    if (*head != NULL)
        (*head)->prev = b;
    *head = b;
}

static struct slab_block *
block_new(unsigned cls)
{
    char *m =
        mmap(NULL, 2 * SLAB_BLOCK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    uintptr_t at = ((uintptr_t)m + SLAB_BLOCK - 1) & ~(uintptr_t)(SLAB_BLOCK - 1);
    char *start = (char *)at;
    if (start > m)
        munmap(m, (size_t)(start - m));
    if (start + SLAB_BLOCK < m + 2 * SLAB_BLOCK)
        munmap(start + SLAB_BLOCK, (size_t)(m + 2 * SLAB_BLOCK - (start + SLAB_BLOCK)));
    /* Untouched slots stay unbacked: no huge page for a block that may
     * hold a few objects (with THP "always", neighbouring blocks would
     * merge into one). */
    madvise(start, SLAB_BLOCK, MADV_NOHUGEPAGE);
    struct slab_block *b = (struct slab_block *)start;
    memset(b, 0, sizeof(*b));
    b->cls = cls;
    b->cap = (unsigned)((SLAB_BLOCK - SLAB_HDR) / class_size(cls));
    b->bump = start + SLAB_HDR;
    POISON(b->bump, SLAB_BLOCK - SLAB_HDR);
    return b;
}

static void
block_unmap(struct slab_block *b)
{
    UNPOISON((char *)b, SLAB_BLOCK);
    munmap(b, SLAB_BLOCK);
}

void
slab_init(struct slab *s)
{
    memset(s, 0, sizeof(*s));
}

void
slab_fini(struct slab *s)
{
    for (unsigned c = 0; c <= SLAB_CLASSES; c++) {
        struct slab_block **head = c < SLAB_CLASSES ? &s->partial[c] : &s->full;
        while (*head != NULL) {
            struct slab_block *b = *head;
            *head = b->next;
            block_unmap(b);
        }
    }
    s->blocks = s->objects = 0;
}

void *
slab_alloc(struct slab *s, size_t size)
{
    if (size == 0 || size > SLAB_MAX)
        return NULL;
    unsigned cls = (unsigned)((size - 1) / 32);
    struct slab_block *b = s->partial[cls];
    if (b == NULL) {
        if ((b = block_new(cls)) == NULL)
            return NULL;
        push_block(s, b);
        s->blocks++;
    }
    size_t osz = class_size(cls);
    void *p;
    if (b->free != NULL) {
        p = b->free;
        UNPOISON(p, sizeof(void *));
        memcpy(&b->free, p, sizeof(void *));
        POISON(p, osz);
    } else {
        p = b->bump;
        b->bump += osz;
    }
    UNPOISON(p, size);
    s->objects++;
    if (++b->used == b->cap) {
        unlink_block(s, b);
        b->full = true;
        push_block(s, b);
    }
    return p;
}

void
slab_free(struct slab *s, void *p)
{
    if (p == NULL)
        return;
    struct slab_block *b = (struct slab_block *)((uintptr_t)p & ~(uintptr_t)(SLAB_BLOCK - 1));
    if (b->full) {
        unlink_block(s, b);
        b->full = false;
        push_block(s, b);
    }
    UNPOISON(p, sizeof(void *)); /* an object asked smaller than a pointer */
    memcpy(p, &b->free, sizeof(void *));
    b->free = p;
    POISON(p, class_size(b->cls));
    s->objects--;
    /* Empty: back to the system, unless it is its class's only block with
     * room (the next object of the class would map one again). */
    if (--b->used == 0 && (b->prev != NULL || b->next != NULL)) {
        unlink_block(s, b);
        block_unmap(b);
        s->blocks--;
    }
}
