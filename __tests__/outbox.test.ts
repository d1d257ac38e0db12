/**
 * The outbox against real boundaries: a real HTTP server on 127.0.0.1 as the webhook, and PostHog's plugin
 * storage as the emulator keeps it (posthog_pluginstorage in a real Postgres engine, PGlite), with the cache the
 * lock and lease live in. Each test drives a Sender with an outbox the way the hooks do.
 */
import { RetryError } from '@posthog/plugin-scaffold'

import { OUTBOX_STATE_KEY, Sender, WEBHOOK_ID_HEX_CHARS } from '../index'
import { makeEvent, settle, testEnv } from './helpers/env'
import { contents, outboxHosts, outboxState as state, switchable, uuidsIn, withOutbox } from './helpers/outbox-host'
import { eventsIn, perTestServers, ReceivedRequest } from './helpers/server'

const { start: serve } = perTestServers()
const { host } = outboxHosts()

function sendAll(sender: Sender, from: number, count: number): Promise<void>[] {
    return Array.from({ length: count }, (_, i) => sender.send(makeEvent(from + i)))
}

describe('keeping what the webhook did not take', () => {
    it('keeps a batch the webhook refused with 503 before the calls resolve, and a drain sends it with its webhook-id', async () => {
        const down = { value: true }
        const s = await serve(switchable(down))
        const h = host()
        const env = testEnv({ timers: false })
        const sender = withOutbox(s.url, h, env)
        await Promise.all(sendAll(sender, 1, 10))
        const kept = await state(h)
        expect(kept).toMatchObject({ head: 0, tail: 1, events: 10 })
        expect(sender.stats).toMatchObject({ kept: 10, delivered: 0, failed: 0 })
        const firstId = s.received[0]?.headers['webhook-id']
        down.value = false
        const result = await sender.outbox?.drain()
        expect(result).toMatchObject({ kind: 'drained', entries: 1, events: 10, left: 0 })
        expect(sender.stats).toMatchObject({ kept: 10, delivered: 10, failed: 0 })
        const last = s.received[s.received.length - 1] as ReceivedRequest
        expect(last.headers['webhook-id']).toBe(firstId)
        expect(String(firstId)).toMatch(new RegExp(`^msg_[0-9a-f]{${WEBHOOK_ID_HEX_CHARS}}$`))
        expect(eventsIn(last).map((e) => e.uuid)).toEqual(Array.from({ length: 10 }, (_, i) => makeEvent(i + 1).uuid))
        expect(await contents(h)).toEqual({ [OUTBOX_STATE_KEY]: expect.objectContaining({ head: 1, tail: 1 }) })
        expect(h.counted).toMatchObject({ outbox_events_kept: 10, outbox_events_delivered: 10 })
        expect(env.logger.lines.join('\n')).toMatch(/is taking events again: the 10 events kept since .* were sent/)
    })

    it('keeps only the half that failed after a 413 split; the half that was accepted is never sent again', async () => {
        const s = await serve((request) => {
            const events = eventsIn(request)
            if (events.length > 2) {
                return { status: 413 }
            }
            const first = String(events[0]?.uuid)
            return first === makeEvent(1).uuid ? { status: 200 } : { status: 503 }
        })
        const h = host()
        const sender = withOutbox(s.url, h, testEnv({ timers: false }))
        await sender.exportBatch([1, 2, 3, 4].map((n) => makeEvent(n)))
        expect(await state(h)).toMatchObject({ events: 2, tail: 1 })
        const stored = await contents(h)
        const piece = stored['outbox/0/0'] as { body: string }
        expect((JSON.parse(piece.body) as Array<{ uuid: string }>).map((e) => e.uuid)).toEqual([
            makeEvent(3).uuid,
            makeEvent(4).uuid,
        ])
    })

    it('does not keep a permanent refusal (404): the call fails as before, with one request', async () => {
        const s = await serve(() => ({ status: 404 }))
        const h = host()
        const sender = withOutbox(s.url, h, testEnv({ timers: false }))
        const outcome = await settle(sender.send(makeEvent(1)))
        expect(outcome.ok).toBe(false)
        expect(outcome.ok ? null : outcome.error).not.toBeInstanceOf(RetryError)
        expect(s.received).toHaveLength(1)
        expect(await contents(h)).toEqual({})
    })

    it('drops, counts and logs a kept entry the webhook now refuses for good, instead of retrying it forever', async () => {
        const answer = { status: 503 }
        const s = await serve(() => ({ status: answer.status }))
        const h = host()
        const env = testEnv({ timers: false })
        const sender = withOutbox(s.url, h, env)
        await sender.exportBatch([makeEvent(1), makeEvent(2)])
        answer.status = 404
        await sender.outbox?.drain()
        const requests = s.received.length
        await sender.outbox?.drain()
        expect(s.received).toHaveLength(requests)
        expect(await state(h)).toMatchObject({ head: 1, tail: 1, events: 0 })
        expect(h.counted.outbox_events_dropped).toBe(2)
        expect(env.logger.lines.join('\n')).toMatch(/error: 2 kept events were dropped, refused for good/)
    })

    it('stores a large body in bounded pieces and sends it back as the same bytes', async () => {
        const down = { value: true }
        const s = await serve(switchable(down))
        const h = host()
        const sender = withOutbox(s.url, h, testEnv({ timers: false }))
        const big = Array.from({ length: 40 }, (_, i) => makeEvent(i, { properties: { filler: 'y'.repeat(20_000) } }))
        await sender.exportBatch(big)
        const sentBody = s.received[0]?.body
        const stored = await contents(h)
        const pieces = Object.keys(stored).filter((key) => key.startsWith('outbox/0/'))
        expect(pieces.length).toBeGreaterThan(2)
        down.value = false
        await sender.outbox?.drain()
        expect(s.received[s.received.length - 1]?.body).toBe(sentBody)
    })
})

describe('bounds', () => {
    it('refuses the newest batch when the outbox is full: counted, logged, and the call fails with a RetryError', async () => {
        const s = await serve(() => ({ status: 503 }))
        const h = host()
        const env = testEnv({ timers: false })
        // 0.0015 MB: room for one batch of four of these events (about 1 KB), not two.
        const sender = withOutbox(s.url, h, env, '0.0015')
        const first = await settle(sender.exportBatch([makeEvent(1), makeEvent(2), makeEvent(3), makeEvent(4)]))
        expect(first.ok).toBe(true)
        const second = await settle(sender.exportBatch([makeEvent(5), makeEvent(6), makeEvent(7), makeEvent(8)]))
        expect(second.ok).toBe(false)
        const error = second.ok ? null : second.error
        expect(error).toBeInstanceOf(RetryError)
        expect(error?.message).toMatch(
            /the outbox is full \(4 events kept since .*; the outbox holds [\d.]+ of [\d.]+ MB\)/
        )
        expect(await state(h)).toMatchObject({ events: 4, tail: 1 })
        expect(h.counted.outbox_events_refused).toBe(4)
        expect(env.logger.lines.filter((line) => line.startsWith('error: 4 events could not be kept'))).toHaveLength(1)
    })

    it('fails a batch as before when its entry cannot be written, says why, and leaves nothing of it behind', async () => {
        const s = await serve(() => ({ status: 503 }))
        // Every write of an entry's first piece fails, each of its immediate tries included; the mark that says
        // the entry was given up is written.
        const h = host({
            failWrite: (write) => /^outbox\/\d+\/0$/.test(write.key) && !write.value?.includes('"abandoned"'),
        })
        const env = testEnv({ timers: false })
        const sender = withOutbox(s.url, h, env)
        const outcome = await settle(sender.send(makeEvent(1)))
        expect(outcome.ok).toBe(false)
        expect(outcome.ok ? null : outcome.error).toBeInstanceOf(RetryError)
        expect(outcome.ok ? '' : outcome.error.message).toMatch(
            /PostHog's plugin storage failed \(\w*Error: could not extend file/
        )
        expect(env.logger.lines.join('\n')).toMatch(
            /1 events could not be kept for a later try: PostHog's plugin storage failed/
        )
        // Only the mark that lets the next count-in skip the number at once.
        expect(await contents(h)).toEqual({ 'outbox/0/0': { body: '', abandoned: true } })
        // Storage works again: the next batch is kept under the next number, and the failed one left no trace.
        h.store.setFaults({})
        await sender.send(makeEvent(2))
        expect(await state(h)).toMatchObject({ events: 1 })
        const stored = JSON.stringify(await contents(h))
        expect(stored).toContain(makeEvent(2).uuid)
        expect(stored).not.toContain(makeEvent(1).uuid)
        expect(stored).not.toContain('abandoned')
    })
})

describe('two VMs writing at once', () => {
    it('keeps both batches: the second waits for the lock, and neither overwrites the other', async () => {
        const s = await serve(() => ({ status: 503 }))
        const h = host()
        const vms = [0, 1, 2].map(() => withOutbox(s.url, h, testEnv({ timers: false })))
        await Promise.all(vms.map((vm, i) => vm.exportBatch([makeEvent(i * 2), makeEvent(i * 2 + 1)])))
        expect(await state(h)).toMatchObject({ head: 0, tail: 3, events: 6 })
        const stored = await contents(h)
        const kept = [0, 1, 2].flatMap((entry) =>
            (JSON.parse((stored[`outbox/${entry}/0`] as { body: string }).body) as Array<{ uuid: string }>).map(
                (e) => e.uuid
            )
        )
        expect(kept.sort()).toEqual([0, 1, 2, 3, 4, 5].map((n) => makeEvent(n).uuid).sort())
    })
})

describe('draining', () => {
    it('sends each entry once when two drains overlap, from two VMs over one storage and cache', async () => {
        const down = { value: true }
        const s = await serve(switchable(down))
        const h = host()
        const a = withOutbox(s.url, h, testEnv({ timers: false }))
        const b = withOutbox(s.url, h, testEnv({ timers: false }))
        for (let batch = 0; batch < 6; batch++) {
            await (batch % 2 ? a : b).exportBatch([makeEvent(batch * 2), makeEvent(batch * 2 + 1)])
        }
        expect(await state(h)).toMatchObject({ tail: 6, events: 12 })
        const refused = s.received.length
        down.value = false
        const results = await Promise.all([a.outbox?.drain(), b.outbox?.drain()])
        expect(results.map((r) => r?.kind).sort()).toEqual(['busy', 'drained'])
        const sent = uuidsIn(s.received.slice(refused))
        expect(sent).toHaveLength(12)
        expect(new Set(sent).size).toBe(12)
    })

    it('stops starting entries once a drain has run 15 s, and the next drain goes on from there', async () => {
        const s = await serve(() => ({ status: 200 }))
        const h = host()
        const env = testEnv({ timers: true, fakeClock: true })
        const sender = withOutbox(s.url, h, env)
        const outbox = sender.outbox
        // Five entries written as if the webhook had been down, each taking 4 s to send.
        const entries = [0, 1, 2, 3, 4].map((n) => ({ id: `msg_${n}`, body: `[{"uuid":"u${n}"}]`, events: 1 }))
        await outbox?.keep(entries, env.now() + 1_000)
        const transport = env.transport
        env.transport = (request) => {
            env.advance(4_000)
            return transport(request)
        }
        const first = await outbox?.drain()
        expect(first).toMatchObject({ kind: 'drained', entries: 4, left: 1 })
        const second = await outbox?.drain()
        expect(second).toMatchObject({ kind: 'drained', entries: 1, left: 0 })
        expect(s.received.map((r) => r.headers['webhook-id'])).toEqual(['msg_0', 'msg_1', 'msg_2', 'msg_3', 'msg_4'])
    })

    it('after a crash between an accepted send and its commit, sends that one entry again with the same webhook-id, and no other', async () => {
        const s = await serve(() => ({ status: 200 }))
        const h = host()
        const env = testEnv({ timers: false })
        const sender = withOutbox(s.url, h, env)
        const entries = [0, 1, 2].map((n) => ({ id: `msg_${n}`, body: `[{"uuid":"u${n}"}]`, events: 1 }))
        await sender.outbox?.keep(entries, env.now() + 1_000)
        // The VM dies after the first entry's POST was accepted, before its pieces and index were touched.
        h.store.setFaults({ failWrite: () => true })
        await settle(sender.outbox?.drain() ?? Promise.resolve(null))
        h.store.setFaults({})
        const fresh = withOutbox(s.url, h, testEnv({ timers: false }))
        await fresh.outbox?.drain()
        expect(s.received.map((r) => r.headers['webhook-id'])).toEqual(['msg_0', 'msg_0', 'msg_1', 'msg_2'])
        expect(await state(h)).toMatchObject({ head: 3, tail: 3, events: 0 })
    })

    it('costs one storage read per drain, and one when a VM first has a request accepted; writes nothing in a clean run', async () => {
        const s = await serve(() => ({ status: 200 }))
        const h = host()
        const sender = withOutbox(s.url, h, testEnv({ timers: false }))
        const before = await h.store.figures()
        await Promise.all(sendAll(sender, 1, 30))
        // A new VM cannot know whether an earlier one kept something: its first accepted request starts a drain.
        expect(await sender.outbox?.drain()).toEqual({ kind: 'empty' })
        const looked = await h.store.figures()
        expect(looked.reads - before.reads).toBe(1)
        // From then on, only a drain reads storage: one read each.
        await Promise.all(sendAll(sender, 40, 30))
        await sender.exportBatch([makeEvent(80), makeEvent(81)])
        expect((await h.store.figures()).reads).toBe(looked.reads)
        expect(await sender.outbox?.drain()).toEqual({ kind: 'empty' })
        const after = await h.store.figures()
        expect(after.reads - looked.reads).toBe(1)
        expect([after.writes - before.writes, after.deletes - before.deletes]).toEqual([0, 0])
        expect(await contents(h)).toEqual({})
    })
})

describe('while the webhook is known down', () => {
    it('sends nothing and returns at once after 10 failed requests, until a minute has passed', async () => {
        const s = await serve(() => ({ status: 503 }))
        const h = host()
        const env = testEnv({ timers: false, fakeClock: true })
        const sender = withOutbox(s.url, h, env)
        await sender.exportBatch([makeEvent(1)])
        await sender.exportBatch([makeEvent(2)])
        expect(s.received).toHaveLength(10)
        expect(sender.outbox?.downSince).not.toBeNull()
        await sender.exportBatch([makeEvent(3)])
        await Promise.all(sendAll(sender, 4, 5))
        expect(s.received).toHaveLength(10)
        expect(await state(h)).toMatchObject({ events: 8, tail: 4 })
        env.advance(60_000)
        await sender.exportBatch([makeEvent(9)])
        // One request finds out whether it is back: no retry ladder while it is known down.
        expect(s.received).toHaveLength(11)
    })

    it('learns from the index that another VM drained the outbox, and sends again', async () => {
        const down = { value: true }
        const s = await serve(switchable(down))
        const h = host()
        const env = testEnv({ timers: false })
        const writer = withOutbox(s.url, h, env)
        await writer.exportBatch([makeEvent(1)])
        await writer.exportBatch([makeEvent(2)])
        expect(writer.outbox?.downSince).not.toBeNull()
        down.value = false
        const drainer = withOutbox(s.url, h, testEnv({ timers: false }))
        await drainer.outbox?.drain()
        // The writer's next batch still goes to the outbox, and reads there that the webhook is back.
        await writer.exportBatch([makeEvent(3)])
        expect(writer.outbox?.downSince).toBeNull()
        const before = s.received.length
        await writer.exportBatch([makeEvent(4)])
        expect(s.received.length).toBeGreaterThan(before)
        expect(uuidsIn(s.received.slice(before))).toContain(makeEvent(4).uuid)
    })
})
