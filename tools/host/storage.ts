/**
 * `meta.storage` and `meta.cache` as PostHog gave them: one database for the whole emulated install (storage-db.ts,
 * real Postgres in a thread of its own), shared by the main thread and every Kafka-path worker thread, which reach
 * it through the main thread over their message channel. The main thread's HostStore is where tests look in:
 * what a plugin config stored, how many reads and writes it made, and injected write failures and latency.
 */
import { join } from 'node:path'
import { Worker } from 'node:worker_threads'

import { seededRandom } from '../receiver/receiver'
import type { DbData, DbOp, FromDb } from './storage-db'

/** What a VM's meta.storage and meta.cache send: an operation and its arguments, answered by the database. */
export type StoreTransport = (op: DbOp, args: unknown[]) => Promise<unknown>

/** The plugin config every emulated install runs, unless told otherwise. */
export const DEFAULT_PLUGIN_CONFIG_ID = 1

/** What an injected write failure says: Postgres's text and SQLSTATE for a full disk. */
export const INJECTED_WRITE_ERROR = {
    message: 'could not extend file "base/16384/16402": No space left on device',
    code: '53100',
}

/** One write the host is about to make, as a fault predicate sees it. */
export interface StorageWrite {
    op: 'set' | 'del'
    pluginConfigId: number
    key: string
    /** The JSON text `set` would store. */
    value: string | null
    /** Writes (set and del) made so far in this install, this one included. */
    n: number
}

/** What an injected storage failure says: node-postgres's text when the connection to Postgres drops. */
export const INJECTED_STORAGE_ERROR = { message: 'Connection terminated unexpectedly', code: null }
/** What an injected cache failure says: ioredis's text when Redis is gone. */
export const INJECTED_CACHE_ERROR = 'Connection is closed.'

/** One storage or cache call the host is about to make, as a fault predicate sees it. */
export interface HostCall {
    op: DbOp
    pluginConfigId: number
    key: string
    /** Calls of this kind (storage, or cache) made so far in this install, this one included. */
    n: number
    /** Real ms since the install's database was made. */
    atMs: number
}

export interface StorageFaults {
    /** true: this write fails with INJECTED_WRITE_ERROR and never reaches the database. */
    failWrite?: (write: StorageWrite) => boolean
    /** true: this storage call (get, set, del) fails with INJECTED_STORAGE_ERROR and never reaches the database. */
    failStorage?: (call: HostCall) => boolean
    /** true: this cache call fails with INJECTED_CACHE_ERROR and never reaches the cache. */
    failCache?: (call: HostCall) => boolean
    /** Real ms every storage call (get, set, del) waits before it reaches the database. */
    latencyMs?: number
}

/** Which calls of one kind fail: the n-th ones, every call in a window of time, and each at a rate. */
export interface CallFaultPlan {
    /** The 1-based numbers of the calls that fail (one at a time). */
    calls?: number[]
    /** Every call from `fromMs` for `forMs` (real ms since the database was made) fails (for a while). */
    window?: { fromMs: number; forMs: number }
    /** Each call fails with this probability, from the seeded dice. */
    rate?: number
    seed?: number
}

/** A fault predicate from a plan. */
export function callFaults(plan: CallFaultPlan): (call: HostCall) => boolean {
    const dice = seededRandom(plan.seed ?? 1)
    const calls = new Set(plan.calls ?? [])
    return (call) => {
        const { window } = plan
        const inWindow = window !== undefined && call.atMs >= window.fromMs && call.atMs < window.fromMs + window.forMs
        const rolled = plan.rate !== undefined && plan.rate > 0 && dice() < plan.rate
        return calls.has(call.n) || inWindow || rolled
    }
}

/**
 * `--storage-faults` and `--cache-faults`: comma-separated parts, each `5%` (a rate), `call:7` (the 7th call;
 * repeat for more) or `for:30+10` (every call from second 30 of the run, for 10 s). Throws naming what is wrong.
 */
export function parseCallFaults(flag: string, text: string, seed: number): CallFaultPlan {
    const plan: CallFaultPlan = { seed }
    for (const part of text.split(',').map((p) => p.trim())) {
        const rate = /^(\d+(?:\.\d+)?)%$/.exec(part)
        const call = /^call:(\d+)$/.exec(part)
        const window = /^for:(\d+(?:\.\d+)?)\+(\d+(?:\.\d+)?)$/.exec(part)
        if (rate && Number(rate[1]) <= 100) {
            plan.rate = Number(rate[1]) / 100
        } else if (call && Number(call[1]) >= 1) {
            plan.calls = [...(plan.calls ?? []), Number(call[1])]
        } else if (window) {
            plan.window = { fromMs: Number(window[1]) * 1000, forMs: Number(window[2]) * 1000 }
        } else {
            throw new Error(
                `${flag}: cannot read "${part}"; use a rate (5%), a call number (call:7) or a while (for:30+10), ` +
                    'comma-separated'
            )
        }
    }
    return plan
}

export interface StorageFigures {
    reads: number
    /** set calls the database took. */
    writes: number
    deletes: number
    /** Writes that failed, injected or not. */
    failedWrites: number
    /** Storage and cache calls failed on purpose (failStorage, failCache). */
    injectedStorageFaults: number
    injectedCacheFaults: number
    cacheCalls: number
    /** Bytes (key and JSON text) in posthog_pluginstorage now, and the most it held during this host's life. */
    storedBytes: number
    peakStoredBytes: number
}

export interface HostStoreOptions {
    /** A folder for the database, so a later HostStore can open the same data (a host restart); default: memory. */
    dataDir?: string
    faults?: StorageFaults
}

/** The error a database operation failed with, carrying Postgres's SQLSTATE code when it has one. */
export class StorageError extends Error {
    constructor(
        message: string,
        readonly code: string | null
    ) {
        super(message)
    }
}

const WRITES: ReadonlySet<DbOp> = new Set(['storage.set', 'storage.del'])

function sleep(ms: number): Promise<void> {
    return new Promise((resolve) => setTimeout(resolve, ms))
}

/**
 * The install's database as the main thread holds it. The thread starts at the first call, so a plugin that never
 * touches storage or cache costs nothing; it holds the process open only while a call waits on it, so a store
 * nobody closed lets the process end.
 */
export class HostStore {
    private worker: Worker | null = null
    private ready: Promise<void> | null = null
    private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>()
    private nextId = 1
    /** Calls waiting on the database thread: while there are any, it holds the process open. */
    private calls = 0
    /** Set by close(): a plugin call still running when its host stopped must not start a new database. */
    private closed = false
    private faults: StorageFaults
    private readonly counts = {
        reads: 0,
        writes: 0,
        deletes: 0,
        failedWrites: 0,
        cacheCalls: 0,
        writeCalls: 0,
        storageCalls: 0,
        injectedStorageFaults: 0,
        injectedCacheFaults: 0,
    }
    private readonly born = Date.now()

    constructor(private readonly options: HostStoreOptions = {}) {
        this.faults = options.faults ?? {}
    }

    /** Replaces the injected faults from now on (a test can fail writes for a window of its choosing). */
    setFaults(faults: StorageFaults): void {
        this.faults = faults
    }

    /** The transport every VM of this install uses, in this thread or (through kafka.ts) in a worker thread. */
    readonly call: StoreTransport = async (op, args) => {
        const isStorage = op.startsWith('storage.')
        if (isStorage && op !== 'storage.all') {
            await sleep(this.faults.latencyMs ?? 0)
        }
        this.inject(op, args)
        if (WRITES.has(op)) {
            return this.write(op, args)
        }
        if (op === 'storage.get') {
            this.counts.reads++
        } else if (!isStorage) {
            this.counts.cacheCalls++
        }
        return this.db(op, args)
    }

    /** Fails a plugin's storage or cache call when the faults say so, before it reaches the database. */
    private inject(op: DbOp, args: unknown[]): void {
        const isStorage = op.startsWith('storage.')
        if (op === 'storage.all' || op === 'bytes') {
            return
        }
        const [pluginConfigId, key] = args as [number, string]
        const n = isStorage ? ++this.counts.storageCalls : this.counts.cacheCalls + 1
        const call: HostCall = { op, pluginConfigId, key, n, atMs: Date.now() - this.born }
        if (isStorage && this.faults.failStorage?.(call)) {
            this.counts.injectedStorageFaults++
            if (op !== 'storage.get') {
                this.counts.failedWrites++
            }
            throw new StorageError(INJECTED_STORAGE_ERROR.message, INJECTED_STORAGE_ERROR.code)
        }
        if (!isStorage && this.faults.failCache?.(call)) {
            this.counts.cacheCalls++
            this.counts.injectedCacheFaults++
            throw new StorageError(INJECTED_CACHE_ERROR, null)
        }
    }

    private async write(op: DbOp, args: unknown[]): Promise<unknown> {
        const n = ++this.counts.writeCalls
        const [pluginConfigId, key, value] = args as [number, string, string | undefined]
        const write: StorageWrite = { op: op === 'storage.set' ? 'set' : 'del', pluginConfigId, key, value: null, n }
        write.value = write.op === 'set' ? (value ?? null) : null
        if (this.faults.failWrite?.(write)) {
            this.counts.failedWrites++
            throw new StorageError(INJECTED_WRITE_ERROR.message, INJECTED_WRITE_ERROR.code)
        }
        try {
            const stored = await this.db(op, args)
            this.counts[write.op === 'set' ? 'writes' : 'deletes']++
            return stored
        } catch (error) {
            this.counts.failedWrites++
            throw error
        }
    }

    /** Every key a plugin config stored, with its value parsed from JSON: what a test reads. */
    async contents(pluginConfigId = DEFAULT_PLUGIN_CONFIG_ID): Promise<Record<string, unknown>> {
        const rows = (await this.db('storage.all', [pluginConfigId])) as Array<{ key: string; value: string }>
        return Object.fromEntries(rows.map((row) => [row.key, JSON.parse(row.value) as unknown]))
    }

    async figures(): Promise<StorageFigures> {
        const { reads, writes, deletes, failedWrites, cacheCalls, injectedStorageFaults, injectedCacheFaults } =
            this.counts
        // A store that never started holds what its data dir held; a fresh one holds nothing.
        const bytes =
            this.ready || this.options.dataDir
                ? ((await this.db('bytes', [])) as { stored: number; peak: number })
                : null
        return {
            reads,
            writes,
            deletes,
            failedWrites,
            cacheCalls,
            injectedStorageFaults,
            injectedCacheFaults,
            storedBytes: bytes?.stored ?? 0,
            peakStoredBytes: bytes?.peak ?? 0,
        }
    }

    /** Closes the database (its files are complete on disk after this) and ends its thread. */
    async close(): Promise<void> {
        this.closed = true
        const worker = this.worker
        if (!worker || !this.ready) {
            return
        }
        await this.ready.catch(() => undefined)
        const exited = new Promise((resolve) => worker.once('exit', resolve))
        // Held open until the database has written its files and the thread ended.
        worker.ref()
        worker.postMessage('close')
        await exited
        this.worker = null
        this.ready = null
    }

    /**
     * Starts the database now, not at the first call: PostHog's Postgres is up before the host takes events, so a
     * run that measures time or CPU opens it first. Counts as no call and meets no injected fault.
     */
    async open(): Promise<void> {
        await this.held(() => Promise.resolve(undefined))
    }

    private db(op: DbOp, args: unknown[]): Promise<unknown> {
        return this.held(
            (worker) =>
                new Promise((resolve, reject) => {
                    const id = this.nextId++
                    this.pending.set(id, { resolve, reject })
                    worker.postMessage({ id, op, args })
                })
        )
    }

    /** Runs `work` once the database is up, holding the process open while it waits (and only then). */
    private async held<T>(work: (worker: Worker) => Promise<T>): Promise<T> {
        if (this.closed) {
            // What a plugin meets when its server shuts down under it: the connection is gone.
            throw new StorageError('Connection terminated: the host has stopped', null)
        }
        const worker = this.start()
        if (this.calls++ === 0) {
            worker.ref()
        }
        try {
            await this.ready
            return await work(worker)
        } finally {
            // Once close() began, the thread stays held until it has written its files and ended.
            if (--this.calls === 0 && !this.closed) {
                worker.unref()
            }
        }
    }

    private start(): Worker {
        if (this.worker) {
            return this.worker
        }
        const data: DbData = { dataDir: this.options.dataDir ?? null }
        const worker = new Worker(join(__dirname, 'storage-entry.js'), { workerData: data })
        this.worker = worker
        this.ready = new Promise((resolve, reject) => {
            worker.once('error', reject)
            worker.on('message', (message: FromDb) => {
                if (message.type === 'ready') {
                    resolve()
                    return
                }
                const pending = this.pending.get(message.id)
                this.pending.delete(message.id)
                if (message.type === 'result') {
                    pending?.resolve(message.value)
                } else {
                    pending?.reject(new StorageError(message.message, message.code))
                }
            })
        })
        worker.on('error', (error) => this.failAll(error))
        // After the listeners: adding a 'message' listener refs a worker again.
        worker.unref()
        return worker
    }

    private failAll(error: Error): void {
        for (const pending of this.pending.values()) {
            pending.reject(new StorageError(`the storage database stopped: ${error.message}`, null))
        }
        this.pending.clear()
    }
}

/** JSON text, as PostHog stores a value; undefined (which JSON cannot hold) is refused like Postgres's NOT NULL. */
function serialise(key: string, value: unknown): string {
    const text = JSON.stringify(value) as string | undefined
    if (text === undefined) {
        throw new StorageError(
            `null value in column "value" of relation "posthog_pluginstorage" violates not-null constraint (key "${key}")`,
            '23502'
        )
    }
    return text
}

function parsed(text: unknown, defaultValue: unknown): unknown {
    return typeof text === 'string' ? (JSON.parse(text) as unknown) : defaultValue
}

/** `meta.storage`: get/set/del on posthog_pluginstorage for one plugin config. */
export function metaStorage(send: StoreTransport, pluginConfigId: number) {
    return {
        get: async (key: string, defaultValue: unknown = null): Promise<unknown> =>
            parsed(await send('storage.get', [pluginConfigId, key]), defaultValue),
        set: async (key: string, value: unknown): Promise<void> => {
            await send('storage.set', [pluginConfigId, key, serialise(key, value)])
        },
        del: async (key: string): Promise<void> => {
            await send('storage.del', [pluginConfigId, key])
        },
    }
}

/** The options PostHog's cache.get and cache.set take. */
interface CacheOptions {
    jsonSerialize?: boolean
}

/**
 * `meta.cache` with Redis semantics. TTLs run on the host's clock: `ttlScale` (minuteMs / 60 000) shortens them
 * as much as the scaled minute, so a lease taken in runEveryMinute lasts the same number of scaled minutes; but
 * never below `minTtlMs` of real time (or the TTL asked for, if shorter): a plugin measures how long it has held a
 * lock with its own clock, which no time scale speeds up.
 */
export function metaCache(send: StoreTransport, pluginConfigId: number, ttlScale: number, minTtlMs = 0) {
    const ms = (seconds: number): number => Math.max(seconds * 1000 * ttlScale, Math.min(seconds * 1000, minTtlMs))
    // PostHog's options: `jsonSerialize: false` stores a string as it is, and reads the stored text unparsed.
    const raw = (options?: CacheOptions): boolean => options?.jsonSerialize === false
    return {
        get: async (key: string, defaultValue: unknown = null, options?: CacheOptions): Promise<unknown> => {
            const text = await send('cache.get', [pluginConfigId, key])
            return raw(options) ? (text ?? defaultValue) : parsed(text, defaultValue)
        },
        set: async (key: string, value: unknown, ttlSeconds?: number, options?: CacheOptions): Promise<void> => {
            const ttl = typeof ttlSeconds === 'number' && ttlSeconds > 0 ? ms(ttlSeconds) : null
            const text = raw(options) ? String(value) : (JSON.stringify(value) ?? 'null')
            await send('cache.set', [pluginConfigId, key, text, ttl])
        },
        incr: async (key: string): Promise<number> => Number(await send('cache.incr', [pluginConfigId, key])),
        expire: async (key: string, ttlSeconds: number): Promise<boolean> =>
            (await send('cache.expire', [pluginConfigId, key, ms(Number(ttlSeconds))])) === true,
    }
}
