// gpuq dashboard: refresh server-rendered fragments, confirm cancels, follow a job's log.
"use strict";

const LOG_LIMIT_CHARS = 500000;

function flash(text) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.hidden = false;
}

async function refresh(el) {
  if (document.hidden || el.dataset.stopped) return;
  try {
    const response = await fetch(el.dataset.refresh, { credentials: "same-origin" });
    if (!response.ok) return;
    el.innerHTML = await response.text();
    if (el.hasAttribute("data-until-terminal") && el.querySelector("[data-terminal]")) {
      el.dataset.stopped = "1";
    }
  } catch (err) {
    // The server restarts now and then; the next tick tries again.
  }
}

function refreshAll() {
  document.querySelectorAll("[data-refresh]").forEach(refresh);
}

function startRefreshing() {
  document.querySelectorAll("[data-refresh]").forEach((el) => {
    setInterval(() => refresh(el), Number(el.dataset.every || 2000));
  });
}

async function cancel(button) {
  if (!window.confirm(button.dataset.confirm)) return;
  button.disabled = true;
  // A change is JSON from this page's origin: the dashboard refuses form and text bodies.
  const response = await fetch(button.dataset.cancel, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: "{}",
  });
  const body = await response.json();
  if (response.ok) {
    flash(`cancelled ${body.cancelled.length}, stopping ${body.cancelling.length}`);
  } else {
    flash(`error: ${body.message || response.status}`);
    button.disabled = false;
  }
  refreshAll();
}

function followLog(pre) {
  const state = document.getElementById("log-state");
  const source = new EventSource(pre.dataset.stream);
  source.addEventListener("log", (event) => {
    const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent += JSON.parse(event.data).text;
    if (pre.textContent.length > LOG_LIMIT_CHARS) {
      pre.textContent = pre.textContent.slice(-LOG_LIMIT_CHARS);
    }
    if (stick) pre.scrollTop = pre.scrollHeight;
  });
  source.addEventListener("end", (event) => {
    state.textContent = `ended: ${JSON.parse(event.data).status}`;
    pre.dataset.ended = "1";
    source.close();
  });
  source.onerror = () => {
    if (!pre.dataset.ended) state.textContent = "reconnecting…";
  };
  source.onopen = () => {
    if (!pre.dataset.ended) state.textContent = "following…";
  };
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-cancel]");
  if (button) {
    event.preventDefault();
    cancel(button);
  }
});

document.addEventListener("DOMContentLoaded", () => {
  startRefreshing();
  const log = document.getElementById("log");
  if (log) followLog(log);
});
