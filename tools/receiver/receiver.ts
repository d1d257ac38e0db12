/**
 * An embedded webhook receiver that behaves like a Patterns webhook node: it takes one JSON object or an array,
 * stores each element as a row with an increasing `patterns_id`, and answers with an empty 200.
 * Rows go to a JSONL file under a data folder, so they survive a restart. Faults can be injected per request.
 */
import { appendFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { createServer, IncomingMessage, ServerResponse } from 'node:http'
import { AddressInfo, Socket } from 'node:net'
import { join } from 'node:path'

export interface Faults {
    p503: number
    p500: number
    p429: number
    /** Retry-After sent with 429s, in seconds. */
    retryAfterSeconds: number
    /** Connection reset before anything is stored. */
    pReset: number
    /** Rows are stored, then the connection is reset: the sender sees an error, so a retry duplicates the rows. */
    pAcceptReset: number
    /** The request is never answered. */
    pHang: number
    /** Bodies above this many bytes get 413. 0 means no limit. */
    maxBodyBytes: number
    /** Every request gets 404, as if the webhook node was deleted. */
    notFound: boolean
    /** Added before every answer. */
    latencyMs: number
    /** Once this many rows are stored, every request gets 503, as if the webhook went down. 0 means never. */
    downAfterRows: number
}

export const NO_FAULTS: Faults = {
    p503: 0,
    p500: 0,
    p429: 0,
    retryAfterSeconds: 1,
    pReset: 0,
    pAcceptReset: 0,
    pHang: 0,
    maxBodyBytes: 0,
    notFound: false,
    latencyMs: 0,
    downAfterRows: 0,
}

/** Named fault mixes for `--faults`. `default` is the acceptance matrix's mix. */
export const FAULT_PRESETS: Record<string, Partial<Faults>> = {
    none: {},
    default: { p503: 0.1, p500: 0.05, p429: 0.05, retryAfterSeconds: 1, pReset: 0.03, pAcceptReset: 0.01 },
    'default-no429': { p503: 0.1, p500: 0.05, pReset: 0.03, pAcceptReset: 0.01 },
    flaky: { p503: 0.3, pReset: 0.1 },
    throttled: { p429: 0.3, retryAfterSeconds: 1 },
    down: { p503: 1 },
    gone: { notFound: true },
    hang: { pHang: 1 },
    small: { maxBodyBytes: 16_384 },
    slow: { latencyMs: 50 },
}

export interface ReceiverOptions {
    /** Folder for rows.jsonl; created if missing. */
    dataDir: string
    /** The webhook path to accept; every other path gets 404. */
    path?: string
    port?: number
    faults?: Partial<Faults>
    /** Seed for the fault dice, so a run is repeatable. */
    seed?: number
    /** false: count rows without writing them (for benchmarks, where the disk would be the bottleneck). */
    persist?: boolean
}

export interface ReceiverSummary {
    rows: number
    requests: number
    byOutcome: Record<string, number>
    /** Distinct event uuids stored, and how many rows repeated an earlier uuid. */
    uniqueUuids: number
    duplicateRows: number
    /** Rows stored by requests that were then reset: the only rows a correct sender may duplicate. */
    acceptResetRows: number
    rowsFile: string
}

export interface Receiver {
    url: string
    rowsFile: string
    summary: () => ReceiverSummary
    /** Stored rows, read back from the file. */
    rows: () => Array<Record<string, unknown> & { patterns_id: number }>
    /** Count of stored rows per event uuid. */
    uuidCounts: () => Map<string, number>
    setFaults: (faults: Partial<Faults>) => void
    close: () => Promise<void>
}

/** A small seeded generator (mulberry32), so fault runs can be repeated exactly. */
export function seededRandom(seed: number): () => number {
    let state = seed >>> 0
    return () => {
        state = (state + 0x6d2b79f5) >>> 0
        let t = state
        t = Math.imul(t ^ (t >>> 15), t | 1)
        t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
        return ((t ^ (t >>> 14)) >>> 0) / 4294967296
    }
}

export function resolveFaults(preset: string | undefined, overrides: Partial<Faults> = {}): Faults {
    if (preset !== undefined && !(preset in FAULT_PRESETS)) {
        throw new Error(`unknown fault preset "${preset}"; choose one of: ${Object.keys(FAULT_PRESETS).join(', ')}`)
    }
    return { ...NO_FAULTS, ...(preset ? FAULT_PRESETS[preset] : {}), ...overrides }
}

type Fate = 'ok' | '503' | '500' | '429' | 'reset' | 'accept-reset' | 'hang'

function rollFate(faults: Faults, random: () => number): Fate {
    const roll = random()
    const table: Array<[Fate, number]> = [
        ['503', faults.p503],
        ['500', faults.p500],
        ['429', faults.p429],
        ['reset', faults.pReset],
        ['accept-reset', faults.pAcceptReset],
        ['hang', faults.pHang],
    ]
    let edge = 0
    for (const [fate, p] of table) {
        edge += p
        if (roll < edge) {
            return fate
        }
    }
    return 'ok'
}

export async function startReceiver(options: ReceiverOptions): Promise<Receiver> {
    mkdirSync(options.dataDir, { recursive: true })
    const rowsFile = join(options.dataDir, 'rows.jsonl')
    const webhookPath = options.path ?? '/api/v1/webhooks/local'
    let faults = resolveFaults(undefined, options.faults)
    const random = seededRandom(options.seed ?? 1)
    const uuidCounts = new Map<string, number>()
    let nextId = 1
    let rowCount = 0
    let duplicateRows = 0
    let acceptResetRows = 0
    // Rows from an earlier run carry on: ids keep increasing and the counts include them.
    try {
        for (const line of readFileSync(rowsFile, 'utf8').split('\n')) {
            if (!line) {
                continue
            }
            const row = JSON.parse(line) as { patterns_id: number; uuid?: unknown }
            nextId = Math.max(nextId, row.patterns_id + 1)
            rowCount++
            countUuid(row.uuid)
        }
    } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'ENOENT') {
            throw error
        }
        writeFileSync(rowsFile, '')
    }
    let requests = 0
    const byOutcome: Record<string, number> = {}
    const sockets = new Set<Socket>()

    function countUuid(uuid: unknown): void {
        if (typeof uuid !== 'string') {
            return
        }
        const seen = uuidCounts.get(uuid) ?? 0
        if (seen > 0) {
            duplicateRows++
        }
        uuidCounts.set(uuid, seen + 1)
    }

    function store(body: unknown): number {
        const items = Array.isArray(body) ? body : [body]
        if (options.persist === false) {
            rowCount += items.length
            nextId += items.length
            return items.length
        }
        const lines = items.map((item) => {
            countUuid((item as { uuid?: unknown })?.uuid)
            return JSON.stringify({ ...(item as Record<string, unknown>), patterns_id: nextId++ })
        })
        if (lines.length > 0) {
            // Synchronous append: once the 200 goes out, the rows are on disk.
            appendFileSync(rowsFile, lines.join('\n') + '\n')
        }
        rowCount += lines.length
        return lines.length
    }

    function answer(res: ServerResponse, outcome: string, status: number, headers: Record<string, string> = {}): void {
        byOutcome[outcome] = (byOutcome[outcome] ?? 0) + 1
        res.writeHead(status, headers)
        res.end(status >= 400 ? `${status} ${outcome}` : '')
    }

    async function handle(req: IncomingMessage, res: ServerResponse, body: Buffer): Promise<void> {
        const url = new URL(req.url ?? '/', 'http://receiver')
        if (req.method === 'GET' && url.pathname === '/summary') {
            res.writeHead(200, { 'Content-Type': 'application/json' })
            res.end(JSON.stringify(summary()))
            return
        }
        requests++
        if (faults.latencyMs > 0) {
            await new Promise((resolve) => setTimeout(resolve, faults.latencyMs))
        }
        if (faults.notFound || url.pathname !== webhookPath) {
            return answer(res, 'not-found', 404)
        }
        if (req.method !== 'POST') {
            return answer(res, 'method', 405)
        }
        if (faults.maxBodyBytes > 0 && body.length > faults.maxBodyBytes) {
            return answer(res, 'too-large', 413)
        }
        const fate = faults.downAfterRows > 0 && rowCount >= faults.downAfterRows ? '503' : rollFate(faults, random)
        if (fate === 'hang') {
            byOutcome.hang = (byOutcome.hang ?? 0) + 1
            return
        }
        if (fate === 'reset') {
            byOutcome.reset = (byOutcome.reset ?? 0) + 1
            req.socket.destroy()
            return
        }
        if (fate === '503' || fate === '500') {
            return answer(res, fate, Number(fate), { 'Content-Type': 'text/html' })
        }
        if (fate === '429') {
            return answer(res, '429', 429, { 'Retry-After': String(faults.retryAfterSeconds) })
        }
        let parsed: unknown
        try {
            parsed = JSON.parse(body.toString('utf8'))
        } catch {
            return answer(res, 'bad-json', 400)
        }
        if (typeof parsed !== 'object' || parsed === null) {
            return answer(res, 'bad-json', 400)
        }
        const stored = store(parsed)
        if (fate === 'accept-reset') {
            acceptResetRows += stored
            byOutcome['accept-reset'] = (byOutcome['accept-reset'] ?? 0) + 1
            req.socket.destroy()
            return
        }
        return answer(res, 'stored', 200)
    }

    function summary(): ReceiverSummary {
        return {
            rows: rowCount,
            requests,
            byOutcome: { ...byOutcome },
            uniqueUuids: uuidCounts.size,
            duplicateRows,
            acceptResetRows,
            rowsFile,
        }
    }

    const server = createServer((req, res) => {
        const chunks: Buffer[] = []
        req.on('data', (chunk: Buffer) => chunks.push(chunk))
        req.on('end', () => {
            handle(req, res, Buffer.concat(chunks)).catch(() => {
                if (!res.headersSent) {
                    answer(res, 'receiver-error', 500)
                }
            })
        })
    })
    server.keepAliveTimeout = 5_000
    server.on('connection', (socket) => {
        sockets.add(socket)
        socket.on('close', () => sockets.delete(socket))
    })
    await new Promise<void>((resolve, reject) => {
        server.once('error', reject)
        server.listen(options.port ?? 0, '127.0.0.1', () => resolve())
    })
    const { port } = server.address() as AddressInfo
    return {
        url: `http://127.0.0.1:${port}${webhookPath}`,
        rowsFile,
        summary,
        rows: () =>
            readFileSync(rowsFile, 'utf8')
                .split('\n')
                .filter(Boolean)
                .map((line) => JSON.parse(line) as Record<string, unknown> & { patterns_id: number }),
        uuidCounts: () => new Map(uuidCounts),
        setFaults: (next) => {
            faults = resolveFaults(undefined, next)
        },
        close: async () => {
            for (const socket of sockets) {
                socket.destroy()
            }
            await new Promise<void>((resolve) => server.close(() => resolve()))
        },
    }
}
