// The gallery: a brief form, live progress, the variants with their scores and attributes, picks,
// queue control (pause, resume, clear), browsing variants with filters and sort, search.
// Everything goes through the same /api as any client. Signing in posts the token to /api/session,
// which keeps it in an HttpOnly, SameSite=Strict cookie set by the server: this script never stores it.
"use strict";

const $ = (selector) => document.querySelector(selector);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 500;
const AFTER_FINISH_MS = 20000; // scores and attributes arrive from the score and enrich stages after generation
let watching = null; // the brief id on screen

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  for (const child of children) node.append(child); // strings become text nodes: no HTML injection
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) { showLogin("Your token was not accepted."); throw new Error("unauthorized"); }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  return { ok: response.ok, status: response.status, body };
}

// -- sign in ------------------------------------------------------------------------------
async function signIn(token) {
  const response = await fetch("/api/session", {
    method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
    body: JSON.stringify({ token }),
  });
  return response.ok;
}

async function signOut() {
  await fetch("/api/session", { method: "DELETE", credentials: "same-origin" });
}

function showLogin(message = "") {
  $("#login").hidden = false; $("#app").hidden = true; $("#sign-out").hidden = true;
  $("#who").textContent = ""; $("#login-error").textContent = message;
}

let signIns = 0; // only the latest sign-in's answer counts (the page load's may come back after a later one)

async function start() {
  const attempt = ++signIns;
  const response = await fetch("/api/me", { credentials: "same-origin" });
  if (attempt !== signIns) return;
  if (!response.ok) return showLogin();
  const me = await response.json();
  $("#login").hidden = true; $("#app").hidden = false; $("#sign-out").hidden = false;
  showDesigner(me);
  await Promise.all([listBriefs(), showQueue()]);
}

function showDesigner(me) {
  $("#who").textContent = `${me.designer} · ${me.queued}/${me.max_queued} queued`;
}

async function refreshDesigner() {
  showDesigner((await api("/api/me")).body);
  await Promise.all([listBriefs(), showQueue()]);
}

// -- my queue: pause, resume, clear --------------------------------------------------------
function showQueueState(state) {
  const mine = state.paused_designers.length > 0;
  $("#queue-state").textContent = `${state.queued} queued · ${state.paused} paused`
    + (mine ? " · my queue is paused" : "") + (state.paused_all ? " · the whole queue is paused" : "");
  $("#queue-state").dataset.paused = String(mine);
  $("#queue-pause").hidden = mine; $("#queue-resume").hidden = !mine;
}

async function showQueue() {
  showQueueState((await api("/api/queue")).body);
}

async function queueAction(action) {
  const { ok, body } = await api(`/api/queue/${action}`, action === "clear" ? { method: "POST" } : {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ scope: "mine" }),
  });
  $("#queue-error").textContent = ok ? "" : String(body?.detail ?? `${action} failed`);
  if (ok) { showQueueState(body.queue); await refreshDesigner(); }
}
for (const action of ["pause", "resume", "clear"]) $(`#queue-${action}`).addEventListener("click", () => queueAction(action));

$("#login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const accepted = await signIn($("#token").value.trim());
  $("#token").value = "";
  if (accepted) await start();
  if (!accepted || !$("#login").hidden) { ++signIns; showLogin("Your token was not accepted."); }
});
$("#sign-out").addEventListener("click", async () => { ++signIns; await signOut(); showLogin(); });

// -- briefs -------------------------------------------------------------------------------
function briefFromForm(form) {
  const data = new FormData(form);
  const brief = {};
  for (const [key, raw] of data.entries()) {
    const value = String(raw).trim();
    if (!value) continue;
    if (key === "groups") brief.groups = value.split(",").map((g) => g.trim()).filter(Boolean);
    else if (key === "front") brief.priority = "high";
    else if (["variants", "seed", "steps"].includes(key)) brief[key] = Number(value);
    else brief[key] = value;
  }
  return brief;
}

function showFieldErrors(detail) {
  const list = $("#brief-errors");
  list.replaceChildren();
  document.querySelectorAll("#brief-form .invalid").forEach((input) => input.classList.remove("invalid"));
  const errors = Array.isArray(detail) ? detail : [{ loc: [], msg: String(detail) }];
  for (const error of errors) {
    const field = error.loc.filter((part) => part !== "body").join(".");
    list.append(el("li", { "data-field": field }, `${field || "brief"}: ${error.msg}`));
    $(`#brief-form [name="${field.split(".")[0]}"]`)?.classList.add("invalid");
  }
}

$("#brief-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const { ok, body } = await api("/api/briefs", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify(briefFromForm(event.target)),
  });
  if (!ok) return showFieldErrors(body?.detail ?? "the brief was refused");
  showFieldErrors([]);
  watch(body.id, body);
  refreshDesigner();
});

async function listBriefs() {
  const { body } = await api("/api/briefs");
  $("#briefs").replaceChildren(...body.map((brief) => {
    const item = el("li", { "data-brief-id": brief.id }, `${brief.title} `,
      el("span", { class: `status ${brief.status}` }, brief.status));
    item.addEventListener("click", () => watch(brief.id));
    return item;
  }));
}

function showProgress(brief) {
  $("#brief-title").textContent = brief.title;
  const status = $("#brief-status");
  status.textContent = brief.status; status.className = `status ${brief.status}`;
  const p = brief.progress || {};
  const total = (p.variants_total || brief.brief.variants) * (p.steps || 1);
  const done = (p.variants_done || 0) * (p.steps || 1) + (p.step && p.step < p.steps ? p.step : 0);
  $("#progress").max = total || 1;
  $("#progress").value = brief.status === "succeeded" ? total : done;
  $("#progress-text").textContent = p.variants_total
    ? `variants ${p.variants_done}/${p.variants_total} · step ${p.step}/${p.steps} · batch ${p.batch}/${p.batches}` : "";
  $("#cancel").hidden = TERMINAL.has(brief.status);
  $("#brief-error").textContent = brief.error || "";
}

function modelLabel(modelId) {
  const tuned = modelId.split("+lora:")[1];
  return tuned ? `tuned ${tuned}` : "base";
}

function scoresTable(scores) {
  return el("table", { class: "scores" }, ...scores.map((s) => el("tr", { "data-group": s.group_id },
    el("td", {}, `group ${s.group_id}${s.population_fallback ? " (population)" : ""}`),
    el("td", {}, s.score.toFixed(3)))));
}

function bestOfLine(pick) {
  // a best-of-N item: its rank among the candidates and the others' reward scores
  const others = pick.scores.map((score, c) => ({ score, c })).filter(({ c }) => c !== pick.kept);
  return el("div", { class: "best-of", "data-rank": String(pick.rank) },
    `best of ${pick.n} · rank ${pick.rank} (${pick.scores[pick.kept].toFixed(3)}) · others `,
    ...others.map(({ score, c }) => el("span", { class: "candidate", "data-candidate": String(c) }, score.toFixed(3))));
}

function variantCard(item) {
  const images = el("div", { class: "images" },
    el("figure", {}, el("img", { src: item.image_url, alt: `variant ${item.variant}` }), modelLabel(item.model_id)));
  for (const other of item.counterparts ?? []) {
    images.append(el("figure", { class: "counterpart" },
      el("img", { src: other.image_url, alt: `${modelLabel(other.model_id)} counterpart` }), modelLabel(other.model_id)));
  }
  const card = el("figure", { class: "variant", "data-item-id": item.id }, images,
    el("figcaption", {}, `#${item.variant} · seed ${item.seed}` + (item.brief_title ? ` · ${item.brief_title}` : "")));
  if (item.scores.length) card.append(scoresTable(item.scores), explanationBlock(item)); // audit.js
  if (item.best_of) card.append(bestOfLine(item.best_of));
  card.append(pickControls(item, card));
  showPicks(card, item.picks ?? []);
  const understood = item.understanding;
  if (understood) {
    const chips = el("div", { class: "chips" });
    for (const [name, value] of [...Object.entries(understood.categories), ...Object.entries(understood.attributes)]) {
      if (value.label && !value.abstained) chips.append(el("span", { title: `${name} ${value.confidence.toFixed(2)}` }, value.label));
    }
    card.append(el("div", { class: "title" }, understood.title), chips);
    if (understood.near_duplicate_of) {
      card.append(el("div", { class: "duplicate" },
        `near-duplicate of ${understood.near_duplicate_of.slice(0, 8)} (${understood.near_duplicate_similarity.toFixed(3)})`));
    }
  }
  return card;
}

// -- picks: a designer's choices become preference data ------------------------------------
function showPicks(card, picks) {
  card.dataset.picks = picks.map((p) => `${p.group_id}:${p.choice}`).join(",");
  card.querySelector(".marks").textContent = picks.map((p) => `${p.group_id} ${p.choice}`).join(" · ");
}

function pickControls(item, card) {
  const group = el("input", { class: "pick-group", placeholder: "group (all targets)", "aria-label": "for group" });
  const controls = el("div", { class: "pick" }, group);
  for (const [choice, label] of [["picked", "Pick"], ["rejected", "Reject"], [null, "Unmark"]]) {
    const button = el("button", { "data-choice": String(choice) }, label);
    button.addEventListener("click", async () => {
      const { ok, body } = await api(`/api/items/${item.id}/pick`, {
        method: "PUT", headers: { "content-type": "application/json" },
        body: JSON.stringify({ choice, group: group.value.trim() || null }),
      });
      controls.querySelector(".error").textContent = ok ? ""
        : (Array.isArray(body?.detail) ? body.detail.map((e) => `${e.loc.at(-1)}: ${e.msg}`).join("; ") : String(body?.detail));
      if (ok) showPicks(card, body);
    });
    controls.append(button);
  }
  controls.append(el("span", { class: "marks" }), el("span", { class: "error" }));
  return controls;
}

async function showItems(briefId) {
  const { body } = await api(`/api/briefs/${briefId}/items`);
  if (watching === briefId) $("#variants").replaceChildren(...body.map(variantCard));
}

async function watch(briefId, brief = null) {
  watching = briefId;
  $("#brief-view").hidden = false;
  $("#brief-view").dataset.briefId = briefId;
  $("#variants").replaceChildren();
  if (brief) showProgress(brief);
  let finishedAt = null;
  while (watching === briefId) {
    const { ok, body } = await api(`/api/briefs/${briefId}`);
    if (!ok) { $("#brief-error").textContent = body?.detail ?? "unknown brief"; return; }
    showProgress(body);
    await showItems(briefId);
    if (TERMINAL.has(body.status)) {
      if (finishedAt === null) { finishedAt = Date.now(); refreshDesigner(); }
      else if (Date.now() - finishedAt > AFTER_FINISH_MS) break;
    }
    await new Promise((resolve) => setTimeout(resolve, TERMINAL.has(body.status) ? 4 * POLL_MS : POLL_MS));
  }
}

$("#cancel").addEventListener("click", async () => {
  if (watching) showProgress((await api(`/api/briefs/${watching}/cancel`, { method: "POST" })).body);
});

// -- browse: filter and sort the designer's variants, on the server, a page at a time ----------
const PAGE = 12;
let browseQuery = null;

async function browse(offset) {
  const params = new URLSearchParams({ ...browseQuery, limit: String(PAGE), offset: String(offset) });
  const { ok, body } = await api(`/api/items?${params}`);
  $("#browse-error").textContent = ok ? ""
    : (Array.isArray(body?.detail) ? body.detail.map((e) => `${e.loc.at(-1)}: ${e.msg}`).join("; ") : String(body?.detail));
  $("#browse-view").hidden = !ok;
  if (!ok) return;
  $("#found-total").textContent = `${body.total ? offset + 1 : 0}–${offset + body.items.length} of ${body.total}`;
  $("#found").replaceChildren(...body.items.map(variantCard));
  $("#found").dataset.offset = String(offset);
  $("#found-prev").disabled = offset === 0;
  $("#found-next").disabled = offset + body.items.length >= body.total;
}

$("#browse-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  browseQuery = {};
  for (const [key, raw] of new FormData(event.target).entries()) {
    const value = String(raw).trim();
    if (value) browseQuery[key] = key === "until" ? `${value}T23:59:59.999999` : value;
  }
  await browse(0);
});
$("#found-prev").addEventListener("click", () => browse(Math.max(0, Number($("#found").dataset.offset) - PAGE)));
$("#found-next").addEventListener("click", () => browse(Number($("#found").dataset.offset) + PAGE));

// -- search -------------------------------------------------------------------------------
$("#search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const file = form.image.files[0];
  const q = form.q.value.trim();
  let result;
  if (file) {
    const data = new FormData();
    data.append("image", file);
    if (q) data.append("q", q);
    result = await api("/api/search", { method: "POST", body: data });
  } else {
    result = await api(`/api/search?${new URLSearchParams({ q, k: "12" })}`);
  }
  $("#search-error").textContent = result.ok ? ""
    : (Array.isArray(result.body?.detail) ? result.body.detail.map((e) => `${e.loc.at(-1)}: ${e.msg}`).join("; ")
      : result.body?.detail ?? "search failed");
  $("#search-view").hidden = !result.ok;
  if (result.ok) {
    $("#hits").replaceChildren(...result.body.map((hit) => el("figure", { class: "variant", "data-hit-id": hit.id },
      el("div", { class: "images" }, el("figure", {}, el("img", { src: hit.image_url, alt: hit.title }), hit.kind)),
      el("figcaption", {}, `${hit.title} · ${hit.score.toFixed(3)}`))));
  }
});

start();
