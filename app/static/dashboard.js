// The cost dashboard: reads GET /v1/usage/summary with a key kept in this tab's sessionStorage and draws
// it with plain DOM and SVG. Names (features, users, models) come from the gateway's clients, so they are
// only ever set as text, never as markup. Styles are set through the CSSOM (`css`), which the page's
// Content-Security-Policy allows, where it refuses style attributes.
"use strict";

(() => {
  const KEY = "llm-gateway.dashboard.key";
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#14b8a6", "#ec4899"];
  const OTHER_COLOUR = "#cbd5e1";
  const INTEGER = new Intl.NumberFormat("en-US");
  const DAY_LABEL = new Intl.DateTimeFormat("en-US", { month: "short", day: "numeric", timeZone: "UTC" });

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (name === "text") node.textContent = value;
      else if (name === "css") Object.assign(node.style, value);
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children) if (child) node.append(child);
    return node;
  }

  // Money arrives as an exact decimal string; it is rounded to the cent (half up) in integers, so the
  // page shows what the database holds, not what a binary float makes of it.
  function cents(amount) {
    const negative = amount.startsWith("-");
    const [whole, fraction = ""] = amount.replace("-", "").split(".");
    const padded = (fraction + "000").slice(0, 3);
    let value = BigInt(whole || "0") * 100n + BigInt(padded.slice(0, 2));
    if (Number(padded[2]) >= 5) value += 1n;
    return negative ? -value : value;
  }

  function money(amount) {
    const value = cents(amount);
    if (value === 0n && /[1-9]/.test(amount)) return "<$0.01";
    const sign = value < 0n ? "-" : "";
    const abs = value < 0n ? -value : value;
    return `${sign}$${INTEGER.format(abs / 100n)}.${String(abs % 100n).padStart(2, "0")}`;
  }

  function moneyAxis(dollars) {
    if (dollars >= 1000) return `$${INTEGER.format(Math.round(dollars / 100) / 10)}k`;
    if (dollars >= 10 || dollars === 0) return `$${INTEGER.format(Math.round(dollars))}`;
    return `$${dollars.toFixed(2)}`;
  }

  const count = (n) => INTEGER.format(n);
  // Rounded half up from whole numbers (tenths of a percent, hundredths of a second), so that a tie is
  // rounded the same way every time, not as the binary float nearest to it happens to fall.
  function percent(part, whole) {
    if (!whole) return "–";
    const tenths = Math.round((1000 * part) / whole);
    return `${Math.floor(tenths / 10)}.${tenths % 10}%`;
  }
  function latency(ms) {
    if (ms < 1000) return `${ms} ms`;
    const hundredths = Math.round(ms / 10);
    return `${Math.floor(hundredths / 100)}.${String(hundredths % 100).padStart(2, "0")} s`;
  }
  const unnamed = (name, what) => (name === null ? `(no ${what})` : name);

  // --- dates (UTC days as YYYY-MM-DD) ---
  const isoDay = (date) => date.toISOString().slice(0, 10);
  function addDays(day, n) {
    const date = new Date(`${day}T00:00:00Z`);
    date.setUTCDate(date.getUTCDate() + n);
    return isoDay(date);
  }
  const today = () => isoDay(new Date());

  // --- state: the range and filters live in the URL's fragment (never the key) ---
  function readState() {
    const params = new URLSearchParams(location.hash.slice(1));
    const end = params.get("end") || today();
    return {
      start: params.get("start") || addDays(end, -29),
      end,
      feature: params.get("feature") || "",
      model: params.get("model") || "",
      user: params.get("user") || "",
    };
  }

  function writeState(state) {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(state)) if (value) params.set(name, value);
    history.replaceState(null, "", `#${params}`);
  }

  function showControls(state) {
    for (const name of ["start", "end", "feature", "model", "user"]) $(name).value = state[name];
  }

  function controlsState() {
    return {
      start: $("start").value,
      end: $("end").value,
      feature: $("feature").value.trim(),
      model: $("model").value.trim(),
      user: $("user").value.trim(),
    };
  }

  // --- session ---
  function signIn(message) {
    sessionStorage.removeItem(KEY);
    $("app").hidden = true;
    $("sign-out").hidden = true;
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    $("key").focus();
  }

  async function load() {
    const key = sessionStorage.getItem(KEY);
    if (!key) return signIn();
    const state = readState();
    showControls(state);
    $("login").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    document.body.classList.add("loading");
    const params = new URLSearchParams({ start: state.start, end: addDays(state.end, 1) });
    for (const name of ["feature", "model", "user"]) if (state[name]) params.set(name, state[name]);
    let response;
    try {
      response = await fetch(`/v1/usage/summary?${params}`, {
        headers: { Authorization: `Bearer ${key}` },
        cache: "no-store",
        credentials: "omit",
      });
    } catch {
      return showError("The gateway could not be reached.");
    } finally {
      document.body.classList.remove("loading");
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      // Not JSON: the status says enough.
    }
    const message = body && body.error ? body.error.message : `The gateway answered ${response.status}.`;
    if (response.status === 401 || response.status === 403) return signIn(message);
    if (!response.ok) return showError(message);
    $("error").hidden = true;
    render(body);
    document.body.dataset.loaded = "true";
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
  }

  // --- rendering ---
  function render(summary) {
    const totals = summary.totals;
    const lastDay = addDays(summary.end, -1);
    $("range-label").textContent = `${summary.start} to ${lastDay}`;
    $("total-cost").textContent = money(totals.cost_usd);
    $("total-requests").textContent = count(totals.requests);
    $("total-tokens").textContent = count(totals.total_tokens);
    $("token-split").textContent =
      `${count(totals.prompt_tokens)} in · ${count(totals.completion_tokens)} out`;
    $("cost-per-1k").textContent = totals.requests
      ? money(((Number(totals.cost_usd) * 1000) / totals.requests).toFixed(10))
      : "–";
    const reliability = summary.reliability;
    $("error-rate").textContent = percent(reliability.failed, reliability.requests);
    const window = `${reliability.start} to ${addDays(reliability.end, -1)}`;
    $("error-window").textContent = window;
    $("reliability-window").textContent = window;
    daily(summary);
    datalists(summary);
    $("users").replaceChildren(
      table(
        summary.top_users,
        [
          { title: "User", cell: (row) => filterLink("user", row.user, "user") },
          { title: "Requests", cell: (row) => count(row.requests), numeric: true },
          { title: "Tokens", cell: (row) => count(row.total_tokens), numeric: true },
          { title: "Cost", cell: (row) => money(row.cost_usd), numeric: true, name: "cost" },
          { title: "", cell: (row) => share(row.cost_usd, totals.cost_usd), bar: true },
        ],
        "No usage in this range.",
      ),
    );
    const modelColour = (i) => PALETTE[(i + 2) % PALETTE.length];
    $("models").replaceChildren(
      donut(summary.models, totals.cost_usd, modelColour),
      table(
        summary.models,
        [
          { title: "Model", cell: (row) => filterLink("model", row.model, "model") },
          { title: "Requests", cell: (row) => count(row.requests), numeric: true },
          { title: "Prompt", cell: (row) => count(row.prompt_tokens), numeric: true },
          { title: "Completion", cell: (row) => count(row.completion_tokens), numeric: true },
          { title: "Cost", cell: (row) => money(row.cost_usd), numeric: true, name: "cost" },
          {
            title: "",
            cell: (row) => share(row.cost_usd, totals.cost_usd, modelColour(summary.models.indexOf(row))),
            bar: true,
          },
        ],
        "No usage in this range.",
      ),
    );
    $("reliability").replaceChildren(
      table(
        reliability.features,
        [
          { title: "Feature", cell: (row) => filterLink("feature", row.feature, "feature") },
          { title: "Requests", cell: (row) => count(row.requests), numeric: true },
          { title: "Failed", cell: (row) => count(row.failed), numeric: true },
          {
            title: "Error rate",
            cell: (row) => rate(row.failed, row.requests),
            numeric: true,
            name: "error-rate",
          },
          { title: "p95 latency", cell: (row) => latency(row.p95_latency_ms), numeric: true, name: "p95" },
        ],
        "No calls in these days.",
      ),
    );
  }

  function rate(failed, requests) {
    const ratio = requests ? failed / requests : 0;
    const level = ratio >= 0.05 ? "bad" : ratio >= 0.01 ? "warn" : "ok";
    return el("span", { class: `pill ${level}`, text: percent(failed, requests) });
  }

  function share(part, whole, colour) {
    const ratio = Number(whole) > 0 ? Number(part) / Number(whole) : 0;
    const fill = el("span", { css: { width: `${(ratio * 100).toFixed(1)}%`, background: colour } });
    return el("span", { class: "share", title: percent(Number(part), Number(whole)) }, el("span", { class: "bar" }, fill));
  }

  function filterLink(filter, value, what) {
    if (value === null) return el("span", { class: "muted", text: unnamed(value, what) });
    return el("button", {
      type: "button",
      class: "link",
      title: `Show only ${what} ${value}`,
      text: value,
      onclick: () => {
        const state = { ...readState(), [filter]: value };
        writeState(state);
        load();
      },
    });
  }

  function table(rows, columns, emptyMessage) {
    if (!rows.length) return empty(emptyMessage);
    const head = el("tr", {}, ...columns.map((c) => el("th", { class: c.numeric ? "num" : null, text: c.title })));
    const body = rows.map((row) =>
      el(
        "tr",
        {},
        ...columns.map((c) => {
          const value = c.cell(row);
          const cell = el("td", {
            class: [c.numeric ? "num" : "", c.bar ? "barcell" : ""].join(" ").trim() || null,
            "data-col": c.name || null,
          });
          cell.append(value);
          return cell;
        }),
      ),
    );
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
  }

  function empty(message) {
    return el("div", { class: "empty" }, el("span", { class: "empty-mark", "aria-hidden": "true" }), el("p", { text: message }));
  }

  function datalists(summary) {
    const fill = (id, names) =>
      $(id).replaceChildren(...names.filter((n) => n !== null).map((name) => el("option", { value: name })));
    fill("feature-list", summary.features);
    fill("model-list", summary.models.map((row) => row.model));
    fill("user-list", summary.top_users.map((row) => row.user));
  }

  // The stacked bars: one column per day of the range (days without calls included), the costliest
  // features in colour and the rest as "other features".
  function daily(summary) {
    const series = summary.features.map((name, i) => ({ name: unnamed(name, "feature"), colour: PALETTE[i] }));
    if (summary.other_features) series.push({ name: "other features", colour: OTHER_COLOUR });
    const byDay = new Map(summary.days.map((row) => [row.day, row]));
    const days = [];
    for (let day = summary.start; day < summary.end; day = addDays(day, 1)) days.push(day);
    const stacks = days.map((day) => {
      const row = byDay.get(day);
      if (!row) return { day, total: "0", parts: series.map(() => "0") };
      const parts = [...row.by_feature];
      if (summary.other_features) parts.push(row.other_usd);
      return { day, total: row.cost_usd, parts };
    });
    const legendTotals = series.map((_, i) => stacks.reduce((sum, s) => sum + Number(s.parts[i]), 0));
    $("legend").replaceChildren(
      ...series.map((s, i) =>
        el(
          "li",
          {},
          el("span", { class: "swatch", css: { background: s.colour } }),
          el("span", { text: s.name }),
          el("span", { class: "muted", text: money(legendTotals[i].toFixed(10)) }),
        ),
      ),
    );
    if (!summary.days.length) {
      $("daily").replaceChildren(empty("No usage in this range. Calls show up here a moment after they end."));
      return;
    }
    // Drawn at the size it is shown, so that text is not stretched.
    const width = Math.max(480, $("daily").clientWidth || 960);
    const height = 280;
    const pad = { left: 56, right: 8, top: 12, bottom: 28 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const max = Math.max(...stacks.map((s) => Number(s.total)), 0);
    const ticks = niceTicks(max);
    const top = ticks[ticks.length - 1] || 1;
    const y = (dollars) => pad.top + plotH - (dollars / top) * plotH;
    const slot = plotW / days.length;
    const barW = Math.max(2, Math.min(36, slot * 0.72));
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": "Cost per feature per day",
    });
    for (const tick of ticks) {
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(tick), y2: y(tick), class: "grid" }));
      const label = svg("text", { x: pad.left - 8, y: y(tick) + 4, class: "axis", "text-anchor": "end" });
      label.textContent = moneyAxis(tick);
      chart.append(label);
    }
    const labelEvery = Math.ceil(days.length / 12);
    stacks.forEach((stack, i) => {
      const x = pad.left + i * slot + (slot - barW) / 2;
      const group = svg("g", { "data-day": stack.day, "data-cost": stack.total });
      let base = 0;
      stack.parts.forEach((part, j) => {
        const value = Number(part);
        if (value <= 0) return;
        const rect = svg("rect", {
          x,
          y: y(base + value),
          width: barW,
          height: Math.max(0.5, y(base) - y(base + value)),
          fill: series[j].colour,
        });
        const tip = svg("title");
        tip.textContent = `${stack.day} · ${series[j].name}: ${money(part)}`;
        rect.append(tip);
        group.append(rect);
        base += value;
      });
      const hover = svg("rect", { x: pad.left + i * slot, y: pad.top, width: slot, height: plotH, class: "hover" });
      const tip = svg("title");
      tip.textContent = `${stack.day}: ${money(stack.total)}`;
      hover.append(tip);
      group.prepend(hover);
      chart.append(group);
      if (i % labelEvery === 0) {
        const label = svg("text", { x: x + barW / 2, y: height - 8, class: "axis", "text-anchor": "middle" });
        label.textContent = DAY_LABEL.format(new Date(`${stack.day}T00:00:00Z`));
        chart.append(label);
      }
    });
    $("daily").replaceChildren(chart);
  }

  // Each model's share of the cost as a ring, the range's cost in its middle.
  function donut(rows, total, colour) {
    const whole = Number(total);
    if (!rows.length || whole <= 0) return "";
    const size = 150;
    const radius = 58;
    const circumference = 2 * Math.PI * radius;
    const ring = svg("svg", { viewBox: `0 0 ${size} ${size}`, class: "donut", role: "img", "aria-label": "Cost by model" });
    ring.append(svg("circle", { cx: size / 2, cy: size / 2, r: radius, class: "donut-track" }));
    let offset = 0;
    rows.forEach((row, i) => {
      const length = (Number(row.cost_usd) / whole) * circumference;
      if (length <= 0) return;
      const arc = svg("circle", {
        cx: size / 2,
        cy: size / 2,
        r: radius,
        class: "donut-arc",
        stroke: colour(i),
        "stroke-dasharray": `${length} ${circumference - length}`,
        "stroke-dashoffset": `${-offset}`,
        transform: `rotate(-90 ${size / 2} ${size / 2})`,
      });
      const tip = svg("title");
      tip.textContent = `${row.model}: ${money(row.cost_usd)} (${percent(Number(row.cost_usd), whole)})`;
      arc.append(tip);
      ring.append(arc);
      offset += length;
    });
    const value = svg("text", { x: size / 2, y: size / 2 + 2, class: "donut-value", "text-anchor": "middle" });
    value.textContent = money(total);
    const label = svg("text", { x: size / 2, y: size / 2 + 20, class: "donut-label", "text-anchor": "middle" });
    label.textContent = `${rows.length} model${rows.length === 1 ? "" : "s"}`;
    ring.append(value, label);
    const keys = el(
      "ul",
      { class: "legend donut-legend" },
      ...rows.map((row, i) =>
        el(
          "li",
          {},
          el("span", { class: "swatch", css: { background: colour(i) } }),
          el("span", { text: unnamed(row.model, "model") }),
          el("span", { class: "muted", text: percent(Number(row.cost_usd), whole) }),
        ),
      ),
    );
    return el("div", { class: "donut-row" }, ring, keys);
  }

  function niceTicks(max) {
    if (max <= 0) return [0, 1];
    const raw = max / 4;
    const magnitude = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
    const ticks = [];
    for (let t = 0; t < max + step; t += step) ticks.push(Number(t.toFixed(10)));
    return ticks;
  }

  // --- wiring ---
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      $("key").value = "";
      if (!key) return;
      sessionStorage.setItem(KEY, key);
      load();
    });
    $("sign-out").addEventListener("click", () => signIn());
    $("controls").addEventListener("submit", (event) => {
      event.preventDefault();
      const state = controlsState();
      if (state.end < state.start) return showError("'To' must not be before 'From'.");
      writeState(state);
      load();
    });
    $("clear").addEventListener("click", () => {
      const { start, end } = readState();
      writeState({ start, end });
      load();
    });
    for (const button of document.querySelectorAll(".presets button")) {
      button.addEventListener("click", () => {
        const end = today();
        const days = button.dataset.days;
        const start = days === "month" ? `${end.slice(0, 8)}01` : addDays(end, 1 - Number(days));
        writeState({ ...readState(), start, end });
        load();
      });
    }
    window.addEventListener("hashchange", load);
    load();
  });
})();
