/**
 * Replay over export files, resumed: a checkpoint of files done and the position in the current one, bound to
 * each file's name, size and first bytes; files added later; --dedupe across files. Through the CLI, against a
 * real HTTP server on 127.0.0.1 that stops accepting after a set number of events.
 */
import { readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'

import { runReplayCli } from '../replay/cli'
import { readExportsCheckpoint } from '../replay/exports/checkpoint'
import { recentUuids } from '../replay/exports/dedupe'
import { DAY_ONE_MS, exportPath, exportRows, gzipMembers, jsonLines, writeAt, writeParquet } from './helpers/exports'
import { captureOutput } from './helpers/io'
import { startServer, TestServer } from './helpers/server'
import { perTestFolder, runReplay } from './helpers/workspace'

const HOUR_MS = 3_600_000

let dir = ''
const servers = perTestFolder('replay-export-resume-', (made) => (dir = made))

/** A server that accepts `limit` events (whole batches only), then answers 503 until `limit` is raised. */
async function acceptingUpTo(limit: number) {
    const state = { left: limit }
    const server = await servers.track(
        startServer((request) => {
            const events = (JSON.parse(request.body) as unknown[]).length
            if (events > state.left) {
                return { status: 503 }
            }
            state.left -= events
            return { status: 200 }
        })
    )
    return { rx: server, state }
}

const cli = (args: string[]) => runReplay(args)

/** With more than one request in flight, batches may reach the receiver out of order. */
const oneAtATime = ['--concurrency', '1']

const sentUuids = (rx: TestServer): string[] => rx.accepted.map((e) => String(e.uuid))

/** Hour 0: 100 events in gzip JSON Lines; hour 1: 100 events in Parquet (zstd), in row groups of 30. */
async function twoFiles(root: string) {
    const first = exportRows(0, 100, DAY_ONE_MS)
    const second = exportRows(100, 100, DAY_ONE_MS + HOUR_MS)
    const names = [exportPath(DAY_ONE_MS, 0, 'jsonl.gz'), exportPath(DAY_ONE_MS + HOUR_MS, 0, 'parquet')] as const
    writeAt(root, names[0], gzipMembers(first))
    await writeParquet(join(root, names[1]), second, 'zstd', 30)
    return { uuids: [...first, ...second].map((r) => r.uuid), names }
}

describe('resuming across files', () => {
    const run = (rx: TestServer, checkpoint: string, extra: string[] = []) =>
        cli([
            dir,
            '--webhook-url',
            rx.url,
            '--checkpoint',
            checkpoint,
            '--batch-events',
            '10',
            '--concurrency',
            '1',
            ...extra,
        ])

    it.each([
        ['at a file boundary', 100, { name: 0, next: 100 }],
        ['in the middle of a Parquet row group (rows 30 to 59)', 140, { name: 1, next: 40 }],
    ])(
        'stops %s when the webhook goes down, then resumes without resending or skipping',
        async (_w, limit, at) => {
            const { rx, state } = await acceptingUpTo(limit)
            const { uuids, names } = await twoFiles(join(dir, 'in'))
            const checkpoint = join(dir, 'ck.json')
            const args = ['--batch-events', '10', '--concurrency', '1', '--retry-for', '2']
            const first = await cli([join(dir, 'in'), '--webhook-url', rx.url, '--checkpoint', checkpoint, ...args])
            expect(first.code).toBe(1)
            expect(first.stdout).toContain('the webhook kept failing')
            expect(readExportsCheckpoint(checkpoint)?.current).toMatchObject({ name: names[at.name], next: at.next })

            state.left = Infinity
            // One request at a time, so the receiver's order is the files' order.
            const second = await cli([
                join(dir, 'in'),
                '--webhook-url',
                rx.url,
                '--checkpoint',
                checkpoint,
                ...oneAtATime,
            ])
            expect(second.code).toBe(0)
            expect(second.stdout).toContain(`skipped (checkpoint)      ${at.next}`)
            expect(sentUuids(rx)).toEqual(uuids)
            expect(readExportsCheckpoint(checkpoint)).toMatchObject({
                current: null,
                done: [{ name: names[0] }, { name: names[1] }],
            })
        },
        30_000
    )

    it('on Ctrl-C inside a Parquet row group finishes the batch in flight, saves its place, and resumes there', async () => {
        const controller = new AbortController()
        let accepted = 0
        const server = await servers.track(
            startServer((request) => {
                accepted += (JSON.parse(request.body) as unknown[]).length
                if (accepted >= 140) {
                    controller.abort()
                }
                return { status: 200, delayMs: 5 }
            })
        )
        const rx = server
        const { uuids, names } = await twoFiles(join(dir, 'in'))
        const checkpoint = join(dir, 'ck.json')
        const args = [join(dir, 'in'), '--webhook-url', rx.url, '--checkpoint', checkpoint, '--batch-events', '10']
        const { stdout, stderr, text } = captureOutput()
        const stdin = Readable.from([])
        const code = await runReplayCli([...args, ...oneAtATime], {}, { stdout, stderr, stdin }, controller.signal)
        expect(code).toBe(1)
        expect(text.stdout).toContain('stopped early             interrupted')
        const saved = readExportsCheckpoint(checkpoint)
        // Every acknowledged event is behind the saved place: 100 in the first file, the rest in the Parquet one.
        expect(saved?.current).toMatchObject({ name: names[1], next: rx.accepted.length - 100 })
        expect(saved?.current?.next).toBeGreaterThan(30)
        expect(saved?.current?.next).toBeLessThan(60)
        const resumed = await cli([...args, ...oneAtATime])
        expect(resumed.code).toBe(0)
        expect(sentUuids(rx)).toEqual(uuids)
    }, 30_000)

    it('stops with exit code 2 and the fix when a file changed after its events were recorded as sent', async () => {
        const { rx, state } = await acceptingUpTo(145)
        const { names } = await twoFiles(dir)
        const checkpoint = join(tmpdir(), `ck-${process.pid}-${Date.now()}.json`)
        try {
            expect((await run(rx, checkpoint, ['--retry-for', '2'])).code).toBe(1)
            state.left = Infinity
            const requests = rx.received.length
            // The finished file, rewritten with other events; then the current one, cut short.
            const finished = join(dir, names[0])
            const original = readFileSync(finished)
            writeFileSync(finished, gzipMembers(exportRows(500, 100, DAY_ONE_MS)))
            const changed = await run(rx, checkpoint)
            expect(changed.code).toBe(2)
            expect(changed.stderr).toContain(`${names[0]} changed after --checkpoint ${checkpoint} recorded events`)
            expect(changed.stderr).toContain('put back the file that was replayed')
            writeFileSync(finished, original)
            const current = join(dir, names[1])
            writeFileSync(current, readFileSync(current).subarray(0, 100))
            const cut = await run(rx, checkpoint)
            expect(cut.code).toBe(2)
            expect(cut.stderr).toMatch(/-0\.parquet changed after .* \(its size was \d+ bytes, now 100\)/)
            expect(rx.received).toHaveLength(requests)
        } finally {
            rmSync(checkpoint, { force: true })
        }
    }, 30_000)

    it('stops at a damaged file, naming it and the fix, and resumes once it is downloaded again', async () => {
        const { rx } = await acceptingUpTo(Infinity)
        const { uuids, names } = await twoFiles(join(dir, 'in'))
        const parquet = join(dir, 'in', names[1])
        const whole = readFileSync(parquet)
        writeFileSync(parquet, whole.subarray(0, whole.length - 100))
        const checkpoint = join(dir, 'ck.json')
        const args = [join(dir, 'in'), '--webhook-url', rx.url, '--checkpoint', checkpoint, '--batch-events', '10']
        args.push('--concurrency', '1')
        const damaged = await cli(args)
        expect(damaged.code).toBe(1)
        expect(damaged.stdout).toContain(`stopped early             cannot read ${names[1]}: `)
        expect(damaged.stdout).toContain('download it again, or move it out of the input, and run the same command')
        expect(sentUuids(rx)).toEqual(uuids.slice(0, 100))
        writeFileSync(parquet, whole)
        expect((await cli(args)).code).toBe(0)
        expect(sentUuids(rx)).toEqual(uuids)
    })

    it('picks up files that appear later, before and after the ones done, and sends only theirs', async () => {
        const { rx } = await acceptingUpTo(Infinity)
        const checkpoint = join(tmpdir(), `ck-${process.pid}-${Date.now()}.json`)
        try {
            const { uuids } = await twoFiles(dir)
            expect((await run(rx, checkpoint)).code).toBe(0)
            expect(sentUuids(rx)).toEqual(uuids)
            const later = exportRows(300, 5, DAY_ONE_MS + 2 * HOUR_MS)
            const backfill = exportRows(400, 5, DAY_ONE_MS - HOUR_MS)
            writeAt(dir, exportPath(DAY_ONE_MS + 2 * HOUR_MS, 0, 'jsonl'), jsonLines(later))
            writeAt(dir, exportPath(DAY_ONE_MS - HOUR_MS, 0, 'jsonl'), jsonLines(backfill))
            const dry = await cli([dir, '--webhook-url', rx.url, '--checkpoint', checkpoint, '--dry-run'])
            expect(dry.stdout).toContain(`Checkpoint ${checkpoint}: 2 of 4 files done\nDry run, nothing sent`)
            rx.accepted.length = 0
            const again = await run(rx, checkpoint)
            expect(again.code).toBe(0)
            expect(again.stdout).toContain('files done before         2')
            expect(sentUuids(rx)).toEqual([...backfill, ...later].map((r) => r.uuid))
        } finally {
            rmSync(checkpoint, { force: true })
        }
    })

    it('refuses a checkpoint written with other filters, or by a replay of one file', async () => {
        const { rx } = await acceptingUpTo(Infinity)
        const checkpoint = join(dir, 'ck.json')
        await twoFiles(join(dir, 'in'))
        const folder = join(dir, 'in')
        expect((await cli([folder, '--webhook-url', rx.url, '--checkpoint', checkpoint])).code).toBe(0)
        const requests = rx.received.length
        const filtered = await cli([folder, '--webhook-url', rx.url, '--checkpoint', checkpoint, '--dedupe'])
        expect(filtered.code).toBe(2)
        expect(filtered.stderr).toContain('was written with another --allowed-events, --excluded-events')
        writeFileSync(checkpoint, JSON.stringify({ version: 2, next: 5, done: [] }))
        const single = await cli([folder, '--webhook-url', rx.url, '--checkpoint', checkpoint])
        expect(single.code).toBe(2)
        expect(single.stderr).toContain('is not a checkpoint of a replay of export files')
        expect(rx.received).toHaveLength(requests)
    })
})

describe('--dedupe', () => {
    /** Hour 0 in one file; a backfill of hour 0 (file -1) repeating half of it; hour 1 repeating some of both. */
    async function overlapping(root: string) {
        const hour0 = exportRows(0, 10, DAY_ONE_MS)
        const backfill = exportRows(5, 10, DAY_ONE_MS)
        const hour1 = [...exportRows(12, 4, DAY_ONE_MS), ...exportRows(20, 6, DAY_ONE_MS + HOUR_MS)]
        writeAt(root, exportPath(DAY_ONE_MS, 0, 'jsonl.gz'), gzipMembers(hour0))
        await writeParquet(join(root, exportPath(DAY_ONE_MS, 1, 'parquet')), backfill, 'snappy', 4)
        writeAt(root, exportPath(DAY_ONE_MS + HOUR_MS, 0, 'jsonl'), jsonLines(hour1))
        return [...hour0, ...backfill, ...hour1].map((r) => r.uuid)
    }

    it('drops an event whose uuid was already sent in this run, across files and formats, and counts it', async () => {
        const { rx } = await acceptingUpTo(Infinity)
        const all = await overlapping(dir)
        const { code, stdout } = await cli([dir, '--webhook-url', rx.url, '--dedupe', '--concurrency', '1'])
        expect(code).toBe(0)
        const unique = [...new Set(all)]
        expect(sentUuids(rx)).toEqual(unique)
        expect(stdout).toContain(`duplicates (--dedupe)     ${all.length - unique.length}`)
        expect(stdout).toContain(`delivered                 ${unique.length}`)
    })

    it('sends every copy without --dedupe, for the receiver to deduplicate', async () => {
        const { rx } = await acceptingUpTo(Infinity)
        const all = await overlapping(dir)
        const { code, stdout } = await cli([dir, '--webhook-url', rx.url, '--concurrency', '1'])
        expect(code).toBe(0)
        expect(sentUuids(rx)).toEqual(all)
        expect(stdout).not.toContain('duplicates')
    })

    it('remembers at least half its window of recent uuids and holds at most the window', () => {
        const dedupe = recentUuids(4)
        expect(['a', 'b', 'a', 'c', 'b'].map((u) => dedupe.seen(u))).toEqual([false, false, true, false, true])
        for (const u of ['d', 'e', 'f', 'g']) {
            dedupe.seen(u)
        }
        expect(dedupe.size()).toBeLessThanOrEqual(4)
        // f and g are the last two: remembered; a was let go.
        expect([dedupe.seen('g'), dedupe.seen('f'), dedupe.seen('a')]).toEqual([true, true, false])
    })

    it('refuses --dedupe on one plain JSON file, naming what it is for', async () => {
        const path = writeAt(dir, 'events.jsonl', jsonLines(exportRows(0, 2, DAY_ONE_MS)))
        const { code, stderr } = await cli([path, '--dry-run', '--dedupe'])
        expect(code).toBe(2)
        expect(stderr).toContain('--dedupe reads export files')
    })
})
