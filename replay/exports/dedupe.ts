/**
 * `--dedupe`: drops an event whose uuid was already sent in this run, among the most recent DEDUPE_WINDOW uuids.
 * Exact (no false positives: an event is never dropped for a uuid it does not share), and bounded: two generations
 * of at most DEDUPE_WINDOW / 2 uuids each; when the newer one fills, the older one is let go. So a uuid is
 * remembered for at least the next DEDUPE_WINDOW / 2 events, and at most DEDUPE_WINDOW uuids are held.
 *
 * Duplicates in PostHog's exports come from a backfill overlapping a scheduled run, so both copies sit in files of
 * the same interval, next to each other in interval order: well within the window. Receivers still deduplicate on
 * uuid, as they must for any at-least-once sender.
 */

/** uuids held at most; about 80 bytes each in V8 (the uuid's string and its set entry): 77 MB measured for 1M. */
export const DEDUPE_WINDOW = 1_000_000

export interface Dedupe {
    /** True when `uuid` was seen within the window (the event is a duplicate); remembers it otherwise. */
    seen: (uuid: string) => boolean
    /** uuids remembered now. */
    size: () => number
}

export function recentUuids(window = DEDUPE_WINDOW): Dedupe {
    const half = Math.max(1, Math.floor(window / 2))
    let older = new Set<string>()
    let newer = new Set<string>()
    return {
        seen: (uuid) => {
            if (newer.has(uuid) || older.has(uuid)) {
                return true
            }
            if (newer.size >= half) {
                older = newer
                newer = new Set()
            }
            newer.add(uuid)
            return false
        },
        size: () => older.size + newer.size,
    }
}
