#!/usr/bin/env python3
"""dkimpy verifies what the dkim library signs (dkim-sign), before any
daemon is involved: RSA 1024/2048/4096 and Ed25519 keys, relaxed and
simple, messages with folded headers, trailing whitespace, an empty body,
dot lines, 8-bit octets, two From fields, a very long header; and a
message changed after signing fails. The public keys come from a dnsfunc
here (tests/integ/test_dkim.py serves them from dnsmasq).

usage: test_vectors.py DKIM_SIGN"""
import base64
import os
import subprocess
import sys
import tempfile

sys.path.append("/usr/lib/python3/dist-packages")  # Debian's python3-dkim under another python
try:
    import dkim
except ImportError:
    print("skip: python3-dkim is not installed (tools/install-deps --test)")
    sys.exit(77)

SIGN = sys.argv[1]

MESSAGES = {
    "plain": b"From: Jane <jane@example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n"
             b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n"
             b"Hello Bob.\r\n",
    "folded": b"From: Jane\r\n <jane@example.com>\r\nTo: bob@example.org,\r\n\tcarol@example.org\r\n"
              b"Subject: a subject\r\n  folded   twice\r\n\t and  again\r\n\r\nbody\r\n",
    "trailing_ws": b"From: jane@example.com  \r\nSubject:   spaces   \t\r\n\r\n"
                   b"line with trailing   \t\r\n  leading and   inner\r\n\r\n\r\n",
    "empty_body": b"From: jane@example.com\r\nSubject: nothing\r\n\r\n",
    "no_body": b"From: jane@example.com\r\nSubject: nothing at all\r\n",
    "dots": b"From: jane@example.com\r\nSubject: dots\r\n\r\n.\r\n..\r\n.leading\r\n",
    "eightbit": b"From: =?utf-8?q?J=C3=A9r=C3=B4me?= <j@example.com>\r\nSubject: caf\xc3\xa9\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n\r\nd\xc3\xa9j\xc3\xa0 vu \xe2\x82\xac\r\n",
    "two_from": b"From: a@example.com\r\nFrom: b@example.com\r\nSubject: two\r\n\r\nx\r\n",
    "long_header": b"From: jane@example.com\r\nSubject: " +
                   b"\r\n ".join([b"word%d" % i for i in range(3000)]) + b"\r\n\r\nlong\r\n",
    "unsubscribe": b"From: news@example.com\r\nList-Unsubscribe: <https://example.com/u?x=1>,\r\n"
                   b" <mailto:u@example.com>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
                   b"Subject: news\r\n\r\nnews\r\n",
}

KEYS = [("rsa1024", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]),
        ("rsa2048", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        ("rsa4096", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096"]),
        ("ed25519", ["-algorithm", "ED25519"])]


def txt_record(pem_path, ed):
    der = subprocess.run(["openssl", "pkey", "-in", pem_path, "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    if ed:
        der = der[-32:]  # the raw key at the end of the SubjectPublicKeyInfo
    return b"v=DKIM1; k=%s; p=%s" % (b"ed25519" if ed else b"rsa", base64.b64encode(der))


def verify(msg, dnsfunc):
    try:
        return dkim.verify(msg, dnsfunc=dnsfunc)
    except dkim.DKIMException:
        return False  # e.g. a header section no longer parses


def main():
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        records = {}
        for name, args in KEYS:
            path = os.path.join(tmp, name + ".pem")
            subprocess.run(["openssl", "genpkey", *args, "-out", path], check=True,
                           capture_output=True)
            records[name + "._domainkey.example.com."] = txt_record(path, name == "ed25519")

        def dnsfunc(qname, timeout=5):
            q = qname.decode() if isinstance(qname, bytes) else qname
            return records.get(q if q.endswith(".") else q + ".")

        for kname, _ in KEYS:
            for canon in ("relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"):
                for mname, msg in MESSAGES.items():
                    path = os.path.join(tmp, kname + ".pem")
                    r = subprocess.run([SIGN, path, "example.com", kname, canon], input=msg,
                                       capture_output=True)
                    if r.returncode != 0:
                        print("FAIL sign %s %s %s: %s" % (kname, canon, mname, r.stderr))
                        failures += 1
                        continue
                    signed = r.stdout
                    ok = verify(signed, dnsfunc)
                    # Changed after signing: a header field, then the body.
                    hdr_changed = signed.replace(b"From: ", b"From: x", 1) \
                        if b"From: " in signed else signed + b"x"
                    body_changed = signed + b"tampered\r\n"
                    bad1 = verify(hdr_changed, dnsfunc)
                    bad2 = verify(body_changed, dnsfunc)
                    if not ok or bad1 or bad2:
                        print("FAIL %s %s %s: verify=%s changed-header=%s changed-body=%s"
                              % (kname, canon, mname, ok, bad1, bad2))
                        print(signed[:600])
                        failures += 1
            print("ok %s: %d messages x 4 canonicalizations" % (kname, len(MESSAGES)))
    if failures:
        print("%d failures" % failures)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
