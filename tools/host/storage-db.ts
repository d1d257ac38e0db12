/**
 * The emulated install's database: a real Postgres (PGlite) in a thread of its own, as PostHog's Postgres and
 * Redis sit outside its plugin server. It holds `posthog_pluginstorage` (meta.storage) and a cache table standing in
 * for Redis (meta.cache), and answers the SQL operations of storage.ts one message at a time. Running it outside the
 * host's threads keeps its WASM work off their event loops, and keeps it clear of Jest's module sandbox, which
 * cannot run PGlite's dynamic imports.
 */
import { parentPort, workerData } from 'node:worker_threads'

import { PGlite } from '@electric-sql/pglite'

/** The operations the database answers; arguments are positional, values arrive already JSON-serialised. */
export type DbOp =
    | 'storage.get'
    | 'storage.set'
    | 'storage.del'
    | 'storage.all'
    | 'cache.get'
    | 'cache.set'
    | 'cache.incr'
    | 'cache.expire'
    | 'bytes'

export type ToDb = { id: number; op: DbOp; args: unknown[] }
export type FromDb =
    | { type: 'ready' }
    | { type: 'result'; id: number; value: unknown }
    | { type: 'error'; id: number; message: string; code: string | null }

export interface DbData {
    /** A folder for the database files, so a later host can open the same data; none: in memory. */
    dataDir: string | null
}

/** PostHog's table (Django's PluginStorage: key is a CharField of 200), and a Redis stand-in keyed the same way. */
const SCHEMA = `
CREATE TABLE IF NOT EXISTS posthog_pluginstorage (
    id serial PRIMARY KEY,
    plugin_config_id integer NOT NULL,
    key varchar(200) NOT NULL,
    value text NOT NULL,
    UNIQUE (plugin_config_id, key)
);
CREATE TABLE IF NOT EXISTS host_cache (
    plugin_config_id integer NOT NULL,
    key text NOT NULL,
    value text NOT NULL,
    expires_at double precision,
    PRIMARY KEY (plugin_config_id, key)
);`

/** A row's size as the figures count it: key and JSON text. */
const ROW_BYTES = 'octet_length(key) + octet_length(value)'

/** PostHog's upsert, with the change in stored bytes read from the same snapshot. */
const STORAGE_SET = `
WITH old AS (
    SELECT ${ROW_BYTES} AS bytes FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2
), up AS (
    INSERT INTO posthog_pluginstorage (plugin_config_id, key, value) VALUES ($1, $2, $3)
    ON CONFLICT (plugin_config_id, key) DO UPDATE SET value = $3
    RETURNING ${ROW_BYTES} AS bytes
)
SELECT (SELECT bytes FROM up) - COALESCE((SELECT bytes FROM old), 0) AS delta`

const STORAGE_DEL = `DELETE FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2 RETURNING ${ROW_BYTES} AS bytes`

/** A key past its TTL is gone, as in Redis. $3 is the thread's clock in ms. */
const LIVE = '(expires_at IS NULL OR expires_at > $3)'

/** Redis INCR: a missing or expired key counts from 0 and has no TTL; a live key keeps its TTL. */
const CACHE_INCR = `
INSERT INTO host_cache AS c (plugin_config_id, key, value, expires_at) VALUES ($1, $2, '1', NULL)
ON CONFLICT (plugin_config_id, key) DO UPDATE SET
    value = CASE WHEN c.expires_at <= $3 THEN '1' ELSE (c.value::bigint + 1)::text END,
    expires_at = CASE WHEN c.expires_at <= $3 THEN NULL ELSE c.expires_at END
RETURNING value`

const CACHE_SET = `
INSERT INTO host_cache (plugin_config_id, key, value, expires_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (plugin_config_id, key) DO UPDATE SET value = $3, expires_at = $4`

/** Postgres's code for text that is not a number: Redis says "not an integer" there. */
const INVALID_TEXT_REPRESENTATION = '22P02'

type Row = Record<string, unknown>

export class StorageDb {
    private storedBytes = 0
    private peakBytes = 0

    private constructor(private readonly db: PGlite) {}

    static async open(dataDir: string | null): Promise<StorageDb> {
        const db = dataDir ? new PGlite(dataDir) : new PGlite()
        await db.exec(SCHEMA)
        const store = new StorageDb(db)
        const total = await db.query<Row>(
            `SELECT COALESCE(SUM(${ROW_BYTES}), 0)::integer AS bytes FROM posthog_pluginstorage`
        )
        store.storedBytes = Number(total.rows[0]?.bytes ?? 0)
        store.peakBytes = store.storedBytes
        return store
    }

    private async rows(sql: string, params: unknown[]): Promise<Row[]> {
        return (await this.db.query<Row>(sql, params)).rows
    }

    private moved(delta: number): number {
        this.storedBytes += delta
        this.peakBytes = Math.max(this.peakBytes, this.storedBytes)
        return this.storedBytes
    }

    async run(op: DbOp, args: unknown[]): Promise<unknown> {
        const [configId, key] = args
        const now = Date.now()
        switch (op) {
            case 'storage.get': {
                const sql = 'SELECT value FROM posthog_pluginstorage WHERE plugin_config_id = $1 AND key = $2'
                return (await this.rows(sql, [configId, key]))[0]?.value ?? null
            }
            case 'storage.set':
                return this.moved(Number((await this.rows(STORAGE_SET, args))[0]?.delta ?? 0))
            case 'storage.del':
                return this.moved(-Number((await this.rows(STORAGE_DEL, [configId, key]))[0]?.bytes ?? 0))
            case 'storage.all': {
                const sql = 'SELECT key, value FROM posthog_pluginstorage WHERE plugin_config_id = $1 ORDER BY key'
                return await this.rows(sql, [configId])
            }
            case 'bytes':
                return { stored: this.storedBytes, peak: this.peakBytes }
            default:
                return this.runCache(op, args, now)
        }
    }

    private async runCache(op: DbOp, args: unknown[], now: number): Promise<unknown> {
        const [configId, key, value, ttlMs] = args
        const where = `plugin_config_id = $1 AND key = $2 AND ${LIVE}`
        switch (op) {
            case 'cache.get':
                return (await this.rows(`SELECT value FROM host_cache WHERE ${where}`, [configId, key, now]))[0]?.value
            case 'cache.set': {
                const expiresAt = typeof ttlMs === 'number' ? now + ttlMs : null
                await this.rows(CACHE_SET, [configId, key, value, expiresAt])
                return null
            }
            case 'cache.incr':
                return Number((await this.rows(CACHE_INCR, [configId, key, now]))[0]?.value)
            case 'cache.expire': {
                // Redis EXPIRE: a TTL of 0 or less deletes the key; either way, true only if the key was there.
                const ms = Number(value)
                const sql =
                    ms <= 0
                        ? `DELETE FROM host_cache WHERE ${where} RETURNING 1`
                        : `UPDATE host_cache SET expires_at = $3 + $4 WHERE ${where} RETURNING 1`
                return (await this.rows(sql, ms <= 0 ? [configId, key, now] : [configId, key, now, ms])).length > 0
            }
            default:
                throw new Error(`unknown database operation "${op}"`)
        }
    }

    close(): Promise<void> {
        return this.db.close()
    }
}

/** An error as it crosses to the host: Postgres's message and SQLSTATE code, Redis's text for a bad INCR. */
export function dbError(op: DbOp, error: unknown): { message: string; code: string | null } {
    const e = error as { message?: string; code?: unknown }
    const code = typeof e.code === 'string' ? e.code : null
    if (op === 'cache.incr' && code === INVALID_TEXT_REPRESENTATION) {
        return { message: 'ERR value is not an integer or out of range', code }
    }
    return { message: e.message ?? String(error), code }
}

/** The thread's loop: open the database, then answer each operation in the order it came. */
export function serveDb(): void {
    const port = parentPort
    if (!port) {
        throw new Error('host/storage-db.ts runs only as a worker thread')
    }
    const send = (message: FromDb): void => port.postMessage(message)
    void StorageDb.open((workerData as DbData).dataDir).then((db) => {
        port.on('message', (message: ToDb | 'close') => {
            if (message === 'close') {
                void db.close().then(() => port.close())
                return
            }
            db.run(message.op, message.args).then(
                (value) => send({ type: 'result', id: message.id, value }),
                (error: unknown) => send({ type: 'error', id: message.id, ...dbError(message.op, error) })
            )
        })
        send({ type: 'ready' })
    })
}
