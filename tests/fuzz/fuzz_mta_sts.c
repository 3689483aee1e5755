/*
 * fuzz_mta_sts: the MTA-STS policy parser, the _mta-sts TXT record parser
 * and the mx pattern match (engine/mta_sts_policy.c) on any bytes: no crash, no
 * read past the input, and a parsed policy holds what the RFC allows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/mta_sts.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct mta_sts_policy *p = NULL;
    const char *why = NULL;
    if (mta_sts_policy_parse((const char *)data, size, &p, &why) == 0) {
        if (p->nmx > MTA_STS_MAX_MX || p->max_age > MTA_STS_MAX_AGE ||
            (p->nmx == 0 && p->mode != MTA_STS_NONE))
            abort();
        (void)mta_sts_match(p, "mx.example.com");
        (void)mta_sts_match(p, "a.b.example.net");
        mta_sts_policy_unref(p);
    }
    char *txt = malloc(size + 1);
    if (txt == NULL)
        return 0;
    memcpy(txt, data, size);
    txt[size] = '\0';
    char id[33];
    if (mta_sts_txt_parse(txt, id) == 0 && (id[0] == '\0' || strlen(id) > 32))
        abort();
    free(txt);
    return 0;
}
