#!/usr/bin/env node
// Entry point for `npm exec --no -- patterns-connector` (in the checkout) or `patterns-connector` once the package is
// installed; never a bare `npx` in the checkout, which would fetch a package of this name from the registry.
const { existsSync } = require('node:fs')
const { join } = require('node:path')

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

const { runReplayCli } = load('replay/cli')

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
    // Ctrl-C: stop reading, let the requests in flight finish, write the checkpoint. A second Ctrl-C quits at once.
    const controller = new AbortController()
    process.once('SIGINT', () => {
        process.stderr.write('\nInterrupted: finishing the requests in flight, then writing the checkpoint...\n')
        controller.abort()
        process.once('SIGINT', () => process.exit(130))
    })
    // Loaded on demand, so each command only loads its own code.
    const run = command === 'sync' ? load('sync/cli').runSyncCli : runReplayCli
    const code = await run(rest, process.env, process, controller.signal)
    return controller.signal.aborted ? 130 : code
}

main().then(
    (code) => process.exit(code),
    (error) => {
        process.stderr.write(`error: ${error && error.message ? error.message : String(error)}\n`)
        process.exit(1)
    }
)
