/*
 * base64: the value of one character of the standard base64 alphabet
 * (RFC 4648 section 4), for the decoders of AUTH (engine/auth.c) and of
 * MIME parts (feedback/feedback.c), which differ in what they tolerate
 * around it.
 */
#ifndef SLUICE_COMMON_BASE64_H
#define SLUICE_COMMON_BASE64_H

/* 0..63, or -1 for a character outside the alphabet (padding included). */
static inline int
base64_value(int c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

#endif
