// The playground: every panel is one or two calls to /v1, made as the user draws, slides or clicks.
import { Api } from "./api.js";
import { Pad } from "./pad.js";
import { drawGray, drawHeat, showImages } from "./view.js";

const $ = (id) => document.getElementById(id);
const DIGITS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9];
const LOGGED = 20; // requests kept in the log table

const api = new Api(logRequest);
const pad = new Pad($("pad"), { onChange: () => analysis.request(), onStroke: () => analysis.request() });
const sliders = new Map(); // attribute name -> its range input

// Run `work` for the newest state only: a request made while it runs is served once, after it, with the state then.
// <body data-NAME="busy|idle" data-NAME-runs="N"> says where it is (scripts driving the page wait on it).
function coalesced(name, work) {
  let running = false;
  let again = false;
  let runs = 0;
  return {
    async request() {
      if (running) {
        again = true;
        return;
      }
      running = true;
      document.body.dataset[name] = "busy";
      try {
        do {
          again = false;
          await work();
        } while (again);
      } finally {
        running = false;
        document.body.dataset[`${name}Runs`] = String(++runs);
        document.body.dataset[name] = "idle";
      }
    },
  };
}

const analysis = coalesced("analysis", () => Promise.all([pixelcnnPanel(pad.rows()), vaePanel(pad.rows())]));
const editing = coalesced("editing", () => editPanel(pad.rows()));

function logRequest({ method, path, status, ms }) {
  const row = document.createElement("tr");
  for (const text of [`${method} ${path}`, status || "failed", ms.toFixed(0)]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  $("requests").prepend(row);
  while ($("requests").rows.length > LOGGED) $("requests").deleteRow(-1);
}

function showVersion(answer) {
  for (const span of document.querySelectorAll(`.version[data-model="${answer.model}"]`)) {
    span.textContent = `v${answer.model_version}`;
  }
}

// Errors are shown on the page (and never thrown on: the page keeps working).
async function guarded(work) {
  try {
    await work();
  } catch (err) {
    $("error").textContent = err.message;
  }
}

async function pixelcnnPanel(rows) {
  await guarded(async () => {
    const likelihood = await api.post("/v1/pixelcnn/logprob", { images: [rows], per_pixel: true });
    const r = likelihood.results[0];
    showVersion(likelihood);
    $("bpd").textContent = r.bits_per_dim.toFixed(3);
    $("logprob").textContent = `log p(x) = ${r.logprob.toFixed(1)} nats`;
    drawHeat($("heat"), r.per_pixel);
  });
  await guarded(async () => {
    const anomaly = await api.post("/v1/pixelcnn/anomaly", { images: [rows] });
    const a = anomaly.results[0];
    $("verdict").textContent = a.anomalous ? "anomalous: unlike the training digits" : "like the training digits";
    $("verdict").className = a.anomalous ? "anomalous" : "typical";
    $("anomaly-detail").textContent = `score ${a.score.toFixed(0)} bits (model ${(-a.logprob / Math.LN2).toFixed(0)}`
      + ` − PNG ${a.complexity_bits}), p = ${a.p_value.toFixed(3)} against ${anomaly.reference_size} held-out`
      + ` digits, alpha ${anomaly.alpha}`;
  });
}

async function vaePanel(rows) {
  await guarded(async () => {
    const encoded = await api.post("/v1/vae/encode", { images: [rows] });
    const decoded = await api.post("/v1/vae/decode", { latents: [encoded.latents[0].mean], format: "array" });
    showVersion(decoded);
    drawGray($("recon"), decoded.images[0]);
  });
  await editPanel(rows);
}

async function editPanel(rows) {
  if (sliders.size === 0) return;
  await guarded(async () => {
    const edits = Object.fromEntries([...sliders].map(([name, input]) => [name, Number(input.value)]));
    const edited = await api.post("/v1/vae/edit", { images: [rows], edits, format: "array" });
    drawGray($("edited"), edited.images[0]);
  });
}

function addSliders(attributes) {
  for (const a of attributes) {
    const id = `attr-${a.name}`;
    const box = document.createElement("div");
    box.className = "slider";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = a.name;
    label.title = a.description;
    const input = document.createElement("input");
    Object.assign(input, { type: "range", id, min: "-3", max: "3", step: "0.25", value: "0" });
    input.setAttribute("aria-describedby", `${id}-value`);
    const value = document.createElement("output");
    value.id = `${id}-value`;
    value.htmlFor = id;
    value.textContent = "0 sd";
    input.addEventListener("input", () => {
      value.textContent = `${input.value} sd`;
      editing.request();
    });
    box.append(label, input, value);
    $("sliders").append(box);
    sliders.set(a.name, input);
  }
}

async function loadRandomDigit() {
  await guarded(async () => {
    const digit = await api.get("/playground/digit");
    pad.set(digit.pixels);
    $("digit-info").textContent = `held-out digit #${digit.index}, a ${digit.label}`;
  });
  await analysis.request();
}

async function busy(button, work) {
  button.disabled = true;
  try {
    await guarded(work);
  } finally {
    button.disabled = false;
  }
}

function complete() {
  return busy($("complete"), async () => {
    const label = $("complete-label").value;
    const body = { image: pad.rows(), known_rows: 14, n: 4, seed: seed(), preview: true };
    if (label !== "") body.labels = Number(label);
    const progress = $("complete-progress");
    const result = await api.stream("/v1/pixelcnn/complete", body, (p) => {
      progress.value = p.pixels_done / p.pixels_total;
      if (p.preview) showImages($("completions"), p.preview, (i) => `completion ${i + 1}, drawing`);
    });
    progress.value = 1;
    showImages($("completions"), result.images, (i) => `completion ${i + 1}`);
  });
}

function interpolate() {
  return busy($("interpolate"), async () => {
    const digit = await api.get("/playground/digit");
    const strip = await api.post("/v1/vae/interpolate",
      { start: pad.rows(), end: digit.pixels, steps: 8, format: "array" });
    showImages($("interpolation"), strip.images, (i) => `step ${i + 1} of 8 towards a ${digit.label}`);
  });
}

function seed() {
  const value = Number($("seed").value);
  if (!Number.isSafeInteger(value) || value < 0) throw new Error("the seed must be a whole number, 0 or more");
  return value;
}

function sample() {
  return busy($("sample"), async () => {
    const s = seed();
    const label = (i) => `a ${DIGITS[i]}`;
    const gan = api.post("/v1/gan/sample", { n: 10, seed: s, labels: DIGITS, format: "array" }).then((r) => {
      showVersion(r);
      showImages($("gan-samples"), r.images, label);
    });
    const vae = api.post("/v1/vae/sample", { n: 10, seed: s, format: "array" }).then((r) => {
      showImages($("vae-samples"), r.images, (i) => `VAE sample ${i + 1}`);
    });
    const progress = $("pixelcnn-progress");
    const pixelcnn = api.stream("/v1/pixelcnn/sample", { n: 10, seed: s, labels: DIGITS, preview: true }, (p) => {
      progress.value = p.pixels_done / p.pixels_total;
      if (p.preview) showImages($("pixelcnn-samples"), p.preview, label);
    }).then((r) => {
      progress.value = 1;
      showImages($("pixelcnn-samples"), r.images, label);
    });
    const failures = (await Promise.allSettled([gan, vae, pixelcnn])).filter((r) => r.status === "rejected");
    if (failures.length) throw failures[0].reason;
  });
}

async function start() {
  $("clear").addEventListener("click", () => {
    pad.clear();
    $("digit-info").textContent = "";
    analysis.request();
  });
  $("random").addEventListener("click", () => loadRandomDigit());
  $("complete").addEventListener("click", () => complete());
  $("interpolate").addEventListener("click", () => interpolate());
  $("sample").addEventListener("click", () => sample());
  await guarded(async () => {
    const { models } = await api.get("/v1/models");
    $("versions").textContent = "Serving " + models.map((m) => `${m.name} v${m.default_version}`
      + (m.versions.length > 1 ? ` (of ${m.versions.join(", ")})` : "")).join(", ") + ".";
  });
  await guarded(async () => addSliders((await api.get("/v1/vae/attributes")).attributes));
  await loadRandomDigit();
  await sample();
}

start();
