/**
 * The outbox's pure rules: what fits, how the index moves, how bodies are cut into pieces and read back, and
 * when a call skips the webhook. The outbox's storage and delivery are tested in outbox.test.ts.
 */
import {
    afterDrained,
    afterKeep,
    BYTES_PER_MB,
    ConfigError,
    DEFAULT_OUTBOX_MB,
    describeOutbox,
    emptyOutboxState,
    EntryHeader,
    EntrySeen,
    judgeEntry,
    MAX_OUTBOX_MB,
    metricCounter,
    OUTBOX_ENTRY_WRITE_MAX_MS,
    OutboxEntry,
    outboxIsEmpty,
    OutboxState,
    parseConfig,
    parseKeptBody,
    parseOutboxMb,
    planKeep,
    readOutboxState,
    slicePieces,
} from '../index'

function entry(events: number, chars: number): OutboxEntry {
    return { id: `msg_${events}_${chars}`, body: 'x'.repeat(chars), events }
}

function header(events: number, bytes: number, at: number): EntryHeader {
    return { id: `msg_${events}`, pieces: 1, events, bytes, at }
}

describe('outboxMaxMb', () => {
    it('defaults to DEFAULT_OUTBOX_MB when empty or missing, and 0 turns the outbox off', () => {
        expect(parseOutboxMb(undefined)).toBe(DEFAULT_OUTBOX_MB)
        expect(parseOutboxMb('  ')).toBe(DEFAULT_OUTBOX_MB)
        expect(parseOutboxMb('0')).toBe(0)
        expect(parseOutboxMb(' 2.5 ')).toBe(2.5)
        expect(parseConfig({ webhookUrl: 'https://example.com/h', outboxMaxMb: '3' }).outboxBytes).toBe(
            3 * BYTES_PER_MB
        )
    })

    it.each(['-1', 'ten', '1e3', String(MAX_OUTBOX_MB + 1), 'Infinity'])(
        'refuses %s in setupPlugin, naming the field and the range',
        (value) => {
            expect(() => parseConfig({ webhookUrl: 'https://example.com/h', outboxMaxMb: value })).toThrow(ConfigError)
            expect(() => parseOutboxMb(value)).toThrow(
                new RegExp(`Invalid config "outboxMaxMb": .*from 0 to ${MAX_OUTBOX_MB}.*Leave it empty`)
            )
        }
    )
})

describe('planKeep', () => {
    it('keeps entries while they fit and refuses the newest that do not, never dropping what is kept', () => {
        const state = { ...emptyOutboxState(), bytes: 900 }
        const plan = planKeep(state, [entry(1, 50), entry(2, 60), entry(3, 40)], 1_000)
        expect(plan.kept.map((e) => e.events)).toEqual([1, 3])
        expect(plan.refused.map((e) => e.events)).toEqual([2])
    })

    it('refuses everything when the limit is reached', () => {
        const plan = planKeep({ ...emptyOutboxState(), bytes: 1_000 }, [entry(1, 1)], 1_000)
        expect(plan.kept).toEqual([])
        expect(plan.refused).toHaveLength(1)
    })
})

describe('the index', () => {
    it('grows by each entry counted in and remembers when the outage began and its peak', () => {
        const first = afterKeep(afterKeep(emptyOutboxState(), header(10, 100, 1_000)), header(5, 50, 1_500))
        expect(first).toMatchObject({ head: 0, tail: 2, events: 15, bytes: 150, since: 1_000, keptInOutage: 15 })
        const second = afterKeep(first, header(1, 10, 2_000))
        expect(second).toMatchObject({ tail: 3, events: 16, bytes: 160, since: 1_000, peakBytes: 160 })
    })

    it('moves the head past a drained entry, lists its pieces to delete, and clears the outage once empty', () => {
        const kept = afterKeep(afterKeep(emptyOutboxState(), header(10, 100, 1_000)), header(5, 50, 1_000))
        const one = afterDrained(kept, 0, { events: 10, bytes: 100, pieces: 1 }, 5_000)
        expect(one).toMatchObject({ head: 1, tail: 2, events: 5, bytes: 50, since: 1_000, deliveredAt: 5_000 })
        expect(one.reclaim).toEqual([[0, 1]])
        const both = afterDrained(one, 1, { events: 5, bytes: 50, pieces: 3 }, 6_000)
        expect(both).toMatchObject({ head: 2, tail: 2, events: 0, bytes: 0, since: null, keptInOutage: 0 })
        expect(both.reclaim).toEqual([[1, 3]])
        expect(outboxIsEmpty(both, 2)).toBe(false)
        expect(outboxIsEmpty({ ...both, reclaim: [] }, 2)).toBe(true)
        expect(outboxIsEmpty({ ...both, reclaim: [] }, 3)).toBe(false)
    })

    it('never moves the head backwards, whatever entry is reported', () => {
        const state = { ...emptyOutboxState(), head: 5, tail: 7 }
        expect(afterDrained(state, 2, { events: 0, bytes: 0, pieces: 0 }, null).head).toBe(5)
    })

    it('reads a missing or damaged row as empty, and keeps the tail at or past the head', () => {
        expect(readOutboxState(null)).toEqual(emptyOutboxState())
        expect(readOutboxState('nonsense')).toEqual(emptyOutboxState())
        const read = readOutboxState({ head: 4, tail: 2, events: -3, bytes: 'x', since: 7, gap: { entry: 'x' } })
        expect(read).toMatchObject({ head: 4, tail: 4, events: 0, bytes: 0, since: 7, gap: null, reclaim: [] })
        const listed = readOutboxState({ gap: { entry: 3, since: 9, below: 5 }, reclaim: [[1, 2], ['x', 1], 7] })
        expect(listed).toMatchObject({ gap: { entry: 3, since: 9, below: 5 }, reclaim: [[1, 2]] })
    })

    it('describes itself without anything but counts, sizes and a time', () => {
        const state = afterKeep(emptyOutboxState(), header(3, 2_500_000, Date.parse('2026-11-27T03:00:00Z')))
        expect(describeOutbox(state, 50 * BYTES_PER_MB)).toBe(
            '3 events kept since 2026-11-27T03:00:00.000Z; the outbox holds 2.5 of 50.0 MB'
        )
    })
})

describe('counting entries in', () => {
    const MAX = OUTBOX_ENTRY_WRITE_MAX_MS
    const at = (tail: number): OutboxState => ({ ...emptyOutboxState(), head: tail, tail })
    const whole: EntrySeen = { kind: 'whole', header: header(4, 400, 1_000) }

    it('counts in a whole entry', () => {
        const step = judgeEntry(at(3), whole, 10, 2_000)
        expect(step.action).toBe('count')
        expect(step.state).toMatchObject({ head: 3, tail: 4, events: 4, bytes: 400, since: 1_000 })
    })

    it('waits for a partial entry while its writer may still write it, then skips it and deletes its pieces', () => {
        const partial: EntrySeen = { kind: 'partial', header: { ...header(4, 400, 1_000), pieces: 3 } }
        expect(judgeEntry(at(3), partial, 10, 1_000 + MAX - 1)).toMatchObject({ action: 'wait', deletePieces: 0 })
        const step = judgeEntry(at(3), partial, 10, 1_000 + MAX)
        expect(step).toMatchObject({ action: 'skip', deletePieces: 3 })
        expect(step.state).toMatchObject({ tail: 4, events: 0 })
    })

    it('marks a missing entry as the gap, then skips every number handed out before it once it is old', () => {
        const missing: EntrySeen = { kind: 'missing' }
        const first = judgeEntry(at(3), missing, 6, 1_000)
        expect(first).toMatchObject({ action: 'wait', state: { tail: 3, gap: { entry: 3, since: 1_000, below: 6 } } })
        expect(judgeEntry(first.state, missing, 9, 1_000 + MAX - 1).action).toBe('wait')
        const skipped = judgeEntry(first.state, missing, 9, 1_000 + MAX)
        expect(skipped).toMatchObject({ action: 'skip', state: { tail: 4, gap: { entry: 3 } } })
        // Entry 4 is whole; entry 5, handed out before the gap was seen, is skipped at once; 6 came later.
        const next = judgeEntry(judgeEntry(skipped.state, whole, 9, 1_000 + MAX).state, missing, 9, 1_000 + MAX)
        expect(next).toMatchObject({ action: 'skip', state: { tail: 6, gap: null } })
        const later = judgeEntry(next.state, missing, 9, 1_000 + MAX)
        expect(later).toMatchObject({ action: 'wait', state: { tail: 6, gap: { entry: 6, below: 9 } } })
    })
})

describe('pieces', () => {
    it('cuts a body into pieces of at most the bound, which join back into the same body', () => {
        const body = 'abcdefghij'.repeat(25)
        const pieces = slicePieces(body, 64)
        expect(pieces.map((p) => p.length)).toEqual([64, 64, 64, 58])
        expect(pieces.join('')).toBe(body)
        expect(slicePieces('', 64)).toEqual([''])
    })

    it('reads a kept body back as the same items, and refuses what is not a JSON array', () => {
        const events = [{ uuid: 'a', event: 'x' }, { event: 'no uuid' }]
        const items = parseKeptBody(JSON.stringify(events))
        expect(items?.map((i) => i.uuid)).toEqual(['a', ''])
        expect(`[${items?.map((i) => i.json).join(',')}]`).toBe(JSON.stringify(events))
        expect(parseKeptBody('{"not":"an array"}')).toBeNull()
        expect(parseKeptBody('[truncated')).toBeNull()
    })
})

describe('metricCounter', () => {
    it('counts through meta.metrics where the host has it, and does nothing where it refuses or lacks it', () => {
        const counted: Array<[string, number]> = []
        const hostMetrics = new Proxy(
            {},
            {
                get: (_target, name) => {
                    if (name !== 'outbox_events_kept') {
                        throw new Error('Invalid metric name')
                    }
                    return { increment: (n: number) => counted.push([name, n]) }
                },
            }
        )
        metricCounter(hostMetrics)('outbox_events_kept', 7)
        expect(() => metricCounter(hostMetrics)('outbox_events_refused', 1)).not.toThrow()
        expect(() => metricCounter(undefined)('outbox_events_kept', 1)).not.toThrow()
        expect(counted).toEqual([['outbox_events_kept', 7]])
    })
})
