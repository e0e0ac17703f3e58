#!/usr/bin/env node
// Runs the pinned official conformance CLI (@modelcontextprotocol/conformance) with the arguments
// given, on node 20 as well as 22+. Used by tests/conformance.rs:
//
//   node conformance.mjs server --url http://127.0.0.1:PORT/mcp --scenario tasks-lifecycle \
//        --spec-version 2026-07-28 -o <dir>
//
// The CLI's bundle imports `globSync` from "fs", which node has only since 22 (the CLI uses it only
// for `tier-check`, not for `server` runs). On an older node, a resolve hook hands the bundle an
// "fs" that is node's own plus a small `globSync`; on node 22+ nothing is changed.

import fs from "node:fs";
import { register } from "node:module";

if (typeof fs.globSync !== "function") {
  register("./node20-fs-hooks.mjs", import.meta.url);
}

await import("./node_modules/@modelcontextprotocol/conformance/dist/index.js");
