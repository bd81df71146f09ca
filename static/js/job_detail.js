// Job page: keeps the job's state, progress, queue position and its files' progress current.
//
// applyJobState(state) patches the page from a job object in the shape GET /api/jobs/{id}/
// returns; both the websocket (whisperhub live events) and the polling fallback call it.
// When the job reaches a final state the page reloads once, to show the transcript,
// download links and the actions that now apply.
// Polling runs only while no socket is connected: the socket code sets
// window.jobSocketConnected = true when it connects and false when it drops.
(function () {
  "use strict";
  var FINAL = ["completed", "failed", "cancelled"];
  var POLL_MS = 2000;
  var card = document.getElementById("job");
  if (!card) return;
  var initialState = card.dataset.state;

  function setBadge(el, state) {
    el.textContent = state;
    el.className = "state state-" + state;
  }

  function setBar(el, pct) {
    el.title = Math.round(pct) + "%";
    el.firstElementChild.style.width = pct + "%";
  }

  function queueText(state) {
    if (state.state !== "pending" || !state.queue_position) return "";
    var text = "Position " + state.queue_position + " in the queue";
    if (state.estimated_start) {
      var when = new Date(state.estimated_start);
      text += ", expected to start around " + when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    }
    return text + ".";
  }

  function applyJobState(state) {
    if (String(state.id) !== card.dataset.jobId) return;
    card.dataset.state = state.state;
    setBadge(card.querySelector('[data-role="state"]'), state.state);
    setBar(card.querySelector('[data-role="progress"]'), state.progress);
    card.querySelector('[data-role="queue"]').textContent = queueText(state);
    var error = card.querySelector('[data-role="error"]');
    error.textContent = state.error || "";
    error.hidden = !state.error;
    (state.files || []).forEach(function (f) {
      var tr = document.querySelector('#files tr[data-file-id="' + f.id + '"]');
      if (!tr) return;
      tr.dataset.state = f.state;
      setBadge(tr.querySelector('[data-role="state"]'), f.state);
      setBar(tr.querySelector('[data-role="progress"]'), f.progress);
    });
    if (FINAL.indexOf(state.state) >= 0 && state.state !== initialState) window.location.reload();
  }
  window.applyJobState = applyJobState;

  function poll() {
    if (window.jobSocketConnected || FINAL.indexOf(card.dataset.state) >= 0) return;
    fetch(card.dataset.apiUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) { if (body) applyJobState(body); })
      .catch(function () { /* offline for a moment: the next tick tries again */ });
  }

  setInterval(poll, POLL_MS);
})();
