"""The man pages (man/): sluice.conf(5) is exactly what
man/gen-config-man.py makes from this binary's --config-reference (so it
cannot drift from the keys); every page renders with groff and man(1)
without a warning; every option of `sluice --help` and every command of
`sluicectl --help` and of sluice-spool's usage is on its page (and
every sluicectl command in doc/sluicectl.md); and
`cmake --install` puts each page in its section.

    check_man.py SLUICE SLUICECTL SLUICE_SPOOL SOURCE_DIR BUILD_DIR
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

SLUICE, SLUICECTL, SPOOL, SRC, BUILD = sys.argv[1:6]
MAN = os.path.join(SRC, "man")
PAGES = {"sluice.8": "man8", "sluice.conf.5": "man5", "sluicectl.1": "man1",
         "sluice-spool.8": "man8"}
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# 1. sluice.conf(5) is current.
p = run([sys.executable, os.path.join(MAN, "gen-config-man.py"), SLUICE])
check(p.returncode == 0, f"gen-config-man.py failed: {p.stderr}")
with open(os.path.join(MAN, "sluice.conf.5")) as f:
    committed = f.read()
if p.returncode == 0 and p.stdout != committed:
    a, b = committed.splitlines(), p.stdout.splitlines()
    first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    failures.append("man/sluice.conf.5 is not what the binary's --config-reference makes "
                    f"(first difference at line {first + 1}); regenerate: "
                    "man/gen-config-man.py build/engine/sluice > man/sluice.conf.5")
# Every key of the reference is on the page.
ref = run([SLUICE, "--config-reference"]).stdout
keys = set(re.findall(r"^\| `([^`]+)` \|", ref, re.M))
check(len(keys) > 50, f"only {len(keys)} keys in the reference")
for k in sorted(keys):
    check(f"\\fB{k.replace('-', chr(92) + '-')}\\fR" in committed, f"sluice.conf.5 lacks the key {k}")

# 2. Each page renders without a warning.
env = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80", MANPAGER="cat", PAGER="cat")
for page in PAGES:
    path = os.path.join(MAN, page)
    p = run(["groff", "-ww", "-man", "-z", path], env=env)
    check(p.returncode == 0 and p.stderr == "", f"groff -ww on {page}: {p.stderr.strip()}")
    if shutil.which("man"):
        p = run(["man", "--warnings", "-l", path], env=env)
        check(p.returncode == 0 and p.stderr == "", f"man -l {page}: {p.stderr.strip()}")
        check(len(p.stdout) > 500 and "NAME" in p.stdout, f"man -l {page} rendered little")

# 3. The pages say what the binaries do.
page8 = open(os.path.join(MAN, "sluice.8")).read().replace("\\-", "-")
for opt in set(re.findall(r"--[a-z][a-z-]+", run([SLUICE, "--help"]).stdout)):
    check(opt in page8, f"sluice.8 does not describe {opt}")
page1 = open(os.path.join(MAN, "sluicectl.1")).read()
helptext = run([SLUICECTL, "--help"]).stdout
cmds = re.findall(r"^  ([a-z]+) ", helptext.split("Commands:")[1], re.M)
check(len(cmds) >= 8, f"sluicectl --help lists {cmds}")
doc1 = open(os.path.join(SRC, "doc", "sluicectl.md")).read()
for c in cmds:
    check(re.search(rf'^\.B[IR]? "?{c}\b', page1, re.M), f"sluicectl.1 does not describe {c}")
    check(re.search(rf"^`{c}\b", doc1, re.M), f"doc/sluicectl.md does not describe {c}")
spool8 = open(os.path.join(MAN, "sluice-spool.8")).read()
usage = run([SPOOL]).stderr
for c in re.search(r"usage: sluice-spool (\S+)", usage).group(1).split("|"):
    check(re.search(rf"^\.B {c}$", spool8, re.M), f"sluice-spool.8 does not describe {c}")

# 4. cmake --install puts each page in its section.
with tempfile.TemporaryDirectory() as d:
    p = run(["cmake", "--install", BUILD, "--prefix", d])
    check(p.returncode == 0, f"cmake --install: {p.stderr}")
    for page, section in PAGES.items():
        check(os.path.isfile(os.path.join(d, "share", "man", section, page)),
              f"cmake --install did not put {page} in share/man/{section}")

for f in failures:
    print(f"FAIL {f}")
print("man pages: " + ("ok" if not failures else f"{len(failures)} problems"))
sys.exit(1 if failures else 0)
