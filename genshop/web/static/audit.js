// The gallery's bias audit and explanations: the latest `genshop audit` of each kind (its chart and the
// flagged disparities between groups), and, per scored variant, which attributes each group's reward rests on.
// Loaded before gallery.js; uses its el() and api() when the page runs.
"use strict";

const explanations = new Map(); // item id → the explanations fetched for it (kept across the gallery's re-renders)

function explanationList(item) {
  const list = el("ul", { class: "explanations" });
  for (const explanation of explanations.get(item.id)) {
    list.append(el("li", { "data-group": explanation.group_id, title: explanation.effects.map((e) =>
      `${e.attribute} ${e.value} (read ${e.confidence.toFixed(2)}): ${e.effect.toFixed(2)} against ` +
      e.alternatives.map((a) => a.value).join(", ")).join("\n") }, explanation.summary));
  }
  return list;
}

function explanationBlock(item) {
  if (explanations.has(item.id)) return explanationList(item);
  const button = el("button", { class: "explain", type: "button" }, "Why these scores?");
  button.addEventListener("click", async () => {
    button.disabled = true;
    button.textContent = "explaining…";
    const { ok, body } = await api(`/api/items/${item.id}/explanations`);
    if (!ok) { button.textContent = body?.detail ?? "no explanation"; return; }
    explanations.set(item.id, body);
    button.replaceWith(explanationList(item));
  });
  return button;
}

async function showAudit(kind) {
  const view = $("#audit-view");
  view.hidden = false;
  view.dataset.kind = kind;
  $("#audit-title").textContent = `Bias audit: ${kind}`;
  const { ok, body } = await api(`/api/audits/${kind}`);
  if (view.dataset.kind !== kind) return;
  $("#audit-chart").hidden = !ok;
  $("#audit-notes").textContent = ok ? body.notes.join(" ") : (body?.detail ?? "no audit");
  $("#audit-disparities").replaceChildren();
  if (!ok) return;
  $("#audit-chart").src = `/api/audits/${kind}/chart?${encodeURIComponent(body.created)}`;
  $("#audit-summary").textContent = `${body.model} · ${body.catalog_items} catalog items · ` +
    `${body.disparities.length} disparities of at least ${(100 * body.threshold).toFixed(0)} points · ${body.created}`;
  $("#audit-disparities").replaceChildren(
    el("tr", {}, ...["attribute", "value", "group", "share", "vs group", "share", "difference (95% CI)"]
      .map((h) => el("th", {}, h))),
    ...body.disparities.slice(0, 20).map((d) => el("tr", { "data-attribute": d.attribute },
      ...[d.attribute, d.value, d.group, pct(d.share), d.other_group, pct(d.other_share),
        `+${pct(d.difference)} (${pct(d.low)} to ${pct(d.high)})`].map((cell) => el("td", {}, cell)))));
}

function pct(share) {
  return `${(100 * share).toFixed(1)}%`;
}

for (const button of document.querySelectorAll("#audit-kinds button")) {
  button.addEventListener("click", () => showAudit(button.dataset.kind));
}
