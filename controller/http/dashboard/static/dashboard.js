// Live project cards: migration phase and progress from server-sent events; a finished
// migration reloads its card from the server (engine badge, status, actions).
(function () {
  "use strict";
  var source = new EventSource("/events");
  window.fluxEvents = source;
  function card(hash) { return document.querySelector('.card[data-hash="' + hash + '"]'); }
  function refresh(hash) {
    fetch("/projects/" + hash + "/card", {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        var old = card(hash);
        if (html && old) { old.outerHTML = html; }
      });
  }
  source.onmessage = function (message) {
    var event = JSON.parse(message.data);
    var el = card(event.hash);
    if (!el) { return; }
    var box = el.querySelector(".migration");
    if (event.event === "result") { refresh(event.hash); return; }
    box.hidden = false;
    if (event.event === "phase") {
      box.querySelector(".phase").textContent = "Migrating · " + event.phase;
      el.querySelector(".status").textContent = "Migrating · " + event.phase;
    } else if (event.event === "progress" && event.total) {
      var bar = box.querySelector("progress");
      bar.value = Math.round(100 * Math.min(event.done, event.total) / event.total);
      box.querySelector(".detail").textContent = event.phase + ": " + event.done + " / " + event.total + " " + event.unit;
    }
  };
})();
