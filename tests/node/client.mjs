#!/usr/bin/env node
// End-to-end driver: the official TypeScript MCP SDK client against an MCP server on stdio
// (directly, or through mcp-asyncify). Used by tests/typescript_sdk.rs.
//
//   node client.mjs <scenario> <command> [args...]
//
// Spawns `<command> [args...]` with the SDK's StdioClientTransport (stderr inherited), connects a
// Client, runs the scenario, prints ONE JSON line of observations to stdout and exits 0. A failed
// expectation prints `FAIL: ...` to stderr and exits 1. Every step has a timeout, and the whole
// scenario has a watchdog, so nothing can hang.
//
// Scenarios: everything | everything-tasks | fixture-tasks | notion-tasks

import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { Failure, expect, sleep, withTimeout } from "./scenario.mjs";
import { StdioClientTransport } from "@modelcontextprotocol/sdk/client/stdio.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import {
  CallToolResultSchema,
  CreateMessageRequestSchema,
  CreateTaskResultSchema,
  ElicitRequestSchema,
  LoggingMessageNotificationSchema,
  McpError,
} from "@modelcontextprotocol/sdk/types.js";

const STEP_TIMEOUT_MS = 20_000; // any single request
const SCENARIO_TIMEOUT_MS = 50_000; // the whole run


const reqOpts = (extra = {}) => ({ timeout: STEP_TIMEOUT_MS, ...extra });

/** A JSON-RPC error as plain data (McpError or anything else thrown). */
function errorInfo(e) {
  if (e instanceof McpError) return { code: e.code, message: e.message, data: e.data };
  return { code: null, message: String(e?.message ?? e) };
}

/** Awaits `promise`, expecting it to reject; returns the error as plain data. */
async function expectError(promise, label) {
  try {
    const value = await withTimeout(promise, STEP_TIMEOUT_MS, label);
    throw new Failure(`${label}: expected an error, got ${JSON.stringify(value)}`);
  } catch (e) {
    if (e instanceof Failure) throw e;
    return errorInfo(e);
  }
}

function textOf(result) {
  return (result?.content ?? [])
    .filter((c) => c.type === "text")
    .map((c) => c.text)
    .join("");
}

// ---------------------------------------------------------------------------------------------
// Client-side request handlers (elicitation, sampling), deterministic so runs compare equal.

/** A value for one property of a form elicitation's requestedSchema. */
function sampleFormValue(name, prop, answers) {
  if (answers && name in answers) return answers[name];
  if (prop.default !== undefined) return prop.default;
  if (Array.isArray(prop.enum) && prop.enum.length) return prop.enum[0];
  if (Array.isArray(prop.oneOf) && prop.oneOf.length) return prop.oneOf[0].const;
  if (Array.isArray(prop.anyOf) && prop.anyOf.length) return prop.anyOf[0].const;
  switch (prop.type) {
    case "boolean":
      return true;
    case "integer":
      return prop.minimum ?? 1;
    case "number":
      return prop.minimum ?? 1.5;
    case "array": {
      const items = prop.items ?? {};
      const first = items.enum?.[0] ?? items.anyOf?.[0]?.const ?? "a";
      return [first];
    }
    default:
      switch (prop.format) {
        case "email":
          return "e2e@example.com";
        case "uri":
          return "https://example.com/e2e";
        case "date":
          return "2024-01-02";
        case "date-time":
          return "2024-01-02T03:04:05Z";
        default:
          return "e2e answer";
      }
  }
}

function installHandlers(client, state, answers) {
  client.setRequestHandler(ElicitRequestSchema, async (request) => {
    state.elicitations.push(request.params);
    const schema = request.params.requestedSchema ?? { properties: {} };
    const content = {};
    for (const [name, prop] of Object.entries(schema.properties ?? {})) {
      content[name] = sampleFormValue(name, prop, answers);
    }
    return { action: "accept", content };
  });
  client.setRequestHandler(CreateMessageRequestSchema, async (request) => {
    state.samplings.push(request.params);
    const prompt = request.params.messages
      .map((m) => (m.content?.type === "text" ? m.content.text : ""))
      .join(" ");
    return {
      role: "assistant",
      content: { type: "text", text: `stub reply to: ${prompt}` },
      model: "e2e-stub-model",
      stopReason: "endTurn",
    };
  });
  client.setNotificationHandler(LoggingMessageNotificationSchema, () => {
    state.logMessages += 1;
  });
}

async function connect(command, args, answers) {
  const state = { elicitations: [], samplings: [], logMessages: 0 };
  const client = new Client(
    { name: "mcp-asyncify-ts-e2e", version: "0.0.0" },
    { capabilities: { elicitation: {}, sampling: {} } },
  );
  installHandlers(client, state, answers);
  // `http://…` instead of a command: the Streamable HTTP transport to that URL (the sidecar).
  const transport = /^https?:\/\//.test(command)
    ? new StreamableHTTPClientTransport(new URL(command), {
        requestInit: process.env.MCP_AUTHORIZATION
          ? { headers: { Authorization: process.env.MCP_AUTHORIZATION } }
          : undefined,
      })
    : new StdioClientTransport({ command, args, stderr: "inherit", env: isolatedEnv() });
  await withTimeout(client.connect(transport, reqOpts()), STEP_TIMEOUT_MS, `connect to ${command}`);
  // A tap on the wire: every notifications/progress as it arrives. The SDK's Protocol runs
  // notification handlers in a later microtask but responses at once, so an `onprogress` callback
  // misses a progress notification that arrives in the same read as its response (the handler is
  // gone by then; seen with server-everything directly, no proxy involved). The tap runs before
  // the Protocol sees the message, so it counts exactly what the server sent, in order.
  state.wireProgress = [];
  const onmessage = transport.onmessage;
  transport.onmessage = (message, extra) => {
    if (message?.method === "notifications/progress") state.wireProgress.push(message.params);
    onmessage?.(message, extra);
  };
  return { client, state };
}

async function listAllTools(client) {
  const tools = [];
  let cursor;
  for (let page = 0; page < 100; page++) {
    const r = await client.listTools(cursor ? { cursor } : undefined, reqOpts());
    tools.push(...r.tools);
    cursor = r.nextCursor;
    if (!cursor) return tools;
  }
  throw new Failure("tools/list: more than 100 pages");
}

async function listAllTasks(client) {
  const tasks = [];
  let cursor;
  for (let page = 0; page < 100; page++) {
    const r = await client.experimental.tasks.listTasks(cursor, reqOpts());
    tasks.push(...r.tasks);
    cursor = r.nextCursor;
    if (!cursor) return tasks;
  }
  throw new Failure("tasks/list: more than 100 pages");
}

/**
 * Runs callToolStream to its end, recording every message. `taskOpts` defaults to asking for a
 * task explicitly. Returns { types, messages, taskId, result, error, statuses }.
 */
async function runStream(client, params, { task = { ttl: 60_000 }, label, timeoutMs } = {}) {
  const run = async () => {
    const out = { types: [], statuses: [], statusMessages: [], taskId: null, result: null, error: null };
    const stream = client.experimental.tasks.callToolStream(
      params,
      CallToolResultSchema,
      reqOpts(task ? { task } : {}),
    );
    for await (const m of stream) {
      out.types.push(m.type);
      if (m.type === "taskCreated") out.taskId = m.task.taskId;
      if (m.type === "taskStatus") {
        out.statuses.push(m.task.status);
        if (m.task.statusMessage) out.statusMessages.push(m.task.statusMessage);
      }
      if (m.type === "result") out.result = m.result;
      if (m.type === "error") out.error = errorInfo(m.error);
    }
    return out;
  };
  return withTimeout(run(), timeoutMs ?? STEP_TIMEOUT_MS, label ?? `callToolStream ${params.name}`);
}

/** Polls tasks/get every `everyMs` until the task is terminal; collects statuses/messages seen. */
async function watchTask(client, taskId, { everyMs = 100, timeoutMs = STEP_TIMEOUT_MS } = {}) {
  const seen = { statuses: [], statusMessages: [] };
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const t = await client.experimental.tasks.getTask(taskId, reqOpts());
    if (seen.statuses.at(-1) !== t.status) seen.statuses.push(t.status);
    if (t.statusMessage && seen.statusMessages.at(-1) !== t.statusMessage) {
      seen.statusMessages.push(t.statusMessage);
    }
    if (["completed", "failed", "cancelled"].includes(t.status)) return seen;
    await sleep(everyMs);
  }
  throw new Failure(`task ${taskId} not terminal after ${timeoutMs} ms: ${JSON.stringify(seen)}`);
}

// ---------------------------------------------------------------------------------------------
// Scenario: everything (compare direct vs. through the proxy)

// Tools not called, with the reason (reported in the output).
const EVERYTHING_SKIP = {
  // taskSupport "required": a 4-stage, ~4 s task; exercised by the everything-tasks scenario.
  "simulate-research-query": "task-required, ~4 s; covered by everything-tasks",
  // Only registered with client tasks.requests.* capabilities (we do not declare them); they would
  // poll the client every 1 s.
  "trigger-sampling-request-async": "needs client-side tasks; polls every 1 s",
  "trigger-elicitation-request-async": "needs client-side tasks; polls every 1 s",
  // Only registered with elicitation.url capability (not declared); it would hand out URLs.
  "trigger-url-elicitation": "needs URL elicitation",
  // Only registered with the roots capability (not declared).
  "get-roots-list": "needs roots",
};

// Known tools of server-everything, with harmless arguments. Anything else gets arguments made
// from its inputSchema (required properties only).
const EVERYTHING_ARGS = {
  echo: { message: "hello from the TypeScript SDK" },
  "get-annotated-message": { messageType: "error", includeImage: true },
  "get-env": {},
  "get-resource-links": { count: 3 },
  "get-resource-reference": { resourceType: "Text", resourceId: 7 },
  "get-structured-content": { location: "New York" },
  "get-sum": { a: 19, b: 23 },
  "get-tiny-image": {},
  // A data: URL, so nothing is fetched from the network (the default is a GitHub URL).
  "gzip-file-as-resource": {
    name: "hello.txt.gz",
    data: "data:text/plain;base64," + Buffer.from("hello, gzip\n".repeat(20)).toString("base64"),
    outputType: "resource",
  },
  "toggle-simulated-logging": {},
  "toggle-subscriber-updates": {},
  // 0.3 s in 3 steps (the default is 10 s).
  "trigger-long-running-operation": { duration: 0.3, steps: 3 },
  "trigger-elicitation-request": {},
  "trigger-sampling-request": { prompt: "Say hi", maxTokens: 20 },
};

// Toggles are called twice (on, then off) so the server does not keep emitting.
const TOGGLES = new Set(["toggle-simulated-logging", "toggle-subscriber-updates"]);

function argsFromSchema(schema) {
  const args = {};
  const props = schema?.properties ?? {};
  for (const name of schema?.required ?? []) {
    const p = props[name] ?? {};
    if (p.default !== undefined) args[name] = p.default;
    else if (Array.isArray(p.enum)) args[name] = p.enum[0];
    else if (p.type === "number" || p.type === "integer") args[name] = 1;
    else if (p.type === "boolean") args[name] = true;
    else if (p.type === "array") args[name] = [];
    else if (p.type === "object") args[name] = {};
    else args[name] = "sample";
  }
  return args;
}

function stripExecution(tool) {
  const { execution, ...rest } = tool;
  return rest;
}

// Normalisation of results, so a direct run and a proxied run compare equal:
// - get-env returns the server process's whole environment. The environment differs between the
//   two runs only by what sits between client and server, so it is reduced to the sorted list of
//   its variable NAMES minus a few known to differ (none expected today; see ENV_VOLATILE).
// - Everything else server-everything returns is deterministic (no timestamps, ids or random
//   values reach these results: session resource URIs carry no session id on stdio, gzip output
//   has a zero mtime), so it is compared as is.
const ENV_VOLATILE = new Set(["_", "OLDPWD", "SHLVL"]);

// Dynamic resources (get-resource-reference) embed `created at <local time>`, in text or in a
// base64 blob: the time is replaced by `<time>` (a blob by its decoded, normalised text).
const CREATED_AT = /created at \d{1,2}:\d{2}:\d{2}(\s?[AP]M)?/g;

function stripTimes(value) {
  if (typeof value === "string") return value.replace(CREATED_AT, "created at <time>");
  if (Array.isArray(value)) return value.map(stripTimes);
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) {
      if (k === "blob" && typeof v === "string") {
        const decoded = Buffer.from(v, "base64").toString("utf8");
        out[k] = CREATED_AT.test(decoded) ? `<base64 of: ${stripTimes(decoded)}>` : v;
        CREATED_AT.lastIndex = 0;
      } else {
        out[k] = stripTimes(v);
      }
    }
    return out;
  }
  return value;
}

function normaliseResult(name, result) {
  result = stripTimes(result);
  if (name === "get-env") {
    const env = JSON.parse(textOf(result));
    return {
      ...result,
      content: [{ type: "text", text: "<env names>" }],
      envNames: Object.keys(env).filter((k) => !ENV_VOLATILE.has(k)).sort(),
    };
  }
  return result;
}

async function scenarioEverything(client, state) {
  const tools = await listAllTools(client);
  const calls = {};
  const skipped = {};
  for (const tool of [...tools].sort((a, b) => a.name.localeCompare(b.name))) {
    if (tool.name in EVERYTHING_SKIP) {
      skipped[tool.name] = EVERYTHING_SKIP[tool.name];
      continue;
    }
    if (tool.execution?.taskSupport === "required") {
      skipped[tool.name] = "task-required";
      continue;
    }
    const args = EVERYTHING_ARGS[tool.name] ?? argsFromSchema(tool.inputSchema);
    const call = async () => {
      const before = state.wireProgress.length;
      const opts = reqOpts({ onprogress: () => {} });
      const r = await client.callTool({ name: tool.name, arguments: args }, CallToolResultSchema, opts);
      const out = normaliseResult(tool.name, r);
      // The token is the client's request id; only progress/total/message are compared.
      const progress = state.wireProgress.slice(before).map(({ progressToken, ...p }) => p);
      if (progress.length) out.progressSeen = progress;
      return out;
    };
    try {
      if (TOGGLES.has(tool.name)) {
        calls[tool.name] = [await call(), await call()];
      } else {
        calls[tool.name] = await call();
      }
    } catch (e) {
      calls[tool.name] = { error: errorInfo(e) };
    }
  }
  expect(tools.length >= 10, "server-everything lists at least 10 tools", tools.map((t) => t.name));
  expect(textOf(calls.echo).includes("hello from the TypeScript SDK"), "echo echoes", calls.echo);
  expect(textOf(calls["get-sum"]).includes("42"), "get-sum adds 19 + 23", calls["get-sum"]);
  expect(!calls["trigger-sampling-request"]?.error, "sampling round-trips", calls["trigger-sampling-request"]);
  expect(state.samplings.length === 1, "one sampling request reached the client", state.samplings.length);
  expect(state.elicitations.length === 1, "one elicitation reached the client", state.elicitations.length);
  expect(
    (calls["trigger-long-running-operation"]?.progressSeen ?? []).length === 3,
    "trigger-long-running-operation sends 3 progress notifications",
    calls["trigger-long-running-operation"],
  );
  for (const [name, r] of Object.entries(calls)) {
    expect(!r.error, `tool ${name} answered without a JSON-RPC error`, r);
  }
  return {
    tools: tools.map(stripExecution).sort((a, b) => a.name.localeCompare(b.name)),
    calls,
    skipped,
    taskSupport: Object.fromEntries(tools.map((t) => [t.name, t.execution?.taskSupport ?? null])),
    serverCapabilities: client.getServerCapabilities(),
  };
}

// ---------------------------------------------------------------------------------------------
// Scenario: everything-tasks (server-everything's own task tool, through the proxy)

async function scenarioEverythingTasks(client, state) {
  const caps = client.getServerCapabilities();
  expect(caps?.tasks?.requests?.tools?.call, "capabilities.tasks.requests.tools.call advertised", caps);
  const tools = await listAllTools(client);
  const taskSupport = Object.fromEntries(tools.map((t) => [t.name, t.execution?.taskSupport ?? null]));
  const nativeTaskTools = tools.filter((t) => t.execution?.taskSupport === "required").map((t) => t.name);
  expect(
    taskSupport["simulate-research-query"] === "required",
    "simulate-research-query keeps its own taskSupport 'required'",
    taskSupport,
  );

  // The plain run, and the ambiguous one (input_required → elicitation through tasks/result).
  const [plain, ambiguous] = await Promise.all([
    runStream(
      client,
      { name: "simulate-research-query", arguments: { topic: "rust async", ambiguous: false } },
      { task: { ttl: 60_000 }, timeoutMs: 20_000 },
    ),
    runStream(
      client,
      { name: "simulate-research-query", arguments: { topic: "python", ambiguous: true } },
      { task: { ttl: 60_000 }, timeoutMs: 20_000 },
    ),
  ]);

  for (const [label, run] of [["plain", plain], ["ambiguous", ambiguous]]) {
    expect(run.types[0] === "taskCreated", `${label}: first message is taskCreated`, run);
    expect(run.types.at(-1) === "result", `${label}: stream ends with a result`, run);
    // server-everything's InMemoryTaskStore ids: randomBytes(16).toString('hex'); the proxy's own
    // are UUIDs. A 32-hex-digit id means the proxy passed the native task through.
    expect(/^[0-9a-f]{32}$/.test(run.taskId ?? ""), `${label}: task id is server-everything's (32 hex)`, run.taskId);
  }
  expect(textOf(plain.result).includes("# Research Report: rust async"), "plain: research report", plain.result);
  expect(
    textOf(ambiguous.result).includes("Research Report: python (programming)"),
    "ambiguous: report uses the elicited interpretation",
    textOf(ambiguous.result).slice(0, 200),
  );
  expect(state.elicitations.length === 1, "ambiguous: one elicitation reached the client", state.elicitations);

  const got = await client.experimental.tasks.getTask(plain.taskId, reqOpts());
  expect(got.status === "completed", "tasks/get after the end says completed", got);
  const listed = await listAllTasks(client);
  const listedIds = listed.map((t) => t.taskId);
  expect(listedIds.includes(plain.taskId), "tasks/list includes the native task", listedIds);

  return {
    nativeTaskTools,
    taskSupport,
    plain: { types: plain.types, statuses: plain.statuses, statusMessages: plain.statusMessages, taskId: plain.taskId, text: textOf(plain.result).split("\n")[0] },
    ambiguous: {
      types: ambiguous.types,
      statuses: ambiguous.statuses,
      statusMessages: ambiguous.statusMessages,
      taskId: ambiguous.taskId,
      text: textOf(ambiguous.result).split("\n")[0],
      elicitation: state.elicitations[0]?.message,
    },
    getTask: got,
    listedTaskIds: listedIds,
  };
}

// ---------------------------------------------------------------------------------------------
// Scenario: fixture-tasks (our rmcp fixture through the proxy)

const INVALID_PARAMS = -32602;

async function scenarioFixtureTasks(client, state) {
  const obs = {};
  const caps = client.getServerCapabilities();
  obs.capabilitiesTasks = caps?.tasks ?? null;
  expect(caps?.tasks, "initialize advertises capabilities.tasks", caps);
  expect(caps.tasks.requests?.tools?.call, "capabilities.tasks.requests.tools.call", caps.tasks);

  const tools = await listAllTools(client);
  obs.taskSupport = Object.fromEntries(tools.map((t) => [t.name, t.execution?.taskSupport ?? null]));
  for (const name of ["echo", "slow", "fail", "rpc_error", "progress", "ask", "sample", "cancelled", "pid"]) {
    expect(obs.taskSupport[name] === "optional", `tool ${name} has execution.taskSupport "optional"`, obs.taskSupport);
  }

  // Plain calls pass through.
  const echo = await client.callTool({ name: "echo", arguments: { text: "plain echo" } }, CallToolResultSchema, reqOpts());
  expect(textOf(echo) === "plain echo", "plain echo", echo);

  // slow 300 ms as a task: taskCreated → taskStatus… → result.
  const slow = await runStream(client, { name: "slow", arguments: { ms: 300 } });
  obs.slow = { types: slow.types, statuses: slow.statuses, taskId: slow.taskId, text: textOf(slow.result) };
  expect(slow.types[0] === "taskCreated", "slow: first message taskCreated", slow);
  expect(slow.types.slice(1, -1).every((t) => t === "taskStatus"), "slow: then taskStatus messages", slow);
  expect(slow.types.at(-1) === "result", "slow: ends with a result", slow);
  expect(textOf(slow.result) === "slept 300 ms", "slow: result text", slow.result);

  // fail as a task: status failed; tasks/result gives the isError result.
  const fail = await runStream(client, { name: "fail", arguments: { message: "it broke" } });
  const failTask = await client.experimental.tasks.getTask(fail.taskId, reqOpts());
  let failResult;
  try {
    failResult = await client.experimental.tasks.getTaskResult(fail.taskId, CallToolResultSchema, reqOpts());
  } catch (e) {
    failResult = { jsonRpcError: errorInfo(e) };
  }
  obs.fail = { types: fail.types, statuses: fail.statuses, streamError: fail.error, status: failTask.status, result: failResult };
  expect(failTask.status === "failed", "fail: task status failed", failTask);
  expect(failResult.isError === true, "fail: tasks/result has isError true", failResult);
  expect(textOf(failResult).includes("it broke"), "fail: tasks/result carries the message", failResult);

  // rpc_error as a task: the stream / tasks/result yields the JSON-RPC error.
  const RPC = { code: -32042, message: "fixture says no" };
  const rpc = await runStream(client, { name: "rpc_error", arguments: RPC });
  let rpcResultError = null;
  if (rpc.taskId) {
    rpcResultError = await expectError(
      client.experimental.tasks.getTaskResult(rpc.taskId, CallToolResultSchema, reqOpts()),
      "tasks/result of rpc_error",
    );
  }
  const rpcStatus = rpc.taskId ? (await client.experimental.tasks.getTask(rpc.taskId, reqOpts())).status : null;
  obs.rpcError = { types: rpc.types, statuses: rpc.statuses, streamError: rpc.error, tasksResultError: rpcResultError, status: rpcStatus };
  const carried = [rpc.error, rpcResultError].filter(Boolean);
  expect(
    carried.some((e) => e.code === RPC.code && e.message.includes(RPC.message)),
    "rpc_error: the JSON-RPC error (same code and message) comes back via the stream or tasks/result",
    obs.rpcError,
  );
  if (rpcResultError) {
    expect(rpcResultError.code === RPC.code, "rpc_error: tasks/result error code", rpcResultError);
    expect(rpcResultError.message.includes(RPC.message), "rpc_error: tasks/result error message", rpcResultError);
  }

  // getTask / listTasks / cancelTask on a running slow task (started with a raw task-augmented
  // tools/call, so the CreateTaskResult comes back without the stream's polling).
  const cancelledBefore = Number(
    textOf(await client.callTool({ name: "cancelled", arguments: {} }, CallToolResultSchema, reqOpts())),
  );
  const long = await client.request(
    { method: "tools/call", params: { name: "slow", arguments: { ms: 10_000 }, task: { ttl: 60_000 } } },
    CreateTaskResultSchema,
    reqOpts(),
  );
  const longId = long.task.taskId;
  const running = await client.experimental.tasks.getTask(longId, reqOpts());
  expect(running.status === "working", "slow 10000: tasks/get says working", running);
  const listedIds = (await listAllTasks(client)).map((t) => t.taskId);
  for (const id of [slow.taskId, fail.taskId, longId]) {
    expect(listedIds.includes(id), `tasks/list includes ${id}`, listedIds);
  }
  const cancelReply = await client.experimental.tasks.cancelTask(longId, reqOpts());
  expect(cancelReply.status === "cancelled", "tasks/cancel answers status cancelled", cancelReply);
  const afterCancel = await client.experimental.tasks.getTask(longId, reqOpts());
  expect(afterCancel.status === "cancelled", "tasks/get after cancel says cancelled", afterCancel);
  // The proxy sends notifications/cancelled upstream; give it a moment to arrive.
  let cancelledAfter = cancelledBefore;
  for (let i = 0; i < 40 && cancelledAfter <= cancelledBefore; i++) {
    await sleep(50);
    cancelledAfter = Number(
      textOf(await client.callTool({ name: "cancelled", arguments: {} }, CallToolResultSchema, reqOpts())),
    );
  }
  obs.cancel = { taskId: longId, running: running.status, reply: cancelReply.status, after: afterCancel.status, upstreamCancellationsBefore: cancelledBefore, upstreamCancellationsAfter: cancelledAfter };
  expect(cancelledAfter >= 1 && cancelledAfter > cancelledBefore, "upstream saw notifications/cancelled", obs.cancel);

  // cancelTask on a completed task, getTask of an unknown id: -32602.
  const cancelDone = await expectError(client.experimental.tasks.cancelTask(slow.taskId, reqOpts()), "tasks/cancel of a completed task");
  const unknown = await expectError(client.experimental.tasks.getTask("no-such-task-id", reqOpts()), "tasks/get of an unknown id");
  obs.cancelCompleted = cancelDone;
  obs.getUnknown = unknown;
  expect(cancelDone.code === INVALID_PARAMS, "tasks/cancel of a completed task → -32602", cancelDone);
  expect(unknown.code === INVALID_PARAMS, "tasks/get of an unknown id → -32602", unknown);

  // ask as a task: the elicitation reaches us; we accept with answer "yes".
  const elicitationsBefore = state.elicitations.length;
  const ask = await runStream(client, { name: "ask", arguments: { message: "Continue?" } });
  obs.ask = { types: ask.types, statuses: ask.statuses, error: ask.error, text: textOf(ask.result), elicitation: state.elicitations[elicitationsBefore] ?? null };
  expect(state.elicitations.length === elicitationsBefore + 1, "ask: one elicitation reached the client", obs.ask);
  expect(textOf(ask.result) === "answer: yes", "ask: final result", obs.ask);

  // sample, plainly and as a task: the sampling request reaches our stub.
  const samplePlain = await client.callTool({ name: "sample", arguments: { message: "hi" } }, CallToolResultSchema, reqOpts());
  const sampleTask = await runStream(client, { name: "sample", arguments: { message: "hi task" } });
  obs.sample = { plain: textOf(samplePlain), task: { types: sampleTask.types, error: sampleTask.error, text: textOf(sampleTask.result) } };
  expect(textOf(samplePlain) === "model said: stub reply to: hi", "sample (plain)", obs.sample);
  expect(textOf(sampleTask.result) === "model said: stub reply to: hi task", "sample (task)", obs.sample);

  // 20 concurrent slow tasks, 100..2000 ms.
  const t0 = Date.now();
  const many = await Promise.all(
    Array.from({ length: 20 }, (_, i) => {
      const ms = 100 + i * 100;
      return runStream(client, { name: "slow", arguments: { ms, text: `task ${i} (${ms} ms)` } }, { timeoutMs: 30_000 });
    }),
  );
  obs.concurrent = {
    count: many.length,
    elapsedMs: Date.now() - t0,
    distinctTaskIds: new Set(many.map((m) => m.taskId)).size,
    texts: many.map((m) => textOf(m.result)),
  };
  many.forEach((m, i) => {
    const ms = 100 + i * 100;
    expect(textOf(m.result) === `task ${i} (${ms} ms)`, `concurrent task ${i} has its own text`, m);
  });
  expect(obs.concurrent.distinctTaskIds === 20, "20 distinct task ids", obs.concurrent);

  // Plain progress: 3 notifications.
  // Counted twice: by the onprogress callback, and on the wire (see the tap in connect()).
  const progress = [];
  const wireBefore = state.wireProgress.length;
  const prog = await client.callTool(
    { name: "progress", arguments: { steps: 3, interval_ms: 50 } },
    CallToolResultSchema,
    reqOpts({ onprogress: (p) => progress.push(p) }),
  );
  const onWire = state.wireProgress.slice(wireBefore);
  obs.progress = { text: textOf(prog), onprogress: progress, onWire };
  expect(textOf(prog) === "done 3 steps", "progress: result", obs.progress);
  expect(onWire.length === 3, "progress: 3 notifications/progress on the wire", obs.progress);
  // The SDK may drop the callback of the last one (it arrives right before the response; see
  // connect()), so the callbacks need only be a prefix of what was on the wire, missing at most it.
  expect(
    progress.length >= 2 && progress.every((p, i) => p.progress === onWire[i]?.progress),
    "progress: onprogress callbacks follow the wire",
    obs.progress,
  );

  return obs;
}

// ---------------------------------------------------------------------------------------------
// Scenario: notion-tasks (the Notion simulator through the proxy)

function notionPayload(result) {
  if (result?.structuredContent) return result.structuredContent;
  try {
    return JSON.parse(textOf(result));
  } catch {
    return null;
  }
}

async function scenarioNotionTasks(client) {
  const obs = {};
  const caps = client.getServerCapabilities();
  expect(caps?.tasks, "initialize advertises capabilities.tasks", caps);
  const tools = await listAllTools(client);
  obs.taskSupport = Object.fromEntries(tools.map((t) => [t.name, t.execution?.taskSupport ?? null]));

  // Duplicate as a task; a side watcher polls tasks/get every 100 ms for Notion's statuses (the
  // stream itself polls at the proxy's suggested pollInterval).
  const dup = runStream(client, { name: "notion-duplicate-page", arguments: { page_id: "sprint-template" } });
  // Find the task id as soon as it exists: list tasks until a new one appears.
  let watched = null;
  const watcher = (async () => {
    for (let i = 0; i < 100 && !watched; i++) {
      const tasks = await listAllTasks(client);
      const t = tasks.find((t) => t.status === "working" || t.status === "input_required");
      if (t) watched = await watchTask(client, t.taskId, { everyMs: 100 });
      else await sleep(20);
    }
    return watched;
  })();
  const [dupRun, seen] = await Promise.all([dup, watcher]);
  const payload = notionPayload(dupRun.result);
  const allMessages = [...(seen?.statusMessages ?? []), ...dupRun.statusMessages];
  obs.duplicate = {
    types: dupRun.types,
    statuses: dupRun.statuses,
    statusMessages: [...new Set(allMessages)],
    watchedStatuses: seen?.statuses ?? [],
    error: dupRun.error,
    payload,
  };
  expect(dupRun.types[0] === "taskCreated" && dupRun.types.at(-1) === "result", "duplicate: taskCreated … result", obs.duplicate);
  expect(allMessages.some((m) => /queued|running/.test(m)), "duplicate: a statusMessage mentions Notion's status", obs.duplicate);
  expect(payload?.page?.id, "duplicate: result has page.id", payload);
  // The simulator puts duplicated_from inside `page`; accept it at the top level too.
  const from = payload?.duplicated_from ?? payload?.page?.duplicated_from;
  expect(from === "sprint-template", "duplicate: duplicated_from", payload);
  expect(!("async_task" in (payload ?? {})), "duplicate: no async_task in the final result", payload);

  // A 2001-character title fails Notion's validation: the task ends failed.
  const create = await runStream(client, {
    name: "notion-create-pages",
    arguments: { pages: [{ properties: { title: "x".repeat(2001) } }] },
  });
  let createResult;
  let createStatus = null;
  if (create.taskId) {
    createStatus = (await client.experimental.tasks.getTask(create.taskId, reqOpts())).status;
    try {
      createResult = await client.experimental.tasks.getTaskResult(create.taskId, CallToolResultSchema, reqOpts());
    } catch (e) {
      createResult = { jsonRpcError: errorInfo(e) };
    }
  }
  obs.createTooLong = { types: create.types, statuses: create.statuses, status: createStatus, streamError: create.error, result: createResult };
  expect(createStatus === "failed", "create (2001-char title): task failed", obs.createTooLong);
  expect(JSON.stringify(createResult).includes("validation_error"), "create (2001-char title): result mentions validation_error", obs.createTooLong);

  // Plain search passes through.
  const search = await client.callTool({ name: "notion-search", arguments: { query: "Sprint" } }, CallToolResultSchema, reqOpts());
  obs.search = search;
  expect(!search.isError, "search: not an error", search);
  expect(JSON.stringify(search).includes("sprint-template"), "search: finds sprint-template", search);

  return obs;
}

// ---------------------------------------------------------------------------------------------

const SCENARIOS = {
  everything: { run: scenarioEverything },
  "everything-tasks": { run: scenarioEverythingTasks },
  "fixture-tasks": { run: scenarioFixtureTasks, answers: { answer: "yes" } },
  "notion-tasks": { run: scenarioNotionTasks },
};

async function main() {
  const [scenarioName, command, ...args] = process.argv.slice(2);
  const scenario = SCENARIOS[scenarioName];
  if (!scenario || !command) {
    process.stderr.write(`usage: node client.mjs <${Object.keys(SCENARIOS).join("|")}> <command> [args...]\n`);
    process.exit(2);
  }
  const watchdog = setTimeout(() => {
    process.stderr.write(`FAIL [${scenarioName}]: scenario timed out after ${SCENARIO_TIMEOUT_MS} ms\n`);
    process.exit(1);
  }, SCENARIO_TIMEOUT_MS);
  let client;
  try {
    const c = await connect(command, args, scenario.answers);
    client = c.client;
    const observations = await scenario.run(client, c.state);
    process.stdout.write(JSON.stringify(observations) + "\n");
    await withTimeout(client.close(), 5_000, "close").catch(() => {});
    clearTimeout(watchdog);
    process.exit(0);
  } catch (e) {
    const detail = e instanceof Failure ? e.message : `${e?.stack ?? e}`;
    process.stderr.write(`FAIL [${scenarioName}]: ${detail}\n`);
    if (client) await withTimeout(client.close(), 2_000, "close").catch(() => {});
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
