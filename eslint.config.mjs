import js from '@eslint/js'
import simpleImportSort from 'eslint-plugin-simple-import-sort'
import tseslint from 'typescript-eslint'

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
