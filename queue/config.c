/*
 * config: the [queue] keys and the text of the queue's error codes.
 *
 * Threading: constant data and pure functions.
 */
#include "queue/queue.h"

#include <string.h>

const struct conf_key queue_conf_keys[] = {
    {"path", CONF_STRING, offsetof(struct queue_config, path), 1, 4000, "./var/spool",
     "spool directory (created if missing); must be on a local disk where fsync is honest", NULL},
    /* LMDB maps the whole file at this size and cannot go past it; making
     * it larger is a config change plus a restart (the file keeps its
     * data and only grows as needed). */
    {"map_size", CONF_SIZE, offsetof(struct queue_config, map_size), 1ULL << 20, 0, "4G",
     "largest size the spool may reach; when reached, injection gets 452 until deliveries "
     "free room; raise it and restart to grow",
     NULL},
    {"node_id", CONF_UINT, offsetof(struct queue_config, node_id), 0, 1023, "0",
     "this node's number, part of every message id; give each node of a cluster its own", NULL},
    {"unsafe_no_sync", CONF_BOOL, offsetof(struct queue_config, unsafe_no_sync), 0, 0, "no",
     "do not sync commits to disk: GIVES UP durability, a crash or power loss can lose mail "
     "that was already acknowledged with 250",
     NULL},
    {"max_batch", CONF_UINT, offsetof(struct queue_config, max_batch), 1, 65536, "4096",
     "most requests (messages or outcome sets) committed in one write transaction", NULL},
    {"max_batch_bytes", CONF_SIZE, offsetof(struct queue_config, max_batch_bytes), 64ULL << 10, 0,
     "64M", "most body bytes committed in one write transaction (a larger message goes alone)",
     NULL},
    {"sweep_ms", CONF_UINT, offsetof(struct queue_config, sweep_ms), 0, 60000, "200",
     "longest a finished message's record and body wait in the spool (gone to every reader "
     "already) to be removed with others, in key order, in a commit of their own (a sweep; "
     "also once 4096 wait, when the spool is short of room, at close and at open): "
     "deliveries out of arrival order (many domains) then write far fewer pages; 0 sweeps "
     "as soon as the spool is idle or before its next commit",
     NULL},
    CONF_END,
};

const char *
queue_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "success";
    case QUEUE_EMAPFULL:
        return "spool is full (map_size reached)";
    case QUEUE_ESCHEMA:
        return "spool was written by a newer version of sluice";
    case QUEUE_ECORRUPT:
        return "spool is damaged or not a sluice spool";
    case QUEUE_ENOTFOUND:
        return "no such message or recipient in the spool";
    case QUEUE_ELOCKED:
        return "spool is in use by another process";
    case QUEUE_EPANIC:
        return "spool environment failed fatally; restart needed";
    case QUEUE_ECLOSED:
        return "queue is closing";
    case QUEUE_EREADERS:
        return "too many concurrent spool readers";
    case QUEUE_EEXIST:
        return "a message with this id is already in the spool";
    case QUEUE_ESTORE:
        return "spool storage error";
    case QUEUE_ESTALE:
        return "an outcome the update's message names is stale: nothing applied";
    }
    if (rc < 0) {
        /* strerrordesc_np is thread-safe and returns static text. */
        const char *s = strerrordesc_np(-rc);
        if (s != NULL)
            return s;
    }
    return "unknown queue error";
}
