/**
 * The outbox under its own faults: a cache call that fails, a restart over the same storage, a storage write that
 * fails half way, a commit that fails after the POST, a webhook known to be down, a batch kept while a drain runs,
 * and writers on a CPU so starved that each event-loop turn takes a second. Real boundaries as in outbox.test.ts:
 * a real HTTP server on 127.0.0.1 and PostHog's plugin storage in a real Postgres engine (PGlite).
 */
import { RetryError } from '@posthog/plugin-scaffold'

import {
    MAX_ATTEMPTS_WITHOUT_TIMERS,
    OUTBOX_ENTRY_WRITE_MAX_MS,
    OUTBOX_LOCK_KEY,
    OUTBOX_LOCK_SAFE_MS,
    OUTBOX_SEQ_KEY,
    OUTBOX_STATE_KEY,
    PROBE_INTERVAL_MS,
} from '../index'
import { makeEvent, settle, TestEnv, testEnv } from './helpers/env'
import { waitFor } from './helpers/io'
import {
    contents,
    OutboxHost,
    outboxHosts,
    outboxState as state,
    switchable,
    uuidsIn,
    withOutbox,
} from './helpers/outbox-host'
import { perTestServers } from './helpers/server'

const { start: serve } = perTestServers()
const { store, host } = outboxHosts()

/** What the stored entries really hold: events and characters, from the first piece of each. */
async function storedTotals(h: OutboxHost): Promise<{ events: number; bytes: number; entries: number }> {
    const rows = await contents(h)
    const totals = { events: 0, bytes: 0, entries: 0 }
    for (const [key, value] of Object.entries(rows)) {
        const match = /^outbox\/(\d+)\/(\d+)$/.exec(key)
        if (!match) {
            continue
        }
        const piece = value as { body: string; events?: number }
        totals.bytes += piece.body.length
        if (match[2] === '0') {
            totals.entries++
            totals.events += piece.events ?? 0
        }
    }
    return totals
}

const batch = (from: number, count: number) => Array.from({ length: count }, (_, i) => makeEvent(from + i))

describe('a cache call that fails', () => {
    it('fails that batch like a storage failure (a RetryError), and the next batches are kept', async () => {
        const s = await serve(() => ({ status: 503 }))
        const h = host()
        const sender = withOutbox(s.url, h, testEnv({ timers: false }))
        h.cacheDown.value = true
        const first = await settle(sender.exportBatch(batch(1, 4)))
        h.cacheDown.value = false
        const second = await settle(sender.exportBatch(batch(5, 4)))
        const third = await settle(sender.exportBatch(batch(9, 4)))
        expect(first.ok ? null : first.error).toBeInstanceOf(RetryError)
        expect(first.ok ? '' : first.error.message).toMatch(/could not keep|cache failed|storage failed/)
        expect([second.ok, third.ok]).toEqual([true, true])
        expect(await state(h)).toMatchObject({ events: 8 })
        expect(sender.stats).toMatchObject({ kept: 8 })
    })
})

describe('a lock release that fails once', () => {
    it('is tried again: the next drain, in another VM, finds the lock free and sends what waits', async () => {
        const down = { value: true }
        const accepted: string[] = []
        const s = await serve(switchable(down, accepted))
        const h = host()
        const first = withOutbox(s.url, h, testEnv({ timers: false }))
        await first.exportBatch(batch(1, 3))
        // Every release of the lock is counted; the first one fails.
        let releases = 0
        store.setFaults({
            failCache: (call) =>
                call.pluginConfigId === h.configId &&
                call.op === 'cache.set' &&
                call.key === OUTBOX_LOCK_KEY &&
                ++releases === 1,
        })
        // The webhook is still down: the drain fails, then lets go of the lock, whose first release fails.
        expect(await first.outbox?.drain()).toMatchObject({ kind: 'drained', stillDown: true })
        store.setFaults({})
        expect(releases).toBeGreaterThan(0)
        expect(Number(await h.cache.get(OUTBOX_LOCK_KEY, 0))).toBe(0)
        down.value = false
        const second = withOutbox(s.url, h, testEnv({ timers: false }))
        expect(await second.outbox?.drain()).toMatchObject({ kind: 'drained', events: 3, left: 0 })
        expect(accepted).toEqual(batch(1, 3).map((event) => event.uuid))
    })
})

describe('a fresh VM over the same storage', () => {
    it('drains what an earlier VM kept, once its own first request gets through', async () => {
        const down = { value: true }
        const accepted: string[] = []
        const s = await serve(switchable(down, accepted))
        const h = host()
        const before = withOutbox(s.url, h, testEnv({ timers: false }))
        await Promise.all(batch(1, 5).map((event) => before.send(event)))
        expect(await state(h)).toMatchObject({ events: 5 })
        down.value = false
        // A restart: a new VM, no runEveryMinute (2025 on), only calls.
        const after = withOutbox(s.url, h, testEnv({ timers: false }))
        await Promise.all(batch(100, 20).map((event) => after.send(event)))
        const kept = batch(1, 5).map((event) => event.uuid)
        await waitFor(() => kept.every((uuid) => accepted.includes(uuid)), 20_000)
        await after.outbox?.drain()
        expect(await state(h)).toMatchObject({ events: 0 })
    })
})

describe('a storage write that fails half way', () => {
    const big = (from: number) =>
        Array.from({ length: 40 }, (_, i) => makeEvent(from + i, { properties: { filler: 'y'.repeat(20_000) } }))

    it.each([
        ['a piece of a large entry', (key: string) => key === 'outbox/0/2'],
        ['the index', (key: string) => key === OUTBOX_STATE_KEY],
    ])('leaves no row behind once drained, when %s fails', async (_what, failing) => {
        const down = { value: true }
        const accepted: string[] = []
        const s = await serve(switchable(down, accepted))
        const h = host()
        const sender = withOutbox(s.url, h, testEnv({ timers: false }))
        let failed = 0
        store.setFaults({
            failWrite: (write) => write.pluginConfigId === h.configId && failing(write.key) && failed++ < 4,
        })
        const first = await settle(sender.exportBatch(big(1)))
        store.setFaults({})
        expect(failed).toBeGreaterThan(0)
        // Either kept, or failed as a storage failure the host retries: never a plain Error.
        expect(first.ok ? null : first.error).toEqual(first.ok ? null : expect.any(RetryError))
        await sender.exportBatch(batch(500, 2))
        down.value = false
        await sender.outbox?.drain()
        expect(await contents(h)).toEqual({ [OUTBOX_STATE_KEY]: expect.anything() })
        expect(await state(h)).toMatchObject({ events: 0, bytes: 0 })
        expect(accepted).toContain(makeEvent(500).uuid)
    })
})

describe('a commit that fails after the POST', () => {
    it('leaves the counts exact: the index says what storage holds', async () => {
        const down = { value: true }
        const s = await serve(switchable(down))
        const h = host()
        const env = testEnv({ timers: false })
        const sender = withOutbox(s.url, h, env)
        for (const from of [1, 5, 9]) {
            await sender.exportBatch(batch(from, 4))
        }
        expect(await state(h)).toMatchObject({ events: 12 })
        down.value = false
        // The first entry is accepted; the write that records it fails; then the webhook is down again.
        let indexWrites = 0
        store.setFaults({
            failWrite: (write) =>
                write.pluginConfigId === h.configId && write.key === OUTBOX_STATE_KEY && indexWrites++ === 0,
        })
        const transport = env.transport
        env.transport = async (request) => {
            const response = await transport(request)
            down.value = true
            return response
        }
        await settle(sender.outbox?.drain() ?? Promise.resolve(null))
        store.setFaults({})
        await settle(sender.outbox?.drain() ?? Promise.resolve(null))
        const index = await state(h)
        const stored = await storedTotals(h)
        expect({ events: index.events, bytes: index.bytes }).toEqual({ events: stored.events, bytes: stored.bytes })
    })
})

describe('while the webhook is known down', () => {
    async function knownDown(env: TestEnv) {
        const s = await serve(() => ({ status: 503 }))
        const h = host()
        const sender = withOutbox(s.url, h, env)
        while (sender.outbox?.downSince === null) {
            await sender.exportBatch(batch(s.received.length + 1, 1))
        }
        return { s, h, sender }
    }

    it('the call that probes it once a minute sends one request and waits for nothing', async () => {
        const env = testEnv({ timers: true, fakeClock: true })
        const { s, sender } = await knownDown(env)
        env.advance(PROBE_INTERVAL_MS)
        const requests = s.received.length
        const delays = env.delays.length
        const outcome = await settle(sender.exportBatch(batch(900, 2)))
        expect(outcome.ok).toBe(true)
        expect(s.received.length - requests).toBe(1)
        expect(env.delays.slice(delays)).toEqual([])
    })

    it('a drain sends one request, without timers as with them', async () => {
        for (const timers of [true, false]) {
            const env = testEnv({ timers, fakeClock: true })
            const { s, sender } = await knownDown(env)
            const requests = s.received.length
            const result = await sender.outbox?.drain()
            expect(result).toMatchObject({ kind: 'drained', entries: 0, stillDown: true })
            expect(s.received.length - requests).toBe(1)
            expect(MAX_ATTEMPTS_WITHOUT_TIMERS).toBeGreaterThan(1)
        }
    })
})

describe('a batch kept while a drain runs', () => {
    it('is sent by that drain: it goes on until the outbox is empty', async () => {
        const down = { value: true }
        const s = await serve(switchable(down))
        const h = host()
        const env = testEnv({ timers: false })
        const sender = withOutbox(s.url, h, env)
        const other = withOutbox(s.url, h, testEnv({ timers: false }))
        await sender.exportBatch(batch(1, 3))
        down.value = false
        // While the drain's first POST is out, another VM keeps a batch of its own.
        const lateEntry = { id: 'msg_late', body: JSON.stringify([makeEvent(77)]), events: 1 }
        let late: Promise<unknown> | null = null
        const transport = env.transport
        env.transport = (request) => {
            late ??= other.outbox?.keep([lateEntry], Infinity) ?? Promise.resolve()
            return late.then(() => transport(request))
        }
        const result = await sender.outbox?.drain()
        expect(result).toMatchObject({ kind: 'drained', left: 0 })
        expect(await state(h)).toMatchObject({ events: 0 })
        expect(uuidsIn(s.received)).toContain(makeEvent(77).uuid)
    })
})

describe('writers on a starved CPU', () => {
    it('keeps every batch while the outbox has room, however long each event-loop turn takes', async () => {
        const s = await serve(() => ({ status: 503 }))
        const h = host()
        // Each turn a waiting writer yields costs a second of wall clock: a CPU shared with busy neighbours.
        const starved = (): TestEnv => {
            const env = testEnv({ timers: false, fakeClock: true })
            const turn = env.yieldTurn
            env.yieldTurn = () => {
                env.advance(1_000)
                return turn()
            }
            return env
        }
        const vms = Array.from({ length: 8 }, () => withOutbox(s.url, h, starved()))
        const outcomes = await Promise.all(vms.map((vm, i) => settle(vm.exportBatch(batch(i * 3, 3)))))
        expect(outcomes.filter((o) => !o.ok).map((o) => (o.ok ? '' : o.error.message))).toEqual([])
        await vms[0]?.outbox?.drain()
        expect(await storedTotals(h)).toMatchObject({ events: 24, entries: 8 })
        expect(await state(h)).toMatchObject({ events: 24 })
    })
})

describe('a cache that lost the entry counter', () => {
    it('never writes over a kept entry: the counter moves past the index, and every entry goes out', async () => {
        const accepted: string[] = []
        const down = { value: true }
        const s = await serve(switchable(down, accepted))
        const h = host()
        const env = testEnv({ timers: false, fakeClock: true })
        const sender = withOutbox(s.url, h, env)
        await sender.exportBatch(batch(1, 2))
        await sender.exportBatch(batch(3, 2))
        // Redis restarted: the counter is gone, and would hand out 0 and 1 again.
        await h.cache.set(OUTBOX_SEQ_KEY, 0)
        await sender.exportBatch(batch(5, 2))
        const stored = await storedTotals(h)
        expect(stored).toMatchObject({ events: 6, entries: 3 })
        down.value = false
        // The numbers skipped over wait for writers that never come, for OUTBOX_ENTRY_WRITE_MAX_MS.
        env.advance(OUTBOX_ENTRY_WRITE_MAX_MS)
        await sender.outbox?.drain()
        expect(
            batch(1, 6)
                .map((event) => event.uuid)
                .filter((uuid) => !accepted.includes(uuid))
        ).toEqual([])
        expect(await state(h)).toMatchObject({ events: 0 })
        expect(Object.keys(await contents(h))).toEqual([OUTBOX_STATE_KEY])
    })
})

describe('a lock holder slower than half the lock TTL', () => {
    it('stops, and leaves the lock to its TTL rather than free what may be another holder’s', async () => {
        const s = await serve(() => ({ status: 200 }))
        const h = host()
        const env = testEnv({ timers: false, fakeClock: true })
        const sender = withOutbox(s.url, h, env)
        const entries = [1, 2].map((n) => ({ id: `msg_${n}`, body: JSON.stringify([makeEvent(n)]), events: 1 }))
        await sender.outbox?.keep(entries, Infinity)
        // The first POST takes as long as the holder may rely on the lock: its TTL may have run out meanwhile.
        const transport = env.transport
        env.transport = (request) => {
            env.advance(OUTBOX_LOCK_SAFE_MS)
            return transport(request)
        }
        const outcome = await settle(sender.outbox?.drain() ?? Promise.resolve(null))
        expect(outcome.ok ? null : outcome.error.message).toMatch(/held too long/)
        // Not set back to 0: whoever may hold it now keeps it until it lets go or its TTL runs out.
        expect(Number(await h.cache.get(OUTBOX_LOCK_KEY, 0))).toBeGreaterThan(0)
        // Nothing was counted out: the entry goes again, with its same webhook-id, once the lock is free.
        expect(await state(h)).toMatchObject({ head: 0, events: 2 })
    })
})

describe('outboxMaxMb lowered to 0 while entries wait', () => {
    it('still sends them, and keeps nothing new', async () => {
        const down = { value: true }
        const accepted: string[] = []
        const s = await serve(switchable(down, accepted))
        const h = host()
        const before = withOutbox(s.url, h, testEnv({ timers: false }))
        await before.exportBatch(batch(1, 3))
        down.value = false
        const after = withOutbox(s.url, h, testEnv({ timers: false }), '0')
        await after.exportBatch(batch(10, 2))
        await waitFor(() => accepted.includes(makeEvent(1).uuid), 20_000)
        await after.outbox?.drain()
        expect(await state(h)).toMatchObject({ events: 0 })
        down.value = true
        const refused = await settle(after.exportBatch(batch(20, 2)))
        expect(refused.ok ? null : refused.error).toBeInstanceOf(RetryError)
        expect(await state(h)).toMatchObject({ events: 0 })
    })
})
