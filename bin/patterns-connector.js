#!/usr/bin/env node
// Entry point for `npm exec --no -- patterns-connector` (in the checkout) or `node bin/patterns-connector.js`; never a
// bare `npx`, which would fetch a package of this name from the registry. tsx runs the TypeScript without a build.
require('tsx/cjs')
const { runReplayCli } = require('../replay/cli.ts')

const USAGE = `Usage: patterns-connector <command> [options]

Commands:
  replay <file | ->   send exported PostHog events to the webhook (see: patterns-connector replay --help)
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
        process.stderr.write(`error: unknown command "${command}"\n${USAGE}`)
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
    const run = command === 'sync' ? require('../sync/cli.ts').runSyncCli : runReplayCli
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
