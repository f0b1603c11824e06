// Validates Prometheus Operator objects with the schemas of @kubernetes-models/prometheus-operator (see package.json): a JSON list
// of objects on stdin; prints one line per error, "<index> <kind> <name>: <path> <message> <params>", and exits 1
// if there is any, else prints "<n> valid" and exits 0.
//
//     node validate.mjs DIRECTORY < objects.json   (DIRECTORY holds the node_modules of `npm ci`)
//
// The package is imported from DIRECTORY, not resolved from this file's folder: tests/test_kubernetes.py
// installs it outside the repository.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const models = join(process.argv[2], "node_modules", "@kubernetes-models", "prometheus-operator", "monitoring.coreos.com", "v1");
const KINDS = ["PodMonitor", "ServiceMonitor", "PrometheusRule"];
const classes = Object.fromEntries(await Promise.all(
  KINDS.map(async (kind) => [kind, (await import(pathToFileURL(join(models, `${kind}.js`)).href))[kind]])));

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
objects.forEach((object, index) => {
  const where = `${index} ${object?.kind} ${object?.metadata?.name}`;
  const Model = classes[object?.kind];
  if (!Model) {
    console.log(`${where}: not a kind this validates (${KINDS.join(", ")})`);
    failed++;
    return;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    if (!Array.isArray(error.errors)) throw error;
    for (const e of error.errors) console.log(`${where}: ${e.instancePath || "/"} ${e.message} ${JSON.stringify(e.params)}`);
    failed++;
  }
});
if (failed) process.exit(1);
console.log(`${objects.length} valid`);
