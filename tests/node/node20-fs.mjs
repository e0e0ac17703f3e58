// node's fs plus `globSync` (node 22+ has it built in), for conformance.mjs on node 20.
// Enough for the conformance CLI's one use, `globSync("**/checks.json", { cwd })`: patterns made
// of `**`, `*` and literal path segments, answered as paths relative to `cwd`.

import fs from "node:fs";
import path from "node:path";

export * from "node:fs";
export default fs;

function segmentRegex(segment) {
  const escaped = segment.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, "[^/]*").replace(/\?/g, "[^/]");
  return new RegExp(`^${escaped}$`);
}

function walk(root, rel, out) {
  let entries;
  try {
    entries = fs.readdirSync(path.join(root, rel), { withFileTypes: true });
  } catch {
    return;
  }
  for (const entry of entries) {
    const child = rel ? `${rel}/${entry.name}` : entry.name;
    out.push(child);
    if (entry.isDirectory()) walk(root, child, out);
  }
}

function matches(parts, pats) {
  if (pats.length === 0) return parts.length === 0;
  if (pats[0] === "**") {
    for (let i = 0; i <= parts.length; i++) if (matches(parts.slice(i), pats.slice(1))) return true;
    return false;
  }
  return parts.length > 0 && segmentRegex(pats[0]).test(parts[0]) && matches(parts.slice(1), pats.slice(1));
}

export function globSync(pattern, options = {}) {
  const cwd = options.cwd ? String(options.cwd) : process.cwd();
  const patterns = Array.isArray(pattern) ? pattern : [pattern];
  const all = [];
  walk(cwd, "", all);
  return all.filter((p) => patterns.some((pat) => matches(p.split("/"), pat.split("/").filter(Boolean))));
}
