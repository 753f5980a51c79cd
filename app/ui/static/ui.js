// The sagellm dashboard's own script: the little that htmx does not do.
//
// 1. The admin token: asked once (the sign-in dialog), kept in sessionStorage (this
//    tab only), sent as "Authorization: Bearer" on every request. No cookie is ever
//    used, so another site cannot make the browser act with it (no CSRF).
// 2. Cheap polls: a poll sends the ETag of what its target shows (If-None-Match);
//    the server answers 304 and nothing is swapped when nothing changed. Polls pause
//    while the tab is hidden, and the log's while "Follow" is off.
// 3. Ages ("12 s ago") counted here from the times in the page, corrected for the
//    server's clock (its Date header), so the HTML stays the same while time passes.
// 4. Copy buttons, and the log kept scrolled to its end while following.
(function () {
  "use strict";

  const TOKEN_KEY = "sagellm.adminToken";
  const SESSION_URL = "/ui/data/session";
  let ready = false; // the token was accepted (or none is needed)
  let skewMs = 0; // server clock - this clock
  const shown = new WeakMap(); // target element -> {key, etag} of its content

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function authHeaders(value) {
    return value ? { Authorization: "Bearer " + value } : {};
  }

  // ------------------------------------------------------------------ sign-in

  function $(id) {
    return document.getElementById(id);
  }

  function showSignIn(message) {
    ready = false;
    const dialog = $("sign-in");
    const error = $("sign-in-error");
    error.textContent = message || "";
    error.hidden = !message;
    if (!dialog.open) dialog.showModal();
    $("token").focus();
  }

  function signedIn() {
    ready = true;
    const dialog = $("sign-in");
    if (dialog.open) dialog.close();
    $("sign-out").hidden = !token();
    $("session-state").textContent = token() ? "signed in" : "";
    document.body.dispatchEvent(new CustomEvent("sagellm:ready"));
  }

  async function checkSession(candidate) {
    const resp = await fetch(SESSION_URL, { headers: authHeaders(candidate), cache: "no-store" });
    return resp.status;
  }

  async function start() {
    let status;
    try {
      status = await checkSession(token());
    } catch (err) {
      $("session-state").textContent = "the API does not answer; retrying";
      setTimeout(start, 3000);
      return;
    }
    if (status === 200) {
      signedIn();
    } else if (status === 401) {
      const had = token();
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn(had ? "The API refused the saved token: sign in again." : "");
    } else {
      $("session-state").textContent = "the API answered " + status + "; retrying";
      setTimeout(start, 3000);
    }
  }

  function wireSignIn() {
    $("sign-in-form").addEventListener("submit", async function (event) {
      event.preventDefault();
      const candidate = $("token").value.trim();
      if (!candidate) return;
      const status = await checkSession(candidate).catch(() => 0);
      if (status === 200) {
        sessionStorage.setItem(TOKEN_KEY, candidate);
        $("token").value = "";
        signedIn();
      } else if (status === 401) {
        showSignIn("Wrong token: the API refused it.");
      } else {
        showSignIn("The API could not be reached (" + (status || "no answer") + ").");
      }
    });
    $("sign-in").addEventListener("cancel", (event) => event.preventDefault());
    $("sign-out").addEventListener("click", function () {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
  }

  // ------------------------------------------------------------------ requests

  function requestKey(detail) {
    const query = new URLSearchParams(detail.formData || []).toString();
    return detail.path + (query ? "?" + query : "");
  }

  function isPoll(detail) {
    return !detail.triggeringEvent && detail.elt.classList.contains("poll");
  }

  document.addEventListener("htmx:configRequest", function (event) {
    const d = event.detail;
    if (!ready) {
      event.preventDefault(); // polls wait for the sign-in
      return;
    }
    if (isPoll(d) && document.hidden) {
      event.preventDefault();
      return;
    }
    const followBox = d.elt.dataset.follow && document.querySelector(d.elt.dataset.follow);
    if (followBox && !followBox.checked && isPoll(d)) {
      event.preventDefault();
      return;
    }
    Object.assign(d.headers, authHeaders(token()));
    if (d.verb === "get") {
      d.sagellmKey = requestKey(d);
      const now = shown.get(d.target);
      if (now && now.key === d.sagellmKey) d.headers["If-None-Match"] = now.etag;
    }
  });

  document.addEventListener("htmx:afterRequest", function (event) {
    const d = event.detail;
    const xhr = d.xhr;
    if (!xhr) return;
    const date = xhr.getResponseHeader("Date");
    if (date) skewMs = Date.parse(date) - Date.now();
    if (xhr.status === 401) {
      showSignIn("The API refused the token (it may have changed): sign in again.");
      return;
    }
    if (xhr.status === 304) return; // the target shows this already
    const etag = xhr.getResponseHeader("ETag");
    const key = d.requestConfig && d.requestConfig.sagellmKey;
    if (xhr.status === 200 && etag && key) shown.set(d.target, { key: key, etag: etag });
    else if (d.target) shown.delete(d.target);
  });

  document.addEventListener("htmx:afterSettle", function (event) {
    refreshAges(event.detail.target);
    const target = event.detail.target;
    const followBox = target && target.dataset.follow && document.querySelector(target.dataset.follow);
    if (followBox && followBox.checked) {
      const log = target.querySelector("pre.log");
      if (log) log.scrollTop = log.scrollHeight;
    }
  });

  // ------------------------------------------------------------------ ages

  function formatAge(seconds) {
    const s = Math.abs(seconds);
    let text;
    if (s < 60) text = Math.floor(s) + " s";
    else if (s < 3600) text = Math.floor(s / 60) + " min";
    else if (s < 86400) text = Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    else text = Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
    return text;
  }

  function refreshAges(root) {
    const now = (Date.now() + skewMs) / 1000;
    (root || document).querySelectorAll("time.ago[data-t]").forEach(function (el) {
      const age = now - parseFloat(el.dataset.t);
      const suffix = el.dataset.suffix === undefined ? " ago" : el.dataset.suffix;
      el.textContent = age < -1 ? "in " + formatAge(age) : formatAge(age) + suffix;
    });
  }

  // ------------------------------------------------------------------ copy

  document.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (!source) return;
    const text = source.innerText;
    try {
      await navigator.clipboard.writeText(text);
    } catch (err) {
      const area = document.createElement("textarea");
      area.value = text;
      document.body.appendChild(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1500);
  });

  // ------------------------------------------------------------------ start

  document.addEventListener("DOMContentLoaded", function () {
    wireSignIn();
    if (location.hash === "#start" && $("start")) $("start").open = true;
    setInterval(refreshAges, 1000);
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && ready) document.body.dispatchEvent(new CustomEvent("sagellm:changed"));
    });
    start();
  });
})();
