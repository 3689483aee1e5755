/*
 * libFuzzer target: the command parser and line framing. The first octet
 * picks the flags, the rest is one line. Invariants: spans lie inside the
 * line, error offsets too; a parsed MAIL or RCPT formats back into a line
 * that parses to the same path and parameters (a local part that is no
 * Dot-string, user.@, in the quotes it is sent in); framing never reports a
 * line that is not CRLF-terminated and free of CR and LF.
 *
 * Threading: single-threaded fuzz target.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/smtp_cmd.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
check(int cond)
{
    if (!cond)
        abort();
}

static void
in_line(struct smtp_span s, const char *line, size_t len)
{
    if (s.len == 0)
        return;
    check(s.ptr >= line && s.ptr + s.len <= line + len);
}

static int
same_span(struct smtp_span a, struct smtp_span b)
{
    return a.len == b.len && (a.len == 0 || memcmp(a.ptr, b.ptr, a.len) == 0);
}

static void
check_framing(const char *buf, size_t len)
{
    size_t max = len > 4 ? (size_t)(unsigned char)buf[0] + 2 : SMTP_CMD_LINE_MAX, off = 99;
    long n = smtp_cmd_line_find(buf, len, max, &off);

    if (n > 0) {
        check((size_t)n <= len && (size_t)n <= max && n >= 2);
        check(buf[n - 2] == '\r' && buf[n - 1] == '\n');
        check(memchr(buf, '\r', (size_t)n - 2) == NULL && memchr(buf, '\n', (size_t)n - 2) == NULL);
    } else if (n == 0) {
        check(memchr(buf, '\n', len) == NULL && len < max);
    } else {
        check(n == SMTP_CMD_E_BARE_LF || n == SMTP_CMD_E_BARE_CR || n == SMTP_CMD_E_LINE_TOO_LONG);
        check(off <= len || (n == SMTP_CMD_E_LINE_TOO_LONG && off == max));
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *line = (const char *)data + 1;
    struct smtp_cmd c, again;
    uint32_t flags;
    size_t len;
    char out[2048];
    int rc, n;
    bool rcpt, bare, dots;

    if (size < 1)
        return 0;
    check_framing((const char *)data, size);
    flags = data[0] & SMTP_CMD_F_UTF8;
    len = size - 1;
    rc = smtp_cmd_parse(line, len, flags, &c);
    check(smtp_cmd_err_str(rc) != NULL && smtp_cmd_err_reply(rc, c.verb) != NULL);
    if (rc < 0) {
        check(rc >= SMTP_CMD_E_FIRST && rc <= SMTP_CMD_E_LAST);
        check(c.err_off <= len);
        in_line(c.err_param, line, len);
        return 0;
    }
    check(rc == 0 && c.verb != SMTP_VERB_NONE);
    in_line(c.arg, line, len);
    in_line(c.path.mailbox, line, len);
    in_line(c.path.local, line, len);
    in_line(c.path.domain, line, len);
    in_line(c.params.envid, line, len);
    in_line(c.params.orcpt_addr, line, len);
    in_line(c.auth_ir, line, len);
    if (c.verb != SMTP_VERB_MAIL && c.verb != SMTP_VERB_RCPT)
        return 0;

    /* format what was parsed, parse it again: the same command */
    rcpt = c.verb == SMTP_VERB_RCPT;
    check(c.path.local.len <= SMTP_LOCAL_MAX && c.path.domain.len <= SMTP_DOMAIN_MAX);
    if (rcpt)
        n = smtp_fmt_rcpt(out, sizeof out, c.path.mailbox.ptr, c.path.mailbox.len, &c.params,
                          flags & SMTP_CMD_F_UTF8);
    else
        n = smtp_fmt_mail(out, sizeof out, c.path.mailbox.ptr, c.path.mailbox.len, &c.params);
    /* no longer than the line and its CRLF, and the brackets of a path
     * given without them ("MAIL FROM:a@b", as Postfix takes it), and the
     * quotes of a local part that is no Dot-string */
    bare = c.path.mailbox.ptr[-1] != '<';
    dots = (c.path.flags & SMTP_PATH_DOTS) != 0;
    check(n > 2 && (size_t)n <= len + 2 + (bare ? 2 : 0) + (dots ? 2 : 0) &&
          out[n - 2] == '\r' && out[n - 1] == '\n');
    check(smtp_cmd_parse(out, (size_t)n - 2, flags, &again) == 0);
    check(again.verb == c.verb);
    /* a route and a trailing dot after the domain are not sent on */
    uint32_t want = c.path.flags & ~(uint32_t)(SMTP_PATH_ROUTE | SMTP_PATH_ROOT_DOT);
    if (dots) {
        const struct smtp_span *m = &c.path.mailbox, *l = &c.path.local;
        check(again.path.mailbox.len == m->len + 2 && again.path.mailbox.ptr[0] == '"' &&
              memcmp(again.path.mailbox.ptr + 1, l->ptr, l->len) == 0 &&
              again.path.mailbox.ptr[l->len + 1] == '"' &&
              memcmp(again.path.mailbox.ptr + l->len + 2, m->ptr + l->len, m->len - l->len) == 0);
        want = (want & ~(uint32_t)SMTP_PATH_DOTS) | SMTP_PATH_QUOTED;
    } else {
        check(same_span(again.path.mailbox, c.path.mailbox));
    }
    check(again.path.flags == want);
    check(again.params.seen == c.params.seen && again.params.size == c.params.size);
    check(again.params.body == c.params.body && again.params.ret == c.params.ret);
    check(again.params.notify == c.params.notify);
    check(same_span(again.params.envid, c.params.envid));
    check(same_span(again.params.auth, c.params.auth));
    check(same_span(again.params.orcpt_type, c.params.orcpt_type));
    check(same_span(again.params.orcpt_addr, c.params.orcpt_addr));
    return 0;
}
