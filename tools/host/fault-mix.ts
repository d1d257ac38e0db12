/**
 * The outbox's fault mix: the plugin in the emulated host while its storage and its cache each fail a share of
 * their calls, the webhook flaps between down and up, and the host is restarted halfway (fresh VMs over the same
 * storage). The run goes on after the events, runEveryMinute included, until the receiver holds every event and
 * the outbox is empty, or a bound passed. `npx tsx tools/host/fault-mix.ts [era] [events]` prints the figures
 * (with FAULT_MIX_LOG=file, the plugin's and the host's log lines go to that file).
 */
import { appendFileSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { OUTBOX_STATE_KEY, readOutboxState } from '../../index'
import { Receiver, startReceiver } from '../receiver/receiver'
import { PROJECT_PLUGIN_DIR } from './loader'
import { JobResult, runJob } from './run'
import { sampleEvents } from './sample-events'
import { callFaults, DEFAULT_PLUGIN_CONFIG_ID, HostStore } from './storage'

export interface FaultMixOptions {
    era: string
    events: number
    /** The share of storage calls, and of cache calls, that fail (each on its own dice). */
    failRate: number
    /** The webhook answers 503 for `downMs`, then 200 for `upMs`, over and over. */
    downMs: number
    upMs: number
    /** The host's minute in real ms: runEveryMinute's period and the clock of cache TTLs. */
    minuteMs: number
    /** After the events, how many scaled minutes the host may go on draining. */
    maxDrainMinutes: number
    seed: number
    /** Also hand each plugin and host log line to this. */
    log?: (line: string) => void
}

export const DEFAULT_FAULT_MIX: FaultMixOptions = {
    era: 'vm2024',
    events: 1_000,
    failRate: 0.05,
    downMs: 1_500,
    upMs: 1_000,
    minuteMs: 1_000,
    maxDrainMinutes: 90,
    seed: 7,
}

/** The export buffer's size in the eras that have one: about 30 sample events. */
const EXPORT_BUFFER_BYTES = 16_384

export interface FaultMixFigures {
    era: string
    events: number
    /** Distinct events the receiver holds, and rows it holds twice or more. */
    delivered: number
    duplicateRows: number
    /** Calls that threw to the host, over both runs; events the outbox kept (a call that resolved). */
    failedToHost: number
    keptEvents: number
    injectedStorageFaults: number
    injectedCacheFaults: number
    webhookFlaps: number
    /** runEveryMinute over both runs: runs, failures, and minutes not run because the previous run still went. */
    scheduled: { runs: number; failures: number; debounced: number }
    /** Every key left in plugin storage, and what the index says. */
    storageKeys: string[]
    index: { head: number; tail: number; events: number; bytes: number }
    durationMs: number
}

/** Runs the mix; the receiver's and the database's folders are removed afterwards. */
export async function runFaultMix(options: FaultMixOptions = DEFAULT_FAULT_MIX): Promise<FaultMixFigures> {
    const started = Date.now()
    const dir = mkdtempSync(join(tmpdir(), 'fault-mix-'))
    const store = new HostStore({
        faults: {
            failStorage: callFaults({ rate: options.failRate, seed: options.seed }),
            failCache: callFaults({ rate: options.failRate, seed: options.seed + 1 }),
        },
    })
    const rx = await startReceiver({ dataDir: dir, faults: { p503: 1 }, seed: options.seed })
    const flapping = flap(rx, options)
    const events = [...sampleEvents(options.events, options.seed)]
    const results: JobResult[] = []
    try {
        const run = (slice: typeof events, drain: boolean) =>
            runJob({
                era: options.era,
                webhookUrl: rx.url,
                events: slice,
                pluginDir: PROJECT_PLUGIN_DIR,
                store,
                minuteMs: options.minuteMs,
                jobTimeScale: 0.001,
                // Where the host buffers for exportEvents, small batches: many of them meet the webhook down.
                config: { exportEventsBufferBytes: String(EXPORT_BUFFER_BYTES) },
                log: options.log,
                drain: drain
                    ? { until: () => isDone(store, rx, events.length), maxMinutes: options.maxDrainMinutes }
                    : undefined,
            })
        flapping.downFromNextRequest()
        results.push(await run(events.slice(0, events.length / 2), false))
        // The host restarts: new VMs (new meta.global), the same plugin storage and cache.
        flapping.downFromNextRequest()
        results.push(await run(events.slice(events.length / 2), true))
    } finally {
        flapping.stop()
    }
    try {
        return await figuresAfter({
            options,
            events: events.length,
            store,
            rx,
            results,
            flaps: flapping.flaps(),
            started,
        })
    } finally {
        await store.close()
        await rx.close()
        rmSync(dir, { recursive: true, force: true })
    }
}

/** What the two runs left: the receiver's rows, the store's contents and faults, the runs' own figures. */
async function figuresAfter(run: {
    options: FaultMixOptions
    events: number
    store: HostStore
    rx: Receiver
    results: JobResult[]
    flaps: number
    started: number
}): Promise<FaultMixFigures> {
    const { store, results } = run
    const contents = await store.contents(DEFAULT_PLUGIN_CONFIG_ID)
    const figures = await store.figures()
    const summary = run.rx.summary()
    const index = readOutboxState(contents[OUTBOX_STATE_KEY])
    return {
        era: run.options.era,
        events: run.events,
        delivered: summary.uniqueUuids,
        duplicateRows: summary.duplicateRows,
        failedToHost: sum(results, (result) => result.failed),
        keptEvents: sum(results, (result) => result.sender?.kept ?? 0),
        injectedStorageFaults: figures.injectedStorageFaults,
        injectedCacheFaults: figures.injectedCacheFaults,
        webhookFlaps: run.flaps,
        scheduled: {
            runs: sum(results, (result) => result.scheduled?.runs ?? 0),
            failures: sum(results, (result) => result.scheduled?.failures ?? 0),
            debounced: sum(results, (result) => result.scheduled?.debounced ?? 0),
        },
        storageKeys: Object.keys(contents),
        index: { head: index.head, tail: index.tail, events: index.events, bytes: index.bytes },
        durationMs: Date.now() - run.started,
    }
}

const sum = <T>(items: readonly T[], value: (item: T) => number): number =>
    items.reduce((total, item) => total + value(item), 0)

/** How often the flap looks for the request that starts its first down window. */
const FLAP_POLL_MS = 10

/**
 * The webhook down (503) for `downMs`, then up for `upMs`, over and over. `downFromNextRequest` starts it down
 * again, its window counted from the next request: each run's first batches meet the webhook down however long
 * the plugin took to load, so how fast the machine is does not decide whether the outbox is used.
 */
function flap(
    rx: Receiver,
    options: FaultMixOptions
): {
    downFromNextRequest: () => void
    stop: () => void
    flaps: () => number
} {
    let flaps = 0
    let down = true
    let timer: NodeJS.Timeout | null = null
    const toggle = (): void => {
        down = !down
        flaps++
        rx.setFaults({ p503: down ? 1 : 0 })
        timer = setTimeout(toggle, down ? options.downMs : options.upMs)
    }
    const stop = (): void => {
        if (timer) {
            clearTimeout(timer)
        }
        timer = null
    }
    const downFromNextRequest = (): void => {
        stop()
        down = true
        rx.setFaults({ p503: 1 })
        const seen = rx.summary().requests
        const poll = (): void => {
            const begun = rx.summary().requests > seen
            timer = begun ? setTimeout(toggle, options.downMs) : setTimeout(poll, FLAP_POLL_MS)
        }
        poll()
    }
    return { downFromNextRequest, stop, flaps: () => flaps }
}

/** Every event arrived, and plugin storage holds nothing but an empty index. */
async function isDone(store: HostStore, rx: Receiver, total: number): Promise<boolean> {
    if (rx.summary().uniqueUuids < total) {
        return false
    }
    const contents = await store.contents(DEFAULT_PLUGIN_CONFIG_ID)
    const index = readOutboxState(contents[OUTBOX_STATE_KEY])
    const rows = Object.keys(contents)
    return rows.every((key) => key === OUTBOX_STATE_KEY) && index.head >= index.tail && index.reclaim.length === 0
}

export function faultMixLines(figures: FaultMixFigures, options: FaultMixOptions): string[] {
    const percent = (n: number) => ((100 * n) / figures.events).toFixed(2)
    return [
        `fault mix, era ${figures.era}: ${figures.events} events, storage and cache failing ${options.failRate * 100}% ` +
            `of calls, webhook down ${options.downMs} ms / up ${options.upMs} ms, host restarted halfway`,
        `  delivered                   ${figures.delivered} of ${figures.events} (${percent(figures.delivered)}%)`,
        `  duplicate rows              ${figures.duplicateRows} (${percent(figures.duplicateRows)}%)`,
        `  failed (thrown to host)     ${figures.failedToHost}`,
        `  kept in the outbox          ${figures.keptEvents} events`,
        `  faults injected             ${figures.injectedStorageFaults} storage / ${figures.injectedCacheFaults} cache`,
        `  webhook flaps               ${figures.webhookFlaps}`,
        `  runEveryMinute              ${figures.scheduled.runs} runs, ${figures.scheduled.failures} failed, ` +
            `${figures.scheduled.debounced} minutes not run (the previous run still going)`,
        `  storage rows left           ${figures.storageKeys.length} (${figures.storageKeys.join(', ')})`,
        `  index                       head ${figures.index.head}, tail ${figures.index.tail}, ` +
            `${figures.index.events} events, ${figures.index.bytes} bytes`,
        `  duration                    ${(figures.durationMs / 1000).toFixed(1)} s`,
    ]
}

if (require.main === module) {
    const [era, events] = process.argv.slice(2)
    const logFile = process.env.FAULT_MIX_LOG
    const options: FaultMixOptions = {
        ...DEFAULT_FAULT_MIX,
        era: era ?? DEFAULT_FAULT_MIX.era,
        events: Number(events ?? DEFAULT_FAULT_MIX.events),
        log: logFile ? (line) => appendFileSync(logFile, `${new Date().toISOString()} ${line}\n`) : undefined,
    }
    void runFaultMix(options).then(
        (figures) => console.log(faultMixLines(figures, options).join('\n')),
        (error: unknown) => {
            console.error(error)
            process.exitCode = 1
        }
    )
}
