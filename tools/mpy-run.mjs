// Run a script under real MicroPython (the npm WebAssembly port) with a real exit status.
//
//   node tools/mpy-run.mjs [--heap BYTES] [--root DIR] [--file HOST=MPPATH]... SCRIPT [MODULE...]
//
// The port's own command line always exits 0, even on an uncaught exception,
// crashes on piped stdin, and cannot import files from disk (its file system is
// Emscripten's, in memory). So this runner loads the port as a library,
// copies each MODULE (a path relative to --root, default the current folder,
// e.g. emulator/meter/frame.py) to /lib/MODULE, which is on MicroPython's
// sys.path, so packages import as they do on a board; --file copies any other
// host file to an absolute MicroPython path. Then it runs SCRIPT as the main
// program and exits with:
//   0  the script ended, or raised SystemExit(0) / SystemExit()
//   n  the script raised SystemExit(n)
//   1  an uncaught exception (its traceback goes to stderr)
//   2  the runner itself failed (bad arguments, missing file, the port failed to load)
//
// The port's location: EDGEKEY_MICROPYTHON_MODULES (a node_modules folder), else
// ${EDGEKEY_CACHE:-$HOME/.cache/edgekey}/micropython/node_modules, where
// tools/setup-micropython.sh installs it.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { pathToFileURL } from "node:url";

function fail(message) {
    process.stderr.write(`mpy-run: ${message}\n`);
    process.exit(2);
}

function parseArgs(argv) {
    const opts = { heap: 4 * 1024 * 1024, root: process.cwd(), files: [], script: null, modules: [] };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) fail(`${arg} needs a value`);
            return argv[++i];
        };
        if (opts.script === null && arg === "--heap") {
            opts.heap = Number.parseInt(value(), 10);
            if (!(opts.heap >= 64 * 1024)) fail("--heap must be at least 65536 bytes");
        } else if (opts.script === null && arg === "--root") {
            opts.root = path.resolve(value());
        } else if (opts.script === null && arg === "--file") {
            const spec = value();
            const cut = spec.lastIndexOf("=");
            if (cut <= 0 || !spec.slice(cut + 1).startsWith("/")) {
                fail(`--file wants HOST=/MPPATH, got ${spec}`);
            }
            opts.files.push([spec.slice(0, cut), spec.slice(cut + 1)]);
        } else if (opts.script === null && arg.startsWith("--")) {
            fail(`unknown option ${arg}`);
        } else if (opts.script === null) {
            opts.script = arg;
        } else {
            opts.modules.push(arg);
        }
    }
    if (opts.script === null) {
        fail("usage: mpy-run.mjs [--heap BYTES] [--root DIR] [--file HOST=MPPATH]... "
             + "SCRIPT [MODULE...]");
    }
    return opts;
}

function mkdirs(FS, dir) {
    let at = "";
    for (const part of dir.split("/").filter(Boolean)) {
        at += "/" + part;
        try {
            FS.mkdir(at);
        } catch (e) {
            if (!FS.analyzePath(at).exists) throw e;
        }
    }
}

function put(FS, target, bytes) {
    mkdirs(FS, path.posix.dirname(target));
    FS.writeFile(target, bytes);
}

// SystemExit's status from the traceback's last line ("SystemExit: 3", "SystemExit").
function exitStatus(message) {
    const lines = String(message).trim().split("\n");
    const last = lines[lines.length - 1].trim();
    const match = /^SystemExit(?::\s*(.*))?$/.exec(last);
    if (!match || match[1] === undefined || match[1] === "" || match[1] === "None") return 0;
    const code = Number.parseInt(match[1], 10);
    if (String(code) === match[1].trim()) return code & 0xff;
    process.stderr.write(match[1] + "\n");  // sys.exit("message"): printed, status 1 as CPython
    return 1;
}

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    let src;
    try {
        src = fs.readFileSync(opts.script, "utf8");
    } catch (e) {
        fail(`cannot read script ${opts.script}: ${e.message}`);
    }
    const cache = process.env.EDGEKEY_CACHE || path.join(os.homedir(), ".cache", "edgekey");
    const modulesDir = process.env.EDGEKEY_MICROPYTHON_MODULES
        || path.join(cache, "micropython", "node_modules");
    const entry = path.join(modulesDir, "@micropython", "micropython-webassembly-pyscript",
                            "micropython.mjs");
    if (!fs.existsSync(entry)) fail(`MicroPython not found at ${entry} (run tools/setup-micropython.sh)`);
    const { loadMicroPython } = await import(pathToFileURL(entry).href);
    const mp = await loadMicroPython({
        heapsize: opts.heap,
        stdout: (line) => process.stdout.write(line + "\n"),
        stderr: (line) => process.stderr.write(line + "\n"),
    });
    for (const module of opts.modules) {
        const rel = path.normalize(module);
        if (path.isAbsolute(rel) || rel.startsWith("..")) fail(`module path ${module} must be relative`);
        let bytes;
        try {
            bytes = fs.readFileSync(path.join(opts.root, rel));
        } catch (e) {
            fail(`cannot read module ${module}: ${e.message}`);
        }
        put(mp.FS, "/lib/" + rel.split(path.sep).join("/"), bytes);
    }
    for (const [host, target] of opts.files) {
        let bytes;
        try {
            bytes = fs.readFileSync(host);
        } catch (e) {
            fail(`cannot read file ${host}: ${e.message}`);
        }
        put(mp.FS, target, bytes);
    }
    try {
        mp.runPython(src);
    } catch (e) {
        if (e === null || typeof e !== "object" || e.name !== "PythonError") throw e;
        if (e.type === "SystemExit") {
            process.exitCode = exitStatus(e.message);
        } else {
            process.stderr.write(String(e.message));
            process.exitCode = 1;
        }
    }
}

main().catch((e) => {
    process.stderr.write(`mpy-run: ${e && e.stack ? e.stack : e}\n`);
    process.exitCode = 2;
});
