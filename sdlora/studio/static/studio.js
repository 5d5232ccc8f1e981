// sdlora studio: the pages' scripts. Written here, no framework and no build step. Every value that
// comes from a run or a data folder goes into the page as text (textContent), never as HTML.
"use strict";

const token = document.querySelector('meta[name="sdlora-token"]')?.content;

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token) headers["X-Sdlora-Token"] = token;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  const text = await response.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch { data = { error: text }; }
  if (!response.ok && !data.errors) {
    const error = new Error(data.error || `${response.status} ${response.statusText}`);
    error.data = data;
    error.status = response.status;
    throw error;
  }
  return data;
}

function toast(message, bad = false) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = bad ? "bad shown" : "shown";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.className = ""; }, 5000);
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "";
  const s = Math.round(value);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function events(params, handlers) {
  const query = new URLSearchParams(params);
  if (token) query.set("token", token);
  const source = new EventSource(`/api/events?${query}`);
  const dot = document.getElementById("connection");
  source.onopen = () => dot.classList.add("live");
  source.onerror = () => dot.classList.remove("live");
  for (const [name, handler] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handler(JSON.parse(event.data)));
  }
  return source;
}

// ------------------------------------------------------------------ charts (SVG)

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

function niceTicks(low, high, count) {
  if (!(high > low)) return [low];
  const step = Math.pow(10, Math.floor(Math.log10((high - low) / count)));
  const multiple = [1, 2, 5, 10].find((m) => (high - low) / (step * m) <= count) || 10;
  const size = step * multiple;
  const ticks = [];
  for (let t = Math.ceil(low / size) * size; t <= high + size * 1e-9; t += size) ticks.push(t);
  return ticks;
}

function formatNumber(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1000 || magnitude < 0.01) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}

// lines: [{points: [[step, value], ...], cls, dots}], options: {log, domain: [first, last] | null, onZoom}
function drawChart(root, lines, options = {}) {
  const box = root.viewBox.baseVal;
  const width = box.width, height = box.height;
  const margin = { left: 60, right: 12, top: 10, bottom: 24 };
  root.replaceChildren();
  const shown = lines.map((line) => ({
    ...line,
    points: line.points.filter(([x, y]) => Number.isFinite(y) && (!options.log || y > 0)
      && (!options.domain || (x >= options.domain[0] && x <= options.domain[1]))),
  }));
  const all = shown.flatMap((line) => line.points);
  if (!all.length) {
    root.append(Object.assign(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }),
      { textContent: "no points yet" }));
    return;
  }
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => (options.log ? Math.log10(p[1]) : p[1]));
  let [x0, x1] = options.domain || [Math.min(...xs), Math.max(...xs)];
  if (x1 === x0) x1 = x0 + 1;
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 === y0) { const half = Math.abs(y0) * 0.1 || 0.5; y0 -= half; y1 += half; }  // a constant (a flat lr)
  const pad = (y1 - y0) * 0.05;
  y0 -= pad; y1 += pad;
  const X = (x) => margin.left + ((x - x0) / (x1 - x0)) * (width - margin.left - margin.right);
  const Y = (y) => margin.top + (1 - (y - y0) / (y1 - y0)) * (height - margin.top - margin.bottom);
  const axes = svg("g", { class: "axes" });
  for (const t of niceTicks(x0, x1, 8)) {
    axes.append(svg("line", { x1: X(t), x2: X(t), y1: margin.top, y2: height - margin.bottom, class: "grid" }));
    axes.append(Object.assign(svg("text", { x: X(t), y: height - 6, "text-anchor": "middle" }),
      { textContent: formatNumber(Math.round(t)) }));
  }
  const yTicks = options.log ? niceTicks(Math.floor(y0), Math.ceil(y1), 6).filter((t) => t >= y0 && t <= y1)
    : niceTicks(y0, y1, 5);
  for (const t of yTicks) {
    axes.append(svg("line", { x1: margin.left, x2: width - margin.right, y1: Y(t), y2: Y(t), class: "grid" }));
    axes.append(Object.assign(svg("text", { x: margin.left - 6, y: Y(t) + 4, "text-anchor": "end" }),
      { textContent: formatNumber(options.log ? Math.pow(10, t) : t) }));
  }
  root.append(axes);
  for (const line of shown) {
    if (!line.points.length) continue;
    const value = (p) => (options.log ? Math.log10(p[1]) : p[1]);
    if (line.dots) {
      const group = svg("g", { class: line.cls });
      for (const p of line.points) group.append(svg("circle", { cx: X(p[0]), cy: Y(value(p)), r: 3 }));
      root.append(group);
    } else {
      const d = line.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(value(p)).toFixed(1)}`).join("");
      root.append(svg("path", { d, class: `line ${line.cls}`, "data-points": line.points.length }));
    }
  }
  if (options.onZoom) enableZoom(root, margin, width, (px) => x0 + ((px - margin.left) / (width - margin.left - margin.right)) * (x1 - x0), options.onZoom);
}

function enableZoom(root, margin, width, toStep, onZoom) {
  let start = null;
  const band = svg("rect", { class: "zoom-band", y: 0, height: "100%", width: 0 });
  root.append(band);
  const local = (event) => {
    const rect = root.getBoundingClientRect();
    return ((event.clientX - rect.left) / rect.width) * width;
  };
  root.onmousedown = (event) => { start = local(event); band.setAttribute("x", start); band.setAttribute("width", 0); };
  root.onmousemove = (event) => {
    if (start === null) return;
    const now = local(event);
    band.setAttribute("x", Math.min(start, now));
    band.setAttribute("width", Math.abs(now - start));
  };
  root.onmouseup = (event) => {
    if (start === null) return;
    const end = local(event);
    const [a, b] = [Math.min(start, end), Math.max(start, end)];
    start = null;
    if (b - a > 5) onZoom(Math.floor(toStep(a)), Math.ceil(toStep(b)));
  };
  root.ondblclick = () => onZoom(null, null);
}

function ema(points, weight) {
  let value = null;
  return points.map(([x, y]) => { value = value === null ? y : weight * value + (1 - weight) * y; return [x, value]; });
}

function zip(series) {
  return series.step.map((step, i) => [step, series.value[i]]);
}

// ------------------------------------------------------------------ the runs page

function runsPage() {
  const body = document.querySelector("#runs tbody");
  const queue = document.querySelector("#queue tbody");
  const render = (state) => {
    body.replaceChildren(...(state.runs.length ? state.runs.map((run) => el("tr", { "data-run": run.name },
      el("td", {}, el("input", { type: "checkbox", class: "pick", value: run.name, "aria-label": `compare ${run.name}` })),
      el("td", {}, el("a", { href: `/runs/${encodeURIComponent(run.name)}`, text: run.name })),
      el("td", {}, el("span", { class: `status ${run.status}`, text: run.status }), " ", el("small", { text: run.detail || "" })),
      el("td", { text: run.total_steps ? `${run.step} / ${run.total_steps}` : String(run.step ?? "") }),
      el("td", { text: run.loss_smoothed != null ? run.loss_smoothed.toFixed(4) : "" }),
      el("td", { text: seconds(run.eta_s) }),
      el("td", {}, run.adapter ? el("a", { href: `/files/runs/${encodeURIComponent(run.name)}/${encodeURIComponent(run.adapter)}`, text: run.adapter }) : ""),
    )) : [el("tr", { class: "empty" }, el("td", { colspan: 7, text: "No runs in this folder yet: queue one from New run." }))]));
    queue.replaceChildren(...(state.queue.length ? state.queue.map((entry, index) => el("tr", { "data-entry": entry.id },
      el("td", { text: String(entry.id) }),
      el("td", {}, el("a", { href: `/runs/${encodeURIComponent(entry.run)}`, text: entry.run })),
      el("td", { text: entry.state + (entry.resume ? " (resume)" : "") }),
      el("td", { text: new Date(entry.queued_at * 1000).toLocaleTimeString() }),
      el("td", {}, ...(entry.state === "waiting" ? [
        el("button", { type: "button", text: "↑", title: "earlier", onclick: () => move(entry.id, index - 1) }),
        el("button", { type: "button", text: "↓", title: "later", onclick: () => move(entry.id, index + 1) }),
        el("button", { type: "button", text: "Cancel", class: "cancel", onclick: () => cancel(entry.id) }),
      ] : [])),
    )) : [el("tr", { class: "empty" }, el("td", { colspan: 5, text: "The queue is empty." }))]));
  };
  const move = (id, index) => api(`/api/queue/${id}`, { method: "POST", json: { index: Math.max(0, index) } }).catch((e) => toast(e.message, true));
  const cancel = (id) => api(`/api/queue/${id}`, { method: "DELETE" }).then(() => toast("cancelled")).catch((e) => toast(e.message, true));
  events({}, { runs: render });
  document.getElementById("compare-picked").onclick = () => {
    const picked = [...document.querySelectorAll(".pick:checked")].map((box) => box.value);
    if (picked.length < 2) return toast("pick two to four runs", true);
    location.href = "/compare?" + picked.map((name) => `run=${encodeURIComponent(name)}`).join("&");
  };
}

// ------------------------------------------------------------------ one run

function runPage() {
  const run = document.body.dataset.run;
  const base = `/api/runs/${encodeURIComponent(run)}`;
  const chart = { series: null, domain: null };
  const logScale = document.getElementById("log-scale");
  const smoothing = document.getElementById("smoothing");

  const redraw = () => {
    if (!chart.series) return;
    const s = chart.series;
    const raw = zip(s.loss);
    drawChart(document.getElementById("loss-chart"), [
      { points: raw, cls: "raw" },
      { points: ema(raw, Number(smoothing.value)), cls: "smoothed" },
      { points: zip(s.val_loss), cls: "validation", dots: true },
    ], { log: logScale.checked, domain: chart.domain, onZoom: zoom });
    drawChart(document.getElementById("lr-chart"), [{ points: zip(s.lr), cls: "lr" }], { domain: chart.domain });
  };
  const load = async () => {
    const query = new URLSearchParams({ points: 900 });
    if (chart.domain) { query.set("first", chart.domain[0]); query.set("last", chart.domain[1]); }
    const data = await api(`${base}/metrics?${query}`);
    chart.series = data.series;
    chart.last = data.last_step;
    redraw();
    return data.last_step;
  };
  // A live chart is drawn at most twice a second, however fast the steps come: the page must not take
  // the CPU from the training it shows (bench/studio.py measures what it takes).
  let drawn = 0, pending = null;
  const drawSoon = () => {
    if (pending) return;
    pending = setTimeout(() => { pending = null; drawn = Date.now(); redraw(); }, Math.max(0, 500 - (Date.now() - drawn)));
  };
  const zoom = (first, last) => { chart.domain = first === null ? null : [first, last]; load(); };
  document.getElementById("zoom-reset").onclick = () => zoom(null, null);
  logScale.onchange = redraw;
  smoothing.oninput = redraw;

  const append = (data) => {
    if (!chart.series || data.run !== run) return;
    for (const name of Object.keys(data.series)) {
      const target = chart.series[name], extra = data.series[name];
      const lastStep = target.step.length ? target.step[target.step.length - 1] : -1;
      extra.step.forEach((step, i) => { if (step > lastStep) { target.step.push(step); target.value.push(extra.value[i]); } });
    }
    drawSoon();
  };
  const gallery = makeGallery(run);
  const update = (state) => {
    const me = state.runs.find((row) => row.name === run);
    if (!me) return;
    const status = document.getElementById("status");
    status.textContent = me.status;
    status.className = `status ${me.status}`;
    document.getElementById("detail").textContent = me.detail || "";
    document.getElementById("step").textContent = me.step;
    for (const button of document.querySelectorAll("[data-action]")) button.disabled = me.status !== "running";
    // Samples, checkpoints and the log change as steps go by: looked up again at most every 5 s.
    const changed = me.checkpoints.join() !== checkpointNames().join() || me.status !== runPage.status;
    if (changed || (me.step !== runPage.step && Date.now() - runPage.refreshed > 5000)) refreshDetails();
    runPage.status = me.status;
    runPage.step = me.step;
  };
  const checkpointNames = () => [...document.querySelectorAll("#checkpoints tr[data-checkpoint]")].map((row) => row.dataset.checkpoint);
  const refreshDetails = async () => {
    runPage.refreshed = Date.now();
    const state = await api(base);
    document.getElementById("log").textContent = state.log.join("\n");
    document.getElementById("config").textContent = state.config;
    renderCheckpoints(state.checkpoints);
    gallery.update(state.samples);
  };
  const renderCheckpoints = (checkpoints) => {
    const body = document.querySelector("#checkpoints tbody");
    body.replaceChildren(...checkpoints.map((checkpoint) => {
      const stateText = el("span", { class: "grid-state", text: checkpoint.grid.state === "none" ? "" : checkpoint.grid.state });
      const picture = el("div", { class: "grid-image" });
      if (checkpoint.grid.state === "done") picture.append(el("img", { src: `/files/runs/${encodeURIComponent(run)}/grids/${checkpoint.name}.png?${Date.now()}`, alt: `strength grid of ${checkpoint.name}` }));
      return el("tr", { "data-checkpoint": checkpoint.name },
        el("td", { text: checkpoint.name }),
        el("td", {}, el("button", { type: "button", class: "resume", text: "Resume from here", onclick: () => resume(checkpoint.name) })),
        el("td", {}, el("button", { type: "button", class: "grid", text: "Strength grid", onclick: () => grid(checkpoint.name, stateText, picture) }), " ", stateText, picture));
    }));
  };
  const resume = (checkpoint) => api(`${base}/resume`, { method: "POST", json: { checkpoint } })
    .then(() => toast(`queued: resume from ${checkpoint}`)).catch((e) => toast(e.message, true));
  const grid = async (checkpoint, stateText, picture) => {
    try {
      let job = await api(`${base}/checkpoints/${checkpoint}/grid`, { method: "POST" });
      stateText.textContent = job.state;
      while (job.state === "running") {
        await new Promise((r) => setTimeout(r, 1000));
        job = await api(`${base}/checkpoints/${checkpoint}/grid`);
        stateText.textContent = job.state;
      }
      if (job.state === "done") picture.replaceChildren(el("img", { src: `${job.url}?${Date.now()}`, alt: `strength grid of ${checkpoint}` }));
      if (job.state === "failed") stateText.textContent = `failed: ${job.log.slice(-1)[0] || ""}`;
    } catch (e) { toast(e.message, true); }
  };
  for (const button of document.querySelectorAll("[data-action]")) {
    button.onclick = () => api(`${base}/${button.dataset.action}`, { method: "POST" })
      .then(() => toast(`${button.dataset.action}: asked; the trainer acts after its current step`))
      .catch((e) => toast(e.message, true));
  }
  const toyButton = document.getElementById("toy-score");
  if (toyButton) {
    const show = (job) => {
      document.getElementById("toy-state").textContent = job.state === "none" ? "" : job.state;
      document.getElementById("toy-scores").textContent = job.scores || (job.log || []).join("\n");
    };
    api(`${base}/toy-scores`).then(show);
    toyButton.onclick = async () => {
      try {
        let job = await api(`${base}/toy-scores`, { method: "POST" });
        show(job);
        while (job.state === "running") { await new Promise((r) => setTimeout(r, 2000)); job = await api(`${base}/toy-scores`); show(job); }
      } catch (e) { toast(e.message, true); }
    };
  }
  load().then((last) => events({ run, after: last }, { metrics: append, runs: update }));
  refreshDetails();
}

function makeGallery(run) {
  const root = document.getElementById("gallery");
  const head = root.querySelector("thead tr");
  const body = root.querySelector("tbody");
  const enlarged = document.getElementById("enlarged");
  let shown = "";
  let prompts = [...head.querySelectorAll("th")].slice(1).map((th) => th.textContent);
  const cell = (step, index) => `/api/runs/${encodeURIComponent(run)}/samples/${step}/${index}.png`;
  const focus = (row, column) => {
    const target = body.querySelector(`td[data-row="${row}"][data-column="${column}"]`);
    if (target) target.focus();
  };
  const open = (td) => {
    enlarged.hidden = false;
    enlarged.querySelector("img").src = td.querySelector("img").src;
    enlarged.querySelector("p").textContent = `step ${td.dataset.step} · ${prompts[Number(td.dataset.column)] || ""}`;
  };
  enlarged.onclick = () => { enlarged.hidden = true; };
  body.addEventListener("keydown", (event) => {
    const td = event.target.closest("td[data-row]");
    if (!td) return;
    const row = Number(td.dataset.row), column = Number(td.dataset.column);
    const moves = { ArrowUp: [row - 1, column], ArrowDown: [row + 1, column], ArrowLeft: [row, column - 1], ArrowRight: [row, column + 1] };
    if (moves[event.key]) { event.preventDefault(); focus(...moves[event.key]); }
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); open(td); }
    if (event.key === "Escape") enlarged.hidden = true;
  });
  // samples: {steps, prompts} as the run's state gives them; the grid is rebuilt when either changed
  const update = (samples) => {
    const key = JSON.stringify(samples);
    if (key === shown) return;
    shown = key;
    prompts = samples.prompts;
    head.replaceChildren(el("th", { text: "step" }), ...prompts.map((prompt) => el("th", { title: prompt, text: prompt })));
    body.replaceChildren(...samples.steps.map((step, row) => el("tr", {}, el("th", { text: String(step) }),
      ...Array.from({ length: Math.max(prompts.length, 1) }, (_, column) => el("td",
        { tabindex: row === 0 && column === 0 ? 0 : -1, "data-row": row, "data-column": column, "data-step": step, ondblclick: (e) => open(e.currentTarget) },
        el("img", { src: cell(step, column), alt: `step ${step}, ${prompts[column] || "sample"}`, loading: "lazy" }))))));
  };
  update({ steps: (root.dataset.steps || "").split(",").filter(Boolean).map(Number), prompts });
  return { update };
}

// ------------------------------------------------------------------ compare

function comparePage() {
  const names = (document.body.dataset.runs || "").split(",").filter(Boolean);
  if (names.length < 2) return;
  const logScale = document.getElementById("log-scale");
  const data = {};
  const colours = ["c0", "c1", "c2", "c3"];
  const redraw = () => drawChart(document.getElementById("compare-chart"),
    names.filter((name) => data[name]).map((name, i) => ({ points: zip(data[name].loss_smoothed), cls: `run ${colours[i % 4]}` })),
    { log: logScale.checked });
  logScale.onchange = redraw;
  document.getElementById("legend").replaceChildren(...names.map((name, i) => el("li", { class: colours[i % 4], text: name })));
  Promise.all(names.map((name) => api(`/api/runs/${encodeURIComponent(name)}/metrics?points=900`).then((d) => { data[name] = d.series; })))
    .then(redraw);
  const prompt = document.getElementById("compare-prompt"), step = document.getElementById("compare-step");
  const showSamples = () => {
    for (const figure of document.querySelectorAll("#compare-samples figure")) {
      const img = figure.querySelector("img");
      if (step.value === "" || prompt.value === "") { img.removeAttribute("src"); continue; }
      img.src = `/api/runs/${encodeURIComponent(figure.dataset.run)}/samples/${step.value}/${prompt.value}.png`;
      img.onerror = () => { img.removeAttribute("src"); img.alt = `${figure.dataset.run}: no sample at step ${step.value}`; };
    }
  };
  prompt.onchange = step.onchange = showSamples;
  showSamples();
}

// ------------------------------------------------------------------ new run

function newPage() {
  const form = document.getElementById("new-run");
  const tomlBox = document.getElementById("toml");
  const values = () => {
    const out = {};
    for (const field of form.querySelectorAll("[name]")) {
      if (field.name === "__run") continue;
      out[field.name] = field.type === "checkbox" ? field.checked : field.value;
    }
    return out;
  };
  const showErrors = (errors) => {
    for (const box of form.querySelectorAll(".field .error")) box.textContent = "";
    document.getElementById("form-error").textContent = "";
    for (const [name, message] of Object.entries(errors || {})) {
      const box = form.querySelector(`.field[data-field="${name}"] .error`);
      (box || document.getElementById("form-error")).textContent = message;
    }
  };
  let timer = null;
  const check = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const answer = await api("/api/config/check", { method: "POST", json: { form: values() } });
      showErrors(answer.errors);
      if (answer.toml) tomlBox.value = answer.toml;
    }, 250);
  };
  form.addEventListener("input", check);
  form.addEventListener("change", check);
  check();
  form.onsubmit = async (event) => {
    event.preventDefault();
    const answer = await api("/api/runs", { method: "POST", json: { form: values(), run: document.getElementById("run-name").value || null } })
      .catch((e) => ({ errors: { "": e.message } }));
    if (answer.errors) return showErrors(answer.errors);
    toast(`queued ${answer.run}`);
    location.href = "/";
  };
  document.getElementById("queue-toml").onclick = async () => {
    const name = document.getElementById("run-name").value;
    const response = await fetch(`/api/runs${name ? `?run=${encodeURIComponent(name)}` : ""}`,
      { method: "POST", body: tomlBox.value, headers: { "Content-Type": "application/toml", ...(token ? { "X-Sdlora-Token": token } : {}) } });
    const answer = await response.json();
    if (!response.ok) {
      document.getElementById("toml-error").textContent = answer.error || Object.entries(answer.errors || {}).map(([k, v]) => (k ? `${k}: ${v}` : v)).join("\n");
      return;
    }
    location.href = "/";
  };
  for (const tab of document.querySelectorAll("[data-tab]")) {
    tab.onclick = () => {
      const toml = tab.dataset.tab === "toml";
      form.hidden = toml;
      document.getElementById("toml-view").hidden = !toml;
      for (const other of document.querySelectorAll("[data-tab]")) other.setAttribute("aria-pressed", String(other === tab));
    };
  }
}

// ------------------------------------------------------------------ dataset

function datasetPage() {
  const { root, folder } = document.body.dataset;
  for (const figure of document.querySelectorAll("figure.image")) {
    const button = figure.querySelector(".save-caption");
    const state = figure.querySelector(".caption-state");
    const text = figure.querySelector("textarea");
    text.oninput = () => { state.textContent = "edited"; };
    button.onclick = async () => {
      try {
        const answer = await api(`/api/dataset/caption?root=${root}&folder=${encodeURIComponent(folder)}`,
          { method: "PUT", json: { image: figure.dataset.image, text: text.value, version: figure.dataset.version } });
        figure.dataset.version = answer.version;
        state.textContent = "saved";
      } catch (e) {
        if (e.status === 409) {
          state.textContent = "";
          const keep = el("button", { type: "button", text: "Use mine over it", onclick: () => { figure.dataset.version = e.data.version; conflict.remove(); button.click(); } });
          const take = el("button", { type: "button", text: "Take the file's", onclick: () => { text.value = e.data.current; figure.dataset.version = e.data.version; conflict.remove(); } });
          const conflict = el("div", { class: "conflict" }, el("p", { text: e.message }), el("pre", { text: e.data.current }), keep, take);
          figure.querySelector("figcaption").append(conflict);
        } else toast(e.message, true);
      }
    };
  }
}

const PAGES = { runs: runsPage, run: runPage, compare: comparePage, new: newPage, dataset: datasetPage };
(PAGES[document.body.dataset.page] || (() => {}))();
