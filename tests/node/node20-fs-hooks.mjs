// Module resolve hook for conformance.mjs on node < 22: `import ... from "fs"` (or "node:fs")
// resolves to node20-fs.mjs, which is node's fs plus `globSync`. node20-fs.mjs itself still gets
// the real one.

const SHIM = new URL("./node20-fs.mjs", import.meta.url).href;

export async function resolve(specifier, context, next) {
  if ((specifier === "fs" || specifier === "node:fs") && context.parentURL !== SHIM) {
    return { url: SHIM, shortCircuit: true };
  }
  return next(specifier, context);
}
