import js from '@eslint/js'
import simpleImportSort from 'eslint-plugin-simple-import-sort'
import tseslint from 'typescript-eslint'

/** One `no-restricted-imports` config per folder (a later config replaces the rule, so the folders never overlap). */
function importBoundaries(boundaries) {
    return boundaries.map(({ files, ignores, regex, message }) => ({
        files,
        ...(ignores ? { ignores } : {}),
        rules: { 'no-restricted-imports': ['error', { patterns: [{ regex, message }] }] },
    }))
}

export default tseslint.config(
    { ignores: ['node_modules/**', 'coverage/**', '.data/**', 'dist/**'] },
    js.configs.recommended,
    ...tseslint.configs.recommended,
    {
        plugins: { 'simple-import-sort': simpleImportSort },
        rules: {
            'simple-import-sort/imports': 'error',
            'simple-import-sort/exports': 'error',
            curly: 'error',
            '@typescript-eslint/ban-ts-comment': 'error',
        },
    },
    // Imports flow one way: the tools use the product, never the reverse, and pipeline/ knows no command. A relative
    // path may climb any number of folders, so the patterns match `../` repeated before the folder's name.
    ...importBoundaries([
        {
            files: ['index.ts'],
            regex: '^\\.',
            message: 'index.ts is the plugin PostHog loads on its own (plugin.json main): it imports no project file.',
        },
        {
            files: ['pipeline/**'],
            regex: '^(\\.\\./)+(replay|sync|bin|tools)(/|$)',
            message: 'pipeline/ is shared by every command: it imports no command (replay/, sync/), bin/ or tools/.',
        },
        {
            files: ['replay/**'],
            regex: '^(\\.\\./)+(sync|bin|tools)(/|$)',
            message: 'replay/ imports neither sync/ nor tools/: move what both commands need to pipeline/.',
        },
        {
            files: ['sync/**'],
            regex: '^(\\.\\./)+(replay|bin|tools)(/|$)',
            message: 'sync/ imports neither replay/ nor tools/: move what both commands need to pipeline/.',
        },
        {
            files: ['**/*'],
            ignores: ['index.ts', 'pipeline/**', 'replay/**', 'sync/**', 'tools/**', '__tests__/**', '.ci/**'],
            regex: '^(\\.\\./)*(\\./)?tools(/|$)',
            message: 'Only tools/, __tests__/ and CI import tools/: the product never depends on its own test tools.',
        },
    ]),
    // A function is read whole: past 60 lines it is split into named steps. Tests are lists of cases, and exempt.
    { rules: { 'max-lines-per-function': ['error', { max: 60, skipBlankLines: true, skipComments: true }] } },
    { files: ['__tests__/**'], rules: { 'max-lines-per-function': 'off' } },
    {
        files: ['**/*.js', '**/*.mjs'],
        languageOptions: {
            globals: {
                require: 'readonly',
                module: 'writable',
                process: 'readonly',
                __dirname: 'readonly',
                AbortController: 'readonly',
            },
        },
        rules: { '@typescript-eslint/no-require-imports': 'off' },
    }
)
