/**
 * `npx tsx bench/replay.ts`: replay from a JSON Lines file, each figure against a baseline measured in the same run.
 *
 * 1. Throughput: replay of N realistic events from a file, against the raw limit (a plain loop POSTing the same
 *    file's lines, unparsed, as arrays of 500, as many in flight).
 * 2. Peak RSS of the replay CLI reading 100k and 1M events from a file, against an idle Node process with the
 *    same TypeScript loader (baseline) and the ceiling the README promises.
 *
 * `benchReplay()` is exported so another bench (sync) can compare with replay in one run.
 */
import { spawn } from 'node:child_process'
import { createReadStream, createWriteStream, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { parseArgs } from 'node:util'

import { parseConfig } from '../../index'
import { batchBodyBytes } from '../../pipeline/body'
import { nodeEnv } from '../../replay/cli'
import { replay } from '../../replay/replay'
import { sampleEvents } from '../host/sample-events'
import { startReceiver } from '../receiver/receiver'

export const RAW_BATCH = 500
export const REPLAY_CONCURRENCY = 4
/** The share of the raw limit replay must reach. */
export const THROUGHPUT_TARGET = 0.6
/** The most a replay from a file may take, whatever its size (README). */
export const RSS_CEILING_MB = 200
const BIN = join(__dirname, '..', '..', 'bin', 'patterns-connector.js')
/** Linux's USER_HZ, the unit of the CPU times in /proc/<pid>/stat (`getconf CLK_TCK`). */
const CLOCK_TICKS_PER_S = 100

export interface Figures {
    requests: number
    events: number
    ms: number
}

export interface ReplayBench {
    events: number
    replay: Figures
    raw: Figures
    /** Peak RSS of the replay CLI per input size, and of an idle Node process with the same loader. */
    rss: Array<{ events: number; peakMb: number; rows: number; ms: number }>
    idleMb: number
}

export function rate(f: Figures): number {
    return Math.round(f.events / Math.max(f.ms / 1000, 0.001))
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

/** Realistic events as JSON Lines, written to `file`. */
export async function writeEventsFile(file: string, count: number): Promise<void> {
    const lines = Readable.from(
        (function* () {
            for (const event of sampleEvents(count)) {
                yield JSON.stringify(event) + '\n'
            }
        })()
    )
    await pipeline(lines, createWriteStream(file))
}

/** Replay in this process, from the file, against a receiver on loopback. */
export async function measureReplay(file: string): Promise<Figures> {
    const { rx, close } = await receiverWith(0)
    const started = Date.now()
    const report = await replay({
        input: createReadStream(file),
        config: parseConfig({ webhookUrl: rx.url }),
        env: nodeEnv(),
        concurrency: REPLAY_CONCURRENCY,
    })
    const figures = { requests: report.requests, events: report.delivered, ms: Date.now() - started }
    await close()
    return figures
}

async function post(url: string, body: Uint8Array): Promise<void> {
    const response = await fetch(url, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body })
    await response.arrayBuffer()
    if (response.status !== 200) {
        throw new Error(`bench receiver answered ${response.status}`)
    }
}

/** The raw limit: the same file's lines POSTed as arrays of RAW_BATCH by a plain loop, unparsed. */
export async function measureRawFile(file: string, inFlight: number): Promise<Figures> {
    const { rx, close } = await receiverWith(0)
    const started = Date.now()
    const pending = new Set<Promise<void>>()
    let batch: string[] = []
    let events = 0
    const send = async (): Promise<void> => {
        // Written as bytes, as the tools' sender does: the cheapest body, so this stays a ceiling.
        const body = batchBodyBytes(batch.map((json) => ({ json })))
        batch = []
        while (pending.size >= inFlight) {
            await Promise.race(pending)
        }
        const p: Promise<void> = post(rx.url, body).finally(() => pending.delete(p))
        pending.add(p)
    }
    for await (const line of createInterface({ input: createReadStream(file) })) {
        events++
        batch.push(line)
        if (batch.length >= RAW_BATCH) {
            await send()
        }
    }
    if (batch.length) {
        await send()
    }
    await Promise.all(pending)
    const figures = { requests: rx.summary().requests, events, ms: Date.now() - started }
    await close()
    return figures
}

/** Peak RSS of a child process, polled from /proc while it runs (VmHWM where the kernel reports it). */
/** CPU time (user + system, ms) a process has used so far, from /proc; 0 once it has gone. */
export function cpuMsOf(pid: number): number {
    try {
        // Fields after the command name, which sits in parentheses and may hold spaces.
        const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? []
        const ticks = Number(fields[11]) + Number(fields[12])
        return Number.isFinite(ticks) ? (ticks * 1000) / CLOCK_TICKS_PER_S : 0
    } catch {
        return 0
    }
}

/** A child Node process run to its end: peak RSS (MB) and the CPU time it used (ms, as last seen). */
export async function measureProcess(
    args: string[],
    env: NodeJS.ProcessEnv
): Promise<{ peakMb: number; cpuMs: number }> {
    const child = spawn(process.execPath, args, { env, stdio: ['ignore', 'ignore', 'pipe'] })
    // Kept for the failure message only: the progress lines would clutter the figures.
    let stderr = ''
    child.stderr?.on('data', (c: Buffer) => (stderr = (stderr + c.toString()).slice(-2_000)))
    let peakKb = 0
    let cpuMs = 0
    const read = (): void => {
        try {
            const status = readFileSync(`/proc/${child.pid}/status`, 'utf8')
            const kb = Number(/VmHWM:\s+(\d+)/.exec(status)?.[1] ?? /VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0)
            peakKb = Math.max(peakKb, kb)
            cpuMs = Math.max(cpuMs, cpuMsOf(child.pid as number))
        } catch {
            // The process has exited.
        }
    }
    const timer = setInterval(read, 50)
    const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)))
    clearInterval(timer)
    if (code !== 0) {
        throw new Error(`measured process exited with ${code}: ${stderr.trim()}`)
    }
    return { peakMb: Math.round(peakKb / 1024), cpuMs: Math.round(cpuMs) }
}

export async function peakRssMb(args: string[], env: NodeJS.ProcessEnv): Promise<number> {
    return (await measureProcess(args, env)).peakMb
}

/** The replay CLI, as a user runs it, reading `file`; its peak RSS and what the receiver got. */
export async function measureReplayRss(file: string, events: number) {
    const { rx, close } = await receiverWith(0)
    const started = Date.now()
    const receiverCpu = process.cpuUsage()
    const { peakMb, cpuMs } = await measureProcess([BIN, 'replay', file], {
        ...process.env,
        PATTERNS_WEBHOOK_URL: rx.url,
    })
    const used = process.cpuUsage(receiverCpu)
    const receiverCpuMs = Math.round((used.user + used.system) / 1000)
    const figures = { events, peakMb, cpuMs, receiverCpuMs, rows: rx.summary().rows, ms: Date.now() - started }
    await close()
    return figures
}

/** Throughput of `events` events and peak RSS for each of `rssEvents`, all from files. */
export async function benchReplay(events: number, rssEvents: number[]): Promise<ReplayBench> {
    const workDir = mkdtempSync(join(tmpdir(), 'bench-replay-'))
    try {
        const file = join(workDir, `events-${events}.jsonl`)
        await writeEventsFile(file, events)
        const replayed = await measureReplay(file)
        const raw = await measureRawFile(file, REPLAY_CONCURRENCY)
        const rss = []
        for (const count of rssEvents) {
            const rssFile = join(workDir, `events-${count}.jsonl`)
            if (count !== events) {
                await writeEventsFile(rssFile, count)
            }
            rss.push(await measureReplayRss(count === events ? file : rssFile, count))
            rmSync(rssFile, { force: true })
        }
        const idleMb = await peakRssMb(['-e', 'require("tsx/cjs"); setTimeout(() => {}, 300)'], process.env)
        return { events, replay: replayed, raw, rss, idleMb }
    } finally {
        rmSync(workDir, { recursive: true, force: true })
    }
}

export function replayBenchText(bench: ReplayBench): string {
    const share = rate(bench.replay) / Math.max(rate(bench.raw), 1)
    const verdict = (ok: boolean) => (ok ? 'ok' : 'MISSED')
    const lines = [
        `Replay of ${bench.events} realistic events from a JSON Lines file (${REPLAY_CONCURRENCY} in flight)`,
        `  replay    ${rate(bench.replay)} events/s in ${bench.replay.requests} requests (reading, parsing, filtering)`,
        `  raw limit ${rate(bench.raw)} events/s in ${bench.raw.requests} requests (same file, plain loop, arrays of ${RAW_BATCH}, ${REPLAY_CONCURRENCY} in flight)`,
        `  replay / raw = ${(share * 100).toFixed(0)}% (target ≥ ${THROUGHPUT_TARGET * 100}%: ${verdict(share >= THROUGHPUT_TARGET)})`,
        '',
        'Peak RSS of `patterns-connector replay FILE` (the CLI as users run it)',
    ]
    for (const r of bench.rss) {
        lines.push(
            `  ${String(r.events).padStart(8)} events  ${r.peakMb} MB peak RSS, ${r.rows} rows received, ` +
                `${Math.round(r.rows / Math.max(r.ms / 1000, 0.001))} events/s ` +
                `(baseline ${bench.idleMb} MB, ceiling ${RSS_CEILING_MB} MB: ${verdict(r.peakMb <= RSS_CEILING_MB)})`
        )
    }
    lines.push(`  baseline: an idle Node process with the same TypeScript loader, ${bench.idleMb} MB`)
    return lines.join('\n') + '\n'
}

async function main(): Promise<void> {
    const { values } = parseArgs({
        options: {
            quick: { type: 'boolean', default: false },
            events: { type: 'string', default: '100000' },
            'rss-events': { type: 'string', default: '100000,1000000' },
        },
    })
    const events = values.quick ? 5_000 : Number(values.events)
    const rssEvents = values.quick ? [20_000] : values['rss-events'].split(',').map(Number)
    process.stdout.write(
        `Replay bench, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
            `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}\n\n`
    )
    process.stdout.write(replayBenchText(await benchReplay(events, rssEvents)))
}

if (require.main === module) {
    void main().catch((error) => {
        process.stderr.write(`bench failed: ${(error as Error).message}\n`)
        process.exit(1)
    })
}
