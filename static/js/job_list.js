// My jobs: keeps each row's state, progress and queue position current.
//
// applyJobState(state) patches one row from a job object in the shape GET /api/jobs/{id}/
// returns; both the websocket (whisperhub live events) and the polling fallback call it.
// Polling runs only while no socket is connected: the socket code sets
// window.jobSocketConnected = true when it connects and false when it drops.
(function () {
  "use strict";
  var FINAL = ["completed", "failed", "cancelled"];
  var POLL_MS = 2000;

  function row(jobId) {
    return document.querySelector('#job-list tr[data-job-id="' + jobId + '"]');
  }

  function queueText(state) {
    if (state.state !== "pending" || !state.queue_position) return "";
    var text = "#" + state.queue_position;
    if (state.estimated_start) {
      var when = new Date(state.estimated_start);
      text += ", starts ~" + when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    }
    return text;
  }

  function applyJobState(state) {
    var tr = row(state.id);
    if (!tr) return;
    tr.dataset.state = state.state;
    var badge = tr.querySelector('[data-role="state"]');
    badge.textContent = state.state;
    badge.className = "state state-" + state.state;
    var bar = tr.querySelector('[data-role="progress"]');
    bar.title = Math.round(state.progress) + "%";
    bar.firstElementChild.style.width = state.progress + "%";
    tr.querySelector('[data-role="queue"]').textContent = queueText(state);
  }
  window.applyJobState = applyJobState;

  function unfinishedIds() {
    return Array.prototype.filter.call(document.querySelectorAll("#job-list tr[data-job-id]"), function (tr) {
      return FINAL.indexOf(tr.dataset.state) < 0;
    }).map(function (tr) { return tr.dataset.jobId; });
  }

  function poll() {
    var ids = unfinishedIds();
    if (window.jobSocketConnected || ids.length === 0) return;
    var query = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    fetch("/api/jobs/?" + query, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) { if (body) body.results.forEach(applyJobState); })
      .catch(function () { /* offline for a moment: the next tick tries again */ });
  }

  setInterval(poll, POLL_MS);
})();
