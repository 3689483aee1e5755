/*
 * tls_test: helpers for the tls/ tests. A throwaway PKI (a CA and
 * certificates it issues, or self-signed ones, as PEM files in a fresh
 * temporary directory that test_pki_fini removes: no key is ever committed
 * to the tree), and a pump that joins a server conn and a client conn in
 * memory, moving ciphertext between them in chunks of any size.
 *
 * Threading: single-threaded test code.
 */
#ifndef SLUICE_TESTS_TLS_TEST_H
#define SLUICE_TESTS_TLS_TEST_H

#include <stdbool.h>
#include <stddef.h>

#include "tls/tls.h"

struct test_pki {
    char dir[256];     /* the temporary directory */
    char ca_file[320]; /* the CA's certificate (PEM) */
    void *ca_key;      /* owned: EVP_PKEY */
    void *ca_cert;     /* owned: X509 */
    unsigned serial;
};

struct test_cert {
    char cert_file[320];
    char key_file[320];
};

/* Make the directory and a CA named cn. Returns 0 or -1 (with a message on
 * stderr). */
int test_pki_init(struct test_pki *pki, const char *cn);
/* Issue a certificate named stem.pem / stem.key for the comma-separated
 * names (DNS names, or IP addresses), signed by the CA, or self-signed
 * when self_signed. The first name is also the CN. */
int test_pki_issue(struct test_pki *pki, const char *stem, const char *names, bool self_signed,
                   struct test_cert *out);
/* Remove the directory and free the CA. */
void test_pki_fini(struct test_pki *pki);

/* A [tls] config with every default applied (free with conf_free). */
void test_config(struct tls_config *cfg);
/* Set one key or fail the test. */
void test_config_set(struct tls_config *cfg, const char *key, const char *value);

/* Move at most chunk bytes of from's pending ciphertext into to. Returns
 * how many moved. Fails the test if a pointer from peek changed. */
size_t test_move(struct tls_conn *from, struct tls_conn *to, size_t chunk);

/* Drive both handshakes, moving chunk bytes each way per step, until
 * each side finished (0) or failed, or nothing moves any more. Stores
 * each side's last result. */
void test_handshake(struct tls_conn *srv, struct tls_conn *cli, size_t chunk, int *srv_rc,
                    int *cli_rc);

/* Send len bytes from a to b and len bytes from b to a at the same time,
 * in writes, moves and reads of sizes drawn from a seeded generator (each
 * at most max_chunk), checking every byte and that neither conn ever
 * buffers more than buffer_size of ciphertext. */
void test_exchange(struct tls_conn *a, struct tls_conn *b, size_t len, size_t max_chunk,
                   size_t buffer_size, unsigned seed);

/* Write all of msg from one side and read it on the other; checks it. */
void test_send(struct tls_conn *from, struct tls_conn *to, const char *msg);

#endif
