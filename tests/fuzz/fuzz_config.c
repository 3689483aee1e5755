/*
 * libFuzzer target: the config reader (engine/config.c through inih, the
 * key tables, the checks that follow the whole file: config_check.c). The input is the
 * file, handed to config_load() through a memfd. Inputs that name keys
 * which make the loader open other files (key_file, key_dir,
 * verp_key_file, [shaping] rules) are skipped: a path such as /dev/zero
 * or a FIFO would test the machine, not the reader.
 *
 * Invariants: config_load() returns 0 with a config, or a negative code
 * without one and with at least one error line, each "PATH:" or
 * "PATH:LINE:" with LINE within the file's line count (and every line
 * ends with a newline); nothing leaks (ASan).
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "engine/config.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(int cond)
{
    if (!cond)
        abort();
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

static int
names_a_file(const uint8_t *data, size_t size)
{
    static const char *const keys[] = {"key_file", "key_dir", "verp_key_file", "rules"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        if (memmem(data, size, keys[i], strlen(keys[i])) != NULL)
            return 1;
    return 0;
}

/* Every line of errs names path, and any line number is within the file. */
static void
check_errors(const char *errs, const char *path, unsigned nlines)
{
    size_t plen = strlen(path);
    const char *l = errs;
    while (*l != '\0') {
        const char *nl = strchr(l, '\n');
        check(nl != NULL);
        check(strncmp(l, path, plen) == 0 && l[plen] == ':');
        const char *s = l + plen + 1;
        if (*s >= '0' && *s <= '9') {
            unsigned long line = strtoul(s, NULL, 10);
            check(line >= 1 && line <= nlines);
        }
        l = nl + 1;
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > (1u << 20) || names_a_file(data, size))
        return 0;
    int fd = memfd_create("sluice-fuzz-config", MFD_CLOEXEC);
    check(fd >= 0);
    check(size == 0 || write(fd, data, size) == (ssize_t)size);
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    unsigned nlines = 0;
    for (size_t i = 0; i < size; i++)
        nlines += data[i] == '\n';
    if (size > 0 && data[size - 1] != '\n')
        nlines++;

    char *errs = NULL;
    size_t errlen = 0;
    FILE *ef = open_memstream(&errs, &errlen);
    check(ef != NULL);
    struct config *cfg = NULL;
    int rc = config_load(path, &cfg, ef);
    fclose(ef);
    close(fd);
    if (rc == 0) {
        check(cfg != NULL);
    } else {
        check(rc < 0 && cfg == NULL && errlen > 0);
    }
    check_errors(errs, path, nlines);
    free(errs);
    config_free(cfg);
    return 0;
}
