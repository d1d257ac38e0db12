/**
 * Bench plugin: the 2022 exportEvents app, in its simplest form, written here as a baseline. The host buffers the
 * events and hands over a batch; the app POSTs it as one JSON array with node-fetch, treats only 200 as success,
 * reads a JSON error body and throws RetryError so the host's job queue retries the batch.
 */
import type { PluginEvent } from '@posthog/plugin-scaffold'
import { RetryError } from '@posthog/plugin-scaffold'
import fetch from 'node-fetch'

export async function exportEvents(events: PluginEvent[], meta: { config: { webhookUrl: string } }): Promise<void> {
    if (events.length === 0) {
        return
    }
    const response = await fetch(meta.config.webhookUrl, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(events),
    })
    if (response.status !== 200) {
        // An HTML error page makes this throw a parse error instead, which the host does not retry.
        const detail = await response.json()
        throw new RetryError(`the webhook answered HTTP ${response.status}: ${JSON.stringify(detail)}`)
    }
}
