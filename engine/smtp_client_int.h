/*
 * smtp_client_int.h: what the two halves of the outbound SMTP session
 * call across: smtp_client.c (the session: outcomes, transitions, the
 * FIFO, the output, its end, the reply in the current state) and
 * smtp_client_txn.c (a transaction: its commands, their replies, the
 * body). Not a public header: only those two files include it.
 *
 * Threading: as smtp_client.h: pure functions over the caller's struct.
 */
#ifndef SLUICE_ENGINE_SMTP_CLIENT_INT_H
#define SLUICE_ENGINE_SMTP_CLIENT_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/smtp_client.h"

/* ---- smtp_client.c: outcomes ---- */

/* o back to PENDING, with no code, scope, reason or text. */
void smtp_outcome_clear(struct smtp_outcome *o);
/* Is o still open: PENDING, or only ACCEPTED? */
bool smtp_outcome_undecided(const struct smtp_outcome *o);
/* The server's reply as an outcome: 2xx DELIVERED, 4xx TEMPFAIL, 5xx
 * PERMFAIL (callers adjust). The text keeps any enhanced codes as sent. */
void smtp_outcome_reply(struct smtp_outcome *o, const struct smtp_reply *r, enum smtp_scope scope,
                        enum smtp_client_state stage);
/* An outcome of ours; text is a printf format. */
void smtp_outcome_local(struct smtp_outcome *o, enum smtp_status status, enum smtp_scope scope,
                        enum smtp_reason reason, enum smtp_client_state stage, unsigned code,
                        unsigned cls, unsigned subject, unsigned detail, const char *fmt, ...);

/* ---- smtp_client.c: transitions, the FIFO, the output, the end ---- */

/* The one place a state changes (trace, counter, deadline restart). */
void smtp_client_enter(struct smtp_client *c, enum smtp_client_state next);
/* Commands the FIFO may hold: SMTP_CLIENT_PIPE_MAX with PIPELINING, else 1. */
unsigned smtp_client_pipe_cap(const struct smtp_client *c);
/* A command written: the state awaiting its reply (rcpt: its recipient)
 * at the FIFO's tail. Callers check smtp_client_pipe_cap() first. */
void smtp_client_pipe_push(struct smtp_client *c, enum smtp_client_state s, uint32_t rcpt);
/* The state of the command at the FIFO's head. */
enum smtp_client_state smtp_client_pipe_head_state(const struct smtp_client *c);
/* s[0..n) appended to the output; false, nothing written, without room. */
bool smtp_client_out_put(struct smtp_client *c, const char *s, size_t n);
/* The events of this call. EV_CLOSE overrides everything that asks the
 * caller to go on with the session. */
int smtp_client_events(struct smtp_client *c);
/* The one way out. why says it (session scope); quit writes QUIT first
 * when the conversation is in step and the server deserves one. An open
 * transaction fails temporarily in whatever it had not decided. */
void smtp_client_close(struct smtp_client *c, const struct smtp_outcome *why, bool quit);
/* A reply that makes no sense here (what says why): the session ends
 * with a protocol error quoting the reply. */
void smtp_client_protocol_reply(struct smtp_client *c, const char *what,
                                const struct smtp_reply *r);

/* ---- smtp_client_txn.c ---- */

/* Every recipient still undecided (or only accepted) takes o. Only an
 * accepted recipient may take a delivery; a session failure (force_temp)
 * is temporary whatever o says. */
void smtp_client_txn_settle(struct smtp_client *c, const struct smtp_outcome *o, bool force_temp);
/* The transaction is over: nothing left undecided, counts, EV_TXN_DONE. */
void smtp_client_txn_finish(struct smtp_client *c);
/* Write what the transaction may write now: as many commands as the FIFO
 * and the output take. */
void smtp_client_txn_write(struct smtp_client *c);
/* After a reply in a transaction: write more, then wait for the next
 * reply, or end the transaction when nothing is left. */
void smtp_client_txn_advance(struct smtp_client *c);
/* Write the terminator (now or, when the output is full, from
 * smtp_client_sent()); then wait for the reply to it. */
void smtp_client_body_finish(struct smtp_client *c);
/* The reply to RSET, MAIL, RCPT (of recipient i), DATA, the final dot. */
void smtp_client_on_rset(struct smtp_client *c, const struct smtp_reply *r);
void smtp_client_on_mail(struct smtp_client *c, const struct smtp_reply *r);
void smtp_client_on_rcpt(struct smtp_client *c, const struct smtp_reply *r, uint32_t i);
void smtp_client_on_data(struct smtp_client *c, const struct smtp_reply *r);
void smtp_client_on_dot(struct smtp_client *c, const struct smtp_reply *r);

#endif
