/*
 * libFuzzer target: the DNS message reader of dns/ (dns/wire.h), which
 * reads every answer a resolver sends: the analysis of an answer for MX,
 * A, AAAA and TLSA (CNAME chains, the negative TTL), the addresses of the
 * additional section, the TLSA records DANE trusts, and TXT records.
 * Invariants: the counts stay within their caps, every TLSA record's data
 * lies inside the message, names and TXT records are NUL-terminated
 * within their bound.
 *
 * Threading: single-threaded fuzz target.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dns/wire.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return 0;
}

static void
check(int cond)
{
    if (!cond)
        abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact copy, so that an overread past the message is caught. */
    uint8_t *buf = malloc(size ? size : 1);
    if (buf == NULL)
        return 0;
    memcpy(buf, data, size);
    static const char *const names[] = {"x.test", "mx.x.test", "_25._tcp.mx.x.test"};
    static const uint16_t types[] = {WIRE_T_MX, WIRE_T_A, WIRE_T_AAAA, WIRE_T_TLSA};
    static struct wire_answer a;
    for (unsigned i = 0; i < 3; i++) {
        for (unsigned t = 0; t < 4; t++) {
            int rc = wire_answer(buf, size, names[i], types[t], &a);
            check(rc == 0 || rc == -EBADMSG || (rc == -E2BIG && types[t] == WIRE_T_MX));
            if (rc < 0)
                continue;
            check(a.n <= (types[t] == WIRE_T_MX ? WIRE_MAX_MX : WIRE_MAX_ADDR));
            check(strlen(a.final) <= WIRE_NAME_MAX);
            check(a.chain <= WIRE_MAX_CHAIN);
            /* a referral is an answer with nothing else to say */
            check(!a.referral || (a.n == 0 && !a.soa && a.rcode == WIRE_NOERROR));
            if (types[t] == WIRE_T_TLSA) {
                struct wire_tlsa rr[4];
                uint32_t ttl = UINT32_MAX;
                int n = wire_tlsa(buf, size, a.final, rr, 4, &ttl);
                check(n <= 4);
                for (int k = 0; k < n; k++) /* len 0: a record with no data, unusable */
                    check(rr[k].data >= buf && rr[k].data + rr[k].len <= buf + size);
            }
        }
        uint8_t addr[4][16];
        uint32_t ttl = UINT32_MAX;
        check(wire_additional(buf, size, names[i], WIRE_T_A, addr, 4, &ttl) <= 4);
        static char out[64];
        const char *txt[3];
        int n = wire_txt(buf, size, names[i], out, sizeof(out), txt, 3, NULL);
        check(n <= 3);
        for (int k = 0; k < n; k++)
            check(txt[k] >= out && txt[k] + strlen(txt[k]) < out + sizeof(out));
    }
    free(buf);
    return 0;
}
