/** Realistic PostHog events for local runs and benchmarks: the shapes PostHog hands to onEvent. */
import type { ProcessedPluginEvent } from '@posthog/plugin-scaffold'

import { seededRandom } from '../receiver/receiver'

const PAGES = ['/', '/pricing', '/docs/getting-started', '/blog/launch-week', '/signup', '/app/dashboard']
const BROWSERS = ['Chrome', 'Firefox', 'Safari', 'Edge']
const COUNTRIES = ['US', 'DE', 'GB', 'FR', 'IN', 'BR', 'JP']

function uuidFor(n: number, random: () => number): string {
    const hex = (digits: number): string =>
        Array.from({ length: digits }, () => Math.floor(random() * 16).toString(16)).join('')
    const time = (0x0190a1b2c3d4 + n).toString(16).padStart(12, '0')
    return `${time.slice(0, 8)}-${time.slice(8, 12)}-7${hex(3)}-8${hex(3)}-${hex(12)}`
}

/** The n-th sample event, deterministic for a seed. */
export function sampleEvent(n: number, random: () => number, startMs = Date.parse('2026-11-27T00:00:00Z')) {
    const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)] as T
    const user = Math.floor(random() * 500)
    const page = pick(PAGES)
    const kind = random()
    const properties: Record<string, unknown> = {
        $current_url: `https://app.example.com${page}`,
        $pathname: page,
        $browser: pick(BROWSERS),
        $os: pick(['Mac OS X', 'Windows', 'Linux', 'iOS', 'Android']),
        $device_type: pick(['Desktop', 'Mobile']),
        $geoip_country_code: pick(COUNTRIES),
        $ip: `198.51.100.${user % 250}`,
        $session_id: `0190a1b2-${(user * 7919).toString(16).padStart(4, '0')}-7000-8000-000000000000`,
        $lib: 'web',
        $lib_version: '1.200.0',
    }
    const event: ProcessedPluginEvent = {
        uuid: uuidFor(n, random),
        event: '$pageview',
        distinct_id: `user-${user}`,
        team_id: 1,
        ip: null,
        timestamp: new Date(startMs + n * 250).toISOString(),
        properties,
    }
    if (kind < 0.25) {
        event.event = '$autocapture'
        properties.$event_type = 'click'
        event.elements = [{ tag_name: 'button', text: pick(['Sign up', 'Buy', 'Next']), attr_class: ['btn'] }]
    } else if (kind < 0.3) {
        event.event = '$identify'
        event.$set = { email: `user-${user}@example.com`, plan: pick(['free', 'pro', 'team']) }
        event.$set_once = { first_seen_page: page }
    } else if (kind < 0.35) {
        event.event = 'purchase'
        properties.amount = Math.round(random() * 20_000) / 100
        properties.currency = 'USD'
    } else if (kind < 0.4) {
        event.event = 'signed_up'
        properties.email = `user-${user}@example.com`
    }
    return event
}

/** `count` sample events, generated lazily so a million of them take no memory. */
export function* sampleEvents(count: number, seed = 42): Generator<ProcessedPluginEvent> {
    const random = seededRandom(seed)
    for (let n = 0; n < count; n++) {
        yield sampleEvent(n, random)
    }
}
