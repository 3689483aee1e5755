"""The monitoring files of contrib/ against a running sluice: the Grafana
dashboard (contrib/grafana/sluice-dashboard.json) and the Prometheus alert
rules (contrib/prometheus/sluice-alerts.yml).

- `promtool check rules` accepts the rules, and `promtool test rules`
  runs their unit tests (contrib/prometheus/sluice-alerts.test.yml: each
  alert fires on the series that should fire it);
- every dashboard query parses as PromQL (promtool checks them as
  recording rules, with Grafana's variables given values);
- every series either file names is one that /metrics of a sluice that
  relays, defers, bounces, holds a suspended domain, has an event sink
  and takes mail of a tenant really exports (a renamed metric breaks this
  test, not a dashboard in production);
- the per-tenant series the dashboard's tenant panels read carry the
  tenant's real counts: messages and recipients received, recipients
  delivered, deferred and bounced;
- every family that /metrics exports is in doc/sluicectl.md's tables (a
  new metric without its line there fails here)."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from harness import free_port, main, skip, wait_until
import test_delivery
from test_delivery import Relay, records_for, wait_sink
from test_outcomes import events
import test_ops
from test_ops import ctl, http_get, msg, stats_conf

SLUICE = sys.argv[1]
SRC = sys.argv[2]
test_delivery.SLUICE = SLUICE
test_ops.SLUICE = SLUICE

DASHBOARD = os.path.join(SRC, "contrib", "grafana", "sluice-dashboard.json")
METRICS_DOC = os.path.join(SRC, "doc", "sluicectl.md")
RULES = os.path.join(SRC, "contrib", "prometheus", "sluice-alerts.yml")
RULE_TESTS = os.path.join(SRC, "contrib", "prometheus", "sluice-alerts.test.yml")
# Series Prometheus makes itself, not sluice.
PROMETHEUS_OWN = {"up"}


def promtool():
    path = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool")
                                        else None)
    if path is None:
        skip("promtool not installed (Debian's prometheus: tools/install-deps --test)")
    return path


def dashboard_exprs():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
            walk(p.get("panels", []))
    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        q = v.get("definition")
        if q and q.startswith("label_values("):
            out.append((f"variable {v['name']}", q))
    return out


def rule_exprs():
    """The expr of every rule, read without a YAML library: each is on its
    line after "expr:", or a folded block (">") below it."""
    out = []
    lines = open(RULES).read().split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", lines[i])
        i += 1
        if not m:
            continue
        if m.group(2).strip() in (">", "|", ">-", "|-"):
            body = []
            while i < len(lines) and (not lines[i].strip() or
                                      len(lines[i]) - len(lines[i].lstrip()) > len(m.group(1))):
                body.append(lines[i].strip())
                i += 1
            out.append(" ".join(body))
        else:
            out.append(m.group(2))
    return out


def series_names(expr):
    """The metric names an expression uses: identifiers that are not
    PromQL words, functions, label names or strings."""
    expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr)  # its label name
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                   # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)                    # ranges
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    keywords = {"and", "or", "unless", "bool", "offset", "sum", "min", "max", "avg", "count",
                "rate", "irate", "increase", "deriv", "delta", "label_values", "humanize",
                "topk", "bottomk", "absent", "histogram_quantile", "predict_linear", "time",
                "clamp_min", "clamp_max", "stddev", "quantile", "count_values", "group", "e",
                "Inf", "NaN", "avg_over_time", "max_over_time", "min_over_time",
                "sum_over_time", "count_over_time", "last_over_time"}
    return {w for w in words if w not in keywords and not w.startswith("__")}


def test_rules_pass_promtool():
    pt = promtool()
    p = subprocess.run([pt, "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"promtool check rules: {p.stdout}{p.stderr}"
    assert len(rule_exprs()) >= 5, rule_exprs()
    p = subprocess.run([pt, "test", "rules", os.path.basename(RULE_TESTS)], capture_output=True,
                       text=True, timeout=120, cwd=os.path.dirname(RULE_TESTS))
    assert p.returncode == 0, f"promtool test rules: {p.stdout}{p.stderr}"


def test_dashboard_queries_parse():
    pt = promtool()
    exprs = [e for title, e in dashboard_exprs() if not e.startswith("label_values(")]
    assert len(exprs) >= 20, len(exprs)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dashboard-as-rules.yml")
        with open(path, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, e in enumerate(exprs):
                e = e.replace("$__rate_interval", "5m").replace("$instance", ".*")
                e = e.replace("$domain", ".*").replace("$tenant", ".*")
                f.write(f"      - record: dashboard:q{i}\n        expr: {json.dumps(e)}\n")
        p = subprocess.run([pt, "check", "rules", path], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, f"a dashboard query does not parse: {p.stdout}{p.stderr}"


def tenant_msg(i, rcpts, tenant):
    """A message of tenant (named by the control field: the relay's
    clients are on its trusted networks)."""
    sender, rcpts, body = msg(i, rcpts, "t")
    return sender, rcpts, f"X-Sluice-Tenant: {tenant}\r\n".encode() + body


def tenant_value(text, name, tenant):
    m = re.search(rf'^{name}{{tenant="{tenant}"}} (\S+)$', text, re.M)
    return None if m is None else float(m.group(1))


def test_every_series_is_exported():
    hport = free_port()
    records = records_for(["a.test", "held.test", "gone.test"])
    records += ["host-record=down.test,127.0.0.2", "mx-host=deferred.test,down.test,10"]
    # A paused sink: its series exist, nothing is sent.
    sink = "[events hook]\nurl = http://127.0.0.1:9/hook\npaused = yes\n"
    r = Relay(records, domain_conf=stats_conf(http=hport) + sink + "[tenant acme]\n")
    # Each message of acme: delivered at a.test, deferred at deferred.test
    # (connection refused), waiting at held.test (suspended), bounced by
    # the operator at gone.test.
    n = 3
    want = {"sluice_tenant_messages_received_total": n,
            "sluice_tenant_recipients_received_total": 4 * n,
            "sluice_tenant_recipients_delivered_total": n,
            "sluice_tenant_recipients_deferred_total": None,  # the delivery log's count
            "sluice_tenant_recipients_bounced_total": n,
            "sluice_tenant_recipients_expired_total": 0}
    try:
        for dom in ("held.test", "gone.test"):
            assert ctl(r, "suspend", dom).returncode == 0
        r.inject([tenant_msg(i, [f"a{i}@a.test", f"d{i}@deferred.test", f"h{i}@held.test",
                                 f"g{i}@gone.test"], "acme")
                  for i in range(n)])
        wait_sink(r, n, timeout=60)
        p = ctl(r, "bounce", "gone.test")
        assert p.returncode == 0, p.stdout + p.stderr

        def settled():
            # deferrals: the attempts the delivery log saw (the first at
            # deferred.test holds it; how many were under way then varies)
            want["sluice_tenant_recipients_deferred_total"] = len(
                [e for e in events(r.dlog)
                 if e["event"] == "transient_failure" and e.get("tenant") == "acme"])
            text = http_get(hport, "/metrics")[2]
            return "sluice_domain_oldest_message_age_seconds{" in text and all(
                tenant_value(text, k, "acme") == v for k, v in want.items())
        wait_until(settled, 30, "acme's outcomes and a waiting message in /metrics")
        text = http_get(hport, "/metrics")[2]
    finally:
        r.close()
    got = {k: tenant_value(text, k, "acme") for k in want}
    assert got == want and want["sluice_tenant_recipients_deferred_total"] >= 1, (got, want)
    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    with open(METRICS_DOC) as f:
        documented = set(re.findall(r"^\| `(sluice_[a-z0-9_]+)[`{]", f.read(), re.M))
    assert len(exported) >= 70, sorted(exported)
    assert exported <= documented, \
        f"exported but not in doc/sluicectl.md: {sorted(exported - documented)}"
    exported |= set(re.findall(r"^([a-z_:][a-z0-9_:]*)[{ ]", text, re.M))
    used = {}
    for title, e in dashboard_exprs():
        for n in series_names(e):
            used.setdefault(n, []).append(f"dashboard: {title}")
    for e in rule_exprs():
        for n in series_names(e):
            used.setdefault(n, []).append(f"rule: {e[:60]}")
    assert len(used) >= 25, sorted(used)
    missing = {n: w for n, w in used.items() if n not in exported and n not in PROMETHEUS_OWN}
    assert not missing, "series not exported by /metrics: " + "; ".join(
        f"{n} ({w[0]})" for n, w in sorted(missing.items()))
    # And the dashboard covers what the issue asks for.
    for need in ("sluice_recipients_delivered_total", "sluice_queue_recipients",
                 "sluice_recipients_deferred_total", "sluice_connections_outbound_open",
                 "sluice_domain_queue_recipients", "sluice_redis_state",
                 "sluice_recipients_deferred_by_class_total", "sluice_domain_held",
                 "sluice_domain_recipients_deferred_by_class_total", *want):
        assert any(w.startswith("dashboard") for w in used.get(need, [])), need
    for need in ("sluice_queue_recipients", "sluice_recipients_deferred_total",
                 "sluice_redis_state", "sluice_spool_map_used_bytes",
                 "sluice_dlog_write_errors_total"):
        assert any(w.startswith("rule") for w in used.get(need, [])), need


if __name__ == "__main__":
    main([test_rules_pass_promtool, test_dashboard_queries_parse, test_every_series_is_exported])
