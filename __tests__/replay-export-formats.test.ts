/**
 * Every format of PostHog's batch exports, recognised from its bytes and read in a stream, and every row sent in
 * the shape the plugin and sync send: through the CLI, against a real HTTP server on 127.0.0.1.
 */
import { readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'

import { parquetWriteBuffer } from 'hyparquet-writer'

import { detectExportFormat } from '../replay/exports/formats'
import {
    brotli,
    DAY_ONE_MS,
    exportPath,
    ExportRow,
    exportRows,
    gzipMembers,
    jsonLines,
    writeAt,
    writeParquet,
    writeZstd,
} from './helpers/exports'
import { startServer, TestServer } from './helpers/server'
import { perTestFolder, runReplay } from './helpers/workspace'

const HOUR_MS = 3_600_000

let dir = ''
const servers = perTestFolder('replay-export-formats-', (made) => (dir = made))

function accepting(): Promise<TestServer> {
    return servers.track(startServer(() => ({ status: 200 })))
}

const cli = (args: string[]) => runReplay(args)

/** Everything the server was sent, as one string of the request bodies. */
const bodies = (rx: TestServer): string => rx.received.map((r) => r.body).join('\n')
const sentUuids = (rx: TestServer): string[] => rx.accepted.map((e) => String(e.uuid))

/** The event the plugin would send for an export row: the plugin's fields, then the export's own. */
function pluginShape(row: ExportRow): Record<string, unknown> {
    const iso = (text: string) => new Date(Date.parse(text)).toISOString()
    return {
        uuid: row.uuid,
        event: row.event,
        distinct_id: row.distinct_id,
        ip: null,
        timestamp: iso(row.timestamp),
        properties: row.properties,
        ...(row.properties.$set ? { $set: row.properties.$set, $set_once: row.properties.$set_once } : {}),
        elements_chain: row.elements_chain,
        person_id: row.person_id,
        person_properties: row.person_properties,
        created_at: iso(row.created_at),
        _inserted_at: iso(row._inserted_at),
    }
}

describe('formats, from their bytes', () => {
    it('reads JSON Lines plain, gzip of one member per line, brotli and zstd, in interval order', async () => {
        const rx = await accepting()
        const rows = [0, 1, 2, 3].map((hour) => exportRows(hour * 10, 10, DAY_ONE_MS + hour * HOUR_MS))
        const at = (hour: number, ext: string) => join(dir, exportPath(DAY_ONE_MS + hour * HOUR_MS, 0, ext))
        writeAt(dir, exportPath(DAY_ONE_MS, 0, 'jsonl'), jsonLines(rows[0] ?? []))
        writeAt(dir, exportPath(DAY_ONE_MS + HOUR_MS, 0, 'jsonl.gz'), gzipMembers(rows[1] ?? []))
        writeAt(dir, exportPath(DAY_ONE_MS + 2 * HOUR_MS, 0, 'jsonl.br'), brotli(jsonLines(rows[2] ?? [])))
        await writeZstd(at(3, 'jsonl.zst'), jsonLines(rows[3] ?? []))
        const { code, stdout } = await cli([dir, '--webhook-url', rx.url, '--concurrency', '1'])
        expect(code).toBe(0)
        expect(stdout).toContain('1 JSON Lines, 1 JSON Lines gzip, 1 JSON Lines brotli, 1 JSON Lines zstd')
        expect(sentUuids(rx)).toEqual(rows.flat().map((r) => r.uuid))
    })

    it('reads a file for what its bytes are, whatever its extension says', async () => {
        const rx = await accepting()
        const rows = exportRows(0, 6, DAY_ONE_MS)
        // gzip named plain, brotli named gzip, plain named zstd.
        writeAt(dir, exportPath(DAY_ONE_MS, 0, 'jsonl'), gzipMembers(rows.slice(0, 2)))
        writeAt(dir, exportPath(DAY_ONE_MS, 1, 'jsonl.gz'), brotli(jsonLines(rows.slice(2, 4))))
        writeAt(dir, exportPath(DAY_ONE_MS, 2, 'jsonl.zst'), jsonLines(rows.slice(4)))
        const { code, stdout } = await cli([dir, '--webhook-url', rx.url, '--concurrency', '1'])
        expect(code).toBe(0)
        expect(stdout).toContain('1 JSON Lines, 1 JSON Lines gzip, 1 JSON Lines brotli')
        expect(sentUuids(rx)).toEqual(rows.map((r) => r.uuid))
    })

    it('names and skips an lz4 file and a file that is not events, with the reason', async () => {
        const rx = await accepting()
        const rows = exportRows(0, 2, DAY_ONE_MS)
        writeAt(dir, exportPath(DAY_ONE_MS, 0, 'jsonl'), jsonLines(rows))
        writeAt(dir, exportPath(DAY_ONE_MS, 1, 'jsonl.lz4'), Buffer.from([0x04, 0x22, 0x4d, 0x18, 0x64, 0x40, 0xa7]))
        writeAt(dir, exportPath(DAY_ONE_MS, 2, 'jsonl'), Buffer.from([0x00, 0x01, 0x02, 0xff, 0xfe, 0x80, 0x81, 0x82]))
        const { code, stdout } = await cli([dir, '--webhook-url', rx.url])
        expect(code).toBe(0)
        expect(stdout).toMatch(/-1\.jsonl\.lz4: it is lz4-compressed, which replay does not read: lz4 -d it first/)
        expect(stdout).toMatch(/-2\.jsonl: it is not JSON Lines \(plain, gzip, brotli or zstd\) or Parquet/)
        expect(sentUuids(rx)).toEqual(rows.map((r) => r.uuid))
    })

    it('detects each format from its first bytes', () => {
        const text = jsonLines(exportRows(0, 3, DAY_ONE_MS))
        expect(detectExportFormat(Buffer.from(text))).toBe('jsonl')
        expect(detectExportFormat(Buffer.from(`\uFEFF  \n${text}`))).toBe('jsonl')
        expect(detectExportFormat(gzipMembers(exportRows(0, 1, DAY_ONE_MS)))).toBe('jsonl.gz')
        expect(detectExportFormat(brotli(text))).toBe('jsonl.br')
        expect(detectExportFormat(Buffer.from('PAR1\u0015\u0004'))).toBe('parquet')
        expect(detectExportFormat(Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x24]))).toBe('jsonl.zst')
        expect(detectExportFormat(Buffer.from('name,value\n'))).toHaveProperty('unreadable')
    })

    it.each(['zstd', 'snappy', 'lz4', 'gzip', 'brotli'])(
        'reads Parquet written by ClickHouse with %s, a row group at a time, as the same events as JSON Lines',
        async (codec) => {
            const rx = await accepting()
            const rows = exportRows(0, 25, DAY_ONE_MS)
            await writeParquet(join(dir, 'parquet', exportPath(DAY_ONE_MS, 0, 'parquet')), rows, codec, 10)
            writeAt(dir, join('jsonl', exportPath(DAY_ONE_MS, 0, 'jsonl.gz')), gzipMembers(rows))
            const fromParquet = await cli([join(dir, 'parquet'), '--webhook-url', rx.url, '--concurrency', '1'])
            expect(fromParquet.code).toBe(0)
            expect(fromParquet.stdout).toContain('1 Parquet')
            const parquetBodies = bodies(rx)
            rx.received.length = 0
            expect((await cli([join(dir, 'jsonl'), '--webhook-url', rx.url, '--concurrency', '1'])).code).toBe(0)
            expect(parquetBodies).toBe(bodies(rx))
            expect(rx.accepted.slice(0, 25)).toEqual(rows.map(pluginShape))
        }
    )

    it('reads a .parquet.zst file as Parquet as it is, and Parquet written by hyparquet-writer', async () => {
        const rx = await accepting()
        const rows = exportRows(0, 12, DAY_ONE_MS)
        await writeParquet(join(dir, exportPath(DAY_ONE_MS, 0, 'parquet.zst')), rows.slice(0, 6), 'zstd', 4)
        const columns = ['uuid', 'event', 'distinct_id', 'timestamp'] as const
        const later = rows.slice(6)
        const written = parquetWriteBuffer({
            columnData: [
                ...columns.map((name) => ({
                    name,
                    data: later.map((r) => (name === 'timestamp' ? new Date(Date.parse(r.timestamp)) : r[name])),
                    type: name === 'timestamp' ? ('TIMESTAMP' as const) : ('STRING' as const),
                })),
                { name: 'properties', data: later.map((r) => JSON.stringify(r.properties)), type: 'STRING' },
            ],
            rowGroupSize: 4,
        })
        writeAt(dir, exportPath(DAY_ONE_MS + HOUR_MS, 0, 'parquet'), Buffer.from(written))
        const { code } = await cli([dir, '--webhook-url', rx.url, '--concurrency', '1'])
        expect(code).toBe(0)
        expect(sentUuids(rx)).toEqual(rows.map((r) => r.uuid))
        expect(rx.accepted[11]).toMatchObject({
            timestamp: new Date(Date.parse(later[5]?.timestamp ?? '')).toISOString(),
        })
    })
})

describe('the shape of what is sent', () => {
    it('sends properties as an object, lifts $set and $set_once, and keeps the export fields', async () => {
        const rx = await accepting()
        const rows = exportRows(0, 3, DAY_ONE_MS)
        writeAt(dir, exportPath(DAY_ONE_MS, 0, 'jsonl.gz'), gzipMembers(rows))
        expect((await cli([dir, '--webhook-url', rx.url])).code).toBe(0)
        expect(rx.accepted).toEqual(rows.map(pluginShape))
        // ISO 8601 in UTC with milliseconds, from PostHog's microseconds with an offset.
        expect(rx.accepted[0]?.timestamp).toMatch(/^2025-01-07T00:00:00\.\d{3}Z$/)
    })

    it('keeps fields it does not know; reads set and set_once of 2023-era files as $set and $set_once', async () => {
        const rx = await accepting()
        const old = {
            uuid: 'u-2023',
            event: 'signed up',
            distinct_id: 'd',
            properties: { plan: 'free' },
            set: { email: 'a@example.com' },
            set_once: { first_seen: '2023-01-01' },
            team_id: 2,
            ip: '203.0.113.7',
            site_url: 'https://example.com',
            elements: [],
            timestamp: '2023-01-01 05:30:00.250000+05:30',
            inserted_at: '2023-01-01T00:00:01.5Z',
            new_field: { nested: true },
        }
        writeAt(dir, '2023-01-01 00:00:00-2023-01-01 01:00:00.jsonl', JSON.stringify(old) + '\n')
        expect((await cli([dir, '--webhook-url', rx.url, '--excluded-properties', '$ip,email'])).code).toBe(0)
        expect(rx.accepted).toEqual([
            {
                uuid: 'u-2023',
                event: 'signed up',
                distinct_id: 'd',
                team_id: 2,
                timestamp: '2023-01-01T00:00:00.250Z',
                properties: { plan: 'free' },
                $set: {},
                $set_once: { first_seen: '2023-01-01' },
                site_url: 'https://example.com',
                elements: [],
                inserted_at: '2023-01-01T00:00:01.500Z',
                new_field: { nested: true },
            },
        ])
    })

    it('sends integers past 2^53 and past 64 bits exactly as written, from JSON Lines and from Parquet', async () => {
        const rx = await accepting()
        const big = ['9007199254740993', '123456789012345678901234567890', '-18446744073709551617']
        const [row] = exportRows(0, 1, DAY_ONE_MS) as [ExportRow]
        const text = JSON.stringify(row).replace('"i":0', `"i":0,"a":${big[0]},"b":[${big[1]}],"c":{"d":${big[2]}}`)
        writeAt(dir, exportPath(DAY_ONE_MS, 0, 'jsonl'), text + '\n')
        // With person updates to lift (parsed, numbers kept), and without (sent as read).
        const properties = JSON.stringify(row.properties).replace('"i":0', `"i":0,"a":${big[0]},"b":[${big[1]}]`)
        const plain = `{"i":1,"a":${big[0]},"b":[${big[1]}],"c":{"d":${big[2]}}}`
        const parquet = join(dir, exportPath(DAY_ONE_MS + HOUR_MS, 0, 'parquet'))
        const rows = [row, { ...row, uuid: 'u-verbatim' }]
        await writeParquet(
            parquet,
            rows,
            'zstd',
            10,
            new Map([
                [0, properties],
                [1, plain],
            ])
        )
        const { code } = await cli([dir, '--webhook-url', rx.url, '--concurrency', '1'])
        expect(code).toBe(0)
        const sent = rx.received.map((r) => r.body)
        expect(sent[0]).toContain(`"i":0,"a":${big[0]},"b":[${big[1]}],"c":{"d":${big[2]}}`)
        expect(sent[0]).toContain(`"$set":{"plan":"pro"}`)
        expect(sent[sent.length - 1]).toContain(`"i":0,"a":${big[0]},"b":[${big[1]}]`)
        expect(sent[sent.length - 1]).toContain(`"properties":${plain}`)
    })

    it('sends a 20 MB line whole, between ordinary ones, from a gzip file', async () => {
        const rx = await accepting()
        const rows = exportRows(0, 3, DAY_ONE_MS)
        const huge = { ...rows[1], properties: { blob: 'x'.repeat(20 * 1024 * 1024) } } as ExportRow
        writeAt(dir, exportPath(DAY_ONE_MS, 0, 'jsonl.gz'), gzipMembers([rows[0], huge, rows[2]] as object[]))
        const { code } = await cli([dir, '--webhook-url', rx.url, '--concurrency', '1'])
        expect(code).toBe(0)
        expect(sentUuids(rx)).toEqual(rows.map((r) => r.uuid))
        expect((rx.accepted[1]?.properties as { blob: string }).blob).toHaveLength(20 * 1024 * 1024)
    })

    it('dead-letters a line that is not JSON with its file and line, and goes on', async () => {
        const rx = await accepting()
        const rows = exportRows(0, 2, DAY_ONE_MS)
        const path = exportPath(DAY_ONE_MS, 0, 'jsonl')
        writeAt(dir, path, `${JSON.stringify(rows[0])}\n{broken\n\n${JSON.stringify(rows[1])}\n`)
        const deadLetter = join(dir, 'dead.jsonl')
        const { code, stderr } = await cli([dir, '--webhook-url', rx.url, '--dead-letter', deadLetter])
        expect(code).toBe(1)
        expect(stderr).toContain(`warning: ${path}:2: not valid JSON (kept in ${deadLetter})`)
        expect(sentUuids(rx)).toEqual(rows.map((r) => r.uuid))
    })
})

describe('compressed files that do not hold JSON Lines', () => {
    it('names and skips a whole Parquet file compressed again with zstd, with the fix', async () => {
        const rx = await accepting()
        const parquet = join(dir, 'p.parquet')
        await writeParquet(parquet, exportRows(0, 3, DAY_ONE_MS), 'snappy')
        await writeZstd(join(dir, exportPath(DAY_ONE_MS, 0, 'parquet.zst')), readFileSync(parquet))
        rmSync(parquet)
        const { code, stderr, stdout } = await cli([dir, '--webhook-url', rx.url])
        expect(code).toBe(2)
        expect(stdout).toContain('.parquet.zst: it is a whole Parquet file compressed again: zstd -d it first')
        expect(stderr).toContain('no export files')
        expect(rx.received).toHaveLength(0)
    })
})
