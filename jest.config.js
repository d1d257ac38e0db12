/** hyparquet and its companions ship only as ES modules: Jest runs CommonJS, so ts-jest compiles them too. */
const ESM_PACKAGES = ['hyparquet', 'hyparquet-compressors', 'hyparquet-writer', 'hysnappy']

/** @type {import('jest').Config} */
module.exports = {
    preset: 'ts-jest',
    testEnvironment: 'node',
    testMatch: ['<rootDir>/__tests__/**/*.test.ts'],
    testTimeout: 60000,
    transform: {
        '^.+\\.ts$': 'ts-jest',
        [`/node_modules/(${ESM_PACKAGES.join('|')})/.+\\.js$`]: [
            'ts-jest',
            { tsconfig: { allowJs: true, module: 'commonjs', target: 'ES2022' }, isolatedModules: true },
        ],
    },
    transformIgnorePatterns: [`/node_modules/(?!(${ESM_PACKAGES.join('|')})/)`],
}
