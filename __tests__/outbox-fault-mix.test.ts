/**
 * The outbox's fault mix in the emulated host (tools/host/fault-mix.ts): storage and cache each failing 5% of their
 * calls, the webhook flapping, the host restarted halfway. Every event arrives, at most 1% twice, and plugin
 * storage ends with nothing but an empty index. The figures are printed, as `npx tsx tools/host/fault-mix.ts` does.
 */
import { DEFAULT_FAULT_MIX, faultMixLines, runFaultMix } from '../tools/host/fault-mix'

describe.each(['vm2024', 'vm2021'])('the fault mix, era %s', (era) => {
    it('delivers every event, at most 1% twice, and leaves only an empty index in storage', async () => {
        const options = { ...DEFAULT_FAULT_MIX, era }
        const figures = await runFaultMix(options)
        console.log(faultMixLines(figures, options).join('\n'))
        expect(figures.injectedStorageFaults).toBeGreaterThan(0)
        expect(figures.injectedCacheFaults).toBeGreaterThan(0)
        expect(figures.webhookFlaps).toBeGreaterThan(0)
        expect(figures.delivered).toBe(figures.events)
        expect(figures.failedToHost).toBe(0)
        expect(figures.duplicateRows).toBeLessThanOrEqual(figures.events * 0.01)
        expect(figures.keptEvents).toBeGreaterThan(0)
        expect(figures.storageKeys).toEqual(['outbox/state'])
        expect(figures.index).toMatchObject({ events: 0, bytes: 0 })
        expect(figures.index.head).toBe(figures.index.tail)
    }, 300_000)
})
