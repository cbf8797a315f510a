// medsight web page: plain JavaScript over the /v1 API (no build step, no network beyond it).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, file: null, selected: null, finding: null, explainSeq: 0, token: sessionStorage.getItem("medsight-token") || "" };

// ------------------------------------------------------------------ API

async function api(path, options = {}) {
  // The header proves to the server that this page, not a cross-site form, sent the request.
  const headers = Object.assign({ "X-Requested-With": "medsight" }, options.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("This server needs an access token: enter it at the top right.");
  }
  if (response.status === 503) {
    const wait = Number(response.headers.get("Retry-After") || "2");
    const error = new Error(`The server is busy or still loading the model: try again in ${wait} s.`);
    error.status = 503;
    throw error;
  }
  return response;
}

async function json(response) {
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    const error = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    error.status = response.status;
    throw error;
  }
  return body;
}

// A multi-label run decides each finding by its own threshold: the page lists findings.
function isMulti() { return Boolean(state.model && state.model.decision_thresholds) && !isDetect(); }
// A detection run answers with boxes: the page draws them over the image, no heat map.
function isDetect() { return Boolean(state.model && state.model.task === "detect"); }
function isVolume() { return Boolean(state.model && state.model.input.dims === 3); }
// Multi-label and detection labels name their classes joined by "|" (or "no finding"): a
// reviewer ticks those present.
function byFindings() { return isMulti() || isDetect(); }
// A multi-label label names its findings joined by "|": show them as a list.
function labelText(label) { return isMulti() || isDetect() ? String(label).split("|").map(pretty).join(", ") : pretty(label); }

function upload(path, file) {
  const form = new FormData();
  form.append("file", file, "upload");  // the real file name stays on this computer
  return api(path, { method: "POST", body: form });
}

// ------------------------------------------------------------------ helpers

function showBanner(message, kind) {
  const banner = $("banner");
  if (!message) { banner.hidden = true; return; }
  banner.textContent = message;
  banner.className = "banner" + (kind ? " " + kind : "");
  banner.hidden = false;
}

function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1) + " %"; }
function pretty(name) { return String(name).replace(/_/g, " "); }
function pointName(name) {
  // "sensitivity_0.90" → "90 % sensitivity": the operating point chosen at evaluation
  const m = /^sensitivity_(\d\.\d+)$/.exec(name);
  if (m) return Math.round(100 * parseFloat(m[1])) + " % sensitivity";
  const fp = /^fp_(\d+(?:\.\d+)?)$/.exec(name);  // a detector's: "fp_1" → "1 FP/image"
  return fp ? fp[1] + " FP/image" : name === "youden" ? "Youden" : pretty(name);
}
function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
function sizeText(bytes) {
  return bytes > 1048576 ? (bytes / 1048576).toFixed(1) + " MB" : Math.max(1, Math.round(bytes / 1024)) + " kB";
}

function renderBars(container, probabilities) {
  container.replaceChildren();
  const urgent = state.model ? state.model.positive_class : null;
  const top = Object.entries(probabilities).sort((a, b) => b[1] - a[1])[0][0];
  for (const [name, p] of Object.entries(probabilities)) {
    const fill = el("div", { class: "fill" });
    fill.style.width = "0%";
    const row = el("div", { class: "bar" + (name === urgent ? " urgent" : "") + (name === top ? " top" : ""), "data-class": name }, [
      el("span", { class: "cls", text: pretty(name), title: name }),
      el("div", { class: "track" }, [fill]),
      el("span", { class: "pct", text: pct(p) }),
    ]);
    container.append(row);
    requestAnimationFrame(() => { fill.style.width = (100 * p).toFixed(1) + "%"; });
  }
}

// One row per finding: its probability bar with its threshold marked, highlighted when at or
// above it. ``onPick`` (optional) makes the rows buttons that ask for that finding's map.
function renderFindings(container, findings, onPick) {
  container.replaceChildren();
  container.classList.add("findings");
  for (const f of findings) {
    const fill = el("div", { class: "fill" });
    fill.style.width = "0%";
    const mark = el("div", { class: "threshold", title: `threshold ${pct(f.threshold)}` });
    mark.style.left = (100 * f.threshold).toFixed(1) + "%";
    const status = f.above_threshold ? "above" : "below";
    const row = el("div", {
      class: "bar finding " + status + (onPick && f.name === state.finding ? " selected" : ""),
      "data-class": f.name,
      title: `${pretty(f.name)}: ${pct(f.probability)}, ${status} its threshold of ${pct(f.threshold)}`,
    }, [
      el("span", { class: "cls", text: pretty(f.name), title: f.name }),
      el("div", { class: "track" }, [fill, mark]),
      el("span", { class: "pct", text: pct(f.probability) }),
    ]);
    if (onPick) {
      row.setAttribute("role", "button");
      row.setAttribute("tabindex", "0");
      row.setAttribute("aria-label", `Show the heat map of ${pretty(f.name)}`);
      row.addEventListener("click", () => onPick(f.name));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onPick(f.name); } });
    }
    container.append(row);
    requestAnimationFrame(() => { fill.style.width = (100 * f.probability).toFixed(1) + "%"; });
  }
}

// A study keeps its probabilities; the model's thresholds make them findings again.
function findingsOf(probabilities) {
  const thresholds = state.model.decision_thresholds;
  return Object.entries(probabilities).map(([name, p]) => ({
    name, probability: p, threshold: thresholds[name], above_threshold: p >= thresholds[name],
  }));
}

function markSelected(name) {
  state.finding = name;
  for (const row of document.querySelectorAll("#bars .finding")) row.classList.toggle("selected", row.dataset.class === name);
}

// ------------------------------------------------------------------ model

async function loadModel() {
  try {
    const model = await json(await api("/v1/model"));
    state.model = model;
    $("model-chip").textContent = `${model.model.name} · ${model.model.run} · ${model.backend}`;
    $("intended-use").textContent = model.intended_use;
    $("max-size").textContent = sizeText(model.max_upload_bytes);
    const facts = $("model-facts");
    facts.replaceChildren();
    const add = (k, v) => facts.append(el("dt", { text: k }), el("dd", { text: v }));
    if (isDetect()) {
      add("Box classes", model.classes.map(pretty).join(", "));
      add("Urgent class", model.urgent.map(pretty).join(", "));
      const thresholds = Object.entries(model.decision_thresholds || {}).map(([k, t]) => `${pretty(k)} ${t.toFixed(2)}`).join(", ");
      add("Box thresholds", thresholds + (model.evaluated ? " (score at 1 false positive per image on the evaluated split)" : " (0.5: not evaluated)"));
    } else if (isMulti()) {
      add("Findings", model.classes.map(pretty).join(", "));
      add("Urgent findings", model.urgent.map(pretty).join(", "));
      const thresholds = Object.entries(model.decision_thresholds).map(([k, t]) => `${pretty(k)} ${t.toFixed(2)}`).join(", ");
      add("Thresholds", thresholds + (model.evaluated ? ` (${pointName(model.decision_point)} point)` : " (0.5: not evaluated)"));
    } else {
      add("Classes", model.classes.map(pretty).join(", "));
      add("Urgent class", pretty(model.positive_class));
    }
    if (isVolume()) {
      add("Input", `volumes, ${model.input.height}×${model.input.width}${model.input.depth ? "×" + model.input.depth : ""} voxels (${model.input.formats.join(", ")})`);
      $("file-input").accept = ".nii,.gz,.zip,application/gzip,application/zip";
      $("drop-title").textContent = "Drop a volume here";
      $("drop-formats").textContent = "NIfTI (.nii, .nii.gz) or a .zip of one DICOM series";
    } else {
      add("Input", `${model.input.channels === 1 ? "grayscale" : "colour"}, ${model.input.width}×${model.input.height} px`);
    }
    if (model.evaluated) {
      const shown = isDetect()
        ? { map50: "mAP@0.5", map: "mAP@[.5:.95]", sensitivity_at_1fp: "Sensitivity at 1 FP/image", median_iou: "Median IoU of found lesions" }
        : { auroc: "AUROC", accuracy: "Accuracy", auroc_macro: "AUROC (mean over findings)" };
      for (const [name, m] of Object.entries(model.metrics)) {
        if (!(name in shown) || m.value === null) continue;
        const ci = m.ci ? ` (95 % CI ${m.ci[0].toFixed(2)}–${m.ci[1].toFixed(2)})` : "";
        add(shown[name], m.value.toFixed(3) + ci);
      }
      if (model.evaluated_split) add("Evaluated on", `${model.evaluated_split} split, n = ${model.n_evaluated}`);
    } else {
      add("Evaluation", "not evaluated yet (medsight evaluate RUN)");
    }
    add("Version", model.model.version);
    const select = $("reviewer-label");
    select.replaceChildren(el("option", { value: "", text: "— no finding recorded —" }));
    for (const c of model.classes) select.append(el("option", { value: c, text: pretty(c) }));
    setupMulti(model);
    refreshCount();
  } catch (error) {
    $("model-chip").textContent = "model unavailable";
    showBanner(error.message);
  }
}

// The parts of the page that differ for a multi-label run: wording, the worklist's finding
// column, and a reviewer's findings as checkboxes (an image may have several, or none).
function setupMulti(model) {
  const multi = isMulti();
  const detect = isDetect();
  $("result-kicker").textContent = multi ? "Findings above threshold" : detect ? "Boxes found" : "Most likely";
  $("confidence-kicker").textContent = multi ? "Highest probability" : detect ? "Top box score" : "Confidence";
  $("bars-hint").hidden = !multi && !detect;
  if (detect) $("bars-hint").textContent = "Each bar is the top score of that class’s boxes; boxes at or above the class’s threshold are drawn over the image and listed.";
  $("wl-finding-head").hidden = !multi;
  $("reviewer-label").hidden = multi || detect;
  $("reviewer-findings").hidden = !multi && !detect;
  $("reviewer-caption").textContent = multi ? "Reviewer’s findings" : detect ? "Reviewer’s findings (classes with a lesion)" : "Reviewer’s finding";
  if (detect) $("urgency-explainer").textContent = `Urgency: the top score of a box of the urgent class (${model.urgent.map(pretty).join(", ")}).`;
  if (multi || detect) {
    if (multi) $("urgency-explainer").textContent = `Urgency: the highest probability among the urgent findings (${model.urgent.map(pretty).join(", ")}), each scaled so that its own threshold sits at 50 % — 50 % or more means that finding reached its threshold. “Finding” names the one that set the urgency.`;
    // Nothing ticked: no finding recorded (as the select's first option); "No finding" is a
    // reviewer's answer of its own, exclusive of the findings.
    const boxes = $("reviewer-findings");
    boxes.replaceChildren();
    for (const c of [...model.classes, "no finding"]) {
      const box = el("input", { type: "checkbox", value: c });
      box.addEventListener("change", () => {
        if (!box.checked) return;
        for (const other of boxes.querySelectorAll("input")) {
          if (other !== box && (c === "no finding" || other.value === "no finding")) other.checked = false;
        }
      });
      boxes.append(el("label", { class: "check" + (c === "no finding" ? " none" : "") }, [box, document.createTextNode(" " + pretty(c))]));
    }
  }
}

function reviewerLabel() {
  if (!byFindings()) return $("reviewer-label").value || null;
  const checked = [...document.querySelectorAll("#reviewer-findings input:checked")].map((b) => b.value);
  return checked.length ? checked.join("|") : null;
}

function setReviewer(label) {
  if (!byFindings()) { $("reviewer-label").value = label || ""; return; }
  const present = label ? label.split("|") : [];
  for (const box of document.querySelectorAll("#reviewer-findings input")) box.checked = present.includes(box.value);
}

// ------------------------------------------------------------------ analyse

async function analyse(file) {
  showBanner(null);
  state.file = file;
  if (state.model && file.size > state.model.max_upload_bytes) {
    showBanner(`${file.name} is ${sizeText(file.size)}, above this server's limit of ${sizeText(state.model.max_upload_bytes)}.`);
    return;
  }
  $("file-line").hidden = false;
  $("file-name").textContent = file.name;
  $("file-size").textContent = sizeText(file.size);
  $("figures").hidden = false;
  const preview = $("preview-img");
  const browserCanShow = /^image\/(png|jpeg|gif|bmp|webp)$/.test(file.type);
  preview.hidden = !browserCanShow;
  $("preview-note").hidden = browserCanShow;
  $("preview-note").textContent = isVolume()
    ? "Volume: shown on three planes in the heat map"
    : isDetect() ? "DICOM: your browser cannot show it; the boxes are listed" : "DICOM: preview in the heat map";
  if (browserCanShow) preview.src = URL.createObjectURL(file);
  $("overlay-img").hidden = true;
  $("boxes-svg").replaceChildren();
  $("overlay-note").hidden = false;
  $("overlay-note").textContent = isDetect() ? "Finding boxes…" : "Computing heat map…";
  $("overlay-caption").textContent = isDetect() ? "Boxes found" : "Heat map";
  $("result").hidden = true;
  $("result-empty").hidden = false;
  $("result-empty").textContent = "Analysing…";
  $("queue-btn").disabled = false;
  $("queue-btn").textContent = "Add to worklist";
  $("queue-btn").hidden = isVolume();  // the worklist stores images, not volumes
  state.finding = null;

  const seq = ++state.explainSeq;
  const prediction = upload("/v1/predict", file).then(json);
  const explanation = isDetect() ? null : upload("/v1/explain", file).then(json);
  let body;
  try {
    body = await prediction;
    showPrediction(body);
  } catch (error) {
    $("result-empty").textContent = "No prediction.";
    $("overlay-note").textContent = "—";
    showBanner(error.message);
    return;
  }
  if (isDetect()) showBoxes(body.boxes, browserCanShow ? preview.src : null);
  else await showExplanation(explanation, seq);
}

// The detector's boxes over the image: an SVG in the image's own pixels, scaled with it.
function showBoxes(boxes, src) {
  const svg = $("boxes-svg");
  svg.replaceChildren();
  const caption = boxes.length ? `${boxes.length} box${boxes.length > 1 ? "es" : ""} at or above threshold` : "No box at or above threshold";
  $("overlay-caption").textContent = caption;
  if (!src) {
    $("overlay-note").textContent = "DICOM: the boxes are listed beside";
    return;
  }
  const img = $("overlay-img");
  img.onload = () => {
    drawBoxes(svg, img, boxes);
    img.hidden = false;
    $("overlay-note").hidden = true;
  };
  img.src = src;
}

// Boxes in the image's own pixels, as an SVG laid over it (the same box as the image, with
// the same fit), labelled with class and score; urgent classes in their own colour.
function drawBoxes(svg, img, boxes) {
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
  // Lines and labels of a readable size on screen, whatever the image's own size: the
  // image is scaled to fit the frame, so one screen pixel is ``scale`` image pixels.
  const frame = svg.getBoundingClientRect();
  const scale = Math.max(img.naturalWidth / frame.width, img.naturalHeight / frame.height) || 1;
  const stroke = 2 * scale;
  for (const b of boxes) {
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", b.x1); rect.setAttribute("y", b.y1);
    rect.setAttribute("width", b.x2 - b.x1); rect.setAttribute("height", b.y2 - b.y1);
    rect.setAttribute("class", "box" + (state.model.urgent.includes(b.label) ? " urgent" : ""));
    rect.setAttribute("stroke-width", stroke);
    const title = document.createElementNS(ns, "title");
    title.textContent = `${pretty(b.label)} ${pct(b.score)}`;
    rect.append(title);
    const text = document.createElementNS(ns, "text");
    text.setAttribute("x", b.x1); text.setAttribute("y", Math.max(b.y1 - stroke, 11 * scale));
    text.setAttribute("font-size", 11 * scale);
    text.setAttribute("class", "box-label");
    text.textContent = `${pretty(b.label)} ${pct(b.score)}`;
    svg.append(rect, text);
  }
}

// The boxes as a list (also for DICOM, which the browser cannot show).
function renderBoxList(container, boxes) {
  const list = el("ol", { class: "box-list" });
  for (const b of boxes) {
    list.append(el("li", { text: `${pretty(b.label)} · ${pct(b.score)} · x ${Math.round(b.x1)}–${Math.round(b.x2)}, y ${Math.round(b.y1)}–${Math.round(b.y2)} px` }));
  }
  if (!boxes.length) list.append(el("li", { class: "muted", text: "no box at or above its class threshold" }));
  container.append(el("h3", { text: "Boxes (score, position in the image)" }), list);
}

// Show a heat map once it arrives, unless a newer one has been asked for meanwhile.
async function showExplanation(pending, seq) {
  try {
    const body = await pending;
    if (seq !== state.explainSeq) return;
    const img = $("overlay-img");
    img.src = "data:image/png;base64," + body.overlay_png;
    img.hidden = false;
    $("overlay-note").hidden = true;
    const whose = isMulti() && body.target ? pretty(body.target) + " · " : "";
    const sanity = body.passes_sanity === false
      ? ` · fails the sanity check (ρ ${body.sanity_rho.toFixed(2)} with random weights): it shows the image more than the model`
      : body.passes_sanity ? ` · passes the sanity check (ρ ${body.sanity_rho.toFixed(2)})`
      : body.chosen_by === "default" ? " · the default map (this run was not scored against lesion masks)" : "";
    const layer = body.layer ? ", " + body.layer.replaceAll(",", " + ") : "";  // fused stages
    $("overlay-caption").textContent = `Heat map (${whose}${pretty(body.method)}${layer})${sanity}`;
    if (isMulti() && body.target) markSelected(body.target);
  } catch (error) {
    if (seq !== state.explainSeq) return;
    $("overlay-img").hidden = true;
    $("overlay-note").hidden = false;
    $("overlay-note").textContent = error.status === 501 ? "Heat maps are not available on this server." : "Heat map failed: " + error.message;
  }
}

// A finding's row was clicked: that finding's own map (Grad-CAM on its logit).
function explainFinding(name) {
  if (!state.file || name === state.finding) return;
  markSelected(name);
  const seq = ++state.explainSeq;
  $("overlay-note").hidden = false;
  $("overlay-note").textContent = `Computing the heat map of ${pretty(name)}…`;
  $("overlay-img").hidden = true;
  $("overlay-caption").textContent = `Heat map (${pretty(name)})`;
  showExplanation(upload("/v1/explain?class=" + encodeURIComponent(name), state.file).then(json), seq);
}

function showPrediction(body) {
  $("result-empty").hidden = true;
  $("result").hidden = false;
  const label = $("result-label");
  label.textContent = labelText(body.label);
  label.classList.toggle("urgent", state.model && (body.boxes
    ? body.boxes.some((b) => state.model.urgent.includes(b.label))
    : body.findings
      ? body.findings.some((f) => f.above_threshold && state.model.urgent.includes(f.name))
      : body.label === state.model.positive_class));
  $("result-confidence").textContent = pct(body.confidence);
  if (body.findings) renderFindings($("bars"), body.findings, explainFinding);
  else renderBars($("bars"), body.probabilities);
  if (body.boxes) renderBoxList($("bars"), body.boxes);
  const flags = $("flags");
  flags.replaceChildren();
  // Multi-label: the bars show each finding's decision threshold; chips add the other
  // evaluated points only where the finding reaches them.
  // A detector: seven false-positive rates per class would bury the boxes; its chips are the
  // rate the boxes are kept at.
  const shownFlags = body.findings
    ? body.threshold_flags.filter((f) => f.flagged && f.operating_point !== state.model.decision_point)
    : isDetect()
      ? body.threshold_flags.filter((f) => f.operating_point === state.model.decision_point)
      : body.threshold_flags;
  for (const f of shownFlags) {
    const text = `${pretty(f.class_name)} ${f.flagged ? "above" : "below"} the ${pointName(f.operating_point)} threshold (${f.threshold.toFixed(2)})`;
    flags.append(el("span", { class: "chip" + (f.flagged ? " on" : ""), text, title: `sensitivity ${f.sensitivity}, specificity ${f.specificity} on the evaluated split` }));
  }
  $("latency").textContent = `${body.latency_ms.toFixed(0)} ms on the server`;
}

async function queueCurrent() {
  if (!state.file) return;
  const button = $("queue-btn");
  button.disabled = true;
  try {
    const study = await json(await upload("/v1/studies", state.file));
    button.textContent = `Queued as study #${study.id}`;
    refreshCount();
  } catch (error) {
    button.disabled = false;
    showBanner(error.message);
  }
}

// ------------------------------------------------------------------ worklist

async function refreshCount() {
  try {
    const body = await json(await api("/v1/worklist?status=pending"));
    $("pending-count").textContent = body.items.length ? String(body.items.length) : "";
  } catch (_) { /* the badge is a nicety */ }
}

// The clinical context as small tags: STAT, urgent, age, prior findings, setting.
function contextTags(context) {
  const tags = [];
  if (context.priority === "stat") tags.push(el("span", { class: "tag stat", text: "STAT" }));
  else if (context.priority === "urgent") tags.push(el("span", { class: "tag urgent", text: "urgent" }));
  if (context.age_years !== undefined && context.age_years !== null) {
    tags.push(el("span", { class: "tag", text: `${Number(context.age_years).toLocaleString(undefined, { maximumFractionDigits: 1 })} y`, title: "age in years" }));
  }
  for (const finding of context.prior_findings || []) tags.push(el("span", { class: "tag prior", text: "prior: " + finding, title: "known prior finding" }));
  if (context.setting) tags.push(el("span", { class: "tag", text: context.setting }));
  return tags;
}

async function loadWorklist() {
  const status = $("status-filter").value;
  try {
    const body = await json(await api("/v1/worklist" + (status ? "?status=" + status : "")));
    const rows = $("worklist-body");
    rows.replaceChildren();
    // The policy in words: the page says what the order means, rule by rule.
    if (body.policy && body.policy.length) {
      const rules = body.policy.map((rule, i) => `${i + 1}. ${rule}`).join("; ");
      $("policy-explainer").textContent = `Read first, by the triage policy: ${rules}; then by arrival. Under each study: what is known about the patient and why it sits there.`;
    }
    const columns = $("worklist-head").children.length - ($("wl-finding-head").hidden ? 1 : 0);
    for (const item of body.items) {
      const fill = el("div", { class: "fill" });
      fill.style.width = (100 * item.urgency).toFixed(1) + "%";
      const selected = state.selected === item.id ? " selected" : "";
      const row = el("tr", { class: "wl-row" + selected, "data-id": String(item.id) }, [
        el("td", { class: "wl-rank", text: item.rank === null ? "" : String(item.rank) }),
        el("td", { class: "muted", text: "#" + item.id }),
        el("td", {}, [el("div", { class: "urgency" }, [el("div", { class: "track" }, [fill]), el("span", { text: pct(item.urgency) })])]),
        el("td", { text: labelText(item.label) }),
        ...(isMulti() ? [el("td", { class: "wl-finding", text: item.urgency_finding ? pretty(item.urgency_finding) : "—" })] : []),
        el("td", {}, [item.flag ? el("span", { class: "chip on", text: "≥ " + pointName(item.flag), title: "at or above the " + pointName(item.flag) + " threshold" }) : el("span", { class: "muted", text: "—" })]),
        el("td", {}, [el("span", { class: "chip " + item.status, text: pretty(item.status) })]),
        el("td", { class: "muted", text: new Date(item.received_at).toLocaleString() }),
      ]);
      // Under each study: its context as tags and why it sits where it does.
      const why = el("tr", { class: "wl-why-row" + selected, "data-id": String(item.id) }, [
        el("td", {}),
        el("td", { colspan: String(columns - 1) }, [
          el("div", { class: "wl-why-line" }, [...contextTags(item.context || {}), el("span", { class: "wl-why", text: item.why || "" })]),
        ]),
      ]);
      for (const tr of [row, why]) tr.addEventListener("click", () => openStudy(item));
      rows.append(row, why);
    }
    $("worklist-empty").hidden = body.items.length > 0;
    refreshCount();
  } catch (error) {
    showBanner(error.message);
  }
}

async function openStudy(item) {
  state.selected = item.id;
  for (const row of document.querySelectorAll(".wl-row, .wl-why-row")) row.classList.toggle("selected", row.dataset.id === String(item.id));
  $("study-empty").hidden = true;
  $("study").hidden = false;
  $("study-title").textContent = `Study #${item.id}`;
  if (isMulti()) renderFindings($("study-bars"), findingsOf(item.probabilities));
  else renderBars($("study-bars"), item.probabilities);
  const facts = $("study-facts");
  facts.replaceChildren();
  const add = (k, v) => facts.append(el("dt", { text: k }), el("dd", { text: v }));
  add(isMulti() ? "Model findings" : "Model label", labelText(item.label));
  add("Urgency", pct(item.urgency) + (isMulti() && item.urgency_finding ? ` (set by ${pretty(item.urgency_finding)})` : ""));
  add("Flag", item.flag ? `at or above the ${pointName(item.flag)} threshold` : state.model && state.model.evaluated ? "below every operating point" : "none (run not evaluated)");
  const tags = contextTags(item.context || {});
  if (tags.length) facts.append(el("dt", { text: "Context" }), el("dd", { class: "tags" }, tags));
  if (item.why) add("Why here", item.why);
  add("Status", pretty(item.status));
  add("Format", item.format + (item.modality ? " · " + item.modality : ""));
  if (item.patient) add("Patient", item.patient + " (pseudonym)");
  add("Received", new Date(item.received_at).toLocaleString());
  if (item.reviewer_label) add("Reviewer", labelText(item.reviewer_label) + (item.agreement ? " (agrees)" : " (disagrees)"));
  setReviewer(item.reviewer_label || "");
  $("mark-reviewed").disabled = item.status === "reviewed";
  $("start-review").disabled = item.status !== "pending";

  const img = $("study-img");
  img.hidden = true;
  $("study-boxes").replaceChildren();
  $("study-img-note").textContent = "Loading image…";
  {
    try {
      // DICOM: the server renders it as the model read it (rescale, window, photometry)
      const path = item.format === "dicom" ? "preview.png" : "image";
      const response = await api(`/v1/studies/${item.id}/${path}`);
      if (!response.ok) throw new Error(response.statusText);
      // a detection study: the boxes it was queued with, over its image
      img.onload = () => { if (item.boxes) drawBoxes($("study-boxes"), img, item.boxes); };
      img.src = URL.createObjectURL(await response.blob());
      img.hidden = false;
      $("study-img-note").textContent = "";
    } catch (_) {
      $("study-img-note").textContent = "Image unavailable";
    }
  }
}

async function setStatus(status) {
  if (state.selected === null) return;
  const reviewer = reviewerLabel();
  try {
    const item = await json(await api(`/v1/studies/${state.selected}`, {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ status, reviewer_label: status === "reviewed" ? reviewer : null }),
    }));
    await loadWorklist();
    openStudy(item);
    showBanner(status === "reviewed" ? `Study #${item.id} marked reviewed.` : `Study #${item.id} is in review.`, "info");
  } catch (error) {
    showBanner(error.message);
  }
}

// ------------------------------------------------------------------ wiring

function switchView(view) {
  for (const tab of document.querySelectorAll(".tab")) {
    const on = tab.dataset.view === view;
    tab.classList.toggle("active", on);
    tab.setAttribute("aria-selected", String(on));
  }
  $("view-analyse").hidden = view !== "analyse";
  $("view-worklist").hidden = view !== "worklist";
  showBanner(null);
  if (view === "worklist") loadWorklist();
}

function wire() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchView(tab.dataset.view));
  const drop = $("drop");
  $("file-input").addEventListener("change", (e) => { if (e.target.files[0]) analyse(e.target.files[0]); e.target.value = ""; });
  for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) analyse(f); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); } });
  // Dropping a file elsewhere on the page must not navigate away from it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("queue-btn").addEventListener("click", queueCurrent);
  $("status-filter").addEventListener("change", loadWorklist);
  $("refresh-btn").addEventListener("click", loadWorklist);
  $("start-review").addEventListener("click", () => setStatus("in_review"));
  $("mark-reviewed").addEventListener("click", () => setStatus("reviewed"));
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim();
    sessionStorage.setItem("medsight-token", state.token);
    $("token-form").hidden = true;
    showBanner(null);
    loadModel();
  });
  loadModel();
}

wire();
