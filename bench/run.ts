/**
 * `npm run bench`: prints figures, compares each against a baseline measured in the same run. Not a test.
 *
 * 1. Plugin through the host emulator (vm2024 sandbox) at host concurrency 1, 10 and 100, webhook latency 0 and
 *    50 ms, against: one POST per event (what the original app did), and the raw limit (a plain loop POSTing
 *    the same events as arrays of 500).
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
import { runJob } from '../host/run'
import { sampleEvents } from '../host/sample-events'
import { parseConfig } from '../index'
import { startReceiver } from '../receiver/receiver'
import { nodeEnv } from '../replay/cli'
import { replay } from '../replay/replay'

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

async function measurePlugin(count: number, concurrency: number, latencyMs: number): Promise<Figures> {
    const { rx, close } = await receiverWith(latencyMs)
    const started = Date.now()
    const result = await runJob({
        era: 'vm2024',
        webhookUrl: rx.url,
        events: sampleEvents(count),
        pluginDir: PROJECT_PLUGIN_DIR,
        concurrency,
    })
    const figures = { requests: rx.summary().requests, events: result.resolved, ms: Date.now() - started }
    await close()
    return figures
}

/** One POST per event, `concurrency` at a time, as the original app did under the same host. */
async function measurePerEvent(count: number, concurrency: number, latencyMs: number): Promise<Figures> {
    const { rx, close } = await receiverWith(latencyMs)
    const started = Date.now()
    let group: Promise<void>[] = []
    for (const event of sampleEvents(count)) {
        group.push(post(rx.url, JSON.stringify(event)))
        if (group.length >= concurrency) {
            await Promise.all(group)
            group = []
        }
    }
    await Promise.all(group)
    const figures = { requests: rx.summary().requests, events: count, ms: Date.now() - started }
    await close()
    return figures
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

/** The raw limit: the same events as arrays of RAW_BATCH, by a plain loop. */
async function measureRaw(count: number, latencyMs: number): Promise<Figures> {
    const { rx, close } = await receiverWith(latencyMs)
    const started = Date.now()
    const poster = rawPoster(rx.url, 1)
    for (const event of sampleEvents(count)) {
        await poster.add(JSON.stringify(event))
    }
    await poster.finish()
    const figures = { requests: rx.summary().requests, events: count, ms: Date.now() - started }
    await close()
    return figures
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

function row(cells: Array<string | number>, widths: number[]): string {
    return cells.map((c, i) => String(c).padStart(widths[i] ?? 10)).join('  ')
}

function rate(f: Figures): number {
    return Math.round(f.events / Math.max(f.ms / 1000, 0.001))
}

async function main(): Promise<void> {
    const { values } = parseArgs({
        options: {
            quick: { type: 'boolean', default: false },
            'replay-events': { type: 'string', default: '100000' },
            'rss-events': { type: 'string', default: '1000000' },
        },
    })
    const quick = values.quick
    process.stdout.write(
        `Patterns Connector bench, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
            `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}\n\n`
    )
    process.stdout.write('Plugin in the vm2024 host emulator, embedded receiver on loopback\n')
    const widths = [11, 8, 7, 14, 11, 14, 11, 11]
    process.stdout.write(
        row(
            [
                'concurrency',
                'latency',
                'events',
                'plugin req/ev',
                'plugin ev/s',
                'per-event req/ev',
                'per-ev ev/s',
                'raw ev/s',
            ],
            widths
        ) + '\n'
    )
    for (const latencyMs of [0, 50]) {
        for (const concurrency of [1, 10, 100]) {
            const count = quick ? 100 : latencyMs === 0 ? 2_000 : concurrency === 1 ? 100 : 1_000
            const plugin = await measurePlugin(count, concurrency, latencyMs)
            const perEvent = await measurePerEvent(count, concurrency, latencyMs)
            const raw = await measureRaw(count, latencyMs)
            process.stdout.write(
                row(
                    [
                        concurrency,
                        `${latencyMs} ms`,
                        count,
                        (plugin.requests / plugin.events).toFixed(3),
                        rate(plugin),
                        (perEvent.requests / perEvent.events).toFixed(3),
                        rate(perEvent),
                        rate(raw),
                    ],
                    widths
                ) + '\n'
            )
        }
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
