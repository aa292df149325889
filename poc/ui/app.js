// The page's logic: list the tenant's datasets, stream one from the gateway's HTTP Arrow endpoint into
// DuckDB-WASM batch by batch (bytes and rows shown as they arrive), run SQL on it, show a table and a chart.
import * as duckdb from "/ui/vendor/@duckdb/duckdb-wasm/dist/duckdb-browser.mjs";
import { RecordBatchReader, Table } from "apache-arrow";

const DIST = "/ui/vendor/@duckdb/duckdb-wasm/dist";
const $ = (id) => document.getElementById(id);
let connection = null;

async function engine() {
  if (connection === null) {
    const db = new duckdb.AsyncDuckDB(new duckdb.VoidLogger(), new Worker(`${DIST}/duckdb-browser-eh.worker.js`));
    await db.instantiate(`${DIST}/duckdb-eh.wasm`);
    connection = await db.connect();
  }
  return connection;
}

const auth = () => ({ authorization: `Bearer ${$("token").value.trim()}` });
const quoted = (name) => `"${name.replaceAll('"', '""')}"`;

async function failed(response) {
  let message = response.statusText;
  try { message = (await response.json()).error; } catch { /* not JSON */ }
  return new Error(`${response.status}: ${message}`);
}

function step(action) {  // one button's work: errors shown, state for whoever watches the page
  return async () => {
    $("error").textContent = "";
    document.body.dataset.state = "busy";
    try {
      await action();
      document.body.dataset.state = "done";
    } catch (error) {
      $("error").textContent = String(error.message || error);
      document.body.dataset.state = "error";
    }
  };
}

async function listDatasets() {
  const response = await fetch("/v1/datasets", { headers: auth() });
  if (!response.ok) throw await failed(response);
  const { datasets } = await response.json();
  $("datasets").replaceChildren(...datasets.map((name) => new Option(name, name)));
}

async function load() {
  const name = $("datasets").value;
  const started = performance.now();
  const response = await fetch(`/v1/datasets/${encodeURIComponent(name)}`, { headers: auth() });
  if (!response.ok) throw await failed(response);
  let bytes = 0;
  const counted = response.body.pipeThrough(new TransformStream({
    transform(chunk, controller) { bytes += chunk.byteLength; controller.enqueue(chunk); },
  }));
  const db = await engine();
  await db.query(`DROP TABLE IF EXISTS ${quoted(name)}`);
  let rows = 0;
  let first = true;
  try {
    const reader = await RecordBatchReader.from(counted);
    for await (const batch of reader) {
      await db.insertArrowTable(new Table([batch]), { name, create: first });
      first = false;
      rows += batch.numRows;
      $("progress").textContent = `${(bytes / 1e6).toFixed(1)} MB, ${rows.toLocaleString()} rows`;
    }
  } catch (error) {  // a stream cut short: no table that looks complete
    await db.query(`DROP TABLE IF EXISTS ${quoted(name)}`);
    throw new Error(`the stream of ${name} failed after ${rows.toLocaleString()} rows: ${error.message || error}`);
  }
  const count = await db.query(`SELECT count(*) AS n FROM ${quoted(name)}`);
  $("rows").textContent = String(count.get(0).n);
  $("seconds").textContent = `in ${((performance.now() - started) / 1000).toFixed(2)} s`;
  if (!$("sql").value) $("sql").value = `SELECT * FROM ${quoted(name)} LIMIT 10`;
}

async function run() {
  const result = await (await engine()).query($("sql").value);
  const names = result.schema.fields.map((f) => f.name);
  const rows = result.toArray().slice(0, 100).map((row) => row.toJSON());
  const cell = (tag, text) => Object.assign(document.createElement(tag), { textContent: text });
  const table = document.createElement("table");
  table.append(Object.assign(document.createElement("tr"), {}));
  table.rows[0].append(...names.map((n) => cell("th", n)));
  for (const row of rows) {
    const tr = table.insertRow();
    tr.append(...names.map((n) => cell("td", shown(row[n]))));
  }
  $("result").replaceChildren(table);
  chart(names, rows);
}

function shown(value) {
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(2) : String(value);
}

function chart(names, rows) {  // bars of the last column by the first, when it is numeric
  const svg = $("chart");
  const values = rows.slice(0, 30).map((row) => Number(row[names[names.length - 1]]));
  if (names.length < 2 || values.length === 0 || values.some((v) => !Number.isFinite(v))) {
    svg.setAttribute("height", "0");
    svg.replaceChildren();
    return;
  }
  const top = Math.max(...values.map(Math.abs)) || 1;
  const width = 600 / values.length;
  svg.setAttribute("height", "160");
  svg.replaceChildren(...values.map((v, i) => {
    const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    const h = (Math.abs(v) / top) * 150;
    Object.entries({ x: i * width + 1, y: 155 - h, width: Math.max(1, width - 2), height: h })
      .forEach(([k, value]) => bar.setAttribute(k, value));
    bar.append(Object.assign(document.createElementNS("http://www.w3.org/2000/svg", "title"),
      { textContent: `${rows[i][names[0]]}: ${v}` }));
    return bar;
  }));
}

$("list").addEventListener("click", step(listDatasets));
$("load").addEventListener("click", step(load));
$("run").addEventListener("click", step(run));
document.body.dataset.state = "ready";
