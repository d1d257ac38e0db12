/**
 * Replay over PostHog batch-export files: folders, several files and manifests, read in interval order, every
 * file not read named with its reason. Through the CLI, against a real HTTP server on 127.0.0.1.
 */

import { compareExportFiles, parseExportName } from '../replay/exports/names'
import { DAY_ONE_MS, exportPath, exportRows, gzipMembers, jsonLines, writeAt } from './helpers/exports'
import { startServer, TestServer } from './helpers/server'
import { perTestFolder, runReplay } from './helpers/workspace'

const HOUR_MS = 3_600_000

let dir = ''
const servers = perTestFolder('replay-exports-', (made) => (dir = made))

function accepting(): Promise<TestServer> {
    return servers.track(startServer(() => ({ status: 200 })))
}

const cli = (args: string[]) => runReplay(args)

const uuids = (rows: Array<{ uuid: string }>): string[] => rows.map((row) => row.uuid)

describe('file names', () => {
    it('reads ISO and older interval bounds, a missing start, file numbers and manifests', () => {
        expect(parseExportName('2025-01-07T00:00:00+00:00-2025-01-07T01:00:00+00:00-10.jsonl.gz')).toEqual({
            start: Date.UTC(2025, 0, 7),
            end: Date.UTC(2025, 0, 7, 1),
            part: 10,
            manifest: false,
        })
        expect(parseExportName('2023-01-01 00:00:00-2023-01-01 01:00:00.jsonl')).toMatchObject({
            start: Date.UTC(2023, 0, 1),
            end: Date.UTC(2023, 0, 1, 1),
            part: null,
        })
        expect(parseExportName('-2025-01-07T00:00:00+00:00.parquet.zst')).toMatchObject({ start: null, part: null })
        expect(parseExportName('None-2025-01-07T00:00:00+00:00-0.parquet')).toMatchObject({ start: null, part: 0 })
        expect(parseExportName('2025-01-07T00:00:00+00:00-2025-01-07T01:00:00+00:00_manifest.json')).toMatchObject({
            manifest: true,
        })
        expect(parseExportName('events.jsonl')).toBeNull()
        expect(parseExportName('2025-01-07T00:00:00+00:00-2025-01-07T01:00:00+00:00.csv')).toBeNull()
    })

    it('orders by interval end, then start, then file number as an integer', () => {
        const names = [
            '2025-01-07T01:00:00+00:00-2025-01-07T02:00:00+00:00-10.jsonl',
            '2025-01-07T01:00:00+00:00-2025-01-07T02:00:00+00:00-2.jsonl',
            '2025-01-07T01:00:00+00:00-2025-01-07T02:00:00+00:00-9.jsonl',
            'zz-own-file.jsonl',
            '2025-01-07T00:00:00+00:00-2025-01-07T02:00:00+00:00.jsonl',
            '2025-01-07T00:00:00+00:00-2025-01-07T01:00:00+00:00.jsonl',
            '-2025-01-07T00:30:00+00:00.jsonl',
        ]
        const sorted = names
            .map((name) => ({ name, interval: parseExportName(name) }))
            .sort(compareExportFiles)
            .map((f) => f.name)
        expect(sorted).toEqual([
            '-2025-01-07T00:30:00+00:00.jsonl',
            '2025-01-07T00:00:00+00:00-2025-01-07T01:00:00+00:00.jsonl',
            '2025-01-07T00:00:00+00:00-2025-01-07T02:00:00+00:00.jsonl',
            '2025-01-07T01:00:00+00:00-2025-01-07T02:00:00+00:00-2.jsonl',
            '2025-01-07T01:00:00+00:00-2025-01-07T02:00:00+00:00-9.jsonl',
            '2025-01-07T01:00:00+00:00-2025-01-07T02:00:00+00:00-10.jsonl',
            'zz-own-file.jsonl',
        ])
    })
})

/**
 * Two days of hourly intervals in `{year}/{month}/{day}/{hour}` folders, 3 events each, except hour 5 of the first
 * day, split into 12 files (-0 to -11), and hour 7, whose manifest lists -0 and -1 and leaves out a leftover -2.
 */
function twoDays(root: string) {
    const expected: string[] = []
    let next = 0
    for (let hour = 0; hour < 48; hour++) {
        const start = DAY_ONE_MS + hour * HOUR_MS
        if (hour === 5) {
            for (let part = 0; part < 12; part++) {
                const rows = exportRows(next, 2, start)
                next += 2
                writeAt(root, exportPath(start, part, 'jsonl.gz'), gzipMembers(rows))
                expected.push(...uuids(rows))
            }
            continue
        }
        if (hour === 7) {
            const paths = [0, 1, 2].map((part) => exportPath(start, part, 'jsonl'))
            const [kept0, kept1, leftover] = [0, 1, 2].map(() => {
                const rows = exportRows(next, 3, start)
                next += 3
                return rows
            })
            writeAt(root, paths[0] as string, jsonLines(kept0 ?? []))
            writeAt(root, paths[1] as string, jsonLines(kept1 ?? []))
            writeAt(root, paths[2] as string, jsonLines(leftover ?? []))
            const manifest = (paths[0] as string).replace(/-0\.jsonl$/, '_manifest.json')
            const keys = paths.slice(0, 2).map((p) => `my-prefix/${p}`)
            writeAt(root, manifest, JSON.stringify({ files: keys }))
            expected.push(...uuids([...(kept0 ?? []), ...(kept1 ?? [])]))
            continue
        }
        const rows = exportRows(next, 3, start)
        next += 3
        writeAt(root, exportPath(start, null, 'jsonl.gz'), gzipMembers(rows))
        expected.push(...uuids(rows))
    }
    writeAt(root, 'notes/README.md', '# what this bucket holds\n')
    return expected
}

describe('a folder of export files', () => {
    it('lists what it found on --dry-run, names every file it skips, and sends nothing', async () => {
        const rx = await accepting()
        twoDays(dir)
        const { code, stdout } = await cli([dir, '--webhook-url', rx.url, '--dry-run'])
        expect(code).toBe(0)
        // 46 hourly files, 12 parts of hour 5, 2 files of hour 7's manifest.
        expect(stdout).toContain(
            `Found 60 export files in ${dir}: 2025-01-07T00:00Z to 2025-01-09T00:00Z, ` +
                '2 JSON Lines, 58 JSON Lines gzip, 0.0 MB, 1 manifest'
        )
        expect(stdout).toContain('Skipped 2 files:')
        expect(stdout).toContain('notes/README.md: not an export file')
        expect(stdout).toMatch(
            /2025-01-07T07:00:00\+00:00-2025-01-07T08:00:00\+00:00-2\.jsonl: not in its interval's manifest/
        )
        expect(stdout).toContain('Dry run, nothing sent')
        expect(rx.received).toHaveLength(0)
    })

    it('sends every event in interval order, -10 after -9, leaving out the file its manifest does not list', async () => {
        const rx = await accepting()
        const expected = twoDays(dir)
        const { code, stdout } = await cli([dir, '--webhook-url', rx.url, '--batch-events', '7', '--concurrency', '1'])
        expect(code).toBe(0)
        expect(stdout).toContain(`delivered                 ${expected.length}`)
        expect(uuids(rx.accepted as Array<{ uuid: string }>)).toEqual(expected)
    })

    it('reads several files given one by one, and a manifest given alone', async () => {
        const rx = await accepting()
        const start = DAY_ONE_MS
        const a = exportRows(0, 3, start)
        const b = exportRows(3, 3, start + HOUR_MS)
        const later = writeAt(dir, exportPath(start + HOUR_MS, null, 'jsonl'), jsonLines(b))
        const earlier = writeAt(dir, exportPath(start, null, 'jsonl.gz'), gzipMembers(a))
        expect((await cli([later, earlier, '--webhook-url', rx.url, '--concurrency', '1'])).code).toBe(0)
        expect(uuids(rx.accepted as Array<{ uuid: string }>)).toEqual(uuids([...a, ...b]))

        const parts = [0, 1].map((part) => exportPath(start + 5 * HOUR_MS, part, 'jsonl'))
        const rows = [exportRows(10, 2, start), exportRows(12, 2, start)]
        parts.forEach((path, i) => writeAt(dir, path, jsonLines(rows[i] ?? [])))
        const manifest = writeAt(
            dir,
            (parts[0] as string).replace(/-0\.jsonl$/, '_manifest.json'),
            JSON.stringify({ files: parts.map((p) => `prefix/${p}`).reverse() })
        )
        rx.accepted.length = 0
        expect((await cli([manifest, '--webhook-url', rx.url, '--concurrency', '1'])).code).toBe(0)
        expect(uuids(rx.accepted as Array<{ uuid: string }>)).toEqual(uuids(rows.flat()))
    })

    it('reads a file once when it is given and also inside a folder given', async () => {
        const rx = await accepting()
        const rows = exportRows(0, 4, DAY_ONE_MS)
        const path = writeAt(dir, exportPath(DAY_ONE_MS, 0, 'jsonl'), jsonLines(rows))
        const { code, stdout } = await cli([dir, path, '--webhook-url', rx.url])
        expect(code).toBe(0)
        expect(stdout).toContain('Found 1 export file in')
        expect(uuids(rx.accepted as Array<{ uuid: string }>)).toEqual(uuids(rows))
    })

    it('stops with exit code 2 when a manifest lists a file that is not there, naming both', async () => {
        const rx = await accepting()
        const path = exportPath(DAY_ONE_MS, 0, 'jsonl')
        writeAt(dir, path, jsonLines(exportRows(0, 2, DAY_ONE_MS)))
        const missing = exportPath(DAY_ONE_MS, 1, 'jsonl')
        writeAt(dir, path.replace(/-0\.jsonl$/, '_manifest.json'), JSON.stringify({ files: [path, missing] }))
        const { code, stderr } = await cli([dir, '--webhook-url', rx.url])
        expect(code).toBe(2)
        expect(stderr).toContain(`lists ${missing.split('/').pop()}, which is not next to it: download it`)
        expect(rx.received).toHaveLength(0)
    })

    it('exits 2 on a folder with no export files, and on - given with other inputs', async () => {
        writeAt(dir, 'notes.txt', 'nothing here')
        const empty = await cli([dir, '--dry-run'])
        expect(empty.code).toBe(2)
        expect(empty.stderr).toContain(`cannot read ${dir}: it is a directory with no export files in it`)
        const mixed = await cli([dir, '-', '--dry-run'])
        expect(mixed.code).toBe(2)
        expect(mixed.stderr).toContain('- (standard input) cannot be given with other inputs')
    })
})
