/**
 * `npm run bench`: prints figures, compares each against a baseline measured in the same run. Not a test.
 *
 * 1. Plugins in the emulated 2021 host (bench/plugins/table.ts): a do-nothing plugin, a serialise-only plugin (the
 *    ceiling for a sender), the original per-event app (the baseline) and this plugin, on the direct and the
 *    Kafka path, at 0, 20 and 50 ms webhook latency. `--only`, `--path`, `--latency` run a subset.
 * 2. Replay (bench/replay.ts, also runnable alone): events/s from a file of 100k events against the raw limit;
 *    peak RSS of the replay CLI reading files of 100k and 1M events, against an idle Node process and a ceiling.
 * 3. Sync (bench/sync.ts, also runnable alone): 1M events from the PostHog stand-in against replay of the same
 *    events in the same run, and sync's peak RSS against an idle Node process and a ceiling.
 * 3b. Sync with --where and --with-person (bench/sync-filter.ts, also runnable alone): rows PostHog returns with a
 *    selective --where against filtering on the client, the cost of --with-person per page, the installed CLI's RSS.
 * 4. Replay of batch-export files (bench/replay-exports.ts, also runnable alone): 1M events as plain and gzip JSON
 *    Lines and as Parquet (zstd, one file and 50), events/s and peak RSS against plain JSON Lines and the raw limit.
 */
import { cpus } from 'node:os'
import { parseArgs } from 'node:util'

import { BENCH_LATENCIES_MS, BENCH_PATHS, BENCH_PLUGINS, parseList, runPluginTable } from './plugins/table'
import { benchReplay, replayBenchText } from './replay'
import { benchReplayExports, replayExportsBenchText } from './replay-exports'
import { benchSync, syncBenchText } from './sync'
import { benchWhereAndPerson, filterBenchText } from './sync-filter'

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
            'rich-events': { type: 'boolean', default: false },
            'receiver-thread': { type: 'boolean', default: false },
            'replay-events': { type: 'string', default: '100000' },
            'rss-events': { type: 'string', default: '100000,1000000' },
            'sync-events': { type: 'string', default: '1000000' },
            'filter-events': { type: 'string', default: '100000' },
            'export-events': { type: 'string', default: '1000000' },
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
            events: Number(values.events ?? (quick ? 500 : 6_000)),
            workers: Number(values.workers),
            repeat: Number(values.repeat ?? (quick ? 1 : 3)),
            richEvents: values['rich-events'],
            receiverThread: values['receiver-thread'],
        },
        (text) => process.stdout.write(text)
    )
    // A subset of the plugin table is a quick look at one figure: the replay part runs only in a full bench.
    if (values.only !== undefined || values.path !== undefined || values.latency !== undefined) {
        return
    }

    const replayEvents = quick ? 5_000 : Number(values['replay-events'])
    const rssEvents = quick ? [20_000] : values['rss-events'].split(',').map(Number)
    process.stdout.write('\n' + replayBenchText(await benchReplay(replayEvents, rssEvents)))
    const syncEvents = quick ? 20_000 : Number(values['sync-events'])
    process.stdout.write('\n' + syncBenchText(await benchSync(syncEvents)))
    const filterEvents = quick ? 20_000 : Number(values['filter-events'])
    process.stdout.write('\n' + filterBenchText(await benchWhereAndPerson(filterEvents)))
    const exportEvents = quick ? 50_000 : Number(values['export-events'])
    process.stdout.write('\n' + replayExportsBenchText(await benchReplayExports(exportEvents)))
}

void main().catch((error) => {
    process.stderr.write(`bench failed: ${(error as Error).message}\n`)
    process.exit(1)
})
