/**
 * An embedded webhook receiver that behaves like a Patterns webhook node: it takes one JSON object or an array,
 * stores each element as a row with an increasing `patterns_id`, and answers with an empty 200.
 * Rows go to a JSONL file under a data folder, so they survive a restart. Faults can be injected per request.
 */
import { appendFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { createServer, IncomingMessage, Server, ServerResponse } from 'node:http'
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
    /** Retry-After sent with 503s, in seconds, as a webhook down for maintenance may; 0 means none. */
    retryAfterOn503Seconds: number
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
    retryAfterOn503Seconds: 0,
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

type Row = Record<string, unknown> & { patterns_id: number }

/** The rows file and its counts. Rows from an earlier run carry on: ids keep increasing and the counts include them. */
class RowStore {
    readonly uuidCounts = new Map<string, number>()
    nextId = 1
    rowCount = 0
    duplicateRows = 0

    constructor(
        readonly rowsFile: string,
        private readonly persist: boolean
    ) {
        try {
            for (const line of readFileSync(rowsFile, 'utf8').split('\n')) {
                if (line) {
                    const row = JSON.parse(line) as { patterns_id: number; uuid?: unknown }
                    this.nextId = Math.max(this.nextId, row.patterns_id + 1)
                    this.rowCount++
                    this.countUuid(row.uuid)
                }
            }
        } catch (error) {
            if ((error as NodeJS.ErrnoException).code !== 'ENOENT') {
                throw error
            }
            writeFileSync(rowsFile, '')
        }
    }

    private countUuid(uuid: unknown): void {
        if (typeof uuid !== 'string') {
            return
        }
        const seen = this.uuidCounts.get(uuid) ?? 0
        if (seen > 0) {
            this.duplicateRows++
        }
        this.uuidCounts.set(uuid, seen + 1)
    }

    /** Stores one object or each element of an array as a row; returns how many. */
    store(body: unknown): number {
        const items = Array.isArray(body) ? body : [body]
        if (!this.persist) {
            this.rowCount += items.length
            this.nextId += items.length
            return items.length
        }
        const lines = items.map((item) => {
            this.countUuid((item as { uuid?: unknown })?.uuid)
            return JSON.stringify({ ...(item as Record<string, unknown>), patterns_id: this.nextId++ })
        })
        if (lines.length > 0) {
            // Synchronous append: once the 200 goes out, the rows are on disk.
            appendFileSync(this.rowsFile, lines.join('\n') + '\n')
        }
        this.rowCount += lines.length
        return lines.length
    }

    rows(): Row[] {
        return readFileSync(this.rowsFile, 'utf8')
            .split('\n')
            .filter(Boolean)
            .map((line) => JSON.parse(line) as Row)
    }
}

/** How each request is answered: the webhook path, the fault dice, and a count of every outcome. */
class FaultyWebhook {
    requests = 0
    acceptResetRows = 0
    readonly byOutcome: Record<string, number> = {}
    private readonly random: () => number

    constructor(
        private readonly rows: RowStore,
        readonly path: string,
        public faults: Faults,
        seed: number
    ) {
        this.random = seededRandom(seed)
    }

    private count(outcome: string): void {
        this.byOutcome[outcome] = (this.byOutcome[outcome] ?? 0) + 1
    }

    answer(res: ServerResponse, outcome: string, status: number, headers: Record<string, string> = {}): void {
        this.count(outcome)
        res.writeHead(status, headers)
        res.end(status >= 400 ? `${status} ${outcome}` : '')
    }

    /** One webhook request: the path, then the faults, then the rows. */
    async handle(req: IncomingMessage, res: ServerResponse, body: Buffer, pathname: string): Promise<void> {
        const { faults } = this
        this.requests++
        if (faults.latencyMs > 0) {
            await new Promise((resolve) => setTimeout(resolve, faults.latencyMs))
        }
        if (faults.notFound || pathname !== this.path) {
            return this.answer(res, 'not-found', 404)
        }
        if (req.method !== 'POST') {
            return this.answer(res, 'method', 405)
        }
        if (faults.maxBodyBytes > 0 && body.length > faults.maxBodyBytes) {
            return this.answer(res, 'too-large', 413)
        }
        const down = faults.downAfterRows > 0 && this.rows.rowCount >= faults.downAfterRows
        const fate = down ? '503' : rollFate(faults, this.random)
        if (fate === 'hang') {
            return this.count('hang')
        }
        if (fate === 'reset') {
            this.count('reset')
            req.socket.destroy()
            return
        }
        if (fate === '503' && faults.retryAfterOn503Seconds > 0) {
            const headers = { 'Content-Type': 'text/html', 'Retry-After': String(faults.retryAfterOn503Seconds) }
            return this.answer(res, fate, 503, headers)
        }
        if (fate === '503' || fate === '500') {
            return this.answer(res, fate, Number(fate), { 'Content-Type': 'text/html' })
        }
        if (fate === '429') {
            return this.answer(res, '429', 429, { 'Retry-After': String(faults.retryAfterSeconds) })
        }
        this.store(req, res, body, fate === 'accept-reset')
    }

    /** A JSON object or array is stored; with `thenReset`, the connection is reset after storing. */
    private store(req: IncomingMessage, res: ServerResponse, body: Buffer, thenReset: boolean): void {
        let parsed: unknown
        try {
            parsed = JSON.parse(body.toString('utf8'))
        } catch {
            return this.answer(res, 'bad-json', 400)
        }
        if (typeof parsed !== 'object' || parsed === null) {
            return this.answer(res, 'bad-json', 400)
        }
        const stored = this.rows.store(parsed)
        if (thenReset) {
            this.acceptResetRows += stored
            this.count('accept-reset')
            req.socket.destroy()
            return
        }
        this.answer(res, 'stored', 200)
    }
}

function summaryOf(rows: RowStore, webhook: FaultyWebhook): ReceiverSummary {
    return {
        rows: rows.rowCount,
        requests: webhook.requests,
        byOutcome: { ...webhook.byOutcome },
        uniqueUuids: rows.uuidCounts.size,
        duplicateRows: rows.duplicateRows,
        acceptResetRows: webhook.acceptResetRows,
        rowsFile: rows.rowsFile,
    }
}

/** The HTTP server: GET /summary answers the counts, every other request goes to the webhook once read whole. */
function receiverServer(rows: RowStore, webhook: FaultyWebhook): Server {
    const server = createServer((req, res) => {
        const chunks: Buffer[] = []
        req.on('data', (chunk: Buffer) => chunks.push(chunk))
        req.on('end', () => {
            const { pathname } = new URL(req.url ?? '/', 'http://receiver')
            if (req.method === 'GET' && pathname === '/summary') {
                res.writeHead(200, { 'Content-Type': 'application/json' })
                res.end(JSON.stringify(summaryOf(rows, webhook)))
                return
            }
            webhook.handle(req, res, Buffer.concat(chunks), pathname).catch(() => {
                if (!res.headersSent) {
                    webhook.answer(res, 'receiver-error', 500)
                }
            })
        })
    })
    server.keepAliveTimeout = 5_000
    return server
}

export async function startReceiver(options: ReceiverOptions): Promise<Receiver> {
    mkdirSync(options.dataDir, { recursive: true })
    const rows = new RowStore(join(options.dataDir, 'rows.jsonl'), options.persist !== false)
    const webhookPath = options.path ?? '/api/v1/webhooks/local'
    const webhook = new FaultyWebhook(rows, webhookPath, resolveFaults(undefined, options.faults), options.seed ?? 1)
    const server = receiverServer(rows, webhook)
    const sockets = new Set<Socket>()
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
        rowsFile: rows.rowsFile,
        summary: () => summaryOf(rows, webhook),
        rows: () => rows.rows(),
        uuidCounts: () => new Map(rows.uuidCounts),
        setFaults: (next) => {
            webhook.faults = resolveFaults(undefined, next)
        },
        close: async () => {
            for (const socket of sockets) {
                socket.destroy()
            }
            await new Promise<void>((resolve) => server.close(() => resolve()))
        },
    }
}
