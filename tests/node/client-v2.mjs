#!/usr/bin/env node
// End-to-end driver for the MCP 2026-07-28 ("modern") generation: the official TypeScript SDK v2
// client (`@modelcontextprotocol/client`, automatic era negotiation) with the Tasks extension's
// requester API (`@modelcontextprotocol/ext-tasks/client`), against mcp-asyncify on stdio or over
// Streamable HTTP. Used by tests/modern_clients.rs.
//
//   node client-v2.mjs <scenario> <command> [args...]     (stdio: the client spawns the command)
//   node client-v2.mjs <scenario> http://127.0.0.1:PORT/mcp  (Streamable HTTP, e.g. the sidecar)
//
// Connects with `versionNegotiation: { mode: "auto" }`, runs the scenario, prints ONE JSON line of
// observations to stdout and exits 0. A failed expectation prints `FAIL: ...` to stderr, followed by
// every JSON-RPC message this client exchanged (and, over HTTP, every request's headers and status),
// and exits 1. Every step has a timeout and the whole run a watchdog, so nothing can hang.
//
// CLIENT_V2_WIRE=1 also dumps the wire log on success; CLIENT_V2_LENIENT_RESULT=1 accepts a task
// result without `resultType` (to look past that one incompatibility by hand; tests never set it).
//
// Scenarios: negotiate | list | fast | task | cancel | input | input-mrtr | cancel-input | undeclared
// (input expects the proxy to run with --task-after-ms 0, so that `ask` is a task before it asks.)
//
// The SDK's own request path rejects `resultType: "task"` (UnsupportedResultType), so ext-tasks needs
// the host's raw request path for tools/call and tasks/* on a 2026-07-28 connection (`rawDispatch`
// plus `v2RequestFraming`). `RawDispatcher` below is that host coordinator: it sends the framed
// request on the client's own transport under a string id of its own ("raw-N", which the SDK's
// numeric ids can never collide with) and takes the matching response off the transport before the
// SDK's Protocol sees it.

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client, ProtocolError, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import { Failure, expect, sleep, withTimeout } from "./scenario.mjs";
import { StdioClientTransport } from "@modelcontextprotocol/client/stdio";
import { createSessionPortFromClient, withTasks } from "@modelcontextprotocol/ext-tasks/client";
import { CallToolResultV2Schema } from "@modelcontextprotocol/ext-tasks/core/v2";

const STEP_TIMEOUT_MS = 20_000; // any single request
const SCENARIO_TIMEOUT_MS = 50_000; // the whole run
const MODERN_VERSION = "2026-07-28";
const TASKS_EXTENSION = "io.modelcontextprotocol/tasks";
const CLIENT_INFO = { name: "mcp-asyncify-ts-v2-e2e", version: "0.0.0" };
const CLIENT_CAPABILITIES = { elicitation: {} };


function textOf(result) {
  return (result?.content ?? [])
    .filter((c) => c.type === "text")
    .map((c) => c.text)
    .join("");
}

function errorInfo(e) {
  return {
    name: e?.constructor?.name ?? null,
    code: typeof e?.code === "number" ? e.code : null,
    message: String(e?.message ?? e),
    data: e?.data,
  };
}

// ---------------------------------------------------------------------------------------------
// The wire log: every JSON-RPC message in both directions on the session transport, and over HTTP
// every request's headers and the response status. Printed on failure.

const wire = [];
const t0 = Date.now();
const stamp = () => Date.now() - t0;

function logWire(dir, message) {
  wire.push({ t: stamp(), dir, message });
}

/** A fetch that records each HTTP exchange's method, headers, body and response status. */
function recordingFetch(baseFetch = fetch) {
  return async (url, init = {}) => {
    const headers = {};
    new Headers(init.headers ?? {}).forEach((v, k) => {
      headers[k] = k === "authorization" ? "<redacted>" : v;
    });
    const entry = { t: stamp(), dir: "http", method: init.method ?? "GET", headers, body: init.body ?? null };
    wire.push(entry);
    try {
      const response = await baseFetch(url, init);
      entry.status = response.status;
      entry.contentType = response.headers.get("content-type");
      if (!response.ok) {
        // Keep the error body for the log, and hand the SDK an identical response.
        const text = await response.text();
        entry.responseBody = text;
        return new Response(text, { status: response.status, statusText: response.statusText, headers: response.headers });
      }
      return response;
    } catch (e) {
      entry.fetchError = String(e?.message ?? e);
      throw e;
    }
  };
}

// ---------------------------------------------------------------------------------------------
// The host request coordinator for ext-tasks' V2 raw path.

class RawDispatcher {
  constructor(transport) {
    this.transport = transport;
    this.pending = new Map();
    this.next = 1;
    // Installed after connect(), i.e. after the SDK's Protocol took the transport's callbacks.
    const inner = transport.onmessage;
    transport.onmessage = (message, extra) => {
      logWire("in", message);
      const id = message?.id;
      if (typeof id === "string" && this.pending.has(id) && !("method" in message)) {
        const { resolve } = this.pending.get(id);
        this.pending.delete(id);
        resolve(message);
        return;
      }
      inner?.(message, extra);
    };
    const innerClose = transport.onclose;
    transport.onclose = () => {
      for (const { reject } of this.pending.values()) reject(new Error("transport closed"));
      this.pending.clear();
      innerClose?.();
    };
    const send = transport.send.bind(transport);
    transport.send = async (message, options) => {
      logWire("out", message);
      return send(message, options);
    };
    this.dispatch = this.dispatch.bind(this);
  }

  /** ext-tasks' RawClientDispatch: one request in, `{kind:"result"|"error"}` out. */
  async dispatch(request, options = {}) {
    const id = `raw-${this.next++}`;
    const message = { jsonrpc: "2.0", id, method: request.method, ...(request.params ? { params: request.params } : {}) };
    const timeoutMs = options.context?.requestTimeoutMs ?? STEP_TIMEOUT_MS;
    const response = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${request.method} (${id}): no response after ${timeoutMs} ms`));
      }, timeoutMs);
      const onAbort = () => {
        clearTimeout(timer);
        this.pending.delete(id);
        reject(options.signal.reason ?? new Error("aborted"));
      };
      if (options.signal?.aborted) return onAbort();
      options.signal?.addEventListener("abort", onAbort, { once: true });
      this.pending.set(id, {
        resolve: (m) => {
          clearTimeout(timer);
          options.signal?.removeEventListener("abort", onAbort);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          options.signal?.removeEventListener("abort", onAbort);
          reject(e);
        },
      });
      this.transport.send(message, options.context?.headers ? { headers: options.context.headers } : undefined).catch((e) => {
        const p = this.pending.get(id);
        this.pending.delete(id);
        p?.reject(e);
      });
    });
    if (response.error) return { kind: "error", error: response.error };
    return { kind: "result", result: response.result };
  }
}

// ---------------------------------------------------------------------------------------------

/** Deterministic answers to the proxy's input requests (the fixture's `ask` wants `answer`). */
function makeInputHandler(state) {
  return async (request, context) => {
    state.inputRequests.push({
      kind: request.kind,
      params: request.params,
      scope: context.scope,
      delivery: context.delivery,
      taskId: context.taskId ?? null,
      inputId: context.inputId ?? null,
    });
    if (request.kind === "elicitation") return { action: "accept", content: { answer: "yes" } };
    if (request.kind === "sampling") {
      return { role: "assistant", content: { type: "text", text: "stub reply" }, model: "e2e-stub-model" };
    }
    return { roots: [] };
  };
}

async function connect(target) {
  const state = { inputRequests: [], backgroundErrors: [] };
  const client = new Client(CLIENT_INFO, {
    capabilities: CLIENT_CAPABILITIES,
    versionNegotiation: { mode: "auto" },
  });
  // Legacy fallback would need an elicitation handler; a modern connection never calls it.
  client.setRequestHandler("elicitation/create", async () => ({ action: "accept", content: { answer: "legacy-path" } }));
  const http = /^https?:\/\//.test(target.command);
  const transport = http
    ? new StreamableHTTPClientTransport(new URL(target.command), { fetch: recordingFetch() })
    : new StdioClientTransport({ command: target.command, args: target.args, stderr: "inherit", env: isolatedEnv() });
  await withTimeout(client.connect(transport, { timeout: STEP_TIMEOUT_MS }), STEP_TIMEOUT_MS + 5_000, `connect to ${target.command}`);
  const raw = new RawDispatcher(transport);
  const negotiated = client.getNegotiatedProtocolVersion();
  const era = client.getProtocolEra();
  let port = null;
  let session = null;
  let portError = null;
  try {
    port = createSessionPortFromClient(client, "mcp-asyncify-e2e", {
      rawDispatch: raw.dispatch,
      v2RequestFraming: {
        protocolVersion: negotiated ?? MODERN_VERSION,
        clientInfo: CLIENT_INFO,
        clientCapabilities: CLIENT_CAPABILITIES,
      },
    });
    session = withTasks(port, {
      // A static (empty) declaration provider: without one the session lists the tools itself, and
      // a failing tools/list would then fail every call. The negotiate scenario checks tools/list.
      tools: { currentTool: () => undefined },
      onInputRequest: makeInputHandler(state),
      onError: (e) => state.backgroundErrors.push(String(e?.stack ?? e)),
    });
  } catch (e) {
    portError = errorInfo(e);
  }
  return { client, transport, http, raw, port, session, portError, era, negotiated, state };
}

function requireModernSession(c) {
  expect(c.era === "modern", "automatic negotiation chose the modern era", { era: c.era, negotiated: c.negotiated });
  expect(c.session, "ext-tasks session created", c.portError);
  expect(c.port.taskCapabilities.generation === "v2", "ext-tasks sees the Tasks extension (generation v2)", c.port.taskCapabilities);
}

/** The wire messages of one method (requests out, their responses in), in order. */
function exchanges(method) {
  const out = new Map();
  for (const { dir, message } of wire) {
    if (dir === "out" && message?.method === method && message.id !== undefined) out.set(message.id, { request: message, response: null });
    if (dir === "in" && message?.id !== undefined && !message.method && out.has(message.id)) out.get(message.id).response = message;
  }
  return [...out.values()];
}

function collectEvents(events) {
  return (event) => {
    if (event.type === "task") events.push({ type: "task", status: event.task.status, statusMessage: event.task.statusMessage ?? null });
    else events.push({ type: "outcome", status: event.outcome.status });
  };
}

function dedupe(list) {
  return list.filter((s, i) => i === 0 || s !== list[i - 1]);
}

/** The statuses tasks/get answered for one task, in order, without repeats. */
function polledStatuses(taskId) {
  return dedupe(
    exchanges("tasks/get")
      .filter((e) => e.request.params?.taskId === taskId && e.response?.result)
      .map((e) => e.response.result.status),
  );
}

/** JSON-RPC requests the server sent this client (2026-07-28 has no server-to-client requests). */
function serverRequests() {
  return wire.filter((w) => w.dir === "in" && w.message?.method && w.message.id !== undefined).map((w) => w.message);
}

/**
 * Why a task's outcome is not `completed` although tasks/get said so: ext-tasks validates the inlined
 * `result` with CallToolResultV2Schema, which requires `resultType` (every 2026-07-28 Result carries
 * it). Returns a sentence, or null.
 */
function explainOutcome(outcome, lastGetResult) {
  if (outcome.status !== "failed" || lastGetResult?.status !== "completed") return null;
  const result = lastGetResult.result;
  if (result && typeof result === "object" && !("resultType" in result)) {
    return 'tasks/get answered status "completed" with an inline `result` that has no `resultType` ' +
      '(2026-07-28: every Result carries resultType; ext-tasks validates it with CallToolResultV2Schema ' +
      `and fails the task with "${outcome.error?.message}")`;
  }
  return `tasks/get said completed, but ext-tasks failed the task: ${outcome.error?.message}`;
}

/**
 * The result codec of task-backed calls: ext-tasks' default (CallToolResultV2Schema, which wants
 * `resultType` in the result a DetailedTask inlines) unless CLIENT_V2_LENIENT_RESULT is set, when a
 * missing `resultType` is taken as "complete" (for looking past that one incompatibility by hand).
 */
function callOptions() {
  if (!process.env.CLIENT_V2_LENIENT_RESULT) return undefined;
  return {
    resultCodec: {
      parse(value) {
        const withType = value && typeof value === "object" && !("resultType" in value) ? { ...value, resultType: "complete" } : value;
        const r = CallToolResultV2Schema.safeParse(withType);
        return r.success ? { success: true, value: r.data } : { success: false, error: r.error };
      },
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Scenarios

async function scenarioNegotiate(c) {
  const discover = c.client.getDiscoverResult() ?? null;
  const obs = {
    era: c.era,
    protocolVersion: c.negotiated ?? null,
    supportedVersions: discover?.supportedVersions ?? null,
    tasksExtension: discover?.capabilities?.extensions?.[TASKS_EXTENSION] ?? null,
    legacyTasksCapability: discover?.capabilities?.tasks ?? null,
    serverInfo: c.client.getServerVersion() ?? null,
    generation: c.port?.taskCapabilities?.generation ?? null,
    sessionCapabilities: c.session?.capabilities ?? null,
    portError: c.portError,
    // Over HTTP, the probe exactly as sent (on stdio the SDK probes a sibling process we cannot see).
    probe: wire.find((w) => w.dir === "http" && w.headers?.["mcp-method"] === "server/discover") ?? null,
  };
  expect(obs.era === "modern", "negotiated the modern era", obs);
  expect(obs.protocolVersion === MODERN_VERSION, `negotiated ${MODERN_VERSION}`, obs);
  expect(obs.generation === "v2", "ext-tasks generation v2", obs);
  return obs;
}

/** tools/list through the SDK's own listTools (which validates the 2026-07-28 result schema). */
async function scenarioList(c) {
  expect(c.era === "modern", "modern era", { era: c.era });
  const obs = { toolsListError: null, tools: null };
  try {
    const tools = await withTimeout(c.client.listTools(), STEP_TIMEOUT_MS, "tools/list");
    obs.tools = tools.tools.map((t) => t.name).sort();
  } catch (e) {
    obs.toolsListError = errorInfo(e);
  }
  const listed = exchanges("tools/list").at(-1);
  obs.requestMeta = listed?.request?.params?._meta ?? null;
  const { tools: _omitted, ...rest } = listed?.response?.result ?? {};
  obs.resultWithoutTools = listed?.response ? rest : null;
  expect(
    obs.toolsListError === null,
    `tools/list through the SDK's listTools failed (result fields besides tools: ${JSON.stringify(obs.resultWithoutTools)})`,
    obs,
  );
  return obs;
}

async function scenarioFast(c) {
  requireModernSession(c);
  const started = Date.now();
  const execution = await withTimeout(c.session.callTool("echo", { text: "hello modern" }, callOptions()), STEP_TIMEOUT_MS, "callTool echo");
  const { outcome } = await withTimeout(execution.settle(), STEP_TIMEOUT_MS, "settle echo");
  const call = exchanges("tools/call").at(-1);
  const obs = {
    kind: execution.kind,
    outcome: outcome.status,
    text: outcome.status === "completed" ? textOf(outcome.result) : null,
    elapsedMs: Date.now() - started,
    wireResultType: call?.response?.result?.resultType ?? null,
    wireTaskId: call?.response?.result?.taskId ?? null,
    declaredExtension: call?.request?.params?._meta?.["io.modelcontextprotocol/clientCapabilities"]?.extensions?.[TASKS_EXTENSION] ?? null,
    tasksGets: exchanges("tasks/get").length,
  };
  // The SDK's own callTool (no ext-tasks, so no extension declared): a plain inline result.
  const plain = await withTimeout(c.client.callTool({ name: "echo", arguments: { text: "plain sdk" } }), STEP_TIMEOUT_MS, "client.callTool echo");
  obs.sdkCallTool = { text: textOf(plain), isError: plain.isError ?? false };
  expect(obs.kind === "immediate", "echo answered inline (no task)", obs);
  expect(obs.text === "hello modern", "echo text", obs);
  expect(obs.wireResultType === "complete", "echo: resultType complete on the wire", obs);
  return obs;
}

async function scenarioTask(c) {
  requireModernSession(c);
  const started = Date.now();
  const execution = await withTimeout(
    c.session.callTool("slow", { ms: 3000, text: "slow done" }, callOptions()),
    STEP_TIMEOUT_MS,
    "callTool slow",
  );
  const answeredAfterMs = Date.now() - started;
  const created = exchanges("tools/call").at(-1)?.response?.result ?? null;
  const events = [];
  const { outcome, lastTask } = await withTimeout(
    execution.settle({ onEvent: collectEvents(events) }),
    STEP_TIMEOUT_MS,
    "settle slow",
  );
  const taskId = execution.handle?.taskId ?? null;
  const lastGet = exchanges("tasks/get").filter((e) => e.request.params?.taskId === taskId).at(-1);
  const obs = {
    kind: execution.kind,
    taskId,
    answeredAfterMs,
    created,
    events,
    statuses: dedupe(events.filter((e) => e.type === "task").map((e) => e.status)),
    polledStatuses: polledStatuses(taskId),
    outcome: outcome.status,
    text: outcome.status === "completed" ? textOf(outcome.result) : null,
    failure: outcome.status === "failed" ? errorInfo(outcome.error) : null,
    lastTaskStatus: lastTask?.status ?? null,
    lastGetResult: lastGet?.response?.result ?? null,
    tasksGetHeaders: c.http ? httpHeadersOf("tasks/get") : null,
    elapsedMs: Date.now() - started,
    backgroundErrors: c.state.backgroundErrors,
  };
  obs.explanation = explainOutcome(outcome, obs.lastGetResult);
  expect(obs.kind === "task", "slow became a task", obs);
  expect(obs.created?.resultType === "task", "CreateTaskResult has resultType task", obs);
  expect(obs.outcome === "completed", `slow task completed${obs.explanation ? ` — ${obs.explanation}` : ""}`, obs);
  expect(obs.text === "slow done", "slow task result text", obs);
  return obs;
}

/** The headers of the last HTTP POST carrying `method`. */
function httpHeadersOf(method) {
  const entry = wire.filter((w) => w.dir === "http" && typeof w.body === "string" && w.body.includes(`"method":"${method}"`)).at(-1);
  if (!entry) return null;
  const { "mcp-method": m, "mcp-name": n, "mcp-protocol-version": v } = entry.headers;
  return { "mcp-method": m ?? null, "mcp-name": n ?? null, "mcp-protocol-version": v ?? null, status: entry.status ?? null };
}

async function scenarioCancel(c) {
  requireModernSession(c);
  const before = textOf(await c.client.callTool({ name: "cancelled", arguments: {} }));
  const execution = await withTimeout(c.session.callTool("slow", { ms: 15_000, text: "should not finish" }, callOptions()), STEP_TIMEOUT_MS, "callTool slow");
  expect(execution.kind === "task", "slow (15 s) became a task", { kind: execution.kind });
  const taskId = execution.handle.taskId;
  const events = [];
  const settled = execution.settle({ onEvent: collectEvents(events) });
  await sleep(300);
  let cancelError = null;
  try {
    await withTimeout(execution.cancel(), STEP_TIMEOUT_MS, "execution.cancel");
  } catch (e) {
    cancelError = errorInfo(e);
  }
  const { outcome } = await withTimeout(settled, STEP_TIMEOUT_MS, "settle cancelled task");
  // A fresh look through a non-owning controller.
  const snapshot = await withTimeout(c.session.task(taskId).snapshot(), STEP_TIMEOUT_MS, "tasks/get after cancel");
  // The upstream call was cancelled too (the fixture counts notifications/cancelled).
  let after = before;
  for (let i = 0; i < 50 && after === before; i++) {
    await sleep(100);
    after = textOf(await c.client.callTool({ name: "cancelled", arguments: {} }));
  }
  const cancel = exchanges("tasks/cancel").at(-1);
  const obs = {
    kind: execution.kind,
    taskId,
    cancelError,
    cancelResponse: cancel?.response ?? null,
    events,
    outcome: outcome.status,
    snapshotStatus: snapshot.status,
    polledStatuses: polledStatuses(taskId),
    upstreamCancellationsBefore: Number(before),
    upstreamCancellationsAfter: Number(after),
    tasksCancelHeaders: c.http ? httpHeadersOf("tasks/cancel") : null,
    backgroundErrors: c.state.backgroundErrors,
  };
  expect(cancelError === null, "tasks/cancel succeeded", obs);
  expect(obs.cancelResponse?.result?.resultType === "complete", "tasks/cancel acknowledged with resultType complete", obs);
  expect(obs.outcome === "cancelled", "the task ended cancelled", obs);
  expect(obs.snapshotStatus === "cancelled", "tasks/get says cancelled", obs);
  return obs;
}

/** Calls `ask` through ext-tasks and answers its elicitation; returns the observations. */
async function askThroughTask(c, { settleTimeoutMs = STEP_TIMEOUT_MS } = {}) {
  const started = Date.now();
  const requestsBefore = serverRequests().length;
  const handledBefore = c.state.inputRequests.length;
  const callsBefore = exchanges("tools/call").length;
  const execution = await withTimeout(c.session.callTool("ask", { message: "Continue?" }, callOptions()), STEP_TIMEOUT_MS, "callTool ask");
  const created = exchanges("tools/call").at(-1)?.response?.result ?? null;
  const taskId = execution.handle?.taskId ?? null;
  const events = [];
  let outcome = null;
  let settleError = null;
  try {
    ({ outcome } = await withTimeout(execution.settle({ onEvent: collectEvents(events) }), settleTimeoutMs, "settle ask"));
  } catch (e) {
    settleError = errorInfo(e);
  }
  const gets = exchanges("tasks/get").filter((e) => e.request.params?.taskId === taskId);
  const inputGet = gets.find((e) => e.response?.result?.status === "input_required");
  const lastGet = gets.at(-1);
  const update = exchanges("tasks/update").filter((e) => e.request.params?.taskId === taskId).at(-1);
  const calls = exchanges("tools/call").slice(callsBefore);
  const obs = {
    kind: execution.kind,
    // Every tools/call of this ask on the wire: the params beyond name/arguments/_meta, and the result.
    calls: calls.map((e) => {
      const { name: _n, arguments: _a, _meta: _m, ...extra } = e.request.params ?? {};
      return { extra, result: e.response?.result ?? null, error: e.response?.error ?? null };
    }),
    taskId,
    created,
    events,
    statuses: dedupe(events.filter((e) => e.type === "task").map((e) => e.status)),
    polledStatuses: polledStatuses(taskId),
    inputRequestsOnWire: inputGet?.response?.result?.inputRequests ?? null,
    handled: c.state.inputRequests.slice(handledBefore),
    update: update ? { params: update.request.params, response: update.response } : null,
    serverRequests: serverRequests().slice(requestsBefore),
    settleError,
    outcome: outcome?.status ?? null,
    text: outcome?.status === "completed" ? textOf(outcome.result) : null,
    failure: outcome?.status === "failed" ? errorInfo(outcome.error) : null,
    lastGetResult: lastGet?.response?.result ?? null,
    tasksUpdateHeaders: c.http ? httpHeadersOf("tasks/update") : null,
    elapsedMs: Date.now() - started,
    backgroundErrors: c.state.backgroundErrors,
  };
  obs.explanation = outcome ? explainOutcome(outcome, obs.lastGetResult) : null;
  return obs;
}

/**
 * Expectations on one `ask`. `via`: "task" (the call became a task that went input_required and was
 * answered with tasks/update), "mrtr" (answered inline: an input_required result, then a retry with
 * inputResponses), or "any" (either).
 */
function expectAskAnswered(obs, via) {
  const stray = obs.serverRequests[0];
  expect(
    !stray,
    stray
      ? `the upstream's ${stray.method} reached this 2026-07-28 client as a JSON-RPC request (id ${JSON.stringify(stray.id)}) ` +
          "instead of as inputRequests (of an input_required result or of the task); the ask was never answered"
      : "",
    obs,
  );
  if (via === "task") {
    expect(obs.kind === "task", "ask became a task", obs);
    expect(obs.polledStatuses.includes("input_required"), "tasks/get showed input_required", obs);
    expect(obs.handled.length === 1 && obs.handled[0].delivery === "task-update", "one elicitation reached the input handler for tasks/update", obs);
    expect(obs.update?.response?.result?.resultType === "complete", "tasks/update acknowledged with resultType complete", obs);
  }
  if (via === "mrtr") {
    expect(obs.kind === "immediate", "ask answered inline (no task)", obs);
    expect(obs.calls.length === 2, "two tools/call rounds", obs);
    expect(obs.calls[0].result?.resultType === "input_required", "round 1: resultType input_required", obs);
    expect(obs.calls[1].extra?.inputResponses && obs.calls[1].extra?.requestState === obs.calls[0].result?.requestState, "round 2: inputResponses and the requestState echoed", obs);
    expect(obs.handled.length === 1 && obs.handled[0].delivery === "request-retry", "one elicitation reached the input handler for the retry", obs);
  }
  expect(obs.handled.length === 1 && obs.handled[0].kind === "elicitation", "one elicitation reached the ext-tasks input handler", obs);
  expect(obs.settleError === null, "the ask settled", obs);
  expect(
    obs.outcome === "completed" && obs.text === "answer: yes",
    `ask completed with the answer${obs.explanation ? ` — ${obs.explanation}` : ""}`,
    obs,
  );
}

/** Run the proxy with --task-after-ms 0, so that `ask` is a task before it asks. */
async function scenarioInput(c) {
  requireModernSession(c);
  const obs = await askThroughTask(c);
  expectAskAnswered(obs, "task");
  return obs;
}

/** Default --task-after-ms: `ask` asks inside its task window and is answered by a retry. */
async function scenarioInputMrtr(c) {
  requireModernSession(c);
  const obs = await askThroughTask(c);
  expectAskAnswered(obs, "mrtr");
  return obs;
}

/** A cancelled task, then `ask` in the same session: the ask must still reach this client properly. */
async function scenarioCancelInput(c) {
  requireModernSession(c);
  const execution = await withTimeout(c.session.callTool("slow", { ms: 15_000, text: "should not finish" }, callOptions()), STEP_TIMEOUT_MS, "callTool slow");
  expect(execution.kind === "task", "slow (15 s) became a task", { kind: execution.kind });
  const settled = execution.settle();
  await withTimeout(execution.cancel(), STEP_TIMEOUT_MS, "execution.cancel");
  const { outcome } = await withTimeout(settled, STEP_TIMEOUT_MS, "settle cancelled task");
  expect(outcome.status === "cancelled", "the first task ended cancelled", outcome);
  const ask = await askThroughTask(c, { settleTimeoutMs: 8_000 });
  const obs = { cancelled: { taskId: execution.handle.taskId, outcome: outcome.status }, ask };
  expectAskAnswered(ask, "any");
  return obs;
}

/** A slow call without the extension declared (the SDK's own callTool): inline after it ends. */
async function scenarioUndeclared(c) {
  expect(c.era === "modern", "modern era", { era: c.era });
  const started = Date.now();
  const r = await withTimeout(c.client.callTool({ name: "slow", arguments: { ms: 1500, text: "inline slow" } }), STEP_TIMEOUT_MS, "client.callTool slow");
  const call = exchanges("tools/call").at(-1);
  const obs = {
    text: textOf(r),
    elapsedMs: Date.now() - started,
    wireResultType: call?.response?.result?.resultType ?? null,
    declaredExtension: call?.request?.params?._meta?.["io.modelcontextprotocol/clientCapabilities"]?.extensions?.[TASKS_EXTENSION] ?? null,
  };
  expect(obs.text === "inline slow", "slow answered inline", obs);
  return obs;
}

const SCENARIOS = {
  negotiate: scenarioNegotiate,
  list: scenarioList,
  fast: scenarioFast,
  task: scenarioTask,
  cancel: scenarioCancel,
  input: scenarioInput,
  "input-mrtr": scenarioInputMrtr,
  "cancel-input": scenarioCancelInput,
  undeclared: scenarioUndeclared,
};

async function main() {
  const [scenarioName, command, ...args] = process.argv.slice(2);
  const scenario = SCENARIOS[scenarioName];
  if (!scenario || !command) {
    process.stderr.write(`usage: node client-v2.mjs <${Object.keys(SCENARIOS).join("|")}> <command> [args...] | <http url>\n`);
    process.exit(2);
  }
  const dumpWire = () => {
    process.stderr.write(`--- wire (${wire.length} entries) ---\n`);
    for (const w of wire) process.stderr.write(JSON.stringify(w) + "\n");
    process.stderr.write("--- end wire ---\n");
  };
  const watchdog = setTimeout(() => {
    process.stderr.write(`FAIL [${scenarioName}]: scenario timed out after ${SCENARIO_TIMEOUT_MS} ms\n`);
    dumpWire();
    process.exit(1);
  }, SCENARIO_TIMEOUT_MS);
  let c;
  try {
    c = await connect({ command, args });
    const observations = await scenario(c);
    observations.transport = c.http ? "http" : "stdio";
    process.stdout.write(JSON.stringify(observations) + "\n");
    if (process.env.CLIENT_V2_WIRE) dumpWire();
    await withTimeout(c.session?.close() ?? Promise.resolve(), 5_000, "session close").catch(() => {});
    await withTimeout(c.client.close(), 5_000, "close").catch(() => {});
    clearTimeout(watchdog);
    process.exit(0);
  } catch (e) {
    const detail = e instanceof Failure ? e.message : `${e?.stack ?? e}${e instanceof ProtocolError ? ` (code ${e.code}, data ${JSON.stringify(e.data)})` : ""}`;
    process.stderr.write(`FAIL [${scenarioName}]: ${detail}\n`);
    dumpWire();
    if (c) await withTimeout(c.client.close(), 2_000, "close").catch(() => {});
    process.exit(1);
  }
}

await main();

// The SDK passes a child only a few safe variables by default: give the proxy the whole environment
// and a fresh data directory of its own, so a test never writes into the real user's data directory
// (the stdio wrapper's default task store lives there) nor shares tasks with another test.
function isolatedEnv() {
  const dir = mkdtempSync(join(tmpdir(), "asyncify-node-data-"));
  return { ...process.env, MCP_ASYNCIFY_DATA_DIR: dir };
}
