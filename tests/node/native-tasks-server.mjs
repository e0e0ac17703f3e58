// A 2025-11-25 server that runs its tool as a task of its own but declares neither `tasks.list` nor
// `tasks.cancel` (only `tasks.requests.tools.call`), built on the official TypeScript SDK. Its tool
// `seen` tells which methods reached it, so a test can check what the proxy forwarded.
//
//   node native-tasks-server.mjs               # stdio
//   node native-tasks-server.mjs --http PORT   # stateless Streamable HTTP at http://127.0.0.1:PORT/mcp
//
// Over HTTP its tasks live as long as the process, whoever asks (no session), so they outlive a proxy
// in front of it: what a test of a restarted proxy needs.
import { createServer } from "node:http";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { InMemoryTaskStore, InMemoryTaskMessageQueue } from "@modelcontextprotocol/sdk/experimental/tasks";
import { z } from "zod";

const seen = [];
const taskStore = new InMemoryTaskStore();
const taskMessageQueue = new InMemoryTaskMessageQueue();

function makeServer() {
  const server = new McpServer(
    { name: "native-tasks-without-list-or-cancel", version: "1.0.0" },
    {
      capabilities: { tools: {}, tasks: { requests: { tools: { call: {} } } } },
      taskStore,
      taskMessageQueue,
    },
  );

  server.experimental.tasks.registerToolTask(
    "brew",
    {
      description: "Brews for `ms` milliseconds as a task, then answers `text`.",
      inputSchema: { ms: z.number(), text: z.string() },
      execution: { taskSupport: "required" },
    },
    {
      createTask: async (args, extra) => {
        const task = await extra.taskStore.createTask({ ttl: 60000, pollInterval: 100 });
        setTimeout(() => {
          extra.taskStore
            .storeTaskResult(task.taskId, "completed", { content: [{ type: "text", text: args.text }] })
            .catch(() => {});
        }, args.ms);
        return { task };
      },
      getTask: async (_args, extra) => extra.taskStore.getTask(extra.taskId),
      getTaskResult: async (_args, extra) => extra.taskStore.getTaskResult(extra.taskId),
    },
  );

  server.registerTool("seen", { description: "The methods this server received, in order." }, async () => ({
    content: [{ type: "text", text: JSON.stringify(seen) }],
  }));
  return server;
}

async function serve(transport) {
  const server = makeServer();
  await server.connect(transport);
  const deliver = transport.onmessage;
  transport.onmessage = (message, extra) => {
    if (message.method) seen.push(message.method);
    deliver(message, extra);
  };
  return server;
}

const http = process.argv.indexOf("--http");
if (http < 0) {
  await serve(new StdioServerTransport());
} else {
  const port = Number(process.argv[http + 1]);
  createServer(async (req, res) => {
    if (!req.url.startsWith("/mcp")) {
      res.writeHead(404).end();
      return;
    }
    // Stateless: a server and a transport per request, the tasks shared.
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    const server = await serve(transport);
    res.on("close", () => {
      transport.close();
      server.close();
    });
    await transport.handleRequest(req, res);
  }).listen(port, "127.0.0.1");
}
