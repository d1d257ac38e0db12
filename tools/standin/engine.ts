/**
 * The stand-in's storage: a real ClickHouse engine (chdb, in-process) with an `events` table typed and sorted like
 * PostHog's (posthog/models/event/sql.py). libchdb binds one data directory per process, so every stand-in in a
 * process shares one chdb Session and gets its own database in it.
 */
import { randomBytes } from 'node:crypto'

import { drainPending, Session } from 'chdb'

/** PostHog's events columns the stand-in keeps, with PostHog's ClickHouse types. */
const EVENTS_COLUMNS = `
    uuid UUID,
    event String,
    properties String CODEC(ZSTD(3)),
    timestamp DateTime64(6, 'UTC'),
    team_id Int64,
    distinct_id String,
    elements_chain String,
    created_at DateTime64(6, 'UTC') DEFAULT now64(3, 'UTC'),
    person_id UUID,
    person_created_at DateTime64(3) DEFAULT toDateTime64(0, 3),
    person_properties String DEFAULT '',
    _timestamp DateTime DEFAULT now(),
    inserted_at Nullable(DateTime64(6, 'UTC')) DEFAULT now64(6, 'UTC'),
    \`$session_id\` String MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$session_id'), '^"|"$', ''),
    \`$window_id\` String MATERIALIZED replaceRegexpAll(JSONExtractRaw(properties, '$window_id'), '^"|"$', '')`

/**
 * The persons tables the HogQL `events` table joins in the persons-on-events modes that read them: `persons`
 * (posthog/models/person/sql.py: a version per change, the highest wins) and `person_distinct_id_overrides`
 * (a distinct_id moved to another person by a merge). Same column types and engines as PostHog's, fewer columns.
 */
const PERSONS_TABLE = `(
    id UUID,
    created_at DateTime64(3),
    team_id Int64,
    properties String,
    is_identified Int8 DEFAULT 0,
    is_deleted Int8 DEFAULT 0,
    version UInt64 DEFAULT 0,
    _timestamp DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(version) ORDER BY (team_id, id)`

const OVERRIDES_TABLE = `(
    team_id Int64,
    distinct_id String,
    person_id UUID,
    is_deleted Int8 DEFAULT 0,
    version Int64 DEFAULT 0,
    _timestamp DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(version) ORDER BY (team_id, distinct_id)`

/** PostHog's engine, partitioning and sort key for `sharded_events`. */
const EVENTS_STORAGE = `ENGINE = ReplacingMergeTree(_timestamp)
PARTITION BY toYYYYMM(timestamp)
ORDER BY (team_id, toDate(timestamp), event, cityHash64(distinct_id), cityHash64(uuid))`

/** Output settings so chdb's JSON matches what PostHog's renderer writes (numbers as numbers, valid UTF-8). */
export const OUTPUT_SETTINGS =
    'output_format_json_quote_64bit_integers = 0, output_format_json_escape_forward_slashes = 0, ' +
    'output_format_json_validate_utf8 = 1, output_format_json_quote_denormals = 0'

interface SharedSession {
    session: Session
    path: string
    persistent: boolean
    users: number
    /** Set while nobody uses the session: it closes when this fires. */
    idle?: NodeJS.Timeout
}

let shared: SharedSession | undefined
let closing: Promise<void> | undefined
let opening: Promise<void> | undefined

/**
 * How long an unused session stays open. Test files start a stand-in per test and opening chdb costs ~0.3 s; the
 * timer is unref'd, so it never keeps a process alive, and the exit hook below closes what is left.
 */
const IDLE_CLOSE_MS = 250

function closeShared(): Promise<void> {
    const current = shared
    shared = undefined
    if (!current) {
        return closing ?? Promise.resolve()
    }
    clearTimeout(current.idle)
    closing = (async () => {
        current.session.close()
        await drainPending()
    })().finally(() => {
        closing = undefined
    })
    return closing
}

/**
 * Opens chdb's session. Another module instance in this process (jest gives each test file its own registry, the
 * native engine is shared) may still hold an idle session for a moment; wait for it rather than fail.
 */
async function openSession(dataDir?: string): Promise<Session> {
    const deadline = Date.now() + 3000
    for (;;) {
        try {
            return dataDir ? new Session(dataDir) : new Session()
        } catch (error) {
            const busy = /only one active data directory/.test(error instanceof Error ? error.message : String(error))
            if (!busy || Date.now() > deadline) {
                throw error
            }
            await new Promise((resolve) => setTimeout(resolve, 50))
        }
    }
}

process.on('exit', () => {
    shared?.session.close()
})

/** An error from ClickHouse, with its numeric code (159 = TIMEOUT_EXCEEDED). */
export class EngineError extends Error {
    readonly clickhouseCode: number | null
    constructor(message: string, clickhouseCode: number | null) {
        super(message)
        this.name = 'EngineError'
        this.clickhouseCode = clickhouseCode
    }
}

function engineError(error: unknown): EngineError {
    const message = error instanceof Error ? error.message : String(error)
    const code = (error as { clickhouseCode?: unknown }).clickhouseCode
    const parsed = typeof code === 'number' ? code : Number(/Code: (\d+)\./.exec(message)?.[1] ?? NaN)
    return new EngineError(message, Number.isFinite(parsed) ? parsed : null)
}

export interface ColumnType {
    name: string
    type: string
}

/** One stand-in's database inside the shared chdb session. */
export class EventStore {
    readonly database: string
    readonly table: string
    readonly personsTable: string
    readonly overridesTable: string
    private readonly persistent: boolean
    private closed = false

    private constructor(database: string, persistent: boolean) {
        this.database = database
        this.table = `${database}.events`
        this.personsTable = `${database}.persons`
        this.overridesTable = `${database}.person_distinct_id_overrides`
        this.persistent = persistent
    }

    /**
     * Opens (or joins) the process's chdb session. With `dataDir` the data survives a restart of the stand-in and
     * lives in the database `posthog`; without, a fresh database in a temporary directory that `close()` drops.
     */
    static async open(dataDir?: string): Promise<EventStore> {
        await closing
        if (shared && shared.users === 0 && (dataDir ? shared.path !== dataDir : shared.persistent)) {
            await closeShared()
        }
        if (shared && dataDir && shared.path !== dataDir) {
            throw new Error(`chdb already has ${shared.path} open in this process; one data directory per process`)
        }
        while (opening) {
            await opening
        }
        if (!shared) {
            opening = openSession(dataDir).then((session) => {
                shared = { session, path: session.path, persistent: Boolean(dataDir), users: 0 }
            })
            try {
                await opening
            } finally {
                opening = undefined
            }
        }
        if (!shared) {
            throw new Error('chdb session did not open')
        }
        clearTimeout(shared.idle)
        shared.idle = undefined
        shared.users += 1
        const database = dataDir ? 'posthog' : `standin_${randomBytes(6).toString('hex')}`
        const store = new EventStore(database, Boolean(dataDir))
        await store.run(`CREATE DATABASE IF NOT EXISTS ${database}`)
        await store.run(`CREATE TABLE IF NOT EXISTS ${store.table} (${EVENTS_COLUMNS}) ${EVENTS_STORAGE}`)
        await store.run(`CREATE TABLE IF NOT EXISTS ${store.personsTable} ${PERSONS_TABLE}`)
        await store.run(`CREATE TABLE IF NOT EXISTS ${store.overridesTable} ${OVERRIDES_TABLE}`)
        return store
    }

    private get session(): Session {
        if (!shared || this.closed) {
            throw new Error('the stand-in event store is closed')
        }
        return shared.session
    }

    /** Runs a statement; ClickHouse errors become EngineError with their code. */
    async run(sql: string, format = 'JSONCompactEachRow'): Promise<string> {
        try {
            const result = await this.session.queryAsync(sql, { format })
            return result.text()
        } catch (error) {
            throw engineError(error)
        }
    }

    /** Runs a SELECT and returns ClickHouse's output bytes as they are (no decoding into a JS string). */
    async runBytes(sql: string, format = 'JSONCompactEachRow'): Promise<Buffer> {
        try {
            const result = await this.session.queryAsync(sql, { format })
            // A view, not a copy: a page is megabytes.
            const bytes = result.bytes()
            return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
        } catch (error) {
            throw engineError(error)
        }
    }

    /** Inserts JSON Lines into one of the persons tables; omitted columns take their defaults. */
    async insertInto(table: string, lines: string): Promise<void> {
        if (lines.length === 0) {
            return
        }
        try {
            await this.session.insert({
                table,
                values: Buffer.from(lines),
                format: 'JSONEachRow',
                settings: { input_format_skip_unknown_fields: 0, date_time_input_format: 'best_effort' },
            })
        } catch (error) {
            throw engineError(error)
        }
    }

    /** Inserts rows given as JSON Lines in `EVENTS_COLUMNS` names; omitted columns take their defaults. */
    async insertJsonLines(lines: string): Promise<void> {
        await this.insertInto(this.table, lines)
    }

    /** The columns and ClickHouse types a SELECT returns, without running it. */
    async describe(select: string): Promise<ColumnType[]> {
        const text = await this.run(`DESCRIBE TABLE (${select})`)
        return text
            .split('\n')
            .filter((line) => line.length > 0)
            .map((line) => {
                const [name, type] = JSON.parse(line) as [string, string]
                return { name, type }
            })
    }

    async count(teamId?: number): Promise<number> {
        const where = teamId === undefined ? '' : ` WHERE team_id = ${Math.trunc(teamId)}`
        const text = await this.run(`SELECT count() FROM ${this.table}${where}`, 'CSV')
        return Number(text.trim())
    }

    /** Drops a temporary database and leaves the shared session, which closes once nobody has used it for a second. */
    async close(): Promise<void> {
        if (this.closed || !shared) {
            return
        }
        if (!this.persistent) {
            await this.run(`DROP DATABASE IF EXISTS ${this.database}`).catch(() => undefined)
        }
        this.closed = true
        shared.users -= 1
        if (shared.users === 0) {
            shared.idle = setTimeout(() => void closeShared(), IDLE_CLOSE_MS)
            shared.idle.unref()
        }
    }
}
