/**
 * `npx tsx bench/sync.ts [--events N] [--page-size N] [--quick]`: sync of N events (default 1,000,000) from the PostHog stand-in,
 * next to replay of the same events in the same run, both as the CLI a user runs, against one receiver.
 *
 * - Throughput: sync's events/s against replay's (target: sync ≥ 50% of replay). Sync pays for what replay does
 *   not: HogQL parsing and a ClickHouse query per page, JSON results, and rebuilding each event.
 * - Peak RSS of the sync process (VmHWM from /proc), against an idle Node process with the same TypeScript loader
 *   (baseline) and a ceiling of 250 MB. The stand-in runs in a child process of its own, the receiver in this one.
 * - Peak RSS of the CLI as users install it (`npm pack`, no loader) syncing the first 100,000 of those events with
 *   the default page size, against an idle Node process (baseline) and a ceiling of 200 MB.
 *
 * `benchSync()` is exported so `npm run bench` can add it.
 */
import { createWriteStream, mkdtempSync, rmSync } from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import type { ProcessedPluginEvent } from '@posthog/plugin-scaffold'

import { DEFAULT_PAGE_SIZE } from '../../sync/source'
import { sampleEvent } from '../host/sample-events'
import { seededRandom, startReceiver } from '../receiver/receiver'
import { StandInEvent } from '../standin/server'
import { spawnPostHogStandIn } from '../standin/spawn'
import { installPackedCli } from './installed'
import { cpuMsOf, measureProcess, measureReplayRss, peakRssMb } from './replay'

export const SYNC_THROUGHPUT_TARGET = 0.5
export const SYNC_RSS_CEILING_MB = 250
/** The installed CLI at this many events with the default page size stays under INSTALLED_RSS_CEILING_MB. */
export const INSTALLED_RSS_EVENTS = 100_000
export const INSTALLED_RSS_CEILING_MB = 200
const BIN = join(__dirname, '..', '..', 'bin', 'patterns-connector.js')
const PROJECT_ID = 1
/** Rows per insert into the stand-in while seeding. */
const INSERT_CHUNK = 25_000
/** Events are 250 ms apart (sampleEvent); PostHog stores each 1.5 s after its timestamp. */
const EVENT_SPACING_MS = 250
const INGESTION_DELAY_MS = 1_500

export interface SyncBench {
    events: number
    sync: { ms: number; peakMb: number; rows: number; requests: number } & CpuSplit
    replay: { ms: number; peakMb: number; rows: number } & CpuSplit
    idleMb: number
    pageSize: number
    /** The installed CLI (npm pack) syncing the first `events` events with the default page size. */
    installed: { events: number; peakMb: number; rows: number; idleMb: number }
}

/** CPU time (ms) each process spent during a run: the CLI, the receiver (this process) and the stand-in. */
interface CpuSplit {
    cpuMs: number
    receiverCpuMs: number
    standInCpuMs?: number
}

const perSecond = (events: number, ms: number): number => Math.round(events / Math.max(ms / 1000, 0.001))

/** The event as sync delivers it (the plugin's shape, `elements` aside), and as the stand-in stores it. */
function bothForms(event: ProcessedPluginEvent): { line: string; stored: StandInEvent } {
    const properties: Record<string, unknown> = { ...event.properties }
    // PostHog keeps person updates inside properties; the plugin's event also carries them at the top level.
    if (event.$set) {
        properties.$set = event.$set
    }
    if (event.$set_once) {
        properties.$set_once = event.$set_once
    }
    const delivered = {
        uuid: event.uuid,
        event: event.event,
        distinct_id: event.distinct_id,
        team_id: PROJECT_ID,
        ip: null,
        timestamp: event.timestamp,
        properties,
        ...(event.$set ? { $set: event.$set } : {}),
        ...(event.$set_once ? { $set_once: event.$set_once } : {}),
    }
    const stored: StandInEvent = {
        uuid: event.uuid,
        event: event.event,
        distinct_id: event.distinct_id,
        properties,
        timestamp: event.timestamp,
        created_at: new Date(Date.parse(event.timestamp) + INGESTION_DELAY_MS).toISOString(),
    }
    return { line: JSON.stringify(delivered) + '\n', stored }
}

/** The same `count` events into the stand-in and into a JSON Lines file for replay; stored between `startMs` and now. */
async function seedBoth(
    insert: (events: StandInEvent[]) => Promise<unknown>,
    file: string,
    count: number,
    startMs: number
): Promise<void> {
    const out = createWriteStream(file)
    const random = seededRandom(11)
    let chunk: StandInEvent[] = []
    let lines: string[] = []
    for (let n = 0; n < count; n++) {
        const { line, stored } = bothForms(sampleEvent(n, random, startMs))
        chunk.push(stored)
        lines.push(line)
        if (chunk.length === INSERT_CHUNK || n === count - 1) {
            const written = lines.join('')
            await Promise.all([
                insert(chunk),
                new Promise<void>((resolve, reject) => out.write(written, (e) => (e ? reject(e) : resolve()))),
            ])
            chunk = []
            lines = []
        }
    }
    await new Promise<void>((resolve) => out.end(() => resolve()))
}

/** The sync CLI as a user runs it, from the stand-in to a receiver on loopback: time, peak RSS, rows, CPU. */
async function measureSync(url: string, apiKey: string, sinceMs: number, pageSize: number, standInPid: number) {
    const dataDir = mkdtempSync(join(tmpdir(), 'bench-sync-rx-'))
    const rx = await startReceiver({ dataDir, persist: false })
    const args = [BIN, 'sync', '--posthog-url', url, '--project-id', String(PROJECT_ID)]
    args.push('--since', new Date(sinceMs).toISOString(), '--lag', '0s', '--page-size', String(pageSize))
    const started = Date.now()
    const standInBefore = cpuMsOf(standInPid)
    const receiverBefore = process.cpuUsage()
    const env = { ...process.env, POSTHOG_API_KEY: apiKey, PATTERNS_WEBHOOK_URL: rx.url }
    const { peakMb, cpuMs } = await measureProcess(args, env)
    const ms = Date.now() - started
    const receiverUsed = process.cpuUsage(receiverBefore)
    const standInCpuMs = Math.round(cpuMsOf(standInPid) - standInBefore)
    const summary = rx.summary()
    await rx.close()
    rmSync(dataDir, { recursive: true, force: true })
    const receiverCpuMs = Math.round((receiverUsed.user + receiverUsed.system) / 1000)
    return { ms, peakMb, rows: summary.rows, requests: summary.requests, cpuMs, receiverCpuMs, standInCpuMs }
}

/**
 * The installed CLI's peak RSS over the first `count` events: --until at the next event's created_at, so exactly
 * those are read, with the default page size and no loader in the process.
 */
async function measureInstalled(url: string, apiKey: string, startMs: number, count: number) {
    const cli = installPackedCli()
    const rx = await startReceiver({ dataDir: mkdtempSync(join(tmpdir(), 'bench-sync-installed-')), persist: false })
    try {
        const untilMs = startMs + count * EVENT_SPACING_MS + INGESTION_DELAY_MS
        const args = [cli.bin, 'sync', '--posthog-url', url, '--project-id', String(PROJECT_ID)]
        args.push('--since', new Date(startMs - 60_000).toISOString(), '--until', new Date(untilMs).toISOString())
        const env = { ...process.env, NODE_OPTIONS: '', POSTHOG_API_KEY: apiKey, PATTERNS_WEBHOOK_URL: rx.url }
        const { peakMb } = await measureProcess(args, env)
        const idleMb = await peakRssMb(['-e', 'setTimeout(() => {}, 300)'], { ...process.env, NODE_OPTIONS: '' })
        return { events: count, peakMb, rows: rx.summary().rows, idleMb }
    } finally {
        await rx.close()
        cli.remove()
    }
}

export async function benchSync(events: number, pageSize = DEFAULT_PAGE_SIZE): Promise<SyncBench> {
    const workDir = mkdtempSync(join(tmpdir(), 'bench-sync-'))
    const apiKey = 'phx_bench_key_0123456789abcdef'
    // In its own process, as PostHog is: this process only hosts the receiver, as in replay's measurement.
    const posthog = await spawnPostHogStandIn({ apiKey, projectId: PROJECT_ID })
    try {
        // 250 ms apart, the last stored well before now: the whole history is there when sync starts.
        const startMs = Date.now() - events * EVENT_SPACING_MS - 3_600_000
        const file = join(workDir, 'events.jsonl')
        await seedBoth((chunk) => posthog.insertEvents(chunk), file, events, startMs)
        const sync = await measureSync(posthog.url, apiKey, startMs - 60_000, pageSize, posthog.pid)
        const installedEvents = Math.min(events, INSTALLED_RSS_EVENTS)
        const installed = await measureInstalled(posthog.url, apiKey, startMs, installedEvents)
        const replayed = await measureReplayRss(file, events)
        const idleMb = await peakRssMb(['-e', 'require("tsx/cjs"); setTimeout(() => {}, 300)'], process.env)
        return {
            events,
            sync,
            replay: {
                ms: replayed.ms,
                peakMb: replayed.peakMb,
                rows: replayed.rows,
                cpuMs: replayed.cpuMs,
                receiverCpuMs: replayed.receiverCpuMs,
            },
            idleMb,
            pageSize,
            installed,
        }
    } finally {
        await posthog.close()
        rmSync(workDir, { recursive: true, force: true })
    }
}

export function syncBenchText(bench: SyncBench): string {
    const verdict = (ok: boolean): string => (ok ? 'ok' : 'MISSED')
    const syncRate = perSecond(bench.sync.rows, bench.sync.ms)
    const replayRate = perSecond(bench.replay.rows, bench.replay.ms)
    const share = syncRate / Math.max(replayRate, 1)
    const perThousand = (ms: number): string => ((ms * 1000) / Math.max(bench.events, 1)).toFixed(1)
    const cpuRatio = bench.sync.cpuMs / Math.max(bench.replay.cpuMs, 1)
    const standInAndReceiver = (bench.sync.standInCpuMs ?? 0) + bench.sync.receiverCpuMs
    const cores = cpus().length
    return [
        `Sync of ${bench.events} events from the PostHog stand-in, next to replay of the same events (both CLIs)`,
        `  sync      ${syncRate} events/s, ${bench.sync.rows} rows received in ${bench.sync.requests} requests, ` +
            `pages of ${bench.pageSize}, peak RSS ${bench.sync.peakMb} MB`,
        `  replay    ${replayRate} events/s, ${bench.replay.rows} rows received (the same events from a JSON Lines ` +
            `file), peak RSS ${bench.replay.peakMb} MB`,
        `  sync / replay = ${(share * 100).toFixed(0)}% (target ≥ ${SYNC_THROUGHPUT_TARGET * 100}%: ` +
            `${verdict(share >= SYNC_THROUGHPUT_TARGET)})`,
        `  CPU per 1,000 events: sync CLI ${perThousand(bench.sync.cpuMs)} ms, its receiver ` +
            `${perThousand(bench.sync.receiverCpuMs)} ms, the stand-in ${perThousand(bench.sync.standInCpuMs ?? 0)} ms; ` +
            `replay CLI ${perThousand(bench.replay.cpuMs)} ms, its receiver ${perThousand(bench.replay.receiverCpuMs)} ms`,
        // Informative, not a target: what the throughput ratio would approach with PostHog on other machines.
        `  sync CLI CPU per event ÷ replay CLI CPU per event = ${cpuRatio.toFixed(2)}; the stand-in and the ` +
            `receiver took ${((standInAndReceiver * 100) / Math.max(cores * bench.sync.ms, 1)).toFixed(0)}% of the ` +
            `${cores} cores during sync`,
        `  sync peak RSS ${bench.sync.peakMb} MB (baseline: idle Node with the same loader ${bench.idleMb} MB; ` +
            `ceiling ${SYNC_RSS_CEILING_MB} MB: ${verdict(bench.sync.peakMb <= SYNC_RSS_CEILING_MB)})`,
        `  installed CLI (npm pack), sync of the first ${bench.installed.events} events, pages of ` +
            `${DEFAULT_PAGE_SIZE}: peak RSS ${bench.installed.peakMb} MB, ${bench.installed.rows} rows received ` +
            `(baseline: idle Node ${bench.installed.idleMb} MB; ceiling ${INSTALLED_RSS_CEILING_MB} MB: ` +
            `${verdict(bench.installed.peakMb <= INSTALLED_RSS_CEILING_MB && bench.installed.rows === bench.installed.events)})`,
        '',
    ].join('\n')
}

async function main(): Promise<void> {
    const { values } = parseArgs({
        options: {
            quick: { type: 'boolean', default: false },
            events: { type: 'string', default: '1000000' },
            'page-size': { type: 'string', default: String(DEFAULT_PAGE_SIZE) },
        },
    })
    const events = values.quick ? 20_000 : Number(values.events)
    process.stdout.write(
        `Sync bench, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
            `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}\n\n`
    )
    process.stdout.write(syncBenchText(await benchSync(events, Number(values['page-size']))))
}

if (require.main === module) {
    void main().catch((error) => {
        process.stderr.write(`bench failed: ${(error as Error).message}\n`)
        process.exit(1)
    })
}
