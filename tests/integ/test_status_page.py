"""The status page (GET / of [stats] http_listen) in a real browser:
headless Chromium (tests/integ/browser.py) loads it from a sluice that is
relaying mail to smtp-sink, and the test reads the rendered DOM, as a
person would read the page, against the stats socket (sluicectl --json):

- under load, every counter the page shows lies between the socket's value
  before the page's refresh and the socket's value after it was read;
- once the load is over and the relay idle, every number on the page
  (totals, queue, connections, failures by class, the destinations table,
  the suspended destinations) equals the socket's;
- per destination, the page shows the deferrals by class and the held
  state as the socket has them: soft.test's receiver answers 4xx to RCPT
  (deferred, not held), busy.test's answers 421 to DATA (rate_limited,
  held for its site_hold), deferred.test's refuses connections
  (connection_failure, held: every address failed); the held ones are
  listed with the time their hold ends, and /metrics says
  sluice_domain_held 1 for them;
- the tenants table (tenant acme's messages: received, and what became
  of their recipients) and the live objects equal the socket's;
- the page loads nothing but itself and status.json (no script, style or
  font from elsewhere: it is opened on machines without internet), and is
  served with a Content-Security-Policy that forbids anything else.

A screenshot of the page is kept as an artifact: SLUICE_ARTIFACT_DIR, or
artifacts/ under the directory the test runs in (ctest: the build dir)."""
import os
import re
import sys
import threading
import time

from harness import free_port, main, wait_until
import test_delivery
from test_delivery import Relay, Sink, records_for, wait_sink
from test_outcomes import events
import test_ops
from test_ops import ctl, ctl_json, http_get, msg, stats_conf

SLUICE = sys.argv[1]
test_delivery.SLUICE = SLUICE
test_ops.SLUICE = SLUICE

ARTIFACTS = os.environ.get("SLUICE_ARTIFACT_DIR") or os.path.join(os.getcwd(), "artifacts")

READ_DOM = r"""(() => {
  const values = {};
  document.querySelectorAll('[data-k]').forEach(n => {
    values[n.getAttribute('data-k')] = {text: n.textContent, fmt: n.getAttribute('data-fmt')};
  });
  const table = sel => {
    const rows = {};
    document.querySelectorAll(sel + ' tbody tr[data-domain]').forEach(tr => {
      const r = {};
      tr.querySelectorAll('[data-f]').forEach(td => { r[td.getAttribute('data-f')] = td.textContent; });
      const until = tr.querySelector('[data-until]');
      r.until = until ? until.getAttribute('data-until') : null;
      r.classes = {};
      tr.querySelectorAll('span[data-class]').forEach(sp => {
        r.classes[sp.getAttribute('data-class')] = sp.textContent;
      });
      rows[tr.getAttribute('data-domain')] = r;
    });
    return rows;
  };
  const classes = {};
  document.querySelectorAll('#classes tbody tr[data-class]').forEach(tr => {
    const r = {};
    tr.querySelectorAll('[data-f]').forEach(td => { r[td.getAttribute('data-f')] = td.textContent; });
    classes[tr.getAttribute('data-class')] = r;
  });
  const rowsBy = (sel, attr) => {
    const out = {};
    document.querySelectorAll(sel + ' tbody tr[' + attr + ']').forEach(tr => {
      const r = {};
      tr.querySelectorAll('[data-f]').forEach(td => { r[td.getAttribute('data-f')] = td.textContent; });
      out[tr.getAttribute(attr)] = r;
    });
    return out;
  };
  return {gen: Number(document.body.getAttribute('data-generation') || 0), values, classes,
          tenants: rowsBy('#tenants', 'data-tenant'), objects: rowsBy('#objects', 'data-object'),
          domains: table('#domains'), suspended: table('#suspended'), held: table('#held'),
          error: document.getElementById('err').style.display === 'block'
                 ? document.getElementById('err').textContent : null};
})()"""

# Counters: never go back, so a value read between two reads of the socket
# lies between them.
MONOTONIC = ["counters.received_msgs", "counters.received_rcpts", "counters.delivered",
             "counters.deferred", "counters.bounced", "connections.inbound_total",
             "connections.outbound_total", "connections.transactions", "dlog.events"]


def num(text):
    assert re.fullmatch(r"-?[0-9][0-9,]*", text), f"not a whole number on the page: {text!r}"
    return int(text.replace(",", ""))


def path_get(doc, path):
    for p in path.split("."):
        doc = doc[p]
    return doc


def page_value(dom, path):
    return num(dom["values"]["stats." + path]["text"])


def fresh_dom(b, after_gen):
    """The page as rendered from a status.json fetched after the moment
    the page's generation was after_gen (two refreshes later: the fetch
    under way at that moment may have started before)."""
    wait_until(lambda: b.evaluate("Number(document.body.getAttribute('data-generation')||0)")
               >= after_gen + 2, 30, "the page to refresh twice")
    dom = b.evaluate(READ_DOM)
    assert dom["error"] is None, dom["error"]
    return dom


def state_text(d):
    """The state cell the page should show for the socket's domain d
    (the time of a hold is compared through data-until)."""
    parts = (["suspended"] if d["suspended"] else []) + (["held until"] if d["held"] else [])
    return ", ".join(parts) if parts else "active"


def page_classes(row):
    """{class: count} from a row's spans ("rate_limited 3", ", other 1")."""
    out = {}
    for k, text in row["classes"].items():
        name, _, n = text.lstrip(", ").rpartition(" ")
        assert name == k, (k, text)
        out[k] = num(n)
    return out


def test_status_page_in_a_browser():
    from browser import Browser  # skips (77) when chromium is missing

    hport = free_port()
    records = records_for(["a.test", "b.test", "held.test"])
    # deferred.test's MX is on an address where nothing listens: every
    # attempt is deferred (connection refused), with its reason shown,
    # and the destination held (every address failed).
    records += ["host-record=down.test,127.0.0.2", "mx-host=deferred.test,down.test,10"]
    # soft.test's receiver answers 4xx to RCPT; busy.test's 421 to DATA.
    records += ["host-record=soft.test,127.0.0.4", "mx-host=soft.test,soft.test,10",
                "host-record=busy.test,127.0.0.3", "mx-host=busy.test,busy.test,10"]
    hold = "site_hold = 1h\n"  # held for the whole test, on any machine
    r = Relay(records, domain_conf=stats_conf(http=hport) +
              f"[domain busy.test]\n{hold}[domain deferred.test]\n{hold}[tenant acme]\n")
    sinks = []
    stop = threading.Event()
    injected = [0]
    loader = None
    try:
        sinks.append(Sink(r.wd, r.mx_port, ["-r", "RCPT"], name="soft", host="127.0.0.4"))
        sinks.append(Sink(r.wd, r.mx_port, ["-Q", "DATA"], name="busy", host="127.0.0.3"))
        wait_until(lambda: http_get(hport, "/")[0] == 200, 10, "the HTTP listener")
        status, headers, html = http_get(hport, "/")
        assert headers.get("Content-Type") == "text/html; charset=utf-8", headers
        csp = headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp, csp
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), \
            "the page refers to something elsewhere"
        status, headers, body = http_get(hport, "/", "HEAD")
        assert status == 200 and body == "", (status, body[:80])
        status, headers, body = http_get(hport, "/status.json")
        assert status == 200 and headers.get("Content-Type") == "application/json", headers
        assert http_get(hport, "/status.json", "POST")[0] == 405

        p = ctl(r, "suspend", "held.test")
        assert p.returncode == 0, p.stderr
        def acme(m):  # a message of tenant acme (the relay trusts its clients)
            return m[0], m[1], b"X-Sluice-Tenant: acme\r\n" + m[2]
        r.inject([msg(i, [f"h{i}@held.test"], "h") for i in range(3)] +
                 [acme(msg(i, [f"d{i}@deferred.test", f"u{i}@a.test"], "d")) for i in range(2)] +
                 [acme(msg(i, [f"s{i}@soft.test"], "s")) for i in range(2)] +
                 [msg(i, [f"b{i}@busy.test"], "b") for i in range(2)])
        # Each has met its receiver (or its absence) before the load.
        wait_until(lambda: {e["domain"] for e in events(r.dlog, False)
                            if e["event"] == "transient_failure"} >=
                   {"soft.test", "busy.test", "deferred.test"}, 60,
                   "deferrals at soft.test, busy.test and deferred.test")

        def load():
            i = 0
            while not stop.is_set() and i < 5000:
                r.inject([msg(i + k, [f"u{i + k}@a.test", f"v{i + k}@b.test"], "l")
                          for k in range(10)], sessions=2)
                i += 10
                injected[0] = i
        with Browser() as b:
            b.navigate(f"http://127.0.0.1:{hport}/?refresh=0.5")
            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            wait_until(lambda: injected[0] > 0, 60, "the load to start")

            # Under load: the page's counters lie between two reads of the
            # socket that enclose its refresh.
            moved = 0
            for _ in range(8):
                before = ctl_json(r, "stats")
                g0 = b.evaluate("Number(document.body.getAttribute('data-generation')||0)")
                dom = fresh_dom(b, g0)
                after = ctl_json(r, "stats")
                for k in MONOTONIC:
                    lo, hi, seen = path_get(before, k), path_get(after, k), page_value(dom, k)
                    assert lo <= seen <= hi, f"{k}: the page shows {seen}, the socket {lo}..{hi}"
                if after["counters"]["delivered"] > before["counters"]["delivered"]:
                    moved += 1
                if moved >= 3:
                    break
            assert moved >= 3, "deliveries did not go on while the page was read: no load"
            os.makedirs(ARTIFACTS, exist_ok=True)
            b.screenshot(os.path.join(ARTIFACTS, "status_page_under_load.png"))

            stop.set()
            loader.join(timeout=120)
            assert not loader.is_alive(), "the injection did not end"
            want = 2 * injected[0] + 2  # and acme's two at a.test
            wait_sink(r, want, timeout=120)
            # counted once each outcome's commit is durable, after the sink
            # has the message: wait for the count too
            wait_until(lambda: ctl_json(r, "stats")["counters"]["delivered"] >= want, 60,
                       "the deliveries counted")
            wait_until(lambda: ctl_json(r, "stats")["connections"]["outbound_open"] == 0 and
                       ctl_json(r, "stats")["connections"]["inbound_open"] == 0,
                       30, "the relay to be idle")

            # Idle: the page shows exactly what the socket says. A pair of
            # socket reads that differ means something still moved: again.
            for attempt in range(10):
                before = ctl_json(r, "stats")
                doms_before = ctl_json(r, "domains", "25")["domains"]
                g0 = b.evaluate("Number(document.body.getAttribute('data-generation')||0)")
                dom = fresh_dom(b, g0)
                after = ctl_json(r, "stats")
                doms = ctl_json(r, "domains", "25")["domains"]
                # (the workers' loops turn on their timers, idle or not)
                strip = lambda s: {k: v for k, v in s.items()
                                   if k not in ("uptime_ms", "rates", "loop")}
                strip_d = lambda ds: [{k: v for k, v in d.items() if "age" not in k} for d in ds]
                idle = before["rates"]["1s"] is not None and \
                    not any(v for k, v in before["rates"]["1s"].items() if k != "window_ms")
                if idle and strip(before) == strip(after) and strip_d(doms_before) == strip_d(doms):
                    break
                time.sleep(1)  # the next rate sample (every second) of an idle relay
            else:
                raise AssertionError("the stats never held still for one refresh")
            compared = 0
            for key, shown in dom["values"].items():
                path = key[len("stats."):]
                if shown["fmt"] is not None or not key.startswith("stats."):
                    continue
                want_v = path_get(after, path)
                if isinstance(want_v, (int, float)) and not isinstance(want_v, bool):
                    assert num(shown["text"]) == want_v, f"{path}: page {shown['text']}, socket {want_v}"
                    compared += 1
                else:
                    assert shown["text"] == str(want_v), f"{path}: page {shown['text']!r}, socket {want_v!r}"
            assert compared >= 15, f"only {compared} numbers compared"
            # (held.test's mail must not go: a domain suspended by the
            # operator, which a connection of its site once carried)
            stray = [m.split(b"\n")[4] for m in r.sink.messages()
                     if b"@a.test>" not in m and b"@b.test>" not in m]
            assert after["counters"]["delivered"] == want == len(r.sink.files()), \
                (after["counters"]["delivered"], want, len(r.sink.files()), stray[:5])
            # Rates, with one decimal: the last second's are 0 when idle;
            # the last minute's only fall while idle, so the page's lies
            # between the socket's after and before its refresh.
            for what in ("received", "delivered", "deferred", "bounced", "expired"):
                assert dom["values"][f"stats.rates.1s.{what}"]["text"] == "0.0", dom["values"]
                seen = float(dom["values"][f"stats.rates.1m.{what}"]["text"])
                lo, hi = after["rates"]["1m"][what], before["rates"]["1m"][what]
                assert lo - 0.05 <= seen <= hi + 0.05, f"1m {what}: page {seen}, socket {lo}..{hi}"
            assert dom["values"]["stats.redis.state"]["text"] == "off"

            # The destinations table, row by row.
            assert set(dom["domains"]) == {d["name"] for d in doms}, (dom["domains"].keys(), doms)
            for d in doms:
                row = dom["domains"][d["name"]]
                for f in ("ready", "deferred", "inflight", "connections", "max_connections",
                          "delivered", "bounced"):
                    assert num(row[f]) == d[f], f"{d['name']} {f}: page {row[f]}, socket {d[f]}"
                assert row["state"].startswith(state_text(d)), (row, d)
                assert row["until"] == d["held_until"], (row, d)
                assert page_classes(row) == d["deferred_by_class"], (row, d)
                assert row["last_reply"] == d["last_reply"], (row, d)
            assert num(dom["domains"]["a.test"]["delivered"]) == injected[0] + 2
            # deferred.test's two recipients wait: deferred, or ready again
            # behind the hold (which one depends on the retry timer, and a
            # sanitizer build is slow enough to see either); none delivered.
            waiting = dom["domains"]["deferred.test"]
            assert num(waiting["delivered"]) == 0 and num(waiting["bounced"]) == 0, waiting
            assert sum(num(waiting[f]) for f in ("ready", "deferred", "inflight")) >= 1, waiting
            assert dom["domains"]["deferred.test"]["last_reply"], "no reason shown for deferrals"
            # Failures by class: the classes with a count, as the socket has them.
            dc, bc = after["counters"]["deferred_by_class"], after["counters"]["bounced_by_class"]
            want_classes = {k for k in dc if dc[k] or bc[k]}
            assert set(dom["classes"]) == want_classes, (dom["classes"], dc, bc)
            for k in want_classes:
                assert num(dom["classes"][k]["deferred"]) == dc[k], (k, dom["classes"][k], dc)
                assert num(dom["classes"][k]["bounced"]) == bc[k], (k, dom["classes"][k], bc)
            assert dc["connection_failure"] >= 1, dc
            assert set(dom["suspended"]) == {"held.test"}, dom["suspended"]
            assert num(dom["suspended"]["held.test"]["queued"]) == 3

            # Tenants and live objects, as the socket has them.
            tenants = after["tenants"]
            assert set(dom["tenants"]) == set(tenants) == {"acme"}, (dom["tenants"], tenants)
            for f, v in tenants["acme"].items():
                assert num(dom["tenants"]["acme"][f]) == v, (f, dom["tenants"]["acme"], v)
            assert tenants["acme"]["received_msgs"] == 4 and \
                tenants["acme"]["delivered"] == 2 and tenants["acme"]["deferred"] >= 2, tenants
            assert set(dom["objects"]) == set(after["objects"]), (dom["objects"], after["objects"])
            for k, v in after["objects"].items():
                assert num(dom["objects"][k]["live"]) == v, (k, dom["objects"][k], v)

            # Per destination: the deferral classes the delivery log gave
            # each, and the hold, on the page as on the socket.
            by_name = {d["name"]: d for d in doms}
            logged = {}
            for e in events(r.dlog):
                if e["event"] == "transient_failure":
                    per = logged.setdefault(e["domain"], {})
                    per[e["class"]] = per.get(e["class"], 0) + 1
            for name, cls in (("soft.test", None), ("busy.test", "rate_limited"),
                              ("deferred.test", "connection_failure")):
                d = by_name[name]
                assert d["deferred_by_class"] == logged[name], (name, d, logged)
                if cls is not None:
                    assert set(d["deferred_by_class"]) == {cls}, (name, d)
                row = dom["domains"][name]
                assert page_classes(row) == logged[name], (name, row, logged)
            assert not by_name["soft.test"]["held"] and \
                dom["domains"]["soft.test"]["state"] == "active", dom["domains"]["soft.test"]
            assert set(dom["held"]) == {"busy.test", "deferred.test"}, dom["held"]
            for name in ("busy.test", "deferred.test"):
                d = by_name[name]
                assert d["held"] and d["held_until"], d
                assert dom["domains"][name]["state"].startswith("held until "), dom["domains"][name]
                assert dom["held"][name]["until"] == d["held_until"], (dom["held"][name], d)
                assert num(dom["held"][name]["queued"]) == d["ready"] + d["deferred"] + d["inflight"]
            assert "rate_limited" in dom["held"]["busy.test"]["why"], dom["held"]["busy.test"]
            # sluicectl domains, for people: the state and the top class
            p = ctl(r, "domains")
            assert p.returncode == 0, p.stderr
            lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines()[1:] if ln.strip()}
            assert "held" in lines["busy.test"] and \
                f"rate_limited:{logged['busy.test']['rate_limited']}" in lines["busy.test"], p.stdout
            assert "active" in lines["soft.test"], p.stdout
            metrics = http_get(hport, "/metrics")[2]
            for name in ("busy.test", "deferred.test"):
                assert f'sluice_domain_held{{domain="{name}"}} 1\n' in metrics, name
            assert 'sluice_domain_held{domain="a.test"} 0\n' in metrics
            assert ('sluice_domain_recipients_deferred_by_class_total{domain="busy.test",'
                    f'class="rate_limited"}} {logged["busy.test"]["rate_limited"]}\n') in metrics

            # Resumed: it leaves the suspended list at the next refresh.
            assert ctl(r, "resume", "held.test").returncode == 0
            wait_sink(r, want + 3, timeout=60)
            g0 = b.evaluate("Number(document.body.getAttribute('data-generation')||0)")
            dom = fresh_dom(b, g0)
            assert dom["suspended"] == {}, dom["suspended"]

            # Nothing was loaded but the page and status.json.
            origin = f"http://127.0.0.1:{hport}/"
            loaded = b.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
            assert loaded and all(u.startswith(origin + "status.json") for u in loaded), loaded

            path = os.path.join(ARTIFACTS, "status_page.png")
            b.screenshot(path)
            assert os.path.getsize(path) > 10000, "the screenshot is (nearly) empty"
            print(f"     screenshots in {ARTIFACTS}")
    finally:
        stop.set()
        if loader is not None:
            loader.join(timeout=120)
        for s in sinks:
            s.stop()
        r.close()


# Durations as sluicectl writes them (test_ops.test_durations_round_to_nearest):
# rounded to the nearest of the last unit shown.
AGES = [(120, "120ms"), (999, "999ms"), (1499, "1s"), (1500, "2s"), (59600, "1m"),
        (89999, "1m 30s"), (600000, "10m"), (3599600, "1h"), (5399999, "1h 30m"),
        (86399999, "1d"), (131400000, "1d 13h")]


def test_page_ages_round_as_sluicectl():
    """The page writes ages (uptime, a destination's oldest message) as
    sluicectl does: rounded to the nearest, 1,500 ms "2s", 59.6 s "1m",
    5,399,999 ms "1h 30m" (it cut them down: "1s", "59s", "1h 29m"; and
    wrote "10m 0s", "0s" for 120 ms). Its "last 1 min" rates column says
    "last 12 s" when the rates are over 12 s (sluice's first minute). The
    page as sluice serves it is loaded from a server of the test's own
    whose status.json holds those ages."""
    from browser import Browser  # skips (77) when chromium is missing
    import http.server
    import json

    hport = free_port()
    r = Relay(records_for(["a.test"]), domain_conf=stats_conf(http=hport))
    srv = None
    try:
        wait_until(lambda: http_get(hport, "/")[0] == 200, 10, "the HTTP listener")
        page = http_get(hport, "/")[2].encode()
        st = json.loads(http_get(hport, "/status.json")[2])
        st["stats"]["uptime_ms"] = 5399999
        # as in sluice's first minute: the minute's rates are over 12 s
        rates = {"received": 1.0, "delivered": 1.0, "deferred": 0.0, "bounced": 0.0,
                 "expired": 0.0}
        st["stats"]["rates"] = {"1s": dict(rates, window_ms=1000),
                                "1m": dict(rates, window_ms=12000)}

        def row(i, ms):
            return {"name": f"d{i}.test", "pool": None, "ready": 1, "deferred": 0,
                    "inflight": 0, "parked": 0, "connections": 0, "max_connections": 1,
                    "rate_limit": None, "limit_reason": "config", "delivered": 0,
                    "bounced": 0, "oldest": None, "oldest_age_ms": ms, "suspended": False,
                    "held": False, "held_until": None, "deferred_by_class": {},
                    "last_reply": ""}
        st["domains"] = [row(i, ms) for i, (ms, _) in enumerate(AGES)]
        st["suspended"] = [dict(row(0, 1500), suspended=True)]
        body = json.dumps(st).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                out, ctype = (body, "application/json") if self.path.startswith(
                    "/status.json") else (page, "text/html; charset=utf-8")
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        with Browser() as b:
            b.navigate(f"http://127.0.0.1:{srv.server_address[1]}/?refresh=60")
            wait_until(lambda: b.evaluate(
                "Number(document.body.getAttribute('data-generation')||0)") >= 1, 30,
                "the page to render")
            dom = b.evaluate(READ_DOM)
            assert dom["error"] is None, dom["error"]
            shown = {name: row["oldest"] for name, row in dom["domains"].items()}
            want = {f"d{i}.test": text for i, (_, text) in enumerate(AGES)}
            assert shown == want, [(AGES[int(k[1:-5])][0], v, want[k])
                                   for k, v in shown.items() if v != want[k]]
            assert dom["suspended"]["d0.test"]["oldest"] == "2s", dom["suspended"]
            up = b.evaluate("document.getElementById('uptime').textContent")
            assert up == "1h 30m", up
            head = b.evaluate("document.getElementById('r1m').textContent")
            assert head == "last 12 s", head
    finally:
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        r.close()


if __name__ == "__main__":
    main([test_status_page_in_a_browser, test_page_ages_round_as_sluicectl])
