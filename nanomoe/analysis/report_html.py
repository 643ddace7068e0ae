"""report.html of `nanomoe experts`: one self-contained page (inline CSS, JS, data and images; no
network), readable without a server. The analysis JSON is embedded once; a small script draws the
stories with each token coloured by its first-choice expert in the selected layer."""

from __future__ import annotations

import html
import json
from typing import Any


def _json_for_script(data: Any) -> str:
    # JSON inside <script>: escape the characters that could end the element or start markup
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _fmt_list(values: list[int]) -> str:
    return ", ".join(map(str, values)) if values else "&ndash;"


def _health_rows(analysis: dict[str, Any]) -> str:
    rows = []
    for layer in analysis["layers"]:
        rows.append(
            "<tr>"
            f"<td>{layer['layer']}</td>"
            f"<td>{layer['load_cv']:.3f}</td>"
            f"<td>{100 * layer['max_load_fraction']:.1f}%</td>"
            f"<td>{layer['routing_entropy']:.3f} ({100 * layer['routing_entropy_normalized']:.0f}%)</td>"
            f"<td>{layer['router_confidence']:.3f}</td>"
            f"<td>{100 * layer['dropped_fraction']:.2f}%</td>"
            f"<td>{_fmt_list(layer['dead_experts'])}</td>"
            f"<td>{_fmt_list(layer['overloaded_experts'])}</td>"
            f"<td>{_fmt_list(layer['underloaded_experts'])}</td>"
            "</tr>"
        )
    return "\n".join(rows)


def render_report(analysis: dict[str, Any], images: dict[str, str], *, title: str) -> str:
    """The page as a string; `images` maps a file name to a data: URL."""
    ev = analysis["evaluation"]
    model = analysis["model"]
    bpb = f", {ev['bits_per_byte']:.3f} bits/byte" if ev.get("bits_per_byte") else ""
    meta = (
        f"checkpoint <code>{html.escape(str(ev['checkpoint']))}</code> (step {ev['step']}) &middot; "
        f"{model['n_experts']} experts, top-{model['top_k']} <code>{html.escape(model['router'])}</code> router, "
        f"{len(analysis['layers'])} MoE layers &middot; data <code>{html.escape(str(ev['data']))}</code> "
        f"({html.escape(ev['split'])} split, {html.escape(ev['mode'])}) &middot; {ev['tokens']:,} tokens analysed "
        f"&middot; loss {ev['loss']:.4f} (perplexity {ev['perplexity']:.2f}{bpb})"
    )
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="{url}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, url in images.items()
    )
    return (
        _TEMPLATE.replace("%TITLE%", html.escape(title))
        .replace("%META%", meta)
        .replace("%HEALTH_ROWS%", _health_rows(analysis))
        .replace("%FIGURES%", figures)
        .replace("%DATA%", _json_for_script(analysis))
    )


# The experts' colours, shared with the serve playground: expertColour(e, alpha, number of experts)
EXPERT_COLOURS_JS = """\
  // light, clearly different colours (dark text stays readable on them); golden-angle hues past 12 experts
  const PALETTE = [[244, 163, 163], [160, 196, 245], [170, 222, 150], [247, 200, 130], [206, 176, 240],
                   [140, 220, 212], [245, 176, 218], [230, 222, 120], [214, 186, 156], [200, 204, 210],
                   [200, 236, 140], [150, 220, 245]];
  function expertColour(e, alpha, E) {
    if (E <= PALETTE.length) return "rgba(" + PALETTE[e].join(", ") + ", " + alpha + ")";
    return "hsla(" + ((e * 137.508) % 360).toFixed(1) + ", 70%, 76%, " + alpha + ")";
  }"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
  :root { --fg: #1d232b; --muted: #5c6670; --line: #d9dee3; --bg: #fbfcfd; }
  body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: var(--bg); margin: 0 auto; max-width: 1100px; padding: 1.2em 1.5em 3em; }
  h1 { font-size: 1.5em; margin: 0.2em 0; }
  h2 { font-size: 1.15em; margin: 1.6em 0 0.5em; border-bottom: 1px solid var(--line); padding-bottom: 0.2em; }
  .meta, .note { color: var(--muted); font-size: 0.9em; }
  code { font-size: 0.92em; }
  table { border-collapse: collapse; font-size: 0.9em; }
  th, td { border-bottom: 1px solid var(--line); padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
  th { font-weight: 600; background: #f0f3f6; }
  .controls { position: sticky; top: 0; background: var(--bg); padding: 0.6em 0; z-index: 2;
              border-bottom: 1px solid var(--line); display: flex; gap: 1.5em; align-items: center; flex-wrap: wrap; }
  select { font-size: 1em; padding: 0.15em 0.3em; }
  #legend { display: flex; flex-wrap: wrap; gap: 0.4em; margin: 0.6em 0; }
  .swatch { border: 1px solid rgba(0,0,0,0.15); border-radius: 4px; padding: 0.05em 0.5em; cursor: pointer;
            font-size: 0.85em; user-select: none; white-space: nowrap; }
  .swatch.off { opacity: 0.3; }
  .story { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 0.7em 0.9em;
           margin: 0.6em 0; white-space: pre-wrap; font: 14px/1.9 ui-monospace, "SFMono-Regular", Menlo, monospace; }
  .tok { border-radius: 3px; padding: 0.1em 0; box-shadow: inset -1px 0 0 rgba(255,255,255,0.85); }
  .tok.dim { background: transparent !important; color: #9aa3ab; }
  .chip { display: inline-block; background: #eef1f4; border-radius: 3px; padding: 0 0.35em; margin: 0.1em;
          font: 12px/1.6 ui-monospace, Menlo, monospace; white-space: pre; }
  .chip small { color: var(--muted); }
  .bar { height: 0.8em; border-radius: 2px; display: inline-block; vertical-align: middle; }
  .cosel td { width: 2.4em; height: 1.6em; text-align: center; font-size: 0.75em; border: 1px solid #fff; }
  figure { display: inline-block; margin: 0.5em 1em 0.5em 0; }
  figure img { max-width: 100%; border: 1px solid var(--line); }
  figcaption { color: var(--muted); font-size: 0.8em; }
  dt { font-weight: 600; margin-top: 0.4em; }
  dd { margin-left: 1.2em; color: var(--muted); }
</style>
</head>
<body>
<h1>%TITLE%</h1>
<p class="meta">%META%</p>

<h2>Layer health</h2>
<table id="health">
<thead><tr><th>layer</th><th>load CV</th><th>max load</th><th>routing entropy (of max)</th>
<th>router confidence</th><th>dropped</th><th>dead</th><th>overloaded (&gt;2&times; fair)</th>
<th>underloaded (&lt;&frac12;&times; fair)</th></tr></thead>
<tbody>
%HEALTH_ROWS%
</tbody>
</table>

<div class="controls">
  <label>MoE layer <select id="layer-select"></select></label>
  <label><input type="checkbox" id="fade"> fade tokens by router confidence</label>
  <span class="note">Hover a token for its experts; click experts below to highlight their tokens.</span>
</div>
<div id="legend"></div>

<h2>Sample stories, coloured by first-choice expert</h2>
<div id="stories"></div>

<h2>Experts of the selected layer</h2>
<p class="note">Top tokens: the tokens this expert receives most often (count, and the share of that token's
occurrences routed here). Distinctive: among tokens seen at least a few times, those most often routed here.</p>
<table id="experts"><thead><tr><th>expert</th><th>load</th><th>top tokens</th><th>distinctive tokens</th></tr></thead>
<tbody></tbody></table>

<div id="cosel-section">
<h2>Co-selection in the selected layer</h2>
<p class="note">Fraction of tokens whose top-k holds both experts (diagonal: the expert's own share of tokens).</p>
<table class="cosel" id="cosel"></table>
</div>

<h2>Figures</h2>
%FIGURES%

<h2>What the numbers mean</h2>
<dl>
<dt>load fraction</dt><dd>share of the token&rarr;expert assignments an expert receives (a token routed to k experts
counts once for each); every layer sums to 1, a perfectly balanced layer gives 1/E each.</dd>
<dt>load CV</dt><dd>coefficient of variation (std / mean) of the per-expert load: 0 is perfectly balanced.</dd>
<dt>routing entropy</dt><dd>mean entropy (nats) of the router's distribution over all experts, and as a percentage
of log E (100% = uniform, the router has no preference).</dd>
<dt>router confidence</dt><dd>mean router probability of the first-choice expert (1/E = no preference).</dd>
<dt>dead / overloaded / underloaded</dt><dd>experts with no tokens at all / more than twice / less than half their
fair share of 1/E.</dd>
<dt>padding</dt><dd>positions that are padding are left out of every statistic.</dd>
</dl>

<script type="application/json" id="analysis-data">%DATA%</script>
<script>
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("analysis-data").textContent);
  const E = data.model.n_experts;
  const layerSelect = document.getElementById("layer-select");
  const fade = document.getElementById("fade");
  const focused = new Set();  // experts picked in the legend; when any are, the other tokens are dimmed
  function dimmed(e) { return focused.size > 0 && !focused.has(e); }

%EXPERT_COLOURS%
  function colour(e, alpha) { return expertColour(e, alpha, E); }
  function pct(x) { return (100 * x).toFixed(1) + "%"; }
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function visible(s) {  // whitespace made visible in token chips
    return s.replace(/ /g, "\\u2423").replace(/\\n/g, "\\u21b5").replace(/\\t/g, "\\u21e5");
  }

  data.layers.forEach(function (layer, i) {
    layerSelect.appendChild(el("option", {value: String(i)}, "layer " + layer.layer));
  });

  function drawLegend(layer) {
    const legend = document.getElementById("legend");
    legend.replaceChildren();
    for (let e = 0; e < E; e++) {
      const sw = el("span", {"class": "swatch" + (dimmed(e) ? " off" : ""), "data-e": String(e)},
                    "expert " + e + " \\u00b7 " + pct(layer.load_fractions[e]));
      sw.style.background = colour(e, 1);
      sw.addEventListener("click", function () {
        if (focused.has(e)) focused.delete(e); else focused.add(e);
        draw();
      });
      legend.appendChild(sw);
    }
  }

  function drawStories(li) {
    const box = document.getElementById("stories");
    box.replaceChildren();
    data.samples.forEach(function (sample, si) {
      const story = el("div", {"class": "story", "data-sample": String(si)});
      const routes = sample.layers[li];
      sample.tokens.forEach(function (text, t) {
        const experts = routes.experts[t];
        const probs = routes.probs[t];
        const first = experts[0];
        const span = el("span", {"class": "tok" + (dimmed(first) ? " dim" : ""), "data-e": String(first)}, text);
        span.style.background = colour(first, fade.checked ? 0.15 + 0.85 * probs[0] : 1);
        span.title = experts.map(function (e, k) { return "expert " + e + " (p=" + probs[k].toFixed(3) + ")"; })
          .join(" + ") + "\\ntoken " + JSON.stringify(text);
        story.appendChild(span);
      });
      box.appendChild(story);
    });
    if (!data.samples.length) box.appendChild(el("p", {"class": "note"}, "No sample stories were requested."));
  }

  function chips(rows, showShare) {
    const cell = el("td");
    rows.forEach(function (r) {
      const chip = el("span", {"class": "chip"}, visible(r.token) + " ");
      chip.appendChild(el("small", {}, showShare ? pct(r.share) : String(r.count)));
      chip.title = r.count + " times to this expert, " + pct(r.share) + " of this token's occurrences";
      cell.appendChild(chip);
    });
    return cell;
  }

  function drawExperts(layer) {
    const body = document.querySelector("#experts tbody");
    body.replaceChildren();
    const maxLoad = Math.max.apply(null, layer.load_fractions.concat([1e-9]));
    layer.experts.forEach(function (ex) {
      const row = el("tr");
      const name = el("td");
      const sw = el("span", {"class": "swatch"}, "expert " + ex.expert);
      sw.style.background = colour(ex.expert, 1);
      name.appendChild(sw);
      row.appendChild(name);
      const load = el("td");
      const bar = el("span", {"class": "bar"});
      bar.style.width = (6 * ex.load_fraction / maxLoad).toFixed(2) + "em";
      bar.style.background = colour(ex.expert, 1);
      load.appendChild(bar);
      load.appendChild(document.createTextNode(" " + pct(ex.load_fraction)));
      row.appendChild(load);
      row.appendChild(chips(ex.top_tokens, false));
      row.appendChild(chips(ex.distinctive_tokens, true));
      body.appendChild(row);
    });
  }

  function drawCoselection(layer) {
    const section = document.getElementById("cosel-section");
    const table = document.getElementById("cosel");
    table.replaceChildren();
    if (!layer.coselection) { section.style.display = "none"; return; }
    section.style.display = "";
    let max = 1e-9;
    layer.coselection.forEach(function (r, i) { r.forEach(function (v, j) { if (i !== j && v > max) max = v; }); });
    const head = el("tr");
    head.appendChild(el("th"));
    for (let j = 0; j < E; j++) head.appendChild(el("th", {}, String(j)));
    table.appendChild(head);
    layer.coselection.forEach(function (r, i) {
      const row = el("tr");
      row.appendChild(el("th", {}, String(i)));
      r.forEach(function (v, j) {
        const cell = el("td", {}, (100 * v).toFixed(1));
        const a = i === j ? 0.08 : Math.min(1, v / max);
        cell.style.background = "rgba(40, 90, 200, " + a.toFixed(3) + ")";
        if (a > 0.55) cell.style.color = "#fff";
        row.appendChild(cell);
      });
      table.appendChild(row);
    });
  }

  function draw() {
    const li = Number(layerSelect.value || 0);
    const layer = data.layers[li];
    drawLegend(layer);
    drawStories(li);
    drawExperts(layer);
    drawCoselection(layer);
  }

  layerSelect.addEventListener("change", draw);
  fade.addEventListener("change", draw);
  draw();
})();
</script>
</body>
</html>
"""

_TEMPLATE = _TEMPLATE.replace("%EXPERT_COLOURS%", EXPERT_COLOURS_JS)
