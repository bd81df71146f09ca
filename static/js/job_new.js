// New job page: drag-and-drop into the file input, and an upload progress bar.
// Without JavaScript the form is a plain multipart POST and works the same.
(function () {
  "use strict";
  var form = document.getElementById("job-new");
  if (!form) return;
  var input = form.querySelector("input[type=file]");
  var zone = document.getElementById("dropzone");
  var list = document.getElementById("file-list");
  var maxFiles = parseInt(form.dataset.maxFiles, 10);
  var maxBytes = parseInt(form.dataset.maxUploadMb, 10) * 1024 * 1024;

  function showFiles() {
    list.textContent = "";
    Array.prototype.forEach.call(input.files, function (f) {
      var li = document.createElement("li");
      li.textContent = f.name + " (" + (f.size / 1048576).toFixed(1) + " MB)";
      list.appendChild(li);
    });
  }

  // Dropped files join those already chosen; a DataTransfer is how a script fills a file input.
  function addFiles(files) {
    var all = new DataTransfer();
    Array.prototype.forEach.call(input.files, function (f) { all.items.add(f); });
    Array.prototype.forEach.call(files, function (f) { all.items.add(f); });
    input.files = all.files;
    showFiles();
  }

  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function (e) { e.preventDefault(); zone.classList.remove("over"); });
  });
  zone.addEventListener("drop", function (e) { addFiles(e.dataTransfer.files); });
  input.addEventListener("change", showFiles);

  function clearErrors() {
    form.querySelectorAll("[data-errors-for], #form-errors").forEach(function (ul) { ul.textContent = ""; });
  }

  function showError(field, message) {
    var ul = form.querySelector('[data-errors-for="' + field + '"]') || document.getElementById("form-errors");
    var li = document.createElement("li");
    li.textContent = message;
    ul.appendChild(li);
  }

  // Checks the server repeats; here they spare uploading hundreds of MB to be refused.
  function checkLocally() {
    var ok = true;
    if (input.files.length > maxFiles) { showError("files", "At most " + maxFiles + " files per job."); ok = false; }
    Array.prototype.forEach.call(input.files, function (f) {
      if (f.size > maxBytes) { showError("files", f.name + ": larger than " + form.dataset.maxUploadMb + " MB."); ok = false; }
    });
    return ok;
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    clearErrors();
    if (!checkLocally()) return;
    var button = document.getElementById("submit");
    var bar = document.getElementById("upload-bar");
    var status = document.getElementById("upload-status");
    document.getElementById("upload-progress").hidden = false;
    button.disabled = true;

    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("X-Requested-With", "XMLHttpRequest");
    xhr.upload.addEventListener("progress", function (ev) {
      if (!ev.lengthComputable) return;
      var pct = Math.round((ev.loaded / ev.total) * 100);
      bar.style.width = pct + "%";
      status.textContent = pct < 100 ? "Uploading… " + pct + "%" : "Checking the audio…";
    });
    xhr.addEventListener("load", function () {
      var body = null;
      try { body = JSON.parse(xhr.responseText); } catch (err) { /* an HTML error page */ }
      if (xhr.status === 201 && body) { window.location.assign(body.url); return; }
      button.disabled = false;
      status.textContent = "";
      bar.style.width = "0%";
      if (body && body.errors) {
        Object.keys(body.errors).forEach(function (field) {
          body.errors[field].forEach(function (err) { showError(field === "__all__" ? "" : field, err.message); });
        });
      } else {
        showError("", "The upload was refused (HTTP " + xhr.status + ").");
      }
    });
    xhr.addEventListener("error", function () {
      button.disabled = false;
      showError("", "The upload failed: the connection was lost.");
    });
    xhr.send(new FormData(form));
  });
})();
