/**
 * PostHog's query limits as pure, clock-injectable pieces: Django REST Framework's sliding-window throttle (the
 * algorithm behind `APIQueriesBurstThrottle` 240/minute and `APIQueriesSustainedThrottle` 2400/hour) and the
 * per-team concurrency limiter that queues a query up to 30 s before refusing it. Sources: standin/FACTS.md §5.
 */

export type Clock = () => number

/** One DRF `SimpleRateThrottle`: `numRequests` per `durationMs`, counted per key. */
export class SlidingWindowThrottle {
    private readonly history = new Map<string, number[]>()

    constructor(
        readonly numRequests: number,
        readonly durationMs: number,
        private readonly clock: Clock
    ) {}

    /**
     * Records the request and returns null when allowed; otherwise returns DRF's wait in seconds (not rounded) and
     * records nothing, as a throttled request does not count.
     */
    hit(key: string): number | null {
        const now = this.clock()
        // Newest first, as DRF keeps it; entries older than the window fall off the end.
        const history = (this.history.get(key) ?? []).filter((at) => at > now - this.durationMs)
        if (history.length >= this.numRequests) {
            this.history.set(key, history)
            const oldest = history[history.length - 1] as number
            const remaining = this.durationMs - (now - oldest)
            const available = this.numRequests - history.length + 1
            return remaining / available / 1000
        }
        history.unshift(now)
        this.history.set(key, history)
        return null
    }
}

/** Parses DRF's rate strings: `240/minute`, `2400/hour`, `120/hour`, `10/second`, `1000/day`. */
export function parseRate(rate: string): { numRequests: number; durationMs: number } {
    const match = /^(\d+)\/(s|sec|second|m|min|minute|h|hour|d|day)$/.exec(rate.trim())
    if (!match) {
        throw new Error(`Expected a rate like "240/minute", got ${JSON.stringify(rate)}`)
    }
    const unit = (match[2] as string)[0] as 's' | 'm' | 'h' | 'd'
    const seconds = { s: 1, m: 60, h: 3600, d: 86400 }[unit]
    return { numRequests: Number(match[1]), durationMs: seconds * 1000 }
}

/** DRF's `Throttled` detail for a wait of `seconds` (already rounded up). */
export function throttledDetail(seconds: number | null): string {
    if (seconds === null) {
        return 'Request was throttled.'
    }
    return `Request was throttled. Expected available in ${seconds} second${seconds === 1 ? '' : 's'}.`
}

/** Checks every throttle (each passing one records the hit, as DRF does) and returns the largest wait, if any. */
export function checkThrottles(throttles: SlidingWindowThrottle[], key: string): number | null {
    let wait: number | null = null
    for (const throttle of throttles) {
        const result = throttle.hit(key)
        if (result !== null) {
            wait = Math.max(wait ?? 0, result)
        }
    }
    return wait === null ? null : Math.ceil(wait)
}

export type Sleep = (ms: number) => Promise<void>

/**
 * At most `max` queries per key at once. A query over the limit waits, polling with PostHog's backoff (0.134 s
 * growing ×1.5 to at most 1.714 s), for up to `waitMs`; then `acquire` returns null and the caller refuses it.
 */
export class ConcurrencyLimiter {
    private readonly running = new Map<string, number>()

    constructor(
        private max: number,
        private waitMs: number,
        private readonly clock: Clock,
        private readonly sleep: Sleep
    ) {}

    configure(max: number, waitMs: number): void {
        this.max = max
        this.waitMs = waitMs
    }

    get limit(): number {
        return this.max
    }

    async acquire(key: string): Promise<(() => void) | null> {
        const deadline = this.clock() + this.waitMs
        for (let attempt = 1; ; attempt++) {
            const count = this.running.get(key) ?? 0
            if (count < this.max) {
                this.running.set(key, count + 1)
                let released = false
                return () => {
                    if (!released) {
                        released = true
                        this.running.set(key, (this.running.get(key) ?? 1) - 1)
                    }
                }
            }
            const left = deadline - this.clock()
            if (left <= 0) {
                return null
            }
            await this.sleep(Math.min(left, backoffMs(attempt)))
        }
    }
}

/** PostHog's ExponentialBackoff(0.134, max_delay=1.714, exp=1.5) for the concurrency queue, in ms. */
export function backoffMs(attempt: number): number {
    return Math.min(1714, 134 * 1.5 ** (attempt - 1))
}
