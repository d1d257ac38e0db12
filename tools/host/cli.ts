/**
 * `npm start`: the whole job on one machine. Starts the embedded receiver, loads index.ts through the host
 * emulator, streams events through onEvent at the era's concurrency, and prints a summary.
 */
import { createReadStream } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import type { ProcessedPluginEvent } from '@posthog/plugin-scaffold'

import { usageMessage } from '../../pipeline/cli-options'
import { summaryText } from '../../pipeline/cli-output'
import { UsageError } from '../../pipeline/errors'
import { readRecords } from '../../replay/input'
import { FAULT_PRESETS, Receiver, resolveFaults, startReceiver } from '../receiver/receiver'
import { ERA_NAMES, getEra, setupRetryWaits } from './eras'
import { MINUTE_MS } from './instance'
import { DEFAULT_TASKS_PER_WORKER, DEFAULT_WORKERS } from './kafka'
import { PluginLoadError, PROJECT_PLUGIN_DIR } from './loader'
import { defaultPath, HostPath, JobResult, PATHS, runJob } from './run'
import { sampleEvents } from './sample-events'
import { heldBackCount, holdBack, TRAFFIC_BOUND_MS, trafficAfterOutage } from './schedule'
import { callFaults, parseCallFaults, StorageFaults } from './storage'

const DEFAULT_COUNT = 1_000
/** With --outage and no --time-scale: ten minutes of outage and job waits take six seconds. */
const OUTAGE_TIME_SCALE = 0.01
/**
 * With --outage: once the events are in, the host keeps running (runEveryMinute included) until the receiver holds
 * every event, for at most the outage's minutes and this many more.
 */
const DRAIN_EXTRA_MINUTES = 15
/**
 * ...and at least this long in real time: on a busy machine each storage call of a drain can take a second, and a
 * fast-forwarded minute is over long before that. The wait ends as soon as every event arrived.
 */
const DRAIN_EXTRA_MIN_REAL_MS = 60_000
/** Each run gets its own folder, so its summary counts only its own rows. */
const DEFAULT_DATA_DIR = join(PROJECT_PLUGIN_DIR, '.data', 'runs', new Date().toISOString().replace(/[:.]/g, '-'))

const HELP = `Usage: npm start -- [options]

Runs the connector (index.ts) inside an emulated PostHog plugin host and sends events to an
embedded webhook receiver that stores rows like a Patterns webhook node. Prints a summary.

Options:
  --era NAME           PostHog host era: ${ERA_NAMES.join(', ')} (default: vm2024)
  --path PATH          how the host calls the plugin: kafka (the production path of the classic eras:
                       worker threads, processEvent before each onEvent; default) or direct (calls of a
                       micro-batch started together in one thread; the only path of cdp2025)
  --workers N          Kafka path worker threads, each with its own VM (default: ${DEFAULT_WORKERS}, one per core)
  --tasks-per-worker N Kafka path tasks in flight per thread (default: ${DEFAULT_TASKS_PER_WORKER})
  --setup-retry-scale X  scales the host's waits between setupPlugin attempts (3 s, 6 s, …; default 1)
  --outage SECONDS     the embedded receiver answers 503 for this long from the first event (the export path's
                       job queue retries the batches; other eras show what is lost)
  --time-scale X       runs the host's job waits (6 s, 12 s, … up to about 54 h), its minute (runEveryMinute,
                       cache TTLs) and --outage X times as long: 0.01 makes ten minutes six seconds
                       (default: 1, or 0.01 with --outage). With --outage the run goes on after the events,
                       runEveryMinute included, until every event was delivered or ${DRAIN_EXTRA_MINUTES} minutes past the outage.
                       Eras without scheduled tasks (vm2025, cdp2025) drain only at calls, as traffic goes on:
                       there the last 10% of the events are sent after the outage, one call every few seconds,
                       until every event was delivered or ${TRAFFIC_BOUND_MS / 1000} s (real time) past the outage
  --count N            number of sample events to generate (default: ${DEFAULT_COUNT})
  --events FILE        send the events in FILE instead (JSON Lines, a JSON array, or PostHog API pages)
  --webhook-url URL    send to a real webhook instead; no receiver is started
                       (also read from PATTERNS_WEBHOOK_URL; never printed)
  --faults PRESET      inject receiver faults: ${Object.keys(FAULT_PRESETS).join(', ')}
  --storage-faults F   fail the plugin's storage calls (meta.storage): a rate (5%), one call (call:7,
                       repeatable) or a while (for:30+10: from second 30 of the run, for 10 s), comma-separated
  --cache-faults F     the same for its cache calls (meta.cache)
  --data-dir DIR       where the receiver stores rows (default: a new folder under .data/runs)
  --seed N             seed for sample events and fault dice (default: 42)
  --plugin-dir DIR     load another plugin folder (plugin.json + its main file) instead of this one
  --quiet              do not print the plugin's log lines
  -h, --help           show this help

Examples:
  npm start
  npm start -- --era vm2021 --faults default-no429 --count 5000
  npm start -- --era cdp2025 --faults default
  npm start -- --era vm2021 --path direct --count 3000
  npm start -- --era vm2021 --outage 600
  npm start -- --source posthog        (sync from a PostHog stand-in; see npm start -- --source posthog --help)
`

export { UsageError }

export interface CliOptions {
    era: string
    count: number
    eventsFile: string | null
    webhookUrl: string | null
    faults: string
    dataDir: string
    seed: number
    pluginDir: string
    quiet: boolean
    help: boolean
    path: HostPath | undefined
    workers: number | undefined
    tasksPerWorker: number | undefined
    setupRetryScale: number
    /** Seconds (emulated) the embedded receiver is down from the start; 0: no outage. */
    outageSeconds: number
    timeScale: number
    /** Failures injected into the plugin's storage and cache calls; undefined: none. */
    storageFaults: StorageFaults | undefined
}

/** The flags of `npm start`, as node:util parseArgs reads them. */
const START_OPTIONS = {
    era: { type: 'string', default: 'vm2024' },
    count: { type: 'string' },
    events: { type: 'string' },
    'webhook-url': { type: 'string' },
    faults: { type: 'string', default: 'none' },
    'data-dir': { type: 'string', default: DEFAULT_DATA_DIR },
    seed: { type: 'string', default: '42' },
    'plugin-dir': { type: 'string', default: PROJECT_PLUGIN_DIR },
    quiet: { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
    path: { type: 'string' },
    workers: { type: 'string' },
    'tasks-per-worker': { type: 'string' },
    'setup-retry-scale': { type: 'string', default: '1' },
    outage: { type: 'string', default: '0' },
    'time-scale': { type: 'string' },
    'storage-faults': { type: 'string' },
    'cache-faults': { type: 'string' },
} as const

type StartValues = ReturnType<typeof readStartFlags>

function readStartFlags(argv: string[]) {
    try {
        return parseArgs({ args: argv, options: START_OPTIONS, strict: true, allowPositionals: false }).values
    } catch (error) {
        throw new UsageError(usageMessage(error as Error, Object.keys(START_OPTIONS)))
    }
}

export function parseCli(argv: string[], env: Record<string, string | undefined> = {}): CliOptions {
    const values = readStartFlags(argv)
    getEraOrUsage(values.era)
    if (!(values.faults in FAULT_PRESETS)) {
        throw new UsageError(
            `--faults: unknown preset "${values.faults}". Choose one of: ${Object.keys(FAULT_PRESETS).join(', ')}.`
        )
    }
    const webhookUrl = values['webhook-url'] ?? env.PATTERNS_WEBHOOK_URL ?? null
    if (webhookUrl && values.faults !== 'none') {
        throw new UsageError('--faults needs the embedded receiver; it cannot be used with --webhook-url.')
    }
    const { outageSeconds, timeScale } = parseOutage(values.outage, values['time-scale'], webhookUrl !== null)
    return {
        era: values.era,
        count: parseCount(values),
        eventsFile: values.events ?? null,
        webhookUrl,
        faults: values.faults,
        dataDir: values['data-dir'],
        seed: parseSeed(values.seed),
        pluginDir: values['plugin-dir'],
        quiet: values.quiet,
        help: values.help,
        path: parsePath(values),
        workers: wholeOrUndefined('workers', values.workers),
        tasksPerWorker: wholeOrUndefined('tasks-per-worker', values['tasks-per-worker']),
        setupRetryScale: parseSetupRetryScale(values['setup-retry-scale']),
        outageSeconds,
        timeScale,
        storageFaults: parseStorageFaults(values, parseSeed(values.seed)),
    }
}

/** --storage-faults and --cache-faults, as predicates for the install's database. */
function parseStorageFaults(values: StartValues, seed: number): StorageFaults | undefined {
    const read = (flag: string, text: string | undefined, offset: number) => {
        if (text === undefined) {
            return undefined
        }
        try {
            return callFaults(parseCallFaults(flag, text, seed + offset))
        } catch (error) {
            throw new UsageError(`${(error as Error).message}.`)
        }
    }
    const failStorage = read('--storage-faults', values['storage-faults'], 1)
    const failCache = read('--cache-faults', values['cache-faults'], 2)
    return failStorage || failCache ? { failStorage, failCache } : undefined
}

function parseCount(values: StartValues): number {
    const count = values.count === undefined ? DEFAULT_COUNT : Number(values.count)
    if (!Number.isInteger(count) || count < 1) {
        throw new UsageError(`--count: expected a whole number of at least 1, got "${values.count}".`)
    }
    if (values.count !== undefined && values.events) {
        throw new UsageError('--count and --events cannot be used together: the file decides the count.')
    }
    return count
}

function parseSeed(text: string): number {
    const seed = Number(text)
    if (!Number.isInteger(seed)) {
        throw new UsageError(`--seed: expected a whole number, got "${text}".`)
    }
    return seed
}

function parsePath(values: StartValues): HostPath | undefined {
    const path = values.path as HostPath | undefined
    if (path !== undefined && !PATHS.includes(path)) {
        throw new UsageError(`--path: unknown path "${values.path}". Choose one of: ${PATHS.join(', ')}.`)
    }
    if (path === 'kafka' && values.era === 'cdp2025') {
        throw new UsageError('--path kafka: cdp2025 has no classic Kafka path; it starts a whole batch at once.')
    }
    return path
}

function wholeOrUndefined(flag: string, text: string | undefined): number | undefined {
    if (text === undefined) {
        return undefined
    }
    const n = Number(text)
    if (!Number.isInteger(n) || n < 1) {
        throw new UsageError(`--${flag}: expected a whole number of at least 1, got "${text}".`)
    }
    return n
}

function parseSetupRetryScale(text: string): number {
    const scale = Number(text)
    if (!Number.isFinite(scale) || scale < 0) {
        throw new UsageError(`--setup-retry-scale: expected a number ≥ 0, got "${text}".`)
    }
    return scale
}

/** The outage and the time scale: an outage needs the embedded receiver, and defaults to a hundredfold speed. */
function parseOutage(outage: string, scale: string | undefined, external: boolean) {
    const outageSeconds = Number(outage)
    if (!Number.isFinite(outageSeconds) || outageSeconds < 0) {
        throw new UsageError(`--outage: expected seconds ≥ 0, e.g. --outage 600, got "${outage}".`)
    }
    if (outageSeconds > 0 && external) {
        throw new UsageError('--outage needs the embedded receiver; it cannot be used with --webhook-url.')
    }
    const timeScale = scale === undefined ? (outageSeconds > 0 ? OUTAGE_TIME_SCALE : 1) : Number(scale)
    if (!Number.isFinite(timeScale) || timeScale <= 0) {
        throw new UsageError(`--time-scale: expected a number > 0, e.g. --time-scale 0.01, got "${scale}".`)
    }
    return { outageSeconds, timeScale }
}

function getEraOrUsage(name: string): void {
    try {
        getEra(name)
    } catch (error) {
        throw new UsageError(`--era: ${(error as Error).message}.`)
    }
}

/**
 * Streams events from a file with the replay tool's reader (JSON Lines, a JSON array or PostHog API pages).
 * Here a malformed record stops the run, naming its line: a local run should not quietly send less.
 */
export async function* readEventsFile(path: string): AsyncGenerator<ProcessedPluginEvent> {
    const stream = createReadStream(path)
    try {
        await new Promise<void>((resolve, reject) => {
            stream.once('open', () => resolve())
            stream.once('error', reject)
        })
    } catch (error) {
        throw new UsageError(`--events: cannot read ${path}: ${(error as NodeJS.ErrnoException).code ?? 'error'}.`)
    }
    const { chunks } = await readRecords(stream)
    for await (const chunk of chunks) {
        for (const record of chunk) {
            if (record.kind === 'malformed') {
                const where = record.line !== null ? `line ${record.line}` : `record ${record.ordinal + 1}`
                throw new UsageError(`--events: ${where} of ${path}: ${record.reason}.`)
            }
            yield record.event as unknown as ProcessedPluginEvent
        }
    }
}

export function formatSummary(result: JobResult, receiver: ReturnType<Receiver['summary']> | null): string {
    const stats = result.sender
    const delivered = stats?.delivered ?? result.resolved
    const requests = stats?.requests ?? 0
    const causes = Object.entries(result.failuresByCause)
    const rows: Array<[string, string]> = [
        ['era', `${result.era} (${result.path} path)`],
        ['events', String(result.events)],
        ['delivered', `${delivered}${stats?.filtered ? ` (+${stats.filtered} filtered out)` : ''}`],
        ['failed (thrown to host)', String(result.failed)],
        ['skipped (setup failed)', String(result.skipped)],
        [
            'rows stored',
            receiver ? `${receiver.rows} (${receiver.duplicateRows} duplicates)` : 'n/a (external webhook)',
        ],
        ['requests', String(requests)],
        ['events per request', requests ? (delivered / requests).toFixed(1) : '-'],
        ['retries (plugin / host)', `${stats?.retries ?? 0} / ${result.hostRetries}`],
        ['failures by cause', causes.length ? causes.map(([c, n]) => `${c} ×${n}`).join('; ') : 'none'],
        ['delivery latency p50 / p95', `${result.latencyP50Ms} ms / ${result.latencyP95Ms} ms`],
        ['duration', `${(result.durationMs / 1000).toFixed(1)} s`],
        ['rows are in', receiver ? receiver.rowsFile : 'the external webhook'],
        ...exportRows(result),
        ...storageRows(result),
    ]
    return summaryText(rows)
}

/** meta.storage as the install's database saw it, and the scheduled runs, where the era has them. */
function storageRows(result: JobResult): Array<[string, string]> {
    const era = getEra(result.era)
    const { storage, scheduled } = result
    if (!era.services.storage && !era.services.cache) {
        return [['storage, cache, runEveryMinute', 'none (this host offers none)']]
    }
    return [
        [
            'storage writes / deletes / reads',
            `${storage.writes} / ${storage.deletes} / ${storage.reads}${storage.failedWrites ? ` (${storage.failedWrites} failed)` : ''}`,
        ],
        ['storage bytes (peak / at end)', `${storage.peakStoredBytes} / ${storage.storedBytes}`],
        ...(storage.injectedStorageFaults || storage.injectedCacheFaults
            ? [
                  [
                      'faults injected (storage / cache)',
                      `${storage.injectedStorageFaults} / ${storage.injectedCacheFaults}`,
                  ] as [string, string],
              ]
            : []),
        [
            'runEveryMinute (runs / failed / debounced)',
            scheduled
                ? `${scheduled.runs} / ${scheduled.failures} / ${scheduled.debounced} (minute: ${scheduled.minuteMs} ms)`
                : 'n/a',
        ],
    ]
}

/** Where the host has an export path: which handler delivered, its jobs, and the metrics its UI showed. */
function exportRows(result: JobResult): Array<[string, string]> {
    const exported = result.exportPath
    if (!exported) {
        return [['handler', 'onEvent (this host has no export path, or the plugin exports no exportEvents)']]
    }
    const { jobs, metrics } = exported
    return [
        ['handler', `exportEvents (the host's export path ${exported.era}; onEvent stands aside)`],
        ['host batches', String(metrics.batches)],
        ['retry jobs (queued / ran / left)', `${jobs.enqueued} / ${jobs.ran} / ${jobs.left}`],
        ["PostHog's UI would show", exported.line],
    ]
}

/**
 * A failed setupPlugin, said loudly: PostHog itself records nothing for the events it skips meanwhile.
 * Empty when setup succeeded everywhere.
 */
export function formatSetupFailure(result: JobResult, era: string): string {
    const failing = result.setup.filter((status) => status.state !== 'ready')
    if (failing.length === 0 && result.skipped === 0) {
        return ''
    }
    const policy = getEra(era).setup
    const waits = setupRetryWaits(policy)
    const totalMin = Math.round(waits.reduce((sum, ms) => sum + ms, 0) / 60_000)
    const lastError = failing.find((status) => status.lastError)?.lastError ?? 'unknown error'
    const states = failing.map((status) =>
        status.state === 'disabled'
            ? `disabled after ${status.attempts} attempt(s)`
            : status.state === 'retrying'
              ? `retrying: attempt ${status.attempts} of ${policy.maxAttempts} failed, next in ${(status.nextWaitMs ?? 0) / 1000} s`
              : status.state
    )
    const lines = [
        `SETUP FAILED: setupPlugin threw: ${lastError}`,
        `${result.skipped} of ${result.events} events were SKIPPED: the host never called onEvent for them.`,
        'PostHog would show nothing for them: no error, no log line, no metric (only the setup error in the',
        "plugin's log). Those events are lost.",
        waits.length > 0
            ? `This host retries setup ${policy.maxAttempts} times, waiting ${waits
                  .slice(0, 2)
                  .map((ms) => `${ms / 1000} s`)
                  .join(
                      ', '
                  )}, … (about ${totalMin} minutes in all), skipping every event meanwhile, then disables the plugin.`
            : 'This host disables the plugin at once.',
        `Setup now: ${[...new Set(states)].join('; ')}.`,
    ]
    const width = Math.max(...lines.map((line) => line.length))
    const bar = '!'.repeat(width + 4)
    return [bar, ...lines.map((line) => `! ${line.padEnd(width)} !`), bar].join('\n') + '\n'
}

/** An outage: its clock starts at the first event; when the webhook came back (real ms), null while it is down. */
interface Outage {
    begin: () => void
    stop: () => void
    backUpAt: () => number | null
}

/**
 * --outage: the receiver answers 503 from now on, and its faults come back once the (scaled) outage has run from
 * the first event, so the events meet it however long the plugin takes to load.
 */
function startOutage(receiver: Receiver, options: CliOptions, io: CliIO): Outage | null {
    if (options.outageSeconds <= 0) {
        return null
    }
    const faults = resolveFaults(options.faults)
    receiver.setFaults({ ...faults, p503: 1 })
    const realSeconds = options.outageSeconds * options.timeScale
    io.stdout.write(
        `Webhook down (503) for ${options.outageSeconds} s from the first event, run ${options.timeScale}× as long: ` +
            `${realSeconds.toFixed(1)} s\n`
    )
    let backUpAt: number | null = null
    let timer: NodeJS.Timeout | null = null
    const begin = (): void => {
        timer ??= setTimeout(() => {
            receiver.setFaults(faults)
            backUpAt = Date.now()
            io.stdout.write('Webhook back up\n')
        }, realSeconds * 1000)
    }
    const stop = (): void => {
        if (timer) {
            clearTimeout(timer)
        }
    }
    return { begin, stop, backUpAt: () => backUpAt }
}

export interface CliIO {
    stdout: NodeJS.WritableStream
    stderr: NodeJS.WritableStream & { isTTY?: boolean }
}

/** The whole `npm start`, with its output streams injectable for tests. Returns the exit code. */
export async function runStartCli(argv: string[], env: Record<string, string | undefined>, io: CliIO): Promise<number> {
    // `--source posthog`: the same job fed from a PostHog stand-in through `sync` (tools/host/posthog-demo.ts).
    const source = argv.indexOf('--source')
    if (source >= 0 && argv[source + 1] === 'posthog') {
        const { runPostHogStart } = await import('./posthog-demo')
        return runPostHogStart([...argv.slice(0, source), ...argv.slice(source + 2)], io)
    }
    let options: CliOptions
    try {
        options = parseCli(argv, env)
    } catch (error) {
        io.stderr.write(`error: ${(error as Error).message}\n`)
        return 2
    }
    if (options.help) {
        io.stdout.write(HELP)
        return 0
    }
    let receiver: Receiver | null = null
    try {
        if (!options.webhookUrl) {
            receiver = await startReceiver({
                dataDir: options.dataDir,
                faults: resolveFaults(options.faults),
                seed: options.seed,
            })
        }
        return await runWithReceiver(options, receiver, io)
    } catch (error) {
        const prefix = error instanceof PluginLoadError ? 'the plugin failed to load: ' : ''
        io.stderr.write(`error: ${prefix}${(error as Error).message}\n`)
        return 1
    } finally {
        await receiver?.close()
    }
}

/** What the run is about to do: the era, the path and where the events go. */
function announce(options: CliOptions, receiver: Receiver | null, webhookUrl: string, io: CliIO): void {
    const era = getEra(options.era)
    io.stdout.write(`Host era ${era.name}: ${era.description}\n`)
    io.stdout.write(
        (options.path ?? defaultPath(era)) === 'kafka'
            ? `Kafka path: ${options.workers ?? DEFAULT_WORKERS} worker thread(s) × ${options.tasksPerWorker ?? DEFAULT_TASKS_PER_WORKER} tasks, processEvent before each onEvent\n`
            : `Direct path: ${era.concurrency} calls started together\n`
    )
    io.stdout.write(
        receiver
            ? `Embedded receiver on ${new URL(webhookUrl).origin}, faults: ${options.faults}, rows in ${receiver.rowsFile}\n`
            : 'Sending to the webhook given by --webhook-url\n'
    )
}

/** Runs the events through the host, prints the summary, and returns the exit code. */
async function runWithReceiver(options: CliOptions, receiver: Receiver | null, io: CliIO): Promise<number> {
    const webhookUrl = options.webhookUrl ?? receiver?.url ?? ''
    announce(options, receiver, webhookUrl, io)
    const outage = receiver ? startOutage(receiver, options, io) : null
    const sent = new Set<string>()
    const drain = receiver && outage ? untilDelivered(receiver, sent, options) : undefined
    const late = outage && drain ? { outage, drain } : null
    const { events, lateEvents } = eventSources(options, { sent, first: () => outage?.begin() }, late, io)
    const result = await runJob({
        era: options.era,
        webhookUrl,
        events,
        lateEvents,
        minuteMs: MINUTE_MS * options.timeScale,
        drain,
        pluginDir: options.pluginDir,
        path: options.path,
        workers: options.workers,
        tasksPerWorker: options.tasksPerWorker,
        setupRetryScale: options.setupRetryScale,
        jobTimeScale: options.timeScale,
        storageFaults: options.storageFaults,
        log: options.quiet ? undefined : (line) => io.stderr.write(logLine(line)),
        onProgress: progressWriter(options.eventsFile ? null : options.count, io),
    })
    outage?.stop()
    if (io.stderr.isTTY) {
        io.stderr.write('\r\x1b[K')
    }
    io.stdout.write(`\nSummary\n${formatSummary(result, receiver?.summary() ?? null)}\n`)
    const setupFailure = formatSetupFailure(result, options.era)
    if (setupFailure) {
        io.stderr.write(`\n${setupFailure}`)
    }
    const undelivered = result.exportPath?.metrics.undelivered ?? 0
    return result.failed > 0 || undelivered > 0 || setupFailure ? 1 : 0
}

/**
 * The events to send, each uuid kept in `sent`. During an outage in an era without scheduled tasks, only calls
 * drain the plugin's outbox, and in production they keep coming: the last events are held back and sent after the
 * outage, one call at a time, so that a call finds the webhook back (and the plugin drains what it kept).
 */
function eventSources(
    options: CliOptions,
    sent: { sent: Set<string>; first: () => void },
    late: { outage: Outage; drain: ReturnType<typeof untilDelivered> } | null,
    io: CliIO
) {
    const all = options.eventsFile ? readEventsFile(options.eventsFile) : sampleEvents(options.count, options.seed)
    if (!late || getEra(options.era).services.scheduledTasks) {
        return { events: remembered(all, sent), lateEvents: undefined }
    }
    const held = heldBackCount(options.eventsFile ? null : options.count)
    io.stdout.write(
        `No scheduled tasks in this era: the last ${options.eventsFile ? 'up to ' : ''}${held} events are sent ` +
            'after the outage, as traffic goes on, ' +
            'so a call finds the webhook back\n'
    )
    const { leading, tail } = holdBack(all, held)
    const traffic = { backUpAt: late.outage.backUpAt, caughtUp: late.drain.until }
    return { events: remembered(leading, sent), lateEvents: remembered(trafficAfterOutage(tail, traffic), sent) }
}

/** Passes the events on, keeping each uuid: the drain wait checks the receiver against them. */
async function* remembered(
    events: Iterable<ProcessedPluginEvent> | AsyncIterable<ProcessedPluginEvent>,
    uuids: { sent: Set<string>; first: () => void }
): AsyncGenerator<ProcessedPluginEvent> {
    for await (const event of events) {
        uuids.first()
        uuids.sent.add(event.uuid)
        yield event
    }
}

/**
 * Until the receiver holds every event sent, for the outage's minutes and DRAIN_EXTRA_MINUTES more at most (at
 * least DRAIN_EXTRA_MIN_REAL_MS of real time).
 */
function untilDelivered(receiver: Receiver, sent: Set<string>, options: CliOptions) {
    const minuteMs = MINUTE_MS * options.timeScale
    const extra = Math.max(DRAIN_EXTRA_MINUTES, Math.ceil(DRAIN_EXTRA_MIN_REAL_MS / minuteMs))
    return {
        until: () => {
            const stored = receiver.uuidCounts()
            return [...sent].every((uuid) => stored.has(uuid))
        },
        maxMinutes: Math.ceil(options.outageSeconds / 60) + extra,
    }
}

function logLine(line: string): string {
    return line.startsWith('host: ') ? `  [host] ${line.slice(6)}\n` : `  [plugin] ${line}\n`
}

/** A progress line at most once a second, rewritten in place on a terminal. */
function progressWriter(total: number | null, io: CliIO) {
    let lastProgress = Date.now()
    return ({ done, failed }: { done: number; failed: number }): void => {
        if (Date.now() - lastProgress < 1_000) {
            return
        }
        lastProgress = Date.now()
        const line = `  progress: ${done}${total ? `/${total}` : ''} events, ${failed} failed`
        io.stderr.write(io.stderr.isTTY ? `\r${line}` : `${line}\n`)
    }
}

if (require.main === module) {
    void runStartCli(process.argv.slice(2), process.env, process).then((code) => process.exit(code))
}
