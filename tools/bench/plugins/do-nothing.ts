/** Bench plugin: an onEvent that does nothing. Its speed is the host's own ceiling. */
export async function onEvent(): Promise<void> {
    // Nothing: only the host's work is measured.
}
