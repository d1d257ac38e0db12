/**
 * The plugin part of `npm run bench`: five plugins side by side in one run on the emulated 2021 host (vm2021),
 * on both host paths, at several webhook latencies. Two baselines: the 2022 exportEvents app (the host buffers,
 * one POST per batch) and the 2023 per-event app (one POST per event). The serialise-only plugin is the ceiling
 * for anything that sends from onEvent; the do-nothing plugin is the host's own. Events/s count until the
 * receiver holds every event: the export buffer's last flush, at teardown, counts.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { PROJECT_PLUGIN_DIR, readPluginSource } from '../../host/loader'
import { HostPath, runJob } from '../../host/run'
import { sampleEvents } from '../../host/sample-events'
import { startReceiver } from '../../receiver/receiver'
import { startReceiverThread } from './receiver-thread'

export const BENCH_PLUGINS = ['do-nothing', 'serialise-only', 'original', 'export-app', 'plugin'] as const
export type BenchPlugin = (typeof BENCH_PLUGINS)[number]
export const BENCH_LATENCIES_MS = [0, 20, 50]
export const BENCH_PATHS: readonly HostPath[] = ['direct', 'kafka']
export const BENCH_ERA = 'vm2021'

/** Ratios measured in PostHog's own 2021 host on a 2-core machine, against the original per-event app. */
export const POSTHOG_2021_RATIOS: Record<'do-nothing' | 'serialise-only', Record<HostPath, number>> = {
    'do-nothing': { direct: 6.4, kafka: 4.7 },
    'serialise-only': { direct: 3, kafka: 2.6 },
}

export interface TableOptions {
    plugins: BenchPlugin[]
    paths: HostPath[]
    latencies: number[]
    /** Events per run; fewer for the per-event app at higher latency (see eventsFor). */
    events: number
    /** Kafka path worker threads; PostHog's figures came from 1. */
    workers: number
    /** Runs of each figure at 0 ms, interleaved; the best is kept (other work on the machine only slows a run). */
    repeat: number
    /** Events with the ~45 properties posthog-js sends, instead of the ~10 of the sample events. */
    richEvents?: boolean
    /** The receiver on its own thread instead of the bench's main thread (the host's consumer thread). */
    receiverThread?: boolean
}

interface BenchReceiver {
    url: string
    requests: () => Promise<number>
    close: () => Promise<void>
}

async function benchReceiver(latencyMs: number, ownThread: boolean): Promise<BenchReceiver> {
    if (ownThread) {
        return startReceiverThread(latencyMs)
    }
    const dataDir = mkdtempSync(join(tmpdir(), 'bench-'))
    const rx = await startReceiver({ dataDir, persist: false, faults: { latencyMs } })
    return {
        url: rx.url,
        requests: async () => rx.summary().requests,
        close: async () => {
            await rx.close()
            rmSync(dataDir, { recursive: true, force: true })
        },
    }
}

/** The properties posthog-js adds to a browser event, on top of the sample event's own. */
function posthogJsProperties(n: number): Record<string, unknown> {
    return {
        $host: 'app.example.com',
        $browser_version: 120 + (n % 5),
        $browser_language: 'en-US',
        $screen_height: 1080,
        $screen_width: 1920,
        $viewport_height: 960,
        $viewport_width: 1800,
        $referrer: '$direct',
        $referring_domain: '$direct',
        $insert_id: `ins${n.toString(36).padStart(12, '0')}`,
        $time: 1795748400 + n / 4,
        $device_id: `0190a1b2-${(n % 997).toString(16).padStart(4, '0')}-7000-8000-0000000000ff`,
        $window_id: `0190a1b2-${(n % 991).toString(16).padStart(4, '0')}-7000-8000-0000000000ee`,
        $pageview_id: `0190a1b2-${(n % 983).toString(16).padStart(4, '0')}-7000-8000-0000000000dd`,
        $active_feature_flags: ['new-onboarding', 'pricing-v2'],
        '$feature/new-onboarding': true,
        '$feature/pricing-v2': 'test',
        $feature_flag_payloads: {},
        $timezone: 'Europe/Berlin',
        $configured_session_timeout_ms: 1_800_000,
        $is_identified: n % 3 === 0,
        $process_person_profile: true,
        $sent_at: '2026-11-27T00:00:00.000Z',
        $raw_user_agent: 'Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko)',
        $initial_referrer: '$direct',
        $initial_referring_domain: '$direct',
        $initial_current_url: 'https://app.example.com/',
        $initial_pathname: '/',
        $geoip_city_name: 'Berlin',
        $geoip_country_name: 'Germany',
        $geoip_continent_code: 'EU',
        $geoip_latitude: 52.52,
        $geoip_longitude: 13.405,
        $geoip_time_zone: 'Europe/Berlin',
        token: 'phc_benchbenchbenchbenchbenchbenchbench',
    }
}

function benchEvents(count: number, rich: boolean) {
    const events = [...sampleEvents(count)]
    if (rich) {
        events.forEach((event, n) => Object.assign(event.properties, posthogJsProperties(n)))
    }
    return events
}

export interface Figures {
    events: number
    requests: number
    ms: number
    /** CPU time of every thread of the process (host, worker threads, receiver) while the events ran. */
    cpuMs: number
    failed: number
}

function sourceOf(plugin: BenchPlugin): string {
    if (plugin === 'plugin') {
        return readPluginSource(PROJECT_PLUGIN_DIR)
    }
    const file = plugin === 'original' ? 'original-app.ts' : `${plugin}.ts`
    // export-app.ts, do-nothing.ts and serialise-only.ts sit next to this file.
    return readFileSync(join(__dirname, file), 'utf8')
}

/**
 * Events per run: the same count at every latency, as in PostHog's own host, except for the per-event app where
 * the webhook is slow (a third as many, to keep its runs short; one POST per event makes its figure latency-bound).
 * With fewer events, the last buffer and its flush, which cost the same whatever the count, weighed three times
 * as much at 50 ms as at 0 ms and drew the export-path plugins' figures together.
 */
export function eventsFor(plugin: BenchPlugin, latencyMs: number, events: number): number {
    return plugin !== 'original' || latencyMs === 0 ? events : Math.max(300, Math.round(events / 3))
}

/** Runs per plugin: best of `repeat` everywhere but the per-event app at latency, whose figure does not vary. */
export function runsFor(plugin: BenchPlugin, latencyMs: number, repeat: number): number {
    return plugin === 'original' && latencyMs > 0 ? 1 : repeat
}

export async function measure(
    plugin: BenchPlugin,
    path: HostPath,
    latencyMs: number,
    count: number,
    workers: number,
    richEvents = false,
    receiverThread = false
): Promise<Figures> {
    const rx = await benchReceiver(latencyMs, receiverThread)
    try {
        const result = await runJob({
            era: BENCH_ERA,
            path,
            workers,
            webhookUrl: rx.url,
            events: benchEvents(count, richEvents),
            pluginDir: PROJECT_PLUGIN_DIR,
            source: sourceOf(plugin),
        })
        return {
            events: result.resolved,
            requests: await rx.requests(),
            ms: result.deliveredMs,
            cpuMs: result.deliveredCpuMs,
            failed: result.failed + result.skipped,
        }
    } finally {
        await rx.close()
    }
}

export function rate(f: Figures): number {
    return Math.round(f.events / Math.max(f.ms / 1000, 0.001))
}

/** CPU microseconds per event, all threads together. */
export function cpuPerEvent(f: Figures): number {
    return Math.round((f.cpuMs * 1000) / Math.max(f.events, 1))
}

function cells(values: Array<string | number>, widths: number[]): string {
    return values.map((v, i) => String(v).padStart(widths[i] ?? 10)).join('  ')
}

const WIDTHS = [7, 6, 14, 6, 7, 9, 6, 11, 8, 9]

const HEADINGS = [
    'latency',
    'path',
    'plugin',
    'events',
    'ev/s',
    'CPU µs/ev',
    'req/ev',
    '÷ per-event',
    '÷ export',
    '÷ ceiling',
]

function tableTitle(options: TableOptions): string {
    return (
        `Plugins in the emulated ${BENCH_ERA} host (vm2 3.9.5, PostHog's transforms), embedded receiver on loopback ` +
        (options.receiverThread ? 'in its own thread; ' : "in the host's main thread; ") +
        `Kafka path with ${options.workers} worker thread(s) × 10 tasks; best of ${options.repeat} interleaved runs` +
        (options.richEvents ? '; events with posthog-js properties\n' : '\n')
    )
}

/** Measures every plugin at one latency and path, interleaved, keeping each plugin's best run. */
async function measureAll(options: TableOptions, latencyMs: number, path: HostPath, figures: Map<string, Figures>) {
    const runs = Math.max(...options.plugins.map((plugin) => runsFor(plugin, latencyMs, options.repeat)))
    for (let run = 0; run < runs; run++) {
        for (const plugin of options.plugins) {
            if (run >= runsFor(plugin, latencyMs, options.repeat)) {
                continue
            }
            const key = `${latencyMs}/${path}/${plugin}`
            const { workers, richEvents, receiverThread } = options
            const count = eventsFor(plugin, latencyMs, options.events)
            const f = await measure(plugin, path, latencyMs, count, workers, richEvents, receiverThread)
            const best = figures.get(key)
            if (!best || rate(f) > rate(best)) {
                figures.set(key, f)
            }
        }
    }
}

/** One row of the table: a plugin's figures, and its ratios to both baselines and the ceiling. */
function tableRow(figures: Map<string, Figures>, latencyMs: number, path: HostPath, plugin: BenchPlugin): string {
    const at = (name: string) => figures.get(`${latencyMs}/${path}/${name}`)
    const f = at(plugin) as Figures
    const ratio = (base: Figures | undefined) => (base ? (rate(f) / Math.max(rate(base), 1)).toFixed(2) : '-')
    const requests = (f.requests / Math.max(f.events, 1)).toFixed(3)
    const values = [`${latencyMs} ms`, path, plugin, f.events, rate(f), cpuPerEvent(f), requests]
    const row = cells([...values, ratio(at('original')), ratio(at('export-app')), ratio(at('serialise-only'))], WIDTHS)
    return row + (f.failed ? ` (${f.failed} failed)` : '') + '\n'
}

/** Runs the table and writes it as it goes. Returns every figure by "latency/path/plugin". */
export async function runPluginTable(
    options: TableOptions,
    write: (text: string) => void
): Promise<Map<string, Figures>> {
    const figures = new Map<string, Figures>()
    write(tableTitle(options))
    write(cells(HEADINGS, WIDTHS) + '\n')
    for (const latencyMs of options.latencies) {
        for (const path of options.paths) {
            await measureAll(options, latencyMs, path, figures)
            for (const plugin of options.plugins) {
                write(tableRow(figures, latencyMs, path, plugin))
            }
        }
    }
    write(calibration(figures) + '\n')
    write(targets(figures) + '\n')
    return figures
}

/**
 * This plugin's targets in the 2021 era, where the host has an export path: against the 2022 exportEvents app
 * (the app it replaces, on that app's own host) and the 2023 per-event app, and requests per event.
 */
export const PLUGIN_TARGETS = {
    /** At least the 2022 export app's events/s, at every latency, on that app's own host. */
    exportAppRatio: 1,
    /** At least this many times the per-event app: at 0 ms, and where the webhook is slow (50 ms or more). */
    perEventRatioFast: 2.5,
    perEventRatioSlow: 10,
    maxRequestsPerEvent: 0.01,
}

function targetLine(figures: Map<string, Figures>, latency: string, path: HostPath): string | null {
    const f = figures.get(`${latency}/${path}/plugin`)
    const perEvent = figures.get(`${latency}/${path}/original`)
    const exportApp = figures.get(`${latency}/${path}/export-app`)
    if (!f) {
        return null
    }
    const verdict = (ok: boolean): string => (ok ? 'ok' : 'MISSED')
    const parts: string[] = []
    if (exportApp) {
        const ratio = rate(f) / Math.max(rate(exportApp), 1)
        parts.push(`÷ export app ${ratio.toFixed(2)} (${verdict(ratio >= PLUGIN_TARGETS.exportAppRatio)})`)
    }
    const wanted =
        Number(latency) === 0
            ? PLUGIN_TARGETS.perEventRatioFast
            : Number(latency) >= 50
              ? PLUGIN_TARGETS.perEventRatioSlow
              : null
    if (perEvent && wanted !== null) {
        const ratio = rate(f) / Math.max(rate(perEvent), 1)
        parts.push(`÷ per-event ${ratio.toFixed(2)} (${verdict(ratio >= wanted)})`)
    }
    const requests = f.requests / Math.max(f.events, 1)
    parts.push(`req/ev ${requests.toFixed(4)} (${verdict(requests <= PLUGIN_TARGETS.maxRequestsPerEvent)})`)
    return `  ${`${latency} ms`.padStart(5)} ${path.padEnd(6)} ${parts.join(', ')}`
}

/** One line per measured latency and path: does the plugin meet the targets in this run? */
export function targets(figures: Map<string, Figures>): string {
    const t = PLUGIN_TARGETS
    const lines = [
        `Targets for this plugin (÷ export app ≥ ${t.exportAppRatio}; ÷ per-event ≥ ${t.perEventRatioFast} at 0 ms, ` +
            `≥ ${t.perEventRatioSlow} at 50 ms; req/ev ≤ ${t.maxRequestsPerEvent}):`,
    ]
    const seen = new Set<string>()
    for (const key of figures.keys()) {
        const [latency, path] = key.split('/') as [string, HostPath]
        if (!seen.has(`${latency}/${path}`)) {
            seen.add(`${latency}/${path}`)
            const line = targetLine(figures, latency, path)
            if (line) {
                lines.push(line)
            }
        }
    }
    return lines.length > 1 ? lines.join('\n') : ''
}

/** How the emulator's ratios at 0 ms compare with those measured in PostHog's own 2021 host. */
export function calibration(figures: Map<string, Figures>): string {
    const lines = [
        'Calibration at 0 ms, ÷ original app by events/s and by CPU per event (PostHog 2021 host, events/s, in brackets):',
    ]
    for (const plugin of ['do-nothing', 'serialise-only'] as const) {
        const parts: string[] = []
        for (const path of BENCH_PATHS) {
            const f = figures.get(`0/${path}/${plugin}`)
            const original = figures.get(`0/${path}/original`)
            if (f && original) {
                const ratio = rate(f) / Math.max(rate(original), 1)
                const cpuRatio = cpuPerEvent(original) / Math.max(cpuPerEvent(f), 1)
                parts.push(
                    `${path} ${ratio.toFixed(1)} / CPU ${cpuRatio.toFixed(1)} (${POSTHOG_2021_RATIOS[plugin][path]})`
                )
            }
        }
        if (parts.length) {
            lines.push(`  ${plugin.padEnd(15)} ${parts.join(', ')}`)
        }
    }
    return lines.length > 1 ? lines.join('\n') : ''
}

/** Parses a comma list against the allowed values, naming the flag in the error. */
export function parseList<T extends string | number>(
    flag: string,
    value: string | undefined,
    allowed: readonly T[],
    parse: (text: string) => T
): T[] {
    if (value === undefined) {
        return [...allowed]
    }
    const items = value.split(',').map((text) => parse(text.trim()))
    for (const item of items) {
        if (typeof item === 'string' && !allowed.includes(item)) {
            throw new Error(`--${flag}: unknown "${item}"; choose from ${allowed.join(', ')}`)
        }
        if (typeof item === 'number' && !(Number.isInteger(item) && item >= 0)) {
            throw new Error(`--${flag}: expected whole milliseconds, got "${value}"`)
        }
    }
    return items
}
