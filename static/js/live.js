// A websocket that reconnects by itself, and the job pages' live wiring.
//
// liveSocket(path, handlers) opens ws(s)://<this host><path>, parses each message as JSON
// and calls handlers.message(data); handlers.status("live" | "reconnecting" | "refused")
// tracks the connection. After a drop it retries with growing, jittered delays (1 s to
// 30 s). The servers send the current state first on every connect, so a reconnect
// repairs whatever events were missed. Close codes 4401/4403 (not logged in / not
// allowed) stop the retries: retrying cannot help.
//
// Loaded with the attribute data-live-jobs, it connects to /ws/jobs/ and feeds every job
// it hears about to the page's window.applyJobState (job_list.js, job_detail.js), and
// sets window.jobSocketConnected so those pages poll only while the socket is down.
(function () {
  "use strict";
  var MIN_DELAY_MS = 1000;
  var MAX_DELAY_MS = 30000;
  var REFUSED = [4401, 4403];

  function liveSocket(path, handlers) {
    var delay = MIN_DELAY_MS;
    var socket = null;
    var stopped = false;
    var status = handlers.status || function () {};

    function connect() {
      var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
      socket = new WebSocket(scheme + window.location.host + path);
      socket.onopen = function () {
        delay = MIN_DELAY_MS;
        status("live");
      };
      socket.onmessage = function (event) {
        var data;
        try { data = JSON.parse(event.data); } catch (e) { return; }
        handlers.message(data);
      };
      socket.onclose = function (event) {
        if (stopped) return;
        if (REFUSED.indexOf(event.code) >= 0) {
          status("refused");
          return;
        }
        status("reconnecting");
        var wait = delay / 2 + Math.random() * delay / 2;
        delay = Math.min(delay * 2, MAX_DELAY_MS);
        setTimeout(connect, wait);
      };
    }

    connect();
    return {
      send: function (data) {
        if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(data));
      },
      close: function () { stopped = true; if (socket) socket.close(); },
    };
  }
  window.liveSocket = liveSocket;

  function liveJobs() {
    liveSocket("/ws/jobs/", {
      status: function (state) { window.jobSocketConnected = state === "live"; },
      message: function (data) {
        if (typeof window.applyJobState !== "function") return;
        if (data.type === "jobs") data.jobs.forEach(window.applyJobState);
        else if (data.type === "job") window.applyJobState(data.job);
      },
    });
  }

  var script = document.currentScript;
  if (script && script.hasAttribute("data-live-jobs")) {
    // The page's own script (which defines applyJobState) comes after this one.
    document.addEventListener("DOMContentLoaded", liveJobs);
  }
})();
