// gpugate console: the few things pages do without a reload. No inline script anywhere
// (the Content-Security-Policy allows none); every page works without this file.
"use strict";

// <div data-live="URL" data-every="2000">: replaced by the HTML fragment at URL every
// data-every milliseconds, while the tab is visible. Stops when the session ends.
function follow(box) {
  const url = box.dataset.live;
  const every = Math.max(500, Number(box.dataset.every) || 2000);
  let timer = null;
  async function refresh() {
    if (document.hidden) { timer = setTimeout(refresh, every); return; }
    try {
      const answer = await fetch(url, {
        credentials: "same-origin",
        headers: { "X-Console-Fragment": "1" },
        cache: "no-store",
      });
      const text = await answer.text();
      if (answer.ok) {
        box.innerHTML = text;
        box.dataset.updated = new Date().toISOString();
      } else {
        // One message at a time above the last good update, however many polls fail.
        box.querySelector(':scope > [role="alert"]')?.remove();
        box.insertAdjacentHTML("afterbegin", text);
        if (answer.status === 401) { return; }
      }
    } catch (err) {
      // The gateway is restarting or the network dropped: try again next time.
    }
    timer = setTimeout(refresh, every);
  }
  timer = setTimeout(refresh, every);
  return () => clearTimeout(timer);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(follow);
});
