// metasent playground: plain JavaScript over the REST API (no build step, no dependencies).
"use strict";

(() => {
  const KEY_STORAGE = "metasent.apiKey";
  const state = { domains: new Map(), active: null, suggested: null };
  const $ = (id) => document.getElementById(id);

  // -- small DOM helpers ------------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("data-") || name.startsWith("aria-") || name === "for" || name === "role") node.setAttribute(name, value);
      else node[name] = value;
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  const percent = (score) => `${(score * 100).toFixed(1)}%`;
  const wholePercent = (score) => `${Math.round(score * 100)}%`;

  // -- the API: every error becomes a Problem worded as the API words it ------------------------

  class Problem extends Error {
    constructor(message, details = [], code = "", status = 0) {
      super(message);
      this.details = details;
      this.code = code;
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = $("api-key").value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (error) {
      throw new Problem(`could not reach the server (${error.message})`, [
        { field: "network", fix: "check that metasent serve is running, then retry" },
      ]);
    }
    if (response.status === 204) return null;
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (!response.ok) {
      const error = data && data.error;
      if (error && typeof error.message === "string") {
        throw new Problem(error.message, Array.isArray(error.details) ? error.details : [], error.code, response.status);
      }
      throw new Problem(`HTTP ${response.status}: ${text.slice(0, 300) || response.statusText}`, [], "", response.status);
    }
    return data;
  }

  function clear(id) {
    $(id).replaceChildren();
  }

  function showError(id, problem, { lines = null, note = null } = {}) {
    if (!(problem instanceof Problem)) problem = new Problem(String(problem && problem.message ? problem.message : problem));
    const status = [problem.code, problem.status ? `HTTP ${problem.status}` : ""].filter(Boolean).join(", ");
    const region = $(id);
    region.replaceChildren(
      el("p", { class: "error-message" }, el("strong", { text: "Error: " }), problem.message,
        status ? el("span", { class: "muted", text: ` (${status})` }) : null),
    );
    if (problem.details.length) {
      const list = el("ul", { class: "error-details" });
      for (const detail of problem.details) {
        const field = String(detail.field ?? "");
        const match = lines && /^examples\[(\d+)\]/.exec(field);
        const where = match && lines[Number(match[1])] ? ` (line ${lines[Number(match[1])]} of your examples)` : "";
        list.append(el("li", {}, el("code", { class: "field", text: field }), where, ": ",
          el("span", { class: "fix", text: detail.fix || detail.message || "" })));
      }
      region.append(list);
    }
    if (note) region.append(el("p", { class: "note", text: note }));
  }

  async function busy(button, work) {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      await work();
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }

  // -- parsing what the user pastes or uploads --------------------------------------------------

  /** Rows of a CSV text (RFC 4180 quotes; a quote only opens a field at its start). */
  function parseCsv(text) {
    const rows = [];
    let row = [];
    let field = "";
    let quoted = false;
    let line = 1;
    let rowLine = 1;
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (quoted) {
        if (c === '"' && text[i + 1] === '"') {
          field += '"';
          i++;
        } else if (c === '"') {
          quoted = false;
        } else {
          if (c === "\n") line++;
          field += c;
        }
      } else if (c === '"' && field === "") {
        quoted = true;
      } else if (c === ",") {
        row.push(field);
        field = "";
      } else if (c === "\n") {
        row.push(field);
        rows.push({ cells: row, line: rowLine });
        row = [];
        field = "";
        line++;
        rowLine = line;
      } else if (c !== "\r") {
        field += c;
      }
    }
    if (field !== "" || row.length) {
      row.push(field);
      rows.push({ cells: row, line: rowLine });
    }
    return rows.filter((r) => !(r.cells.length === 1 && r.cells[0].trim() === ""));
  }

  function inputProblem(message, field, fix) {
    return new Problem(message, [{ field, fix }], "invalid_input");
  }

  /** The CSV header's column of `name` (case-insensitive), or -1. */
  const column = (header, name) => header.findIndex((cell) => cell.trim().toLowerCase() === name);

  /** The value of column `index` of a row; in a 2-column file, extra unquoted commas belong to the text. */
  function cell(cells, index, width, textIndex) {
    if (cells.length <= width || width !== 2) return cells[index] ?? "";
    const extra = cells.length - width;
    if (index === textIndex) return cells.slice(index, index + extra + 1).join(",");
    return cells[index > textIndex ? index + extra : index] ?? "";
  }

  /** `{examples, lines}` from CSV (header with text and label) or JSON lines; lines[i] is example i's line. */
  function parseExamples(text) {
    const source = text.replace(/^\uFEFF/, "");
    if (!source.trim()) {
      throw inputProblem("there are no examples", "examples", "paste labelled examples or upload a .csv or .jsonl file");
    }
    if (source.trimStart().startsWith("{")) return parseJsonLines(source);
    const [header, ...rows] = parseCsv(source);
    const textIndex = column(header.cells, "text");
    const labelIndex = column(header.cells, "label");
    if (textIndex < 0 || labelIndex < 0) {
      throw inputProblem(
        `the first line (${JSON.stringify(header.cells.join(","))}) is not a header with text and label columns`,
        "examples (line 1)",
        "start with the header line text,label, or paste JSON lines {\"text\": ..., \"label\": ...}",
      );
    }
    const width = header.cells.length;
    const examples = [];
    const lines = [];
    for (const row of rows) {
      if (row.cells.length > width && width !== 2) {
        throw inputProblem(`line ${row.line} has ${row.cells.length} fields, the header has ${width}`,
          `examples (line ${row.line})`, 'put double quotes around texts that contain commas: "a, b",positive');
      }
      examples.push({ text: cell(row.cells, textIndex, width, textIndex), label: cell(row.cells, labelIndex, width, textIndex) });
      lines.push(row.line);
    }
    return { examples, lines };
  }

  function parseJsonLines(source) {
    const examples = [];
    const lines = [];
    source.split("\n").forEach((raw, i) => {
      if (!raw.trim()) return;
      let value;
      try {
        value = JSON.parse(raw);
      } catch (error) {
        throw inputProblem(`line ${i + 1} is not valid JSON (${error.message})`, `examples (line ${i + 1})`,
          'write one object per line: {"text": "...", "label": "..."}');
      }
      if (value === null || typeof value !== "object" || Array.isArray(value)) {
        throw inputProblem(`line ${i + 1} is not a JSON object`, `examples (line ${i + 1})`,
          'write one object per line: {"text": "...", "label": "..."}');
      }
      examples.push({ text: value.text, label: value.label });
      lines.push(i + 1);
    });
    return { examples, lines };
  }

  /** Non-blank lines of a textarea. */
  const nonBlankLines = (text) => text.split("\n").map((line) => line.replace(/\r$/, "")).filter((line) => line.trim());

  /** The `text` column of a CSV upload, one text per line (newlines inside a text become spaces). */
  function csvTexts(source) {
    const [header, ...rows] = parseCsv(source.replace(/^\uFEFF/, ""));
    const index = header ? column(header.cells, "text") : -1;
    if (index < 0) {
      throw inputProblem("the CSV file has no text column", "file (line 1)", "give the file a header line with a column named text");
    }
    const width = header.cells.length;
    return rows.map((row) => cell(row.cells, index, width, index).replace(/\s*\n\s*/g, " ")).join("\n");
  }

  // -- rendering a domain's adaptation ----------------------------------------------------------

  /** "Estimated accuracy 80% (95% interval 49–94%, leave-one-out over 10 examples)", or null. */
  function estimateText(adaptation) {
    const estimate = adaptation && adaptation.estimated_accuracy;
    if (!estimate || typeof estimate.accuracy !== "number") return null;
    const parts = [];
    if (typeof estimate.low === "number" && typeof estimate.high === "number") {
      parts.push(`95% interval ${Math.round(estimate.low * 100)}–${wholePercent(estimate.high)}`);
    }
    const how = [estimate.method, typeof estimate.n === "number" ? `over ${estimate.n} examples` : ""];
    if (how.some(Boolean)) parts.push(how.filter(Boolean).join(" "));
    const text = `Estimated accuracy ${wholePercent(estimate.accuracy)}`;
    return parts.length ? `${text} (${parts.join(", ")})` : text;
  }

  function warningList(warnings) {
    if (!Array.isArray(warnings) || !warnings.length) return null;
    return el("ul", { class: "warnings" }, ...warnings.map((warning) =>
      el("li", { "data-code": warning.code ?? "" }, el("strong", { text: "Warning: " }), warning.message ?? "",
        warning.code ? el("span", { class: "muted", text: ` (${warning.code})` }) : null)));
  }

  function adaptationSummary(domain) {
    const info = domain.adaptation || {};
    const estimate = estimateText(info);
    return [
      el("p", {
        text: `Labels ${domain.labels.join(", ")} · ${domain.num_examples} examples · version ${domain.version}` +
          (typeof info.seconds === "number" ? ` · adapted in ${info.seconds.toFixed(2)} s on ${info.device}` : ""),
      }),
      typeof info.support_accuracy === "number"
        ? el("p", { class: "muted", text: `Accuracy on its own examples ${wholePercent(info.support_accuracy)} (optimistic: the examples it adapted on)` })
        : null,
      estimate ? el("p", { class: "estimate", text: estimate }) : null,
      warningList(domain.warnings),
    ];
  }

  function showDomainResult(id, heading, domain) {
    $(id).replaceChildren(el("h3", { text: heading }), ...adaptationSummary(domain).filter(Boolean));
  }

  // -- domains: list, choose, delete ------------------------------------------------------------

  function setActive(domainId) {
    state.active = state.domains.has(domainId) ? domainId : null;
    $("active-domain").value = state.active ?? "";
    for (const item of $("domain-list").children) {
      const active = item.dataset.domainId === state.active;
      item.classList.toggle("active", active);
      const marker = item.querySelector(".active-marker");
      if (marker) marker.textContent = active ? " (active)" : "";
    }
  }

  function domainItem(domain) {
    const estimate = estimateText(domain.adaptation);
    const use = el("button", { type: "button", class: "secondary", text: "Use", "aria-label": `Use domain ${domain.name}` });
    use.addEventListener("click", () => setActive(domain.domain_id));
    const remove = el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete domain ${domain.name}` });
    remove.addEventListener("click", () => deleteDomain(domain, remove));
    return el("li", { "data-domain-id": domain.domain_id },
      el("p", {}, el("strong", { class: "domain-name", text: domain.name }), el("span", { class: "active-marker" })),
      el("p", {
        class: "muted",
        text: `${domain.labels.join(" / ")} · ${domain.num_examples} examples · version ${domain.version}` +
          (domain.stale ? " · stale (re-adapted on next use)" : ""),
      }),
      estimate ? el("p", { class: "estimate", text: estimate }) : null,
      el("p", { class: "muted domain-id", text: `id ${domain.domain_id}` }),
      el("div", { class: "actions" }, use, remove));
  }

  async function refreshDomains(select = undefined) {
    clear("domains-error");
    let listed;
    try {
      listed = (await api("GET", "/v1/domains")).domains;
    } catch (problem) {
      showError("domains-error", problem);
      return;
    }
    state.domains = new Map(listed.map((domain) => [domain.domain_id, domain]));
    const options = listed.map((domain) =>
      el("option", { value: domain.domain_id, text: `${domain.name} (${domain.labels.join(" / ")}, v${domain.version})` }));
    if (!options.length) options.push(el("option", { value: "", text: "no domains yet: adapt one above", disabled: true }));
    $("active-domain").replaceChildren(...options);
    $("domain-list").replaceChildren(...listed.map(domainItem));
    const wanted = select ?? state.active;
    setActive(state.domains.has(wanted) ? wanted : (listed[0] ? listed[0].domain_id : null));
  }

  async function deleteDomain(domain, button) {
    if (!window.confirm(`Delete the domain "${domain.name}" and its examples?`)) return;
    await busy(button, async () => {
      clear("domains-error");
      try {
        await api("DELETE", `/v1/domains/${encodeURIComponent(domain.domain_id)}`);
      } catch (problem) {
        showError("domains-error", problem);
        return;
      }
      await refreshDomains();
    });
  }

  function activeDomain(errorId) {
    const domain = state.domains.get(state.active);
    if (!domain) {
      showError(errorId, inputProblem("no domain is active", "active domain",
        "adapt a domain in step 1, or choose one in step 2 (press Refresh list if it is not shown)"));
    }
    return domain;
  }

  // -- 1. adapt ---------------------------------------------------------------------------------

  async function adapt(event) {
    event.preventDefault();
    await busy($("adapt-button"), async () => {
      clear("adapt-error");
      clear("adapt-result");
      let parsed;
      try {
        parsed = parseExamples($("examples").value);
      } catch (problem) {
        showError("adapt-error", problem);
        return;
      }
      $("adapt-result").textContent = `Adapting on ${parsed.examples.length} examples…`;
      let domain;
      try {
        domain = await api("POST", "/v1/domains", { name: $("domain-name").value, examples: parsed.examples });
      } catch (problem) {
        clear("adapt-result");
        showError("adapt-error", problem, { lines: parsed.lines });
        return;
      }
      showDomainResult("adapt-result", `Adapted “${domain.name}”`, domain);
      await refreshDomains(domain.domain_id);
    });
  }

  // -- 3. classify ------------------------------------------------------------------------------

  function predictionItem(text, prediction) {
    const scores = el("ul", { class: "scores" });
    for (const [label, score] of Object.entries(prediction.scores)) {
      const fill = el("span", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(100, score * 100))}%`;
      scores.append(el("li", { class: label === prediction.label ? "score top" : "score", "data-label": label, "data-score": String(score) },
        el("span", { class: "score-label", text: label }),
        el("span", { class: "bar", "aria-hidden": "true" }, fill),
        el("span", { class: "score-value", text: percent(score) })));
    }
    return el("li", { class: "prediction" },
      el("p", { class: "text", text: text }),
      el("p", {}, "Label: ", el("strong", { class: "predicted-label", text: prediction.label }),
        prediction.truncated ? el("span", { class: "muted", text: " (text cut to the encoder's token limit)" }) : null),
      scores);
  }

  async function classify(event) {
    event.preventDefault();
    await busy($("classify-button"), async () => {
      clear("classify-error");
      clear("classify-result");
      const domain = activeDomain("classify-error");
      if (!domain) return;
      const texts = nonBlankLines($("texts").value);
      let answer;
      try {
        answer = await api("POST", `/v1/domains/${encodeURIComponent(domain.domain_id)}/classify`, { texts });
      } catch (problem) {
        showError("classify-error", problem);
        return;
      }
      $("classify-result").replaceChildren(
        el("h3", { text: `${texts.length} ${texts.length === 1 ? "text" : "texts"} classified with “${domain.name}”` }),
        el("ol", { class: "predictions" }, ...answer.predictions.map((prediction, i) => predictionItem(texts[i], prediction))));
    });
  }

  // -- 4. what to label next --------------------------------------------------------------------

  function suggestionItem(suggestion, i, labels) {
    const id = `suggest-label-${i}`;
    const choice = el("select", { id, "data-text": suggestion.text });
    choice.append(el("option", { value: "", text: "skip (do not add)" }), ...labels.map((label) => el("option", { value: label, text: label })));
    const guess = [
      suggestion.label ? `model's guess: ${suggestion.label}` : "",
      typeof suggestion.uncertainty === "number" ? `uncertainty ${suggestion.uncertainty.toFixed(2)}` : "",
      typeof suggestion.index === "number" ? `line ${suggestion.index + 1} of your texts` : "",
    ].filter(Boolean).join(" · ");
    return el("li", { class: "suggestion" },
      el("p", { class: "text", text: suggestion.text }),
      guess ? el("p", { class: "muted", text: guess }) : null,
      el("label", { for: id, text: `Label for suggestion ${i + 1}` }),
      choice);
  }

  async function suggest(event) {
    event.preventDefault();
    await busy($("suggest-button"), async () => {
      clear("suggest-error");
      clear("suggest-result");
      const domain = activeDomain("suggest-error");
      if (!domain) return;
      const texts = nonBlankLines($("pool").value);
      const k = Number.parseInt($("suggest-k").value, 10);
      let answer;
      try {
        answer = await api("POST", `/v1/domains/${encodeURIComponent(domain.domain_id)}/suggest`, { texts, k });
      } catch (problem) {
        const missing = problem.code === "http_404" || problem.code === "http_405";
        showError("suggest-error", problem, {
          note: missing ? "This server has no POST /v1/domains/{id}/suggest: update metasent to get suggestions." : null,
        });
        return;
      }
      state.suggested = { domainId: domain.domain_id, version: domain.version, name: domain.name };
      const form = el("form", { id: "label-form", noValidate: true },
        el("ol", { class: "suggestions" }, ...answer.suggestions.map((s, i) => suggestionItem(s, i, domain.labels))),
        el("button", { type: "submit", id: "add-examples-button", text: "Add the labelled texts to the domain" }));
      form.addEventListener("submit", addLabelled);
      $("suggest-result").replaceChildren(
        el("h3", { text: `${answer.suggestions.length} texts to label for “${domain.name}”` }),
        answer.suggestions.length ? form : el("p", { text: "No suggestions." }),
        el("div", { id: "label-error", class: "error", role: "alert" }),
        el("div", { id: "label-result", class: "result", "aria-live": "polite" }));
    });
  }

  async function addLabelled(event) {
    event.preventDefault();
    await busy($("add-examples-button"), async () => {
      clear("label-error");
      clear("label-result");
      const examples = [...document.querySelectorAll("#label-form select")]
        .filter((choice) => choice.value)
        .map((choice) => ({ text: choice.dataset.text, label: choice.value }));
      if (!examples.length) {
        showError("label-error", inputProblem("no suggestion has a label", "labels", "choose a label for at least one text"));
        return;
      }
      const { domainId, version } = state.suggested;
      let domain;
      try {
        domain = await api("PUT", `/v1/domains/${encodeURIComponent(domainId)}/examples`,
          { examples, mode: "add", expected_version: version });
      } catch (problem) {
        showError("label-error", problem);
        return;
      }
      $("label-form").remove(); // these suggestions are labelled and stored
      showDomainResult("label-result", `Added ${examples.length} examples to “${domain.name}”`, domain);
      await refreshDomains(domain.domain_id);
    });
  }

  // -- uploads, the key, start ------------------------------------------------------------------

  function onUpload(inputId, targetId, errorId, transform) {
    $(inputId).addEventListener("change", async () => {
      const file = $(inputId).files[0];
      if (!file) return;
      clear(errorId);
      try {
        $(targetId).value = transform(file.name, await file.text());
      } catch (problem) {
        showError(errorId, problem);
      }
    });
  }

  async function showModel() {
    try {
      const health = await api("GET", "/healthz");
      if (health.status === "ok") {
        $("model-info").textContent = `Model: ${health.model ?? "the un-meta-trained encoder"} (${health.algorithm}, ` +
          `encoder ${health.encoder}) on ${health.device}`;
      } else {
        $("model-info").textContent = `Server status: ${health.status}`;
      }
    } catch (problem) {
      $("model-info").textContent = `Server status unknown: ${problem.message}`;
    }
  }

  function start() {
    const key = $("api-key");
    key.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
    key.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, key.value));
    key.addEventListener("change", () => refreshDomains());
    $("adapt-form").addEventListener("submit", adapt);
    $("classify-form").addEventListener("submit", classify);
    $("suggest-form").addEventListener("submit", suggest);
    $("refresh-domains").addEventListener("click", () => busy($("refresh-domains"), () => refreshDomains()));
    $("active-domain").addEventListener("change", (event) => setActive(event.target.value));
    onUpload("examples-file", "examples", "adapt-error", (_, text) => text);
    onUpload("texts-file", "texts", "classify-error", (name, text) => (name.toLowerCase().endsWith(".csv") ? csvTexts(text) : text));
    showModel();
    refreshDomains();
  }

  start();
})();
