// Validates Kubernetes objects with the schemas of a @kubernetes-models package (tests/keda's KEDA,
// tests/prometheus_operator's Prometheus Operator; see their package.json): a JSON list of objects on
// stdin; prints one line per error, "<index> <kind> <name>: <path> <message> <params>", and exits 1 if
// there is any, else prints "<n> valid" and exits 0.
//
//     node validate_models.mjs DIRECTORY < objects.json   (DIRECTORY holds the package.json and the
//                                                          node_modules of `npm ci`)
//
// The package is the one DIRECTORY's package.json depends on, imported from DIRECTORY, not resolved
// from this file's folder: tests/test_kubernetes.py installs it outside the repository. An object's
// model is the package's file for its apiVersion and kind (keda.sh/v1alpha1/ScaledObject.js).
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const directory = process.argv[2];
const [pkg] = Object.keys(JSON.parse(readFileSync(join(directory, "package.json"), "utf8")).dependencies);

async function modelOf(object) {
  const file = join(directory, "node_modules", pkg, String(object?.apiVersion), `${object?.kind}.js`);
  return existsSync(file) ? (await import(pathToFileURL(file).href))[object.kind] : undefined;
}

const objects = JSON.parse(readFileSync(0, "utf8"));
let failed = 0;
for (const [index, object] of objects.entries()) {
  const where = `${index} ${object?.kind} ${object?.metadata?.name}`;
  const Model = await modelOf(object);
  if (!Model) {
    console.log(`${where}: not a kind ${pkg} has (${object?.apiVersion})`);
    failed++;
    continue;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    if (!Array.isArray(error.errors)) throw error;
    for (const e of error.errors) console.log(`${where}: ${e.instancePath || "/"} ${e.message} ${JSON.stringify(e.params)}`);
    failed++;
  }
}
if (failed) process.exit(1);
console.log(`${objects.length} valid`);
