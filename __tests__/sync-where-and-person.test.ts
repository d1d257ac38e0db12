/**
 * `sync --where` and `sync --with-person` end to end, through the real PostHog stand-in (PostHog's parser, chdb) and
 * the real receiver; the stand-in's persons-on-events modes and HogQL expressions over real HTTP; and the pure
 * parts (the query text, the checks on --where, a person's name, the checkpoint's binding).
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { bindingDifferences, readSyncCheckpoint, SourceBinding } from '../sync/checkpoint'
import { runSyncCli } from '../sync/cli'
import { DETAIL_CHARS, shortDetail } from '../sync/posthog'
import { buildPageQuery, buildProbeQuery, PERSONS_ON_EVENTS_MODE, whereProblem } from '../sync/query'
import { personDisplayName } from '../sync/rows'
import { Receiver, startReceiver } from '../tools/receiver/receiver'
import { StandInEvent } from '../tools/standin/events'
import { PostHogStandIn, startPostHogStandIn } from '../tools/standin/server'
import { captureOutput } from './helpers/io'

const API_KEY = 'phx_Wh3re_P3rson_k3y_a1b2c3'
const PROJECT = 5151
const TOKEN = 'whr_T0ken_44ee55ff'
const HOUR = 3_600_000

let dir: string
let since: string
let standin: PostHogStandIn
let receiver: Receiver | undefined
const outputs: string[] = []

afterAll(() => {
    const all = outputs.join('\n')
    expect(all.length).toBeGreaterThan(500)
    for (const secret of [API_KEY, TOKEN]) {
        expect(all).not.toContain(secret)
    }
})

beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'sync-where-'))
    since = new Date(Date.now() - 2 * HOUR).toISOString()
    standin = await startPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT })
})

afterEach(async () => {
    await receiver?.close()
    await standin.close()
    receiver = undefined
    rmSync(dir, { recursive: true, force: true })
})

async function rx(): Promise<Receiver> {
    receiver = await startReceiver({ dataDir: join(dir, 'rx'), path: `/api/v1/webhooks/${TOKEN}`, seed: 3 })
    return receiver
}

/** Ten users; one in four on the pro plan; each event says where it happened and carries its person as stored. */
function events(count: number, start = Date.now() - HOUR): StandInEvent[] {
    return Array.from({ length: count }, (_, n) => {
        const user = n % 10
        return {
            event: n % 3 === 0 ? 'signup' : '$pageview',
            distinct_id: `user-${user}`,
            timestamp: new Date(start + n).toISOString(),
            properties: {
                n,
                $current_url: `https://example.com/${n % 5 === 0 ? 'pricing' : 'docs'}`,
                ...(user % 4 === 0 ? { plan: 'pro' } : {}),
                email: `user-${user}@example.com`,
            },
            person_properties: { email: `user-${user}@example.com`, company: `Company ${user}`, plan_at_event: n },
        }
    })
}

function baseArgs(extra: string[] = []): string[] {
    return [
        '--posthog-url',
        standin.url,
        '--project-id',
        String(PROJECT),
        '--since',
        since,
        '--lag',
        '0s',
        '--page-size',
        '30',
        '--batch-events',
        '20',
        ...extra,
    ]
}

async function cli(args: string[]) {
    const { stdout, stderr, text } = captureOutput()
    const env = { POSTHOG_API_KEY: API_KEY, PATTERNS_WEBHOOK_URL: receiver?.url ?? 'http://127.0.0.1:9/none' }
    const code = await runSyncCli(args, env, { stdout, stderr })
    outputs.push(text.stdout, text.stderr)
    return { code, ...text }
}

describe('--where: PostHog filters, and the query budget reads only what is sent', () => {
    it('delivers exactly the matching events, each once, and PostHog returns only those rows', async () => {
        const r = await rx()
        const all = await standin.insertEvents(events(200))
        const where = "event = 'signup' AND properties.$current_url ILIKE '%/PRICING' AND properties.plan = 'pro'"
        const matching = all.filter((e) => {
            const p = JSON.parse(e.properties) as { $current_url: string; plan?: string }
            return e.event === 'signup' && p.$current_url.endsWith('/pricing') && p.plan === 'pro'
        })
        expect(matching.length).toBeGreaterThan(0)
        expect(matching.length).toBeLessThan(20)
        const { code, stdout } = await cli(baseArgs(['--where', where]))
        expect(code).toBe(0)
        const got = r.rows().map((row) => String(row.uuid))
        expect(got.sort()).toEqual(matching.map((e) => e.uuid).sort())
        expect(new Set(got).size).toBe(got.length)
        const stats = await standin.stats()
        // The probe (no rows) and the pages: PostHog returned the matching rows and nothing else.
        expect(stats.rowsReturned).toBe(matching.length)
        expect(stdout).toMatch(new RegExp(`events read\\s+${matching.length}\\b`))
    })

    it('goes in parentheses after the cursor: an OR in it cannot widen the page past the cursor', async () => {
        const r = await rx()
        await standin.insertEvents(events(90))
        const { code } = await cli(baseArgs(['--where', "event = 'signup' OR 1 = 1"]))
        expect(code).toBe(0)
        // Every event once (the OR matches all), none twice: the cursor's conditions still bound each page.
        const got = r.rows().map((row) => String(row.uuid))
        expect(got).toHaveLength(90)
        expect(new Set(got).size).toBe(90)
    })

    it('a bad expression exits 2 at start with PostHog own message, after one request, saving nothing', async () => {
        await rx()
        await standin.insertEvents(events(10))
        const checkpoint = join(dir, 'ck')
        const unknown = await cli(baseArgs(['--where', 'nope = 1', '--checkpoint', checkpoint]))
        expect(unknown.code).toBe(2)
        expect(unknown.stderr).toContain(
            'error: --where: PostHog refused the expression (HTTP 400: Unable to resolve field: nope)'
        )
        const syntax = await cli(baseArgs(['--where', "event = 'a' AND"]))
        expect(syntax.code).toBe(2)
        expect(syntax.stderr).toMatch(
            /--where: PostHog refused the expression \(HTTP 400: no viable alternative at input/
        )
        // The parser quotes the query up to the error: the quote keeps its end, where the expression is.
        expect(syntax.stderr).toContain(' … ')
        expect(syntax.stderr).toContain("AND (\\n    event = 'a' AND\\n)')")
        expect(standin.log.map((entry) => entry.status)).toEqual([400, 400])
        expect(receiver?.rows()).toHaveLength(0)
        expect(() => readFileSync(checkpoint)).toThrow()
    })

    it('a --where that could close its parentheses is refused before any request', async () => {
        for (const where of ['1) OR (1 = 1', "event = 'signup' -- )", "properties.a = 'x'; SELECT 1", '(1']) {
            const { code, stderr } = await cli(baseArgs(['--where', where]))
            expect(code).toBe(2)
            expect(stderr).toMatch(/--where: the expression .*give one HogQL boolean expression/)
        }
        expect(standin.requests).toBe(0)
    })
})

describe('--with-person: the person as PostHog webhook destination sends it', () => {
    it('every element has its person {id, properties, name, url}, read in the same query', async () => {
        const r = await rx()
        const stored = await standin.insertEvents(events(45))
        const { code } = await cli(baseArgs(['--with-person']))
        expect(code).toBe(0)
        const rows = r.rows()
        expect(rows).toHaveLength(45)
        const byUuid = new Map(stored.map((e) => [e.uuid, e]))
        for (const row of rows) {
            const source = byUuid.get(String(row.uuid))
            const person = row.person as { id: string; properties: Record<string, unknown>; name: string; url: string }
            expect(person.id).toBe(source?.person_id)
            expect(person.properties).toEqual(JSON.parse(source?.person_properties ?? ''))
            expect(person.name).toBe(`${String(row.distinct_id)}@example.com`)
            expect(person.url).toBe(`${standin.url}/project/${PROJECT}/person/${String(row.distinct_id)}`)
        }
        // One query per page (30, then 15): the person came with the event, not from a lookup of its own.
        expect(standin.log.length).toBe(2)
    })

    it('an excluded property is absent from both the event and the person, and is not the name either', async () => {
        const r = await rx()
        await standin.insertEvents(events(20))
        const { code } = await cli(baseArgs(['--with-person', '--excluded-properties', 'email,$current_url']))
        expect(code).toBe(0)
        const rows = r.rows()
        expect(rows).toHaveLength(20)
        for (const row of rows) {
            const person = row.person as { properties: Record<string, unknown>; name: string }
            expect(row.properties).not.toHaveProperty('email')
            expect(row.properties).not.toHaveProperty('$current_url')
            expect(person.properties).not.toHaveProperty('email')
            expect(person.properties).toHaveProperty('company')
            // With email gone, the name falls back to the distinct_id, as PostHog's does.
            expect(person.name).toBe(row.distinct_id)
            expect(JSON.stringify(row)).not.toContain('@example.com')
        }
    })

    it('asks PostHog for person properties as stored on the event, in every query', async () => {
        await rx()
        await standin.insertEvents(events(5))
        // The project's own mode joins the persons table; the query's modifier wins, as in PostHog.
        await standin.close()
        standin = await startPostHogStandIn({
            apiKey: API_KEY,
            projectId: PROJECT,
            personsOnEventsMode: 'person_id_override_properties_joined',
        })
        const [stored] = await standin.insertEvents(events(1))
        await standin.insertPersons([{ id: stored?.person_id ?? '', properties: { email: 'now@example.com' } }])
        const { code } = await cli(baseArgs(['--with-person', '--where', "person.properties.company = 'Company 0'"]))
        expect(code).toBe(0)
        const [row] = receiver?.rows() ?? []
        expect((row?.person as { properties: { email: string } }).properties.email).toBe('user-0@example.com')
        for (const entry of standin.log) {
            const body = entry.body as { query: { modifiers?: { personsOnEventsMode?: string } } }
            expect(body.query.modifiers?.personsOnEventsMode).toBe(PERSONS_ON_EVENTS_MODE)
        }
    })
})

describe('the checkpoint records the filter and the shape', () => {
    it('resuming with another --where or --with-person exits 2 naming the difference and how to start over', async () => {
        await rx()
        await standin.insertEvents(events(30))
        const checkpoint = join(dir, 'ck')
        const first = await cli(baseArgs(['--where', "event = 'signup'", '--checkpoint', checkpoint]))
        expect(first.code).toBe(0)
        expect(readSyncCheckpoint(checkpoint)?.source).toMatchObject({ where: "event = 'signup'", withPerson: false })
        const requests = standin.requests
        const otherWhere = await cli(baseArgs(['--where', "event = '$pageview'", '--checkpoint', checkpoint]))
        expect(otherWhere.code).toBe(2)
        expect(otherWhere.stderr).toContain(`--where "event = 'signup'" then, "event = '$pageview'" now`)
        expect(otherWhere.stderr).toContain('start over with a new --checkpoint file')
        const noWhere = await cli(baseArgs(['--checkpoint', checkpoint]))
        expect(noWhere.code).toBe(2)
        expect(noWhere.stderr).toContain(`--where "event = 'signup'" then, none now`)
        const person = await cli(baseArgs(['--where', "event = 'signup'", '--with-person', '--checkpoint', checkpoint]))
        expect(person.code).toBe(2)
        expect(person.stderr).toContain('--with-person off then, on now')
        expect(standin.requests).toBe(requests)
        const same = await cli(baseArgs(['--where', "  event = 'signup' ", '--checkpoint', checkpoint]))
        expect(same.code).toBe(0)
    })
})

describe('the stand-in follows PostHog', () => {
    async function query(hogql: string, personsOnEventsMode?: string) {
        const response = await fetch(`${standin.url}/api/projects/${PROJECT}/query/`, {
            method: 'POST',
            headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
            body: JSON.stringify({
                query: { kind: 'HogQLQuery', query: hogql, modifiers: { personsOnEventsMode } },
                refresh: 'force_blocking',
            }),
        })
        return { status: response.status, body: (await response.json()) as Record<string, unknown> }
    }

    it('reads person_id and person.properties by the persons-on-events mode, joining persons only where PostHog does', async () => {
        const [event] = await standin.insertEvents([
            {
                event: 'e',
                distinct_id: 'merged-user',
                timestamp: new Date().toISOString(),
                person_properties: { tier: 'then' },
            },
        ])
        const winner = '0190aaaa-0000-7000-8000-000000000001'
        await standin.insertPersons(
            [
                { id: winner, properties: { tier: 'now' }, version: 2 },
                { id: winner, properties: { tier: 'older' }, version: 1 },
            ],
            [{ distinct_id: 'merged-user', person_id: winner }]
        )
        const sql = 'SELECT person_id, person.properties.tier FROM events'
        const onEvents = await query(sql, 'person_id_no_override_properties_on_events')
        expect(onEvents.body.results).toEqual([[event?.person_id, 'then']])
        expect(String(onEvents.body.clickhouse)).not.toContain('JOIN')
        const overridden = await query(sql, 'person_id_override_properties_on_events')
        expect(overridden.body.results).toEqual([[winner, 'then']])
        const joined = await query(sql, 'person_id_override_properties_joined')
        expect(joined.body.results).toEqual([[winner, 'now']])
        expect(joined.body.modifiers).toMatchObject({ personsOnEventsMode: 'person_id_override_properties_joined' })
        const bad = await query(sql, 'sometimes')
        expect(bad.status).toBe(400)
        expect(bad.body).toMatchObject({ type: 'validation_error', attr: 'query__modifiers__personsOnEventsMode' })
    })

    it('evaluates filters with PostHog NULL rules: a missing property is != a value, and IS NULL', async () => {
        await standin.insertEvents([
            { event: 'n', distinct_id: 'a', timestamp: new Date().toISOString(), properties: { plan: 'pro', n: 1 } },
            { event: 'n', distinct_id: 'b', timestamp: new Date().toISOString(), properties: { plan: 'free', n: 2 } },
            { event: 'n', distinct_id: 'c', timestamp: new Date().toISOString(), properties: { n: 3 } },
        ])
        const ids = async (where: string) => {
            const { status, body } = await query(`SELECT distinct_id FROM events WHERE ${where} ORDER BY distinct_id`)
            expect([status, body.detail]).toEqual([200, undefined])
            return (body.results as string[][]).map((row) => row[0])
        }
        expect(await ids("properties.plan != 'pro'")).toEqual(['b', 'c'])
        expect(await ids("properties.plan NOT IN ('pro')")).toEqual(['b', 'c'])
        expect(await ids("properties.plan IN ('pro', 'free')")).toEqual(['a', 'b'])
        expect(await ids('properties.plan IS NULL')).toEqual(['c'])
        expect(await ids("NOT (properties.plan LIKE 'p%') AND toInt(properties.n) >= 2")).toEqual(['b', 'c'])
        expect(await ids("properties['plan'] ILIKE 'FR%' OR toFloat(properties.n) > 2")).toEqual(['b', 'c'])
        expect(await ids("notEmpty(properties.plan) AND lower(properties.plan) =~ '^p'")).toEqual(['a'])
    })

    it('anything it does not evaluate is a 400 with a detail naming it', async () => {
        const unknown = await query("SELECT 1 FROM events WHERE hamburger(event) = 'x'")
        expect(unknown.status).toBe(400)
        expect(unknown.body).toMatchObject({ type: 'validation_error', code: 'hogql_query_error' })
        expect(String(unknown.body.detail)).toContain('`hamburger` is not supported by the PostHog stand-in')
        const whole = await query('SELECT person FROM events')
        expect(whole.status).toBe(400)
        expect(String(whole.body.detail)).toContain('`person` as a whole')
    })
})

describe('the pure parts', () => {
    const input = {
        cursor: { ms: 1_795_000_000_000, uuid: null },
        lateWindowMs: 0,
        futureWindowMs: 0,
        allowedEvents: null,
        excludedEvents: [],
    }

    it('puts --where last, alone in its parentheses, and the person columns after the event', () => {
        const text = buildPageQuery({ ...input, upperMs: 1_795_000_001_000, pageSize: 10, where: 'a OR b' })
        expect(text).toMatch(/AND toUnixTimestamp64Milli\(created_at\) >= 1795000000000\n {4}AND \(\n {4}a OR b\n\)\n/)
        expect(text).not.toContain('person')
        const person = buildPageQuery({ ...input, upperMs: 1_795_000_001_000, pageSize: 10, withPerson: true })
        expect(person).toContain('created_at_ms,\n    person_id, person.properties AS person_properties\nFROM events')
    })

    it('probes with an empty created_at range and one row', () => {
        const probe = buildProbeQuery({ ...input, where: "event = 'x'" })
        expect(probe).toContain('toUnixTimestamp64Milli(created_at) < 1795000000000')
        expect(probe).toContain('toUnixTimestamp64Milli(created_at) >= 1795000000000')
        expect(probe).toMatch(/LIMIT 1$/)
    })

    it('whereProblem lets strings, quoted names and nested parentheses through, and nothing that escapes', () => {
        expect(whereProblem("properties.x = ')' AND (a OR (b))")).toBeNull()
        expect(whereProblem("properties.`a)b` = 'it''s' AND \"c(\" = 'x\\')'")).toBeNull()
        expect(whereProblem('a) OR (b')).toBe('closes a parenthesis it did not open')
        expect(whereProblem('(a')).toBe('leaves a parenthesis open')
        expect(whereProblem("a = 'x")).toBe("opens a ' it never closes")
        expect(whereProblem('a /* ) */')).toMatch(/comment/)
        expect(whereProblem('a; b')).toBe('has a ;')
        expect(whereProblem('  ')).toBe('is empty')
    })

    it('cuts a long detail in the middle, keeping the end where a parser says what failed', () => {
        const detail = `no viable alternative at input '${'x'.repeat(400)} AND (bad'`
        const short = shortDetail(detail)
        expect(short.length).toBeLessThanOrEqual(DETAIL_CHARS)
        expect(short.length).toBeGreaterThan(DETAIL_CHARS - 3)
        expect(short.startsWith('no viable alternative at input')).toBe(true)
        expect(short.endsWith("AND (bad'")).toBe(true)
        expect(shortDetail('short')).toBe('short')
    })

    it('names a person by the first name-like property set, else the distinct_id, as PostHog does', () => {
        expect(personDisplayName({ name: 'Ada', email: 'ada@x.io' }, 'd1')).toBe('ada@x.io')
        expect(personDisplayName({ email: '', Name: ' Ada ' }, 'd1')).toBe('Ada')
        expect(personDisplayName({ username: 42 }, 'd1')).toBe('42')
        expect(personDisplayName({}, ' d1 ')).toBe('d1')
    })

    it('an old checkpoint without the new fields reads as no --where, no person', () => {
        const old: SourceBinding = { host: 'h', projectId: '1', allowedEvents: null, excludedEvents: [], since: 'x' }
        expect(bindingDifferences(old, { ...old, where: null, withPerson: false }, false)).toEqual([])
        expect(bindingDifferences(old, { ...old, withPerson: true }, false)).toEqual(['--with-person off then, on now'])
    })
})
