/*
 * node_caps: the connections this node's workers hold under a limit
 * key's max_connections when no [redis] shares it (an [mx] or [source]
 * section's cap), counted for the node, not split between the workers;
 * and the workers' parts of the key's rates, which a worker may borrow
 * while their owners ask for none.
 *
 * A domain's mail goes out from one worker. With the cap split between
 * the workers, a domain alone behind an [mx] section got its worker's
 * part: max_connections = 20 over two workers gave gmail.com 10. Now a
 * worker may hold the whole cap while no other wants a slot; its part
 * (cap / workers, at least one) is its floor: when another worker wants
 * a slot (node_cap_take refused it, which marks its want) and holds
 * fewer than its floor, the slots left are kept for it, and a worker
 * past its floor gives one back after a transaction while the slots
 * left do not cover what is owed (node_cap_allow). The rule is
 * site_addrs.c's for max_connections_per_address.
 *
 * A rate stays split between the workers (each a GCRA state at its part,
 * the parts adding up to the rate), but the parts are kept here: a worker
 * whose own part has no token takes one of another worker's part that
 * asked for none for a while (node_cap_rate_take), so a domain alone gets
 * the whole rate, not its worker's part, while two busy workers each keep
 * theirs. (One state for the node, first come first served, gave a
 * worker whose timer fired first every token.) A worker back after its
 * part was lent has a token at once, one interval ahead of the part's
 * schedule, which no borrower takes back until it is kept again: one
 * whose domains ask less often than the part is lent after (their own
 * rates) would else find it drained at each ask while another is busy.
 *
 * A message token a worker took of a part and did not use goes back to
 * that part as it was (node_cap_rate_give), and so does a connection
 * token (node_cap_rate_back), unless another worker took of the part
 * since: that take was decided on the part as the first left it.
 *
 * Entries are made on first use and live as long as the table: one per
 * capped or rated section name the configuration has had, some 80 octets
 * a worker each.
 *
 * Threading: any worker's thread; the table's lock to find an entry,
 * the entry's for its counts and rate parts (taken per connection; per
 * transaction of a connection holding the key, node_cap_allow from
 * sched_conn_next's limits_key_over, only while a worker's want is live
 * or the node holds more than the cap: else the node's count and latest
 * want are read without it; and per message token request of a rated
 * key: node_cap_rate_take; not per recipient).
 */
#ifndef SLUICE_ENGINE_NODE_CAPS_H
#define SLUICE_ENGINE_NODE_CAPS_H

#include <stdbool.h>
#include <stdint.h>

struct node_caps;
struct node_cap;

/* How long a worker refused waits before it asks again (another worker's
 * connection that ends does not wake it), and how long its want holds. */
#define NODE_CAP_POLL_MS 250

/* A table for workers workers (0: 1); NULL: no memory. */
struct node_caps *node_caps_new(unsigned workers);
void node_caps_free(struct node_caps *t);

/* The entry named name, made on first use; NULL: no memory. It lives as
 * long as t. */
struct node_cap *node_cap_get(struct node_caps *t, const char *name);

/* A slot for worker w under cap (> 0): 0, or -EBUSY when the node holds
 * cap, or the slots left are owed to other workers below their floor that
 * want one while w has its floor. A refusal marks w's want until
 * now + 2 * NODE_CAP_POLL_MS. */
int node_cap_take(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns);
/* Worker w's slot back. */
void node_cap_give(struct node_cap *x, unsigned w);
/* n slots worker w holds already, counted from now whatever the cap (a
 * key given a cap by a reload: its leases; the node may then hold more
 * than the cap, node_cap_allow). */
void node_cap_add(struct node_cap *x, unsigned w, unsigned n);

/* How many slots worker w may hold now, given what the others hold and
 * want: cap while it is alone; one fewer than it holds when it is past
 * its floor and other workers below their floors want more than the
 * slots left (one connection at a time ends: the caller counts those
 * told to end); its part of cap when the node holds more than cap (a
 * reload lowered it). */
unsigned node_cap_allow(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns);
/* Would node_cap_take refuse w now? (Marks nothing.) */
bool node_cap_full(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns);
/* Does a worker other than w want a slot now (refused one within
 * 2 * NODE_CAP_POLL_MS), and is it owed one: w holds more than its floor,
 * or that worker fewer than its own? A yes takes that want: one holder
 * answers each refusal (an idle connection of w gives its slot), the
 * waiter marks again at its next. (Given whenever one waited, two busy
 * workers would hand slots back and forth each time a queue ran empty
 * for a moment.) */
bool node_cap_claim(struct node_cap *x, unsigned w, unsigned cap, uint64_t now_ns);
/* What a take changed in the part that gave its last token, for
 * node_cap_rate_give. */
struct node_rate_undo {
    uint64_t tat, tat_after; /* the part's GCRA state before and after */
    unsigned from;           /* the part (its worker) */
    unsigned n;              /* tokens of that part */
    bool lent;               /* its lent mark before */
};
/* Tokens of x's message or connection rate for worker w: up to n of its
 * part (a GCRA at interval T, the part's, with w's part of the burst,
 * burst), then of the part of each other worker that asked for none
 * within idle_ns (at that worker's burst as it last asked; none if it
 * never did). How many (0: *retry_at_ns, when the first is due); *undo
 * (may be NULL): the part the last came from and what the take changed
 * there, for node_cap_rate_back and node_cap_rate_give. */
enum node_rate { NODE_RATE_MSG, NODE_RATE_CONN };
unsigned node_cap_rate_take(struct node_cap *x, enum node_rate which, unsigned w, uint64_t T,
                            unsigned burst, uint64_t idle_ns, uint64_t now_ns, unsigned n,
                            uint64_t *retry_at_ns, struct node_rate_undo *undo);
/* The token of the last take of part from, one that left its tat at
 * tat_after (node_rate_undo's), back: it was not used. The part's state
 * before that take, its lent mark too, as node_cap_rate_give gives all
 * of a take back, and as there only while no other take of the part came
 * since; here nor a give or back either (the part keeps its last take's
 * state before, not the caller: a limit key has no room for it). False:
 * none went back. */
bool node_cap_rate_back(struct node_cap *x, enum node_rate which, unsigned from,
                        uint64_t tat_after);
/* n (at most u->n) of the tokens of the take u describes back to their
 * part, interval T: its schedule back by n intervals, never before it was
 * before the take, and all of them its state before (its lent mark too).
 * Only while no other take of that part came since (its tat is still
 * u->tat_after); else none: a take since was decided on the part as the
 * first left it, and giving back under it could let the part give more
 * than its rate. Returns how many went back. */
unsigned node_cap_rate_give(struct node_cap *x, enum node_rate which,
                            const struct node_rate_undo *u, unsigned n, uint64_t T);
/* The node's count (every worker's). */
unsigned node_cap_conns(struct node_cap *x);

#endif
