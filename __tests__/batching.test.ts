/**
 * How the sender turns overlapping onEvent calls into POSTs when the calls arrive spread out, as on the classic
 * hosts' Kafka path, where each call comes from its own macrotask.
 */
import { BURST_GATHER_MAX_MS, hostYieldTurn, Sender } from '../index'
import { makeEvent, makeSender, TestEnv, testEnv } from './helpers/env'
import { eventsIn, perTestServers } from './helpers/server'

const { start } = perTestServers()

const nextMacrotask = (): Promise<void> => new Promise((resolve) => setImmediate(resolve))

/**
 * Starts `count` calls, each from its own macrotask, as the Kafka path delivers them; waits for all. With `env`, its
 * fake clock moves 1 ms per call, so the gaps are the same on a busy machine as on an idle one.
 */
async function spreadRound(sender: Sender, first: number, count: number, env?: TestEnv): Promise<void> {
    const calls: Array<Promise<void>> = []
    for (let n = first; n < first + count; n++) {
        calls.push(sender.send(makeEvent(n)))
        env?.advance(1)
        await nextMacrotask()
    }
    await Promise.all(calls)
}

describe('calls that arrive spread out', () => {
    it('a micro-batch of 10 arriving 1 ms apart, each in its own macrotask, goes as one POST, round after round', async () => {
        const server = await start(() => ({ status: 200 }))
        const env = testEnv({ fakeClock: true })
        const sender = makeSender({ webhookUrl: server.url }, env)
        for (let round = 0; round < 6; round++) {
            await spreadRound(sender, round * 10, 10, env)
        }
        // Sending the first arrival alone, or each call as it comes, would make 12 or 60.
        expect(server.received.map((request) => eventsIn(request).length)).toEqual([10, 10, 10, 10, 10, 10])
    })

    it('does not wait for calls that never come: a short round still goes within the gather bound', async () => {
        const server = await start(() => ({ status: 200 }))
        const sender = makeSender({ webhookUrl: server.url }, testEnv())
        await spreadRound(sender, 0, 10)
        const started = Date.now()
        await spreadRound(sender, 10, 3)
        expect(server.accepted).toHaveLength(13)
        // The bound is what makes this settle at all; the slack is for a busy machine.
        expect(Date.now() - started).toBeLessThan(BURST_GATHER_MAX_MS + 1_000)
    })

    it('in a sandbox without timers, a turn is a crypto callback: it lets macrotasks run', async () => {
        const saved = globalThis.setImmediate
        try {
            ;(globalThis as { setImmediate?: unknown }).setImmediate = undefined
            const turn = hostYieldTurn()
            let macrotaskRan = false
            setTimeout(() => (macrotaskRan = true), 0)
            for (let i = 0; i < 50 && !macrotaskRan; i++) {
                await turn()
            }
            expect(macrotaskRan).toBe(true)
        } finally {
            globalThis.setImmediate = saved
        }
    })
})
