/**
 * `npm run bench`: prints figures, compares each against a baseline measured in the same run. Not a test.
 *
 * 1. Plugins in the emulated 2021 host (bench/plugins/table.ts): a do-nothing plugin, a serialise-only plugin (the
 *    ceiling for a sender), the original per-event app (the baseline) and this plugin, on the direct and the
 *    Kafka path, at 0, 20 and 50 ms webhook latency. `--only`, `--path`, `--latency` run a subset.
 * 2. Replay: events/s for 100k realistic events against the raw limit; peak RSS replaying 1M events generated on
 *    the fly, against an idle Node process.
 */
import { spawn } from 'node:child_process'
import { createReadStream, createWriteStream, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { parseArgs } from 'node:util'

import { PROJECT_PLUGIN_DIR } from '../host/loader'
import { sampleEvents } from '../host/sample-events'
import { parseConfig } from '../index'
import { startReceiver } from '../receiver/receiver'
import { nodeEnv } from '../replay/cli'
import { replay } from '../replay/replay'
import { BENCH_LATENCIES_MS, BENCH_PATHS, BENCH_PLUGINS, parseList, runPluginTable } from './plugins/table'

const RAW_BATCH = 500
const REPLAY_CONCURRENCY = 4

interface Figures {
    requests: number
    events: number
    ms: number
}

async function receiverWith(latencyMs: number) {
    const dataDir = mkdtempSync(join(tmpdir(), 'bench-'))
    const rx = await startReceiver({ dataDir, persist: false, faults: { latencyMs } })
    return {
        rx,
        close: async () => {
            await rx.close()
            rmSync(dataDir, { recursive: true, force: true })
        },
    }
}

async function post(url: string, body: string): Promise<void> {
    const response = await fetch(url, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body })
    await response.arrayBuffer()
    if (response.status !== 200) {
        throw new Error(`bench receiver answered ${response.status}`)
    }
}

/** A plain loop's POSTer: collects JSON texts into arrays of RAW_BATCH and keeps `inFlight` requests going. */
function rawPoster(url: string, inFlight: number) {
    const pending = new Set<Promise<void>>()
    let batch: string[] = []
    const send = async (): Promise<void> => {
        const body = `[${batch.join(',')}]`
        batch = []
        while (pending.size >= inFlight) {
            await Promise.race(pending)
        }
        const p: Promise<void> = post(url, body).finally(() => pending.delete(p))
        pending.add(p)
    }
    return {
        add: async (json: string): Promise<void> => {
            batch.push(json)
            if (batch.length >= RAW_BATCH) {
                await send()
            }
        },
        finish: async (): Promise<void> => {
            if (batch.length) {
                await send()
            }
            await Promise.all(pending)
        },
    }
}

function jsonLines(count: number): Readable {
    return Readable.from(
        (function* () {
            for (const event of sampleEvents(count)) {
                yield JSON.stringify(event) + '\n'
            }
        })()
    )
}

async function measureReplay(file: string): Promise<Figures> {
    const { rx, close } = await receiverWith(0)
    const started = Date.now()
    const report = await replay({
        input: createReadStream(file, { highWaterMark: 1 << 20 }),
        config: parseConfig({ webhookUrl: rx.url }),
        env: nodeEnv(),
        concurrency: REPLAY_CONCURRENCY,
    })
    const figures = { requests: report.requests, events: report.delivered, ms: Date.now() - started }
    await close()
    return figures
}

/** The raw limit for replay: the same file's lines POSTed as arrays of RAW_BATCH by a plain loop, unparsed. */
async function measureRawFile(file: string, inFlight: number): Promise<Figures> {
    const { rx, close } = await receiverWith(0)
    const started = Date.now()
    const poster = rawPoster(rx.url, inFlight)
    let events = 0
    for await (const line of createInterface({ input: createReadStream(file, { highWaterMark: 1 << 20 }) })) {
        events++
        await poster.add(line)
    }
    await poster.finish()
    const figures = { requests: rx.summary().requests, events, ms: Date.now() - started }
    await close()
    return figures
}

/** Peak RSS of a child process, polled from /proc while it runs (VmHWM where the kernel reports it). */
async function peakRssMb(args: string[], feed: Readable | null, env: NodeJS.ProcessEnv): Promise<number> {
    const child = spawn(process.execPath, args, { env, stdio: [feed ? 'pipe' : 'ignore', 'ignore', 'ignore'] })
    let peakKb = 0
    const read = (): void => {
        try {
            const status = readFileSync(`/proc/${child.pid}/status`, 'utf8')
            const kb = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? /VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0)
            peakKb = Math.max(peakKb, kb)
        } catch {
            // The process has exited.
        }
    }
    const timer = setInterval(read, 50)
    if (feed && child.stdin) {
        feed.pipe(child.stdin)
    }
    const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)))
    clearInterval(timer)
    if (code !== 0) {
        throw new Error(`measured process exited with ${code}`)
    }
    return Math.round(peakKb / 1024)
}

function rate(f: Figures): number {
    return Math.round(f.events / Math.max(f.ms / 1000, 0.001))
}

async function main(): Promise<void> {
    const { values } = parseArgs({
        options: {
            quick: { type: 'boolean', default: false },
            only: { type: 'string' },
            path: { type: 'string' },
            latency: { type: 'string' },
            events: { type: 'string' },
            workers: { type: 'string', default: '1' },
            repeat: { type: 'string' },
            'replay-events': { type: 'string', default: '100000' },
            'rss-events': { type: 'string', default: '1000000' },
        },
    })
    const quick = values.quick
    process.stdout.write(
        `Patterns Connector bench, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
            `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}\n\n`
    )
    await runPluginTable(
        {
            plugins: parseList('only', values.only, BENCH_PLUGINS, (text) => text as (typeof BENCH_PLUGINS)[number]),
            paths: parseList('path', values.path, BENCH_PATHS, (text) => text as (typeof BENCH_PATHS)[number]),
            latencies: parseList('latency', values.latency, BENCH_LATENCIES_MS, Number),
            events: Number(values.events ?? (quick ? 500 : 3_000)),
            workers: Number(values.workers),
            repeat: Number(values.repeat ?? (quick ? 1 : 3)),
        },
        (text) => process.stdout.write(text)
    )
    // A subset of the plugin table is a quick look at one figure: the replay part runs only in a full bench.
    if (values.only !== undefined || values.path !== undefined || values.latency !== undefined) {
        return
    }

    const replayEvents = quick ? 5_000 : Number(values['replay-events'])
    process.stdout.write(`\nReplay of ${replayEvents} realistic events (JSON Lines, ${REPLAY_CONCURRENCY} in flight)\n`)
    const workDir = mkdtempSync(join(tmpdir(), 'bench-input-'))
    const file = join(workDir, 'events.jsonl')
    await pipeline(jsonLines(replayEvents), createWriteStream(file))
    const replayed = await measureReplay(file)
    const raw = await measureRawFile(file, REPLAY_CONCURRENCY)
    rmSync(workDir, { recursive: true, force: true })
    process.stdout.write(
        `  replay    ${rate(replayed)} events/s in ${replayed.requests} requests (reading the file, parsing, filtering)\n` +
            `  raw limit ${rate(raw)} events/s in ${raw.requests} requests (same file, plain loop, arrays of ${RAW_BATCH}, ${REPLAY_CONCURRENCY} in flight)\n` +
            `  replay / raw = ${((rate(replayed) / rate(raw)) * 100).toFixed(0)}% (target ≥ 60%)\n`
    )

    const rssEvents = quick ? 20_000 : Number(values['rss-events'])
    process.stdout.write(`\nPeak RSS replaying ${rssEvents} events generated on the fly into standard input\n`)
    const { rx, close } = await receiverWith(0)
    const bin = join(PROJECT_PLUGIN_DIR, 'bin', 'patterns-connector.js')
    const started = Date.now()
    const replayRss = await peakRssMb([bin, 'replay', '-'], jsonLines(rssEvents), {
        ...process.env,
        PATTERNS_WEBHOOK_URL: rx.url,
    })
    const seconds = (Date.now() - started) / 1000
    const rows = rx.summary().rows
    await close()
    const idleRss = await peakRssMb(['-e', 'require("tsx/cjs"); setTimeout(() => {}, 300)'], null, process.env)
    process.stdout.write(
        `  replay    ${replayRss} MB peak RSS, ${rows} rows received, ${Math.round(rows / seconds)} events/s\n` +
            `  baseline  ${idleRss} MB peak RSS (idle Node with the same TypeScript loader)\n` +
            `  target    ≤ 200 MB\n`
    )
}

void main().catch((error) => {
    process.stderr.write(`bench failed: ${(error as Error).message}\n`)
    process.exit(1)
})
