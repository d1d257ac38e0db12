import type { ProcessedPluginEvent } from '@posthog/plugin-scaffold'

import {
    BURST_GATHER_MICROTASKS,
    FetchLike,
    fetchTransport,
    Logger,
    parseConfig,
    ParsedConfig,
    PatternsConfig,
    Sender,
    SenderEnv,
} from '../../index'

export function makeEvent(n: number, overrides: Partial<ProcessedPluginEvent> = {}): ProcessedPluginEvent {
    return {
        uuid: `0190a1b2-0000-7000-8000-${String(n).padStart(12, '0')}`,
        event: '$pageview',
        distinct_id: `user-${n}`,
        team_id: 1,
        ip: null,
        timestamp: '2026-11-27T03:00:00.000Z',
        properties: { $current_url: `https://example.com/page/${n}`, $ip: '203.0.113.7', email: `u${n}@example.com` },
        ...overrides,
    }
}

export interface CapturedLogger extends Logger {
    lines: string[]
}

export function captureLogger(): CapturedLogger {
    const lines: string[] = []
    return {
        lines,
        info: (m) => lines.push(`info: ${m}`),
        warn: (m) => lines.push(`warn: ${m}`),
        error: (m) => lines.push(`error: ${m}`),
    }
}

export interface TestEnvOptions {
    /** Give the sender timers (captured, instant sleeps) or not (immediate retries only). */
    timers?: boolean
    /** A fake clock advanced by each sleep; by default the real clock. */
    fakeClock?: boolean
    random?: () => number
}

export interface TestEnv extends SenderEnv {
    delays: number[]
    logger: CapturedLogger
    /** Moves the fake clock forward, as if time passed. */
    advance: (ms: number) => void
}

/** A sender environment over Node's real fetch, with sleeps captured instead of waited. */
export function testEnv(options: TestEnvOptions = {}): TestEnv {
    const delays: number[] = []
    let clock = Date.parse('2026-11-27T03:00:00Z')
    const now = options.fakeClock ? () => clock : () => Date.now()
    const timers = options.timers ?? true
    return {
        transport: fetchTransport(fetch as unknown as FetchLike),
        timeoutEnforced: true,
        logger: captureLogger(),
        now,
        sleep: timers
            ? async (ms) => {
                  delays.push(ms)
                  clock += ms
              }
            : null,
        random: options.random ?? (() => 0.5),
        yieldTurn: timers
            ? () => new Promise((resolve) => setImmediate(resolve))
            : async () => {
                  for (let i = 0; i < BURST_GATHER_MICROTASKS; i++) {
                      await Promise.resolve()
                  }
              },
        delays,
        advance: (ms) => {
            clock += ms
        },
    }
}

export function makeSender(
    config: Partial<PatternsConfig> & { webhookUrl: string },
    env: SenderEnv,
    overrides: Partial<ParsedConfig> = {}
): Sender {
    return new Sender({ ...parseConfig(config), ...overrides }, env)
}

/** Settles a promise into a value, so a test can assert on both outcomes without unawaited rejects. */
export async function settle<T>(promise: Promise<T>): Promise<{ ok: true; value: T } | { ok: false; error: Error }> {
    try {
        return { ok: true, value: await promise }
    } catch (error) {
        return { ok: false, error: error as Error }
    }
}
