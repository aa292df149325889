// The page's logic: list the tenant's datasets, stream one from the gateway's HTTP Arrow endpoint into
// DuckDB-WASM batch by batch (bytes and rows shown as they arrive), run SQL on it, show a table and a chart
// (Vega-Lite through vega-embed, as SVG).
import * as duckdb from "/ui/vendor/@duckdb/duckdb-wasm/dist/duckdb-browser.mjs";
import { DataType, RecordBatchReader, Table } from "apache-arrow";

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

const ERROR_CHUNK = "POC-ERROR ";  // how the gateway ends a stream that failed midway (README, "The browser")
let loading = null;  // the AbortController of the load in progress (#cancel)

function reasonIn(tail) {  // the server's reason, if the stream ended with its error chunk
  const text = new TextDecoder("latin1").decode(tail);
  const at = text.lastIndexOf(ERROR_CHUNK);
  if (at < 0) return null;
  try {
    const { status, error } = JSON.parse(text.slice(at + ERROR_CHUNK.length).split("\n")[0]);
    return `${status}: ${error}`;
  } catch { return null; }
}

async function load() {
  const name = $("datasets").value;
  const started = performance.now();
  loading = new AbortController();
  $("cancel").disabled = false;
  try {
    await stream(name, started, loading.signal);
  } finally {
    $("cancel").disabled = true;
    loading = null;
  }
  const count = await (await engine()).query(`SELECT count(*) AS n FROM ${quoted(name)}`);
  $("rows").textContent = String(count.get(0).n);
  $("seconds").textContent = `in ${((performance.now() - started) / 1000).toFixed(2)} s`;
  if (!$("sql").value) $("sql").value = `SELECT * FROM ${quoted(name)} LIMIT 10`;
}

async function stream(name, started, signal) {
  const headers = { ...auth(), "x-stream-errors": "in-body" };  // a failure's reason as the body's last line
  const response = await fetch(`/v1/datasets/${encodeURIComponent(name)}`, { headers, signal });
  if (!response.ok) throw await failed(response);
  const total = Number(response.headers.get("x-arrow-bytes")) || 0;  // the size, when the server knows it
  const bar = $("bar");
  if (total) { bar.max = total; bar.value = 0; } else bar.removeAttribute("value");  // unknown: indeterminate
  let bytes = 0;
  let tail = new Uint8Array(0);  // the last bytes received: where an error chunk would be
  const counted = response.body.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      bytes += chunk.byteLength;
      const joined = new Uint8Array(Math.min(4096, tail.length + chunk.byteLength));
      const kept = Math.max(0, joined.length - chunk.byteLength);
      joined.set(tail.subarray(tail.length - kept), 0);
      joined.set(chunk.subarray(Math.max(0, chunk.byteLength - joined.length)), kept);
      tail = joined;
      controller.enqueue(chunk);
    },
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
      const seconds = (performance.now() - started) / 1000;
      if (total) bar.value = Math.min(bytes, total);
      $("progress").textContent = `${(bytes / 1e6).toFixed(1)} MB${total ? ` of ${(total / 1e6).toFixed(1)} MB` : ""}, `
        + `${rows.toLocaleString()} rows, ${(bytes / 1e6 / Math.max(seconds, 0.001)).toFixed(1)} MB/s`;
    }
  } catch (error) {  // cancelled, or a stream cut short: no table that looks complete
    await db.query(`DROP TABLE IF EXISTS ${quoted(name)}`);
    if (signal.aborted) throw new Error(`cancelled: the load of ${name} stopped after ${rows.toLocaleString()} rows`);
    const reason = reasonIn(tail) || `the stream was cut (${error.message || error})`;
    throw new Error(`the stream of ${name} failed after ${rows.toLocaleString()} rows: ${reason}`);
  }
  if (total) bar.value = total;
}

async function run() {
  const result = await (await engine()).query($("sql").value);
  const fields = result.schema.fields;
  const names = fields.map((f) => f.name);
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
  await chart(fields, rows);
}

function shown(value) {
  return typeof value === "number" && !Number.isInteger(value) ? value.toFixed(2) : String(value);
}

function kindOf(field) {  // what a chart can do with a column, from its Arrow type
  const type = field.type;
  if (DataType.isTimestamp(type) || DataType.isDate(type)) return "time";
  if (DataType.isInt(type) || DataType.isFloat(type) || DataType.isDecimal(type)) return "number";
  if (DataType.isUtf8(type) || DataType.isLargeUtf8(type) || DataType.isBool(type) || DataType.isDictionary(type)) {
    return "category";
  }
  return "other";
}

// The chart a result's shape calls for, as a Vega-Lite spec (or null: the table alone): a line of a number over
// a time column; bars of a number per category (text, or a first integer column of distinct keys, as a
// GROUP BY gives); axes titled with the columns' names; tooltips.
function chartSpec(fields, rows) {
  if (fields.length < 2 || rows.length === 0) return null;
  const kinds = fields.map(kindOf);
  const y = fields.map((f, i) => [f, i]).reverse().find(([, i]) => i > 0 && kinds[i] === "number");
  if (!y) return null;
  const [x, xKind] = [fields[0], kinds[0]];
  const distinct = new Set(rows.map((r) => r[x.name])).size === rows.length;
  let mark, type;
  if (xKind === "time") [mark, type] = ["line", "temporal"];
  else if (xKind === "category" || (xKind === "number" && distinct && rows.length <= 50)) [mark, type] = ["bar", "ordinal"];
  else return null;
  const plain = (v) => (typeof v === "bigint" ? Number(v) : v instanceof Date ? v.toISOString() : v);
  const values = rows.map((r) => ({ [x.name]: plain(r[x.name]), [y[0].name]: plain(r[y[0].name]) }));
  return {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    data: { values }, mark: { type: mark, tooltip: true }, width: 560, height: 200,
    encoding: {
      x: { field: x.name, type, title: x.name, axis: type === "ordinal" ? { labelAngle: 0 } : {} },
      y: { field: y[0].name, type: "quantitative", title: y[0].name },
      tooltip: [{ field: x.name, type }, { field: y[0].name, type: "quantitative" }],
    },
  };
}

async function chart(fields, rows) {
  const spec = chartSpec(fields, rows);
  $("chart").replaceChildren();
  if (spec) await window.vegaEmbed($("chart"), spec, { renderer: "svg", actions: false });
}

$("list").addEventListener("click", step(listDatasets));
$("load").addEventListener("click", step(load));
$("cancel").addEventListener("click", () => loading && loading.abort());
$("run").addEventListener("click", step(run));
document.body.dataset.state = "ready";
