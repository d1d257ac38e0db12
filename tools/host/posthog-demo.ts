/**
 * `npm start -- --source posthog`: the whole sync job on one machine. A PostHog stand-in (real HTTP, PostHog's
 * HogQL parser, ClickHouse) is seeded with events, some of them late, `patterns-connector sync` reads them
 * through the query API and delivers them to the embedded receiver, and a summary compares what was stored in
 * PostHog with what the receiver holds.
 */
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { summaryText } from '../../pipeline/cli-output'
import { runSyncCli, SyncIO } from '../../sync/cli'
import { FAULT_PRESETS, Receiver, resolveFaults, startReceiver } from '../receiver/receiver'
import { PostHogStandIn, StandInFaults, startPostHogStandIn } from '../standin/server'

export const DEFAULT_START_COUNT = 10_000
/** Small pages, so a local run shows the cursor paging (sync's own default is 10,000). */
const DEFAULT_START_PAGE_SIZE = '1000'
const PROJECT_ID = 1
/** Late arrivals in the seed: one per this many events, with client timestamps three days old. */
const LATE_EVERY = 100
const LATE_AGE_MS = 3 * 24 * 3600 * 1000
/** PostHog faults for `--posthog-faults default`: some 429s (with Retry-After) and 500s, answered by retries. */
const POSTHOG_FAULTS: Record<string, StandInFaults> = {
    none: {},
    default: { rate429: 0.1, rate500: 0.05, retryAfterSeconds: 1, seed: 3 },
}

export const START_HELP = `Usage: npm start -- --source posthog [options]

Runs sync end to end on this machine: a PostHog stand-in (PostHog's query API over a real ClickHouse engine)
seeded with events, \`patterns-connector sync\` reading them through the query API, and the embedded webhook
receiver. Prints sync's summary and what the receiver stored.

Options:
  --count N                events to seed (default: ${DEFAULT_START_COUNT}), plus 1 late arrival per ${LATE_EVERY}
  --faults PRESET          receiver faults: ${Object.keys(FAULT_PRESETS).join(', ')} (default: none)
  --posthog-faults PRESET  stand-in faults: ${Object.keys(POSTHOG_FAULTS).join(', ')} (default: none)
  --page-size N            events per query (default: ${DEFAULT_START_PAGE_SIZE})
  --data-dir DIR           where the receiver stores rows (default: a new folder under .data/runs)
  -h, --help               show this help
`

interface StartOptions {
    count: number
    faults: string
    posthogFaults: string
    pageSize: string | undefined
    dataDir: string
}

function parseStartArgs(argv: string[]): StartOptions | null {
    const { values } = parseArgs({
        args: argv,
        strict: true,
        allowPositionals: false,
        options: {
            count: { type: 'string' },
            faults: { type: 'string', default: 'none' },
            'posthog-faults': { type: 'string', default: 'none' },
            'page-size': { type: 'string' },
            'data-dir': { type: 'string' },
            help: { type: 'boolean', short: 'h', default: false },
        },
    })
    if (values.help) {
        return null
    }
    const count = values.count === undefined ? DEFAULT_START_COUNT : Number(values.count)
    if (!Number.isInteger(count) || count < 1) {
        throw new Error(`--count: expected a whole number of at least 1, got "${values.count}"`)
    }
    if (!(values.faults in FAULT_PRESETS)) {
        throw new Error(
            `--faults: unknown preset "${values.faults}"; choose one of ${Object.keys(FAULT_PRESETS).join(', ')}`
        )
    }
    if (!(values['posthog-faults'] in POSTHOG_FAULTS)) {
        throw new Error(`--posthog-faults: choose one of ${Object.keys(POSTHOG_FAULTS).join(', ')}`)
    }
    const runs = join(__dirname, '..', '..', '.data', 'runs', new Date().toISOString().replace(/[:.]/g, '-'))
    return {
        count,
        faults: values.faults,
        posthogFaults: values['posthog-faults'],
        pageSize: values['page-size'],
        dataDir: values['data-dir'] ?? `${runs}-posthog`,
    }
}

/** Seeds `count` events stored over the last hour, and late arrivals: old timestamps, stored now. */
async function seed(posthog: PostHogStandIn, count: number, nowMs: number): Promise<number> {
    const hourAgo = new Date(nowMs - 3_600_000)
    await posthog.seed({
        count,
        start: hourAgo,
        stepMicros: Math.floor(3_000_000_000 / count),
        createdLagMicros: 2_000_000,
    })
    const late = Math.ceil(count / LATE_EVERY)
    await posthog.insertLateEvents(late, { ageMs: LATE_AGE_MS })
    return count + late
}

function receiverText(receiver: Receiver, stored: number): string {
    const summary = receiver.summary()
    return summaryText([
        ['events stored in PostHog', stored],
        ['rows the receiver stored', `${summary.rows} (${summary.duplicateRows} duplicates)`],
        ['distinct events received', summary.uniqueUuids],
        ['every event arrived', summary.uniqueUuids === stored ? 'yes' : `no: ${stored - summary.uniqueUuids} missing`],
        ['rows are in', summary.rowsFile],
    ])
}

/** The whole job; returns the exit code (sync's, or 1 if the receiver is missing events). */
export async function runPostHogStart(argv: string[], io: SyncIO): Promise<number> {
    let options: StartOptions | null
    try {
        options = parseStartArgs(argv)
    } catch (error) {
        io.stderr.write(`error: ${(error as Error).message}. Run with --source posthog --help for the options.\n`)
        return 2
    }
    if (!options) {
        io.stdout.write(START_HELP)
        return 0
    }
    // A throwaway key for the stand-in: it is a secret like a real one, and sync treats it so.
    const apiKey = `phx_${randomBytes(18).toString('base64url')}`
    const posthog = await startPostHogStandIn({ apiKey, projectId: PROJECT_ID })
    let receiver: Receiver | null = null
    try {
        const nowMs = Date.now()
        const stored = await seed(posthog, options.count, nowMs)
        posthog.setFaults(POSTHOG_FAULTS[options.posthogFaults] ?? {})
        receiver = await startReceiver({ dataDir: options.dataDir, faults: resolveFaults(options.faults), seed: 42 })
        io.stdout.write(
            `PostHog stand-in on ${posthog.url} (project ${PROJECT_ID}, ${stored} events, faults: ${options.posthogFaults}); ` +
                `receiver on ${new URL(receiver.url).origin} (faults: ${options.faults})\n`
        )
        const args = [
            '--posthog-url',
            posthog.url,
            '--project-id',
            String(PROJECT_ID),
            '--since',
            new Date(nowMs - 2 * 3_600_000).toISOString(),
            // Everything is stored before sync starts, so no lag is needed to let writes land.
            '--lag',
            '0s',
            '--page-size',
            options.pageSize ?? DEFAULT_START_PAGE_SIZE,
        ]
        const code = await runSyncCli(args, { POSTHOG_API_KEY: apiKey, PATTERNS_WEBHOOK_URL: receiver.url }, io)
        const stats = await posthog.stats()
        const queries =
            `${stats.requests} (${stats.throttled} throttled, ` +
            `${stats.faults['429']} injected 429s, ${stats.faults['500']} injected 500s)`
        io.stdout.write(`\nPostHog stand-in\n${summaryText([['query requests', queries]])}\n`)
        io.stdout.write(`\nReceiver\n${receiverText(receiver, stored)}\n`)
        return code === 0 && receiver.summary().uniqueUuids !== stored ? 1 : code
    } finally {
        await receiver?.close()
        await posthog.close()
    }
}
