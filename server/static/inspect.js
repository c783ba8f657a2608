// lvlm-prune inspector: asks the server's own /v1/chat/completions twice (pruned with diagnostics,
// then unpruned) and draws what the selection kept and why. Plain JS and canvas; nothing fetched
// from anywhere but this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // The colours of server/heatmap.py: dark blue -> teal -> yellow -> red.
  const STOPS = [[20, 20, 90], [30, 150, 150], [250, 220, 50], [220, 40, 30]];
  const KEPT = "#e8590c";
  const DROPPED = "#9aa1ad";
  const FLOW_PARTS = [["system", "#7c8696"], ["image", KEPT], ["question", "#1f5fbf"]];

  const state = {
    images: [], // {name, url, img} as chosen in the form
    model: null,
    flowSupported: null, // false once the server refused diagnostics "flow"
    result: null, // {pruned, unpruned, images}
    shown: 0, // index of the image drawn in the panels
    part: 0, // AnyRes (LLaVA-NeXT, OneVision): index of the view drawn (base view, crops)
    grid: null,
    hover: -1,
  };

  // ---- talking to the server -------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, payload) {
      const err = payload && payload.error;
      const said = typeof err === "string" ? err : (err && err.message) || (payload && payload.detail);
      let text;
      if (status === 401) {
        text = "HTTP 401 Unauthorized: the server needs its API key. Type it in the API key field"
          + " and ask again." + (said ? ` (The server said: ${said}.)` : "");
      } else {
        text = `HTTP ${status}: ${said || "the server gave no reason"}`;
      }
      super(text);
      this.status = status;
      this.param = err && typeof err === "object" ? err.param : undefined;
    }
  }

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function fetchJson(path, init) {
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new Error(`Could not reach the server (${err.message}). Is lvlm-prune serve running?`);
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (_) {
      payload = null;
    }
    if (!response.ok) throw new ApiError(response.status, payload);
    return payload;
  }

  async function loadModel() {
    const name = $("model-name");
    try {
      const body = await fetchJson("v1/models", { headers: authHeaders() });
      state.model = (body && body.data && body.data[0] && body.data[0].id) || null;
      name.textContent = state.model || "unknown";
    } catch (err) {
      state.model = null;
      name.textContent = err.status === 401 ? "(type the API key to see it)" : "unknown";
    }
  }

  async function chat(pruning, question, images, maxTokens) {
    const content = images.map((im) => ({ type: "image_url", image_url: { url: im.url } }));
    content.push({ type: "text", text: question });
    const body = {
      messages: [{ role: "user", content }],
      max_tokens: maxTokens,
      temperature: 0,
      pruning,
    };
    if (state.model) body.model = state.model;
    const started = performance.now();
    const payload = await fetchJson("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    return { body: payload, ms: performance.now() - started };
  }

  // Diagnostics as rich as the server gives: "flow" (per-layer information flow), else
  // "heatmap", else none. Refusals of the diagnostics field are cheap 400s; only the request that
  // was answered is timed.
  async function askPruned(pruning, question, images, maxTokens) {
    const modes = state.flowSupported === false ? ["heatmap", false] : ["flow", "heatmap", false];
    let notice = null;
    for (const mode of modes) {
      try {
        const res = await chat({ ...pruning, diagnostics: mode }, question, images, maxTokens);
        return { res, notice };
      } catch (err) {
        const diagnosticsRefused = err instanceof ApiError && err.status === 400
          && err.param === "pruning.diagnostics";
        if (!diagnosticsRefused || mode === false) throw err;
        if (mode === "flow") state.flowSupported = false;
        else notice = `Shown without diagnostics: ${err.message}`;
      }
    }
    throw new Error("unreachable");
  }

  // ---- the form ----------------------------------------------------------------------------

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const img = new Image();
        img.onload = () => resolve({ name: file.name, url: reader.result, img });
        img.onerror = () => reject(new Error(`${file.name} is not an image this browser can read`));
        img.src = reader.result;
      };
      reader.onerror = () => reject(new Error(`could not read ${file.name}`));
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    for (const file of files) {
      try {
        state.images.push(await readFile(file));
      } catch (err) {
        showError(err.message);
      }
    }
    renderThumbs();
  }

  function renderThumbs() {
    const list = $("thumbs");
    list.replaceChildren();
    state.images.forEach((im, i) => {
      const li = document.createElement("li");
      const img = document.createElement("img");
      img.src = im.url;
      img.alt = im.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${im.name}`);
      remove.addEventListener("click", () => {
        state.images.splice(i, 1);
        renderThumbs();
      });
      li.append(img, remove);
      list.append(li);
    });
  }

  function keepRatioValue() {
    const raw = $("keep-ratio").value.trim();
    return raw === "" ? undefined : Number(raw); // the server checks the range, and says so
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = false;
  }

  function showNotice(text) {
    const box = $("notice");
    box.textContent = text || "";
    box.hidden = !text;
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function resetCard(which, stateName) {
    $(which).dataset.state = stateName;
    for (const part of ["answer", "before", "after", "prompt", "time"]) {
      $(`${which}-${part}`).textContent = part === "answer" ? "" : "–";
    }
  }

  function renderCard(which, res) {
    const body = res.body || {};
    const p = body.pruning;
    const choice = body.choices && body.choices[0];
    $(`${which}-answer`).textContent = (choice && choice.message && choice.message.content) || "";
    $(`${which}-before`).textContent = p ? p.image_tokens_before : "n/a";
    $(`${which}-after`).textContent = p ? p.image_tokens_after : "n/a";
    $(`${which}-prompt`).textContent = body.usage ? body.usage.prompt_tokens : "n/a";
    $(`${which}-time`).textContent = seconds(res.ms);
    $(which).dataset.state = "done";
  }

  function seconds(ms) {
    return `${(ms / 1000).toFixed(2)} s`;
  }

  async function run(event) {
    event.preventDefault();
    $("error").hidden = true;
    showNotice(null);
    const question = $("question").value.trim();
    if (!state.images.length) return showError("Pick or drop an image first.");
    if (!question) return showError("Type a question first.");
    const images = state.images.slice();
    const maxTokens = Math.max(1, parseInt($("max-tokens").value, 10) || 32);
    const pruning = { method: $("method").value, merge: $("merge").checked };
    const ratio = keepRatioValue();
    if (ratio !== undefined) pruning.keep_ratio = ratio;

    document.body.dataset.state = "running";
    $("run").disabled = true;
    resetCard("pruned", "running");
    resetCard("unpruned", "waiting");
    $("pruned-settings").textContent = "";
    $("details").hidden = true;
    const started = performance.now();
    try {
      if (!state.model) await loadModel();
      setStatus("Asking with pruning…");
      const { res, notice } = await askPruned(pruning, question, images, maxTokens);
      state.result = { pruned: res, unpruned: null, images };
      renderCard("pruned", res);
      const p = res.body.pruning;
      $("pruned-settings").textContent = p
        ? `keep_ratio ${p.keep_ratio} · ${p.method}${p.merge ? " · merge" : ""}` : "";
      showNotice(p ? notice : "The server returned no pruning object: it does not prune this model.");
      state.shown = 0;
      renderDetails();

      setStatus("Asking without pruning…");
      $("unpruned").dataset.state = "running";
      const full = await chat({ keep_ratio: 1.0 }, question, images, maxTokens);
      state.result.unpruned = full;
      renderCard("unpruned", full);
      setStatus(`Both answers in ${seconds(performance.now() - started)} (pruned ${seconds(res.ms)},`
        + ` unpruned ${seconds(full.ms)}).`);
      document.body.dataset.state = "done";
    } catch (err) {
      for (const which of ["pruned", "unpruned"]) {
        if ($(which).dataset.state !== "done") $(which).dataset.state = "error";
      }
      setStatus("");
      showError(err.message);
      document.body.dataset.state = "error";
    } finally {
      $("run").disabled = false;
    }
  }

  // ---- the panels --------------------------------------------------------------------------

  // The panels' grid for one image: its scores on its token grid, or, for an AnyRes image, on one
  // of its views (the base view, or the crops, whose rows each end with a newline token that has
  // no score). Ranks count every token of the image that competed in the selection.
  function gridOf(per, part) {
    if (!per || !per.scores || !per.scores.length) return null;
    let rows;
    let cols;
    let flat;
    let index = (i) => i; // the view's cell i -> the image's own row index
    const view = per.views && per.views[part];
    const all = Array.isArray(per.scores[0]) ? per.scores.flat() : per.scores;
    if (view) {
      [rows, cols] = view.grid;
      const stride = cols + (view.newline ? 1 : 0);
      index = (i) => view.offset + Math.floor(i / cols) * stride + (i % cols);
      flat = Array.from({ length: rows * cols }, (_, i) => all[index(i)]);
    } else if (Array.isArray(per.scores[0])) {
      rows = per.scores.length;
      cols = per.scores[0].length;
      flat = all;
    } else {
      flat = all;
      const side = Math.round(Math.sqrt(flat.length));
      [rows, cols] = per.grid || (side * side === flat.length ? [side, side] : [1, flat.length]);
    }
    const scored = (v) => v !== null && v !== undefined;
    const imageOrder = all.map((_, i) => i).filter((i) => scored(all[i]))
      .sort((a, b) => all[b] - all[a] || a - b);
    const imageRank = new Map(imageOrder.map((i, r) => [i, r + 1]));
    const cells = flat.map((_, i) => i).filter((i) => scored(flat[i]));
    const order = cells.sort((a, b) => flat[b] - flat[a] || a - b);
    const rank = new Int32Array(flat.length); // within this grid, for the curve
    order.forEach((i, r) => { rank[i] = r + 1; });
    const imageRankOf = (i) => imageRank.get(index(i)) || 0; // within the image, for a patch
    let min = Infinity;
    let max = -Infinity;
    for (const v of flat) {
      if (!scored(v)) continue;
      min = Math.min(min, v);
      max = Math.max(max, v);
    }
    const keptRows = new Set(per.kept_indices || []);
    const kept = new Set(flat.map((_, i) => i).filter((i) => keptRows.has(index(i))));
    return {
      rows, cols, flat, order, rank, imageRankOf, min, max, kept,
      K: view ? kept.size : per.tokens_after,
      N: view ? order.length : per.tokens_before,
      ranked: view ? imageOrder.length : per.tokens_before, // what a rank is out of
      onImage: rows > 1,
      view: view ? view.view : null,
      squash: Boolean(per.views), // AnyRes views cover the whole image, resized to the tower
    };
  }

  function renderViewPicker(per) {
    const picker = $("view-picker");
    picker.replaceChildren();
    const views = per.views || [];
    picker.hidden = views.length < 2;
    views.forEach((view, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = `${view.view === "base" ? "Base view" : "Crops"} ${view.grid[0]}×${view.grid[1]}`;
      b.setAttribute("aria-pressed", String(i === state.part));
      b.addEventListener("click", () => {
        state.part = i;
        renderDetails();
      });
      picker.append(b);
    });
  }

  function renderDetails() {
    const res = state.result && state.result.pruned;
    const p = res && res.body && res.body.pruning;
    const perImage = (p && p.per_image) || [];
    const details = $("details");
    if (!perImage.some((per) => per.scores)) {
      details.hidden = true;
      return;
    }
    details.hidden = false;
    const picker = $("image-picker");
    picker.replaceChildren();
    picker.hidden = perImage.length < 2;
    perImage.forEach((_, i) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = `Image ${i + 1}`;
      b.setAttribute("aria-pressed", String(i === state.shown));
      b.addEventListener("click", () => {
        state.shown = i;
        state.part = 0;
        renderDetails();
      });
      picker.append(b);
    });
    const per = perImage[state.shown];
    if (!per.views || state.part >= per.views.length) state.part = 0;
    renderViewPicker(per);
    state.grid = gridOf(per, state.part);
    state.hover = -1;
    drawMap();
    drawCurve(state.grid, p.keep_ratio);
    listQueryTokens(per, state.grid);
    drawPositions(state.grid);
    renderFlow(p.flow);
  }

  function colour(t) {
    const pos = Math.min(Math.max(t, 0), 1) * (STOPS.length - 1);
    const lo = Math.min(Math.floor(pos), STOPS.length - 2);
    const f = pos - lo;
    return STOPS[lo].map((c, k) => Math.round(c * (1 - f) + STOPS[lo + 1][k] * f));
  }

  // The picture as the processor feeds it: LLaVA-1.5's shortest edge resized and centre square;
  // an AnyRes view (squash) the whole image resized to the square.
  function drawPicture(ctx, img, size, squash = false) {
    ctx.fillStyle = "#222";
    ctx.fillRect(0, 0, size, size);
    if (!img) return;
    if (squash) {
      ctx.drawImage(img, 0, 0, size, size);
      return;
    }
    const side = Math.min(img.naturalWidth, img.naturalHeight);
    const sx = (img.naturalWidth - side) / 2;
    const sy = (img.naturalHeight - side) / 2;
    ctx.drawImage(img, sx, sy, side, side, 0, 0, size, size);
  }

  // One pixel per patch, scaled up without smoothing over the picture.
  function overlay(ctx, rows, cols, size, rgbaOf) {
    const small = document.createElement("canvas");
    small.width = cols;
    small.height = rows;
    const sctx = small.getContext("2d");
    const data = sctx.createImageData(cols, rows);
    for (let i = 0; i < rows * cols; i++) data.data.set(rgbaOf(i), 4 * i);
    sctx.putImageData(data, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(small, 0, 0, size, size);
    ctx.imageSmoothingEnabled = true;
  }

  function currentImage() {
    const images = (state.result && state.result.images) || [];
    return images[state.shown] && images[state.shown].img;
  }

  function drawMap() {
    const canvas = $("heatmap");
    const ctx = canvas.getContext("2d");
    const size = canvas.width;
    const g = state.grid;
    const view = document.querySelector("input[name=view]:checked").value;
    $("map-title").textContent = view === "mask" ? "Kept / dropped patches" : "Relevance heatmap";
    $("colour-key").hidden = view === "mask";
    drawPicture(ctx, currentImage(), size, g && g.squash);
    if (!g || !g.onImage) return;
    const span = g.max - g.min || 1;
    if (view === "mask") {
      overlay(ctx, g.rows, g.cols, size, (i) => (g.kept.has(i) ? [0, 0, 0, 0] : [25, 27, 33, 200]));
    } else {
      overlay(ctx, g.rows, g.cols, size, (i) => (g.flat[i] === null || g.flat[i] === undefined
        ? [25, 27, 33, 200] : [...colour((g.flat[i] - g.min) / span), 160]));
    }
    if (state.hover >= 0) {
      const pw = size / g.cols;
      const ph = size / g.rows;
      const r = Math.floor(state.hover / g.cols);
      const c = state.hover % g.cols;
      ctx.lineWidth = 2;
      ctx.strokeStyle = "#ffffff";
      ctx.strokeRect(c * pw + 1, r * ph + 1, pw - 2, ph - 2);
    }
  }

  function patchText(i) {
    const g = state.grid;
    const r = Math.floor(i / g.cols);
    const c = i % g.cols;
    const fate = g.kept.has(i) ? "kept" : "dropped";
    const where = g.view ? `${g.view === "base" ? "Base view" : "Crops"}, patch` : "Patch";
    return `${where} row ${r}, column ${c}: score ${g.flat[i].toFixed(4)}, rank ${g.imageRankOf(i)} of`
      + ` ${g.ranked}, ${fate}`;
  }

  function onHover(event) {
    const g = state.grid;
    if (!g || !g.onImage) return;
    const rect = event.currentTarget.getBoundingClientRect();
    const c = Math.floor(((event.clientX - rect.left) / rect.width) * g.cols);
    const r = Math.floor(((event.clientY - rect.top) / rect.height) * g.rows);
    if (r < 0 || c < 0 || r >= g.rows || c >= g.cols) return onLeave();
    const i = r * g.cols + c;
    const text = patchText(i);
    $("patch-info").textContent = text;
    const tip = $("tooltip");
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = `${event.clientX + 14}px`;
    tip.style.top = `${event.clientY + 14}px`;
    if (i !== state.hover) {
      state.hover = i;
      drawMap();
    }
  }

  function onLeave() {
    $("tooltip").hidden = true;
    $("patch-info").textContent = "Hover a patch for its score, rank and fate.";
    if (state.hover >= 0) {
      state.hover = -1;
      drawMap();
    }
  }

  function axes(ctx, box, xLabel, yLabel) {
    ctx.strokeStyle = "#5b6270";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(box.l, box.t);
    ctx.lineTo(box.l, box.b);
    ctx.lineTo(box.r, box.b);
    ctx.stroke();
    ctx.fillStyle = "#5b6270";
    ctx.font = "11px sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(xLabel, (box.l + box.r) / 2, box.b + 26);
    ctx.save();
    ctx.translate(12, (box.t + box.b) / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(yLabel, 0, 0);
    ctx.restore();
  }

  function drawCurve(g, keepRatio) {
    const canvas = $("curve");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!g) return;
    const box = { l: 52, r: canvas.width - 12, t: 14, b: canvas.height - 34 };
    axes(ctx, box, "rank (1 = most relevant)", "score");
    const n = g.order.length; // the scored cells
    const span = g.max - g.min || 1;
    const x = (rank) => box.l + ((rank - 1) / Math.max(n - 1, 1)) * (box.r - box.l);
    const y = (v) => box.b - ((v - g.min) / span) * (box.b - box.t);
    ctx.textAlign = "right";
    ctx.fillText(g.max.toFixed(3), box.l - 4, box.t + 4);
    ctx.fillText(g.min.toFixed(3), box.l - 4, box.b);
    ctx.textAlign = "center";
    ctx.fillText("1", box.l, box.b + 13);
    ctx.fillText(String(n), box.r, box.b + 13);
    g.order.forEach((index, r) => {
      ctx.fillStyle = g.kept.has(index) ? KEPT : DROPPED;
      ctx.fillRect(x(r + 1) - 1, y(g.flat[index]) - 1, 2.5, 2.5);
    });
    const K = g.K;
    if (K >= 1 && K <= n) {
      const cut = g.flat[g.order[K - 1]];
      ctx.setLineDash([4, 3]);
      ctx.strokeStyle = "#1c1f24";
      ctx.beginPath();
      ctx.moveTo(x(K), box.t);
      ctx.lineTo(x(K), box.b);
      ctx.moveTo(box.l, y(cut));
      ctx.lineTo(box.r, y(cut));
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = "#1c1f24";
      ctx.textAlign = K > n / 2 ? "right" : "left";
      ctx.fillText(`K = ${K}`, x(K) + (K > n / 2 ? -4 : 4), box.t + 10);
      let inTop = 0;
      for (const index of g.kept) if (g.rank[index] <= K) inTop++;
      $("curve-note").textContent = `K = ${K} of N = ${g.N} (keep_ratio ${keepRatio}); the K-th`
        + ` score is ${cut.toFixed(4)}. ${inTop} of the ${g.kept.size} kept tokens are in the top K`
        + " by score (orange: kept, grey: dropped).";
    }
  }

  function listQueryTokens(per, g) {
    const list = $("query-tokens");
    list.replaceChildren();
    const tokens = per.top_query_tokens || [];
    const most = Math.max(1, ...tokens.map((t) => t.votes));
    for (const t of tokens) {
      const li = document.createElement("li");
      const code = document.createElement("code");
      code.textContent = t.token.trim() || JSON.stringify(t.token);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${(120 * t.votes) / most}px`;
      li.append(code, ` ${t.votes} kept tokens`, bar);
      list.append(li);
    }
    const votes = tokens.reduce((s, t) => s + t.votes, 0);
    $("query-note").textContent = tokens.length
      ? `Each kept token votes for the question token it is most similar to; these ${tokens.length}`
        + ` drew ${votes} of the ${g ? g.kept.size : per.tokens_after} kept tokens.`
      : "No question token drew the kept tokens (no query, or a method that ignores it).";
  }

  function bars(canvasId, counts, full, label, ends) {
    const canvas = $(canvasId);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const box = { l: 36, r: canvas.width - 8, t: 10, b: canvas.height - 34 };
    axes(ctx, box, label, "kept");
    const w = (box.r - box.l) / counts.length;
    counts.forEach((count, i) => {
      const h = (count / Math.max(full, 1)) * (box.b - box.t);
      ctx.fillStyle = KEPT;
      ctx.fillRect(box.l + i * w + 0.5, box.b - h, Math.max(w - 1, 1), h);
    });
    const mean = counts.reduce((s, c) => s + c, 0) / counts.length;
    const yMean = box.b - (mean / Math.max(full, 1)) * (box.b - box.t);
    ctx.setLineDash([4, 3]);
    ctx.strokeStyle = "#1c1f24";
    ctx.beginPath();
    ctx.moveTo(box.l, yMean);
    ctx.lineTo(box.r, yMean);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#5b6270";
    ctx.textAlign = "right";
    ctx.fillText(String(full), box.l - 4, box.t + 8);
    ctx.textAlign = "left";
    ctx.fillText(ends[0], box.l, box.b + 13);
    ctx.textAlign = "right";
    ctx.fillText(ends[1], box.r, box.b + 13);
  }

  function drawPositions(g) {
    if (!g || !g.onImage) {
      $("position-note").textContent = "No patch grid for this image.";
      return;
    }
    const byRow = new Array(g.rows).fill(0);
    const byCol = new Array(g.cols).fill(0);
    for (const index of g.kept) {
      byRow[Math.floor(index / g.cols)]++;
      byCol[index % g.cols]++;
    }
    bars("rows", byRow, g.cols, "row", ["0 (top)", `${g.rows - 1} (bottom)`]);
    bars("cols", byCol, g.rows, "column", ["0 (left)", `${g.cols - 1} (right)`]);
    const meanOf = (counts) => counts.reduce((s, c, i) => s + c * i, 0) / Math.max(g.kept.size, 1);
    $("position-note").textContent = `Mean kept row ${meanOf(byRow).toFixed(1)}, mean kept column`
      + ` ${meanOf(byCol).toFixed(1)} (centre ${((g.rows - 1) / 2).toFixed(1)},`
      + ` ${((g.cols - 1) / 2).toFixed(1)}); dashed: an even spread.`;
  }

  function renderFlow(flow) {
    const section = $("flow");
    if (!flow || !Array.isArray(flow.layers) || !flow.layers.length) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    drawFlowLayers(flow);
    const select = $("flow-layer");
    select.replaceChildren();
    (flow.image_map_layers || []).forEach((entry, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = String(entry.layer);
      select.append(option);
    });
    select.onchange = () => drawFlowMap(flow);
    drawFlowMap(flow);
  }

  function drawFlowLayers(flow) {
    const canvas = $("flow-layers");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const box = { l: 44, r: canvas.width - 110, t: 12, b: canvas.height - 34 };
    axes(ctx, box, "decoder layer", "attention share");
    const n = flow.layers.length;
    const w = (box.r - box.l) / n;
    flow.layers.forEach((layer, i) => {
      let y = box.b;
      for (const [part, fill] of FLOW_PARTS) {
        const h = Math.max(0, Number(layer[part]) || 0) * (box.b - box.t);
        ctx.fillStyle = fill;
        ctx.fillRect(box.l + i * w + 0.5, y - h, Math.max(w - 1, 1), h);
        y -= h;
      }
    });
    ctx.fillStyle = "#5b6270";
    ctx.textAlign = "center";
    const step = Math.max(1, Math.ceil(n / 16));
    for (let i = 0; i < n; i += step) ctx.fillText(String(i), box.l + (i + 0.5) * w, box.b + 13);
    ctx.textAlign = "right";
    ctx.fillText("1", box.l - 4, box.t + 8);
    ctx.fillText("0", box.l - 4, box.b);
    FLOW_PARTS.forEach(([part, fill], k) => {
      ctx.fillStyle = fill;
      ctx.fillRect(box.r + 16, box.t + k * 18, 12, 12);
      ctx.fillStyle = "#1c1f24";
      ctx.textAlign = "left";
      ctx.fillText(part, box.r + 34, box.t + k * 18 + 10);
    });
    const cliff = flow.cliff_layer;
    if (Number.isInteger(cliff) && cliff >= 0 && cliff < n) {
      const xc = box.l + (cliff + 0.5) * w;
      ctx.setLineDash([5, 3]);
      ctx.strokeStyle = "#8a1c12";
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.moveTo(xc, box.t);
      ctx.lineTo(xc, box.b);
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.lineWidth = 1;
      ctx.fillStyle = "#8a1c12";
      ctx.textAlign = "left";
      ctx.fillText(`cliff: layer ${cliff}`, Math.min(xc + 4, box.r - 70), box.t + 10);
      const before = flow.layers[Math.max(cliff - 1, 0)].image;
      const after = flow.layers[cliff].image;
      $("flow-note").textContent = `Cliff at layer ${cliff}: the image's share of attention goes from`
        + ` ${fraction(before)} (layer ${Math.max(cliff - 1, 0)}) to ${fraction(after)}.`;
    } else {
      $("flow-note").textContent = "";
    }
  }

  function fraction(v) {
    return `${(100 * (Number(v) || 0)).toFixed(1)} %`;
  }

  function drawFlowMap(flow) {
    const canvas = $("flow-map");
    const ctx = canvas.getContext("2d");
    const size = canvas.width;
    drawPicture(ctx, currentImage(), size, Boolean(state.grid && state.grid.squash));
    const entry = (flow.image_map_layers || [])[Number($("flow-layer").value) || 0];
    const grid = entry && entry.per_image && entry.per_image[state.shown];
    if (!Array.isArray(grid) || !grid.length || !Array.isArray(grid[0])) return;
    const rows = grid.length;
    const cols = grid[0].length;
    const flat = grid.flat();
    const values = flat.filter((v) => v !== null && v !== undefined);
    const min = Math.min(...values);
    const span = Math.max(...values) - min || 1;
    overlay(ctx, rows, cols, size, (i) => (flat[i] === null || flat[i] === undefined
      ? [25, 27, 33, 200] : [...colour((flat[i] - min) / span), 160]));
  }

  // ---- wiring ------------------------------------------------------------------------------

  function wire() {
    const range = $("keep-ratio-range");
    const number = $("keep-ratio");
    range.addEventListener("input", () => { number.value = range.value; });
    number.addEventListener("input", () => {
      const v = Number(number.value);
      if (number.value !== "" && v >= Number(range.min) && v <= Number(range.max)) range.value = v;
    });
    $("images").addEventListener("change", (event) => {
      addFiles(Array.from(event.target.files));
      event.target.value = "";
    });
    const zone = $("drop-zone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      addFiles(Array.from(event.dataTransfer.files));
    });
    $("api-key").addEventListener("change", loadModel);
    $("ask").addEventListener("submit", run);
    for (const radio of document.querySelectorAll("input[name=view]")) {
      radio.addEventListener("change", drawMap);
    }
    const map = $("heatmap");
    map.addEventListener("mousemove", onHover);
    map.addEventListener("mouseleave", onLeave);
    document.body.dataset.state = "idle";
    loadModel();
  }

  wire();
})();
