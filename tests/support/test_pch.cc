// The source of icecache_test_pch (tests/CMakeLists.txt): the target exists
// to build the precompiled header every test target reuses; it has no code.
