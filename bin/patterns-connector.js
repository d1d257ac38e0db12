#!/usr/bin/env node
// Entry point for `npm exec --no -- patterns-connector` (in the checkout) or `patterns-connector` once the package is
// installed; never a bare `npx` in the checkout, which would fetch a package of this name from the registry.
const { existsSync } = require('node:fs')
const { join } = require('node:path')
const { setTimeout } = require('node:timers')

const ROOT = join(__dirname, '..')

/**
 * In a checkout (the TypeScript sources are here and tsx, a devDependency, is installed) the sources run as they are,
 * so tests and benches never run a stale build. The installed package ships only the compiled dist/ and needs no
 * TypeScript loader.
 */
function runsFromSources() {
    if (!existsSync(join(ROOT, 'replay', 'cli.ts'))) {
        return false
    }
    try {
        require.resolve('tsx/cjs')
        return true
    } catch {
        return false
    }
}

const FROM_SOURCES = runsFromSources()
if (FROM_SOURCES) {
    require('tsx/cjs')
}

/** Loads one of the CLI's modules, e.g. `replay/cli`, from the sources or from dist/. */
function load(modulePath) {
    const file = FROM_SOURCES ? join(ROOT, `${modulePath}.ts`) : join(ROOT, 'dist', `${modulePath}.js`)
    if (!FROM_SOURCES && !existsSync(file)) {
        process.stderr.write(`error: ${file} is missing: run \`npm ci\` (or \`npm run build\`) in ${ROOT} first\n`)
        process.exit(1)
    }
    return require(file)
}

/** After a stop signal, the requests in flight get this long; then the process exits with the checkpoint as saved. */
const STOP_GRACE_MS = 10_000
/** The exit code for each stop signal: 128 + its number, as shells report it. */
const SIGNAL_EXIT = { SIGINT: 130, SIGTERM: 143 }

const USAGE = `Usage: patterns-connector <command> [options]

Commands:
  replay <input…>     send exported PostHog events to the webhook: a file, standard input (-), several
                      files, or a folder of PostHog batch-export files (see: patterns-connector replay --help)
  sync                feed events from PostHog's query API to the webhook, live and resumable
                      (see: patterns-connector sync --help)
`

async function main() {
    const [command, ...rest] = process.argv.slice(2)
    if (!command || command === '--help' || command === '-h') {
        process.stdout.write(USAGE)
        return command ? 0 : 2
    }
    if (command !== 'replay' && command !== 'sync') {
        const guess = load('pipeline/usage').closestFlag(command, ['replay', 'sync'])
        const hint = guess ? ` Did you mean "${guess}"?` : ''
        process.stderr.write(`error: unknown command "${command}".${hint}\n${USAGE}`)
        return 2
    }
    const controller = stopOnSignals(rest)
    // Loaded on demand, so each command only loads its own code (replay's readers are no part of a sync).
    const run = command === 'sync' ? load('sync/cli').runSyncCli : load('replay/cli').runReplayCli
    const code = await run(rest, process.env, process, controller.signal)
    return controller.signal.aborted ? SIGNAL_EXIT[controller.signal.reason] : code
}

/**
 * Ctrl-C (SIGINT) and SIGTERM (docker stop, Kubernetes, systemd): stop reading, let the requests in flight finish
 * within STOP_GRACE_MS, write the checkpoint. The checkpoint only ever holds acknowledged batches, so exiting when
 * the grace runs out loses nothing: a resume sends what was still out. A second signal quits at once.
 */
function stopOnSignals(argv) {
    const { logFormatIn } = load('pipeline/service')
    const { jsonLogLine } = load('pipeline/cli-output')
    const say = (level, text) =>
        process.stderr.write(logFormatIn(argv) === 'json' ? jsonLogLine(level, text, {}, (t) => t) : `\n${text}\n`)
    const controller = new AbortController()
    const onSignal = (signal) => {
        say(
            'info',
            `${signal === 'SIGINT' ? 'Interrupted' : 'Stopping (SIGTERM)'}: finishing the requests in flight, then writing the checkpoint...`
        )
        controller.abort(signal)
        setTimeout(() => {
            say(
                'warn',
                `stopping now: requests still in flight after ${STOP_GRACE_MS / 1000} s are sent again on resume`
            )
            process.exit(SIGNAL_EXIT[signal])
        }, STOP_GRACE_MS).unref()
        for (const name of Object.keys(SIGNAL_EXIT)) {
            process.removeAllListeners(name)
            process.once(name, () => process.exit(SIGNAL_EXIT[signal]))
        }
    }
    for (const name of Object.keys(SIGNAL_EXIT)) {
        process.once(name, () => onSignal(name))
    }
    return controller
}

main().then(
    (code) => process.exit(code),
    (error) => {
        const message = `error: ${error && error.message ? error.message : String(error)}`
        const json = load('pipeline/service').logFormatIn(process.argv.slice(3)) === 'json'
        process.stderr.write(
            json ? load('pipeline/cli-output').jsonLogLine('error', message.slice(7), {}, (t) => t) : `${message}\n`
        )
        process.exit(1)
    }
)
