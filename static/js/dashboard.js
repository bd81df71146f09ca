// Staff dashboard: draws the snapshot (GET data-snapshot-url, and the socket's first message on
// every connect), then patches the parts the socket says changed:
//   devices → nodes and device cards; queue → queue, running jobs and figures;
//   alerts → alerts; jobs → progress and stage of the jobs named.
// Everything is built with textContent (names come from users); charts are small inline SVGs.
(function () {
  "use strict";
  var root = document.getElementById("dashboard");
  if (!root) return;
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "className") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { if (c) node.appendChild(c); });
    return node;
  }

  function mib(mb) {
    if (mb === null || mb === undefined) return "—";
    return mb >= 1024 ? (mb / 1024).toFixed(1) + " GiB" : mb + " MiB";
  }

  function seconds(s) {
    if (s === null || s === undefined) return "—";
    s = Math.max(0, Math.round(s));
    if (s < 90) return s + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function pct(ratio) { return (ratio * 100).toFixed(1) + "%"; }

  function bar(percent, high) {
    var fill = el("span");
    fill.style.width = Math.min(100, percent) + "%";
    return el("div", { className: "bar" + (high ? " high" : ""), "data-role": "progress", title: percent + "%" }, [fill]);
  }

  // --- device cards, grouped by node ---
  function renderNodes(nodes) {
    var box = document.getElementById("nodes");
    box.textContent = "";
    var devices = nodes.reduce(function (n, node) { return n + node.devices.length; }, 0);
    if (devices === 0) {
      box.appendChild(el("section", { className: "card" }, [
        el("h2", { text: "Devices" }),
        el("p", { className: "muted", text: nodes.length
          ? "The nodes below report no devices."
          : "No devices registered yet: start the GPU agent (manage.py gpu_agent) on each node." }),
      ]));
    }
    nodes.forEach(function (node) {
      var head = el("h2", {}, [
        el("span", { text: node.name }),
        el("span", { className: "badge badge-" + (node.online ? "online" : "offline"), text: node.online ? "online" : "offline" }),
        el("span", { className: "muted", text: node.backend || "" }),
      ]);
      var grid = el("div", { className: "grid" }, node.devices.map(function (d) { return deviceCard(d, node); }));
      box.appendChild(el("section", { className: "card node" + (node.online ? "" : " offline"), "data-node-id": node.id }, [head, grid]));
    });
  }

  function deviceCard(d, node) {
    var rows = [
      ["Total", mib(d.total_mb), "total_mb"],
      ["Reserved", mib(d.reserved_mb), "reserved_mb"],
      ["Allocatable", mib(d.allocatable_mb), "allocatable_mb"],
      ["Allocated", mib(d.allocated_mb), "allocated_mb"],
      ["Available", mib(d.available_mb), "available_mb"],
      ["Foreign use", mib(d.foreign_used_mb), "foreign_used_mb"],
      ["Driver reports used", mib(d.used_mb), "used_mb"],
      ["Utilisation", d.utilization_pct === null ? "—" : Math.round(d.utilization_pct) + "%", "utilization_pct"],
      ["Temperature", d.temperature_c === null ? "—" : Math.round(d.temperature_c) + " °C", "temperature_c"],
    ];
    var dl = el("dl");
    rows.forEach(function (r) {
      dl.appendChild(el("dt", { text: r[0] }));
      dl.appendChild(el("dd", { text: r[1], "data-field": r[2] }));
    });
    var badges = [];
    if (!d.enabled) badges.push(el("span", { className: "badge badge-offline", text: "disabled" }));
    if (d.draining) badges.push(el("span", { className: "badge badge-warn", text: "draining" }));
    if (!node.online) badges.push(el("span", { className: "badge badge-offline", text: "node offline" }));
    var holders = el("ul", { className: "holders", "data-role": "holders" }, d.holders.map(function (h) {
      var text = mib(h.mb) + " · " + (h.job_id ? "job #" + h.job_id + " (" + h.user + ", " + h.state + " " + h.progress + "%)" : "no job");
      return el("li", { text: text, "data-job-id": h.job_id || "" });
    }));
    return el("article", {
      className: "card device", "data-device-id": d.id, "data-allocated-mb": d.allocated_mb,
    }, [
      el("h3", { text: "#" + d.index + " " + d.name + " " }, badges),
      bar(d.usage_percent, d.usage_percent >= 90),
      el("div", { className: "muted", text: d.usage_percent + "% of allocatable in use" }),
      dl,
      d.holders.length ? holders : el("p", { className: "muted", text: "No job holds memory here." }),
    ]);
  }

  // --- queue and running jobs ---
  function renderQueue(queue, running) {
    fillTable("running", running.jobs.map(runningRow));
    setCount("running", running.count, running.jobs.length);
    fillTable("queue", queue.jobs.map(function (j) {
      return el("tr", { "data-job-id": j.id }, [
        el("td", { text: String(j.position) }),
        el("td", { text: "#" + j.id }),
        el("td", { text: j.user }),
        el("td", { text: j.model }),
        el("td", { text: j.priority }),
        el("td", { text: mib(j.memory_mb) }),
        el("td", { text: seconds(j.wait_s), "data-wait-s": j.wait_s, "data-role": "wait" }),
      ]);
    }));
    setCount("queue", queue.count, queue.jobs.length);
    waitBase = Date.now();
  }

  function runningRow(j) {
    return el("tr", { "data-job-id": j.id }, [
      el("td", { text: "#" + j.id + (j.attempt > 1 ? " (attempt " + j.attempt + ")" : "") }),
      el("td", { text: j.user }),
      el("td", { text: j.model }),
      el("td", {}, [el("span", { className: "state state-" + j.state, text: j.state, "data-role": "state" })]),
      el("td", {}, [bar(j.progress), el("span", { className: "muted", "data-role": "progress-text", text: j.progress + "%" })]),
      el("td", { text: j.device || "—" }),
      el("td", { text: mib(j.memory_mb) }),
      el("td", { text: seconds(j.elapsed_s) }),
    ]);
  }

  function fillTable(id, rows) {
    var body = document.querySelector("#" + id + " tbody");
    body.textContent = "";
    if (rows.length === 0) body.appendChild(el("tr", {}, [el("td", { colspan: 8, className: "muted", text: "None." })]));
    rows.forEach(function (r) { body.appendChild(r); });
  }

  function setCount(id, count, shown) {
    document.getElementById(id + "-count").textContent = "(" + count + ")";
    var more = document.getElementById(id + "-more");
    more.hidden = count <= shown;
    more.textContent = "Showing the first " + shown + " of " + count + ".";
  }

  // Waiting times tick locally between updates.
  var waitBase = Date.now();
  setInterval(function () {
    var extra = (Date.now() - waitBase) / 1000;
    document.querySelectorAll('#queue [data-role="wait"]').forEach(function (td) {
      td.textContent = seconds(parseFloat(td.dataset.waitS) + extra);
    });
  }, 1000);

  function patchJobs(jobs, removed) {
    jobs.forEach(function (j) {
      var tr = document.querySelector('#running tr[data-job-id="' + j.id + '"]');
      if (tr) tr.replaceWith(runningRow(j));
      document.querySelectorAll('.device [data-role="holders"] li[data-job-id="' + j.id + '"]').forEach(function (li) {
        li.textContent = li.textContent.replace(/\([^)]*\)$/, "(" + j.user + ", " + j.state + " " + j.progress + "%)");
      });
    });
    (removed || []).forEach(function (id) {
      var tr = document.querySelector('#running tr[data-job-id="' + id + '"]');
      if (tr) tr.remove();
    });
  }

  // --- key figures with small charts ---
  var FIGURES = [
    { label: "Queue length", now: function (f) { return f.queue_length; }, series: "queue_length", kind: "line" },
    { label: "Running", now: function (f) { return f.running; } },
    { label: "Avg processing", now: function (f) { return seconds(f.hour.avg_processing_s); }, series: "avg_processing_s", kind: "line" },
    { label: "Jobs done / h", now: function (f) { return f.hour.completed; }, series: "completed", kind: "bars" },
    { label: "Audio min / h", now: function (f) { return f.hour.audio_minutes; }, series: "audio_minutes", kind: "bars" },
    { label: "Error rate", now: function (f) { return pct(f.hour.error_rate); }, series: "error_rate", kind: "line" },
    { label: "Retry rate", now: function (f) { return pct(f.hour.retry_rate); }, series: "retry_rate", kind: "line" },
    { label: "Memory use (pool)", now: function (f) { return lastValue(f.series, "memory_usage", pct); }, series: "memory_usage", kind: "line" },
  ];

  function lastValue(series, key, format) {
    for (var i = series.length - 1; i >= 0; i--) if (series[i][key] !== null) return format(series[i][key]);
    return "—";
  }

  function renderFigures(f) {
    var box = document.getElementById("figures");
    box.textContent = "";
    FIGURES.forEach(function (spec) {
      var children = [el("div", { className: "label", text: spec.label }), el("div", { className: "value", text: String(spec.now(f)) })];
      if (spec.series) children.push(chart(f.series.map(function (p) { return p[spec.series]; }), spec.kind));
      box.appendChild(el("div", { className: "figure", title: "last hour, 5-minute steps" }, children));
    });
  }

  // A sparkline (gaps where a value is missing) or bars, scaled to the largest value.
  function chart(values, kind) {
    var w = 120, h = 30, n = values.length;
    var max = Math.max.apply(null, values.map(function (v) { return v || 0; }).concat([1e-9]));
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("preserveAspectRatio", "none");
    var step = w / n;
    if (kind === "bars") {
      values.forEach(function (v, i) {
        var bh = (v || 0) / max * (h - 2);
        var r = document.createElementNS(SVG, "rect");
        r.setAttribute("x", i * step + 1); r.setAttribute("width", Math.max(1, step - 2));
        r.setAttribute("y", h - bh); r.setAttribute("height", bh);
        svg.appendChild(r);
      });
      return svg;
    }
    var points = [];
    function flush() {
      if (points.length) {
        var line = document.createElementNS(SVG, "polyline");
        line.setAttribute("points", points.length === 1 ? points[0] + " " + points[0] : points.join(" "));
        svg.appendChild(line);
      }
      points = [];
    }
    values.forEach(function (v, i) {
      if (v === null || v === undefined) { flush(); return; }
      points.push((i * step + step / 2).toFixed(1) + "," + (h - 1 - v / max * (h - 2)).toFixed(1));
    });
    flush();
    return svg;
  }

  // --- alerts ---
  function renderAlerts(alerts) {
    var banner = document.getElementById("alerts-firing");
    var firing = alerts.recent.filter(function (a) { return a.state === "firing"; });
    banner.hidden = alerts.firing === 0;
    banner.textContent = "";
    firing.forEach(function (a) { banner.appendChild(el("p", { text: "FIRING: " + a.message })); });
    fillTable("alerts", alerts.recent.map(function (a) {
      return el("tr", {}, [
        el("td", { text: a.rule }),
        el("td", {}, [el("span", { className: "state state-" + (a.state === "firing" ? "failed" : "completed"), text: a.state })]),
        el("td", { text: String(Math.round(a.value * 1000) / 1000) }),
        el("td", { text: new Date(a.fired_at).toLocaleString() }),
        el("td", { text: a.resolved_at ? new Date(a.resolved_at).toLocaleString() : "—" }),
      ]);
    }));
  }

  function renderSnapshot(s) {
    renderNodes(s.nodes);
    renderQueue(s.queue, s.running);
    renderFigures(s.figures);
    renderAlerts(s.alerts);
    document.getElementById("as-of").textContent = new Date(s.at).toLocaleTimeString();
  }

  var socketSpoke = false;

  function handle(msg) {
    socketSpoke = true;
    if (msg.type === "snapshot") renderSnapshot(msg);
    else if (msg.type === "devices") renderNodes(msg.nodes);
    else if (msg.type === "queue") { renderQueue(msg.queue, msg.running); renderFigures(msg.figures); }
    else if (msg.type === "alerts") renderAlerts(msg.alerts);
    else if (msg.type === "jobs") patchJobs(msg.jobs, msg.removed);
    if (msg.type !== "snapshot") document.getElementById("as-of").textContent = new Date().toLocaleTimeString();
  }

  function setStatus(state) {
    var badge = document.getElementById("connection");
    badge.className = "conn conn-" + state;
    badge.textContent = { live: "live", reconnecting: "reconnecting…", refused: "not allowed" }[state] || state;
    root.dataset.connection = state;
  }

  fetch(root.dataset.snapshotUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
    .then(function (r) { return r.ok ? r.json() : null; })
    .then(function (s) { if (s && !socketSpoke) renderSnapshot(s); })  // never over a newer socket state
    .catch(function () { /* the socket's first message carries the same snapshot */ });
  window.liveSocket(root.dataset.socketPath, { message: handle, status: setStatus });
})();
