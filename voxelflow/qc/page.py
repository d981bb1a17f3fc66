"""The QC report's page (``STORE/qc/index.html``)."""

# The page: plain DOM built with textContent (paths and reasons come from archives and may hold
# anything, so nothing from the index is ever parsed as HTML); state in the URL hash, so a
# search or a page can be linked to.
PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>voxelflow QC</title>
<style>
  :root { --bg: #121416; --card: #1c1f23; --line: #2e3238; --text: #e4e6e8; --dim: #9aa0a6; --warn: #f0b429;
          --bad: #ff6b6b; --accent: #4ea1ff; }
  * { box-sizing: border-box; }
  body { margin: 0; background: var(--bg); color: var(--text); font: 14px/1.45 system-ui, -apple-system,
         "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
  header { position: sticky; top: 0; z-index: 2; background: #17191c; border-bottom: 1px solid var(--line);
           padding: 10px 20px; display: flex; flex-wrap: wrap; gap: 8px 24px; align-items: center; }
  h1 { font-size: 18px; margin: 0; font-weight: 600; }
  h2 { font-size: 16px; margin: 24px 0 10px; font-weight: 600; }
  .dim { color: var(--dim); }
  #search { flex: 1 1 320px; max-width: 520px; padding: 7px 10px; border-radius: 6px; border: 1px solid var(--line);
            background: #0d0f11; color: var(--text); font-size: 14px; }
  main { padding: 0 20px 40px; }
  .counts span { margin-right: 14px; }
  .legend { display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; }
  .swatch { display: inline-block; width: 14px; height: 4px; margin-right: 5px; vertical-align: middle;
            border-radius: 1px; }
  .pager { display: flex; align-items: center; gap: 8px; margin: 8px 0; }
  .pager button { background: #25292e; color: var(--text); border: 1px solid var(--line); border-radius: 5px;
                  padding: 4px 10px; cursor: pointer; }
  .pager button:disabled { opacity: .35; cursor: default; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px;
          margin: 10px 0; display: flex; flex-wrap: wrap; gap: 14px; }
  .views { display: flex; gap: 8px; flex-wrap: wrap; }
  figure { margin: 0; position: relative; width: 256px; }
  figure img { display: block; width: 100%; height: auto; background: #000; border-radius: 3px;
               image-rendering: auto; }
  figcaption { font-size: 12px; color: var(--dim); text-align: center; margin-top: 2px; }
  .edge { position: absolute; font: 600 11px/1 monospace; color: #ffd76a; text-shadow: 0 0 2px #000; }
  .edge.t { top: 3px; left: 50%; transform: translateX(-50%); }
  .edge.b { bottom: 21px; left: 50%; transform: translateX(-50%); }
  .edge.l { left: 4px; top: 46%; } .edge.r { right: 4px; top: 46%; }
  .facts { flex: 1 1 300px; min-width: 280px; }
  .facts h3 { margin: 0 0 6px; font: 600 14px/1.3 ui-monospace, monospace; word-break: break-all; }
  .facts table { border-collapse: collapse; font-size: 13px; }
  .facts td { padding: 1px 10px 1px 0; vertical-align: top; }
  .facts td:first-child { color: var(--dim); white-space: nowrap; }
  .warn { color: var(--warn); } .bad { color: var(--bad); }
  .note { color: var(--dim); font-style: italic; }
  table.files { border-collapse: collapse; width: 100%; font-size: 13px; }
  table.files th, table.files td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
                                   vertical-align: top; }
  table.files td.path { font-family: ui-monospace, monospace; word-break: break-all; }
  .status-failed { color: var(--bad); } .status-skipped { color: var(--warn); }
  a { color: var(--accent); }
  .empty { color: var(--dim); padding: 12px 0; }
</style>
</head>
<body>
<header>
  <h1>voxelflow QC</h1>
  <input id="search" type="search" placeholder="Search: volume id, modality, warning, label, model, file, reason"
         autocomplete="off" spellcheck="false">
  <div class="counts dim" id="counts"></div>
  <div class="legend" id="legend"></div>
</header>
<main>
  <h2>Volumes <span class="dim" id="volumes-count"></span></h2>
  <div class="pager" id="volumes-pager"></div>
  <div id="volumes"></div>
  <div class="pager" id="volumes-pager-bottom"></div>
  <h2>Files not converted <span class="dim" id="files-count"></span></h2>
  <div class="pager" id="files-pager"></div>
  <div id="files"></div>
</main>
<noscript><p>This report needs JavaScript (inline, nothing is fetched from outside).</p></noscript>
<script src="index.js"></script>
<script>
"use strict";
const D = window.QC_INDEX;
const PAGE = D.page_size;
const state = { q: "", vp: 1, fp: 1 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

// what the search box matches: every word typed must occur somewhere in an entry's text
for (const v of D.volumes) {
  v._text = [v.volume_id, v.modality, v.kind, v.orientation, v.split, ...(v.classes || []), ...(v.warnings || []),
             ...(v.notes || []), ...(v.labels || []).map(l => l.name),
             ...(v.predictions || []).flatMap(p => [p.model, p.prediction])].filter(Boolean).join(" ").toLowerCase();
}
for (const f of D.files) f._text = [f.source, f.path, f.status, f.reason].filter(Boolean).join(" ").toLowerCase();

function matches(items) {
  const words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
  return words.length ? items.filter(it => words.every(w => it._text.includes(w))) : items;
}

function pager(box, page, pages, key) {
  box.replaceChildren();
  const go = (p) => { state[key] = p; render(true); };
  const b = (label, cls, p, off) => { const x = el("button", { class: cls, type: "button", text: label });
    x.disabled = off; x.addEventListener("click", () => go(p)); return x; };
  box.append(b("« first", "first", 1, page <= 1), b("‹ prev", "prev", page - 1, page <= 1),
             el("span", { class: "page dim", text: `page ${page} of ${pages}` }),
             b("next ›", "next", page + 1, page >= pages), b("last »", "last", pages, page >= pages));
}

function fact(table, name, value, cls) {
  if (value == null || value === "" || (Array.isArray(value) && !value.length)) return;
  table.append(el("tr", {}, el("td", { text: name }), el("td", { class: cls || "", text: String(value) })));
}

function card(v) {
  const views = el("div", { class: "views" });
  for (const [view, edges] of Object.entries(D.views)) {
    const src = v.images && v.images[view];
    if (!src) continue;
    const fig = el("figure", {}, el("img", { src, alt: `${view} ${v.volume_id}`, width: D.size, height: D.size,
                                             loading: "lazy", class: "view" }));
    ["t", "b", "l", "r"].forEach((side, i) => fig.append(el("span", { class: "edge " + side, text: edges[i] })));
    fig.append(el("figcaption", { text: view }));
    views.append(fig);
  }
  const t = el("table");
  fact(t, "modality", v.modality || "—");
  fact(t, "kind", v.kind);
  fact(t, "shape", (v.shape || []).join(" × ") + "  (" + ((v.shape || []).length === 4 ? "t, " : "") + "z, y, x)");
  fact(t, "spacing", (v.spacing || []).map(s => +s.toFixed(3)).join(" × ") + " mm (x, y, z)");
  fact(t, "orientation", v.orientation);
  fact(t, "dtype", v.dtype);
  fact(t, "source files", v.n_files);
  fact(t, "class", (v.classes || []).join(", "));
  fact(t, "split", v.split);
  for (const l of v.labels || []) {
    const td = el("td");
    td.append(el("span", { text: l.name + " " }));
    for (const value of l.values) {
      td.append(el("span", { class: "swatch", style: `background:${D.legend.labels[String(value)] || "#888"}` }),
                el("span", { text: String(value) + " " }));
    }
    t.append(el("tr", {}, el("td", { text: "label" }), td));
  }
  for (const p of v.predictions || []) {
    const td = el("td");
    if (p.label_name) td.append(el("span", { class: "swatch", style: `background:${D.legend.models[p.model]}` }));
    // a segmentation's prediction is its outline; a classifier's is a class
    td.append(el("span", { text: `${p.model} ${p.version || ""}` + (p.label_name ? "" : `: ${p.prediction ?? "—"}`) }));
    if (p.qc_image) td.append(" ", el("a", { href: p.qc_image, target: "_blank", text: "Grad-CAM" }));
    t.append(el("tr", {}, el("td", { text: "prediction" }), td));
  }
  for (const w of v.warnings || []) fact(t, "warning", w, "warn");
  for (const n of v.notes || []) fact(t, "note", n, n.startsWith("cannot") ? "bad" : "note");
  const facts = el("div", { class: "facts" }, el("h3", { text: v.volume_id }), t);
  return el("div", { class: "card", "data-volume": v.volume_id }, views, facts);
}

function fileRows(files) {
  const table = el("table", { class: "files" });
  table.append(el("tr", {}, el("th", { text: "status" }), el("th", { text: "file" }), el("th", { text: "reason" }),
                  el("th", { text: "source" })));
  for (const f of files) {
    table.append(el("tr", { class: "file" }, el("td", { class: "status-" + f.status, text: f.status }),
                    el("td", { class: "path", text: f.path }), el("td", { text: f.reason || "" }),
                    el("td", { class: "path dim", text: f.source })));
  }
  return table;
}

function render(scroll) {
  const vols = matches(D.volumes), files = matches(D.files);
  const vpages = Math.max(1, Math.ceil(vols.length / PAGE)), fpages = Math.max(1, Math.ceil(files.length / PAGE));
  state.vp = Math.min(Math.max(1, state.vp), vpages); state.fp = Math.min(Math.max(1, state.fp), fpages);
  const shown = vols.slice((state.vp - 1) * PAGE, state.vp * PAGE);
  $("volumes").replaceChildren(...(shown.length ? shown.map(card) : [el("div", { class: "empty", text: "no volume matches" })]));
  $("volumes-count").textContent = state.q ? `${vols.length} of ${D.volumes.length} match` : `${vols.length}`;
  pager($("volumes-pager"), state.vp, vpages, "vp");
  pager($("volumes-pager-bottom"), state.vp, vpages, "vp");
  const fshown = files.slice((state.fp - 1) * PAGE, state.fp * PAGE);
  $("files").replaceChildren(fshown.length ? fileRows(fshown) : el("div", { class: "empty", text: "none" }));
  $("files-count").textContent = state.q ? `${files.length} of ${D.files.length} match` : `${files.length}`;
  pager($("files-pager"), state.fp, fpages, "fp");
  const hash = new URLSearchParams({ q: state.q, vp: state.vp, fp: state.fp }).toString();
  if (location.hash.slice(1) !== hash) history.replaceState(null, "", "#" + hash);
  if (scroll === true) window.scrollTo(0, 0);
}

const c = D.counts.files;
$("counts").append(...[`${D.counts.volumes} volumes`, `${c.converted || 0} files converted`,
                       `${c.skipped || 0} skipped`, `${c.failed || 0} failed`, `generated ${D.generated_at}`]
                   .map(t => el("span", { text: t })));
const legend = $("legend");
for (const [value, colour] of Object.entries(D.legend.labels))
  legend.append(el("span", {}, el("span", { class: "swatch", style: `background:${colour}` }), `label ${value}`));
for (const [model, colour] of Object.entries(D.legend.models))
  legend.append(el("span", {}, el("span", { class: "swatch", style: `background:${colour}` }), `model ${model}`));

const initial = new URLSearchParams(location.hash.slice(1));
state.q = initial.get("q") || ""; state.vp = +initial.get("vp") || 1; state.fp = +initial.get("fp") || 1;
$("search").value = state.q;
let timer = null;
$("search").addEventListener("input", (e) => {
  clearTimeout(timer);
  timer = setTimeout(() => { state.q = e.target.value; state.vp = 1; state.fp = 1; render(); }, 120);
});
render();
</script>
</body>
</html>
"""
