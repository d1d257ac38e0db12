/**
 * Bench plugin: the original per-event app, in its simplest form. One POST per event with node-fetch, awaited;
 * a 5xx throws RetryError, any other non-2xx a plain Error. The baseline the connector is compared against.
 */
import type { PluginEvent } from '@posthog/plugin-scaffold'
import { RetryError } from '@posthog/plugin-scaffold'
import fetch from 'node-fetch'

export async function onEvent(event: PluginEvent, meta: { config: { webhookUrl: string } }): Promise<void> {
    const response = await fetch(meta.config.webhookUrl, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(event),
    })
    if (response.status >= 500) {
        throw new RetryError(`the webhook answered HTTP ${response.status}`)
    }
    if (!response.ok) {
        throw new Error(`the webhook answered HTTP ${response.status}`)
    }
}
