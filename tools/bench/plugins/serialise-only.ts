/**
 * Bench plugin: an onEvent that only serialises the event. Reading the event through the sandbox's proxies is
 * work every sender must do, so this is the ceiling for a plugin that sends events.
 */
import type { PluginEvent } from '@posthog/plugin-scaffold'

export async function onEvent(event: PluginEvent): Promise<void> {
    JSON.stringify(event)
}
