// The dot-annotation page: one image (a 2D image or a 3D stack) served by `cellcount annotate`.
// The server owns the dots: every edit is a request, and the page draws what the answer says.
"use strict";

const $ = (id) => document.getElementById(id);
const canvas = $("view");
const ctx = canvas.getContext("2d");
const S = {
  info: null, z: 0, zoom: 1, oy: 0, ox: 0,        // view: top-left image pixel, screen px per pixel
  points: [], progress: null, proposals: [],      // proposals: {c: coords, src: "detector" | "model"}
  image: null, imageBox: null, request: 0, drag: null,
  mip: false, mouse: null, proposing: false, proposal: 0,  // proposal: id of the latest request
  timings: { edit: [], slice: [], view: [] },      // ms from the action to the answer drawn
};
const SOURCE_STYLE = { detector: "#ffd400", model: "#ff4df0" };
// The token the page was opened with (?token=...): read once, kept for every request (the
// server also set it as a cookie), and taken out of the address bar.
const TOKEN = new URLSearchParams(location.search).get("token");
if (TOKEN) history.replaceState(null, "", location.pathname);
const withToken = (url) => TOKEN ? `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}` : url;
const DOT = 5, HIT = 7;

async function api(method, url, body) {
  const opts = { method, headers: TOKEN ? { Authorization: `token ${TOKEN}` } : {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(url, opts);
  const data = await r.json();
  if (!r.ok) {
    status(data.error || r.statusText, true);
    throw new Error(data.error);
  }
  return data;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

function update(data) {  // an answer that carries the dots and the progress
  if (data.points) S.points = data.points;
  if (data.progress) S.progress = data.progress;
  const p = S.progress;
  if (p) {
    const t = Math.round(p.seconds);
    $("progress").textContent = `${p.dots} dots, ${p.reviewed.length}/${p.regions} regions ` +
      `reviewed, ${Math.floor(t / 60)}:${String(t % 60).padStart(2, "0")} spent`;
  }
  draw();
}

const is3d = () => S.info.ndim === 3;
const H = () => S.info.shape[S.info.ndim - 2];
const W = () => S.info.shape[S.info.ndim - 1];

function resize() {
  canvas.width = $("stage").clientWidth;
  canvas.height = $("stage").clientHeight;
}

function fit() {
  S.zoom = Math.min(canvas.width / W(), canvas.height / H());
  S.oy = (H() - canvas.height / S.zoom) / 2;
  S.ox = (W() - canvas.width / S.zoom) / 2;
  load();
}

function toImage(ev) {  // screen event -> [y, x] in image pixels
  const r = canvas.getBoundingClientRect();
  return [S.oy + (ev.clientY - r.top) / S.zoom - 0.5, S.ox + (ev.clientX - r.left) / S.zoom - 0.5];
}

function toScreen(y, x) {
  return [(y + 0.5 - S.oy) * S.zoom, (x + 0.5 - S.ox) * S.zoom];
}

// Only the visible region of the current slice is requested, at about screen resolution.
// kind: the timing it counts for ("slice": a change of slice, "view": of zoom or position).
function load(kind = "view") {
  if (!S.info) return;
  const t0 = performance.now();
  const step = Math.max(1, Math.floor(1 / S.zoom));
  const y0 = Math.max(0, Math.floor(S.oy)), x0 = Math.max(0, Math.floor(S.ox));
  const y1 = Math.min(H(), Math.ceil(S.oy + canvas.height / S.zoom));
  const x1 = Math.min(W(), Math.ceil(S.ox + canvas.width / S.zoom));
  if (y1 <= y0 || x1 <= x0) { S.image = null; draw(); return; }
  const id = ++S.request;
  const url = `/api/view?y0=${y0}&y1=${y1}&x0=${x0}&x1=${x1}&step=${step}` +
    (S.mip ? "&mip=1" : is3d() ? `&z=${S.z}` : "") + `&n=${id}`;  // n: never a cached answer
  const img = new Image();
  img.onload = () => {
    if (id !== S.request) return;  // a newer view was asked for meanwhile
    S.image = img;
    S.imageBox = [y0, x0, img.height * step, img.width * step];
    draw();
    S.timings[kind].push(performance.now() - t0);
  };
  img.onerror = () => status("could not load the view", true);
  img.src = withToken(url);
}

function near() { return Math.max(0, parseInt($("near").value, 10) || 0); }

function draw() {
  if (!S.info) return;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = S.zoom < 1;
  if (S.image) {
    const [y0, x0, h, w] = S.imageBox;
    ctx.filter = `brightness(${$("brightness").value}) contrast(${$("contrast").value})`;
    ctx.drawImage(S.image, (x0 - S.ox) * S.zoom, (y0 - S.oy) * S.zoom, w * S.zoom, h * S.zoom);
    ctx.filter = "none";
  }
  if ($("grid").checked && S.progress) drawGrid();
  const k = near();
  for (const p of S.points) {
    const c = p.coords, dz = is3d() && !S.mip ? Math.round(c[0]) - S.z : 0;
    if (Math.abs(dz) > k) continue;
    const [sy, sx] = toScreen(c[c.length - 2], c[c.length - 1]);
    ctx.beginPath();
    ctx.arc(sx, sy, S.mip ? DOT - 2 : DOT, 0, 2 * Math.PI);
    if (dz === 0) {
      ctx.fillStyle = "#ff3b3b";
      ctx.fill();
      ctx.strokeStyle = "#fff";
      ctx.stroke();
    } else {  // on a nearby slice: hollow, fading with the distance
      ctx.strokeStyle = `rgba(80, 200, 255, ${1 - Math.abs(dz) / (k + 1)})`;
      ctx.setLineDash(dz < 0 ? [3, 2] : []);
      ctx.stroke();
      ctx.setLineDash([]);
    }
  }
  for (const p of shownProposals()) {  // the detector's: +, the model's: x
    const c = p.c, [sy, sx] = toScreen(c[c.length - 2], c[c.length - 1]);
    const r = p.src === "model" ? DOT * 0.8 : DOT;
    ctx.strokeStyle = SOURCE_STYLE[p.src];
    ctx.beginPath();
    if (p.src === "model") {
      ctx.moveTo(sx - r, sy - r); ctx.lineTo(sx + r, sy + r);
      ctx.moveTo(sx - r, sy + r); ctx.lineTo(sx + r, sy - r);
    } else {
      ctx.moveTo(sx - r, sy); ctx.lineTo(sx + r, sy);
      ctx.moveTo(sx, sy - r); ctx.lineTo(sx, sy + r);
    }
    ctx.stroke();
  }
}

const onSlice = (c) => S.mip || !is3d() || Math.round(c[0]) === S.z;

function shownProposals() {  // on this slice (all, in the projection) and inside the view
  const [lo, hi] = visibleBox(), n = lo.length;
  return S.proposals.filter(({ c }) => onSlice(c) &&
    c[n - 2] >= lo[n - 2] && c[n - 2] < hi[n - 2] && c[n - 1] >= lo[n - 1] && c[n - 1] < hi[n - 1]);
}

function cellOf(c) {  // the grid region of a point ([z,] y, x)
  const g = S.progress.grid, n = c.length;
  const cell = [];
  for (let a = 0; a < n; a++) {
    const pixel = Math.max(0, Math.min(S.info.shape[a] - 1, Math.floor(c[a] + 0.5)));
    cell.push(Math.floor(pixel * g[a] / S.info.shape[a]));  // as the server's region_of
  }
  return cell;
}

const gridCell = (y, x) => cellOf(at(y, x));

function pointer() {  // [y, x] of the image under the mouse, else of the view's centre
  if (S.mouse) return toImage(S.mouse);
  return [S.oy + canvas.height / S.zoom / 2, S.ox + canvas.width / S.zoom / 2];
}

function drawGrid() {
  const g = S.progress.grid, n = g.length, gy = g[n - 2], gx = g[n - 1];
  const done = new Set(S.progress.reviewed.map((r) => r.join(",")));
  for (let i = 0; i < gy; i++) {
    for (let j = 0; j < gx; j++) {
      const cell = is3d() ? [gridCell(0, 0)[0], i, j] : [i, j];
      const [y0, x0] = toScreen(i * H() / gy - 0.5, j * W() / gx - 0.5);
      const [y1, x1] = toScreen((i + 1) * H() / gy - 0.5, (j + 1) * W() / gx - 0.5);
      if (done.has(cell.join(","))) {
        ctx.fillStyle = "rgba(60, 220, 90, 0.12)";
        ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
      }
      ctx.strokeStyle = "rgba(255, 255, 255, 0.25)";
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
  }
}

function hit(list, y, x, coordsOf) {  // the nearest item on this slice within HIT screen px
  let best = null, bestD = HIT / S.zoom;
  for (const item of list) {
    const c = coordsOf(item);
    if (!onSlice(c)) continue;
    const d = Math.hypot(c[c.length - 2] - y, c[c.length - 1] - x);
    if (d <= bestD) { best = item; bestD = d; }
  }
  return best;
}

const at = (y, x) => (is3d() ? [S.z, y, x] : [y, x]);

async function edit(request, what) {  // request: () => the API call's promise
  const t0 = performance.now();
  status("saving");
  try {
    update(await request());
    const ms = performance.now() - t0;
    S.timings.edit.push(ms);
    status(`saved: ${what} (${Math.round(ms)} ms)`);
  } catch (e) {  // the status shows the server's message; draw what the server holds
    update(await api("GET", "/api/points"));
  }
}

canvas.addEventListener("contextmenu", (ev) => ev.preventDefault());
canvas.addEventListener("mousemove", (ev) => { S.mouse = { clientY: ev.clientY, clientX: ev.clientX }; });
canvas.addEventListener("mouseleave", () => { S.mouse = null; });
canvas.addEventListener("mousedown", (ev) => {
  const [y, x] = toImage(ev);
  if (ev.button === 1 || ev.shiftKey) {
    S.drag = { pan: true, sy: ev.clientY, sx: ev.clientX, oy: S.oy, ox: S.ox };
    return;
  }
  if (ev.button !== 0) return;
  const dot = hit(S.points, y, x, (p) => p.coords);
  S.drag = { dot, sy: ev.clientY, sx: ev.clientX, moved: false };
});
window.addEventListener("mousemove", (ev) => {
  const d = S.drag;
  if (!d) return;
  if (d.pan) {
    S.oy = d.oy - (ev.clientY - d.sy) / S.zoom;
    S.ox = d.ox - (ev.clientX - d.sx) / S.zoom;
    draw();
    return;
  }
  if (Math.hypot(ev.clientY - d.sy, ev.clientX - d.sx) > 3) d.moved = true;
  if (d.dot && d.moved && !S.mip) {
    const [y, x] = toImage(ev);
    const c = d.dot.coords;
    c[c.length - 2] = y; c[c.length - 1] = x;
    draw();
  }
});
window.addEventListener("mouseup", (ev) => {
  const d = S.drag;
  S.drag = null;
  if (!d || ev.target !== canvas && !d.pan) return;
  if (d.pan) { load(); return; }
  const [y, x] = toImage(ev);
  if (S.mip) {  // the projection only shows: a click on a dot goes to its slice
    if (d.dot && !d.moved) { setMip(false); setZ(Math.round(d.dot.coords[0])); }
    else if (!d.moved) status("projection: click a dot to go to its slice, M to leave");
    return;
  }
  if (d.dot && d.moved) {
    edit(() => api("PUT", `/api/points/${d.dot.id}`, { coords: d.dot.coords }), "moved a dot");
  } else if (d.dot) {
    edit(() => api("DELETE", `/api/points/${d.dot.id}`), "deleted a dot");
  } else if (!d.moved) {
    const prop = hit(S.proposals, y, x, (p) => p.c);
    if (prop) {
      S.proposals = S.proposals.filter((p) => p !== prop);
      edit(() => api("POST", "/api/accept", { points: [prop.c] }), "accepted a proposal");
    } else if (y >= -0.5 && x >= -0.5 && y < H() - 0.5 && x < W() - 0.5) {
      edit(() => api("POST", "/api/points", { coords: at(y, x) }), "added a dot");
    }
  }
});

function zoomAt(factor, sy, sx) {
  const y = S.oy + sy / S.zoom, x = S.ox + sx / S.zoom;
  S.zoom = Math.min(64, Math.max(1 / 256, S.zoom * factor));
  S.oy = y - sy / S.zoom;
  S.ox = x - sx / S.zoom;
  load();
}

function setZ(z) {
  if (!is3d()) return;
  S.z = Math.max(0, Math.min(S.info.shape[0] - 1, z));
  if (S.mip) { S.mip = false; $("mip").checked = false; }  // a slice is not the projection
  $("z").value = S.z;
  $("zval").textContent = `${S.z + 1} / ${S.info.shape[0]}`;
  load("slice");
}

function setMip(on) {
  if (!is3d()) return;
  S.mip = on;
  $("mip").checked = on;
  status(on ? "projection over z, every dot" : "ready");
  load();
}

canvas.addEventListener("wheel", (ev) => {
  ev.preventDefault();
  const r = canvas.getBoundingClientRect();
  if (ev.ctrlKey || !is3d() || S.mip) zoomAt(ev.deltaY < 0 ? 1.25 : 0.8, ev.clientY - r.top, ev.clientX - r.left);
  else setZ(S.z + (ev.deltaY > 0 ? 1 : -1));
}, { passive: false });

function visibleBox() {
  const y0 = Math.max(0, Math.floor(S.oy)), x0 = Math.max(0, Math.floor(S.ox));
  const y1 = Math.min(H(), Math.ceil(S.oy + canvas.height / S.zoom));
  const x1 = Math.min(W(), Math.ceil(S.ox + canvas.width / S.zoom));
  if (!is3d()) return [[y0, x0], [y1, x1]];
  const k = Math.max(near(), 3);  // a few slices either side, so 3D components have depth
  return [[Math.max(0, S.z - k), y0, x0], [Math.min(S.info.shape[0], S.z + k + 1), y1, x1]];
}

async function propose() {  // in the visible box; again whenever a setting changes
  const t = $("threshold").value.trim(), source = $("source").value;
  const id = ++S.proposal;
  S.proposing = true;
  status(source !== "detector" && !S.info.model_ready ? "proposing (the model is starting)" : "proposing");
  try {
    const r = await api("POST", "/api/propose", {
      box: visibleBox(), source, sigma: parseFloat($("sigma").value) || 0,
      threshold: t === "" ? null : parseFloat(t), min_size: parseInt($("min_size").value, 10) || 1,
      opening: parseInt($("opening").value, 10) || 0, bright: $("bright").checked,
    });
    if (id !== S.proposal) return;  // cleared, accepted or asked again meanwhile
    S.info.model_ready = S.info.model_ready || source !== "detector";
    S.proposals = [];
    for (const src of ["detector", "model"]) {
      for (const c of r.points[src] || []) S.proposals.push({ c, src });
    }
    const counts = Object.entries(r.points).map(([k, v]) => `${v.length} from the ${k}`);
    status(`proposals: ${counts.join(", ")}`);
    draw();
  } catch (e) {  // shown in the status; no re-runs of a failing request
    if (id === S.proposal) S.proposing = false;
  }
}

let rerun = null;
function proposeSoon() {  // a setting changed: propose again once typing pauses
  if (!S.proposing) return;
  clearTimeout(rerun);
  rerun = setTimeout(propose, 250);
}

function acceptSome(chosen, what) {
  if (!chosen.length) { status(`no proposals ${what}`); return; }
  S.proposal++;  // an answer still on its way would bring them back
  S.proposals = S.proposals.filter((p) => !chosen.includes(p));
  edit(() => api("POST", "/api/accept", { points: chosen.map((p) => p.c) }),
       `accepted ${chosen.length} proposals ${what}`);
}

function acceptRegion() {  // every proposal (any slice) in the grid region under the mouse
  const cell = gridCell(...pointer()).join(",");
  acceptSome(S.proposals.filter((p) => cellOf(p.c).join(",") === cell), `in region ${cell}`);
}

function clearProposals() {
  S.proposal++;
  S.proposals = [];
  S.proposing = false;
  draw();
}

function review() {  // the region under the mouse: reviewed, or reopened
  const cell = gridCell(...pointer());
  const done = !S.progress.reviewed.some((r) => r.join(",") === cell.join(","));
  edit(() => api("POST", "/api/review", { region: cell, done }), done ? "region reviewed" : "region reopened");
}

window.addEventListener("keydown", (ev) => {
  const tag = ev.target.tagName;
  if (tag === "SELECT" || tag === "INPUT" && ev.target.type !== "range" && ev.target.type !== "checkbox") return;
  const k = ev.key, ctrl = ev.ctrlKey || ev.metaKey;
  const pan = 60 / S.zoom;
  if (ctrl && (k === "z" || k === "Z")) {
    edit(() => api("POST", ev.shiftKey ? "/api/redo" : "/api/undo"), ev.shiftKey ? "redo" : "undo");
  } else if (ctrl && (k === "y" || k === "Y")) edit(() => api("POST", "/api/redo"), "redo");
  else if (ctrl) return;
  else if (k === "PageDown" || k === ".") setZ(S.z + 1);
  else if (k === "PageUp" || k === ",") setZ(S.z - 1);
  else if (k === "+" || k === "=") zoomAt(1.25, canvas.height / 2, canvas.width / 2);
  else if (k === "-") zoomAt(0.8, canvas.height / 2, canvas.width / 2);
  else if (k === "0") fit();
  else if (k === "ArrowUp") { S.oy -= pan; load(); }
  else if (k === "ArrowDown") { S.oy += pan; load(); }
  else if (k === "ArrowLeft") { S.ox -= pan; load(); }
  else if (k === "ArrowRight") { S.ox += pan; load(); }
  else if (k === "p" || k === "P") propose();
  else if ((k === "a" || k === "A") && !ev.shiftKey) acceptSome(shownProposals(), "in view");
  else if (k === "a" || k === "A") acceptSome(S.proposals, "(all)");
  else if (k === "q" || k === "Q") acceptRegion();
  else if (k === "c" || k === "C") clearProposals();
  else if (k === "m" || k === "M") setMip(!S.mip);
  else if (k === "r" || k === "R") review();
  else if (k === "g" || k === "G") { $("grid").checked = !$("grid").checked; draw(); }
  else return;
  ev.preventDefault();
});

$("z").addEventListener("input", () => setZ(parseInt($("z").value, 10)));
for (const id of ["near", "brightness", "contrast", "grid"]) $(id).addEventListener("input", draw);
for (const id of ["sigma", "threshold", "min_size", "opening", "bright", "source"]) {
  $(id).addEventListener("input", proposeSoon);
}
$("mip").addEventListener("change", () => setMip($("mip").checked));
$("propose").onclick = propose;
$("accept").onclick = () => acceptSome(shownProposals(), "in view");
$("acceptregion").onclick = acceptRegion;
$("acceptall").onclick = () => acceptSome(S.proposals, "(all)");
$("clear").onclick = clearProposals;
$("undo").onclick = () => edit(() => api("POST", "/api/undo"), "undo");
$("redo").onclick = () => edit(() => api("POST", "/api/redo"), "redo");
$("review").onclick = review;
window.addEventListener("resize", () => { resize(); load(); });

(async () => {
  S.info = await api("GET", "/api/info");
  $("name").textContent = `${S.info.name} (${S.info.shape.join(" x ")}) -> ${S.info.points_file}`;
  $("zbox").style.display = is3d() ? "" : "none";
  $("sourcebox").style.display = S.info.model ? "" : "none";
  if (S.info.model) $("source").value = "model";
  if (is3d()) { $("z").max = S.info.shape[0] - 1; S.z = Math.floor(S.info.shape[0] / 2); setZ(S.z); }
  resize();
  update(await api("GET", "/api/points"));
  fit();
  status("ready");
})();
