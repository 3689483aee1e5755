/*
 * restrict-af: run a command with socket(2) limited to the address
 * families given, as systemd's RestrictAddressFamilies= does (a seccomp
 * filter; any other family fails with EAFNOSUPPORT). Lets a test start
 * sluice in the packaged unit's sandbox without systemd.
 *
 *   restrict-af FAMILY,... COMMAND [ARG...]     (FAMILY: a number)
 */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FAMILIES_MAX 16

int
main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: restrict-af FAMILY,... COMMAND [ARG...]\n");
        return 2;
    }
    unsigned fam[FAMILIES_MAX], n = 0;
    for (char *s = argv[1], *tok; n < FAMILIES_MAX && (tok = strtok(s, ",")) != NULL; s = NULL)
        fam[n++] = (unsigned)strtoul(tok, NULL, 10);
    /* nr == socket ? (arg0 in fam ? allow : EAFNOSUPPORT) : allow */
    struct sock_filter f[FAMILIES_MAX + 5];
    unsigned k = 0;
    f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                          offsetof(struct seccomp_data, nr));
    f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_socket, 0,
                                          (unsigned char)(n + 2));
    f[k++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                                          offsetof(struct seccomp_data, args[0]));
    for (unsigned i = 0; i < n; i++)
        f[k++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, fam[i],
                                              (unsigned char)(n - i), 0);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EAFNOSUPPORT);
    f[k++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog prog = {(unsigned short)k, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 ||
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) < 0) {
        perror("restrict-af: seccomp");
        return 1;
    }
    execvp(argv[2], argv + 2);
    perror("restrict-af: exec");
    return 127;
}
