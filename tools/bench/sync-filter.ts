/**
 * `npx tsx tools/bench/sync-filter.ts [--events N]`: what `sync --where` saves and what `sync --with-person` costs,
 * each against a baseline measured in the same run, on N events (default 100,000) seeded in the PostHog stand-in.
 *
 * - Rows PostHog returns per 100,000 events (what goes through the query budget, the response and the client): a
 *   selective `--where` (1 event in 100) against filtering on the client, where every row is read and dropped after.
 *   Either way ClickHouse scans the same time range; the filter decides what it returns.
 * - `--with-person` against the same sync without it: wall time per page of the default size, and peak RSS.
 * - The installed CLI (npm pack, no loader) with `--with-person` over 100,000 events: peak RSS against an idle Node
 *   process and the 200 MB ceiling.
 *
 * The stand-in runs in a child process, the receiver in this one, each CLI in its own process.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { cpus, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { DEFAULT_PAGE_SIZE } from '../../sync/source'
import { startReceiver } from '../receiver/receiver'
import { SpawnedPostHogStandIn, spawnPostHogStandIn } from '../standin/spawn'
import { installPackedCli } from './installed'
import { measureProcess, peakRssMb } from './replay'

export const FILTER_RSS_CEILING_MB = 200
const PROJECT_ID = 1
const API_KEY = 'phx_bench_filter_0123456789'
const BIN = join(__dirname, '..', '..', 'bin', 'patterns-connector.js')
/** The seeded events' URLs cycle through 100 pages: this one is 1 event in 100. */
export const SELECTIVE_WHERE = "properties.$current_url = 'https://example.com/p/7'"
const SELECTIVITY = 100

interface Run {
    ms: number
    peakMb: number
    cpuMs: number
    delivered: number
    queries: number
    rowsReturned: number
}

export interface FilterBench {
    events: number
    /** Every row read, the filter applied after (the baseline for `--where`). */
    allRows: Run
    where: Run
    /** The same run as `allRows`, with `--with-person`. */
    person: Run
    installed: { peakMb: number; delivered: number; idleMb: number }
}

/** One sync over the seeded range with `extra` flags: time, memory, and what PostHog answered with. */
async function runSync(bin: string, posthog: SpawnedPostHogStandIn, range: [number, number], extra: string[]) {
    const dataDir = mkdtempSync(join(tmpdir(), 'bench-filter-rx-'))
    const rx = await startReceiver({ dataDir, persist: false })
    const args = [bin, 'sync', '--posthog-url', posthog.url, '--project-id', String(PROJECT_ID), '--lag', '0s']
    args.push('--since', new Date(range[0]).toISOString(), '--until', new Date(range[1]).toISOString(), ...extra)
    const before = await posthog.stats()
    const started = Date.now()
    const env: NodeJS.ProcessEnv = { ...process.env, POSTHOG_API_KEY: API_KEY, PATTERNS_WEBHOOK_URL: rx.url }
    if (bin !== BIN) {
        // The installed CLI as users run it: no loader inherited from this process.
        env.NODE_OPTIONS = ''
    }
    const { peakMb, cpuMs } = await measureProcess(args, env)
    const ms = Date.now() - started
    const after = await posthog.stats()
    const delivered = rx.summary().rows
    await rx.close()
    rmSync(dataDir, { recursive: true, force: true })
    return {
        ms,
        peakMb,
        cpuMs,
        delivered,
        queries: after.queries - before.queries,
        rowsReturned: after.rowsReturned - before.rowsReturned,
    }
}

export async function benchWhereAndPerson(events: number): Promise<FilterBench> {
    const posthog = await spawnPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT_ID })
    try {
        // 1 ms apart, stored as they happen, every one with its person's properties on it (seedSql).
        const start = Date.now() - 2 * 3_600_000
        await posthog.seed({ count: events, start: new Date(start), stepMicros: 1_000 })
        const range: [number, number] = [start - 60_000, start + events + 1_000]
        const allRows = await runSync(BIN, posthog, range, [])
        const where = await runSync(BIN, posthog, range, ['--where', SELECTIVE_WHERE])
        const person = await runSync(BIN, posthog, range, ['--with-person'])
        const cli = installPackedCli()
        try {
            const installed = await runSync(cli.bin, posthog, range, ['--with-person'])
            const idleMb = await peakRssMb(['-e', 'setTimeout(() => {}, 300)'], { ...process.env, NODE_OPTIONS: '' })
            return {
                events,
                allRows,
                where,
                person,
                installed: { peakMb: installed.peakMb, delivered: installed.delivered, idleMb },
            }
        } finally {
            cli.remove()
        }
    } finally {
        await posthog.close()
    }
}

export function filterBenchText(bench: FilterBench): string {
    const verdict = (ok: boolean): string => (ok ? 'ok' : 'MISSED')
    const per100k = (rows: number): number => Math.round((rows * 100_000) / Math.max(bench.events, 1))
    const perPage = (run: Run): number => Math.round(run.ms / Math.max(run.queries, 1))
    const { allRows, where, person, installed } = bench
    const matches = Math.floor(bench.events / SELECTIVITY)
    const slower = ((perPage(person) / Math.max(perPage(allRows), 1) - 1) * 100).toFixed(0)
    return [
        `sync --where and --with-person over ${bench.events} events (the stand-in seeded in ClickHouse), ` +
            `pages of ${DEFAULT_PAGE_SIZE}`,
        `  rows PostHog returned per 100,000 events: --where ${per100k(where.rowsReturned)} ` +
            `(baseline, every row read and filtered on the client: ${per100k(allRows.rowsReturned)})`,
        `  queries: --where ${where.queries} (the probe included), baseline ${allRows.queries}; delivered: --where ` +
            `${where.delivered} of ${matches} matching (${verdict(where.delivered === matches)}), baseline ` +
            `${allRows.delivered}; wall ${where.ms} ms against ${allRows.ms} ms`,
        `  --with-person: ${perPage(person)} ms a page against ${perPage(allRows)} ms without (+${slower}%), ` +
            `CPU ${person.cpuMs} ms against ${allRows.cpuMs} ms, peak RSS ${person.peakMb} MB against ` +
            `${allRows.peakMb} MB (CLI from the sources, with its loader); ${person.delivered} delivered`,
        `  installed CLI (npm pack) with --with-person, ${installed.delivered} events: peak RSS ${installed.peakMb} MB ` +
            `(baseline: idle Node ${installed.idleMb} MB; ceiling ${FILTER_RSS_CEILING_MB} MB: ` +
            `${verdict(installed.peakMb <= FILTER_RSS_CEILING_MB && installed.delivered === bench.events)})`,
        '',
    ].join('\n')
}

async function main(): Promise<void> {
    const { values } = parseArgs({ options: { events: { type: 'string', default: '100000' } } })
    process.stdout.write(
        `Sync filter bench, ${new Date().toISOString().slice(0, 10)}, Node ${process.version}, ` +
            `${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}\n\n`
    )
    process.stdout.write(filterBenchText(await benchWhereAndPerson(Number(values.events))))
}

if (require.main === module) {
    void main().catch((error) => {
        process.stderr.write(`bench failed: ${(error as Error).message}\n`)
        process.exit(1)
    })
}
